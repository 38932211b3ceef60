"""A throwaway PostgreSQL server for the queue tests: Debian's `postgresql` binaries, a cluster in a
temporary directory on a free port, stopped and removed at the end of the session.

ZTURBO_TEST_POSTGRES=postgresql://USER@HOST:PORT/DB uses a running server instead (USER may create
databases). ZTURBO_POSTGRES=require (CI) makes a missing server or psycopg fail the tests rather
than skip them.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

REQUIRE_ENV, SERVER_ENV = "ZTURBO_POSTGRES", "ZTURBO_TEST_POSTGRES"
INSTALL = "install the Debian package postgresql (apt-get install postgresql) and pip install 'zturbo[postgres]'"


def unavailable(why: str) -> None:
    """Skip, or fail where the PostgreSQL tests are required."""
    message = f"no PostgreSQL for the queue tests: {why}; {INSTALL}, or set {SERVER_ENV}=postgresql://..."
    if os.environ.get(REQUIRE_ENV) == "require":
        pytest.fail(message)
    pytest.skip(message)


def _bin_dir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(root: Path) -> Callable[[list[str]], list[str]]:
    """initdb refuses to run as root: there, the cluster belongs to the `postgres` user the Debian
    package made."""
    if os.geteuid() != 0:
        return lambda cmd: cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        unavailable("running as root and there is no postgres user to own the cluster")
    shutil.chown(root, "postgres")
    return lambda cmd: ["runuser", "-u", "postgres", "--", *cmd]


@contextlib.contextmanager
def server() -> Iterator[str]:
    """The URL of a server the tests may create databases on: $ZTURBO_TEST_POSTGRES, else a throwaway one."""
    if importlib.util.find_spec("psycopg") is None:
        unavailable("psycopg is not installed")
    if os.environ.get(SERVER_ENV):
        yield os.environ[SERVER_ENV]
        return
    with throwaway_cluster() as url:
        yield url


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    """A new cluster's URL (trust authentication on 127.0.0.1; user zturbo)."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        unavailable("initdb is not installed")
    root = Path(tempfile.mkdtemp(prefix="zturbo-pg-"))
    as_owner = _as_owner(root)
    data, port = root / "data", _free_port()
    # fsync off: these tests check the queue's transactions, not the server's own durability.
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    try:
        run = [
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "zturbo", "--auth=trust", "-E", "UTF8", "--no-sync"],
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        ]
        for cmd in run:
            done = subprocess.run(as_owner(cmd), capture_output=True, text=True)
            if done.returncode != 0:
                log = (root / "log").read_text() if (root / "log").exists() else ""
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stdout}{done.stderr}{log}")
        yield f"postgresql://zturbo@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            stop = [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
            subprocess.run(as_owner(stop), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server, dropped afterwards: its URL."""
    import psycopg

    name = f"zturbo_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
