#!/usr/bin/env bash
# Build FlashAttention 3 (forward only, head dim 128, bf16, sm90a) on this CPU machine for the
# H100 device, whose image has no FA3 and cannot download one. The result is a site directory
# (flash_attn_3/_C.abi3.so, flash_attn_interface.py, flash_attn_config.py) to carry to the device
# and put on PYTHONPATH; zturbo.attention then uses it (after its check against SDPA).
#
# Inputs (see docs/performance.md, issue 4):
#   FA_REPO      a flash-attention checkout (hopper/ is used), e.g. from `fetch github:Dao-AILab/flash-attention`
#   CUTLASS_REPO a CUTLASS git directory holding the submodule commit FA pins (csrc/cutlass)
#   TORCH_WHEEL  the device's torch wheel (torch 2.11.0+cu130, cp312): headers to compile the
#                stable-ABI API file against, and libraries to link and check symbols against
#   FA3_FP8=1    also build the e4m3 (fp8) kernels (scripts/probe_floor.py's fa3_fp8 part; about 3 more minutes)
# Output: $OUT_DIR (default .scratch/fa3/site). Needs nvcc (CUDA 13.0) and g++; about 3 minutes on 2 cores.
set -euo pipefail
: "${FA_REPO:?a flash-attention checkout}" "${CUTLASS_REPO:?a CUTLASS git directory}" "${TORCH_WHEEL:?the device torch wheel}"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$ROOT/.scratch/fa3}
OUT_DIR=${OUT_DIR:-$WORK/site}
mkdir -p "$WORK/obj" "$WORK/cutlass" "$WORK/torch"
cd "$WORK"

CUTLASS_COMMIT=$(git -C "$FA_REPO" ls-tree HEAD csrc/cutlass | awk '{print $3}')
git -C "$FA_REPO" archive HEAD hopper | tar x
git -C "$CUTLASS_REPO" archive "$CUTLASS_COMMIT" include tools/util/include | tar x -C cutlass
unzip -q -o "$TORCH_WHEEL" 'torch/include/*' 'torch/lib/*' -d torch
T=$WORK/torch/torch

# What FA3's setup.py passes with these FLASH_ATTENTION_DISABLE_* switches on.
FEAT=(-DFLASHATTENTION_DISABLE_BACKWARD -DFLASHATTENTION_DISABLE_PAGEDKV -DFLASHATTENTION_DISABLE_SPLIT
      -DFLASHATTENTION_DISABLE_APPENDKV -DFLASHATTENTION_DISABLE_LOCAL -DFLASHATTENTION_DISABLE_SOFTCAP
      -DFLASHATTENTION_DISABLE_PACKGQA -DFLASHATTENTION_DISABLE_FP16 -DFLASHATTENTION_DISABLE_FP8
      -DFLASHATTENTION_DISABLE_VARLEN -DFLASHATTENTION_DISABLE_HDIM64 -DFLASHATTENTION_DISABLE_HDIM96
      -DFLASHATTENTION_DISABLE_HDIM192 -DFLASHATTENTION_DISABLE_HDIM256 -DFLASHATTENTION_DISABLE_SM8x
      -DFLASH_ATTENTION_DISABLE_HDIMDIFF64 -DFLASH_ATTENTION_DISABLE_HDIMDIFF192)
NVCC=(-O3 -std=c++17 --use_fast_math -DCUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED -DCUTLASS_ENABLE_GDC_FOR_SM90
      -DCUTLASS_DEBUG_TRACE_LEVEL=0 -DNDEBUG -gencode arch=compute_90a,code=sm_90a -Xcompiler -fPIC
      --expt-relaxed-constexpr --expt-extended-lambda -U__CUDA_NO_HALF_OPERATORS__
      -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ -U__CUDA_NO_HALF2_OPERATORS__)
SOURCES=(flash_prepare_scheduler.cu instantiations/flash_fwd_hdim128_bf16_sm90.cu)
if [ "${FA3_FP8:-0}" = 1 ]; then
    KEPT=(); for f in "${FEAT[@]}"; do [ "$f" = -DFLASHATTENTION_DISABLE_FP8 ] || KEPT+=("$f"); done; FEAT=("${KEPT[@]}")
    SOURCES+=(instantiations/flash_fwd_hdim128_e4m3_sm90.cu)
fi
for src in "${SOURCES[@]}"; do
    nvcc "${NVCC[@]}" "${FEAT[@]}" -Ihopper -Icutlass/include -c "hopper/$src" -o "obj/$(basename "$src").o"
done
PYINC=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
g++ -O3 -std=c++17 -fPIC -DPy_LIMITED_API=0x03090000 -DTORCH_TARGET_VERSION=0x0209000000000000 \
    -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1 "${FEAT[@]}" -Ihopper -Icutlass/include \
    -I"$T/include" -I"$T/include/torch/csrc/api/include" -I"$PYINC" -I/usr/local/cuda/include \
    -c hopper/flash_api_stable.cpp -o obj/flash_api_stable.o

rm -rf "$OUT_DIR" && mkdir -p "$OUT_DIR/flash_attn_3"
OBJS=(obj/flash_api_stable.o); for src in "${SOURCES[@]}"; do OBJS+=("obj/$(basename "$src").o"); done
g++ -shared -o "$OUT_DIR/flash_attn_3/_C.abi3.so" "${OBJS[@]}" -L"$T/lib" -L/usr/local/cuda/lib64 \
    -Wl,--no-as-needed -lc10 -ltorch_cpu -ltorch_cuda -lcudart -Wl,--as-needed
cp hopper/flash_attn_3/__init__.py "$OUT_DIR/flash_attn_3/"
cp hopper/flash_attn_interface.py "$OUT_DIR/"
python3 - "$OUT_DIR" "${FA3_FP8:-0}" <<'PY'
import sys
off = """BACKWARD SPLIT PAGEDKV APPENDKV LOCAL SOFTCAP PACKGQA FP16 FP8 VARLEN HDIM64 HDIM96 HDIM192 HDIM256 SM8x""".split()
if sys.argv[2] == "1":
    off.remove("FP8")
flags = {f"FLASHATTENTION_DISABLE_{name}": True for name in off}
flags |= {"FLASH_ATTENTION_DISABLE_HDIMDIFF64": True, "FLASH_ATTENTION_DISABLE_HDIMDIFF192": True}
flags |= {"FLASHATTENTION_DISABLE_CLUSTER": False, "FLASHATTENTION_DISABLE_HDIM128": False}
flags |= {"FLASHATTENTION_DISABLE_FP8": sys.argv[2] != "1"}
flags |= {"FLASHATTENTION_ENABLE_VCOLMAJOR": False}
open(f"{sys.argv[1]}/flash_attn_config.py", "w").write(f"CONFIG = {{'build_flags': {flags!r}}}\n")
PY

# Every torch and CUDA symbol the module needs must exist in the device's libraries.
nm -D --undefined-only "$OUT_DIR/flash_attn_3/_C.abi3.so" | awk '{print $2}' | sed 's/@.*//' | sort -u > undefined.txt
for lib in "$T"/lib/libc10.so "$T"/lib/libtorch_cpu.so "$T"/lib/libtorch_cuda.so /usr/local/cuda/lib64/libcudart.so; do
    nm -D --defined-only "$lib" | awk '{print $3}' | sed 's/@.*//'
done | sort -u > defined.txt
missing=$(comm -23 undefined.txt defined.txt | grep -E '^(aoti_|torch_|cuda|_ZN3c10|_ZN2at|_ZN5torch)' || true)
if [ -n "$missing" ]; then echo "symbols missing from the device's libraries:"; echo "$missing"; exit 1; fi
echo "built $OUT_DIR ($(du -sh "$OUT_DIR" | cut -f1))"
