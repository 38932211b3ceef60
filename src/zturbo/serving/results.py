"""A job's results for the routes that answer once it is done (OpenAI's images API, A1111's):
waiting for the job to finish, and reading its image files back, whole and checked."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import anyio
from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ..errors import StorageError, SyncTimeoutError, ZTurboError
from . import jobs
from .stores import QueueStore

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)

# An output file's media type by its format (`request.OUTPUT_FORMATS`).
OUTPUT_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


CLIENT_GONE = 499  # the answer to a client that went away (nginx's "client closed request"); no one reads it


class ClientGoneError(Exception):
    """The client of a waiting request went away before its job finished."""


async def awaited_job(service: Service, request: Request, job_id: str) -> jobs.Job | None:
    """The job once it has finished (`finished_job`); None where the client went away first: then
    the job is cancelled, a queued one at once and a running one after its current step, as no one
    will collect its images. A request cancelled under the server (Ray Serve does so when its client
    disconnects) cancels its job too, except while the server shuts down: then the server cut it
    off, and its job stays in the queue for the next server, as every accepted job does."""
    gone = asyncio.Event()
    listener = asyncio.create_task(_hang_up(request, gone))
    try:
        return await finished_job(service.store, service.events, job_id, service.settings.sync_timeout, gone)
    except ClientGoneError:
        await _abandon(service, job_id)
        return None
    except asyncio.CancelledError:
        if not service.stopping.is_set():
            await _abandon(service, job_id)
        raise
    finally:
        listener.cancel()


async def _abandon(service: Service, job_id: str) -> None:
    """Cancel the job of a client that went away; shielded, as the request itself may be cancelled."""
    with anyio.CancelScope(shield=True):
        try:
            await run_in_threadpool(service.cancel, job_id)
        except (jobs.JobConflictError, jobs.JobNotFoundError):
            return  # it finished (or went) meanwhile
        except ZTurboError as e:  # the store busy or failing: the job goes on, for no one
            log.warning("job %s: its client went away, and cancelling it failed: %s", job_id, e)
            return
    log.info("job %s cancelled: its client went away before it finished", job_id)


async def _hang_up(request: Request, gone: asyncio.Event) -> None:
    """Set `gone` once the client has closed its connection. The request's body has been read, so
    the server's next message is the disconnect (Starlette's `is_disconnected` cannot see it
    through a middleware's receive, which a cancelled scope cuts off). A receive that fails says
    nothing either way: the job goes on."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception as e:  # e.g. Ray Serve's proxy losing its own connection to the replica
        log.debug("cannot tell whether the client of %s is still there: %r", request.url.path, e)
        return
    gone.set()


async def finished_job(
    store: QueueStore,
    events: jobs.JobEvents,
    job_id: str,
    timeout: float,
    gone: asyncio.Event | None = None,
) -> jobs.Job:
    """Wait for the job to finish, re-reading it whenever it has news (and at least once a second);
    SyncTimeoutError after `timeout` seconds (the job goes on); ClientGoneError once `gone` is set
    (the client went away)."""
    loop = asyncio.get_running_loop()
    news = asyncio.Event()
    unsubscribe = events.subscribe(job_id, lambda event, data: loop.call_soon_threadsafe(news.set))
    deadline = time.monotonic() + timeout
    try:
        while True:
            news.clear()
            job = await run_in_threadpool(store.get, job_id)
            if job.finished:
                return job
            if gone is not None and gone.is_set():
                raise ClientGoneError(job_id)
            if time.monotonic() > deadline:
                raise SyncTimeoutError(
                    f"job {job_id} did not finish within {timeout:g} s; it goes on: poll GET /v1/jobs/{job_id}"
                )
            await _either(news, gone, min(1.0, timeout))
    finally:
        unsubscribe()


async def _either(first: asyncio.Event, second: asyncio.Event | None, timeout: float) -> None:
    """Until either event is set, or `timeout` seconds."""
    waiters = [asyncio.ensure_future(e.wait()) for e in (first, second) if e is not None]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def read_image(images_dir: Path, name: str, image_id: str) -> bytes:
    """An image's file, whole, checked as `open_image` checks it."""
    file, _, _ = open_image(images_dir, name, image_id)
    with file:
        return file.read()


def open_image(images_dir: Path, name: str, image_id: str) -> tuple[BinaryIO, int, str]:
    """An image's file (PNG, WebP or JPEG) open at its start, its size and its format: a regular file
    right in `images_dir`, opened without following a symbolic link, so a link planted there cannot
    serve another file, and checked whole (`_intact_format`) before a byte of it is served."""
    path = images_dir / name
    if "/" in name or name in ("", ".", ".."):
        raise StorageError(f"image {image_id!r} has no valid file name ({name!r})")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise jobs.JobNotFoundError(f"image {image_id!r} has no file any more") from None
    except OSError as e:  # ELOOP: a symbolic link
        raise StorageError(
            f"image {image_id!r}: cannot open {path}: {e.strerror}; only regular files are served"
        ) from e
    file = os.fdopen(fd, "rb")
    try:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise StorageError(f"image {image_id!r}: {path} is not a regular file; only regular files are served")
        fmt = _intact_format(file, info.st_size)
        if fmt is None:
            raise StorageError(
                f"image {image_id!r}: {path} is damaged (not a complete PNG, WebP or JPEG); re-run its job"
            )
        file.seek(0)
    except BaseException:
        file.close()
        raise
    return file, info.st_size, fmt


def output_format(data: bytes) -> str | None:
    """The output format of a file's bytes, by its signature (None: none of them)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpeg" if data.startswith(b"\xff\xd8\xff") else None


def _intact_format(file: BinaryIO, size: int) -> str | None:
    """The format of `file` if it is a whole output file: a PNG whose every chunk is present with a
    matching checksum; a WebP as long as its RIFF header says; a JPEG that ends with its end-of-image
    marker. Each must also open as that format. Read from the file, not into memory whole."""
    from PIL import Image

    head = file.read(16)
    fmt = output_format(head)
    if fmt == "webp" and int.from_bytes(head[4:8], "little") + 8 != size:
        return None
    if fmt == "jpeg":
        file.seek(max(0, size - 2))
        if file.read(2) != b"\xff\xd9":
            return None
    file.seek(0)
    try:
        with Image.open(file, formats=[fmt.upper() if fmt else "PNG"]) as im:
            im.verify()
    except Exception:  # PIL reports truncation and bad checksums with several exception types
        return None
    return fmt or "png"


class Base64Body:
    """A JSON answer that carries image files in base64 (OpenAI's `b64_json`, A1111's `images`).

    The body is built with `slot(data)` strings where the base64 goes, and `response` splices each
    file's base64 into the serialized JSON. Base64 needs no JSON escaping, and serializing megabytes
    of it through `json.dumps` (which scans every character) costs a 1024² PNG about 10 ms on the
    path of every answer. A slot is named by a nonce drawn per answer, so that no text a client
    sent (a prompt in A1111's `info`) can be taken for one.
    """

    def __init__(self) -> None:
        self._nonce = secrets.token_hex(16)
        self._files: list[bytes] = []

    def slot(self, data: bytes) -> str:
        self._files.append(data)
        return f"{self._nonce}:{len(self._files) - 1}"

    def render(self, body: Any) -> bytes:
        """`body` as compact JSON (as Starlette's JSONResponse writes it), each slot's file in base64."""
        text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
        for i, data in enumerate(self._files):
            marker = f'"{self._nonce}:{i}"'.encode()
            if text.count(marker) != 1:
                raise ValueError(f"slot {i} appears {text.count(marker)} times in the body, not once")
            text = text.replace(marker, b'"' + base64.b64encode(data) + b'"', 1)
        return text

    def response(self, body: Any, headers: dict[str, str] | None = None) -> Response:
        return Response(self.render(body), media_type="application/json", headers=headers)
