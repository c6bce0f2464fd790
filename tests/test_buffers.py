from __future__ import annotations

import asyncio
import socket
import threading

from core.buffers import BufferPool


def test_buffer_still_in_use_is_abandoned_not_reused() -> None:
    """A cancelled read whose thread still fills the buffer must not get it back into the pool."""

    async def go() -> None:
        pool = BufferPool(1024, 1)
        a, b = socket.socketpair()
        reader: threading.Thread | None = None
        try:
            async with pool.lease(100) as view:
                reader = threading.Thread(target=a.recv_into, args=(view,))
                reader.start()
                await asyncio.sleep(0.2)  # the thread now holds the view's buffer in recv_into
            async with pool.lease(1024) as again:
                b.sendall(b"\xff" * 100)
                reader.join(5)
                assert not reader.is_alive()
                assert bytes(again[:100]) == bytes(100), "the abandoned buffer was lent out again"
        finally:
            a.close()
            b.close()

    asyncio.run(go())
