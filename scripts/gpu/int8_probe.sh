# `bash scripts/gpu/int8_probe.sh` on the GPU machine, carry [".whl"]: scripts/probe_int8_compile.py
# with int8 weights compiled, resident (the whole GPU) and then streamed under a 4 GiB cap, at 512²
# and 2 steps; each prints a line per finished call and the longest kernels of a profiled one.
# $OUT/out.tgz holds every file.
set -o pipefail
. scripts/gpu/setup.sh || exit 1
. scripts/gpu/steps.sh
probe=(python3 scripts/probe_int8_compile.py --size 512 --steps 2)
step resident-compiled 110 "${probe[@]}" --cap 0
TORCH_LOGS=recompiles,graph_breaks step streamed-compiled 240 "${probe[@]}" --cap 4
el done; pack
