"""Review of 4a20724: a block's payload (256 KiB or more) received on a thread of its own.

``SwarmPeer._reader`` hands a payload of ``_OFF_LOOP_MIN`` bytes or more to
``_recv_payload`` on ``SwarmPeer._recv``, a pool of ``max_peers`` threads. A peer
is built in-process (as in ``tests/test_review_engine.py``) with its listener,
accept loop and tick loop running, but no tracker; the remote peers are plain
loopback sockets that dial it, complete the handshake (``hostile_peer.dial_handshake``)
and then send what each test says. Tests that fail name a defect in their docstring;
tests marked "passes: pins" hold behaviour verified correct. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from aio_helpers import run_bounded, wait_until
from hostile_peer import Target, dial_handshake

from core.bitfield import Bitfield
from core.digest import digest
from core.manifest import Manifest
from swarm.announce import TrackerClient
from swarm.peer import _OFF_LOOP_MIN, PeerConfig, SwarmPeer, _Conn, unsent_limit
from swarm.protocol import (
    NEED_DATA,
    BitfieldMsg,
    BlockHeader,
    ConnectionClosed,
    FrameDecoder,
    Request,
    encode,
)

KIB = 1024
MIB = 1024 * KIB
TEST_TIMEOUT = 15.0


# -- harness -------------------------------------------------------------------------


def _artifact(tmp_path: Path, piece_size: int, size: int) -> tuple[Manifest, bytes]:
    data = random.Random(7).randbytes(size)
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "w.bin").write_bytes(data)
    digests = [
        digest(data[o : o + n]) for _, o, n in Manifest.layout([("w.bin", size)], piece_size)
    ]
    manifest = Manifest.build(
        name="offloop",
        origin=origin.as_uri(),
        piece_size=piece_size,
        files=[("w.bin", size)],
        digests=digests,
    )
    return manifest, data


class Swarm:
    """The peer under test, its artifact's bytes, and the remotes that dialed it."""

    def __init__(self, peer: SwarmPeer, data: bytes) -> None:
        self.peer = peer
        self.data = data
        m = peer.m
        self.target = Target(m.ref, m.root_hex, m.num_pieces)
        self.remotes: list[Remote] = []

    async def join(self, have: Iterable[int]) -> Remote:
        """A remote that dials the peer, handshakes and claims ``have``."""
        before = set(self.peer.conns)
        addr = ("127.0.0.1", self.peer.listen_port)
        sock = await asyncio.to_thread(dial_handshake, addr, self.target)
        remote = Remote(sock, self.target.num_pieces)
        self.remotes.append(remote)
        await remote.send(
            encode(BitfieldMsg.from_bitfield(Bitfield.from_indices(have, self.target.num_pieces)))
        )
        await wait_until(lambda: bool(set(self.peer.conns) - before), "the peer's connection", 5.0)
        (remote.conn_id,) = set(self.peer.conns) - before
        return remote

    def conn(self, remote: Remote) -> _Conn | None:
        return self.peer.conns.get(remote.conn_id)

    def block(self, req: Request, length: int | None = None) -> bytes:
        start = sum(self.peer.m.piece_lengths[: req.piece]) + req.offset
        return self.data[start : start + (req.length if length is None else length)]

    def close(self) -> None:
        for remote in self.remotes:
            remote.sock.close()


class Remote:
    """The far end of one connection, driven from the test's event loop."""

    def __init__(self, sock: socket.socket, num_pieces: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.decoder = FrameDecoder(num_pieces=num_pieces)
        self.decoder._stage = 2  # dial_handshake read the connect flow
        self.conn_id = 0

    async def send(self, data: bytes) -> None:
        await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(self.sock, data), 10.0)

    async def request(self, timeout: float = 5.0) -> Request:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = self.decoder.next_event()
            if isinstance(event, Request):
                return event
            if isinstance(event, ConnectionClosed):
                raise AssertionError("the peer closed the connection before a request")
            if event is not NEED_DATA:
                continue
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"no request within {timeout:.0f} s")
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 64 * KIB), left)
            if data:
                self.decoder.feed(data)
            else:
                self.decoder.feed_eof()

    def reset(self) -> None:
        """Close with an RST, not a FIN."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def _run(
    tmp_path: Path,
    body: Callable[[Swarm], Awaitable[None]],
    *,
    piece_size: int,
    size: int,
    **config: Any,
) -> None:
    manifest, data = _artifact(tmp_path, piece_size, size)

    async def main() -> None:
        tracker = TrackerClient("http://127.0.0.1:9")  # never called
        settings: dict[str, Any] = {
            "listen_host": "127.0.0.1",
            "durable": False,
            "direct_io": False,
            "block_size": piece_size,
        }
        settings.update(config)
        peer = SwarmPeer(
            manifest,
            tmp_path / "dest",
            tracker,
            config=PeerConfig(**settings),
            rng=random.Random(1),
        )
        swarm = Swarm(peer, data)
        try:
            await asyncio.to_thread(peer.store.open)
            await peer._listen()
            peer._spawn(peer._accept_loop(), "accept")
            peer._spawn(peer._tick_loop(), "tick")
            await body(swarm)
            assert peer._fatal is None, f"the peer failed: {peer._fatal!r}"
        finally:
            await peer._shutdown()
            await tracker.close()
            swarm.close()

    run_bounded(main, TEST_TIMEOUT)


def _free_buffers(peer: SwarmPeer) -> list[object]:
    return list(peer._block_pool._free._queue)  # type: ignore[attr-defined]


def _recv_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("swarm-recv")]


async def _stall(remote: Remote, swarm: Swarm) -> Request:
    """``remote`` answers its first request with the header and 1 KiB, then nothing."""
    req = await remote.request()
    await remote.send(encode(BlockHeader(req.piece, req.offset, req.length)))
    await remote.send(swarm.block(req, KIB))
    return req


# -- 1. max_peers threads: stalled payloads hold back every other peer's block ------------


def test_a_stalled_payload_does_not_hold_back_another_peers_block(tmp_path: Path) -> None:
    """BUG: ``self._recv`` has ``max_peers`` threads ("one thread per peer at most"), but
    connections are not bounded by max_peers (it only stops dialing; anyone may dial
    us), and a remote that sends a block header and then goes quiet holds one thread
    in ``_recv_payload`` until the session's slow close (request_timeout + length /
    1 MiB/s: 34 s for a 4 MiB block by default). Here max_peers is 1: one stalled
    remote, and an honest one's whole block sits in the socket, its receive queued
    behind the stalled one. Before 4a20724 each reader received on the loop and the
    honest block landed at once; with 50 dialers that stall (the default), every
    honest download of the peer waits ~34 s per round."""

    async def body(swarm: Swarm) -> None:
        peer = swarm.peer
        stalled = await swarm.join(have=[0])
        await _stall(stalled, swarm)
        await asyncio.sleep(0.3)  # its reader hands the payload to the one thread
        honest = await swarm.join(have=[1])
        req = await honest.request()
        await honest.send(encode(BlockHeader(req.piece, req.offset, req.length)))
        await asyncio.sleep(0.1)  # the payload is waited for on its own (as from sendfile)
        await honest.send(swarm.block(req))
        try:
            await wait_until(lambda: peer.session.stats.peer_bytes >= req.length, "", 3.0)
        except AssertionError:
            raise AssertionError(
                "an honest peer's whole block sat unread for 3 s: its receive waits for "
                "the one receive thread, held by a peer that sent a header and stalled"
            ) from None

    _run(tmp_path, body, piece_size=MIB, size=2 * MIB, max_peers=1)


def test_an_honest_peer_is_not_closed_as_slow_for_our_own_queue(tmp_path: Path) -> None:
    """BUG (same cause, worse effect): the session times a block from its header
    (``receiving_since``), while the payload waits in our executor's queue. A stalled
    4 MiB block (allowed request_timeout + 4 s) holds the one thread; an honest peer
    sends the artifact's short last block (512 KiB: allowed request_timeout + 0.5 s)
    in full at once, is closed "a block's payload took 1s" (slow_closes, a redial
    backoff) and its block is never taken. A stalled or merely slow peer with big
    blocks gets honest, fast peers dropped."""

    async def body(swarm: Swarm) -> None:
        peer = swarm.peer
        stalled = await swarm.join(have=[0])
        await _stall(stalled, swarm)
        await asyncio.sleep(0.2)
        honest = await swarm.join(have=[1])
        req = await honest.request()
        assert req.length == 512 * KIB
        await honest.send(encode(BlockHeader(req.piece, req.offset, req.length)))
        await asyncio.sleep(0.1)
        await honest.send(swarm.block(req))
        stats = peer.session.stats
        await wait_until(
            lambda: stats.peer_bytes >= req.length or stats.slow_closes > 0,
            "the honest block or a slow close",
            4.0,
        )
        assert stats.slow_closes == 0 and swarm.conn(honest) is not None, (
            "the honest peer sent its whole block at once and was closed as slow: its "
            "payload waited for the receive thread a stalled peer holds"
        )

    _run(
        tmp_path,
        body,
        piece_size=4 * MIB,
        size=4 * MIB + 512 * KIB,
        max_peers=1,
        request_timeout=0.5,
    )


# -- 2. what the thread does right (passes: pins) --------------------------------------


def test_a_stalled_payload_closed_by_the_session_gives_its_buffer_back(tmp_path: Path) -> None:
    """passes: pins that the session's slow close ends the receiving thread and its
    buffer comes back to the pool, once (blocks_in_flight=1: the next peer's block
    needs that very buffer)."""

    async def body(swarm: Swarm) -> None:
        peer = swarm.peer
        stalled = await swarm.join(have=[0])
        await _stall(stalled, swarm)
        await wait_until(lambda: bool(peer._recv._threads), "a receiving thread", 2.0)
        assert not _free_buffers(peer)
        # request_timeout 0.5 + 1 MiB at 1 MiB/s, a tick, the thread's 250 ms poll
        await wait_until(lambda: swarm.conn(stalled) is None, "the slow close", 4.0)
        assert peer.session.stats.slow_closes == 1
        await wait_until(lambda: bool(_free_buffers(peer)), "the buffer back", 1.0)
        free = _free_buffers(peer)
        assert len(free) == 1 and peer._block_pool._allocated == 1, free

        honest = await swarm.join(have=[0, 1])
        req = await honest.request()
        await honest.send(encode(BlockHeader(req.piece, req.offset, req.length)))
        await honest.send(swarm.block(req))
        await wait_until(lambda: peer.session.stats.peer_bytes >= req.length, "the block", 3.0)

    _run(
        tmp_path,
        body,
        piece_size=MIB,
        size=2 * MIB,
        blocks_in_flight=1,
        request_timeout=0.5,
    )


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_a_peer_gone_mid_payload_ends_the_connection_not_the_peer(tmp_path: Path, how: str) -> None:
    """passes: pins that a remote closing (FIN) or resetting (RST) in the middle of a
    payload on the thread ends that connection only (EOFError / OSError, fed as a
    local Closed as the loop's receive did), promptly, with its buffer back once."""

    async def body(swarm: Swarm) -> None:
        peer = swarm.peer
        gone = await swarm.join(have=[0])
        await _stall(gone, swarm)
        await wait_until(lambda: bool(peer._recv._threads), "a receiving thread", 2.0)
        started = time.monotonic()
        if how == "rst":
            gone.reset()
        else:
            gone.sock.shutdown(socket.SHUT_WR)
        await wait_until(lambda: swarm.conn(gone) is None, "the connection closed", 2.0)
        await wait_until(lambda: bool(_free_buffers(peer)), "the buffer back", 1.0)
        assert time.monotonic() - started < 1.0
        assert len(_free_buffers(peer)) == peer._block_pool._allocated == 1
        assert not peer.session.barred and peer._fatal is None

    _run(tmp_path, body, piece_size=MIB, size=2 * MIB, blocks_in_flight=1)


def test_a_connection_closed_under_the_thread_keeps_the_buffer_until_it_ends(
    tmp_path: Path,
) -> None:
    """passes: pins the cancelled reader's hand-back: _close_conn cancels the reader
    while the thread waits in poll on the socket it closes; the buffer is not back at
    once (the thread may still write into it), then comes back once, within the
    thread's 250 ms poll; the thread does not read another connection's bytes."""

    async def body(swarm: Swarm) -> None:
        peer = swarm.peer
        victim = await swarm.join(have=[0])
        await _stall(victim, swarm)
        await wait_until(lambda: bool(peer._recv._threads), "a receiving thread", 2.0)
        conn = swarm.conn(victim)
        assert conn is not None
        peer._close_conn(conn)
        await asyncio.sleep(0)
        assert not _free_buffers(peer), "handed back while its thread may still write it"
        # A new connection meanwhile: its sockets may take the closed descriptor number.
        other = await swarm.join(have=[0, 1])
        req = await other.request()
        await other.send(encode(BlockHeader(req.piece, req.offset, req.length)))
        await other.send(swarm.block(req))
        await wait_until(lambda: peer.session.stats.peer_bytes >= req.length, "the block", 3.0)
        # The block was written from the pool's one buffer and checked: whole and right.
        await wait_until(lambda: peer.session.has(req.piece), "the piece verified", 3.0)
        assert len(_free_buffers(peer)) == peer._block_pool._allocated == 1

    _run(tmp_path, body, piece_size=MIB, size=2 * MIB, blocks_in_flight=1)


def test_control_messages_after_a_threaded_payload_wake_the_reader(tmp_path: Path) -> None:
    """passes: pins SO_RCVLOWAT: the thread leaves it at its last wait's size; the
    reader puts it back to 1 before it waits for control frames, so a lone 17-byte
    Request after the block is read at once (else it would wait for 256 KiB)."""

    async def body(swarm: Swarm) -> None:
        peer = swarm.peer
        remote = await swarm.join(have=[0, 1])
        req = await remote.request()
        await remote.send(encode(BlockHeader(req.piece, req.offset, req.length)))
        await asyncio.sleep(0.1)
        await remote.send(swarm.block(req))
        await wait_until(lambda: peer.session.stats.peer_bytes >= req.length, "the block", 3.0)
        conn = swarm.conn(remote)
        assert conn is not None

        def lowat() -> int:
            return conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)

        await wait_until(lambda: lowat() == 1, "SO_RCVLOWAT back to 1", 1.0)
        await wait_until(lambda: peer.session.has(req.piece), "the piece verified", 3.0)
        # A request for the piece we now hold is served: the 17 bytes were read.
        await remote.send(encode(Request(req.piece, 0, 64 * KIB)))
        header = await _next_header(remote, 2.0)
        assert header == BlockHeader(req.piece, 0, 64 * KIB)

    _run(tmp_path, body, piece_size=MIB, size=2 * MIB)


async def _next_header(remote: Remote, timeout: float) -> BlockHeader:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        event = remote.decoder.next_event()
        if isinstance(event, BlockHeader):
            return event
        if event is not NEED_DATA:
            continue
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"no block header within {timeout:.0f} s")
        remote.decoder.feed(await asyncio.wait_for(loop.sock_recv(remote.sock, 64 * KIB), left))


def test_a_rate_capped_download_stays_on_the_loop(tmp_path: Path) -> None:
    """passes: pins that with --max-download-rate no payload goes to a thread (the
    capped path waits before each read so TCP slows the sender)."""

    async def body(swarm: Swarm) -> None:
        peer = swarm.peer
        remote = await swarm.join(have=[0, 1])
        req = await remote.request()
        await remote.send(encode(BlockHeader(req.piece, req.offset, req.length)))
        await asyncio.sleep(0.1)
        await remote.send(swarm.block(req))
        await wait_until(lambda: peer.session.stats.peer_bytes >= req.length, "the block", 5.0)
        assert not peer._recv._threads, "a capped payload was received on a thread"  # type: ignore[attr-defined]

    _run(tmp_path, body, piece_size=MIB, size=2 * MIB, max_download_rate=1_000 * MIB)


def test_every_block_through_the_thread_lands_whole_and_is_counted_once(
    tmp_path: Path,
) -> None:
    """passes: pins data and counters: a remote answers every request with header,
    payload and the next header in one write (the decoder holds payload bytes before
    the thread takes over); every piece verifies, peer_bytes (fetch --json) is the
    artifact's size and every buffer is back in the pool once."""

    async def body(swarm: Swarm) -> None:
        peer = swarm.peer
        remote = await swarm.join(have=range(peer.m.num_pieces))

        async def serve() -> None:
            while True:
                req = await remote.request(10.0)
                await remote.send(
                    encode(BlockHeader(req.piece, req.offset, req.length)) + swarm.block(req)
                )

        server = asyncio.create_task(serve())
        try:
            await wait_until(lambda: peer.session.complete, "every piece verified", 10.0)
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
        assert peer.session.stats.peer_bytes == peer.m.total_size
        free = _free_buffers(peer)
        assert len({id(b) for b in free}) == len(free) == peer._block_pool._allocated
        assert (peer.store.dest / "w.bin").read_bytes() == swarm.data

    assert _OFF_LOOP_MIN <= 512 * KIB
    _run(tmp_path, body, piece_size=MIB, size=2 * MIB + 300 * KIB, block_size=512 * KIB)


def test_shutdown_with_a_stalled_payload_leaves_no_thread_running(tmp_path: Path) -> None:
    """passes: pins _shutdown: with a thread waiting on a stalled payload, it returns
    within a second and no swarm-recv thread is left (a live non-daemon thread would
    hold the process at exit)."""
    took: list[float] = []

    async def body(swarm: Swarm) -> None:
        peer = swarm.peer
        stalled = await swarm.join(have=[0])
        await _stall(stalled, swarm)
        await wait_until(lambda: bool(peer._recv._threads), "a receiving thread", 2.0)
        started = time.monotonic()
        await peer._shutdown()
        took.append(time.monotonic() - started)
        assert not [t for t in _recv_threads() if t.is_alive()]

    _run(tmp_path, body, piece_size=MIB, size=2 * MIB)
    assert took and took[0] < 1.0, took


# -- a connection's unsent bytes are bounded (TCP_NOTSENT_LOWAT) ---------------------------


@pytest.mark.skipif(not hasattr(socket, "TCP_NOTSENT_LOWAT"), reason="no TCP_NOTSENT_LOWAT here")
@pytest.mark.parametrize(
    ("config", "expected"),
    [({}, MIB // 4), ({"unsent_bytes": 96 * KIB}, 96 * KIB)],
)
def test_a_peer_connection_holds_at_most_a_quarter_block_unsent(
    tmp_path: Path, config: dict[str, Any], expected: int
) -> None:
    """passes: pins. With 8 MiB send buffers and no limit, blocks waited ~0.8 s in the
    kernel after the upload scheduler chose them (``swarm.peer.tune_socket``)."""

    async def body(swarm: Swarm) -> None:
        remote = await swarm.join(have=[])
        conn = swarm.conn(remote)
        assert conn is not None
        got = conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)
        assert got == expected
        assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    _run(tmp_path, body, piece_size=MIB, size=4 * MIB, **config)


def test_the_unsent_limit_is_a_quarter_block_and_never_tiny() -> None:
    assert unsent_limit(MIB) == 256 * KIB
    assert unsent_limit(4 * MIB) == MIB
    assert unsent_limit(16 * KIB) == 64 * KIB
