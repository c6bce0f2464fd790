"""The origin interface: where an artifact's bytes live.

One narrow interface with four backends, chosen by URL scheme:

    s3://bucket/prefix     boto3; the standard AWS_* environment, AWS_ENDPOINT_URL included
    gs://bucket/prefix     google-cloud-storage; honours STORAGE_EMULATOR_HOST
    http(s)://host/prefix  aiohttp with Range requests; can't list (publish with --files)
    file:///path           local files

Keys are POSIX paths relative to the prefix. Backends make exactly one request per
call and translate every library exception into ``seeder.errors``; retries, range
splitting and concurrency live in ``seeder.reader``. Every byte a backend receives
from the origin is added to ``counters.bytes_read`` as it arrives.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from urllib.parse import urlsplit

from core.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object under the origin's prefix."""

    key: str
    size: int


@dataclass(slots=True)
class OriginCounters:
    """What crossed the origin's egress, for the fetch summary and the invariants."""

    bytes_read: int = 0
    requests: int = 0
    retries: int = 0
    throttled: int = 0
    retry_after: float = 0.0
    """The longest Retry-After a throttled answer carried (the peer's announce reads
    and clears it: the tracker's origin budget waits at least that long to grow)."""


class Origin(abc.ABC):
    """A read-mostly view of the objects under one URL prefix."""

    url: str

    def __init__(self, url: str) -> None:
        self.url = url
        self.counters = OriginCounters()

    @abc.abstractmethod
    async def list(self) -> list[ObjectInfo]:
        """Every object under the prefix, keys relative to it, sorted by key."""

    @abc.abstractmethod
    async def stat(self, key: str) -> ObjectInfo:
        """Size of one object; ``OriginNotFoundError`` if it does not exist."""

    @abc.abstractmethod
    async def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with ``len(buf)`` bytes of ``key`` starting at ``offset`` (one request)."""

    @abc.abstractmethod
    async def get_bytes(self, key: str) -> bytes:
        """A whole (small) object, e.g. a catalog entry."""

    @abc.abstractmethod
    async def put_bytes(self, key: str, data: bytes) -> None:
        """Write a whole (small) object atomically, e.g. a catalog entry."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and thread pools."""

    async def __aenter__(self) -> Origin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def join_key(prefix: str, key: str) -> str:
    """Join a prefix and a relative key with exactly one slash."""
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


def open_origin(url: str) -> Origin:
    """The backend for ``url``, chosen by its scheme."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        from seeder.backends.file import FileOrigin

        return FileOrigin(url)
    if scheme == "s3":
        from seeder.backends.s3 import S3Origin

        return S3Origin(url)
    if scheme in ("gs", "gcs"):
        from seeder.backends.gcs import GCSOrigin

        return GCSOrigin(url)
    if scheme in ("http", "https"):
        from seeder.backends.http import HTTPOrigin

        return HTTPOrigin(url)
    raise ConfigError(
        f"unsupported origin URL {url!r}: use s3://bucket/prefix, gs://bucket/prefix, "
        "http(s)://host/prefix or file:///path"
    )
