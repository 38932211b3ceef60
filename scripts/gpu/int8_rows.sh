# `bash scripts/gpu/int8_rows.sh` on the GPU machine, carry [".whl"]. Under a 4 GiB cap at 1024²:
# the int8 row eager (`--no-compile`), the bf16 row (the same-run reference), the int8 row compiled
# (with recompiles, graph breaks and Inductor's log), so a row whose compile runs for minutes still
# says what its images cost; then the GGUF GPU tests. A step still running after 90 s has its
# processes' Python stacks written each minute (py-spy, from .whl), to show where the time goes.
# Each step gets what is left of B seconds (default 560); files in $OUT have no ':' (run drops such names).
set -o pipefail
T0=$(date +%s); left() { echo $(( ${B:-560} - ($(date +%s) - T0) )); }
. scripts/gpu/setup.sh || exit 1
step() {  # name wanted-timeout command...
    local name=$1 to=$2 l; shift 2; l=$(left); [ "$l" -lt "$to" ] && to=$l
    [ "$to" -lt 30 ] && { echo "$name skipped: $l s left"; return; }
    echo "[$(( $(date +%s) - T0 )) s] $name (timeout $to)"
    timeout "$to" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err" & local pid=$! waited=0
    while kill -0 $pid 2>/dev/null; do  # a step still running after 90 s: where its processes are, each minute
        sleep 5; waited=$((waited + 5))
        if [ $waited -ge 90 ] && [ $(( waited % 60 )) -eq 30 ]; then
            for child in $(pgrep -P $pid); do  # timeout's child: the step's Python process
                /tmp/site/bin/py-spy dump --subprocesses --pid $child >> "$OUT/$name-stack-$waited.txt" 2>&1
            done
        fi
    done
    wait $pid; echo "rc=$?"
    python3 -c "import json,sys
for line in open(sys.argv[1]):
    if line.startswith('{'): d = json.loads(line); d.pop('thumbnail', None); print(json.dumps(d)[:1500])" "$OUT/$name.out"
    grep -v "^\s*$" "$OUT/$name.err" | grep -v "Extern Choice" | tail -4
}
row=(python3 -m zturbo.cli bench --random-weights --sizes 1024 --runs 3 --cap-row)
step int8-eager 200 "${row[@]}" zturbo-int8:4 --no-compile
step bf16-compiled 150 "${row[@]}" zturbo:4  # the same-run reference: the bf16-exact plan under the cap
TORCH_LOGS=recompiles,graph_breaks,inductor step int8-compiled 240 "${row[@]}" zturbo-int8:4
step gguf-tests 200 python3 -m pytest -q -m gpu tests/test_gguf.py -p no:cacheprovider
echo "[$(( $(date +%s) - T0 )) s] done"
