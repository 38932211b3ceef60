"""A small synchronous client of zturbo's HTTP API (docs: the server's contract), used by the web UI.

The UI reaches the engine only through these calls, so UI generations go through the same queue,
history and auth as any other API client.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

TERMINAL_EVENTS = ("done", "failed", "cancelled")


class ApiError(Exception):
    """An error answer of the API (or no answer); `str(err)` is the server's message."""

    def __init__(self, message: str, *, status: int | None = None, kind: str = "", field: str | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.field = field

    @property
    def unauthorized(self) -> bool:
        return self.status == 401


@dataclass(frozen=True)
class Event:
    """One server-sent event of `/v1/jobs/{id}/events`."""

    name: str
    data: dict[str, Any]


class ApiClient:
    """Calls to one zturbo server; `key` is sent as `Authorization: Bearer` when given."""

    def __init__(self, base_url: str, *, transport: httpx.BaseTransport | None = None, timeout: float = 30.0):
        import httpx

        self._http = httpx.Client(base_url=base_url.rstrip("/"), transport=transport, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def create_job(self, params: dict[str, Any], key: str | None) -> dict[str, Any]:
        return self._json("POST", "/v1/jobs", key, json=params)

    def job(self, job_id: str, key: str | None) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}", key)

    def cancel(self, job_id: str, key: str | None) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/jobs/{job_id}", key)

    def history(self, key: str | None, *, q: str = "", limit: int = 40, offset: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if q:
            params["q"] = q
        return self._json("GET", "/v1/history", key, params=params)

    def delete_history(self, job_id: str, key: str | None) -> None:
        self._send("DELETE", f"/v1/history/{job_id}", key)

    def status(self, key: str | None) -> dict[str, Any]:
        return self._json("GET", "/v1/status", key)

    def loras(self, key: str | None) -> list[dict[str, Any]]:
        """The server's LoRA files (GET /v1/loras)."""
        return self._json("GET", "/v1/loras", key)["items"]

    def image(self, image_id: str, key: str | None) -> bytes:
        return self._send("GET", f"/v1/images/{image_id}", key).content

    def input_image(self, job_id: str, field: str, key: str | None) -> bytes:
        """One of a job's input images (`image`, `mask` or `control_image`), as it was uploaded."""
        return self._send("GET", f"/v1/jobs/{job_id}/inputs/{field}", key).content

    def events(self, job_id: str, key: str | None, *, read_timeout: float = 120.0) -> Iterator[Event]:
        """The job's events until a terminal one. A silent or dropped stream is reopened: the server
        replays the final event to late clients, so nothing is lost."""
        import httpx

        timeout = httpx.Timeout(10.0, read=read_timeout)
        while True:
            try:
                with self._http.stream("GET", f"/v1/jobs/{job_id}/events", headers=_auth(key), timeout=timeout) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        raise _error(resp)
                    for event in parse_sse(resp.iter_lines()):
                        yield event
                        if event.name in TERMINAL_EVENTS:
                            return
            except (httpx.ReadTimeout, httpx.RemoteProtocolError):
                continue
            except httpx.TransportError as e:
                raise ApiError(f"cannot reach the zturbo server: {e}") from None

    def _json(self, method: str, path: str, key: str | None, **kwargs: Any) -> dict[str, Any]:
        return self._send(method, path, key, **kwargs).json()

    def _send(self, method: str, path: str, key: str | None, **kwargs: Any) -> httpx.Response:
        import httpx

        try:
            resp = self._http.request(method, path, headers=_auth(key), **kwargs)
        except httpx.TransportError as e:
            raise ApiError(f"cannot reach the zturbo server: {e}") from None
        if resp.status_code >= 400:
            raise _error(resp)
        return resp


def _auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _error(resp: httpx.Response) -> ApiError:
    """The contract's error body `{"error": {"type", "message", "field"}}`, or the raw status when absent."""
    try:
        body = resp.json()["error"]
        return ApiError(body["message"], status=resp.status_code, kind=body.get("type", ""), field=body.get("field"))
    except (ValueError, KeyError, TypeError):
        return ApiError(f"the server answered HTTP {resp.status_code}: {resp.text[:200]}", status=resp.status_code)


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    """Server-sent events from text lines; comments (keep-alives) are skipped."""
    name, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield Event(name, json.loads("\n".join(data)))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        yield Event(name, json.loads("\n".join(data)))
