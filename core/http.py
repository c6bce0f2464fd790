"""The little HTTP/1.1 client a peer needs: its tracker, and an S3-compatible origin.

A peer asks its tracker for a manifest once and announces over HTTP only when UDP
can't carry the announce (TLS, or a bitfield too large for a datagram), so it needs
one request at a time, one connection each, nothing more: :func:`request`. Its
origin reads are ranged GETs whose bodies go straight into the piece buffer as they
arrive, over connections kept alive between them: :class:`Connections`. aiohttp's
client did both, but importing it cost every ``swarm fetch`` 0.13 CPU-s of start-up
(its connector builds a verified TLS context at import: 40 ms alone), more than the
rest of the peer's imports together; an init container pays that on every pod start.

Everything a hostile or broken server sends is bounded: the status line and each
header line (``MAX_LINE``), the number of headers (``MAX_HEADERS``), the body
(``max_body``, whether sized by Content-Length, chunked or read to the end) and
the time of the whole exchange (``timeout``). Any failure raises
:class:`HTTPClientError` with a one-line reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import yarl
from multidict import CIMultiDict

MAX_LINE: Final = 64 * 1024
MAX_HEADERS: Final = 128
_USER_AGENT: Final = "swarm"


class HTTPClientError(Exception):
    """The request could not be made or its response was not valid HTTP/1.1."""


class HTTPTLSError(HTTPClientError):
    """The TLS handshake failed (an untrusted or mismatched certificate, say): no retry helps."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: CIMultiDict[str]


_DEFAULT_TLS: ssl.SSLContext | None = None


def default_tls() -> ssl.SSLContext:
    """The system's CA store, loaded once, and only when an https:// URL needs it."""
    global _DEFAULT_TLS
    if _DEFAULT_TLS is None:
        _DEFAULT_TLS = ssl.create_default_context()
    return _DEFAULT_TLS


async def request(
    method: str,
    url: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float,
    max_body: int,
    tls: ssl.SSLContext | None = None,
) -> Response:
    """One request on a connection of its own; the whole response, read within ``timeout``.

    ``tls``: the context for an https:// URL (default: the system's CA store).
    """
    target = yarl.URL(url)
    if target.scheme not in ("http", "https") or not target.host:
        raise HTTPClientError(f"not an http(s) URL: {url!r}")
    secure = target.scheme == "https"
    port = target.port or (443 if secure else 80)
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(method, target, port, secure, body, headers or {}, max_body, tls)
    except TimeoutError:
        raise HTTPClientError(f"no complete answer within {timeout:g} s") from None


async def _exchange(
    method: str,
    target: yarl.URL,
    port: int,
    secure: bool,
    body: bytes,
    headers: dict[str, str],
    max_body: int,
    tls: ssl.SSLContext | None,
) -> Response:
    host = target.host or ""
    try:
        reader, writer = await asyncio.open_connection(
            host,
            port,
            ssl=(tls or default_tls()) if secure else None,
            server_hostname=host if secure else None,
            limit=MAX_LINE,
        )
    except (OSError, ssl.SSLError) as exc:
        raise HTTPClientError(str(exc) or type(exc).__name__) from exc
    try:
        default_port = 443 if secure else 80
        authority = host if ":" not in host else f"[{host}]"
        if port != default_port:
            authority = f"{authority}:{port}"
        lines = [
            f"{method} {target.raw_path_qs or '/'} HTTP/1.1",
            f"Host: {authority}",
            f"User-Agent: {_USER_AGENT}",
            "Connection: close",
            f"Content-Length: {len(body)}",
            *(f"{name}: {value}" for name, value in headers.items()),
        ]
        for line in lines:
            if "\r" in line or "\n" in line:
                raise HTTPClientError(f"a request header holds a line break: {line[:80]!r}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        status = await _status(reader)
        received = await _headers(reader)
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            data = b""
        else:
            data = await _body(reader, received, max_body)
        return Response(status, data, received)
    except asyncio.IncompleteReadError as exc:
        raise HTTPClientError("the server closed the connection mid-response") from exc
    except (OSError, ssl.SSLError) as exc:
        raise HTTPClientError(str(exc) or type(exc).__name__) from exc
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise HTTPClientError(f"a response line longer than {MAX_LINE} bytes") from None
    except asyncio.IncompleteReadError as exc:
        raise HTTPClientError("the server closed the connection mid-response") from exc
    return line.rstrip(b"\r\n")


async def _status(reader: asyncio.StreamReader) -> int:
    line = await _line(reader)
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HTTPClientError(f"not an HTTP/1.x status line: {line[:80]!r}")
    status = int(parts[1])
    if not 100 <= status <= 599:
        raise HTTPClientError(f"status {status} is out of range")
    return status


async def _headers(reader: asyncio.StreamReader) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    while True:
        line = await _line(reader)
        if not line:
            return headers
        if len(headers) >= MAX_HEADERS:
            raise HTTPClientError(f"more than {MAX_HEADERS} response headers")
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise HTTPClientError(f"a malformed response header: {line[:80]!r}")
        headers.add(name.decode("latin-1"), value.strip().decode("latin-1"))


async def _body(reader: asyncio.StreamReader, headers: CIMultiDict[str], max_body: int) -> bytes:
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        return await _chunked(reader, max_body)
    length = headers.get("Content-Length")
    if length is not None:
        if not length.isdigit():
            raise HTTPClientError(f"a bad Content-Length: {length[:40]!r}")
        size = int(length)
        if size > max_body:
            raise HTTPClientError(f"a body of {size} bytes, more than the {max_body} allowed")
        return await reader.readexactly(size)
    data = await reader.read(max_body + 1)
    while data and len(data) <= max_body:
        more = await reader.read(max_body + 1 - len(data))
        if not more:
            break
        data += more
    if len(data) > max_body:
        raise HTTPClientError(f"a body of more than the {max_body} bytes allowed")
    return data


async def _chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        line = await _line(reader)
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HTTPClientError(f"a bad chunk size: {line[:40]!r}") from None
        if size < 0:
            raise HTTPClientError(f"a bad chunk size: {line[:40]!r}")
        if size == 0:
            while await _line(reader):  # trailers, then the blank line
                pass
            return b"".join(parts)
        total += size
        if total > max_body:
            raise HTTPClientError(f"a body of more than the {max_body} bytes allowed")
        parts.append(await reader.readexactly(size))
        if await reader.readexactly(2) != b"\r\n":
            raise HTTPClientError("a chunk not followed by CRLF")


READ_CHUNK: Final = 1024 * 1024
"""The most :meth:`Answer.read_into` takes from the socket's buffer at a time."""


class Answer:
    """The status and headers of one exchange on a :class:`Connections` connection; its
    body is read with :meth:`read` or :meth:`read_into`, each bounded."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        status: int,
        headers: CIMultiDict[str],
        *,
        has_body: bool,
        read_timeout: float,
    ) -> None:
        self.status = status
        self.headers = headers
        self._reader = reader
        self._timeout = read_timeout
        self._chunked = has_body and "chunked" in headers.get("Transfer-Encoding", "").lower()
        length = headers.get("Content-Length")
        if has_body and not self._chunked and length is not None and not length.isdigit():
            raise HTTPClientError(f"a bad Content-Length: {length[:40]!r}")
        self._left: int | None = (
            0 if not has_body else None if self._chunked or length is None else int(length)
        )
        self._chunk_left = 0  # of the current chunk, when chunked
        self.complete = self._left == 0
        """Whether the whole body has been read (the connection can carry another request)."""
        self.keep_alive = headers.get("Connection", "").lower() != "close" and (
            self._chunked or self._left is not None
        )

    @property
    def content_length(self) -> int | None:
        length = self.headers.get("Content-Length")
        return int(length) if length is not None and length.isdigit() else None

    async def _next(self, most: int) -> bytes:
        """Up to ``most`` (>= 1) more bytes of the body; b"" once it is all read."""
        if self.complete:
            return b""
        try:
            async with asyncio.timeout(self._timeout):
                return await self._take(most)
        except TimeoutError:
            raise HTTPClientError(f"no data for {self._timeout:g} s") from None
        except asyncio.IncompleteReadError as exc:
            raise HTTPClientError("the server closed the connection mid-body") from exc
        except (OSError, ssl.SSLError) as exc:
            raise HTTPClientError(str(exc) or type(exc).__name__) from exc

    async def _take(self, most: int) -> bytes:
        reader = self._reader
        if self._chunked:
            if self._chunk_left == 0:
                size = await self._chunk_size()
                if size == 0:
                    while await _line(reader):  # trailers, then the blank line
                        pass
                    self.complete = True
                    return b""
                self._chunk_left = size
            data = await reader.read(min(most, self._chunk_left))
            if not data:
                raise HTTPClientError("the server closed the connection mid-body")
            self._chunk_left -= len(data)
            if self._chunk_left == 0 and await reader.readexactly(2) != b"\r\n":
                raise HTTPClientError("a chunk not followed by CRLF")
            return data
        if self._left is None:  # the body runs to the end of the connection
            data = await reader.read(most)
            if not data:
                self.complete = True
            return data
        data = await reader.read(min(most, self._left))
        if not data:
            raise HTTPClientError(
                f"the server closed the connection with {self._left} bytes of the body unsent"
            )
        self._left -= len(data)
        self.complete = self._left == 0
        return data

    async def _chunk_size(self) -> int:
        line = await _line(self._reader)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise HTTPClientError(f"a bad chunk size: {line[:40]!r}") from None
        if size < 0:
            raise HTTPClientError(f"a bad chunk size: {line[:40]!r}")
        return size

    async def read(self, max_body: int) -> bytes:
        """The rest of the body; more than ``max_body`` bytes of it is an error."""
        parts: list[bytes] = []
        total = 0
        while data := await self._next(min(READ_CHUNK, max_body + 1 - total)):
            total += len(data)
            if total > max_body:
                raise HTTPClientError(f"a body of more than the {max_body} bytes allowed")
            parts.append(data)
        return b"".join(parts)

    async def read_into(self, view: memoryview, on_bytes: Callable[[int], None]) -> int:
        """The rest of the body into ``view`` (bytes), calling ``on_bytes(n)`` as each ``n``
        arrive; returns how many. A body longer than ``view`` is an error."""
        done = 0
        size = len(view)
        while data := await self._next(min(READ_CHUNK, size + 1 - done)):
            end = done + len(data)
            if end > size:
                raise HTTPClientError(f"the server sent more than the {size} bytes asked for")
            view[done:end] = data
            done = end
            on_bytes(len(data))
        return done


@dataclass(slots=True)
class _Link:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class Connections:
    """Keep-alive HTTP/1.1 connections to one server (``scheme://host[:port]``).

    Each :meth:`request` takes an idle connection (or opens one), and gives it back
    only when its answer was read to the end and the server did not ask to close;
    anything else (an error, a body left unread, a cancelled read) closes it. A
    request on a reused connection that the server had closed while it idled is
    sent once more on a new one, which is safe for the GETs and HEADs this is for.
    At most ``max_idle`` connections wait idle; there is no cap on those in use
    (the caller bounds its concurrency).
    """

    def __init__(
        self,
        base: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_idle: int = 64,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        target = yarl.URL(base)
        if target.scheme not in ("http", "https") or not target.host:
            raise HTTPClientError(f"not an http(s) URL: {base!r}")
        self._secure = target.scheme == "https"
        self._host = target.host
        self._port = target.port or (443 if self._secure else 80)
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_idle = max_idle
        self._idle: list[_Link] = []
        self._closed = False

    async def _open(self) -> _Link:
        if self._closed:
            raise HTTPClientError("the connections are closed")
        try:
            async with asyncio.timeout(self._connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self._host,
                    self._port,
                    ssl=(self._tls or default_tls()) if self._secure else None,
                    server_hostname=self._host if self._secure else None,
                    limit=MAX_LINE,
                )
        except TimeoutError:
            raise HTTPClientError(
                f"no connection to {self._host}:{self._port} within {self._connect_timeout:g} s"
            ) from None
        except ssl.SSLError as exc:
            raise HTTPTLSError(f"TLS with {self._host}:{self._port} failed: {exc}") from exc
        except OSError as exc:
            raise HTTPClientError(str(exc) or type(exc).__name__) from exc
        return _Link(reader, writer)

    def _drop(self, link: _Link) -> None:
        link.writer.close()

    def _give_back(self, link: _Link) -> None:
        if self._closed or len(self._idle) >= self._max_idle or link.reader.at_eof():
            self._drop(link)
        else:
            self._idle.append(link)

    async def _send(
        self, link: _Link, method: str, target: str, headers: Mapping[str, str]
    ) -> Answer:
        lines = [f"{method} {target} HTTP/1.1"]
        if not any(name.lower() == "host" for name in headers):
            authority = self._host if ":" not in self._host else f"[{self._host}]"
            if self._port != (443 if self._secure else 80):
                authority = f"{authority}:{self._port}"
            lines.append(f"Host: {authority}")
        lines.append(f"User-Agent: {_USER_AGENT}")
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        for line in lines:
            if "\r" in line or "\n" in line:
                raise HTTPClientError(f"a request header holds a line break: {line[:80]!r}")
        link.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        try:
            async with asyncio.timeout(self._read_timeout):
                await link.writer.drain()
                status = await _status(link.reader)
                received = await _headers(link.reader)
        except TimeoutError:
            raise HTTPClientError(f"no answer within {self._read_timeout:g} s") from None
        except asyncio.IncompleteReadError as exc:
            raise HTTPClientError("the server closed the connection mid-response") from exc
        except (OSError, ssl.SSLError) as exc:
            raise HTTPClientError(str(exc) or type(exc).__name__) from exc
        has_body = not (method == "HEAD" or status in (204, 304) or 100 <= status < 200)
        return Answer(
            link.reader, status, received, has_body=has_body, read_timeout=self._read_timeout
        )

    @contextlib.asynccontextmanager
    async def request(
        self, method: str, target: str, headers: Mapping[str, str]
    ) -> AsyncIterator[Answer]:
        """Send ``method target`` (an encoded path and query) with ``headers``; the answer's
        status and headers are in, its body is the caller's to read."""
        link: _Link | None = None
        try:
            while self._idle and link is None:
                link = self._idle.pop()
                if link.reader.at_eof():  # the server closed it while it idled
                    self._drop(link)
                    link = None
            if link is not None:
                try:
                    answer = await self._send(link, method, target, headers)
                except HTTPClientError:
                    self._drop(link)  # closed as we sent, most likely: once more, anew
                    link = None
            if link is None:
                link = await self._open()
                answer = await self._send(link, method, target, headers)
            yield answer
        except BaseException:
            if link is not None:
                self._drop(link)
            raise
        if answer.complete and answer.keep_alive:
            self._give_back(link)
        else:
            self._drop(link)

    async def close(self) -> None:
        """Close the idle connections; those in use close as their requests end."""
        self._closed = True
        idle, self._idle = self._idle, []
        for link in idle:
            link.writer.close()
        for link in idle:
            with contextlib.suppress(OSError, ssl.SSLError):
                await link.writer.wait_closed()
