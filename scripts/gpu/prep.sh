#!/bin/bash
# On a fresh GPU machine, after `. scripts/gpu/setup.sh`: what ray_vs_serve.sh needs from an earlier
# call, without the serving run's scenarios: the real-size random checkpoint /tmp/zi and the compile
# cache /tmp/lw/compile-cache, filled by load_serve.py's engine child at every batch the server forms
# (1, 4 and 8; one timed call each). Its engine rows land in $OUT/prep.
set -o pipefail
. scripts/gpu/steps.sh
checkpoint
el "engine rows, filling the compile cache"
timeout "${PREP_TIMEOUT:-400}" python3 scripts/load_serve.py --model /tmp/zi --work /tmp/lw \
    --engine-cache /tmp/lw/compile-cache --no-serve --engine-runs 1 --engine-warmup 1 \
    --out "$OUT/prep" > /tmp/prep.log 2>&1
echo "rc=$?"; tail -4 /tmp/prep.log
el "done"
