"""``file:///path`` origins: local files read with positional reads in a thread."""

from __future__ import annotations

import asyncio
import builtins
import errno
import os
from pathlib import Path
from urllib.parse import unquote, urlsplit

from core.errors import ConfigError
from seeder.errors import OriginError, OriginNotFoundError, OriginPermissionError
from seeder.origin import ObjectInfo, Origin


def _translate(exc: OSError, what: str) -> OriginError:
    if exc.errno == errno.ENOENT:
        return OriginNotFoundError(f"{what}: no such file or directory")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return OriginPermissionError(f"{what}: permission denied")
    return OriginError(f"{what}: {exc.strerror or exc}")


class FileOrigin(Origin):
    """Objects are the regular files below a local directory."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"file URL must be file:///absolute/path, got {url!r}")
        self.root = Path(unquote(parts.path))

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    async def list(self) -> builtins.list[ObjectInfo]:
        return await asyncio.to_thread(self._list_sync)

    def _list_sync(self) -> builtins.list[ObjectInfo]:
        if not self.root.is_dir():
            raise OriginNotFoundError(f"{self.url}: not a directory")
        found: builtins.list[ObjectInfo] = []
        # An explicit stack, not os.walk: on Python 3.11 os.walk recurses once per
        # level, and a directory tree 1,000 levels deep would end in RecursionError.
        # Unreadable directories are errors, not skipped (os.walk's default).
        pending = [self.root]
        while pending:
            directory = pending.pop()
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            if not entry.name.startswith(".swarm"):
                                pending.append(Path(entry.path))
                        elif entry.is_file():
                            key = Path(entry.path).relative_to(self.root).as_posix()
                            found.append(ObjectInfo(key, entry.stat().st_size))
            except OSError as exc:
                raise _translate(exc, f"{self.url} {directory}") from exc
        return sorted(found, key=lambda o: o.key)

    async def stat(self, key: str) -> ObjectInfo:
        try:
            size = (await asyncio.to_thread(os.stat, self._path(key))).st_size
        except OSError as exc:
            raise _translate(exc, f"{self.url} {key}") from exc
        return ObjectInfo(key, size)

    async def read_into(self, key: str, offset: int, buf: memoryview) -> None:
        await asyncio.to_thread(self._read_into_sync, key, offset, buf)

    def _read_into_sync(self, key: str, offset: int, buf: memoryview) -> None:
        what = f"{self.url} {key}"
        self.counters.requests += 1
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except OSError as exc:
            raise _translate(exc, what) from exc
        try:
            done = 0
            while done < len(buf):
                n = os.preadv(fd, [buf[done:]], offset + done)
                if n == 0:
                    raise OriginError(f"{what}: file ended at {offset + done}, expected more bytes")
                done += n
                self.counters.bytes_read += n
        except OSError as exc:
            raise _translate(exc, what) from exc
        finally:
            os.close(fd)

    async def get_bytes(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self._path(key).read_bytes)
        except OSError as exc:
            raise _translate(exc, f"{self.url} {key}") from exc

    async def put_bytes(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put_sync, key, data)

    def _put_sync(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise _translate(exc, f"{self.url} {key}") from exc
