"""`zturbo serve` run as `python -m zturbo.cli serve ...` would run it, its worker processes replaced
by a probe: what the server process had imported when it started its first worker, and what the
worker process had imported when its entry point began (the parent's main module, re-imported by
multiprocessing's spawn, and the entry point's own module). Each list goes to a JSON file in OUT.

    python -c "import sys, spawn_probe; spawn_probe.main(sys.argv[1], sys.argv[2:])" OUT serve --model ...

with this directory and src on PYTHONPATH (not `-m spawn_probe`: the probe must be importable by
its module name in the worker, whose main module is zturbo.cli's).
"""

from __future__ import annotations

import json
import multiprocessing.context
import runpy
import sys
from pathlib import Path
from typing import Any

SERVER_FILE = "server-modules.json"
WORKER_FILE = "worker-modules.json"


def probe_worker(
    worker_id: str,
    device: str,
    config: Any,
    store_location: str,
    data_dir: str,
    conn: Any,
    skipped_warmups: Any = None,
    out: str = "",
) -> None:
    """In place of `workers.worker_main`: note the modules, then wait to be told to stop."""
    _note(Path(out) / WORKER_FILE, sorted(sys.modules))
    try:
        while conn.recv() is not None:
            pass
    except EOFError:
        pass


def _note(path: Path, modules: list[str]) -> None:
    if not path.exists():  # the first process only: a restarted worker comes later
        path.write_text(json.dumps(modules))


def main(out: str, argv: list[str]) -> None:
    import functools

    from zturbo.serving import workers

    spawn_start = multiprocessing.context.SpawnProcess.start

    def start(process: Any) -> None:
        _note(Path(out) / SERVER_FILE, sorted(sys.modules))
        spawn_start(process)

    multiprocessing.context.SpawnProcess.start = start  # type: ignore[method-assign]
    workers.worker_main = functools.partial(probe_worker, out=out)  # type: ignore[assignment]
    sys.argv = ["zturbo", *argv]
    # As `python -m zturbo.cli`: the main module is zturbo.cli, which each spawned worker imports again.
    runpy.run_module("zturbo.cli", run_name="__main__", alter_sys=True)
