"""``s3://bucket/prefix`` origins: boto3, or requests signed here for a named endpoint.

The client comes from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, profiles, ...).
When that environment names an S3-compatible endpoint and static keys
(``sigv4.signed_endpoint_from_env``), reads (ranged and whole GETs, HEAD) are signed
here and sent path-style on keep-alive ``http.client`` connections (``keepalive``)
from the same worker threads, and boto3 is imported only to list or write
(publishing, the tracker's origin check): a fetching peer then starts 0.17 CPU-s
sooner (see :mod:`seeder.backends.sigv4`). ``SWARM_S3_BOTO3=1`` sends everything
through boto3.

botocore's own retries are off: ``seeder.reader`` retries with its budget and jitter.
Checksums are only computed or validated when an operation requires them, because a
ranged GET has no whole-object checksum to check and S3-compatible servers differ.

Ranged reads through boto3 stream the response body straight into the caller's
buffer through ``http.client``'s ``readinto`` (urllib3's own ``readinto`` goes through
a ``bytes`` copy), a chunk at a time, counting bytes as they arrive.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as dt
import http.client
import os
import re
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from core.errors import ConfigError
from core.manifest import MAX_ENCODED_SIZE
from seeder.backends.common import (
    CONNECT_TIMEOUT,
    READ_CHUNK,
    READ_TIMEOUT,
    S3_THROTTLE_CODES,
    S3_TRANSIENT_CODES,
    THROTTLE_STATUSES,
    TRANSIENT_STATUSES,
    OriginThrottledError,
    check_range_reply,
    parse_retry_after,
    range_header,
)
from seeder.backends.keepalive import KeepAlive
from seeder.backends.sigv4 import Signer, signed_endpoint_from_env
from seeder.backends.threaded import ReadAborted, ThreadedCalls
from seeder.errors import (
    OriginError,
    OriginNotFoundError,
    OriginPermissionError,
    OriginTransientError,
)
from seeder.origin import ObjectInfo, Origin, join_key

if TYPE_CHECKING:
    import boto3
    import botocore.loaders
    from mypy_boto3_s3 import S3Client

# Enough for the reader's default concurrency plus list/stat/catalog calls alongside.
DEFAULT_POOL = 64
# get_bytes reads catalog entries; the largest is a manifest (``MAX_ENCODED_SIZE``).
MAX_OBJECT_SIZE = MAX_ENCODED_SIZE

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_PERMISSION_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "AllAccessDisabled",
        "401",
        "403",
    }
)


_loader_lock = threading.Lock()
_shared_loader: botocore.loaders.Loader | None = None


def _session() -> boto3.session.Session:
    """A fresh boto3 session (it reads the environment now) sharing one model loader.

    Loading the S3 service model is most of a client's creation cost; the loader
    caches it, credentials and settings stay per session.
    """
    import boto3
    import botocore.session

    global _shared_loader
    core = botocore.session.Session()
    with _loader_lock:
        if _shared_loader is None:
            _shared_loader = core.get_component("data_loader")
        else:
            core.register_component("data_loader", _shared_loader)
    return boto3.session.Session(botocore_session=core)


class _ReadInto(Protocol):
    def readinto(self, b: memoryview, /) -> int | None: ...


class _RawBody(Protocol):
    def read(self, amt: int | None = None, /) -> bytes: ...
    def release_conn(self) -> None: ...
    def close(self) -> None: ...


def s3_reply_error(
    what: str, code: str, status: int, message: str, retry_after: float | None
) -> OriginError:
    """The ``seeder.errors`` error for an S3 error reply (its code, HTTP status, message)."""
    message = message or code or f"HTTP {status}"
    if code == "NoSuchBucket":
        return OriginNotFoundError(f"{what}: no such bucket")
    if code in _NOT_FOUND_CODES or status == 404:
        return OriginNotFoundError(f"{what}: no such object")
    if code in _PERMISSION_CODES or status in (401, 403):
        return OriginPermissionError(
            f"{what}: access denied ({code or status}: {message}); "
            "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy"
        )
    if code in S3_TRANSIENT_CODES or status in TRANSIENT_STATUSES:
        text = f"{what}: {code or 'error'} (HTTP {status})"
        if retry_after is not None:
            text += f", Retry-After {retry_after:g} s"
        if code in S3_THROTTLE_CODES or status in THROTTLE_STATUSES:
            return OriginThrottledError(text, retry_after=retry_after)
        return OriginTransientError(text, retry_after=retry_after)
    return OriginError(f"{what}: {code or status}: {message}")


def _boto_errors(*also: type[Exception]) -> tuple[type[Exception], ...]:
    """botocore's client and library errors, and ``also`` (an ``except`` clause evaluates
    this only when something was raised, so botocore is not imported before it is used)."""
    import botocore.exceptions

    return (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, *also)


def translate_s3_error(exc: Exception, what: str) -> OriginError:
    """The ``seeder.errors`` error for a botocore (or socket) exception about ``what``."""
    import botocore.exceptions

    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        headers = meta.get("HTTPHeaders", {})
        return s3_reply_error(
            what,
            str(error.get("Code", "")),
            int(meta.get("HTTPStatusCode", 0) or 0),
            str(error.get("Message") or ""),
            parse_retry_after(headers.get("retry-after"), time.time()),
        )
    if isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
    ):
        return OriginPermissionError(
            f"{what}: no usable AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY or a profile"
        )
    if isinstance(exc, botocore.exceptions.SSLError):
        return OriginError(f"{what}: TLS failure: {exc}")
    if isinstance(
        exc,
        botocore.exceptions.ConnectionError
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.IncompleteReadError,
    ):
        return OriginTransientError(f"{what}: {exc}")
    if isinstance(exc, OSError):  # reset, timeout, broken pipe while streaming the body
        return OriginTransientError(f"{what}: {type(exc).__name__}: {exc}")
    return OriginError(f"{what}: {type(exc).__name__}: {exc}")


_ERROR_BODY_LIMIT = 64 * 1024
_XML_FIELD = re.compile(rb"<(Code|Message)>([^<]{0,1024})</(?:Code|Message)>")


def _reply_error(what: str, resp: http.client.HTTPResponse) -> OriginError | None:
    """The error for a signed request's answer other than 200/206, from its XML error
    body (64 KiB of it at most), or None."""
    if resp.status in (200, 206):
        return None
    try:
        body = resp.read(_ERROR_BODY_LIMIT)
    except (OSError, http.client.HTTPException):
        body = b""  # the status says enough
    fields = {m[1].decode(): m[2].decode("utf-8", "replace") for m in _XML_FIELD.finditer(body)}
    return s3_reply_error(
        what,
        fields.get("Code", ""),
        resp.status,
        fields.get("Message", ""),
        parse_retry_after(resp.getheader("Retry-After"), time.time()),
    )


def _connection_error(exc: Exception, what: str) -> OriginError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return OriginError(f"{what}: TLS failure: {exc}")
    return OriginTransientError(f"{what}: {type(exc).__name__}: {exc}")


_HTTP_ERRORS = (OSError, http.client.HTTPException)


def _content_length(resp: http.client.HTTPResponse) -> int | None:
    value = resp.getheader("Content-Length")
    return int(value) if value is not None and value.isdigit() else None


class S3Origin(Origin):
    """Objects under ``s3://bucket/prefix``; keys are relative to the prefix."""

    def __init__(self, url: str, *, max_pool_connections: int = DEFAULT_POOL) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3" or not parts.netloc:
            raise ConfigError(f"S3 origin URL must be s3://bucket/prefix, got {url!r}")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self._pool_size = max_pool_connections
        self._calls = ThreadedCalls("s3-origin", max_pool_connections)
        self._client: S3Client | None = None
        self._client_lock = threading.Lock()
        self._count_lock = threading.Lock()
        shared = os.environ.get("AWS_CONFIG_FILE") or os.path.expanduser("~/.aws/config")
        endpoint = signed_endpoint_from_env(os.environ, shared_config=os.path.exists(shared))
        self._signer = Signer(endpoint) if endpoint is not None else None
        self._http = (
            KeepAlive(
                endpoint.endpoint,
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
                max_idle=max_pool_connections,
                cafile=os.environ.get("AWS_CA_BUNDLE") or None,
            )
            if endpoint is not None
            else None
        )

    @property
    def signs_requests(self) -> bool:
        """Whether reads are signed here (see the module docstring), not sent through boto3."""
        return self._signer is not None

    # -- plumbing ---------------------------------------------------------------

    def _s3(self) -> S3Client:
        """The boto3 client, built once on first use (it reads the environment)."""
        with self._client_lock:
            if self._client is None:
                import botocore.exceptions
                from botocore.config import Config

                config = Config(
                    response_checksum_validation="when_required",
                    request_checksum_calculation="when_required",
                    max_pool_connections=self._pool_size,
                    # One try per call ("max_attempts" would count retries only).
                    retries={"mode": "standard", "total_max_attempts": 1},
                    connect_timeout=CONNECT_TIMEOUT,
                    read_timeout=READ_TIMEOUT,
                    tcp_keepalive=True,
                )
                try:
                    self._client = _session().client("s3", config=config)
                except botocore.exceptions.BotoCoreError as exc:
                    raise OriginError(f"{self.url}: can't build the S3 client: {exc}") from exc
            return self._client

    def _key(self, key: str) -> str:
        return join_key(self.prefix, key)

    def _signed(self, method: str, key: str) -> tuple[str, dict[str, str]]:
        """The request target (encoded path) and signed headers of ``method`` for ``key``."""
        assert self._signer is not None
        url = self._signer.endpoint.object_url(self.bucket, self._key(key))
        headers = self._signer.headers(method, url, dt.datetime.now(dt.UTC))
        return urlsplit(url).path, headers

    @contextlib.contextmanager
    def _exchange(
        self,
        pool: KeepAlive,
        method: str,
        key: str,
        what: str,
        extra: Mapping[str, str] | None = None,
    ) -> Iterator[http.client.HTTPResponse]:
        """A signed ``method`` of ``key`` (on a worker thread): its 200/206 response, the
        connection released after the block; any other answer raises its S3 error, a
        connection or protocol failure an ``OriginTransientError`` (TLS: ``OriginError``)."""
        target, headers = self._signed(method, key)
        headers.update(extra or {})
        self._count(requests=1)
        try:
            conn, resp = pool.exchange(method, target, headers)
            try:
                error = _reply_error(what, resp)
                if error is not None:
                    raise error
                yield resp
            finally:
                pool.release(conn, resp)
        except _HTTP_ERRORS as exc:
            raise _connection_error(exc, what) from exc

    def _what(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _count(self, requests: int = 0, nbytes: int = 0) -> None:
        with self._count_lock:
            self.counters.requests += requests
            self.counters.bytes_read += nbytes

    # -- the interface ----------------------------------------------------------

    async def list(self) -> list[ObjectInfo]:
        return await self._calls.call(self._list_sync)

    def _list_sync(self) -> builtins.list[ObjectInfo]:
        what = f"s3://{self.bucket}/{self.prefix}"
        start = f"{self.prefix}/" if self.prefix else ""
        found: builtins.list[ObjectInfo] = []
        try:
            paginator = self._s3().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=start):
                self._count(requests=1)
                for obj in page.get("Contents", []):
                    full = obj["Key"]
                    if full.endswith("/"):  # a "directory" marker, not a file
                        continue
                    found.append(ObjectInfo(full[len(start) :], int(obj["Size"])))
        except _boto_errors() as exc:
            raise translate_s3_error(exc, what) from exc
        return sorted(found, key=lambda o: o.key)

    async def stat(self, key: str) -> ObjectInfo:
        if self._http is None:
            return await self._calls.call(self._stat_sync, key)
        return await self._calls.call(self._signed_stat_sync, key, self._http)

    def _signed_stat_sync(self, key: str, pool: KeepAlive) -> ObjectInfo:
        what = self._what(key)
        with self._exchange(pool, "HEAD", key, what) as resp:
            resp.read()  # nothing, and it lets the connection go back
            size = _content_length(resp)
        if size is None:
            raise OriginError(f"{what}: HEAD reply has no Content-Length")
        return ObjectInfo(key, size)

    def _stat_sync(self, key: str) -> ObjectInfo:
        self._count(requests=1)
        try:
            head = self._s3().head_object(Bucket=self.bucket, Key=self._key(key))
        except _boto_errors() as exc:
            raise translate_s3_error(exc, self._what(key)) from exc
        return ObjectInfo(key, int(head["ContentLength"]))

    async def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if len(buf) == 0:
            return
        if self._http is not None:
            pool = self._http
            await self._calls.call_abortable(
                lambda abort: self._signed_read_sync(key, offset, buf, pool, abort)
            )
            return
        await self._calls.call_abortable(
            lambda abort: self._read_into_sync(key, offset, buf, abort)
        )

    def _signed_read_sync(
        self, key: str, offset: int, buf: memoryview, pool: KeepAlive, abort: threading.Event
    ) -> None:
        length = len(buf)
        what = f"{self._what(key)} bytes {offset}-{offset + length - 1}"
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        ranged = {"Range": range_header(offset, length)}
        with self._exchange(pool, "GET", key, what, ranged) as resp:
            check_range_reply(
                what,
                resp.status,
                resp.getheader("Content-Range"),
                _content_length(resp),
                offset,
                length,
            )
            done = 0
            while done < length:
                if abort.is_set():
                    raise ReadAborted(what)
                got = resp.readinto(view[done : min(length, done + READ_CHUNK)])
                if not got:
                    raise OriginTransientError(
                        f"{what}: connection closed after {done} of {length} bytes"
                    )
                done += got
                self._count(nbytes=got)
            if resp.read(1):  # more than the range: the connection can't be trusted
                raise OriginError(f"{what}: server sent more than {length} bytes")

    def _read_into_sync(
        self, key: str, offset: int, buf: memoryview, abort: threading.Event
    ) -> None:
        length = len(buf)
        what = f"{self._what(key)} bytes {offset}-{offset + length - 1}"
        self._count(requests=1)
        try:
            resp = self._s3().get_object(
                Bucket=self.bucket, Key=self._key(key), Range=range_header(offset, length)
            )
        except _boto_errors() as exc:
            raise translate_s3_error(exc, what) from exc
        raw: Any = getattr(resp["Body"], "_raw_stream")  # noqa: B009 - urllib3.HTTPResponse
        released = False
        try:
            check_range_reply(
                what,
                int(resp["ResponseMetadata"]["HTTPStatusCode"]),
                resp.get("ContentRange"),
                resp.get("ContentLength"),
                offset,
                length,
            )
            self._stream_into(raw, buf, what, abort)
            raw.release_conn()
            released = True
        except _boto_errors(OSError) as exc:
            raise translate_s3_error(exc, what) from exc
        finally:
            if not released:
                raw.close()  # drop a half-read connection rather than reuse it

    def _stream_into(
        self, raw: _RawBody, buf: memoryview, what: str, abort: threading.Event
    ) -> None:
        # http.client.HTTPResponse.readinto fills the view straight from the socket.
        fp: _ReadInto | None = getattr(raw, "_fp", None)
        direct = fp is not None and hasattr(fp, "readinto")
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        done = 0
        length = len(view)
        while done < length:
            if abort.is_set():
                raise ReadAborted(what)
            want = min(READ_CHUNK, length - done)
            if direct:
                assert fp is not None
                got = fp.readinto(view[done : done + want]) or 0
            else:  # pragma: no cover - other urllib3 layouts
                data = raw.read(want)
                got = len(data)
                view[done : done + got] = data
            if got == 0:
                raise OriginTransientError(
                    f"{what}: connection closed after {done} of {length} bytes"
                )
            done += got
            self._count(nbytes=got)

    async def get_bytes(self, key: str) -> bytes:
        if self._http is None:
            return await self._calls.call(self._get_sync, key)
        return await self._calls.call(self._signed_get_sync, key, self._http)

    def _signed_get_sync(self, key: str, pool: KeepAlive) -> bytes:
        what = self._what(key)
        with self._exchange(pool, "GET", key, what) as resp:
            expected = _content_length(resp)
            parts: list[bytes] = []
            total = 0
            while chunk := resp.read(READ_CHUNK):
                total += len(chunk)
                if total > MAX_OBJECT_SIZE:
                    raise OriginError(f"{what}: larger than {MAX_OBJECT_SIZE} bytes")
                parts.append(chunk)
        data = b"".join(parts)
        self._count(nbytes=len(data))
        if expected is not None and expected != len(data):
            raise OriginTransientError(f"{what}: got {len(data)} of {expected} bytes")
        return data

    def _get_sync(self, key: str) -> bytes:
        what = self._what(key)
        self._count(requests=1)
        try:
            resp = self._s3().get_object(Bucket=self.bucket, Key=self._key(key))
            data = resp["Body"].read()
        except _boto_errors(OSError) as exc:
            raise translate_s3_error(exc, what) from exc
        self._count(nbytes=len(data))
        expected = resp.get("ContentLength")
        if expected is not None and expected != len(data):
            raise OriginTransientError(f"{what}: got {len(data)} of {expected} bytes")
        return data

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self._calls.call(self._put_sync, key, data)

    def _put_sync(self, key: str, data: bytes) -> None:
        try:
            self._s3().put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except _boto_errors() as exc:
            raise translate_s3_error(exc, self._what(key)) from exc

    async def close(self) -> None:
        await self._calls.close()
        if self._http is not None:
            self._http.close()
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
