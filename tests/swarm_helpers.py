"""Helpers for multi-process swarm runs on loopback (``tests/test_swarm_e2e.py``,
``tests/test_fault_matrix.py``).

- ``HTTPMeter``: sans-I/O accounting of one HTTP/1.1 connection as a relay sees it
  (requests from the client, responses from the server): which objects and byte
  ranges were asked for, and how many *body* bytes each response carried, so that
  origin bytes are counted at the origin's side, headers excluded.
- ``ByteCountingRelay``: an asyncio TCP relay on 127.0.0.1, on its own thread, in
  front of an upstream server. It counts every byte in both directions, meters the
  HTTP inside, and can hold every connection at a gate (opened by the test) and
  limit each connection's server→client rate.
- ``TrackerProcess`` / ``FetchProcess``: ``swarm tracker`` and ``swarm fetch`` as real
  subprocesses with their output in log files, bounded waits, SIGKILL; a fetch's
  peak RSS is followed from /proc while it runs.
- ``wait_until``: a polling loop bounded in time, failing with a description.
- ``make_model`` / ``publish_model``: a seeded synthetic artifact published to an S3 bucket.
- ``SwarmLab`` / ``Swarm``: a tracker, the relay(s) in front of the origin and the peers
  of one run, and ``assert_finished``, the check every live node of a run must pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TypeVar

from servers import LOOPBACK, S3Server, free_port, populate, venv_binary

from core.auth import ClusterKey
from seeder.publish import publish

STOP_TIMEOUT = 5.0
READY_TIMEOUT = 20.0
RSS_INTERVAL = 0.05
_VMHWM = re.compile(r"^VmHWM:\s+(\d+) kB$", re.MULTILINE)
STATE_DIR = ".swarm"
COMPLETE_MARKER = ".swarm-complete"

# Variables from a developer's shell that would change what the CLI does.
_SCRUBBED_ENV = (
    "SWARM_CATALOG",
    "SWARM_TRACKER",
    "SWARM_ADVERTISE",
    "SWARM_TOKEN",
    "COLUMNS",
    "LINES",
)


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds saying ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------
# HTTP accounting
# --------------------------------------------------------------------------------------

_MAX_HEAD = 64 * 1024
_RANGE = re.compile(r"bytes=(\d+)-(\d+)$")


class MeterError(Exception):
    """The bytes through the relay are not HTTP/1.1 this meter understands."""


@dataclass
class Exchange:
    """One request and (once it arrived) its response."""

    method: str
    target: str
    range: tuple[int, int] | None
    status: int | None = None
    body_bytes: int = 0
    complete: bool = False

    @property
    def key(self) -> str:
        """The object key of a path-style S3 request (``/bucket/key`` → ``bucket/key``)."""
        return urllib.parse.unquote(urllib.parse.urlsplit(self.target).path).lstrip("/")


def _parse_head(raw: bytes) -> tuple[str, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise MeterError(f"malformed header line {line!r}")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


class _Body:
    """Counts one message body: a known length, chunked, or up to the close."""

    def __init__(self, length: int | None, chunked: bool) -> None:
        self.remaining = length
        self.chunked = chunked
        self.chunk_state = "size"  # size | data | crlf | trailer
        self.line = bytearray()
        self.done = length == 0 and not chunked

    def feed(self, data: memoryview) -> tuple[int, int]:
        """Consume from ``data``: (bytes consumed, of them body payload bytes)."""
        if not self.chunked:
            if self.remaining is None:  # until the connection closes
                return len(data), len(data)
            n = min(self.remaining, len(data))
            self.remaining -= n
            self.done = self.remaining == 0
            return n, n
        used = payload = 0
        while used < len(data) and not self.done:
            if self.chunk_state == "data":
                assert self.remaining is not None
                n = min(self.remaining, len(data) - used)
                used += n
                payload += n
                self.remaining -= n
                if self.remaining == 0:
                    self.chunk_state = "crlf"
                continue
            byte = data[used]
            used += 1
            self.line.append(byte)
            if len(self.line) > 4096:
                raise MeterError("chunk-size or trailer line too long")
            if not self.line.endswith(b"\r\n"):
                continue
            line = bytes(self.line[:-2])
            self.line.clear()
            if self.chunk_state == "crlf":
                if line:
                    raise MeterError("chunk data not followed by CRLF")
                self.chunk_state = "size"
            elif self.chunk_state == "size":
                size = int(line.split(b";", 1)[0].strip() or b"x", 16)
                self.remaining = size
                self.chunk_state = "data" if size else "trailer"
            elif not line:  # the empty line that ends the trailer
                self.done = True
        return used, payload


class HTTPMeter:
    """What went over one HTTP/1.1 connection, fed the bytes of each direction in order."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self._waiting: deque[Exchange] = deque()  # requests still owed a response
        self._req_head = bytearray()
        self._req_body: _Body | None = None
        self._resp_head = bytearray()
        self._resp_body: _Body | None = None
        self._resp_exchange: Exchange | None = None

    def client_data(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._req_body is not None:
                used, _ = self._req_body.feed(view)
                view = view[used:]
                if self._req_body.done:
                    self._req_body = None
                continue
            rest = self._take_head(self._req_head, view)
            if rest is None:
                return
            view = rest
            line, headers = _parse_head(bytes(self._req_head[:-4]))
            self._req_head.clear()
            parts = line.split(" ")
            if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
                raise MeterError(f"not an HTTP/1.x request line: {line!r}")
            match = _RANGE.match(headers.get("range", ""))
            span = (int(match[1]), int(match[2])) if match else None
            exchange = Exchange(parts[0], parts[1], span)
            self.exchanges.append(exchange)
            self._waiting.append(exchange)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._req_body = _Body(None, chunked=True)
            elif int(headers.get("content-length", "0")) > 0:
                self._req_body = _Body(int(headers["content-length"]), chunked=False)

    def server_data(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._resp_body is not None:
                assert self._resp_exchange is not None
                used, payload = self._resp_body.feed(view)
                self._resp_exchange.body_bytes += payload
                view = view[used:]
                if self._resp_body.done:
                    self._resp_exchange.complete = True
                    self._resp_body = self._resp_exchange = None
                continue
            rest = self._take_head(self._resp_head, view)
            if rest is None:
                return
            view = rest
            line, headers = _parse_head(bytes(self._resp_head[:-4]))
            self._resp_head.clear()
            parts = line.split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise MeterError(f"not an HTTP/1.x status line: {line!r}")
            status = int(parts[1])
            if 100 <= status < 200:
                continue  # interim response; the final one follows
            if not self._waiting:
                raise MeterError(f"response {status} without a request")
            exchange = self._waiting.popleft()
            exchange.status = status
            if exchange.method == "HEAD" or status in (204, 304):
                body = _Body(0, chunked=False)
            elif "chunked" in headers.get("transfer-encoding", "").lower():
                body = _Body(None, chunked=True)
            elif "content-length" in headers:
                body = _Body(int(headers["content-length"]), chunked=False)
            else:
                body = _Body(None, chunked=False)
            if body.done:
                exchange.complete = True
            else:
                self._resp_body, self._resp_exchange = body, exchange

    @staticmethod
    def _take_head(head: bytearray, view: memoryview) -> memoryview | None:
        """Move bytes into ``head`` up to its blank line; the rest of ``view``, or None if short."""
        start = max(0, len(head) - 3)
        head += view
        end = head.find(b"\r\n\r\n", start)
        if end < 0:
            if len(head) > _MAX_HEAD:
                raise MeterError(f"message head longer than {_MAX_HEAD} bytes")
            return None
        extra = len(head) - (end + 4)
        del head[end + 4 :]
        return view[len(view) - extra :]


# --------------------------------------------------------------------------------------
# The relay
# --------------------------------------------------------------------------------------


class ByteCountingRelay:
    """A TCP relay on 127.0.0.1 in front of ``upstream`` (``http://host:port``) on its own thread.

    ``server_bytes`` / ``client_bytes`` count every byte relayed in each direction;
    ``exchanges()`` lists the HTTP requests and how many body bytes each response
    carried. With ``gated=True`` every connection waits (before anything reaches the
    upstream) until ``open_gate()``. ``rate`` caps each connection's server→client
    bytes per second.
    """

    CHUNK = 64 * 1024

    def __init__(self, upstream: str, *, gated: bool = False, rate: float | None = None) -> None:
        parts = urllib.parse.urlsplit(upstream)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"upstream must be http://HOST:PORT, got {upstream!r}")
        self.upstream = (parts.hostname, parts.port)
        self.rate = rate
        self.port = 0
        self.server_bytes = 0
        self.client_bytes = 0
        self.connections = 0
        self.errors: list[str] = []
        self._gated = gated
        self._meters: list[HTTPMeter] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._gate: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def exchanges(self) -> list[Exchange]:
        with self._lock:
            return [e for meter in self._meters for e in meter.exchanges]

    def body_bytes(self) -> int:
        """Response body bytes the upstream sent through the relay."""
        return sum(e.body_bytes for e in self.exchanges())

    def open_gate(self) -> None:
        loop, gate = self._loop, self._gate
        assert loop is not None and gate is not None, "relay not started"
        loop.call_soon_threadsafe(gate.set)

    # --- relaying ------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None and self._gate is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        meter = HTTPMeter()
        with self._lock:
            self._meters.append(meter)
            self.connections += 1
        up_writer: asyncio.StreamWriter | None = None
        try:
            await self._gate.wait()
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(reader, up_writer, meter, to_server=True))
                group.create_task(self._pump(up_reader, writer, meter, to_server=False))
        except* (OSError, asyncio.IncompleteReadError):
            pass  # one side went away (e.g. a SIGKILLed peer): the connection is over
        except* MeterError as group:
            self.errors.extend(str(exc) for exc in group.exceptions)
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
            self._tasks.discard(task)  # type: ignore[arg-type]

    async def _pump(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        meter: HTTPMeter,
        *,
        to_server: bool,
    ) -> None:
        paced_until = time.monotonic()
        while True:
            data = await src.read(self.CHUNK)
            if not data:
                with contextlib.suppress(OSError):
                    if dst.can_write_eof():
                        dst.write_eof()
                return
            with self._lock:
                if to_server:
                    self.client_bytes += len(data)
                    meter.client_data(data)
                else:
                    self.server_bytes += len(data)
                    meter.server_data(data)
            dst.write(data)
            await dst.drain()
            if not to_server and self.rate:
                # Pace each chunk; an idle connection earns no credit for a later burst.
                now = time.monotonic()
                paced_until = max(paced_until, now) + len(data) / self.rate
                await asyncio.sleep(paced_until - now)

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        async def listen() -> None:
            self._gate = asyncio.Event()
            if not self._gated:
                self._gate.set()
            self._server = await asyncio.start_server(self._serve, LOOPBACK, 0)
            self.port = int(self._server.sockets[0].getsockname()[1])

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(listen())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="byte-counting-relay", daemon=True)
        self._thread.start()
        if not ready.wait(READY_TIMEOUT) or failure:
            raise RuntimeError(f"relay failed to start: {failure[0]!r}" if failure else "relay")

    def stop(self) -> None:
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()
            for _ in range(3):  # let closed transports release their sockets
                await asyncio.sleep(0.01)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(STOP_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(STOP_TIMEOUT)
            if not thread.is_alive():
                loop.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


def cli_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without swarm's own variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env.update(extra)
    return env


class _Process:
    """A ``swarm`` subprocess with stdout and stderr in files (no pipe to fill up)."""

    def __init__(self, args: list[str], env: Mapping[str, str], logs: Path, name: str) -> None:
        self.args = args
        self.env = cli_env(env)
        self.name = name
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path = logs / f"{name}.stdout"
        self.stderr_path = logs / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                [venv_binary("swarm"), *self.args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_tail(self, limit: int = 3000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within ``STOP_TIMEOUT``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()


class TrackerProcess(_Process):
    """``swarm tracker`` on a fixed loopback port (so it can be restarted on the same one).

    With ``token`` (the cluster token it was given), ``get`` proves it on every request.
    """

    def __init__(
        self,
        catalog: str,
        env: Mapping[str, str],
        logs: Path,
        *,
        announce_interval: float,
        peer_ttl: float,
        stall_timeout: float,
        port: int | None = None,
        extra: Iterable[str] = (),
        token: bytes | None = None,
    ) -> None:
        self.port = port or free_port()
        self.token = token
        self._last_ts = 0
        super().__init__(
            [
                "tracker",
                "--listen",
                f"{LOOPBACK}:{self.port}",
                "--catalog",
                catalog,
                "--announce-interval",
                str(announce_interval),
                "--peer-ttl",
                str(peer_ttl),
                "--stall-timeout",
                str(stall_timeout),
                *extra,
            ],
            env,
            logs,
            "tracker",
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, headers=self._auth_headers(path))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return int(resp.status), bytes(resp.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())

    def _auth_headers(self, path: str) -> dict[str, str]:
        """The header that proves the cluster token to the tracker (none without a token)."""
        if self.token is None:
            return {}
        from swarm.announce import AUTH_HEADER, http_auth_header

        # Timestamps strictly increasing, as the tracker wants them per client.
        self._last_ts = max(int(time.time() * 1000), self._last_ts + 1)
        value, _ = http_auth_header(
            ClusterKey(self.token), "GET", urllib.parse.urlsplit(path).path, b"", self._last_ts
        )
        return {AUTH_HEADER: value}

    def _healthy(self) -> bool:
        try:
            return self.get("/healthz", timeout=0.5)[0] == 200
        except OSError:
            return False

    def start(self) -> None:
        self.spawn()
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._healthy():
            if not self.alive():
                raise RuntimeError(f"tracker exited early:\n{self.stderr_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"tracker not healthy in {READY_TIMEOUT} s:\n{self.stderr_tail()}"
                )
            time.sleep(0.05)

    def status(self) -> dict[str, Any]:
        status, body = self.get("/v1/swarms")
        assert status == 200, f"GET /v1/swarms: HTTP {status}: {body[:300]!r}"
        obj = json.loads(body)
        assert isinstance(obj, dict)
        return obj

    def swarm_status(self, root: str) -> dict[str, Any] | None:
        """The status of swarm ``root``, or None while the tracker doesn't know it (yet)."""
        try:
            swarms: dict[str, Any] = self.status()["swarms"]
        except OSError:
            return None
        found = swarms.get(root)
        return found if isinstance(found, dict) else None


@dataclass(frozen=True)
class FetchOutcome:
    name: str
    returncode: int
    stdout: str
    stderr: str
    max_rss: int | None = None
    """Peak resident set of the process in bytes (its last VmHWM), if it was sampled."""

    def describe(self) -> str:
        return f"{self.name}: exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr[-3000:]}"

    def json(self) -> dict[str, Any]:
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one JSON line on stdout\n{self.describe()}"
        obj = json.loads(lines[0])
        assert isinstance(obj, dict), self.describe()
        return obj


class FetchProcess(_Process):
    """``swarm fetch NAME --tracker URL --dest DIR --listen HOST:PORT --json ...``.

    ``port`` 0 lets the peer pick; a fixed one finds it in the tracker's status.
    ``host`` (default 127.0.0.1) is the loopback address the peer listens on and
    advertises: peers on distinct 127.x addresses look like distinct nodes.
    """

    def __init__(
        self,
        name: str,
        ref: str,
        tracker_url: str,
        dest: Path,
        env: Mapping[str, str],
        logs: Path,
        *,
        linger: float,
        port: int = 0,
        host: str = LOOPBACK,
        extra: Iterable[str] = (),
    ) -> None:
        self.dest = dest
        self.port = port
        self.host = host
        self.peak_rss: int | None = None
        self._sampler: threading.Thread | None = None
        super().__init__(
            [
                "-v",
                "fetch",
                ref,
                "--tracker",
                tracker_url,
                "--dest",
                str(dest),
                "--listen",
                f"{host}:{port}",
                *(["--advertise", host] if host != LOOPBACK else []),
                "--linger",
                str(linger),
                "--no-fsync",
                "--json",
                *extra,
            ],
            env,
            logs,
            name,
        )

    def spawn(self) -> None:
        super().spawn()
        self.peak_rss = None
        self._sampler = threading.Thread(
            target=self._sample_peak_rss, name=f"rss-{self.name}", daemon=True
        )
        self._sampler.start()

    def _sample_peak_rss(self) -> None:
        """Follow the process's VmHWM until it exits (a zombie reports no memory).

        Read from /proc while it runs: ``ru_maxrss`` from ``wait4`` would include the
        memory of the parent it was forked from. VmHWM never decreases, so the last
        sample misses at most what it grew in its final ``RSS_INTERVAL``.
        """
        proc = self.proc
        assert proc is not None
        path = f"/proc/{proc.pid}/status"
        while proc.returncode is None:
            try:
                with open(path) as f:
                    match = _VMHWM.search(f.read())
            except OSError:
                return
            if match is None:
                return
            self.peak_rss = max(self.peak_rss or 0, int(match[1]) * 1024)
            time.sleep(RSS_INTERVAL)

    def wait(self, timeout: float) -> FetchOutcome:
        """Wait (bounded) for it to exit; on timeout kill it and fail with its log."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not finish within {timeout:.0f} s\n{self.stderr_tail()}"
            ) from None
        if self._sampler is not None:
            self._sampler.join(STOP_TIMEOUT)
        return FetchOutcome(
            self.name,
            code,
            self.stdout_path.read_text(errors="replace"),
            self.stderr_path.read_text(errors="replace"),
            self.peak_rss,
        )

    def verified_pieces(self, root: str) -> int:
        """Pieces its state file records as verified (0 before it exists)."""
        return len(self.verified_set(root))

    def verified_set(self, root: str) -> set[int]:
        """The pieces its state file records as verified (none before it exists)."""
        try:
            state = (self.dest / STATE_DIR / f"{root}.state").read_bytes()
        except OSError:
            return set()
        return {index for index, flag in enumerate(state) if flag == 1}


P = TypeVar("P", bound=_Process)


@dataclass
class Processes:
    """Every process a test started, ended (by its own pid) when the test is over."""

    started: list[_Process] = field(default_factory=list)

    def add(self, proc: P) -> P:
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    group = Processes()
    try:
        yield group
    finally:
        group.close()


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def tree_digests(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (swarm's own state and marker left out)."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or rel.parts[0].startswith(".swarm"):
            continue
        out[rel.as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------------------
# Artifacts and whole swarms
# --------------------------------------------------------------------------------------

KiB = 1024
MiB = 1024 * KiB
CATALOG_PREFIX = "catalog"

# Announces are frequent so that a dead peer or tracker shows quickly. Peers are
# declared dead (TTL) or stalled only when a test means it: a loaded CI machine
# can hold a live peer's announce, or a 1 MiB pull's only progress report, for
# seconds, and a needless reassignment reads the origin twice.
ANNOUNCE_INTERVAL = 0.3
PEER_TTL = 10.0
STALL_TIMEOUT = 30.0
LINGER = 20.0
FETCH_TIMEOUT = 30.0


def make_model(seed: int, shard_sizes: list[int]) -> dict[str, bytes]:
    """Seeded random shards plus small config files; sizes not multiples of the piece size."""
    rng = random.Random(seed)
    files = {
        "config.json": b'{"architectures": ["SwarmForCausalLM"], "layers": 4}\n',
        "tokenizer/tokenizer.json": rng.randbytes(150_001),
    }
    for i, size in enumerate(shard_sizes):
        files[f"weights/model-{i + 1:05d}-of-{len(shard_sizes):05d}.safetensors"] = rng.randbytes(
            size
        )
    return files


class Bucket(Protocol):
    """An S3 bucket on the test server (``conftest.S3Bucket``)."""

    @property
    def path(self) -> Path: ...

    @property
    def url(self) -> str: ...


@dataclass(frozen=True)
class Published:
    """An artifact in the S3 bucket and its manifest in the S3 catalog."""

    name: str
    ref: str
    root: str
    files: dict[str, bytes]
    model_bytes: int
    pieces: int
    piece_size: int
    piece_lengths: tuple[int, ...]
    catalog: str
    digests: dict[str, str]
    data_keys: frozenset[str]
    """``bucket/prefix/path`` of each file: what an origin read may ask for."""


def publish_model(
    bucket: Bucket,
    name: str,
    files: dict[str, bytes],
    *,
    piece_size: int,
    prefix: str = "models/swarm-llm",
    token: bytes | None = None,
) -> Published:
    """Write ``files`` into the bucket and publish them (in-process, straight to rclone).

    With ``token`` the catalog entry is signed with that cluster token.
    """
    populate(bucket.path / prefix, files)
    catalog = f"{bucket.url}/{CATALOG_PREFIX}"
    manifest = asyncio.run(
        publish(
            f"{bucket.url}/{prefix}",
            name,
            catalog,
            piece_size=piece_size,
            key=ClusterKey(token),
        )
    )
    model_bytes = sum(len(data) for data in files.values())
    assert manifest.total_size == model_bytes
    bucket_name = bucket.url.removeprefix("s3://").split("/", 1)[0]
    return Published(
        name,
        manifest.ref,
        manifest.root_hex,
        files,
        model_bytes,
        manifest.num_pieces,
        piece_size,
        tuple(manifest.piece_lengths),
        catalog,
        tree_digests(bucket.path / prefix),
        frozenset(f"{bucket_name}/{prefix}/{path}" for path in files),
    )


@dataclass
class Swarm:
    """A running tracker, the relay(s) in front of the origin, and the peers.

    With ``per_peer_relays`` every peer reads the origin through a relay of its own,
    so the origin bytes of each peer, a killed one's too, are counted at the
    origin's side; otherwise all share one relay (``relay``).
    """

    model: Published
    tracker: TrackerProcess
    procs: Processes
    s3: S3Server
    upstream: str
    logs: Path
    tmp: Path
    gated: bool = False
    rate: float | None = None
    per_peer_relays: bool = False
    linger: float = LINGER
    fetch_timeout: float = FETCH_TIMEOUT
    peers: list[FetchProcess] = field(default_factory=list)
    relays: dict[str, ByteCountingRelay] = field(default_factory=dict)
    gates_open: bool = False

    def relay_for(self, name: str) -> ByteCountingRelay:
        key = name if self.per_peer_relays else ""
        relay = self.relays.get(key)
        if relay is None:
            relay = ByteCountingRelay(
                self.upstream, gated=self.gated and not self.gates_open, rate=self.rate
            )
            relay.start()
            self.relays[key] = relay
        return relay

    @property
    def relay(self) -> ByteCountingRelay:
        """The relay every peer shares."""
        assert not self.per_peer_relays, "each peer has a relay of its own"
        return self.relay_for("")

    def open_gates(self) -> None:
        self.gates_open = True
        for relay in self.relays.values():
            relay.open_gate()

    def add_peer(
        self,
        name: str,
        *extra: str,
        port: int = 0,
        dest: Path | None = None,
        env: Mapping[str, str] | None = None,
        linger: float | None = None,
        host: str = LOOPBACK,
    ) -> FetchProcess:
        """Start ``swarm fetch`` as peer ``name`` (its files under ``tmp/name`` by default)."""
        relay = self.relay_for(name)
        peer = self.procs.add(
            FetchProcess(
                name,
                self.model.name,
                self.tracker.url,
                dest or self.tmp / name,
                {**self.s3.env(endpoint=relay.endpoint), **(env or {})},
                self.logs,
                linger=self.linger if linger is None else linger,
                port=port,
                host=host,
                extra=extra,
            )
        )
        peer.spawn()
        self.peers.append(peer)
        return peer

    def status(self) -> dict[str, Any] | None:
        return self.tracker.swarm_status(self.model.root)

    def wait_all_seeding(self, count: int) -> None:
        """Until the tracker knows ``count`` peers and has given each an origin piece."""

        def ready() -> bool:
            status = self.status()
            if status is None or len(status["peer_list"]) < count:
                return False
            return all(p["assigned"] for p in status["peer_list"])

        wait_until(ready, timeout=30.0, what=f"{count} peers each with an origin assignment")

    def wait_peers(
        self, peers: list[FetchProcess], timeout: float | None = None
    ) -> list[FetchOutcome]:
        """Wait for ``peers`` to exit (bounded); on timeout, fail with the tracker's view."""
        deadline = time.monotonic() + (timeout or self.fetch_timeout)
        try:
            return [p.wait(max(1.0, deadline - time.monotonic())) for p in peers]
        except AssertionError as exc:
            try:
                status = json.dumps(self.status(), indent=1)[:6000]
            except (OSError, AssertionError) as why:
                status = f"(tracker status unavailable: {why})"
            exchanges = self.exchanges()
            pending = [e for e in exchanges if not e.complete]
            raise AssertionError(
                f"{exc}\n--- origin: {len(exchanges)} requests, "
                f"{self.origin_body_bytes()} body bytes, unanswered or partial: {pending[:8]}"
                f"\n--- tracker status\n{status}"
            ) from None

    def exchanges(self) -> list[Exchange]:
        return [e for relay in self.relays.values() for e in relay.exchanges()]

    def origin_body_bytes(self, name: str | None = None) -> int:
        """Data bytes that left the origin (2xx response bodies), for every peer or one."""
        relays = list(self.relays.values()) if name is None else [self.relay_for(name)]
        exchanges = [e for relay in relays for e in relay.exchanges()]
        others = [e for e in exchanges if e.key not in self.model.data_keys]
        assert not others, f"peers asked the origin for more than data: {others[:5]}"
        return sum(e.body_bytes for e in exchanges if e.status is not None and e.status < 300)

    def relay_errors(self) -> list[str]:
        return [err for relay in self.relays.values() for err in relay.errors]

    def close(self) -> None:
        for relay in self.relays.values():
            relay.stop()


class SwarmLab:
    """Starts swarms against one S3 server; ``close`` ends every process and relay."""

    def __init__(self, s3: S3Server, tmp: Path) -> None:
        self.s3 = s3
        self.tmp = tmp
        self.procs = Processes()
        self.swarms: list[Swarm] = []

    def start(
        self,
        model: Published,
        *,
        gated: bool = False,
        rate: float | None = None,
        per_peer_relays: bool = False,
        upstream: str | None = None,
        peer_ttl: float = PEER_TTL,
        stall_timeout: float = STALL_TIMEOUT,
        linger: float = LINGER,
        fetch_timeout: float = FETCH_TIMEOUT,
        tracker_args: Iterable[str] = (),
        tracker_env: Mapping[str, str] | None = None,
        token: bytes | None = None,
    ) -> Swarm:
        """A tracker on the model's catalog; peers read the origin at ``upstream`` (S3)."""
        logs = self.tmp / "logs"
        tracker = self.procs.add(
            TrackerProcess(
                model.catalog,
                {**self.s3.env(), **(tracker_env or {})},
                logs,
                announce_interval=ANNOUNCE_INTERVAL,
                peer_ttl=peer_ttl,
                stall_timeout=stall_timeout,
                extra=tracker_args,
                token=token,
            )
        )
        tracker.start()
        swarm = Swarm(
            model,
            tracker,
            self.procs,
            self.s3,
            upstream or self.s3.endpoint,
            logs,
            self.tmp,
            gated=gated,
            rate=rate,
            per_peer_relays=per_peer_relays,
            linger=linger,
            fetch_timeout=fetch_timeout,
        )
        self.swarms.append(swarm)
        return swarm

    def close(self) -> None:
        self.procs.close()
        for swarm in self.swarms:
            swarm.close()


def assert_finished(swarm: Swarm, outcome: FetchOutcome, peer: FetchProcess) -> dict[str, Any]:
    """Exit 0, one JSON summary saying verified, the marker, and byte-identical files."""
    assert outcome.returncode == 0, outcome.describe()
    result = outcome.json()
    assert result["verified"] is True, outcome.describe()
    assert result["root"] == swarm.model.root
    assert result["model_bytes"] == swarm.model.model_bytes
    assert (peer.dest / COMPLETE_MARKER).is_file(), f"{peer.name}: no completion marker"
    assert tree_digests(peer.dest) == swarm.model.digests, f"{peer.name}: files differ"
    return result


def range_reads(swarm: Swarm) -> Counter[tuple[str, tuple[int, int] | None]]:
    """How often each (object, byte range) was requested from the origin."""
    return Counter((e.key, e.range) for e in swarm.exchanges())
