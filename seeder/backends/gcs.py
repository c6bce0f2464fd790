"""``gs://bucket/prefix`` origins through google-cloud-storage.

With ``STORAGE_EMULATOR_HOST`` set the client talks to that emulator anonymously
(project from ``GOOGLE_CLOUD_PROJECT``, else ``swarm-emulator``); otherwise it uses
Application Default Credentials. The library's own retries are off (``retry=None``):
``seeder.reader`` retries with its budget and jitter.

Ranged reads hand the library a small file-like object that writes each chunk the
library receives into the caller's buffer, so a range is never assembled in a
``bytes`` object of its own; no checksum is computed (a range has none to check,
the manifest's blake3 digests do that job).
"""

from __future__ import annotations

import builtins
import http.client
import os
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import google.api_core.exceptions as gexc
import google.auth
import google.auth.exceptions
import requests
import requests.adapters
import urllib3.exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.auth.transport.requests import AuthorizedSession
from google.cloud import storage

from core.errors import ConfigError
from seeder.backends.common import (
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    THROTTLE_STATUSES,
    TRANSIENT_STATUSES,
    OriginThrottledError,
    parse_retry_after,
)
from seeder.backends.threaded import ReadAborted, ThreadedCalls
from seeder.errors import (
    OriginError,
    OriginNotFoundError,
    OriginPermissionError,
    OriginTransientError,
)
from seeder.origin import ObjectInfo, Origin, join_key

DEFAULT_POOL = 64
_TIMEOUT = (CONNECT_TIMEOUT, READ_TIMEOUT)
_SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)


def translate_gcs_error(exc: Exception, what: str) -> OriginError:
    """The ``seeder.errors`` error for a google-api-core / requests exception about ``what``."""
    if isinstance(exc, gexc.GoogleAPICallError):
        status = int(exc.code or 0) if isinstance(exc.code, int) else 0
        response: Any = getattr(exc, "response", None)
        headers = getattr(response, "headers", None) or {}
        retry_after = parse_retry_after(headers.get("Retry-After"), time.time())
        if isinstance(exc, gexc.NotFound) or status == 404:
            return OriginNotFoundError(f"{what}: no such object or bucket")
        if isinstance(exc, gexc.Forbidden | gexc.Unauthorized) or status in (401, 403):
            return OriginPermissionError(
                f"{what}: access denied (HTTP {status}); check the credentials "
                "(GOOGLE_APPLICATION_CREDENTIALS) and the bucket's IAM"
            )
        if status in TRANSIENT_STATUSES or isinstance(exc, gexc.TooManyRequests | gexc.ServerError):
            text = f"{what}: HTTP {status}"
            if retry_after is not None:
                text += f", Retry-After {retry_after:g} s"
            if status in THROTTLE_STATUSES:
                return OriginThrottledError(text, retry_after=retry_after)
            return OriginTransientError(text, retry_after=retry_after)
        return OriginError(f"{what}: HTTP {status}: {exc.message}")
    if isinstance(
        exc, google.auth.exceptions.DefaultCredentialsError | google.auth.exceptions.RefreshError
    ):
        return OriginPermissionError(f"{what}: no usable Google credentials: {exc}")
    if isinstance(exc, requests.exceptions.SSLError):
        return OriginError(f"{what}: TLS failure: {exc}")
    if isinstance(
        exc,
        requests.exceptions.ConnectionError
        | requests.exceptions.Timeout
        | requests.exceptions.ChunkedEncodingError
        | google.auth.exceptions.TransportError
        | urllib3.exceptions.ProtocolError
        | urllib3.exceptions.TimeoutError
        | http.client.HTTPException
        | OSError,
    ):
        return OriginTransientError(f"{what}: {type(exc).__name__}: {exc}")
    return OriginError(f"{what}: {type(exc).__name__}: {exc}")


_LIBRARY_ERRORS = (
    gexc.GoogleAPIError,
    google.auth.exceptions.GoogleAuthError,
    requests.exceptions.RequestException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,
)


class _ViewWriter:
    """A write-only file object that fills a memoryview; the library calls ``write``."""

    def __init__(
        self, view: memoryview, what: str, on_bytes: Callable[[int], None], abort: threading.Event
    ) -> None:
        self.view = view
        self.what = what
        self.pos = 0
        self._on_bytes = on_bytes
        self._abort = abort

    def write(self, data: bytes) -> int:
        if self._abort.is_set():
            raise ReadAborted(self.what)
        n = len(data)
        end = self.pos + n
        if end > len(self.view):
            raise OriginError(
                f"{self.what}: server sent more than the {len(self.view)} bytes asked for"
            )
        self.view[self.pos : end] = data
        self.pos = end
        self._on_bytes(n)
        return n

    def flush(self) -> None:
        pass


class GCSOrigin(Origin):
    """Objects under ``gs://bucket/prefix``; keys are relative to the prefix."""

    def __init__(self, url: str, *, max_pool_connections: int = DEFAULT_POOL) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("gs", "gcs") or not parts.netloc:
            raise ConfigError(f"GCS origin URL must be gs://bucket/prefix, got {url!r}")
        self.bucket_name = parts.netloc
        self.prefix = parts.path.strip("/")
        self._pool_size = max_pool_connections
        self._calls = ThreadedCalls("gcs-origin", max_pool_connections)
        self._client: storage.Client | None = None
        self._client_lock = threading.Lock()
        self._count_lock = threading.Lock()

    def _gcs(self) -> storage.Client:
        """The storage client, built once on first use (it reads the environment)."""
        with self._client_lock:
            if self._client is None:
                credentials: Credentials
                project: str | None
                if os.environ.get("STORAGE_EMULATOR_HOST"):
                    credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
                    project = os.environ.get("GOOGLE_CLOUD_PROJECT") or "swarm-emulator"
                else:
                    try:
                        credentials, project = google.auth.default(scopes=_SCOPES)
                    except google.auth.exceptions.GoogleAuthError as exc:
                        raise translate_gcs_error(exc, self.url) from exc
                session = AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
                # requests keeps 10 connections per host by default; the reader runs more.
                adapter = requests.adapters.HTTPAdapter(
                    pool_connections=4, pool_maxsize=self._pool_size
                )
                session.mount("https://", adapter)
                session.mount("http://", adapter)
                self._client = storage.Client(
                    project=project, credentials=credentials, _http=session
                )
            return self._client

    def _name(self, key: str) -> str:
        return join_key(self.prefix, key)

    def _what(self, key: str) -> str:
        return f"gs://{self.bucket_name}/{self._name(key)}"

    def _count(self, requests: int = 0, nbytes: int = 0) -> None:
        with self._count_lock:
            self.counters.requests += requests
            self.counters.bytes_read += nbytes

    def _blob(self, key: str) -> storage.Blob:
        return self._gcs().bucket(self.bucket_name).blob(self._name(key))

    async def list(self) -> list[ObjectInfo]:
        return await self._calls.call(self._list_sync)

    def _list_sync(self) -> builtins.list[ObjectInfo]:
        what = f"gs://{self.bucket_name}/{self.prefix}"
        start = f"{self.prefix}/" if self.prefix else ""
        found: builtins.list[ObjectInfo] = []
        try:
            blobs = self._gcs().list_blobs(
                self.bucket_name, prefix=start or None, retry=None, timeout=_TIMEOUT
            )
            for page in blobs.pages:
                self._count(requests=1)
                for blob in page:
                    if blob.name.endswith("/"):
                        continue
                    found.append(ObjectInfo(blob.name[len(start) :], int(blob.size or 0)))
        except _LIBRARY_ERRORS as exc:
            raise translate_gcs_error(exc, what) from exc
        return sorted(found, key=lambda o: o.key)

    async def stat(self, key: str) -> ObjectInfo:
        return await self._calls.call(self._stat_sync, key)

    def _stat_sync(self, key: str) -> ObjectInfo:
        self._count(requests=1)
        try:
            blob = (
                self._gcs()
                .bucket(self.bucket_name)
                .get_blob(self._name(key), retry=None, timeout=_TIMEOUT)
            )
        except _LIBRARY_ERRORS as exc:
            raise translate_gcs_error(exc, self._what(key)) from exc
        if blob is None:
            raise OriginNotFoundError(f"{self._what(key)}: no such object or bucket")
        return ObjectInfo(key, int(blob.size or 0))

    async def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        if len(buf) == 0:
            return
        await self._calls.call_abortable(
            lambda abort: self._read_into_sync(key, offset, buf, abort)
        )

    def _read_into_sync(
        self, key: str, offset: int, buf: memoryview, abort: threading.Event
    ) -> None:
        length = len(buf)
        what = f"{self._what(key)} bytes {offset}-{offset + length - 1}"
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        writer = _ViewWriter(view, what, lambda n: self._count(nbytes=n), abort)
        self._count(requests=1)
        try:
            self._blob(key).download_to_file(
                writer,
                start=offset,
                end=offset + length - 1,
                raw_download=True,
                checksum=None,
                retry=None,
                timeout=_TIMEOUT,
            )
        except _LIBRARY_ERRORS as exc:
            raise translate_gcs_error(exc, what) from exc
        if writer.pos != length:
            # A cut connection surfaces as a library error above; a complete reply that
            # is short means the object ends before the range does.
            raise OriginError(
                f"{what}: the reply held {writer.pos} of {length} bytes; "
                "the object is shorter than the range"
            )

    async def get_bytes(self, key: str) -> bytes:
        return await self._calls.call(self._get_sync, key)

    def _get_sync(self, key: str) -> bytes:
        self._count(requests=1)
        try:
            data: bytes = self._blob(key).download_as_bytes(
                raw_download=True, retry=None, timeout=_TIMEOUT
            )
        except _LIBRARY_ERRORS as exc:
            raise translate_gcs_error(exc, self._what(key)) from exc
        self._count(nbytes=len(data))
        return data

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self._calls.call(self._put_sync, key, data)

    def _put_sync(self, key: str, data: bytes) -> None:
        try:
            self._blob(key).upload_from_string(
                data, content_type="application/octet-stream", retry=None, timeout=_TIMEOUT
            )
        except _LIBRARY_ERRORS as exc:
            raise translate_gcs_error(exc, self._what(key)) from exc

    async def close(self) -> None:
        await self._calls.close()
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
