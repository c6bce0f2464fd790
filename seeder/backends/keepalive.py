"""Keep-alive ``http.client`` connections to one endpoint, for blocking calls in threads.

The S3 backend's signed requests (:mod:`seeder.backends.sigv4`) run here, on the
backend's worker threads like its boto3 calls: ``HTTPResponse.readinto`` fills the
caller's buffer straight from the socket, as boto3's path does. Measured with
``python -m benchmarks.origin_read`` (1 GiB from ``rclone serve s3`` on loopback,
2026-12-06): 1144 MB/s and 0.29 CPU-s per GiB here, 1143 MB/s and 0.38 through
boto3; an asyncio stream tried first copied each chunk twice more, 684 MB/s and
0.97 CPU-s per GiB.

A connection goes back to the pool only when its response was read to the end and
the server did not ask to close it; a request on a reused connection that the
server had closed while it idled is sent once more on a new one (safe for the GETs
and HEADs it carries). ``http.client`` bounds the status line and each header line
(64 KiB) and the header count (100).
"""

from __future__ import annotations

import http.client
import ssl
import threading
from collections.abc import Mapping
from urllib.parse import urlsplit

_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class KeepAlive:
    """Idle connections to ``base`` (``scheme://host[:port]``), at most ``max_idle``."""

    def __init__(
        self,
        base: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int = 64,
        cafile: str | None = None,
    ) -> None:
        parts = urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base!r}")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_idle = max_idle
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._tls: ssl.SSLContext | None = None
        self._cafile = cafile  # certificates to trust (AWS_CA_BUNDLE); None: the system's

    def _new(self) -> http.client.HTTPConnection:
        if self._https:
            if self._tls is None:
                self._tls = ssl.create_default_context(cafile=self._cafile)
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=self._connect_timeout, context=self._tls
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=self._connect_timeout)

    def _send(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        target: str,
        headers: Mapping[str, str],
    ) -> http.client.HTTPResponse:
        if conn.sock is None:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(self._read_timeout)
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        return conn.getresponse()

    def exchange(
        self, method: str, target: str, headers: Mapping[str, str]
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send ``method target`` (an encoded path) with ``headers`` (Host among them);
        the connection and its response, whose body is the caller's to read before
        :meth:`release`. Raises OSError or ``http.client.HTTPException``."""
        with self._lock:
            if self._closed:
                raise ConnectionError("the connections are closed")
            conn = self._idle.pop() if self._idle else None
        if conn is not None:
            try:
                return conn, self._send(conn, method, target, headers)
            except _STALE:
                conn.close()  # closed while it idled: once more, on a new connection
            except BaseException:
                conn.close()
                raise
        conn = self._new()
        try:
            return conn, self._send(conn, method, target, headers)
        except BaseException:
            conn.close()
            raise

    def release(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """Back to the pool if ``resp`` was read to its end and may be followed; else closed."""
        reusable = resp.isclosed() and not resp.will_close and conn.sock is not None
        with self._lock:
            if reusable and not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        resp.close()
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
