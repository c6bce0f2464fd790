"""The little HTTP/1.1 client a peer needs to talk to its tracker.

A peer asks its tracker for a manifest once and announces over HTTP only when UDP
can't carry the announce (TLS, or a bitfield too large for a datagram), so it needs
one request at a time, one connection each, nothing more. aiohttp's client did
this, but importing it cost every ``swarm fetch`` 0.13 CPU-s of start-up (its
connector builds a verified TLS context at import: 40 ms alone), more than the rest
of the peer's imports together; an init container pays that on every pod start.

Everything a hostile or broken server sends is bounded: the status line and each
header line (``MAX_LINE``), the number of headers (``MAX_HEADERS``), the body
(``max_body``, whether sized by Content-Length, chunked or read to the end) and
the time of the whole exchange (``timeout``). Any failure raises
:class:`HTTPClientError` with a one-line reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote, urlsplit

from multidict import CIMultiDict

MAX_LINE: Final = 64 * 1024
MAX_HEADERS: Final = 128
_USER_AGENT: Final = "swarm"


class HTTPClientError(Exception):
    """The request could not be made or its response was not valid HTTP/1.1."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: CIMultiDict[str]


@dataclass(frozen=True)
class Target:
    """Where an http(s) URL points, split as a request needs it."""

    secure: bool
    host: str
    """Lower-cased, without the brackets of an IPv6 literal, a zone id decoded
    (``fe80::1%eth0``): what to connect to."""
    port: int
    target: str
    """The request target: path and query, percent-encoded (a raw space, non-ASCII
    character or stray ``%`` is encoded; an existing escape is kept)."""
    path: str
    """The decoded path, as the server's framework sees it (what a request MAC signs)."""

    @property
    def authority(self) -> str:
        """The Host header: the port only when it is not the scheme's default."""
        host = f"[{self.host.replace('%', '%25')}]" if ":" in self.host else self.host
        default = 443 if self.secure else 80
        return host if self.port == default else f"{host}:{self.port}"


_TARGET_SAFE: Final = "/%:@!$&'()*+,;=-._~?"  # RFC 3986 pchar, '/', '?' and existing escapes
_STRAY_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _encoded(text: str) -> str:
    return _STRAY_PERCENT.sub("%25", quote(text, safe=_TARGET_SAFE))


def split_url(url: str) -> Target:
    """``url`` split for a request; HTTPClientError unless it is a valid http(s) URL.

    (urllib rather than yarl: yarl alone is 9 ms of a fetch's start-up CPU.) A path
    whose escapes are not UTF-8 is refused: the server would not decode it as
    ``unquote`` does, and the MAC over it would not match.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise HTTPClientError(f"not an http(s) URL: {url!r} ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HTTPClientError(f"not an http(s) URL: {url!r}")
    secure = parts.scheme == "https"
    raw_path = _encoded(parts.path or "/")
    try:
        path = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise HTTPClientError(f"the path of {url!r} holds escapes that are not UTF-8") from None
    target = raw_path + ("?" + _encoded(parts.query) if parts.query else "")
    host = parts.hostname.replace("%25", "%", 1)  # an IPv6 zone id, as getaddrinfo wants it
    return Target(secure, host, port or (443 if secure else 80), target, path)


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
    target = split_url(url)
    try:
        async with asyncio.timeout(timeout):
            return await _exchange(method, target, body, headers or {}, max_body, tls)
    except TimeoutError:
        raise HTTPClientError(f"no complete answer within {timeout:g} s") from None


async def _exchange(
    method: str,
    target: Target,
    body: bytes,
    headers: dict[str, str],
    max_body: int,
    tls: ssl.SSLContext | None,
) -> Response:
    host, port, secure = target.host, target.port, target.secure
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
        lines = [
            f"{method} {target.target} HTTP/1.1",
            f"Host: {target.authority}",
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
