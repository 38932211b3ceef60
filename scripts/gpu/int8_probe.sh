# `B=560 bash scripts/gpu/int8_probe.sh` on the GPU machine, carry [".whl"]: scripts/probe_int8_compile.py
# at 512² and 2 steps, compiled: int8 weights resident (the whole GPU), as the engine compiles them and
# with Inductor's int8 rewrite left on (accel.compile.INT8_INDUCTOR_OPTIONS); int8 weights streamed under a
# 4 GiB cap at 1024² and 8 steps, compiled (the engine runs these eagerly: no faster compiled;
# this times the compiled path itself); then the bench's rows of a Q8_0 and a Q4_K GGUF transformer
# file under the same cap at 1024² (`--cap-row zturbo-gguf-TYPE:4`, compiled as the engine compiles them).
# Each prints a line per finished call and the longest kernels of a profiled one; $OUT/out.tgz
# holds every file, with the Python stacks of a step still running after 90 s.
set -o pipefail
. scripts/gpu/setup.sh || exit 1
. scripts/gpu/steps.sh
probe=(python3 scripts/probe_int8_compile.py --size 512 --steps 2)
step int8-resident 80 "${probe[@]}" --cap 0
step int8-resident-patterns 70 "${probe[@]}" --cap 0 --inductor-patterns
TORCH_LOGS=recompiles,graph_breaks step int8-streamed-1024 150 python3 scripts/probe_int8_compile.py --size 1024 --steps 8 --cap 4
row=(python3 -m zturbo.cli bench --random-weights --sizes 1024 --runs 3 --cap-row)
step gguf-q8-row 150 "${row[@]}" zturbo-gguf-Q8_0:4
step gguf-q4k-row 150 "${row[@]}" zturbo-gguf-Q4_K:4
el done; pack
