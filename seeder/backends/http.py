"""``http(s)://host/prefix`` origins: plain web servers that honour Range requests.

Read-only and unlistable: an HTTP server has no standard way to enumerate a prefix,
so an artifact on one is published with an explicit file list. Sizes come from HEAD
(or, if HEAD is refused, from the Content-Range of a one-byte GET).

Ranged GETs accept 206, and also 200 when its Content-Range names exactly the range
asked for. The body is copied chunk by chunk, as aiohttp's parser hands it over,
into the caller's buffer and counted as it arrives.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import quote, urlsplit

import aiohttp

from core.errors import ConfigError
from seeder.backends.common import (
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    TRANSIENT_STATUSES,
    check_range_reply,
    parse_content_range,
    parse_retry_after,
    range_header,
    transient_for_status,
)
from seeder.errors import (
    OriginError,
    OriginNotFoundError,
    OriginPermissionError,
    OriginTransientError,
    OriginUnsupportedError,
)
from seeder.origin import ObjectInfo, Origin

DEFAULT_CONNECTIONS = 64


def _status_error(what: str, resp: aiohttp.ClientResponse) -> OriginError | None:
    """The error for a non-success status, or None for 200/206."""
    status = resp.status
    if status in (200, 206):
        return None
    if status in (404, 410):
        return OriginNotFoundError(f"{what}: not found (HTTP {status})")
    if status in (401, 403):
        return OriginPermissionError(f"{what}: access denied (HTTP {status})")
    if status in TRANSIENT_STATUSES:
        retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
        return transient_for_status(what, status, resp.reason or "server error", retry_after)
    return OriginError(f"{what}: unexpected HTTP {status} {resp.reason or ''}".rstrip())


def translate_http_error(exc: Exception, what: str) -> OriginError:
    """The ``seeder.errors`` error for an aiohttp / socket exception about ``what``."""
    if isinstance(exc, aiohttp.ClientSSLError):
        return OriginError(f"{what}: TLS failure: {exc}")
    if isinstance(
        exc,
        aiohttp.ClientConnectionError
        | aiohttp.ClientPayloadError
        | asyncio.TimeoutError
        | ConnectionError,
    ):
        return OriginTransientError(f"{what}: {type(exc).__name__}: {exc}")
    return OriginError(f"{what}: {type(exc).__name__}: {exc}")


_LIBRARY_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


class HTTPOrigin(Origin):
    """Objects under an HTTP(S) URL prefix; keys are relative URL paths."""

    def __init__(self, url: str, *, max_connections: int = DEFAULT_CONNECTIONS) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"HTTP origin URL must be http(s)://host/prefix, got {url!r}")
        self.base = url.rstrip("/")
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _session_now(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, limit_per_host=self._max_connections
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT
                ),
                auto_decompress=False,
                headers={"Accept-Encoding": "identity"},
            )
        return self._session

    def _url(self, key: str) -> str:
        return f"{self.base}/{quote(key.lstrip('/'), safe='/')}" if key else self.base

    async def list(self) -> list[ObjectInfo]:
        raise OriginUnsupportedError(
            f"{self.url}: an HTTP origin can't list its objects; "
            "publish it with an explicit file list (--files)"
        )

    async def stat(self, key: str) -> ObjectInfo:
        url = self._url(key)
        self.counters.requests += 1
        try:
            async with self._session_now().head(url, allow_redirects=True) as resp:
                if resp.status not in (405, 501):
                    error = _status_error(url, resp)
                    if error is not None:
                        raise error
                    if resp.content_length is None:
                        raise OriginError(f"{url}: HEAD reply has no Content-Length")
                    return ObjectInfo(key, resp.content_length)
        except _LIBRARY_ERRORS as exc:
            raise translate_http_error(exc, url) from exc
        return await self._stat_by_get(key, url)

    async def _stat_by_get(self, key: str, url: str) -> ObjectInfo:
        """The size from a one-byte ranged GET's Content-Range, for servers refusing HEAD."""
        self.counters.requests += 1
        try:
            async with self._session_now().get(url, headers={"Range": "bytes=0-0"}) as resp:
                error = _status_error(url, resp)
                if error is not None:
                    raise error
                body = await resp.read()
                self.counters.bytes_read += len(body)
                header = resp.headers.get("Content-Range")
                parsed = parse_content_range(header) if header else None
                if parsed is not None and parsed[2] is not None:
                    return ObjectInfo(key, parsed[2])
                if resp.status == 200 and header is None:
                    return ObjectInfo(key, len(body))
                raise OriginError(f"{url}: can't tell the object's size (HEAD refused)")
        except _LIBRARY_ERRORS as exc:
            raise translate_http_error(exc, url) from exc

    async def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        length = len(buf)
        if length == 0:
            return
        url = self._url(key)
        what = f"{url} bytes {offset}-{offset + length - 1}"
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        self.counters.requests += 1
        try:
            async with self._session_now().get(
                url, headers={"Range": range_header(offset, length)}
            ) as resp:
                error = _status_error(what, resp)
                if error is not None:
                    raise error
                check_range_reply(
                    what,
                    resp.status,
                    resp.headers.get("Content-Range"),
                    resp.content_length,
                    offset,
                    length,
                )
                done = 0
                while True:
                    chunk = await resp.content.readany()
                    if not chunk:
                        break
                    end = done + len(chunk)
                    if end > length:
                        raise OriginError(f"{what}: server sent more than {length} bytes")
                    view[done:end] = chunk
                    done = end
                    self.counters.bytes_read += len(chunk)
        except _LIBRARY_ERRORS as exc:
            raise translate_http_error(exc, what) from exc
        if done != length:
            raise OriginTransientError(f"{what}: connection ended after {done} of {length} bytes")

    async def get_bytes(self, key: str) -> bytes:
        url = self._url(key)
        self.counters.requests += 1
        try:
            async with self._session_now().get(url) as resp:
                error = _status_error(url, resp)
                if error is not None:
                    raise error
                data = await resp.read()
        except _LIBRARY_ERRORS as exc:
            raise translate_http_error(exc, url) from exc
        self.counters.bytes_read += len(data)
        return data

    async def put_bytes(self, key: str, data: bytes) -> None:
        raise OriginUnsupportedError(
            f"{self.url}: HTTP origins are read-only; can't write {key!r} "
            "(keep the catalog on S3, GCS or a file:// path)"
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
