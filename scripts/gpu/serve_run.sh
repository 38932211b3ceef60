#!/bin/bash
# On the GPU machine, after `. scripts/gpu/setup.sh` (with NO_TORCHAO=1 for a default install), in
# one call: the real-size random checkpoint; the engine's rows, whose child fills the compile cache;
# then one server start on that cache (the warm start) with the four scenarios (docs/performance.md,
# Serving), and RESTARTS (default 2) restarts of the server on the cache it left. Extra
# load_serve.py flags go in LOAD_ARGS; the run lands in $OUT/run, each restart in $OUT/wN.
set -o pipefail
. scripts/gpu/steps.sh
checkpoint
el "engine rows (cold compile), then the warm start and the scenarios"
# shellcheck disable=SC2086
timeout "${RUN_TIMEOUT:-400}" python3 scripts/load_serve.py --model /tmp/zi --work /tmp/lw \
    --engine-cache /tmp/lw/compile-cache --start-warm --engine-runs 5 --engine-warmup 2 ${LOAD_ARGS:-} \
    --out "$OUT/run" > /tmp/run.log 2>&1
echo "rc=$?"; tail -4 /tmp/run.log
rm -f "$OUT/run/engine.log"
cat "$OUT/run/load.md"
# A server's own restarts on the compile cache its start left (the warm check needs /ready's hit).
for i in $(seq 1 "${RESTARTS:-2}"); do
  el "restart $i"
  timeout 90 python3 scripts/load_serve.py --model /tmp/zi --work /tmp/lw --warm-only --out "$OUT/w$i" \
      > "/tmp/w$i.log" 2>&1; echo "rc=$?"
  rm -f "$OUT/w$i"/*.log
  grep -E "warm compile cache" "$OUT/w$i/load.md" | head -2
done
el "done"
