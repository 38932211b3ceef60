#!/bin/bash
# On the GPU machine, after `. scripts/gpu/setup.sh` (with NO_TORCHAO=1 for a default install), in
# one call: the real-size random checkpoint; the engine's rows, whose child fills the compile cache;
# then one server start on that cache (the warm start) with the four scenarios (docs/performance.md,
# Serving). Extra load_serve.py flags go in LOAD_ARGS; everything lands in $OUT/run.
set -o pipefail
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
el "checkpoint"
[ -d /tmp/zi ] || python3 -m zturbo.cli bench --write-checkpoint /tmp/zi 2>&1 | tail -1
el "engine rows (cold compile), then the warm start and the scenarios"
# shellcheck disable=SC2086
timeout "${RUN_TIMEOUT:-400}" python3 scripts/load_serve.py --model /tmp/zi --work /tmp/lw \
    --engine-cache /tmp/lw/compile-cache --start-warm --engine-runs 5 --engine-warmup 2 ${LOAD_ARGS:-} \
    --out "$OUT/run" > /tmp/run.log 2>&1
echo "rc=$?"; tail -4 /tmp/run.log
rm -f "$OUT/run/engine.log"
cat "$OUT/run/load.md"
el "done"
