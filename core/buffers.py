"""A pool of reusable buffers, so a fetch never allocates gigabytes as it goes.

Buffers are allocated on first need, not up front: a peer that is never
assigned an origin piece never pays for (or touches) a piece-sized buffer. On
the virtual machines we measure on, the first touch of a fresh page costs
several microseconds (FIELD-NOTES), so allocating 512 MiB that may never be
used delays the start of a fetch by seconds. Once allocated, a buffer is reused
for the life of the pool, so its pages are touched only once. Buffers are
anonymous memory maps, so they start on a page boundary, as direct I/O needs.
"""

from __future__ import annotations

import asyncio
import mmap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class BufferPool:
    """At most ``count`` buffers of ``size`` bytes, allocated on first need, lent out in turn."""

    def __init__(self, size: int, count: int) -> None:
        if size < 1 or count < 1:
            raise ValueError(f"a buffer pool needs size >= 1 and count >= 1, got {size}, {count}")
        self.size = size
        self.count = count
        self._allocated = 0
        self._free: asyncio.Queue[mmap.mmap] = asyncio.Queue()

    async def acquire(self) -> mmap.mmap:
        """A free buffer (waiting for one if all ``count`` are lent out); give it back with :meth:`release`."""
        if self._free.empty() and self._allocated < self.count:
            self._allocated += 1
            return mmap.mmap(-1, self.size)
        return await self._free.get()

    def release(self, buf: mmap.mmap) -> None:
        self._free.put_nowait(buf)

    @asynccontextmanager
    async def lease(self, length: int) -> AsyncIterator[memoryview]:
        """A view of ``length`` bytes of a free buffer, returned to the pool afterwards."""
        buf = await self.acquire()
        view = memoryview(buf)[:length]
        try:
            yield view
        finally:
            try:
                view.release()
            except BufferError:
                # A cancelled read still runs in a thread and writes into this buffer:
                # abandon it to that thread and put a fresh one in its place.
                buf = mmap.mmap(-1, self.size)
            self.release(buf)
