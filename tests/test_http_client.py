"""``swarm.http``: the tracker client's HTTP/1.1, against real loopback servers that
answer well, oddly and with hostility. Every bound a server could push on (line
length, header count, body size, time) ends in one ``HTTPClientError``.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import pytest

from swarm.http import MAX_HEADERS, MAX_LINE, HTTPClientError, Response, request, split_url

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, str]:
    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def _read_request(reader: asyncio.StreamReader) -> tuple[list[bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")[:-2]
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return lines, await reader.readexactly(length)


def _run(
    handler: Handler,
    path: str = "/x",
    *,
    method: str = "GET",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> Response:
    async def go() -> Response:
        server, base = await _serve(handler)
        try:
            return await request(
                method, base + path, body=body, headers=headers, timeout=timeout, max_body=1 << 20
            )
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(go())


def test_a_request_goes_out_whole_and_its_answer_comes_back() -> None:
    seen: dict[str, object] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines, body = await _read_request(reader)
        seen["lines"], seen["body"] = lines, body
        writer.write(b"HTTP/1.1 201 Created\r\nX-Mac: abc\r\nContent-Length: 5\r\n\r\nhello")
        await writer.drain()

    resp = _run(
        handler, "/v1/manifest/m@ab%20c?q=1", method="POST", body=b"xyz", headers={"X-Auth": "t"}
    )
    assert resp.status == 201 and resp.body == b"hello"
    assert resp.headers["x-mac"] == "abc"  # names: any case
    lines = seen["lines"]
    assert isinstance(lines, list)
    assert lines[0] == b"POST /v1/manifest/m@ab%20c?q=1 HTTP/1.1"
    assert b"Content-Length: 3" in lines and b"X-Auth: t" in lines and b"Connection: close" in lines
    assert any(line.startswith(b"Host: 127.0.0.1:") for line in lines)
    assert seen["body"] == b"xyz"


def test_chunked_and_read_to_the_end_bodies() -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n"
        )
        await writer.drain()

    async def to_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + b"z" * 70_000)
        await writer.drain()

    assert _run(chunked).body == b"abcde"
    assert _run(to_eof).body == b"z" * 70_000


def _answer(raw: bytes) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(raw)
        await writer.drain()

    return handler


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2000000\r\n\r\n", "more than the"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100001\r\n" + b"a" * 100,
            "more than the",
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"a" * ((1 << 20) + 10), "more than the"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * (MAX_HEADERS + 1) + b"\r\n", "headers"),
        (b"HTTP/1.1 200 OK\r\nX-A: " + b"b" * (MAX_LINE + 10) + b"\r\n\r\n", "longer than"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "status line"),
        (b"HTTP/1.1 999 Nope\r\n\r\n", "out of range"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "closed"),
    ],
)
def test_a_hostile_or_broken_answer_is_one_clear_error(raw: bytes, why: str) -> None:
    with pytest.raises(HTTPClientError, match=why):
        _run(_answer(raw))


def test_a_server_that_never_answers_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")  # and then nothing
        await writer.drain()
        await asyncio.sleep(5)

    with pytest.raises(HTTPClientError, match=r"within 0\.3 s"):
        _run(silent, timeout=0.3)


def test_nobody_listening_and_bad_urls_are_errors_too() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
    with pytest.raises(HTTPClientError):
        asyncio.run(request("GET", f"http://127.0.0.1:{port}/", timeout=2, max_body=10))
    with pytest.raises(HTTPClientError, match="not an http"):
        asyncio.run(request("GET", "ftp://127.0.0.1/", timeout=2, max_body=10))
    with pytest.raises(HTTPClientError, match="line break"):
        asyncio.run(
            _with_server(
                lambda base: request(
                    "GET", base + "/", headers={"X": "a\r\nInjected: 1"}, timeout=2, max_body=10
                )
            )
        )


async def _with_server(call: Callable[[str], Awaitable[object]]) -> object:
    server, base = await _serve(_answer(b"HTTP/1.1 204 No Content\r\n\r\n"))
    try:
        return await call(base)
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:7070/v1/announce",
        "http://TRACKER.example:80/v1/manifest/kimi-k2@" + "ab" * 32,
        "https://tracker.swarm.svc/v1/swarms?name=a%20b&x=1",
        "http://[fd00::1]:7070/v1/manifest/a%2Fb",
        "http://h/a b/ü?q=ü&v=%20",
        "http://h",
        "https://h:8443/p;x=1/~u/(c)",
        "http://h/a%zz/b%2",
        "http://[fe80::1%25lo]:7070/v1/announce",
    ],
)
def test_urls_split_as_the_trackers_framework_reads_them(url: str) -> None:
    # The tracker (aiohttp) checks a request's MAC over the path yarl decodes; the
    # client signs split_url's path, so the two must agree on every URL a client sends.
    yarl = pytest.importorskip("yarl")
    ours = split_url(url)
    theirs = yarl.URL(url)
    assert (ours.secure, ours.host, ours.port) == (
        theirs.scheme == "https",
        theirs.host,
        theirs.port,
    )
    assert ours.target == theirs.raw_path_qs
    assert ours.path == theirs.path
    sent = yarl.URL.build(scheme="http", host="h", encoded=True, path=ours.target.split("?")[0])
    assert sent.path == ours.path


@pytest.mark.parametrize("url", ["ftp://h/", "http:///x", "http://h:99999/", "http://h:x/", "h/x"])
def test_what_is_not_an_http_url_is_refused_before_any_connection(url: str) -> None:
    with pytest.raises(HTTPClientError, match="not an http"):
        split_url(url)


def test_a_path_whose_escapes_are_not_utf8_is_refused() -> None:
    # unquote would sign U+FFFD where the tracker's framework keeps %FF: a MAC that
    # could never match, so the client says why instead of collecting 401s.
    with pytest.raises(HTTPClientError, match="not UTF-8"):
        split_url("http://h/a%FFb")


def test_an_ipv6_zone_id_is_decoded_to_connect_and_encoded_in_the_host_header() -> None:
    target = split_url("http://[fe80::1%25eth0]:7070/x")
    assert target.host == "fe80::1%eth0"
    assert target.authority == "[fe80::1%25eth0]:7070"
    assert split_url("https://[::1]/").authority == "[::1]"
    assert split_url("http://H:80/").authority == "h"
