# Sourced by the GPU scripts from the repo root: `el` prints a step with the seconds since sourcing;
# `checkpoint` writes the real-size random checkpoint /tmp/zi where a call has not left one.
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
checkpoint() {
  el "checkpoint"
  [ -d /tmp/zi ] || python3 -m zturbo.cli bench --write-checkpoint /tmp/zi 2>&1 | tail -1
}
