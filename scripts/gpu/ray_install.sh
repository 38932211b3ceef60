# Sourced from the repo root (after scripts/gpu/setup.sh): Ray 2.60 (+Serve deps, trimmed) and psycopg 3.3.9
# from .whlray/rsite.tar.xz (scripts/gpu/ray_bundle.sh) into $RSITE (default /tmp/rsite); PYTHONPATH, PATH (ray, serve), env.
# Re-sourcing is cheap: the unpack is skipped once $RSITE/.ok exists.
_RD=${RD:-$PWD/.whlray}
export RSITE=${RSITE:-/tmp/rsite}
if [ ! -f "$RSITE/.ok" ]; then
  rm -rf "$RSITE" && mkdir -p "$RSITE/bin" || return 1
  python3 - "$_RD/rsite.tar.xz" "$RSITE" <<'PY' || echo "install.sh: python's tarfile failed, trying tar" >&2
import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    kw = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}
    t.extractall(sys.argv[2], **kw)
PY
  # (python3 without lzma: GNU tar's own xz)
  [ -d "$RSITE/ray" ] || tar -C "$RSITE" -xJf "$_RD/rsite.tar.xz" || return 1
  _PY=$(command -v python3)
  printf '#!%s\nimport sys\nfrom ray.scripts.scripts import main\nsys.argv[0] = "ray"\nsys.exit(main())\n' "$_PY" > "$RSITE/bin/ray"
  printf '#!%s\nimport sys\nfrom ray.serve.scripts import cli\nsys.argv[0] = "serve"\nsys.exit(cli())\n' "$_PY" > "$RSITE/bin/serve"
  chmod +x "$RSITE/bin/ray" "$RSITE/bin/serve"
  # bytecode now, as pip would, so that Ray's many worker processes do not each compile on first import
  python3 -m compileall -q -j 0 "$RSITE" >/dev/null 2>&1
  touch "$RSITE/.ok"
fi
case ":${PYTHONPATH:-}:" in *":$RSITE:"*) ;; *) export PYTHONPATH="$RSITE${PYTHONPATH:+:$PYTHONPATH}" ;; esac
case ":$PATH:" in *":$RSITE/bin:"*) ;; *) export PATH="$RSITE/bin:$PATH" ;; esac
export RAY_USAGE_STATS_ENABLED=0
python3 -c "import ray, ray.serve, psycopg; print('install.sh: ray', ray.__version__, 'psycopg', psycopg.__version__, psycopg.pq.__impl__)" || return 1
