"""The job queue on PostgreSQL: one queue that the servers of many machines share.

The queue's rules are `jobs.SqlQueue`'s; this module owns the connection, through psycopg 3 (the
optional extra `postgres`), and what keeps those rules when processes on several machines claim at
once. A claim locks the rows it takes and passes over those another claimer holds (`FOR UPDATE SKIP
LOCKED`); a submission counts the waiting jobs under a transaction-scoped advisory lock, so the
bound holds across machines; a claim records its node, and each server renews its node's lease
(`heartbeat`), writing when it runs out by its own `lease_s`: the running jobs of a node whose
lease has run out are queued again, their attempt counted, and the tickets of its claims are void
from then on. Each node is judged by the lease it declared, never by the judge's own.

Commits are durable before a job's id is returned (`synchronous_commit` on for the session). Image
files stay in directories (`data_dir/images`, `data_dir/inputs`), which every node must mount: a
shared file system (docs/server.md, "Many machines").
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import StorageError
from .jobs import ADDED_COLUMNS, RUNNING, InputStore, Job, SqlQueue

log = logging.getLogger("zturbo.jobs")

URL_SCHEMES = ("postgresql", "postgres")
# A node renews its lease at most this often, and another node takes its jobs back once it has not
# for `NODE_LEASE_S`: long enough that a busy server or a database failover of a few seconds does
# not cost a job its attempt, short enough that a lost machine's jobs wait well under a minute.
HEARTBEAT_S = 5.0
NODE_LEASE_S = 30.0
# An input file no job refers to stays this long (`InputStore.keep_s`): the cross-machine stand-in
# for the lock between a submission's write of its files and its commit.
INPUT_KEEP_S = 600.0
# Network and server-side limits of zturbo's sessions, well under the lease: a call stuck on a lost
# network or a lock fails with a StorageError (and the supervisor goes on) before the node's lease
# runs out. The URL's own settings (`?options=-c ...`, `?keepalives_idle=...`) take precedence.
CONNECT_TIMEOUT_S = 10
TCP_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 3}
TCP_USER_TIMEOUT_MS = 15_000  # data the server has not acknowledged for this long: the connection is dead
SESSION_LIMITS_MS = {
    "statement_timeout": 15_000,  # the queue's statements take milliseconds; this is a hung server
    "lock_timeout": 5_000,  # a row or table lock held this long is another session's fault, not a wait
    "idle_in_transaction_session_timeout": 60_000,  # a client that died inside a transaction frees its locks
}
# A node's row stays this long after its lease ran out (its jobs are taken back at once, by `_orphans`).
NODE_PRUNE_S = 3600.0
# pg_advisory_xact_lock keys: zturbo's creation of its tables, and the count of the waiting jobs.
_SCHEMA_LOCK, _QUEUE_LOCK = 0x7A747572_0001, 0x7A747572_0002

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    prompt TEXT NOT NULL,
    client TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    lora_set TEXT NOT NULL DEFAULT '',
    batch_key TEXT NOT NULL DEFAULT '',
    image_count INTEGER NOT NULL DEFAULT 1,
    preview INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    warnings TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    seed BIGINT NOT NULL,
    file TEXT NOT NULL,
    UNIQUE (job_id, idx)
);
CREATE TABLE IF NOT EXISTS job_inputs (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    field TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    PRIMARY KEY (job_id, field)
);
CREATE INDEX IF NOT EXISTS job_inputs_sha256 ON job_inputs (sha256);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY,
    seen_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION
);
"""
# Columns a database made by an earlier zturbo may lack, added under the schema lock (`jobs.ADDED_COLUMNS`).
# A node row without `expires_at` (written by an earlier server) lives `NODE_LEASE_S` from `seen_at`.
PG_ADDED_COLUMNS = (*ADDED_COLUMNS, ("nodes", "expires_at", "DOUBLE PRECISION"))
# The database's clock, in seconds: leases compare times that one clock gave, whatever the nodes' clocks say.
_NOW = "extract(epoch FROM clock_timestamp())"
_EXPIRES = f"COALESCE(expires_at, seen_at + {NODE_LEASE_S})"
# The nodes whose lease runs now; a running job whose claimer is not among them is an orphan.
_LIVE_NODES = f"SELECT name FROM nodes WHERE {_EXPIRES} > {_NOW}"
_ORPHANED = f"split_part(worker, '/', 1) NOT IN ({_LIVE_NODES})"


def is_url(location: str) -> bool:
    return urlsplit(location).scheme in URL_SCHEMES


_QUERY_PASSWORD = re.compile(r"(^|&)(password=)[^&]*", re.IGNORECASE)


def redact(url: str) -> str:
    """The URL without its password (in its user part or its `?password=`), for messages and logs."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    return urlunsplit(parts._replace(query=_QUERY_PASSWORD.sub(r"\1\2***", parts.query)))


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StorageError("a postgresql:// job store needs psycopg 3: pip install 'zturbo[postgres]'") from None
    return psycopg


class _Row:
    """A row read by column name or number, as `sqlite3.Row` is (`SqlQueue` reads both ways)."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values, self._index = values, index

    def __getitem__(self, key: int | str) -> Any:
        return self._values[key if isinstance(key, int) else self._index[key]]


def _rows(cursor: Any) -> Any:
    """psycopg's row factory for `_Row`."""
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: _Row(values, index)


class _Connection:
    """A psycopg connection with `SqlQueue`'s dialect: `?` placeholders, `_Row`s. Opened anew when the
    server dropped it (a restart, a failover), between transactions only."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._psycopg = _psycopg()
        self._conn = self._connect()

    def _connect(self) -> Any:
        conn = self._psycopg.connect(session_conninfo(self.url), autocommit=True, row_factory=_rows)
        conn.execute("SET synchronous_commit TO on")  # a commit is on the server's disk before it returns
        return conn

    def reopen_if_lost(self) -> None:
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        # Without arguments psycopg sends the text as it is (several statements allowed, `%` literal).
        return self._conn.execute(_dialect(sql), args) if args else self._conn.execute(sql)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(_dialect(sql), rows)

    def transaction(self) -> Any:
        return self._conn.transaction()

    def close(self) -> None:
        self._conn.close()


def session_conninfo(url: str) -> str:
    """`url` with zturbo's connection limits added where it sets none of its own: the connect
    timeout, TCP keepalives and user timeout, and the session's statement, lock and
    idle-in-transaction timeouts (first in `options`, so that the URL's own `-c` settings win)."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    given = conninfo_to_dict(url)
    ours = {"connect_timeout": CONNECT_TIMEOUT_S, **TCP_KEEPALIVE, "tcp_user_timeout": TCP_USER_TIMEOUT_MS}
    extra: dict[str, Any] = {k: v for k, v in ours.items() if k not in given}
    limits = " ".join(f"-c {name}={ms}" for name, ms in SESSION_LIMITS_MS.items())
    extra["options"] = f"{limits} {given.get('options', '')}".strip()
    return make_conninfo(url, **extra)


def _dialect(sql: str) -> str:
    """`SqlQueue`'s SQL for psycopg: `?` placeholders become `%s`, a literal `%` is doubled."""
    return sql.replace("%", "%%").replace("?", "%s")


class PostgresJobStore(SqlQueue):
    """The queue in a PostgreSQL database that every node reaches (`url`); input images in `inputs_dir`."""

    _ROW_LOCK = " FOR UPDATE"
    _CLAIM_LOCK = " FOR UPDATE SKIP LOCKED"

    def __init__(
        self,
        url: str,
        *,
        inputs_dir: Path,
        max_queued: int = 64,
        check: bool = True,
        lease_s: float = NODE_LEASE_S,
        node: str | None = None,
    ) -> None:
        """`check=False` leaves the tables as they are (worker processes: the server made them).
        `node`: the name this process's claims and lease go under (default: host, pid and a random
        part); it must be unique among the processes on the queue."""
        self.location = url
        self.where = redact(url)
        self.max_queued = max_queued
        self.inputs = InputStore(inputs_dir, keep_s=INPUT_KEEP_S)
        # This process's claims: a name of its own, so that a restarted server, or a second one on
        # the machine, never takes a live server's jobs for its own.
        self.node = (node or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}").replace("/", "-")
        self.lease_s = lease_s
        self._beat_at = 0.0
        self._lock = threading.RLock()
        errors = _psycopg().errors
        # The server or the connection, not the query (a timeout above is one of these).
        self._lost = (errors.OperationalError, errors.IdleInTransactionSessionTimeout)
        self._swept_at = time.monotonic()  # the server sweeps the inputs at its start (`sweep_inputs`)
        try:
            self._db = _Connection(url)
        except self._lost as e:
            raise StorageError(f"cannot reach the job store {self.where}: {_reason(e)}") from e
        if check:
            try:
                self._create_tables()
            except BaseException:
                self._db.close()
                raise

    def _create_tables(self) -> None:
        with self._tx() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))  # nodes starting at once
            db.execute(SCHEMA)
            have = {(r[0], r[1]) for r in db.execute(_COLUMNS)}
            added = {(table, column) for table, column, _ in PG_ADDED_COLUMNS}
            missing = sorted(column for column in _JOB_COLUMNS if ("jobs", column) not in have | added)
            if missing:  # raised inside the transaction: nothing is made or changed
                raise StorageError(
                    f"{self.where} has a jobs table that is not zturbo's (it lacks {', '.join(missing)}); "
                    "give zturbo a database of its own"
                )
            self._add_columns(db, have)

    def _add_columns(self, db: _Connection, have: set[tuple[str, str]]) -> None:
        """Upgrade tables made by an earlier zturbo (`PG_ADDED_COLUMNS`); only the missing columns are
        altered, so a started cluster's servers take no table lock at each start."""
        for table, column, declaration in PG_ADDED_COLUMNS:
            if (table, column) not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {declaration}")
                log.info("job store %s: added the column %s.%s", self.where, table, column)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[_Connection]:
        """One transaction (READ COMMITTED; the claims' row locks order what must be ordered). A lost
        connection is a StorageError naming the server; the next call connects again."""
        with self._lock:
            try:
                self._db.reopen_if_lost()
                with self._db.transaction():
                    yield self._db
            except self._lost as e:
                raise StorageError(f"cannot write the job store {self.where}: {_reason(e)}") from e

    @contextmanager
    def _read(self) -> Iterator[_Connection]:
        with self._lock:
            try:
                self._db.reopen_if_lost()
                yield self._db
            except self._lost as e:
                raise StorageError(f"cannot read the job store {self.where}: {_reason(e)}") from e

    def _lock_queue(self, db: Any) -> None:
        db.execute("SELECT pg_advisory_xact_lock(?)", (_QUEUE_LOCK,))

    def _prompt_match(self, query: str) -> tuple[str, str]:
        return "strpos(lower(prompt), lower(?)) > 0", query

    def claimer(self, worker: str) -> str:
        return f"{self.node}/{worker}"

    def _orphans(self, db: Any) -> list[Any]:
        """Running jobs whose node's lease has run out, by that node's own lease (or that never had one)."""
        q = f"SELECT id, params, attempts FROM jobs WHERE status = ? AND {_ORPHANED}"
        return db.execute(q, (RUNNING,)).fetchall()

    def _still_orphaned(self) -> str:
        return f" AND {_ORPHANED}"

    def heartbeat(self) -> list[Job]:
        """Renew this node's lease (at most every HEARTBEAT_S; called on each tick of the
        supervisor), queue again the jobs of nodes whose lease ran out, and every `inputs.keep_s`
        remove the input files no job refers to (a refused submission's files outlive it by keep_s)."""
        now = time.monotonic()
        if now - self._beat_at < min(HEARTBEAT_S, self.lease_s / 3):
            return []
        self._beat_at = now
        with self._tx() as db:
            db.execute(
                f"INSERT INTO nodes (name, seen_at, expires_at) VALUES (?, {_NOW}, {_NOW} + ?) "
                "ON CONFLICT (name) DO UPDATE SET seen_at = excluded.seen_at, expires_at = excluded.expires_at",
                (self.node, self.lease_s),
            )
            db.execute(f"DELETE FROM nodes WHERE {_EXPIRES} < {_NOW} - ?", (NODE_PRUNE_S,))
        taken = self.recover("its node stopped answering (its lease ran out)")
        if now - self._swept_at >= self.inputs.keep_s:
            self._swept_at = now
            swept = self.sweep_inputs()
            if swept:
                log.info("removed %d stored input files no job refers to", swept)
        return taken

    def leave(self) -> None:
        """End this node's lease now (a graceful stop): whatever it still runs goes back to the queue
        at the next heartbeat of another node, rather than after the lease."""
        with self._tx() as db:
            db.execute("DELETE FROM nodes WHERE name = ?", (self.node,))

    def live_nodes(self, prefix: str = "") -> dict[str, float]:
        """The nodes named `prefix`... whose lease holds (by the lease each declared, as for the
        recovery of their jobs), with the seconds since each renewed it."""
        q = f"SELECT name, {_NOW} - seen_at FROM nodes WHERE {_EXPIRES} > {_NOW} AND starts_with(name, ?)"
        with self._read() as db:
            return {r[0]: float(r[1]) for r in db.execute(q, (prefix,)).fetchall()}


_COLUMNS = (
    "SELECT table_name, column_name FROM information_schema.columns "
    "WHERE table_name IN ('jobs', 'nodes') AND table_schema = current_schema()"
)
_JOB_COLUMNS = {
    "seq", "id", "status", "params", "prompt", "client", "attempts", "worker", "cancel_requested", "lora_set",
    "batch_key", "image_count", "preview", "error", "warnings", "created_at", "started_at", "finished_at",
}  # fmt: skip


def _reason(error: Exception) -> str:
    """psycopg's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__
