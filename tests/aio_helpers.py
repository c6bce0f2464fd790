"""Bounded asyncio helpers for tests that run trackers and peers in-process.

``run_bounded(body, timeout)`` runs one test's coroutine under ``asyncio.run`` and
fails it after ``timeout`` seconds; ``wait_until(predicate, what, timeout)`` polls a
condition inside it, failing with ``what`` when it does not come true in time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

POLL = 0.02


def run_bounded(body: Callable[[], Awaitable[None]], timeout: float) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(body(), timeout)

    asyncio.run(bounded())


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(POLL)
