"""Connections and shutdown: idle and slow connections closed, a bound on open connections, and a
shutdown that starts no job, ends event streams and exits within the grace however clients behave.

Most tests run uvicorn with the API app in this process (no workers, so jobs stay queued); one runs
a live `zturbo serve` whose worker runs jobs, to see that none starts after SIGTERM.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from serving import SMALL, Server, in_process_app
from zturbo.serving import jobs
from zturbo.serving.connections import BoundedConfig, ConnectionLimits, StoppingServer


@dataclass
class Running:
    server: StoppingServer
    thread: threading.Thread
    port: int

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=3)

    def wait_for_connections(self, count: int) -> None:
        """Until the server has accepted `count` connections (the accept is asynchronous to connect)."""
        deadline = time.monotonic() + 10
        while len(self.server.server_state.connections) < count:
            assert time.monotonic() < deadline, "the server did not accept the connections"
            time.sleep(0.01)

    def queued_job(self) -> str:
        body = {"prompt": "a red fox", **SMALL}
        r = httpx.post(f"http://127.0.0.1:{self.port}/v1/jobs", json=body, headers={"Connection": "close"})
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def open_events(self, job_id: str) -> socket.socket:
        """An event stream of a job, its first event read: the request is in progress."""
        s = self.connect()
        s.sendall(f"GET /v1/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        received = b""
        while b"event: queued" not in received:
            chunk = s.recv(65536)
            assert chunk, f"the stream closed: {received!r}"
            received += chunk
        return s


@contextmanager
def running(data_dir: Path, grace: float = 30.0, **limits: float) -> Iterator[Running]:
    app = in_process_app(data_dir, shutdown_grace=grace)
    config = BoundedConfig(app, ConnectionLimits(**limits), log_config=None, timeout_graceful_shutdown=grace)  # type: ignore[arg-type]
    server = StoppingServer(config, on_stop=app.state.service.begin_stop)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield Running(server, thread, sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def read_response(s: socket.socket) -> bytes:
    """One whole response (its body may come in a later segment than its head)."""
    received = b""
    while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < _content_length(received):
        chunk = s.recv(65536)
        assert chunk, f"the connection closed mid-response: {received!r}"
        received += chunk
    return received


def _content_length(received: bytes) -> int:
    for line in received.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def closed_within(s: socket.socket, seconds: float) -> float:
    """Seconds until the server closed this connection (reading what it sent); fails past `seconds`."""
    s.settimeout(seconds)
    start = time.monotonic()
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the connection was still open after {seconds} s")
    return time.monotonic() - start


def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_timeout(tmp_path):
    with running(tmp_path / "data", keep_alive_s=0.5) as srv:
        assert 0.3 < closed_within(srv.connect(), 3) < 2


def test_a_request_that_arrives_too_slowly_is_cut_off(tmp_path):
    with running(tmp_path / "data", keep_alive_s=0.5, read_timeout_s=1.0) as srv:
        s = srv.connect()
        start = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\n")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            while time.monotonic() - start < 4:
                s.sendall(b"X-Slow: 1\r\n")  # each byte resets no timer: the whole request has 1 s
                time.sleep(0.1)
        assert time.monotonic() - start < 3.5  # cut off well before the client gives up at 4 s


def test_past_the_connection_limit_the_longest_idle_connection_makes_room(tmp_path):
    # a long keep-alive: on a loaded machine only the eviction may close a connection here
    with running(tmp_path / "data", max_connections=3, keep_alive_s=120) as srv:
        idle = [srv.connect() for _ in range(3)]
        srv.wait_for_connections(3)
        idle[0].sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # the first opened, used last
        assert read_response(idle[0]).startswith(b"HTTP/1.1 200 ")
        r = httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=3)
        assert r.status_code == 200
        assert closed_within(idle[1], 1) < 1  # idle the longest: it made room; the others are still open
        for s in (idle[0], idle[2]):
            s.settimeout(0.2)
            with pytest.raises(TimeoutError):
                s.recv(1)


def test_past_the_connection_limit_with_every_connection_busy_a_new_one_gets_503(tmp_path):
    with running(tmp_path / "data", max_connections=2) as srv:
        job = srv.queued_job()
        streams = [srv.open_events(job) for _ in range(2)]
        s = srv.connect()
        head, _, body = s.recv(65536).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head
        assert json.loads(body)["error"]["type"] == "too_many_connections"
        streams[0].close()
        time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=3).status_code == 200


@pytest.mark.parametrize("grace", [0.0, 5.0])
def test_shutdown_ends_event_streams_and_exits_within_the_grace(tmp_path, grace):
    with running(tmp_path / "data", grace=grace) as srv:
        stream = srv.open_events(srv.queued_job())
        start = time.monotonic()
        srv.server.should_exit = True  # what SIGTERM does
        srv.thread.join(4)
        assert not srv.thread.is_alive(), f"still running {time.monotonic() - start:.1f} s after shutdown began"
        assert time.monotonic() - start < 4  # a grace of 5 s is not waited out: the stream ended itself
        closed_within(stream, 1)


def wait_for_step(server: Server, job_id: str, step: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        progress = server.client.get(f"/v1/jobs/{job_id}").json()["progress"]
        if progress and progress["step"] >= step:
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached step {step}\n{server.tail()}")


def test_after_sigterm_no_queued_job_starts_and_the_server_exits_within_the_grace(tiny_dir, tmp_path):
    data = tmp_path / "data"
    server = Server(tiny_dir, data, "--gpus", "cpu", "--no-ui", "--shutdown-grace", "2", step_sleep=0.05)
    try:
        server.wait_ready()
        running_job = server.submit(steps=16)["id"]
        queued = [server.submit(steps=1, seed=i)["id"] for i in range(4)]
        with server.client.stream("GET", f"/v1/jobs/{queued[-1]}/events") as events:
            lines = events.iter_lines()  # held: a dropped iterator closes the connection
            assert next(lines) == "event: queued"
            wait_for_step(server, running_job, 13)  # it ends early in the grace: a job could start then
            start = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            server.proc.wait(8)  # a grace of 2 s plus the workers' stop
            elapsed = time.monotonic() - start
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.stop()
    store = jobs.JobStore(data / "jobs.sqlite3")
    states = [(store.get(j).status, store.get(j).attempts) for j in queued]
    log = server.log_path.read_text(errors="replace")[-4000:]
    assert states == [(jobs.QUEUED, 0)] * 4, f"jobs started after SIGTERM: {states}\n{log}"
    assert store.get(running_job).status in (jobs.SUCCEEDED, jobs.QUEUED)
    assert elapsed < 6, elapsed


def test_serve_starts_its_workers_before_the_http_server_and_stops_them_if_it_never_starts(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers load while the UI's imports and uvicorn's start run (seconds of a restart); a server
    whose HTTP side never starts (a port taken) must not leave them behind."""
    from zturbo.cli import main as cli_main
    from zturbo.serving.service import Service

    order: list[str] = []
    monkeypatch.setattr(Service, "start", lambda self: order.append("workers started"))
    monkeypatch.setattr(Service, "stop", lambda self: order.append("workers stopped"))
    monkeypatch.setattr(StoppingServer, "run", lambda self: order.append("http server run"))  # never started
    code = cli_main(["serve", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-ui", "--device", "cpu"])
    assert code == 3  # uvicorn's status for a server that never started
    assert order == ["workers started", "http server run", "workers stopped"]


def test_service_start_and_stop_run_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`zturbo serve` starts the service before uvicorn's lifespan starts it again, and stops it
    after the lifespan did: each happens once."""
    app = in_process_app(tmp_path)
    service = app.state.service
    calls: list[str] = []
    monkeypatch.setattr(service.supervisor, "start", lambda: calls.append("start"))
    monkeypatch.setattr(service.supervisor, "stop", lambda grace: calls.append("stop"))
    service.start()
    service.start()
    service.stop()
    service.stop()
    assert calls == ["start", "stop"]


def test_a_sigterm_while_the_ui_loads_stops_the_workers_already_started(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers start before the web UI's imports (seconds) and uvicorn's signal handlers: a
    SIGTERM in that window still ends the server through its stop, not with its workers loading on."""
    import os

    from zturbo.cli import main as cli_main
    from zturbo.serving import serve
    from zturbo.serving.service import Service

    order: list[str] = []
    monkeypatch.setattr(Service, "start", lambda self: order.append("workers started"))
    monkeypatch.setattr(Service, "stop", lambda self: order.append("workers stopped"))

    def loading_the_ui(*_args: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        order.append("the UI loaded")

    monkeypatch.setattr(serve, "_http_server", loading_the_ui)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited:
        cli_main(["serve", "--model", str(tiny_dir), "--data-dir", str(tmp_path), "--no-ui", "--device", "cpu"])
    assert exited.value.code == 128 + signal.SIGTERM
    assert order == ["workers started", "workers stopped"]
    assert signal.getsignal(signal.SIGTERM) == before  # this process's handler is back


def test_one_server_per_sqlite_file_even_outside_the_data_directory(tmp_path):
    """Two servers with their own --data-dir but one --store file would both recover and run its
    jobs: the file is locked beside itself, and the second server is refused naming it."""
    from zturbo.errors import InvalidRequestError
    from zturbo.serving.serve import _lock_data_dir

    shared = tmp_path / "db" / "queue.sqlite3"
    shared.parent.mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _lock_data_dir(tmp_path / "a", str(shared))
    with pytest.raises(InvalidRequestError, match=rf"another zturbo serve is using the job database {shared}"):
        _lock_data_dir(tmp_path / "b", str(shared))
    with pytest.raises(InvalidRequestError, match=rf"another zturbo serve is using {tmp_path / 'a'}"):
        _lock_data_dir(tmp_path / "a", "sqlite")
    first.close()
    _lock_data_dir(tmp_path / "b", str(shared)).close()  # free once the first server has stopped
    with pytest.raises(InvalidRequestError, match=r"cannot make the lock file .*missing.*directory exists"):
        _lock_data_dir(tmp_path / "b", str(tmp_path / "missing" / "queue.sqlite3"))
