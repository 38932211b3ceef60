#!/bin/bash
# Call r26, from the repo root on the GPU machine, after `. scripts/gpu/setup.sh` (and a call that left the
# checkpoint /tmp/zi and the compile cache /tmp/lw/compile-cache):
#   R26_SERVE_ARGS='--compile-cache /tmp/lw/compile-cache' bash scripts/gpu/ray_vs_serve.sh
# `zturbo serve --store postgresql://...` (one process, PostgreSQL job store) against the same server
# as a Ray Serve deployment (`--ray auto`), each on a fresh database, then $OUT/summary.md.
# Env: R26_SERVE_ARGS (split into --serve-arg=X items), R26_LOAD_ARGS (more load_serve flags, e.g.
# '--rounds 4 --warmup-rounds 1'), R26_TIMEOUT (seconds per load_serve run, default 280); for a CPU
# rehearsal: R26_MODEL (default /tmp/zi), R26_NUM_GPUS (default 1), R26_RAY_ARGS (serve args of the ray run only);
# R26_RAY_PLAIN=1: Ray Serve's default mode instead of the throughput-optimized one.
# R26_ONLY=serve|ray: that run alone. R26_RAY_SWITCH=SECONDS: Ray's worker processes start with
# sys.setswitchinterval(SECONDS) (a sitecustomize on their PYTHONPATH; an experiment, not a setting).
# R26_KEYS=1: $OUT/keydiff.txt, the parts of Inductor's cache keys that differ between the serve worker
# and the Ray replica for the same graph (scripts/gpu/keydiff.py).
# R26_RAY_RESTART=1: the Ray run's warm restart too (a replica starting from the cache a replica left).
# R26_SPY=1: py-spy samples of the GPU process (R26_SPY_S seconds each, R26_SPY_DELAY s into the
# 512x1 scenario); off by default, as sampling at 250 Hz takes time from the measured window.
# $OUT gets: serve/load.{json,md}, ray/load.{json,md}, summary.md, logs.txt (+ setup.sh's gpu.txt),
# NAME-spy-{idle,gil}.txt (py-spy raw stacks of the process on the GPU, every thread).
set -o pipefail
case ${R26_ONLY:-} in ""|serve|ray) ;; *) echo "R26_ONLY=$R26_ONLY: want serve or ray"; exit 2 ;; esac
OUT=${OUT:-/tmp/r26out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
LOGS=/tmp/r26_logs.txt; : > $LOGS
logpart() { { echo; echo "===== $1"; tail -c "${3:-60000}" "$2" 2>/dev/null; } >> $LOGS; }
finish() {
  el "stop ray and postgres"
  ray stop --force >/tmp/r26_raystop.log 2>&1
  bash scripts/gpu/pg.sh --stop >/dev/null 2>&1
  head -c 1000000 $LOGS > "$OUT/logs.txt"
  el "done"
}
trap finish EXIT

el "install ray + psycopg"
. scripts/gpu/ray_install.sh > /tmp/r26_install.log 2>&1 || { cat /tmp/r26_install.log; logpart install /tmp/r26_install.log; exit 1; }
tail -2 /tmp/r26_install.log
el "postgres"
bash scripts/gpu/pg.sh --fresh zturbo zturbo2 || { logpart "postgres.log" /tmp/rpg/postgres.log; exit 1; }
PG=postgresql://zturbo@127.0.0.1:5432/zturbo
PG2=postgresql://zturbo@127.0.0.1:5432/zturbo2
SA=(); for a in ${R26_SERVE_ARGS:-}; do SA+=("--serve-arg=$a"); done
RA=(); for a in ${R26_RAY_ARGS:-}; do RA+=("--serve-arg=$a"); done
LA=(${R26_LOAD_ARGS:-})
TO=${R26_TIMEOUT:-280}
BUDGET=${R26_BUDGET:-575}  # the whole script's seconds (a device command may run 600): a run gets at most what is left
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}

el "ray start --head"
# Serve's throughput-optimized mode (raydeploy.THROUGHPUT_ENV, docs/ray.md); R26_RAY_PLAIN=1 leaves Serve's defaults.
[ -n "${R26_RAY_PLAIN:-}" ] || eval "$(python3 -c 'from zturbo.serving.raydeploy import THROUGHPUT_ENV as env
print(" ".join(f"export {k}={v};" for k, v in env.items()))')"
# R26_NO_HAPROXY=1: Serve's Python proxy in place of HAProxy.
[ -z "${R26_NO_HAPROXY:-}" ] || unset RAY_SERVE_ENABLE_HA_PROXY
# Experiments through a sitecustomize on the PYTHONPATH of every process of the call, written only
# when one is asked for: R26_RAY_SWITCH in Ray's processes only (R26_IN_RAY is in `ray start`'s
# environment alone); R26_KEYS=1: each process logs Inductor's cache-key parts to /tmp/r26keys.
rm -rf /tmp/r26site /tmp/r26keys; mkdir -p /tmp/r26keys
if [ -n "${R26_RAY_SWITCH:-}${R26_KEYS:-}" ]; then
  [[ -z "${R26_RAY_SWITCH:-}" || "$R26_RAY_SWITCH" =~ ^[0-9]*\.?[0-9]+$ ]] \
    || { echo "R26_RAY_SWITCH=$R26_RAY_SWITCH: want seconds, e.g. 0.001"; exit 2; }
  mkdir -p /tmp/r26site
  { echo "import logging, os, sys"
    [ -z "${R26_RAY_SWITCH:-}" ] || echo "if os.environ.get('R26_IN_RAY'): sys.setswitchinterval(${R26_RAY_SWITCH})"
    [ -z "${R26_KEYS:-}" ] || cat <<'SC'
_h = logging.FileHandler(f"/tmp/r26keys/keys-{os.getpid()}-{'ray' if os.environ.get('R26_IN_RAY') else 'serve'}.log")
_l = logging.getLogger("torch._inductor.codecache"); _l.setLevel(logging.DEBUG); _l.addHandler(_h)
SC
  } > /tmp/r26site/sitecustomize.py
  export PYTHONPATH=/tmp/r26site:$PYTHONPATH
fi
R26_IN_RAY=1 ray start --head --num-gpus "${R26_NUM_GPUS:-1}" --disable-usage-stats > /tmp/r26_raystart.log 2>&1; rc=$?
tail -4 /tmp/r26_raystart.log; echo "ray start rc=$rc"
[ $rc = 0 ] || { logpart "ray start" /tmp/r26_raystart.log; }

# Leftover `zturbo serve` processes of a run cut short (by its own pid, one at a time).
reap() {
  local p
  for p in $(pgrep -f "zturbo.cli serve" 2>/dev/null); do
    [ "$p" = "$$" ] && continue
    echo "reaping leftover zturbo serve pid $p"; kill "$p" 2>/dev/null
  done
  sleep 2
  for p in $(pgrep -f "zturbo.cli serve" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
}

# py-spy samples of the process on the GPU (its every thread, idle included, then only the one
# holding the GIL) a moment into the 512² one-at-a-time scenario; PATTERN finds that process.
spy() {  # NAME LOGFILE PATTERN SECONDS (the most it waits for the scenario)
  local spy; spy=$(command -v py-spy || echo /tmp/site/bin/py-spy)  # setup.sh installs it under /tmp/site
  [ "${R26_SPY:-0}" = 1 ] && [ -x "$spy" ] || return 0
  ( for _ in $(seq $(( 2 * $4 ))); do grep -q "512² with 1 client" "$2" 2>/dev/null && break; sleep 0.5; done
    grep -q "512² with 1 client" "$2" 2>/dev/null || exit 0
    sleep "${R26_SPY_DELAY:-3}"
    local pid; pid=$(pgrep -f "$3" | head -1)
    [ -n "$pid" ] || { echo "$1: no process matches $3" > /tmp/r26_spy_$1.log; exit 0; }
    for mode in idle gil; do
      timeout 20 "$spy" record -p "$pid" --threads --"$mode" --nonblocking --rate 250 --duration "${R26_SPY_S:-4}" \
        --format raw -o "$OUT/$1-spy-$mode.txt" >> /tmp/r26_spy_$1.log 2>&1
    done ) </dev/null >/dev/null 2>&1 &
  SPY_PID=$!
}

run_load() {  # NAME WORK DB_URL [extra serve args...]
  local name=$1 work=$2 url=$3; shift 3
  rm -rf "$work" /tmp/r26o/$name; mkdir -p /tmp/r26o/$name
  local left=$(( BUDGET - ($(date +%s) - T0) - 30 )) to=$TO
  [ $left -lt $to ] && to=$left
  [ $left -lt 30 ] && { echo "$name: skipped, only $left s left"; return 1; }
  el "load_serve: $name (timeout $to s)"
  : > /tmp/r26o/$name.log; SPY_PID=
  if [ "$name" = ray ]; then spy "$name" /tmp/r26o/$name.log "ServeReplica:.*zturbo-gpu" "$to"
  else spy "$name" /tmp/r26o/$name.log "spawn_main" "$to"; fi
  local restart=(--no-restart)  # R26_RAY_RESTART=1: the Ray run starts again from the cache its replica left
  [ "$name" = ray ] && [ -n "${R26_RAY_RESTART:-}" ] && restart=()
  timeout -k 10 "$to" python3 scripts/load_serve.py --model "${R26_MODEL:-/tmp/zi}" "${restart[@]}" --no-engine --work "$work" \
    --serve-arg=--store --serve-arg="$url" "$@" "${SA[@]}" "${LA[@]}" --out /tmp/r26o/$name > /tmp/r26o/$name.log 2>&1
  local rc=$?
  [ -z "$SPY_PID" ] || { kill "$SPY_PID" 2>/dev/null; wait "$SPY_PID" 2>/dev/null; }
  echo "$name rc=$rc"; tail -4 /tmp/r26o/$name.log
  mkdir -p "$OUT/$name"; cp /tmp/r26o/$name/load.json /tmp/r26o/$name/load.md "$OUT/$name/" 2>/dev/null
  logpart "$name: load_serve rc=$rc" /tmp/r26o/$name.log 20000
  logpart "$name: zturbo serve log" /tmp/r26o/$name/serve-cold.log 150000
  [ -f /tmp/r26o/$name/serve-warm.log ] && logpart "$name: zturbo serve log, restart" /tmp/r26o/$name/serve-warm.log 60000
  logpart "$name: py-spy" /tmp/r26_spy_$name.log 4000
  reap
  return $rc
}

[ "${R26_ONLY:-serve}" = serve ] && run_load serve /tmp/r26s "$PG"
rc_ray=0
[ "${R26_ONLY:-ray}" = ray ] && { run_load ray /tmp/r26r "$PG2" --serve-arg=--ray --serve-arg=auto "${RA[@]}"; rc_ray=$?; }
if [ "${R26_ONLY:-ray}" != ray ]; then :
elif [ $rc_ray != 0 ] || ! grep -q images_per_s "$OUT/ray/load.json" 2>/dev/null; then
  for f in /tmp/ray/session_latest/logs/serve/*.log /tmp/ray/session_latest/logs/raylet.err \
           /tmp/ray/session_latest/logs/gcs_server.err /tmp/ray/session_latest/logs/worker-*.err; do
    [ -s "$f" ] && logpart "ray: $f" "$f" 40000
  done
else
  for f in /tmp/ray/session_latest/logs/serve/controller_*.log; do [ -s "$f" ] && logpart "ray: $f" "$f" 20000; done
fi
# The replicas' own zturbo lines (compile cache, load phases), whatever the outcome.
grep -h "zturbo\[" /tmp/ray/session_latest/logs/worker-*.err /tmp/ray/session_latest/logs/worker-*.out \
  2>/dev/null | grep -v Warning | head -c 20000 > /tmp/r26_replicas.txt
logpart "ray: replicas' zturbo lines" /tmp/r26_replicas.txt 20000

if [ -n "${R26_KEYS:-}" ]; then
  find /tmp/r26keys -empty -delete; python3 scripts/gpu/keydiff.py /tmp/r26keys > "$OUT/keydiff.txt" 2>&1
  head -40 "$OUT/keydiff.txt"
fi
el "summary"
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {}
for name in ("serve", "ray"):
    try:
        runs[name] = json.loads((out / name / "load.json").read_text())
    except (OSError, ValueError) as e:
        runs[name] = {"error": str(e)}
import os
mode = "throughput-optimized" if os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1" else "default"
mode += ", HAProxy ingress" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else ", Serve's proxy"
lines = ["# r26: zturbo serve --store postgresql vs. Ray Serve (--ray auto), same machine, same call", "",
         f"- Ray Serve's mode: {mode}"]
for name, res in runs.items():
    cold = res.get("starts", {}).get("cold", {})
    lines.append(f"- {name}: cold start to /ready {cold.get('ready_s', float('nan')):.1f} s"
                 + (f", warm {cold['warm_s']:.1f} s" if "warm_s" in cold else "")
                 + (f"; load.json unreadable: {res['error']}" if "error" in res else ""))
lines += ["", "| scenario | serve images/s | ray images/s | ray / serve | serve p50 s | ray p50 s | errors serve / ray |",
          "|---|---|---|---|---|---|---|"]
keys = list(dict.fromkeys(k for r in runs.values() for k in r.get("scenarios", {})))
for key in keys:
    s, r = (runs[n].get("scenarios", {}).get(key, {}) for n in ("serve", "ray"))
    si, ri = s.get("images_per_s"), r.get("images_per_s")
    f = lambda v: f"{v:.3f}" if isinstance(v, (int, float)) else "-"
    ratio = f"{ri / si:.3f}" if si and ri else "-"
    err = f"{s.get('errors', '-')} / {r.get('errors', '-')}"
    lines.append(f"| {key} | {f(si)} | {f(ri)} | {ratio} | {f(s.get('p50_s'))} | {f(r.get('p50_s'))} | {err} |")
    for n, row in (("serve", s), ("ray", r)):
        if row.get("first_error"):
            lines.append(f"|  | {n} first error: {str(row['first_error'])[:200]} | | | | | |")
text = "\n".join(lines) + "\n"
(out / "summary.md").write_text(text)
print(text)
PY
