"""The HTTP API: FastAPI routes (bodies in schemas.py) around the service (service.py), one error
body, bearer-key auth.

Generation never happens here: a route validates, queues the job in SQLite (jobs.py) and waits for
or reports on it; worker processes (workers.py) own the devices. docs/api.md describes the routes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from tempfile import SpooledTemporaryFile
from typing import Any, BinaryIO

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import (
    FieldError,
    JobFailedError,
    NotReadyError,
    UnauthorizedError,
    ZTurboError,
)
from ..inputs.images import InputImage
from ..inputs.spec import ALPHA_MASK, INPAINT_CONTROL_DIM
from ..request import FIELDS, IMAGE_FIELDS, LIMITS, LORAS, MARGINS, SEEDS, GenerateRequest
from . import jobs
from .a1111 import IMAGE_ROUTES as A1111_IMAGE_ROUTES
from .a1111 import PREFIX as A1111_PREFIX
from .a1111 import a1111_routes, basic_password
from .results import CLIENT_GONE, OUTPUT_TYPES, Base64Body, awaited_job, open_image, read_image
from .schemas import (
    MODEL_ALIASES,
    ROUTE_FIELDS,
    JobBody,
    OpenAIImageBody,
    UnsupportedImageTypeError,
    body_request,
    check_body_size,
    check_image_size,
    check_part_type,
    declared_charset,
    form_preview,
    form_text,
    image_text_bytes,
    image_variation_seeds,
    job_inputs,
    job_params,
    status_limits,
    text_image,
    upload_image,
)
from .service import Dispatcher, ServeSettings, Service

log = logging.getLogger("zturbo.server")

SIGNED_URL_TTL_S = 3600
SSE_KEEPALIVE_S = 15.0
# The routes whose bodies may carry input images, and so may be larger than `max_body_bytes`.
IMAGE_ROUTES = frozenset({"/v1/jobs", "/v1/images/generations", "/v1/images/edits"}) | A1111_IMAGE_ROUTES


def error_response(status: int, kind: str, message: str, field: str | None = None, **headers: str) -> JSONResponse:
    body = {"error": {"type": kind, "message": message, "field": field}}
    return JSONResponse(body, status_code=status, headers=headers or None)


# --- app -------------------------------------------------------------------------------------


def create_app(settings: ServeSettings, dispatcher: Dispatcher | None = None) -> FastAPI:
    """The API on `settings`; `dispatcher`: what runs its jobs (`Dispatcher`; default this machine's workers)."""
    return service_app(Service(settings, dispatcher))


def service_app(service: Service) -> FastAPI:
    """The API around `service`, which may be running already (`zturbo serve` starts it first); the
    app's lifespan starts it if not, and stops it."""
    settings = service.settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(
        title="zturbo",
        summary="Z-Image-Turbo text-to-image service: a persistent job queue and an OpenAI-compatible images API.",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.service = service
    _install_error_handlers(app)
    limits = {
        "max_body": settings.max_body_bytes,
        "max_headers": settings.max_header_bytes,
        "image_paths": IMAGE_ROUTES,
        "max_image_body": settings.max_image_body_bytes,
    }
    # Middleware added first runs innermost: a body is read only once the Host and the key have passed,
    # and the outermost layer refuses oversized headers and declared lengths without reading anything.
    app.add_middleware(EdgeLimits, **limits, read_body=True)
    _install_auth(app, service)
    _install_host_check(app, service)
    app.add_middleware(EdgeLimits, **limits, read_body=False)
    app.include_router(_open_routes(service))
    app.include_router(_job_routes(service))
    app.include_router(_service_routes(service))
    app.include_router(_image_routes(service))
    app.include_router(_lora_routes(service))
    app.include_router(a1111_routes(service))
    # Ahead of the JSON route of the same path: a multipart body goes to its own handler.
    app.router.routes.insert(0, FormRoute("/v1/jobs", _form_submit(service), methods=["POST"]))
    return app


def job_view(service: Service, job: jobs.Job) -> dict[str, Any]:
    """The job object of the HTTP contract."""
    progress = service.supervisor.progress(job.id) if job.status == jobs.RUNNING else None
    variation_seeds = image_variation_seeds(job.params)
    return {
        "id": job.id,
        "status": job.status,
        "params": job_params(job.params) | {"inputs": job_inputs(job.params, job.id)},
        "position": service.store.position(job),
        "progress": {"step": progress[0], "steps": progress[1]} if progress else None,
        "images": [
            {
                "id": im.id,
                "url": f"/v1/images/{im.id}",
                "seed": im.seed,
                "variation_seed": variation_seeds[im.idx] if im.idx < len(variation_seeds) else None,
            }
            for im in job.images
        ],
        "error": job.error,
        "warnings": list(job.warnings),
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }


def json_request(service: Service, body: JobBody | OpenAIImageBody, body_bytes: int) -> GenerateRequest:
    """A JSON body's request: its size besides the images bounded, each image checked and decoded."""
    s = service.settings
    check_body_size(body_bytes, image_text_bytes(body), s.max_body_bytes, s.max_input_bytes)
    return body_request(body, s.limits, s.max_input_bytes)


def _version() -> str:
    from ..version import __version__

    return __version__


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ZTurboError)
    async def _zturbo(request: Request, exc: ZTurboError) -> JSONResponse:
        retry_after = getattr(exc, "retry_after", None)  # a full queue, a locked database
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        return error_response(exc.http_status, exc.kind, str(exc), getattr(exc, "field", None), **headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        field, message = _describe_validation(exc.errors())
        return error_response(400, "invalid_request", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = {404: f"no route {request.url.path}"}.get(status, str(exc.detail))
        if status == 400 and exc.__cause__ is not None:  # the body could not be parsed as JSON
            message = _describe_unparsable(exc.__cause__)
        return error_response(status, _HTTP_KINDS.get(status, _fallback_kind(status)), message)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        # Starlette re-raises after this response and uvicorn then drops the connection: say so, so that
        # a keep-alive client opens a new one rather than having its next request reset.
        message = "internal server error; the server log has the details"
        return error_response(500, "internal_error", message, Connection="close")


# The error types of Starlette's own HTTP errors; every type is listed in docs/api.md.
_HTTP_KINDS = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def _fallback_kind(status: int) -> str:
    return "invalid_request" if status < 500 else "internal_error"


def _describe_unparsable(cause: BaseException) -> str:
    """Why a body is no JSON the server can read (json.loads itself gave the error)."""
    if isinstance(cause, UnicodeDecodeError):
        return f"the body is not UTF-8 text: byte {cause.start + 1} is 0x{cause.object[cause.start]:02x}"
    if isinstance(cause, RecursionError):
        return "the body's JSON nests too deeply; send a flat JSON object of the documented fields"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return f"the body holds a number of more than {sys.get_int_max_str_digits()} digits"
    return f"the body could not be read as JSON ({type(cause).__name__})"


_JSON_TYPES = {list: "an array", type(None): "null", bool: "a boolean", int: "a number", float: "a number"}


def _describe_body(err: dict[str, Any]) -> str:
    """A fault of the body as a whole (not of one field): not JSON, empty, or not an object."""
    kind = err.get("type")
    if kind == "json_invalid":
        reason = err.get("ctx", {}).get("error", "JSON decode error")
        return f"the body is not valid JSON: {reason} at character {int(err['loc'][-1]) + 1}"
    if kind == "missing":
        return 'the body is empty; send a JSON object with at least "prompt" (Content-Type: application/json)'
    value = err.get("input")
    got = _JSON_TYPES.get(type(value), "text")  # a body sent as another content type arrives as text
    return f"the body must be a JSON object sent as Content-Type: application/json, got {got}"


def _describe_validation(errors: list[Any]) -> tuple[str | None, str]:
    """The first validation error as (field, sentence naming the value and what is allowed)."""
    if not errors:
        return None, "invalid request"
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    if err.get("loc", ())[:1] == ("body",) and (err.get("type") == "json_invalid" or len(err["loc"]) == 1):
        return None, _describe_body(err)
    field = ".".join(loc) or None
    msg = str(err.get("msg", "invalid"))
    if err.get("type") == "extra_forbidden":
        return field, f"{field} is not a known field"
    if err.get("type") == "missing":
        return field, f"{field} is required"
    if "input" in err and err.get("type") not in ("json_invalid", "model_attributes_type"):
        value = json.dumps(err["input"], default=str)
        value = value if len(value) <= 60 else value[:57] + "..."
        return field, f"{field} {value}: {msg}"
    return field, f"{field}: {msg}" if field else msg


def _install_auth(app: FastAPI, service: Service) -> None:
    """Every /v1/* route and /metrics need the bearer key (checked before any input is parsed);
    an image also opens with a signed URL as the OpenAI-style route returns them."""
    api_key = service.settings.api_key
    if api_key is None:
        return
    # Comparing digests keeps the comparison constant-time and independent of the key's length.
    expected = hashlib.sha256(api_key.encode()).digest()

    def key_ok(request: Request) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic" and request.url.path.startswith(A1111_PREFIX):  # A1111 clients' --api-auth
            scheme, token = "bearer", basic_password(token)
        given = hashlib.sha256(token.strip().encode()).digest()
        return hmac.compare_digest(given, expected) and scheme.lower() == "bearer"

    @app.middleware("http")
    async def auth(request: Request, call_next: Callable[[Request], Any]) -> Response:
        path = request.url.path
        protected = path.startswith(("/v1/", A1111_PREFIX)) or path in ("/v1", "/metrics")
        if protected and not key_ok(request) and not _signed_image_ok(service, path, request.query_params):
            return error_response(
                401,
                UnauthorizedError.kind,
                "missing or wrong API key; send 'Authorization: Bearer <key>'",
                **{"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)


def _install_host_check(app: FastAPI, service: Service) -> None:
    """A server without a key answers only requests addressed to a loopback name or address, or to
    an allowed host: a web page whose name an attacker re-points at 127.0.0.1 (DNS rebinding) runs
    in the browser as that name, and its requests carry it in Host."""
    if service.settings.api_key is not None:
        return
    allowed = {_host_name(h) for h in service.settings.allowed_hosts}

    @app.middleware("http")
    async def host_check(request: Request, call_next: Callable[[Request], Any]) -> Response:
        host = request.headers.get("host", "")
        if host and "*" not in allowed and not _host_allowed(_host_name(host), allowed):
            message = (
                f"Host {host[:100]!r} is not served: a server without an API key answers only to localhost, "
                f"loopback addresses and --allowed-hosts, so that no other site's page can reach it through "
                f"the browser; use http://127.0.0.1:PORT, or start the server with an API key or "
                f"--allowed-hosts {_host_name(host)}"
            )
            return error_response(403, "host_not_allowed", message)
        return await call_next(request)


def _host_name(host: str) -> str:
    """A Host header's name without port, brackets, case or a trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, colon, port = host.rpartition(":")
    return (name if colon and port.isdigit() and ":" not in name else host).rstrip(".")


def _host_allowed(name: str, allowed: set[str]) -> bool:
    if name in allowed or name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class EdgeLimits:
    """Bounds what one request may make the server hold: its headers (431) and its body (413).

    A body is refused from its Content-Length before any of it is read, or, sent without one (with
    `read_body`), as soon as the bytes received pass the limit; a body within it is buffered here and
    replayed to the app. The routes of `image_paths` take bodies up to `max_image_body` (their
    handlers bound the part besides the images to `max_body`). The web UI (Gradio, under /ui)
    bounds its own uploads.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body: int,
        max_headers: int,
        read_body: bool,
        image_paths: frozenset[str] = frozenset(),
        max_image_body: int = 0,
    ) -> None:
        self.app, self.max_body, self.max_headers, self.read_body = app, max_body, max_headers, read_body
        self.image_paths, self.max_image_body = image_paths, max(max_image_body, max_body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(k) + len(v) for k, v in scope["headers"])
        if header_bytes > self.max_headers:
            message = f"the request headers are {header_bytes} bytes; allowed at most {self.max_headers}"
            await error_response(431, "too_large", message)(scope, receive, send)
            return
        limit = self.max_image_body if scope["path"] in self.image_paths else self.max_body
        declared = dict(scope["headers"]).get(b"content-length", b"")
        web_ui = scope["path"] == "/ui" or scope["path"].startswith("/ui/")  # its gate bounds uploads and bodies
        if not web_ui and declared.isdigit() and int(declared) > limit:
            message = f"the request body is {int(declared)} bytes; this server accepts at most {limit}"
            await error_response(413, "too_large", message, Connection="close")(scope, receive, send)
            return
        if not self.read_body or web_ui:
            await self.app(scope, receive, send)
            return
        body = await read_body(receive, limit)
        if body is None:
            message = f"the request body is larger than {limit} bytes, the most this server accepts"
            await error_response(413, "too_large", message, Connection="close")(scope, receive, send)
            return
        await self.app(scope, replay_body(body, receive), send)


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once the bytes received pass the limit."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break  # the client went away; the app sees an empty body
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limit:
            return None
        more = message.get("more_body", False)
    return b"".join(chunks)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then the connection's own messages (disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _signed_image_ok(service: Service, path: str, query: Any) -> bool:
    image_id = path.removeprefix("/v1/images/")
    if image_id == path or "/" in image_id:
        return False
    try:
        expires = int(query.get("expires", ""))
    except ValueError:
        return False
    sig = query.get("sig", "")
    return expires >= time.time() and hmac.compare_digest(service.sign(image_id, expires).encode(), sig.encode())


def _open_routes(service: Service) -> APIRouter:
    r = APIRouter()

    @r.get("/health", tags=["service"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @r.get("/ready", tags=["service"], responses={503: {"description": "no worker has the model loaded yet"}})
    def ready() -> dict[str, Any]:
        """Open to all, so it tells only how many workers can take a job: job ids, process ids and
        errors are in /v1/status, behind the key."""
        if not service.supervisor.ready():
            raise NotReadyError("no worker has the model loaded and warm yet")
        states = [w["state"] for w in service.supervisor.workers()]
        return {
            "status": "ready",
            "workers": {"ready": sum(s in ("ready", "busy") for s in states), "total": len(states)},
            **service.supervisor.startup(),  # ready_s (server start to first ready worker), compile_cache
        }

    return r


DOWNLOAD_CHUNK = 1 << 20  # bytes an image download holds at a time


def _image_routes(service: Service) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/images/{image_id}", tags=["images"], response_class=Response, responses=_OUTPUT_IMAGE)
    def image(
        image_id: str,
        expires: int | None = Query(None, description="signed URL: expiry (unix seconds)"),
        sig: str | None = Query(None, max_length=128, description="signed URL: signature"),
    ) -> Response:
        ref = service.store.image(image_id)
        file, size, fmt = open_image(service.images_dir, ref.file, image_id)
        return StreamingResponse(_chunks(file), media_type=OUTPUT_TYPES[fmt], headers={"Content-Length": str(size)})

    return r


def _chunks(file: BinaryIO) -> Iterator[bytes]:
    """A file in pieces, closed at the end or when the client goes: a slow reader holds one piece
    of memory, not the whole image."""
    with file:
        while piece := file.read(DOWNLOAD_CHUNK):
            yield piece


_OUTPUT_IMAGE: dict[int | str, dict[str, Any]] = {
    200: {"content": {media: {} for media in OUTPUT_TYPES.values()}, "description": "the image file, as it was asked"}
}


def _job_routes(service: Service) -> APIRouter:
    r = APIRouter()
    store = service.store

    @r.post("/v1/jobs", status_code=202, tags=["jobs"], responses=_SUBMIT_ERRORS, openapi_extra=_job_form())
    async def submit(body: JobBody, request: Request) -> dict[str, Any]:
        """A JSON body (images as base64), or multipart/form-data (images as file parts)."""
        size = len(await request.body())
        return await run_in_threadpool(_submit_json, service, body, size)

    @r.get("/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str) -> dict[str, Any]:
        return job_view(service, store.get(job_id))

    @r.get("/v1/jobs/{job_id}/inputs/{field}", tags=["jobs"], response_class=Response, responses=_IMAGE)
    def job_input(job_id: str, field: str) -> Response:
        """One of the job's input images (image, mask or control_image), the bytes as uploaded."""
        hashes = jobs.input_hashes(store.get(job_id).params)
        if field not in hashes:
            given = ", ".join(sorted(hashes)) or "none"
            raise jobs.JobNotFoundError(f"job {job_id} has no input image {field!r}; its input images: {given}")
        file = store.inputs.open(field, hashes[field])
        try:
            media_type = _image_type(file)
            size = os.fstat(file.fileno()).st_size
        except BaseException:
            file.close()
            raise
        headers = {"X-Content-Type-Options": "nosniff", "Content-Length": str(size)}
        return StreamingResponse(_chunks(file), media_type=media_type, headers=headers)

    @r.delete("/v1/jobs/{job_id}", tags=["jobs"])
    def cancel_job(job_id: str) -> dict[str, Any]:
        return job_view(service, service.cancel(job_id))

    @r.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse)
    async def job_events(job_id: str) -> StreamingResponse:
        await run_in_threadpool(store.get, job_id)  # 404 before the stream starts
        return StreamingResponse(_sse(service, job_id), media_type="text/event-stream")

    @r.get("/v1/history", tags=["jobs"])
    async def history(
        limit: int = Query(20, ge=1, le=200),
        offset: int = Query(0, ge=0, le=2**31),
        q: str | None = Query(None, max_length=LIMITS.prompt_chars, description="prompt substring, any case"),
    ) -> dict[str, Any]:
        # A search reads every finished job: a few run at a time, and the others wait without a
        # worker thread, so a burst of them leaves the other routes their threads.
        async with service.history_slots:
            return await run_in_threadpool(_history_page, service, limit, offset, q)

    @r.delete("/v1/history/{job_id}", status_code=204, tags=["jobs"])
    def delete_history(job_id: str) -> Response:
        store.delete(job_id, service.images_dir)
        return Response(status_code=204)

    return r


_SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"description": "an input image, or the body besides its images, is too large"},
    415: {"description": "a file part or data URL that is not an image"},
    429: {"description": "queue full"},
}
_IMAGE: dict[int | str, dict[str, Any]] = {200: {"content": {"image/*": {}}, "description": "the image file"}}


def _image_type(file: BinaryIO) -> str:
    """An image file's media type, from its header (the store keeps only what Pillow decoded); the
    file is left at its start."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            return im.get_format_mimetype() or "application/octet-stream"
    except (UnidentifiedImageError, OSError, ValueError):
        return "application/octet-stream"
    finally:
        file.seek(0)


def _submit_json(service: Service, body: JobBody, size: int) -> dict[str, Any]:
    job = service.submit(json_request(service, body, size), jobs.new_id(), None, preview=body.preview)
    return job_view(service, job)


def _form_body(names: list[str], required: tuple[str, ...], *, beside_json: bool) -> dict[str, Any]:
    """The OpenAPI request body of a multipart form: the image fields as files, the others as text."""
    properties = {n: {"type": "string", "format": "binary"} if n in IMAGE_FIELDS else {"type": "string"} for n in names}
    form = {"schema": {"type": "object", "properties": properties, "required": list(required)}}
    body: dict[str, Any] = {"content": {"multipart/form-data": form}}
    if not beside_json:
        body["required"] = True
    return {"requestBody": body}


# The names each form takes: its JSON sibling's body fields, no alias (`from_fields` would take
# any, so the form is checked first), with the image fields as file parts or base64 text.
_JOB_FORM = frozenset(JobBody.model_fields)
_EDIT_FORM = frozenset(OpenAIImageBody.model_fields)
# The fields whose JSON value is a list: a form sends one as repeated `name[]` parts.
_LIST_FIELDS = frozenset(f.api_name for f in FIELDS if f.kind in (SEEDS, LORAS, MARGINS))


def _job_form() -> dict[str, Any]:
    return _form_body(list(JobBody.model_fields), ("prompt",), beside_json=True)


def _edit_form() -> dict[str, Any]:
    form = _form_body(list(OpenAIImageBody.model_fields), ("image", "prompt"), beside_json=False)
    properties = form["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    properties["response_format"] = {"type": "string", "enum": ["b64_json", "url"]}
    return form


class FormRoute(Route):
    """A route that takes only multipart/form-data bodies, placed ahead of a JSON route of the same path."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
        if match is not Match.NONE and not _is_multipart(content_type):
            return Match.NONE, {}
        return match, child


def _is_multipart(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == "multipart/form-data"


def _form_submit(service: Service) -> Callable[[Request], Any]:
    async def submit_form(request: Request) -> JSONResponse:
        values = await _form_values(request, service.settings, _JOB_FORM)
        preview = form_preview(values)
        request_ = await run_in_threadpool(GenerateRequest.from_fields, values, service.settings.limits)
        job = await run_in_threadpool(service.submit, request_, jobs.new_id(), None, preview=preview)
        return JSONResponse(await run_in_threadpool(job_view, service, job), status_code=202)

    return submit_form


async def _form_values(request: Request, settings: ServeSettings, fields: frozenset[str]) -> dict[str, Any]:
    """A multipart form's fields (only the names in `fields`): images checked (type, size) and
    decoded, the rest as text, in its declared charset or UTF-8 (the table reads it as the CLI's)."""
    if not _is_multipart(request.headers.get("content-type")):
        message = "send the fields as multipart/form-data, the images as file parts"
        raise UnsupportedImageTypeError(None, message)
    parts = _FormParts(fields)
    async with _read_form(request, settings) as form:
        for key, item in form.multi_items():
            name = parts.name(key)
            if name in IMAGE_FIELDS:
                parts.images[name] = await _form_image(name, item, settings)
            elif isinstance(item, str):
                parts.texts.setdefault(name, []).append(item)
            else:
                raise FieldError(name, f"{name} is a file; only {', '.join(IMAGE_FIELDS)} take files")
    size = sum(len(text.encode()) for texts in parts.texts.values() for text in texts)
    check_body_size(size, 0, settings.max_body_bytes, settings.max_input_bytes)
    return {name: ",".join(texts) for name, texts in parts.texts.items()} | parts.images


@dataclass
class _FormParts:
    """A form's parts by field. Clients send a list as repeated `name[]` parts (the openai client
    does, and sends OpenAI's `image[]`): a list field's (seeds, loras, outpaint: a list in JSON)
    become one comma-separated text, as the CLI writes them. Any other field takes one part, with
    or without `[]`, as its JSON takes one value: joining two prompts would make a prompt no one
    sent."""

    fields: frozenset[str]
    images: dict[str, Any] = dataclass_field(default_factory=dict)
    texts: dict[str, list[str]] = dataclass_field(default_factory=dict)
    listed: set[str] = dataclass_field(default_factory=set)  # list fields sent as `name[]` parts

    def name(self, key: str) -> str:
        """The field of a part named `key`; refused unless the form takes it, once or as a list."""
        name = key.removesuffix("[]")
        if name not in self.fields:
            raise FieldError(name, f"{name} is not a known field")
        listed = key.endswith("[]") and name in _LIST_FIELDS
        if (name in self.images or name in self.texts) and not (listed and name in self.listed):
            one = "; this server edits one image per request" if name in IMAGE_FIELDS else ""
            raise FieldError(name, f"{name} is given more than once{one}")
        self.listed.update([name] if listed else [])
        return name


# A file part stays in memory up to this many bytes, then spills to disk (as in Starlette's forms).
_SPOOL_BYTES = 1024 * 1024


def _bad_form(message: str) -> StarletteHTTPException:
    return StarletteHTTPException(400, detail=message)


@dataclass
class _Part:
    """A multipart part being read: its headers, then its text's bytes or its file."""

    headers: list[tuple[bytes, bytes]] = dataclass_field(default_factory=list)
    name: str = ""
    data: bytearray = dataclass_field(default_factory=bytearray)
    file: UploadFile | None = None


class _FormReader:
    """A multipart/form-data body read through python-multipart's public callbacks (the parser
    Starlette's `request.form()` drives), not through Starlette's parser class, whose internals may
    change in any release. As `request.form()` does: the same bounds and 400s, file parts spooled
    into UploadFiles. Unlike it: a text part is decoded strictly by the charset it declares, else
    the form's, else UTF-8 (`form_text`); Starlette ignores a part's charset and reads bytes that
    fail as Latin-1, which changes the text without a word."""

    def __init__(self, form_charset: str | None, most: dict[str, int], settings: ServeSettings) -> None:
        self.form_charset = form_charset
        self.most = most  # how many "files" and "fields" a form may hold
        self.counts = dict.fromkeys(most, 0)
        self.settings = settings
        # An image field's text part (base64) may hold an image; any other text part counts
        # toward the body's text, refused (as `check_body_size` refuses it) once past the limit.
        self.image_part_size = 4 * -(-settings.max_input_bytes // 3)
        self.part_size = self.image_part_size
        self.image_part = False  # the part being read is an image field's
        self.text_bytes = 0  # the bytes of the form's text parts that are no image field's
        self.items: list[tuple[str, str | UploadFile]] = []
        self.files: list[UploadFile] = []
        self.part = _Part()
        self.header = (bytearray(), bytearray())  # the name and value of the header being read
        self.writes: list[tuple[UploadFile, bytes]] = []  # file bytes to write once a chunk is parsed
        self.ended = False  # the closing boundary was read

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header[0].extend(data[start:end])

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header[1].extend(data[start:end])

    def on_header_end(self) -> None:
        self.part.headers.append((bytes(self.header[0]).lower(), bytes(self.header[1])))
        self.header = (bytearray(), bytearray())

    def on_headers_finished(self) -> None:
        """Name the part, count it, and give a file part (one with a filename) its spooled file."""
        _, options = parse_options_header(dict(self.part.headers).get(b"content-disposition"))
        if b"name" not in options:
            raise _bad_form('The Content-Disposition header field "name" must be provided.')
        self.part.name = self._header_text(options[b"name"])
        self.image_part = self.part.name.removesuffix("[]") in IMAGE_FIELDS
        self.part_size = self.image_part_size if self.image_part else self.settings.max_body_bytes
        kind = "files" if b"filename" in options else "fields"
        self.counts[kind] += 1
        if self.counts[kind] > self.most[kind]:
            raise _bad_form(f"Too many {kind}. Maximum number of {kind} is {self.most[kind]}.")
        if kind == "files":
            filename = self._header_text(options[b"filename"])
            spool = SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115 (closed with the form, or on error)
            self.part.file = UploadFile(spool, size=0, filename=filename, headers=Headers(raw=self.part.headers))
            self.files.append(self.part.file)

    @staticmethod
    def _header_text(raw: bytes) -> str:
        """A part's name or filename: UTF-8 (what browsers and HTTP clients send), else Latin-1,
        whatever charset the form declares: a form's charset is its text's, and one such as
        UTF-16 would turn `name="prompt"` into no field's name. A name only picks a field, an
        unknown one refused by name, and a filename only labels messages, so this reading changes
        no value the request holds."""
        try:
            return raw.decode("utf-8")
        except ValueError:
            return raw.decode("latin-1")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part.file is not None:
            self.writes.append((self.part.file, bytes(data[start:end])))
            return
        if not self.image_part:
            self.text_bytes += end - start
            check_body_size(self.text_bytes, 0, self.settings.max_body_bytes, self.settings.max_input_bytes)
        if len(self.part.data) + end - start > self.part_size:
            raise _bad_form(f"Part exceeded maximum size of {self.part_size // 1024}KB.")
        self.part.data.extend(data[start:end])

    def on_part_end(self) -> None:
        part = self.part
        if part.file is not None:
            self.items.append((part.name, part.file))
            return
        content_type = dict(part.headers).get(b"content-type")
        self.items.append((part.name, form_text(part.name, bytes(part.data), content_type, self.form_charset)))

    def on_end(self) -> None:
        self.ended = True

    async def read(self, boundary: bytes, stream: AsyncIterator[bytes]) -> FormData:
        """The form in `stream`; on any failure its files are closed and the error raised (a
        malformed body a 400, as `request.form()` answers it)."""
        try:
            parser = MultipartParser(boundary, self.callbacks())
            async for chunk in stream:
                parser.write(chunk)
                # The callbacks cannot await: the file bytes go out here, off the event loop
                # once a file has spilled to disk.
                for upload, data in self.writes:
                    await upload.write(data)
                self.writes.clear()
            parser.finalize()
            if not self.ended:  # python-multipart ends a part only at the next boundary
                raise _bad_form("Invalid multipart data: the body ends before its closing boundary.")
            for upload in self.files:
                await upload.seek(0)
        except BaseException as e:
            for upload in self.files:
                upload.file.close()
            if isinstance(e, FormParserError):
                raise _bad_form(f"Invalid multipart data: {e}.") from None
            raise
        return FormData(self.items)

    def callbacks(self) -> dict[str, Callable[..., None]]:
        """python-multipart's callbacks, by the names its `MultipartParser` documents."""
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }


@asynccontextmanager
async def _read_form(request: Request, settings: ServeSettings) -> AsyncIterator[FormData]:
    """The request's multipart form, bounded as `request.form(...)` would bound it (files, fields,
    a text part's bytes); its files are closed on the way out."""
    content_type = request.headers["content-type"]
    _, params = parse_options_header(content_type)
    if b"boundary" not in params:
        raise _bad_form("Missing boundary in multipart.")
    most = {"files": len(IMAGE_FIELDS), "fields": 256}
    reader = _FormReader(declared_charset(None, content_type), most, settings)
    async with aclosing(request.stream()) as stream:
        form = await reader.read(params[b"boundary"], stream)
    try:
        yield form
    finally:
        await form.close()


async def _form_image(name: str, item: UploadFile | str, settings: ServeSettings) -> Any:
    if isinstance(item, str):  # base64 text, as in JSON (or the mask's "alpha")
        return await run_in_threadpool(text_image, name, item, settings.max_input_bytes)
    check_part_type(name, item.content_type)
    check_image_size(name, item.size or 0, settings.max_input_bytes)
    data = await item.read()
    return await run_in_threadpool(upload_image, name, data, item.filename, settings.max_input_bytes)


def _lora_routes(service: Service) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/loras", tags=["loras"])
    def loras() -> dict[str, Any]:
        """The LoRA files a job may name: the server's LoRA directory, each file with its hashes and
        either its summary (format, ranks, targeted modules) or why the server refuses it."""
        return {"items": service.loras.listing()}

    return r


def _service_routes(service: Service) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/status", tags=["service"])
    def status() -> dict[str, Any]:
        rt = service.supervisor.runtime()
        return {
            "model": rt.get("model", service.settings.config.model),
            # hf, modelscope, local, tiny-random or single-files; null until loaded
            "model_source": rt.get("model_source"),
            # The GGUF file that replaced the model's transformer weights; null for the model's own
            "transformer_weights": rt.get("transformer_weights"),
            "device": ",".join(service.settings.devices),
            "dtypes": rt.get("dtypes"),
            "memory_plan": rt.get("memory_plan"),
            "gpu_memory": rt.get("gpu_memory"),
            "queue_depth": service.store.depth(),
            "queue_size": service.settings.queue_size,
            "workers": service.supervisor.workers(),
            "limits": status_limits(service.settings.limits),
            "input_limits": {"max_bytes": service.settings.max_input_bytes, "max_pixels": LIMITS.input_pixels},
            "controlnet": _controlnet(service, rt),
        }

    @r.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @r.post("/v1/images/generations", tags=["openai"], responses=_SUBMIT_ERRORS)
    async def openai_images(body: OpenAIImageBody, request: Request) -> Response:
        _check_model(service, body.model)
        size = len(await request.body())
        job_request = await run_in_threadpool(json_request, service, body, size)
        return await _openai_answer(service, job_request, body.user, body.response_format, request)

    @r.post("/v1/images/edits", tags=["openai"], responses=_SUBMIT_ERRORS, openapi_extra=_edit_form())
    async def openai_edits(request: Request) -> Response:
        """OpenAI's image edit: multipart/form-data with `image` (or `image[]`, one file), an optional
        `mask`, `prompt` and the generation route's fields; zturbo's extensions as form fields."""
        values = await _form_values(request, service.settings, _EDIT_FORM)
        route = {name: values.pop(name) for name in ROUTE_FIELDS & set(values)}
        _check_model(service, route.get("model"))
        answer = route.get("response_format", "b64_json")
        if answer not in ("b64_json", "url"):
            raise FieldError("response_format", f"response_format {answer!r} is not one of b64_json, url")
        job_request = await run_in_threadpool(_edit_request, service, values)
        return await _openai_answer(service, job_request, route.get("user"), answer, request)

    return r


def _history_page(service: Service, limit: int, offset: int, query: str | None) -> dict[str, Any]:
    items, total = service.store.history(limit=limit, offset=offset, query=query)
    return {"items": [job_view(service, j) for j in items], "total": total}


def _edit_request(service: Service, values: dict[str, Any]) -> GenerateRequest:
    """OpenAI's edit semantics on the request table: without `size` (or with "auto", as on every
    route) the image's own size; without a mask (or outpaint, which makes its own), an image with
    transparency is its own mask (transparent repaints), and an opaque one is img2img at the
    default strength."""
    if "image" not in values:
        raise FieldError("image", "image is required: the image to edit, as a file part")
    image = values["image"]
    unmasked = "mask" not in values and "outpaint" not in values
    if unmasked and isinstance(image, InputImage) and image.has_alpha:
        values["mask"] = ALPHA_MASK
    return GenerateRequest.from_fields(values, service.settings.limits)


def _check_model(service: Service, model: object) -> None:
    allowed = (*service.settings.model_names, *MODEL_ALIASES)
    if model is not None and model not in allowed:
        raise FieldError("model", f"model {model!r} is not served here; omit it or use one of {list(allowed)}")


def _controlnet(service: Service, runtime: dict[str, Any]) -> dict[str, Any] | None:
    """The served ControlNet (None without one): what it was asked as and its input width, which the
    API validates against, and what a worker reported once it loaded it."""
    spec, dim = service.settings.config.controlnet, service.settings.limits.control_in_dim
    if spec is None or dim is None:
        return None
    loaded = runtime.get("controlnet")
    info = {"name": spec, "control_in_dim": dim, "inpaint": dim >= INPAINT_CONTROL_DIM}
    return info | loaded if isinstance(loaded, dict) else info


async def _openai_answer(
    service: Service, job_request: GenerateRequest, user: str | None, response_format: str, request: Request
) -> Response:
    """Queue the request, wait for its job, and answer as OpenAI's images API does."""
    job_id = jobs.new_id()
    await run_in_threadpool(service.submit, job_request, job_id, user)
    job = await awaited_job(service, request, job_id)
    if job is None:
        return Response(status_code=CLIENT_GONE)
    base_url = str(request.base_url).rstrip("/")
    if job.status != jobs.SUCCEEDED:
        error = job.error or {"type": "cancelled", "message": f"job {job_id} was cancelled"}
        raise JobFailedError(error["type"], error["message"])
    files, data = Base64Body(), []
    for im in job.images:
        if response_format == "b64_json":
            file = await run_in_threadpool(read_image, service.images_dir, im.file, im.id)
            data.append({"b64_json": files.slot(file), "revised_prompt": None})
        else:
            data.append({"url": _image_url(service, base_url, im.id), "revised_prompt": None})
    params = job_params(job.params)
    seeds = {key: params[key] for key in ("seed", "seeds", "variation_seed")}
    body = {
        "created": int(job.created_at),
        "data": data,
        "output_format": params["output_format"],  # echoed as OpenAI's images API does
        "zturbo": {"job_id": job_id, **seeds, "warnings": list(job.warnings)},
    }
    return await run_in_threadpool(files.response, body)


def _image_url(service: Service, base_url: str, image_id: str) -> str:
    url = f"{base_url}/v1/images/{image_id}"
    if service.settings.api_key is None:
        return url
    expires = int(time.time()) + SIGNED_URL_TTL_S
    return f"{url}?expires={expires}&sig={service.sign(image_id, expires)}"


# --- events ------------------------------------------------------------------------------------


@asynccontextmanager
async def _watch(service: Service, job_id: str) -> AsyncIterator[asyncio.Queue[tuple[str, dict[str, Any]]]]:
    """An asyncio queue of this job's events, published from the supervisor thread."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def deliver(event: str, data: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (event, data))

    unsubscribe = service.events.subscribe(job_id, deliver)
    try:
        yield queue
    finally:
        unsubscribe()


async def _next_change(queue: asyncio.Queue[Any], timeout: float) -> list[tuple[str, dict[str, Any]]]:
    """Every event that arrives within `timeout` of waiting (possibly none: the caller re-reads the job)."""
    try:
        items = [await asyncio.wait_for(queue.get(), timeout)]
    except asyncio.TimeoutError:
        return []
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


def _sse_event(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def _sse(service: Service, job_id: str) -> AsyncIterator[str]:
    """queued {position} while waiting, progress {step, steps} while running (with `preview`, a
    base64 JPEG, when the job asked for previews), then done/failed/cancelled; the stream also
    ends, with no final event, when the server shuts down."""
    final = {jobs.SUCCEEDED: "done", jobs.FAILED: "failed", jobs.CANCELLED: "cancelled"}
    last_position: int | None = None
    last_progress: tuple[int, int] | None = None
    quiet_since = time.monotonic()
    async with _watch(service, job_id) as changes:
        while not service.stopping.is_set():
            try:
                job = await run_in_threadpool(service.store.get, job_id)
            except jobs.JobNotFoundError:
                return  # deleted meanwhile
            view = await run_in_threadpool(job_view, service, job)
            if job.finished:
                yield _sse_event(final[job.status], view)
                return
            if job.status == jobs.QUEUED and view["position"] != last_position:
                last_position, last_progress = view["position"], None
                yield _sse_event("queued", {"position": last_position})
            elif job.status == jobs.RUNNING:
                last_position = None
                if view["progress"] and last_progress is None:
                    last_progress = (view["progress"]["step"], view["progress"]["steps"])
                    preview = await run_in_threadpool(service.preview, job_id)
                    yield _sse_event("progress", view["progress"] | ({"preview": preview} if preview else {}))
            events = await _next_change(changes, 1.0)
            for event, data in events:
                # A step's preview may follow its plain progress event (previews come a step late on a GPU).
                if event == "progress" and ((data["step"], data["steps"]) != last_progress or "preview" in data):
                    last_progress = (data["step"], data["steps"])
                    yield _sse_event("progress", data)
            if events:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > SSE_KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
