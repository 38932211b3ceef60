"""An unexpected error (500) on a live uvicorn, in this process: the connection it came on is closed
properly, so a client's next request on it is not reset."""

from __future__ import annotations

import http.client
import socket
import threading
import time

import uvicorn

from serving import in_process_app


def test_a_500_closes_its_keep_alive_connection_cleanly(tmp_path):
    app = in_process_app(tmp_path)

    def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/v1/boom", boom)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not server.started and time.monotonic() < deadline:
                time.sleep(0.01)
            conn = http.client.HTTPConnection(*sock.getsockname(), timeout=10)
            conn.request("GET", "/v1/boom")
            first = conn.getresponse()
            assert first.status == 500 and b"internal_error" in first.read()
            assert first.getheader("connection") == "close"  # said, so the client opens a new one
            conn.request("GET", "/health")  # http.client reconnects after a close; never a reset
            assert conn.getresponse().status == 200
            conn.close()
        finally:
            server.should_exit = True
            thread.join(10)
