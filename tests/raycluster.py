"""A throwaway Ray cluster for the Ray Serve tests: a head and a second worker node, each a `ray start
--block` process of its own (own resources, own raylet), on this machine, in a temporary directory.

Each node offers one `zturbo_slot`, and the tests' replicas ask for one, so two replicas land on
two nodes. `kill()` takes a worker node down as a lost machine goes: its processes killed at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

import zturbo

SLOT = "zturbo_slot"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env() -> dict[str, str]:
    """The nodes' environment: this checkout's zturbo first, so the replicas import the code under test;
    Serve in the throughput-optimized mode docs/ray.md asks for."""
    from zturbo.serving.raydeploy import THROUGHPUT_ENV

    env = dict(os.environ) | THROUGHPUT_ENV
    src = str(Path(zturbo.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # A throwaway cluster on 127.0.0.1 needs no token, and one saved by any earlier `ray.init` (in
    # ~/.ray) would not match this cluster's.
    env["RAY_AUTH_MODE"] = "disabled"
    return env


class Node:
    """One `ray start --block` process and everything it started."""

    def __init__(self, args: list[str], log: Path) -> None:
        ray = str(Path(sys.executable).parent / "ray")
        self.log = open(log, "wb")  # noqa: SIM115
        cmd = [ray, "start", "--block", "--disable-usage-stats", *args]
        self.proc = subprocess.Popen(cmd, env=node_env(), stdout=self.log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """All of the node's processes at once (SIGKILL), as a machine that is lost."""
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(self.proc.pid)
            for p in [tree, *tree.children(recursive=True)]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        self.proc.wait(30)
        self.log.close()


def _wait_nodes(address: str, count: int, timeout: float = 120) -> None:
    ray = str(Path(sys.executable).parent / "ray")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([ray, "status", "--address", address], capture_output=True, text=True, env=node_env())
        if out.returncode == 0 and out.stdout.count("node_") >= count:
            return
        time.sleep(1)
    raise AssertionError(f"the Ray cluster did not reach {count} nodes in {timeout} s")


@contextlib.contextmanager
def cluster() -> Iterator[tuple[str, Node, Node]]:
    """(address, head, worker node); skipped where ray is not installed."""
    pytest.importorskip("ray", reason="the Ray tests need pip install 'zturbo[ray]'")
    root = Path(tempfile.mkdtemp(prefix="zturbo-ray-"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    slot = ["--resources", json.dumps({SLOT: 1}), "--num-gpus", "0"]
    head = Node(["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "4",
                 "--include-dashboard", "false", "--temp-dir", str(root), *slot], root / "head.log")  # fmt: skip
    nodes = [head]
    try:
        _wait_nodes(address, 1)
        worker = Node(["--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "2", *slot],
                      root / "worker.log")  # fmt: skip
        nodes.append(worker)
        _wait_nodes(address, 2)
        yield address, head, worker
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(root, ignore_errors=True)
