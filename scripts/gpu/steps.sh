# Sourced by the GPU scripts from the repo root: `el` prints a step with the seconds since sourcing;
# `checkpoint` writes the real-size random checkpoint /tmp/zi where a call has not left one; `step`
# runs one command within what is left of B seconds (default 560), its output in $OUT/NAME.{out,err}
# and, past 90 s, its Python stacks each minute; `pack` puts $OUT's files into one archive, as `run`
# returns only a few files.
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
checkpoint() {
  el "checkpoint"
  [ -d /tmp/zi ] || python3 -m zturbo.cli bench --write-checkpoint /tmp/zi 2>&1 | tail -1
}
left() { echo $(( ${B:-560} - ($(date +%s) - T0) )); }
step() {  # name wanted-timeout command...
    local name=$1 to=$2 l; shift 2; l=$(left); [ "$l" -lt "$to" ] && to=$l
    [ "$to" -lt 30 ] && { echo "$name skipped: $l s left"; return; }
    el "$name (timeout $to)"
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
pack() {
    (cd "$OUT" && tar czf /tmp/out.tgz --exclude out.tgz . && rm -f ./*.out ./*.err ./*.txt ./*.jsonl && mv /tmp/out.tgz .)
}
