"""Running a blocking client library's calls on a thread pool the origin owns.

boto3 and google-cloud-storage block. Each origin built on them owns one pool, sized
for the reader's concurrency, and shuts it down in ``close()``. Reads that fill a
caller's buffer take an abort flag: when the awaiting task is cancelled the flag is
set and the task waits for the worker to stop touching the buffer (the worker checks
the flag between chunks), so a cancelled read never writes into a buffer its caller
already reuses.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

_T = TypeVar("_T")


class ReadAborted(Exception):
    """Raised inside a worker that saw its abort flag; never leaves this module's callers."""


class ThreadedCalls:
    """A named thread pool for one origin's blocking calls."""

    def __init__(self, name: str, workers: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._closed = False

    async def call(self, fn: Callable[..., _T], /, *args: object, **kwargs: object) -> _T:
        """Run ``fn(*args, **kwargs)`` on the pool and wait for it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def call_abortable(self, fn: Callable[[threading.Event], _T]) -> _T:
        """Run ``fn(abort)``; on cancellation set ``abort`` and wait for ``fn`` to return."""
        loop = asyncio.get_running_loop()
        abort = threading.Event()
        future = loop.run_in_executor(self._executor, fn, abort)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            abort.set()
            # The worker stops at its next chunk boundary; wait for that so the caller's
            # buffer is ours again. A second cancellation gives up waiting.
            await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # retrieved, so asyncio does not log it as unhandled
            raise

    async def close(self) -> None:
        """Stop the pool; queued calls are cancelled, running ones finish."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
