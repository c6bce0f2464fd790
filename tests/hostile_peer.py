"""Hostile peers for loopback tests against real ``swarm`` processes.

They speak the real wire protocol, sans I/O (``swarm.protocol``: ``PeerHandshake``,
``FrameDecoder``, ``encode``), over plain sockets and asyncio streams, and use no
part of the peer engine (``swarm.peer``), so what they do is up to the test:

- ``HostilePeers``: an event loop on a thread of its own that runs

  peers (``add_listener``) that listen on a 127.x address, announce to the tracker
  under made-up peer ids, claim a have-set (by default every piece) there and in
  their Bitfield, and then misbehave: ``Behaviour.SILENT`` never answers a request
  (keep-alives only), ``Behaviour.TRICKLE`` answers a request with its BlockHeader
  and one payload byte, then one byte per ``TRICKLE_INTERVAL``. A silent one that
  claims nothing is a harmless unfinished member: it keeps a complete peer from
  leaving before the peers it should serve arrive.

- ``hog_uploads``: dials a peer, completes the handshake, sends requests and never
  reads its socket again (a tiny receive buffer), so every block sent to it stays
  in flight.
- ``idle_connections`` / ``wait_closed``: connections that never send a byte (no
  handshake), and a bounded wait for the remote to close them.
- ``accepts_handshake``: whether a peer's accept loop still answers a dialer's Hello.

Every wait is bounded in time; ``HostilePeers.stop`` ends every task and closes
every socket it opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import secrets
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from core.auth import ClusterKey, new_nonce
from core.bitfield import Bitfield
from core.digest import PEER_ID_LENGTH
from core.errors import RemoteProtocolError, TrackerError
from swarm.announce import Announce, TrackerClient
from swarm.protocol import (
    NEED_DATA,
    BitfieldMsg,
    BlockHeader,
    ConnectionClosed,
    FrameDecoder,
    Handshake,
    Hello,
    KeepAlive,
    PeerHandshake,
    Request,
    encode,
)

ANNOUNCE_EVERY: Final = 1.0
"""Seconds between a member's announces: well inside the tracker's peer TTL."""
KEEPALIVE_EVERY: Final = 2.0
"""A silent peer still sends keep-alives, so it is never dropped for being idle."""
TRICKLE_INTERVAL: Final = 1.0
"""Seconds between the payload bytes of a trickling peer."""
MAX_ROUNDS: Final = 600
"""Announces, keep-alives or trickled bytes of one peer at most: none outlives a test."""
READY_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 5.0
IO_TIMEOUT: Final = 5.0
READ_CHUNK: Final = 64 * 1024

T = TypeVar("T")
M = TypeVar("M", Hello, Handshake, BitfieldMsg)


@dataclass(frozen=True)
class Target:
    """The swarm a hostile peer claims to be part of."""

    ref: str
    root_hex: str
    num_pieces: int
    key: ClusterKey = field(default_factory=lambda: ClusterKey(None))

    @property
    def root(self) -> bytes:
        return bytes.fromhex(self.root_hex)

    def everything(self) -> Bitfield:
        return Bitfield.full(self.num_pieces)

    def nothing(self) -> Bitfield:
        return Bitfield(self.num_pieces)


class Behaviour(enum.Enum):
    """What a listener does once the handshake is done and it has claimed every piece."""

    SILENT = "silent"
    """Never answers a request; sends a keep-alive every ``KEEPALIVE_EVERY``."""
    TRICKLE = "trickle"
    """Answers the first request with its header and one payload byte, then one byte
    per ``TRICKLE_INTERVAL`` (one block at a time, as the stream is serial)."""


@dataclass
class Tally:
    """What the hostile peers saw, over all their connections."""

    connections: int = 0
    handshakes: int = 0
    requests: int = 0
    blocks_started: int = 0
    payload_bytes: int = 0
    closed_by_remote: int = 0
    announces: int = 0
    announce_errors: list[str] = field(default_factory=list)
    protocol_errors: list[str] = field(default_factory=list)


@dataclass
class _Member:
    peer_id: bytes
    host: str
    port: int
    have: Bitfield
    task: asyncio.Task[None] | None = None


class HostilePeers:
    """Hostile members and listeners of one swarm, on an event loop of their own thread.

    ``tracker_url`` is the tracker they announce to; ``target`` the swarm they claim.
    """

    def __init__(self, tracker_url: str, target: Target, *, seed: int = 0) -> None:
        self.tracker_url = tracker_url
        self.target = target
        self.tally = Tally()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: TrackerClient | None = None
        self._members: dict[bytes, _Member] = {}
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- from the test's thread ----------------------------------------------------

    def add_listener(
        self, host: str, behaviour: Behaviour, have: Bitfield | None = None
    ) -> tuple[bytes, int]:
        """A peer listening on ``host`` that claims ``have`` (default: every piece) to the
        tracker and in its Bitfield, and behaves as ``behaviour``; returns its peer id
        and port once the tracker has answered its first announce. It announces until
        ``leave`` or ``stop``."""
        peer_id = self._rng.randbytes(PEER_ID_LENGTH)
        claim = self.target.everything() if have is None else have
        port = self._call(self._listen(host, peer_id, behaviour, claim))
        self._call(self._start_member(_Member(peer_id, host, port, claim)))
        return peer_id, port

    def leave(self, peer_id: bytes) -> None:
        """Stop announcing ``peer_id`` and tell the tracker it left."""
        self._call(self._leave(peer_id))

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="hostile-peers", daemon=True)
        self._thread.start()
        if not ready.wait(READY_TIMEOUT):
            raise RuntimeError("the hostile peers' event loop did not start")
        self._client = TrackerClient(self.tracker_url, key=self.target.key)

    def stop(self) -> None:
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return

        async def shutdown() -> None:
            for server in self._servers:
                server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for server in self._servers:
                await server.wait_closed()
            if self._client is not None:
                await self._client.close()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(STOP_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(STOP_TIMEOUT)
            if not thread.is_alive():
                loop.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("hostile peers not started")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(READY_TIMEOUT)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- members -------------------------------------------------------------------

    def _announce_msg(self, member: _Member, *, leaving: bool = False) -> Announce:
        return Announce(
            ref=self.target.ref,
            peer_id=member.peer_id,
            port=member.port,
            have=member.have.to_bytes(),
            host=member.host,
            done=member.have.complete,
            leaving=leaving,
        )

    async def _start_member(self, member: _Member) -> None:
        assert self._client is not None
        await self._client.announce(self._announce_msg(member))  # raises if refused
        with self._lock:
            self.tally.announces += 1
        self._members[member.peer_id] = member
        member.task = self._spawn(self._announce_loop(member))

    async def _announce_loop(self, member: _Member) -> None:
        assert self._client is not None
        for _ in range(MAX_ROUNDS):
            await asyncio.sleep(ANNOUNCE_EVERY)
            try:
                await self._client.announce(self._announce_msg(member))
            except TrackerError as exc:  # a tracker restarting: try again next time
                with self._lock:
                    self.tally.announce_errors.append(str(exc))
                continue
            with self._lock:
                self.tally.announces += 1

    async def _leave(self, peer_id: bytes) -> None:
        member = self._members.pop(peer_id)
        if member.task is not None:
            member.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await member.task
        assert self._client is not None
        await self._client.announce(self._announce_msg(member, leaving=True))

    # --- listeners -----------------------------------------------------------------

    async def _listen(
        self, host: str, peer_id: bytes, behaviour: Behaviour, claim: Bitfield
    ) -> int:
        port = 0

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            try:
                await self._serve(reader, writer, peer_id, port, behaviour, claim)
            finally:
                self._tasks.discard(task)

        server = await asyncio.start_server(serve, host, 0)
        self._servers.append(server)
        port = int(server.sockets[0].getsockname()[1])
        return port

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer_id: bytes,
        port: int,
        behaviour: Behaviour,
        claim: Bitfield,
    ) -> None:
        target = self.target
        with self._lock:
            self.tally.connections += 1
        handshake = PeerHandshake(
            target.key,
            dialer=False,
            root=target.root,
            peer_id=peer_id,
            listen_port=port,
            nonce=new_nonce(),
        )
        decoder = FrameDecoder(num_pieces=target.num_pieces)
        requests: deque[Request] = deque()
        wake = asyncio.Event()
        misbehaving: asyncio.Task[None] | None = None
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                if data:
                    decoder.feed(data)
                else:
                    decoder.feed_eof()
                while (event := decoder.next_event()) is not NEED_DATA:
                    if isinstance(event, Hello | Handshake):
                        for reply in handshake.receive(event):
                            writer.write(encode(reply))
                        if handshake.done:
                            writer.write(encode(BitfieldMsg.from_bitfield(claim)))
                            with self._lock:
                                self.tally.handshakes += 1
                            misbehaving = self._spawn(
                                self._misbehave(writer, behaviour, requests, wake)
                            )
                    elif isinstance(event, Request):
                        with self._lock:
                            self.tally.requests += 1
                        requests.append(event)
                        wake.set()
                    elif isinstance(event, ConnectionClosed):
                        with self._lock:
                            self.tally.closed_by_remote += 1
                        return
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            with self._lock:
                self.tally.closed_by_remote += 1
        except RemoteProtocolError as exc:
            with self._lock:
                self.tally.protocol_errors.append(str(exc))
        finally:
            if misbehaving is not None:
                misbehaving.cancel()
            writer.close()

    async def _misbehave(
        self,
        writer: asyncio.StreamWriter,
        behaviour: Behaviour,
        requests: deque[Request],
        wake: asyncio.Event,
    ) -> None:
        with contextlib.suppress(OSError):
            if behaviour is Behaviour.SILENT:
                for _ in range(MAX_ROUNDS):
                    await asyncio.sleep(KEEPALIVE_EVERY)
                    writer.write(encode(KeepAlive()))
                    await writer.drain()
                return
            trickled = 0  # Behaviour.TRICKLE
            while trickled < MAX_ROUNDS:
                while not requests:
                    wake.clear()
                    await wake.wait()
                req = requests.popleft()
                writer.write(encode(BlockHeader(req.piece, req.offset, req.length)))
                with self._lock:
                    self.tally.blocks_started += 1
                for _ in range(min(req.length, MAX_ROUNDS - trickled)):
                    writer.write(b"\x00")
                    await writer.drain()
                    trickled += 1
                    with self._lock:
                        self.tally.payload_bytes += 1
                    await asyncio.sleep(TRICKLE_INTERVAL)


# --------------------------------------------------------------------------------------
# Plain-socket hostiles, run from the test's own thread
# --------------------------------------------------------------------------------------


def _read_until(sock: socket.socket, decoder: FrameDecoder, wanted: type[M], timeout: float) -> M:
    """Read from ``sock`` until ``decoder`` yields a ``wanted`` event (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        event = decoder.next_event()
        if isinstance(event, wanted):
            return event
        if isinstance(event, ConnectionClosed):
            raise ConnectionError(f"closed before a {wanted.__name__} arrived")
        if event is not NEED_DATA:
            continue
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {wanted.__name__} within {timeout:.0f} s")
        sock.settimeout(left)
        data = sock.recv(READ_CHUNK)
        if data:
            decoder.feed(data)
        else:
            decoder.feed_eof()


def dial_handshake(
    addr: tuple[str, int], target: Target, *, rcvbuf: int | None = None
) -> socket.socket:
    """Dial ``addr`` and complete the connect flow as a dialer; the connected socket.

    With ``rcvbuf`` the receive buffer is set (before connecting, so the window
    offered to the remote is that small).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(IO_TIMEOUT)
        sock.connect(addr)
        flow = PeerHandshake(
            target.key,
            dialer=True,
            root=target.root,
            peer_id=secrets.token_bytes(PEER_ID_LENGTH),
            listen_port=0,
            nonce=new_nonce(),
        )
        decoder = FrameDecoder(num_pieces=target.num_pieces)
        for msg in flow.start():
            sock.sendall(encode(msg))
        hello = _read_until(sock, decoder, Hello, IO_TIMEOUT)
        for msg in flow.receive(hello):
            sock.sendall(encode(msg))
        theirs = _read_until(sock, decoder, Handshake, IO_TIMEOUT)
        flow.receive(theirs)
        _read_until(sock, decoder, BitfieldMsg, IO_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return sock


def hog_uploads(
    addr: tuple[str, int], target: Target, requests: Iterable[Request], *, rcvbuf: int = 4096
) -> socket.socket:
    """Dial ``addr``, complete the handshake, send ``requests`` and never read again.

    The socket is returned open: the caller closes it when the test is over.
    """
    sock = dial_handshake(addr, target, rcvbuf=rcvbuf)
    try:
        sock.sendall(encode(BitfieldMsg.from_bitfield(target.nothing())))
        sock.sendall(b"".join(encode(req) for req in requests))
    except BaseException:
        sock.close()
        raise
    return sock


def accepts_handshake(addr: tuple[str, int], target: Target, timeout: float = IO_TIMEOUT) -> bool:
    """Whether the peer at ``addr`` accepts a connection and answers a dialer's Hello."""
    try:
        with socket.create_connection(addr, timeout) as sock:
            flow = PeerHandshake(
                target.key,
                dialer=True,
                root=target.root,
                peer_id=secrets.token_bytes(PEER_ID_LENGTH),
                listen_port=0,
                nonce=new_nonce(),
            )
            for msg in flow.start():
                sock.sendall(encode(msg))
            hello = _read_until(sock, FrameDecoder(), Hello, timeout)
            flow.receive(hello)  # raises unless it proved the cluster token
            return True
    except (OSError, RemoteProtocolError):
        return False


def idle_connections(
    addr: tuple[str, int], count: int, *, timeout: float = IO_TIMEOUT
) -> list[socket.socket]:
    """``count`` connections to ``addr`` that send nothing; the caller closes them."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.settimeout(timeout)
            sock.connect(addr)
            sock.setblocking(False)
    except BaseException:
        close_all(socks)
        raise
    return socks


def wait_closed(
    socks: list[socket.socket], timeout: float, *, at_least: int | None = None
) -> tuple[int, int]:
    """Wait (bounded) until the remote closed ``at_least`` of ``socks`` (default: all),
    reading what it sends.

    Returns (connections closed by the remote, bytes received over all of them).
    """
    wanted = len(socks) if at_least is None else min(at_least, len(socks))
    received = 0
    closed = 0
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        while closed < wanted:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in selector.select(min(left, 0.5)):
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                try:
                    data = conn.recv(READ_CHUNK)
                except BlockingIOError:
                    continue
                except OSError:  # reset by the remote
                    data = b""
                received += len(data)
                if not data:
                    closed += 1
                    selector.unregister(conn)
    return closed, received


def close_all(socks: Iterable[socket.socket]) -> None:
    for sock in socks:
        sock.close()
