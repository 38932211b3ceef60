# Sourced on the GPU machine from the repo root, with .whl carried (scripts/gpu/wheels.sh made it):
# the wheels into /tmp/site, bytecode compiled as any pip install does; the environment of every
# measurement in docs/performance.md. NO_TORCHAO=1 leaves torchao out (the default install has none).
_W=$(ls .whl/*.whl | { if [ -n "${NO_TORCHAO:-}" ]; then grep -v torchao; else cat; fi; })
python3 -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target /tmp/site $_W >/tmp/pip.log 2>&1 \
    || { cat /tmp/pip.log; return 1; }
export PYTHONPATH=/tmp/site:$PWD/src ZTURBO_CACHE=/tmp/zc PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m compileall -q src >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,power.limit,clocks.max.sm --format=csv,noheader | tee "${OUT:-/tmp}/gpu.txt"
