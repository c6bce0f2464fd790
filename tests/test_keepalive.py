"""``seeder.backends.keepalive``: connections reused, and sent anew when one died idle.

Against ``http.server`` on loopback speaking HTTP/1.1 (the S3 round trips, errors and
cut bodies through this pool are in ``tests/test_origins.py``, backend ``s3``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from seeder.backends.keepalive import KeepAlive


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: ClassVar[list[int]] = []
    close_quietly = False  # close after each answer without saying so

    def setup(self) -> None:
        super().setup()
        type(self).connections.append(1)

    def do_GET(self) -> None:
        body = self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        if type(self).close_quietly:
            self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"connections": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def _get(pool: KeepAlive, base: str, path: str) -> bytes:
    conn, resp = pool.exchange("GET", path, {"Host": base.removeprefix("http://")})
    try:
        return resp.read()
    finally:
        pool.release(conn, resp)


def test_answers_read_to_the_end_leave_their_connection_for_the_next(
    server: tuple[str, type[_Handler]],
) -> None:
    base, handler = server
    pool = KeepAlive(base, connect_timeout=5, read_timeout=5)
    assert [_get(pool, base, f"/k{i}") for i in range(3)] == [b"/k0", b"/k1", b"/k2"]
    assert len(handler.connections) == 1
    # An answer left unread closes its connection rather than going back.
    conn, resp = pool.exchange("GET", "/unread", {"Host": base.removeprefix("http://")})
    pool.release(conn, resp)
    assert _get(pool, base, "/after") == b"/after"
    assert len(handler.connections) == 2
    pool.close()


def test_a_connection_the_server_closed_while_idle_is_replaced(
    server: tuple[str, type[_Handler]],
) -> None:
    base, handler = server
    handler.close_quietly = True
    pool = KeepAlive(base, connect_timeout=5, read_timeout=5)
    assert [_get(pool, base, f"/k{i}") for i in range(3)] == [b"/k0", b"/k1", b"/k2"]
    assert len(handler.connections) == 3
    pool.close()
    with pytest.raises(ConnectionError):
        pool.exchange("GET", "/late", {"Host": "x"})
