#!/bin/bash
# PostgreSQL 16 (from pgserver's relocatable build in .whlray/pg.tar.xz) on 127.0.0.1:5432, trust auth,
# run as the unprivileged user zpg (PostgreSQL refuses root).
#   bash scripts/gpu/pg.sh [DB ...]   start (or reuse) the server; create each DB (default: zturbo), owned by role zturbo
#   bash scripts/gpu/pg.sh --fresh DB drop DB if it exists and create it anew
#   bash scripts/gpu/pg.sh --stop     stop the server
# Prints postgresql://zturbo@127.0.0.1:5432/DB for each DB. Env: PGROOT (default /tmp/rpg), PGPORT_R (5432).
set -u
RD=${RD:-$PWD/.whlray}  # where pg.tar.xz is (scripts/gpu/ray_bundle.sh makes it); run from the repo root
PGROOT=${PGROOT:-/tmp/rpg}; PORT=${PGPORT_R:-5432}; PGU=zpg
BIN=$PGROOT/pg/pgserver/pginstall/bin; DATA=$PGROOT/data; LOG=$PGROOT/postgres.log
asuser() {
  if command -v runuser >/dev/null; then runuser -u $PGU -- "$@"
  elif command -v setpriv >/dev/null; then setpriv --reuid=$(id -u $PGU) --regid=$(id -g $PGU) --init-groups -- "$@"
  else su -s /bin/sh $PGU -c "$(printf '%q ' "$@")"; fi
}
sql() { "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p $PORT -U postgres -d postgres -tAc "$1"; }
if [ "${1:-}" = "--stop" ]; then
  [ -f "$DATA/postmaster.pid" ] && asuser "$BIN/pg_ctl" -D "$DATA" -m fast -w stop
  exit 0
fi
FRESH=0; [ "${1:-}" = "--fresh" ] && { FRESH=1; shift; }
DBS=("$@"); [ ${#DBS[@]} -eq 0 ] && DBS=(zturbo)
if [ ! -x "$BIN/postgres" ]; then
  mkdir -p "$PGROOT" && chmod 755 "$PGROOT"
  python3 -c "import sys,tarfile; t=tarfile.open(sys.argv[1]); t.extractall(sys.argv[2], **({'filter':'fully_trusted'} if hasattr(tarfile,'fully_trusted_filter') else {}))" \
    "$RD/pg.tar.xz" "$PGROOT" || tar -C "$PGROOT" -xJf "$RD/pg.tar.xz" || { echo "pg.sh: unpack failed" >&2; exit 1; }
fi
if ! id -u $PGU >/dev/null 2>&1; then
  if command -v useradd >/dev/null; then useradd -r -M -d "$PGROOT" -s /bin/sh $PGU
  else  # no shadow-utils: a passwd/group line of its own
    echo "$PGU:x:971:971::$PGROOT:/bin/sh" >> /etc/passwd; echo "$PGU:x:971:" >> /etc/group; fi || { echo "pg.sh: cannot create user $PGU" >&2; exit 1; }
fi
if [ ! -f "$DATA/PG_VERSION" ]; then
  mkdir -p "$DATA" && chown $PGU "$DATA" && chmod 700 "$DATA"
  (cd / && asuser "$BIN/initdb" -D "$DATA" -U postgres -A trust -E UTF8 --locale=C) > "$PGROOT/initdb.log" 2>&1 \
    || { cat "$PGROOT/initdb.log" >&2; echo "pg.sh: initdb failed" >&2; exit 1; }
fi
if ! "$BIN/pg_isready" -q -h 127.0.0.1 -p $PORT; then
  mkdir -p "$PGROOT/run"; touch "$LOG"; chown $PGU "$LOG" "$PGROOT/run"
  (cd / && asuser "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
     -o "-c listen_addresses=127.0.0.1 -p $PORT -c unix_socket_directories=$PGROOT/run -c max_connections=200" start) >/dev/null \
    || { tail -30 "$LOG" >&2; echo "pg.sh: postgres did not start" >&2; exit 1; }
fi
for i in $(seq 60); do "$BIN/pg_isready" -q -h 127.0.0.1 -p $PORT && break; sleep 0.5; done
"$BIN/pg_isready" -h 127.0.0.1 -p $PORT >&2 || { tail -30 "$LOG" >&2; exit 1; }
[ "$(sql "select 1 from pg_roles where rolname='zturbo'")" = 1 ] || sql "create role zturbo login" || exit 1
for db in "${DBS[@]}"; do
  [ $FRESH = 1 ] && { sql "drop database if exists \"$db\" with (force)" || exit 1; }
  [ "$(sql "select 1 from pg_database where datname='$db'")" = 1 ] || sql "create database \"$db\" owner zturbo" || exit 1
  echo "postgresql://zturbo@127.0.0.1:$PORT/$db"
done
