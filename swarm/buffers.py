"""A pool of reusable piece buffers, so a fetch never allocates gigabytes as it goes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class BufferPool:
    """``count`` buffers of ``size`` bytes, allocated (and touched) once, lent out in turn."""

    def __init__(self, size: int, count: int) -> None:
        self.size = size
        self._free: asyncio.Queue[bytearray] = asyncio.Queue()
        for _ in range(count):
            self._free.put_nowait(bytearray(size))

    @asynccontextmanager
    async def lease(self, length: int) -> AsyncIterator[memoryview]:
        """A view of ``length`` bytes of a free buffer, returned to the pool afterwards."""
        buf = await self._free.get()
        view = memoryview(buf)[:length]
        try:
            yield view
        finally:
            try:
                view.release()
            except BufferError:
                # A cancelled read still runs in a thread and writes into this buffer:
                # abandon it to that thread and put a fresh one in its place.
                buf = bytearray(self.size)
            self._free.put_nowait(buf)
