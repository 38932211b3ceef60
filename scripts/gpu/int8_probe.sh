# `B=540 bash scripts/gpu/int8_probe.sh` on the GPU machine, carry [".whl"]: scripts/probe_int8_compile.py
# at 1024² and 8 steps: int8 weights streamed under a 4 GiB cap, compiled as the engine runs them,
# the same eager, then resident on the whole GPU, compiled as the engine compiles them and with
# Inductor's int8 rewrite left on (--inductor-patterns, accel.compile.INT8_INDUCTOR_OPTIONS). Each
# prints a line per finished call (with whether it still ran compiled under the placed plan, and
# the peaks) and the longest kernels of a profiled one; $OUT/out.tgz holds every file, with the
# Python stacks of a step still running after 90 s.
set -o pipefail
. scripts/gpu/setup.sh || exit 1
. scripts/gpu/steps.sh
probe=(python3 scripts/probe_int8_compile.py --size 1024 --steps 8)
step int8-streamed 150 "${probe[@]}" --cap 4
step int8-streamed-eager 60 "${probe[@]}" --cap 4 --eager
step int8-resident 150 "${probe[@]}" --cap 0
step int8-resident-patterns 150 "${probe[@]}" --cap 0 --inductor-patterns
el done; pack
