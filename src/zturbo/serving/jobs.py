"""The persistent job queue: one row per job, state changes as guarded transactions. Its rules are
`SqlQueue`'s, which two stores run: `JobStore` here (SQLite in WAL mode, one machine) and
`pgstore.PostgresJobStore` (PostgreSQL, many machines).

A job is durable (committed; SQLite with synchronous=FULL) before its id is returned. A claim sets the job
`running` and counts an attempt; the attempt number is the claim's token, and every later change
by the worker that claimed it must present it, so a stale claim can never finish a job twice.

A job's input images are stored beside the database, by content (`InputStore`): the row keeps
their sha256 (in the stored request and in `job_inputs`), the files are written before the row
commits, and a file goes when no job refers to it any more.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import sqlite3
import sys
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import (
    InvalidRequestError,
    JobConflictError,
    JobNotFoundError,
    QueueFullError,
    StorageError,
    StoreBusyError,
    ZTurboError,
)
from ..inputs.images import InputImage, decode_image
from ..inputs.spec import ImageResolver
from ..request import GenerateRequest, ModelLimits, is_request_dict

log = logging.getLogger("zturbo.jobs")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
STATES = (QUEUED, RUNNING, *FINISHED)
MAX_ATTEMPTS = 2
# A worker runs the oldest waiting job that uses the LoRA set it ran last, ahead of older jobs with
# another set, only when that job was queued at most this many seconds after the oldest waiting job:
# switching sets rewrites weights, so same-set jobs go together, but no job is ever overtaken by a
# job queued more than this long after it (docs/server.md, "Scheduling").
SAME_SET_WINDOW_S = 30.0
BUSY_WAIT_S = 30.0  # how long a connection waits for another's lock before StoreBusyError
IDLE_READERS = 8  # SQLite read connections kept open between reads (each holds two file descriptors)
NO_LORAS = ""  # the LoRA set key of a job without LoRAs (the base weights)
NO_BATCH = ""  # the batch key of a row that runs alone (queued before batching existed)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
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
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_status_seq ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    seed INTEGER NOT NULL,
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
"""
# Columns a database made by an earlier zturbo may lack: the store adds them when it opens one
# (ALTER TABLE ... ADD COLUMN), each with the value its rows mean: no LoRAs, no batch key (an old
# row runs alone), one image (counted only for batching, which such a row never joins), no previews,
# no warnings.
ADDED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("jobs", "lora_set", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "batch_key", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "image_count", "INTEGER NOT NULL DEFAULT 1"),
    ("jobs", "preview", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "warnings", "TEXT NOT NULL DEFAULT ''"),
)
# Tables such a database may lack; the store creates them (empty: its jobs had no input images).
ADDED_TABLES = ("job_inputs",)


@dataclass(frozen=True)
class ImageRef:
    id: str
    idx: int
    seed: int
    file: str  # name inside the images directory


@dataclass(frozen=True)
class Job:
    """One row of the queue, as read; `params` is the stored request (`GenerateRequest.to_dict`), or
    the plain parameter dict of a job queued by an earlier version."""

    id: str
    seq: int
    status: str
    params: dict[str, Any]
    attempts: int
    worker: str | None
    cancel_requested: bool
    error: dict[str, str] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    client: str | None = None
    images: tuple[ImageRef, ...] = field(default=())
    preview: bool = False
    warnings: tuple[str, ...] = ()  # what the run dropped from the request (a prompt past the token limit)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass(frozen=True)
class Claim:
    """A job handed to a worker; `attempt` is the token its worker must present to finish it."""

    job_id: str
    attempt: int
    params: dict[str, Any]
    lora_set: str = NO_LORAS  # the job's LoRA set key (`lora_set_key`)
    preview: bool = False  # the client asked for previews of the latents while it runs
    images: int = 1  # how many images the job makes
    batch_key: str = NO_BATCH  # `batch_key` of its request (NO_BATCH: it runs alone)
    # What the claim recorded as the job's worker (`SqlQueue.claimer`): with the attempt, the ticket.
    # A job given back with its attempt not counted is claimed again under the same attempt number,
    # so the claimer tells the new claim from a stale one (None: the attempt alone).
    worker: str | None = None


def new_id() -> str:
    return uuid.uuid4().hex


def lora_set_key(request: GenerateRequest) -> str:
    """The LoRA set of a request as one text: equal for requests that merge the same weights."""
    if not request.loras:
        return NO_LORAS
    return json.dumps([[ref.name, ref.weight] for ref in request.loras])


def batch_key(request: GenerateRequest) -> str:
    """`request.shared()` as one text: jobs with equal keys can run as one batch
    (`GenerateRequest.combine`); NO_BATCH for none."""
    return hashlib.sha256(repr(request.shared()).encode()).hexdigest()


def pixel_room(params: Mapping[str, Any], max_pixels: int | None) -> int:
    """How many images of the size in `params` a batch of at most `max_pixels` pixels holds, at
    least one; unbounded for None. A batch costs the GPU about its pixels (its tokens), so a pixel
    budget lets small images batch deeper than large ones in the same memory and time."""
    if max_pixels is None:
        return sys.maxsize
    return max(1, max_pixels // (int(params["width"]) * int(params["height"])))


def stored_request(params: dict[str, Any], limits: ModelLimits, images: ImageResolver | None = None) -> GenerateRequest:
    """The request a job runs: its stored form trusted as it is, its input images brought back by
    `images` (`InputStore.resolve`); a plain parameter dict (queued by an earlier version, seeds
    already resolved) goes through the validator once."""
    if is_request_dict(params):
        try:
            return GenerateRequest.from_dict(params, images=images)
        except ZTurboError:
            raise  # an input image the store lost says so itself
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidRequestError(f"the stored request cannot be read ({type(e).__name__}: {e})") from None
    return GenerateRequest.from_fields({k: v for k, v in params.items() if v is not None}, limits)


def _unread_image(field: str, sha256: str) -> InputImage:
    """A stand-in for a stored input image when only the request's form is checked (nothing read)."""
    return InputImage(b"", sha256, None, field)  # type: ignore[arg-type]


def input_hashes(params: dict[str, Any]) -> dict[str, str]:
    """A stored request's input images: field -> sha256 ({} for text-to-image or a plain dict)."""
    inputs = params.get("inputs") if is_request_dict(params) else None
    return dict(inputs.get("images", {})) if isinstance(inputs, dict) else {}


def read_params(text: str) -> tuple[dict[str, Any], str | None]:
    """A row's stored parameters, and why they cannot make a request (None when they can); an
    unreadable row reads as `{}` so that the job can still be shown and failed on its own."""
    try:
        params = json.loads(text)
    except (TypeError, ValueError) as e:
        return {}, f"not JSON: {e}"
    if not isinstance(params, dict):
        return {}, f"a JSON {type(params).__name__}, not an object"
    if is_request_dict(params):
        try:
            GenerateRequest.from_dict(params, images=_unread_image)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            return {}, f"a stored request with a bad or missing field ({type(e).__name__}: {e})"
    elif not isinstance(params.get("prompt"), str) or not isinstance(params.get("n", 1), int):
        return {}, "a parameter dict without a text prompt or with a non-integer n"
    return params, None


def _read_error(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    try:
        error = json.loads(text)
    except ValueError:
        error = None
    return error if isinstance(error, dict) else {"type": "internal_error", "message": str(text)}


# SQLite's primary result codes that mean the file or the disk under it, not the query.
_STORAGE_CODES = {
    sqlite3.SQLITE_FULL: "the disk is full",
    sqlite3.SQLITE_IOERR: "an I/O error",
    sqlite3.SQLITE_READONLY: "the file is read-only",
    sqlite3.SQLITE_CANTOPEN: "the file cannot be opened",
    sqlite3.SQLITE_PERM: "no permission",
    sqlite3.SQLITE_CORRUPT: "the file is damaged",
    sqlite3.SQLITE_NOTADB: "the file is not an SQLite database",
}


def _busy(error: sqlite3.Error) -> bool:
    """Whether SQLite gave up waiting for another connection's lock (`BUSY_WAIT_S`)."""
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def storage_fault(error: sqlite3.Error) -> str | None:
    """What is wrong with the database file or its disk, or None for any other SQLite error."""
    code = getattr(error, "sqlite_errorcode", None)
    return _STORAGE_CODES.get(code & 0xFF) if code is not None else None


_SIDECARS = ("-wal", "-shm")


def _recovery(path: Path) -> str:
    return (
        f"the server changes nothing in it; keep a copy if its jobs matter, then move it aside to start "
        f"with an empty queue: mv {path} {path}.damaged (and its {' and '.join(_SIDECARS)} files, if any)"
    )


def _create_database(path: Path) -> None:
    """A new, complete database, renamed into place: a file at `path` is never a half-made queue, so
    an empty or partial one there means that something damaged it."""
    stray = [path.name + s for s in _SIDECARS if path.with_name(path.name + s).exists()]
    if stray:  # SQLite would replay a stale log into the new file
        raise StorageError(f"{path} is missing but {', '.join(stray)} is not; move it aside too ({path.parent})")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.new")
    try:
        db = sqlite3.connect(tmp, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        db.close()  # the last connection checkpoints the log into the file and removes it
        os.replace(tmp, path)
    except (OSError, sqlite3.Error) as e:
        raise StorageError(f"cannot create the job database {path}: {e}") from e
    finally:
        for name in ("", *_SIDECARS):
            Path(f"{tmp}{name}").unlink(missing_ok=True)


def check_database(path: Path) -> None:
    """Refuse, without writing, a database that is empty, damaged or not zturbo's (StorageError)."""
    if path.stat().st_size == 0:
        raise StorageError(f"{path} is empty (0 bytes): the jobs it held are lost; {_recovery(path)}")
    # Read-only by URI: closing a read-write connection would fold a leftover -wal into the file.
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    try:
        problems = [r[0] for r in db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise StorageError(f"{path} is damaged ({'; '.join(problems)}); {_recovery(path)}")
        missing = _missing_columns(db)
    except sqlite3.DatabaseError as e:
        raise StorageError(f"{path}: {storage_fault(e) or 'cannot be read'} ({e}); {_recovery(path)}") from e
    finally:
        db.close()
    if missing:
        raise StorageError(f"{path} is not a zturbo job database (it lacks {missing}); {_recovery(path)}")


def _missing_columns(db: sqlite3.Connection) -> str | None:
    """What of zturbo's tables and columns `db` lacks; None when it has them all or no table at all."""
    found = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not found:
        return None  # a database nothing was ever stored in
    want = sqlite3.connect(":memory:")
    want.executescript(SCHEMA)
    added = {(table, column) for table, column, _ in ADDED_COLUMNS}
    missing = []
    for (table,) in want.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"):
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if not have and table in ADDED_TABLES:
            continue
        lacking = [
            r[1] for r in want.execute(f"PRAGMA table_info({table})") if r[1] not in have and (table, r[1]) not in added
        ]
        if lacking:
            missing.append(f"table {table}" if not have else f"{table}.{', '.join(lacking)}")
    want.close()
    return ", ".join(missing) or None


_SHA256 = re.compile(r"[0-9a-f]{64}")
_PARTIAL = ".part"  # the suffix of a file still being written


class InputStore:
    """Jobs' input images by content: `root/ab/<sha256>`, the bytes exactly as uploaded.

    A file is written whole (a temporary file, fsync, rename, fsync of the directory) before the
    job that refers to it commits, so a committed job never points at a partial file. `lock` is
    held from writing a job's files to committing its row, and from finding a file unreferenced
    to removing it, so a removal never takes a file a job being submitted has just found present.

    That lock is one process's. Where processes on several machines share the directory, `keep_s`
    stands in for it: a file is removed only once unchanged for that long, and `put` renews the
    time of a file it finds present, so a submission between its `put` and its commit keeps it.
    """

    def __init__(self, root: Path, *, keep_s: float = 0.0) -> None:
        self.root = Path(root)
        self.keep_s = keep_s
        self.lock = threading.Lock()

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise StorageError(f"{sha256!r} is not a sha256 (64 lowercase hex digits); the job's row is damaged")
        return self.root / sha256[:2] / sha256

    def put(self, image: InputImage) -> None:
        """Store an image's bytes, unless a file with that content is there already (one damaged on
        disk is replaced)."""
        if not image.data:  # a PIL image of the Python API: the server only ever gets bytes
            raise ValueError(f"{image.name} has no bytes to store")
        path = self.path(image.sha256)
        if _holds(path, image.data):
            with contextlib.suppress(OSError):
                os.utime(path)  # found present now: not removable for `keep_s` (a shared directory)
            return
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}{_PARTIAL}")
        try:
            new_dirs = [d for d in (self.root, path.parent) if not d.is_dir()]
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as f:
                f.write(image.data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            # The rename is durable once its directory is synced, and a directory made here once its parent is.
            for directory in (path.parent, *(d.parent for d in reversed(new_dirs))):
                _fsync_dir(directory)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot store the input image {path}: {e.strerror or e}; check the free space "
                               f"and permissions of {self.root}") from e  # fmt: skip

    def read(self, field: str, sha256: str) -> bytes:
        """A stored image's bytes, checked against its hash (`open`)."""
        with self.open(field, sha256) as file:
            return file.read()

    def open(self, field: str, sha256: str) -> BinaryIO:
        """A stored image's file, open at its start once its bytes were checked against its hash
        (read in pieces, not whole); StorageError naming the file if it is gone or damaged."""
        path = self.path(sha256)
        try:
            file = path.open("rb")
        except FileNotFoundError:
            raise StorageError(
                f"the job's {field} (sha256 {sha256[:12]}...) is no longer stored ({path} is missing); "
                "submit the job again with the image"
            ) from None
        except OSError as e:
            raise StorageError(f"cannot read the job's {field} from {path}: {e.strerror or e}") from e
        try:
            digest = hashlib.sha256()  # hashlib.file_digest is Python 3.11+
            while piece := file.read(1 << 20):
                digest.update(piece)
            if digest.hexdigest() != sha256:
                raise StorageError(f"the job's {field} in {path} is damaged (its sha256 differs); submit the job again")
            file.seek(0)
        except BaseException:
            file.close()
            raise
        return file

    def resolve(self, field: str, sha256: str) -> InputImage:
        """The stored image, decoded as at submit (`GenerateRequest.from_dict`'s resolver)."""
        return decode_image(self.read(field, sha256), field, f"{field} {sha256[:12]}")

    def remove(self, hashes: Iterable[str]) -> None:
        for sha256 in hashes:
            self.discard(self.path(sha256))

    def discard(self, path: Path) -> bool:
        """Remove a file no job refers to, unless it changed within `keep_s`; whether it went."""
        try:
            if self.keep_s and time.time() - path.stat().st_mtime < self.keep_s:
                return False
            path.unlink()
        except FileNotFoundError:
            return False
        return True

    def stored(self) -> Iterator[Path]:
        """Every file under the root: stored images and partial writes."""
        if self.root.is_dir():
            yield from (p for p in self.root.glob("??/*") if p.is_file())


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_CLAIM_COLUMNS = (
    "SELECT id, seq, params, attempts, lora_set, batch_key, image_count, preview, created_at FROM jobs WHERE status = ?"
)


class SqlQueue(ABC):
    """The queue's semantics as SQL that both backends run: `JobStore` (SQLite, one machine) and
    `pgstore.PostgresJobStore` (a server every node reaches). A subclass owns the connection: its
    transactions (`_tx`), reads (`_read`), and the clauses that make a claim safe when several
    processes claim at once (`_ROW_LOCK`, `_CLAIM_LOCK`, `_lock_queue`). Safe to share between the
    threads of one process: writes go through one connection, under `_lock`."""

    # Appended to a SELECT of rows the transaction then changes: SQLite's write lock (BEGIN IMMEDIATE)
    # already makes every transaction run alone, so both are empty here.
    _ROW_LOCK = ""
    _CLAIM_LOCK = ""  # on the rows a claim reads: rows another claimer holds are passed over

    location: str  # what `stores.open_store` takes to open this queue again: a file's path or a server's URL
    max_queued: int
    inputs: InputStore
    _lock: threading.RLock
    _db: Any  # the connection: `execute(sql, args)` with ? placeholders, rows indexed by name and number

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def _tx(self) -> AbstractContextManager[Any]:
        """One write transaction on `_db`, which it yields; a fault of the storage is a StorageError."""

    @contextmanager
    def _read(self) -> Iterator[Any]:
        """The connection for reads outside a transaction."""
        with self._lock:
            yield self._db

    def _lock_queue(self, db: Any) -> None:
        """Make the queue's depth stable until the transaction ends (SQLite: its write lock does)."""
        return None

    def _prompt_match(self, query: str) -> tuple[str, str]:
        """A WHERE term finding `query` in a job's prompt whatever its case, and its argument."""
        return "instr(casefold(prompt), ?) > 0", query.casefold()

    def claimer(self, worker: str) -> str:
        """What this queue's claims for `worker` record as their worker (`Job.worker`, `Claim.worker`)."""
        return worker

    def _orphans(self, db: Any) -> list[Any]:
        """Jobs left `running` by a claimer that is gone: on one machine, at startup, all of them."""
        return db.execute("SELECT id, params, attempts FROM jobs WHERE status = ?", (RUNNING,)).fetchall()

    def _still_orphaned(self) -> str:
        """A WHERE term (" AND ...") that a job `_orphans` found still meets once its row is locked."""
        return ""

    def heartbeat(self) -> list[Job]:
        """This process is alive (a shared store's lease); the jobs of claimers found dead are
        queued again (or failed), as `recover` does. One machine's store has no one else to watch."""
        return []

    # --- submit and read ------------------------------------------------------------------

    def submit(
        self, request: GenerateRequest, *, job_id: str | None = None, client: str | None = None, preview: bool = False
    ) -> Job:
        """Queue a validated request (stored serialised, its input images in `inputs` first), or raise
        QueueFullError when `max_queued` jobs are already waiting. `preview`: the worker sends
        previews of the latents with the job's progress."""
        job_id = job_id or new_id()
        params = request.to_dict()
        images = request.inputs.images()
        now = time.time()
        with self.inputs.lock:
            if images:
                with self._read() as db:  # no files written for a job the queue cannot take
                    self._check_room(db)
                for image in images.values():
                    self.inputs.put(image)
            try:
                with self._tx() as db:
                    self._lock_queue(db)
                    self._check_room(db)
                    columns = (
                        "id, status, params, prompt, client, lora_set, batch_key, image_count, preview, created_at"
                    )
                    prompt, lora_set, key = "\n".join(request.prompts), lora_set_key(request), batch_key(request)
                    db.execute(
                        f"INSERT INTO jobs ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (job_id, QUEUED, json.dumps(params), prompt, client, lora_set, key, request.num_images,
                         int(preview), now),
                    )  # fmt: skip
                    rows = [(job_id, name, image.sha256) for name, image in images.items()]
                    db.executemany("INSERT INTO job_inputs (job_id, field, sha256) VALUES (?, ?, ?)", rows)
            except StorageError:
                # The connection may have failed at COMMIT, after the server committed: a job that is
                # stored is answered as stored, so that a client's retry makes no second one.
                if not self._stored(job_id):
                    self._drop_unreferenced({image.sha256 for image in images.values()})
                    raise
            except BaseException:
                self._drop_unreferenced({image.sha256 for image in images.values()})
                raise
        return self.get(job_id)

    def _stored(self, job_id: str) -> bool:
        """Whether the job's row is there, as far as can be read now (False when it cannot be)."""
        try:
            with self._read() as db:
                return db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None
        except StorageError:
            return False

    @staticmethod
    def _depth(db: Any) -> int:
        return db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (QUEUED,)).fetchone()[0]

    def _check_room(self, db: Any) -> None:
        depth = self._depth(db)
        if depth >= self.max_queued:
            raise QueueFullError(
                f"the queue is full ({depth} of {self.max_queued} jobs waiting); retry later", retry_after=1
            )

    def _drop_unreferenced(self, hashes: set[str]) -> None:
        """Remove the input files of `hashes` that no job refers to; the caller holds `inputs.lock`."""
        with self._read() as db:
            q = "SELECT 1 FROM job_inputs WHERE sha256 = ? LIMIT 1"
            used = {h for h in hashes if db.execute(q, (h,)).fetchone() is not None}
        self.inputs.remove(hashes - used)

    def sweep_inputs(self) -> int:
        """At startup: remove input files no job refers to (a submission cut off between writing its
        files and committing) and partial writes; returns how many went."""
        with self.inputs.lock:
            with self._read() as db:
                used = {r[0] for r in db.execute("SELECT DISTINCT sha256 FROM job_inputs")}
            stray = [path for path in self.inputs.stored() if path.name not in used]
            return sum(self.inputs.discard(path) for path in stray)

    def get(self, job_id: str) -> Job:
        with self._read() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"job {job_id!r} does not exist")
            return self._job(db, row)

    @staticmethod
    def _job(db: Any, row: Any) -> Job:
        images = tuple(
            ImageRef(r["id"], r["idx"], r["seed"], r["file"])
            for r in db.execute("SELECT * FROM images WHERE job_id = ? ORDER BY idx", (row["id"],))
        )
        return Job(
            id=row["id"],
            seq=row["seq"],
            status=row["status"],
            params=read_params(row["params"])[0],
            attempts=row["attempts"],
            worker=row["worker"],
            cancel_requested=bool(row["cancel_requested"]),
            error=_read_error(row["error"]),
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            client=row["client"],
            images=images,
            preview=bool(row["preview"]),
            warnings=tuple(json.loads(row["warnings"])) if row["warnings"] else (),
        )

    def position(self, job: Job) -> int | None:
        """0-based place in the queue of a queued job, else None."""
        if job.status != QUEUED:
            return None
        with self._read() as db:
            q = "SELECT COUNT(*) FROM jobs WHERE status = ? AND seq < ?"
            return int(db.execute(q, (QUEUED, job.seq)).fetchone()[0])

    def counts(self) -> dict[str, int]:
        with self._read() as db:
            rows = db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {state: 0 for state in STATES} | {r[0]: r[1] for r in rows}

    def depth(self) -> int:
        with self._read() as db:
            return self._depth(db)

    def image(self, image_id: str) -> ImageRef:
        with self._read() as db:
            r = db.execute("SELECT * FROM images WHERE id = ?", (image_id,)).fetchone()
        if r is None:
            raise JobNotFoundError(f"image {image_id!r} does not exist")
        return ImageRef(r["id"], r["idx"], r["seed"], r["file"])

    def history(self, *, limit: int, offset: int, query: str | None = None) -> tuple[list[Job], int]:
        """Finished jobs, newest first, and how many match in all."""
        where = "status IN (?, ?, ?)"
        args: list[Any] = list(FINISHED)
        if query:
            term, arg = self._prompt_match(query)
            where += f" AND {term}"
            args.append(arg)
        with self._read() as db:
            total = db.execute(f"SELECT COUNT(*) FROM jobs WHERE {where}", args).fetchone()[0]
            rows = db.execute(
                f"SELECT * FROM jobs WHERE {where} ORDER BY finished_at DESC, seq DESC LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
            return [self._job(db, r) for r in rows], int(total)

    # --- state changes by the server --------------------------------------------------------

    def claim(self, worker: str, prefer: str = NO_LORAS) -> Claim | None:
        """The next job alone (`claim_batch` of one image)."""
        claims = self.claim_batch(worker, prefer, 1)
        return claims[0] if claims else None

    def claim_batch(
        self,
        worker: str,
        prefer: str,
        max_images: int,
        rooms: Mapping[str, int] | None = None,
        max_pixels: int | None = None,
    ) -> list[Claim]:
        """The next job (`_next`), then the waiting jobs that can run in one batch with it (an equal
        batch key) in queue order, while their images and its stay within `max_images`, within
        `max_pixels` pixels (`pixel_room`), and within `rooms[key]` where `rooms` has its batch key
        (the images the worker's memory was found to hold): all now `running` on `worker` with one
        more attempt; [] if none waits. The first job is taken whatever its size, so no job waits for
        a batch. `prefer` is the LoRA set key the worker ran last. A job whose parameters cannot be
        read is failed with the reason on the way."""
        with self._tx() as db:
            first = self._next_readable(db, prefer)
            if first is None:
                return []
            rows = [first]
            key = first[0]["batch_key"]
            if key != NO_BATCH:
                most = min(max_images, (rooms or {}).get(key, max_images), pixel_room(first[1], max_pixels))
                rows += self._companions(db, first[0], most - first[0]["image_count"])
            now, claimer = time.time(), self.claimer(worker)
            claims = []
            for row, params in rows:
                attempt = row["attempts"] + 1
                db.execute(
                    "UPDATE jobs SET status = ?, attempts = ?, worker = ?, started_at = ? WHERE id = ?",
                    (RUNNING, attempt, claimer, now, row["id"]),
                )
                claims.append(
                    Claim(
                        row["id"],
                        attempt,
                        params,
                        row["lora_set"],
                        bool(row["preview"]),
                        row["image_count"],
                        row["batch_key"],
                        claimer,
                    )
                )
        return claims

    def _next_readable(self, db: Any, prefer: str) -> tuple[Any, dict[str, Any]] | None:
        """The next job (`_next`) and its parameters; jobs whose parameters cannot be read fail on the way."""
        while (row := self._next(db, prefer)) is not None:
            params, problem = read_params(row["params"])
            if problem is None:
                return row, params
            self._fail_unreadable(db, row["id"], problem)
        return None

    def _companions(self, db: Any, first: Any, room: int) -> list[tuple[Any, dict[str, Any]]]:
        """Waiting jobs with `first`'s batch key after it, in queue order, up to the first that would
        take the images past `room` (none overtakes a compatible job that does not fit). A job makes
        at least one image, so no more than `room` rows are read (and, on a shared store, locked)."""
        q = f"{_CLAIM_COLUMNS} AND batch_key = ? AND seq > ? ORDER BY seq LIMIT ?{self._CLAIM_LOCK}"
        out = []
        for row in db.execute(q, (QUEUED, first["batch_key"], first["seq"], max(room, 0))).fetchall():
            if row["image_count"] > room:
                break
            params, problem = read_params(row["params"])
            if problem is not None:
                self._fail_unreadable(db, row["id"], problem)
                continue
            out.append((row, params))
            room -= row["image_count"]
        return out

    def _next(self, db: Any, prefer: str) -> Any:
        """The oldest waiting job, unless the oldest one with the `prefer` LoRA set was queued within
        SAME_SET_WINDOW_S of it: then that one (no switch of weights for the worker). None if none waits."""
        columns, lock = _CLAIM_COLUMNS, self._CLAIM_LOCK
        oldest = db.execute(f"{columns} ORDER BY seq LIMIT 1{lock}", (QUEUED,)).fetchone()
        if oldest is None or oldest["lora_set"] == prefer:
            return oldest
        q = f"{columns} AND lora_set = ? AND created_at <= ? ORDER BY seq LIMIT 1{lock}"
        same = db.execute(q, (QUEUED, prefer, oldest["created_at"] + SAME_SET_WINDOW_S)).fetchone()
        return same if same is not None else oldest

    def _fail_unreadable(self, db: Any, job_id: str, problem: str) -> None:
        message = f"job {job_id} cannot run: its stored parameters cannot be read ({problem}); submit it again"
        log.warning("%s", message)
        self._finish(db, job_id, FAILED, {"type": InvalidRequestError.kind, "message": message})

    def cancel(self, job_id: str) -> Job:
        """Queued: cancelled now. Running: flagged, the worker stops between steps. Finished: 409."""
        with self._tx() as db:
            row = db.execute(f"SELECT status FROM jobs WHERE id = ?{self._ROW_LOCK}", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"job {job_id!r} does not exist")
            if row["status"] in FINISHED:
                raise JobConflictError(f"job {job_id} has already {row['status']}; only queued or running jobs cancel")
            if row["status"] == QUEUED:
                db.execute(
                    "UPDATE jobs SET status = ?, cancel_requested = 1, finished_at = ? WHERE id = ?",
                    (CANCELLED, time.time(), job_id),
                )
            else:
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
        return self.get(job_id)

    def release(
        self,
        job_id: str,
        attempt: int,
        reason: str,
        *,
        count_attempt: bool = True,
        solo: bool = False,
        claimer: str | None = None,
    ) -> Job | None:
        """The worker running this claim is gone: queue the job again, or fail it after MAX_ATTEMPTS.

        `count_attempt=False` gives the attempt back: a graceful shutdown, a worker that died before
        it began the job, or a batch that failed as a whole. `solo=True` queues it to run alone from
        now on (its batch key becomes NO_BATCH), so that a job that breaks a batch breaks only itself.
        `claimer`: only while the job's row still names it as its worker (`Claim.worker`). None if
        the claim is stale.
        """
        guard = ("", ()) if claimer is None else (" AND worker = ?", (claimer,))
        return self._release(job_id, attempt, reason, count_attempt=count_attempt, solo=solo, guard=guard)

    def _release(
        self,
        job_id: str,
        attempt: int,
        reason: str,
        *,
        count_attempt: bool = True,
        solo: bool = False,
        guard: tuple[str, tuple[Any, ...]] = ("", ()),
    ) -> Job | None:
        """`release`, only where the job's row also meets `guard` (a WHERE term and its arguments) once locked."""
        term, args = guard
        with self._tx() as db:
            q = f"SELECT cancel_requested FROM jobs WHERE id = ? AND status = ? AND attempts = ?{term}{self._ROW_LOCK}"
            row = db.execute(q, (job_id, RUNNING, attempt, *args)).fetchone()
            if row is None:
                return None
            if row["cancel_requested"]:
                self._finish(db, job_id, CANCELLED, None)
            elif count_attempt and attempt >= MAX_ATTEMPTS:
                error = {"type": "worker_died", "message": f"failed after {attempt} attempts: {reason}"}
                self._finish(db, job_id, FAILED, error)
            else:
                attempts = attempt if count_attempt else attempt - 1
                db.execute(
                    "UPDATE jobs SET status = ?, attempts = ?, worker = NULL, started_at = NULL WHERE id = ?",
                    (QUEUED, attempts, job_id),
                )
                if solo:
                    db.execute("UPDATE jobs SET batch_key = ? WHERE id = ?", (NO_BATCH, job_id))
        return self.get(job_id)

    def recover(self, reason: str = "the server stopped while it ran") -> list[Job]:
        """Jobs left `running` by a process that died (`_orphans`) are queued again (or failed): at
        startup, and on a shared store at each `heartbeat`."""
        with self._read() as db:
            rows = self._orphans(db)
        out = []
        for r in rows:
            problem = read_params(r["params"])[1]
            if problem is not None:
                with self._tx() as db:
                    self._fail_unreadable(db, r["id"], problem)
                out.append(self.get(r["id"]))
                continue
            # Its claimer may have renewed its lease since the read: checked again under the row's lock.
            job = self._release(r["id"], r["attempts"], reason, guard=(self._still_orphaned(), ()))
            if job is not None:
                out.append(job)
        return out

    def delete(self, job_id: str, images_dir: Path) -> None:
        """Remove a finished job, its image files and the input files no other job refers to."""
        job = self.get(job_id)
        if not job.finished:
            raise JobConflictError(f"job {job_id} is {job.status}; cancel it first, only finished jobs can be deleted")
        with self._tx() as db:
            hashes = {r[0] for r in db.execute("SELECT sha256 FROM job_inputs WHERE job_id = ?", (job_id,))}
            db.execute("DELETE FROM job_inputs WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM images WHERE job_id = ?", (job_id,))
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        for image in job.images:
            (images_dir / image.file).unlink(missing_ok=True)
        with self.inputs.lock:
            self._drop_unreferenced(hashes)

    # --- state changes by the worker that holds the claim -------------------------------------

    def cancel_requested(self, job_id: str) -> bool:
        with self._read() as db:
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def cancels_requested(self, job_ids: Iterable[str]) -> set[str]:
        """Which of `job_ids` have a cancel requested: one query for a whole batch, per step."""
        ids = list(job_ids)
        if not ids:
            return set()
        q = f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN ({', '.join('?' * len(ids))})"
        with self._read() as db:
            return {r[0] for r in db.execute(q, ids)}

    def succeed(self, claim: Claim, images: list[ImageRef], warnings: Sequence[str] = ()) -> bool:
        """Record the images (and the run's `warnings`) and mark the job succeeded, in one
        transaction; False if the claim is stale."""
        with self._tx() as db:
            if not self._holds(db, claim):
                return False
            db.execute("DELETE FROM images WHERE job_id = ?", (claim.job_id,))
            db.executemany(
                "INSERT INTO images (id, job_id, idx, seed, file) VALUES (?, ?, ?, ?, ?)",
                [(im.id, claim.job_id, im.idx, im.seed, im.file) for im in images],
            )
            self._finish(db, claim.job_id, SUCCEEDED, None)
            if warnings:
                db.execute("UPDATE jobs SET warnings = ? WHERE id = ?", (json.dumps(list(warnings)), claim.job_id))
        return True

    def end(self, claim: Claim, status: str, error: dict[str, str] | None = None) -> bool:
        """Mark a claimed job failed or cancelled; False if the claim is stale."""
        assert status in (FAILED, CANCELLED)
        with self._tx() as db:
            if not self._holds(db, claim):
                return False
            self._finish(db, claim.job_id, status, error)
        return True

    def _holds(self, db: Any, claim: Claim) -> bool:
        mine, args = ("", ()) if claim.worker is None else (" AND worker = ?", (claim.worker,))
        q = f"SELECT 1 FROM jobs WHERE id = ? AND status = ? AND attempts = ?{mine}{self._ROW_LOCK}"
        return db.execute(q, (claim.job_id, RUNNING, claim.attempt, *args)).fetchone() is not None

    @staticmethod
    def _finish(db: Any, job_id: str, status: str, error: dict[str, str] | None) -> None:
        db.execute(
            "UPDATE jobs SET status = ?, error = ?, finished_at = ? WHERE id = ?",
            (status, json.dumps(error) if error else None, time.time(), job_id),
        )


class JobStore(SqlQueue):
    """The queue in an SQLite database file: one machine's server and its worker processes."""

    def __init__(self, path: Path, *, max_queued: int = 64, check: bool = True, inputs_dir: Path | None = None) -> None:
        """`check=False` skips the startup check (worker processes: the server checked it already).
        Input images live in `inputs_dir` (default: `inputs/` beside the database)."""
        self.path = Path(path)
        self.location = str(self.path)
        self.max_queued = max_queued
        self.inputs = InputStore(inputs_dir if inputs_dir is not None else self.path.parent / "inputs")
        self._lock = threading.RLock()
        if not self.path.exists():
            _create_database(self.path)
        if check:
            check_database(self.path)
        self._idle_readers: list[sqlite3.Connection] = []  # connections for reads (`_read`) not in use
        self._readers_lock = threading.Lock()
        self._closed = False
        self._db = self._connect()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not only a crash
        with self._lock:
            self._add_columns()
            self._db.executescript(SCHEMA)

    def _add_columns(self) -> None:
        """Upgrade a database made before `ADDED_COLUMNS` (a no-op for a new or upgraded one)."""
        for table, column, declaration in ADDED_COLUMNS:
            have = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if have and column not in have:
                with self._tx() as db:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
                log.info("job database %s: added the column %s.%s", self.path, table, column)

    def _connect(self) -> sqlite3.Connection:
        # mode=rw: a database file moved or deleted under the server is an error, not a new empty file.
        uri = f"{self.path.absolute().as_uri()}?mode=rw"
        db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=BUSY_WAIT_S)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys=ON")
        db.create_function("casefold", 1, lambda s: s.casefold() if s is not None else None, deterministic=True)
        return db

    def close(self) -> None:
        with self._lock:
            self._db.close()
        with self._readers_lock:
            self._closed = True
            for db in self._idle_readers:
                db.close()
            self._idle_readers.clear()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """Reads in one snapshot, on a connection of their own (one per concurrent read, up to
        IDLE_READERS kept for the next): in WAL mode they run beside any write, so a write waiting
        for another process's lock holds up no status or history read, and one slow search holds
        up no other read."""
        with self._readers_lock:
            if self._closed:
                raise sqlite3.ProgrammingError(f"the job database {self.path} was closed")
            db = self._idle_readers.pop() if self._idle_readers else None
        reusable = False
        try:
            with self._faults("read"):
                db = db or self._connect()
                db.execute("BEGIN")
                try:
                    yield db
                finally:
                    if db.in_transaction:
                        db.execute("COMMIT")  # ends the snapshot; nothing was written
            reusable = True
        finally:
            if db is not None:
                self._put_reader(db, reusable)

    def _put_reader(self, db: sqlite3.Connection, reusable: bool) -> None:
        """Keep a reader for the next read, unless the store closed, enough are kept, or its read
        failed (a statement left open there would pin its old snapshot)."""
        with self._readers_lock:
            if reusable and not self._closed and len(self._idle_readers) < IDLE_READERS:
                self._idle_readers.append(db)
                return
        db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front (no upgrade deadlocks)."""
        with self._lock, self._faults("write"):
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                    self._db.execute("ROLLBACK")
                raise

    @contextmanager
    def _faults(self, doing: str) -> Iterator[None]:
        """A full disk or an I/O fault is a StorageError naming the file; a lock held by another
        process past BUSY_WAIT_S is a StoreBusyError."""
        try:
            yield
        except sqlite3.Error as e:
            if storage_fault(e):
                raise StorageError(f"cannot {doing} the job database {self.path}: {storage_fault(e)} ({e})") from e
            if isinstance(e, sqlite3.OperationalError) and _busy(e):
                raise StoreBusyError(
                    f"the job database {self.path} stayed locked by another process for {BUSY_WAIT_S:g} s; "
                    "nothing was changed: send the request again"
                ) from e
            raise


class JobEvents:
    """Thread-safe publish/subscribe of job events: (job id, event name, payload)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[str, set[Callable[[str, dict[str, Any]], None]]] = {}

    def subscribe(self, job_id: str, callback: Callable[[str, dict[str, Any]], None]) -> Callable[[], None]:
        with self._lock:
            self._subs.setdefault(job_id, set()).add(callback)

        def unsubscribe() -> None:
            with self._lock:
                subs = self._subs.get(job_id)
                if subs is not None:
                    subs.discard(callback)
                    if not subs:
                        del self._subs[job_id]

        return unsubscribe

    def publish(self, job_id: str, event: str, data: dict[str, Any]) -> None:
        with self._lock:
            callbacks = list(self._subs.get(job_id, ()))
        for callback in callbacks:
            callback(event, data)
