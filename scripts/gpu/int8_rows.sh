# `bash scripts/gpu/int8_rows.sh` on the GPU machine, carry [".whl"]. The 4 GiB cap's
# int8 row twice, compiled (with recompiles, graph breaks and Inductor's log) and eager (`--no-compile`), so a row
# whose compile runs for minutes still says what its images cost; then the GGUF GPU tests. Each
# step gets what is left of B seconds (default 560); files in $OUT have no ':' (run drops such names).
set -o pipefail
T0=$(date +%s); left() { echo $(( ${B:-560} - ($(date +%s) - T0) )); }
. scripts/gpu/setup.sh || exit 1
step() {  # name wanted-timeout command...
    local name=$1 to=$2 l; shift 2; l=$(left); [ "$l" -lt "$to" ] && to=$l
    [ "$to" -lt 30 ] && { echo "$name skipped: $l s left"; return; }
    echo "[$(( $(date +%s) - T0 )) s] $name (timeout $to)"
    timeout "$to" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"; echo "rc=$?"
    python3 -c "import json,sys
for line in open(sys.argv[1]):
    if line.startswith('{'): d = json.loads(line); d.pop('thumbnail', None); print(json.dumps(d)[:1500])" "$OUT/$name.out"
    grep -v "^\s*$" "$OUT/$name.err" | grep -v "Extern Choice" | tail -4
}
row=(python3 -m zturbo.cli bench --random-weights --cap-row zturbo-int8:4 --sizes 1024 --runs 3)
step int8-eager 200 "${row[@]}" --no-compile
TORCH_LOGS=recompiles,graph_breaks,inductor step int8-compiled 240 "${row[@]}"
step gguf-tests 200 python3 -m pytest -q -m gpu tests/test_gguf.py -p no:cacheprovider
echo "[$(( $(date +%s) - T0 )) s] done"
