"""Which job store a server uses, and what every store offers.

SQLite (`jobs.JobStore`, a file in the data directory) is the default and serves one machine;
PostgreSQL (`pgstore.PostgresJobStore`, chosen by a postgresql:// URL) serves the servers of many
machines, which then share one data directory for the image files (docs/server.md, "Many machines").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from ..errors import InvalidRequestError
from ..request import GenerateRequest
from .jobs import Claim, ImageRef, InputStore, Job, JobStore

STORE_ENV = "ZTURBO_STORE"
DEFAULT_STORE = "sqlite"
SQLITE_FILE = "jobs.sqlite3"


class QueueStore(Protocol):
    """The job queue (see jobs.py for the rules): durable before an id is returned, bounded, claimed
    with an attempt ticket, queued again when the claimer dies, at most MAX_ATTEMPTS attempts."""

    location: str  # what `open_store` takes to open the same queue (worker processes)
    max_queued: int
    inputs: InputStore

    def submit(
        self, request: GenerateRequest, *, job_id: str | None = None, client: str | None = None, preview: bool = False
    ) -> Job: ...
    def get(self, job_id: str) -> Job: ...
    def position(self, job: Job) -> int | None: ...
    def counts(self) -> dict[str, int]: ...
    def depth(self) -> int: ...
    def image(self, image_id: str) -> ImageRef: ...
    def history(self, *, limit: int, offset: int, query: str | None = None) -> tuple[list[Job], int]: ...
    def claim(self, worker: str, prefer: str = ...) -> Claim | None: ...
    def claim_batch(
        self,
        worker: str,
        prefer: str,
        max_images: int,
        rooms: Mapping[str, int] | None = None,
        max_pixels: int | None = None,
    ) -> list[Claim]: ...
    def cancel(self, job_id: str) -> Job: ...
    def release(
        self,
        job_id: str,
        attempt: int,
        reason: str,
        *,
        count_attempt: bool = True,
        solo: bool = False,
        claimer: str | None = None,
    ) -> Job | None: ...
    def recover(self, reason: str = ...) -> list[Job]: ...
    def heartbeat(self) -> list[Job]: ...
    def delete(self, job_id: str, images_dir: Path) -> None: ...
    def sweep_inputs(self) -> int: ...
    def cancel_requested(self, job_id: str) -> bool: ...
    def cancels_requested(self, job_ids: Iterable[str]) -> set[str]: ...
    def succeed(self, claim: Claim, images: list[ImageRef], warnings: Sequence[str] = ()) -> bool: ...
    def end(self, claim: Claim, status: str, error: dict[str, str] | None = None) -> bool: ...
    def close(self) -> None: ...


def check_store(location: str) -> str:
    """`location` if it names a store (`sqlite`, an SQLite file's path, or a postgresql:// URL),
    else an InvalidRequestError naming it and what is allowed."""
    from .pgstore import URL_SCHEMES, is_url

    if location == DEFAULT_STORE or is_url(location) or "://" not in location:
        return location
    allowed = " or ".join(f"{scheme}://USER@HOST:PORT/DATABASE" for scheme in URL_SCHEMES)
    raise InvalidRequestError(f"--store {location!r} is not a job store: give {DEFAULT_STORE!r} (the default), a path "
                      f"to an SQLite file, or {allowed}")  # fmt: skip


def open_store(
    location: str, data_dir: Path, *, max_queued: int = 64, check: bool = True, lease_s: float | None = None
) -> QueueStore:
    """The queue at `location` (`check_store`): `sqlite` is `data_dir/jobs.sqlite3`. Input images
    live in `data_dir/inputs` whatever the store. `check=False`: a worker process, whose server has
    checked (and made) the database already. `lease_s`: a shared store's node lease (None: its default)."""
    from .pgstore import NODE_LEASE_S, PostgresJobStore, is_url

    inputs = data_dir / "inputs"
    if is_url(check_store(location)):
        lease = NODE_LEASE_S if lease_s is None else lease_s
        return PostgresJobStore(location, inputs_dir=inputs, max_queued=max_queued, check=check, lease_s=lease)
    path = data_dir / SQLITE_FILE if location == DEFAULT_STORE else Path(location).expanduser()
    return JobStore(path, max_queued=max_queued, check=check, inputs_dir=inputs)
