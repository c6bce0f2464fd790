"""The peer: one ``swarm fetch --tracker`` process on a GPU node.

It plays two roles at once. As a **seeder** it pulls the pieces the tracker
assigned to it from the origin (ranged reads into a reused buffer, verified, then
announced to every connected peer). As a **downloader** it fetches every other
piece from peers, rarest first, several blocks in flight per connection, one piece
from several peers at once; blocks are written in place and the assembled piece is
verified with blake3 before it counts, is recorded, or is served.

Connections use raw non-blocking sockets with ``loop.sock_*``: payloads are read
with ``recv_into`` straight into a reused block buffer and sent with
``sock_sendfile`` straight from the page cache. Each connection has one reader
task and one writer task; all swarm state (picker, upload scheduler, contributor
records) is touched only from the event loop, so it needs no locks.

Upload policy: no choking. ``UploadScheduler`` grants a fixed number of upload
slots round-robin across every peer that asks, so no peer starves. Tit-for-tat
exists to punish free riders among strangers; in one trusted cluster every node
wants every other node to finish, and withholding upload only slows the swarm.

A peer whose data fails verification is dropped and barred for the rest of this
swarm: if a failed piece came from one peer, that peer; if from several, the one
peer common to two failed pieces.

Connections prove the cluster token before anything else (the connect flow is
``swarm.protocol.PeerHandshake``): an unproven connection is sent nothing but our
Hello, and one that fails the handshake (garbage, a bad proof, another root or
protocol version) is dropped with a warning and counted (``auth_failures``). An
unproven connection is closed after ``handshake_timeout`` (``handshake_timeouts``)
and at most ``max_pending_conns`` accepted ones wait at a time, so strangers
can't hold the peer's descriptors; running out of descriptors pauses accepting,
never ends it.

Byte-rate caps (``swarm.limiter``), each per process and shared by every
connection: ``max_upload_rate`` paces block payloads sent, a slice at a time;
``max_download_rate`` paces payload reads from peers (a read waits before its
``recv_into``, so TCP backpressure slows the sender) and this peer's origin reads;
and the origin rate the tracker hands out in each announce reply (this peer's
share of the cluster's origin cap) paces origin reads too. Uncapped, a block
costs one attribute read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import mmap
import os
import random
import socket
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

from core.auth import ClusterKey, new_nonce
from core.bitfield import Bitfield
from core.buffers import BufferPool
from core.errors import (
    ConfigError,
    RemoteProtocolError,
    SwarmError,
    TrackerError,
    VerificationError,
)
from core.manifest import Manifest
from seeder.origin import Origin, open_origin
from seeder.reader import RangedReader
from swarm.announce import Announce, BadAnnounce, Reply, TrackerClient, check_zone
from swarm.choker import UploadScheduler
from swarm.fetch import FetchConfig, FetchResult, fetch_direct, process_age
from swarm.hosts import valid_host
from swarm.limiter import RateLimiter, acquire_all
from swarm.picker import BlockRequest, PiecePicker
from swarm.protocol import (
    NEED_DATA,
    BitfieldMsg,
    BlockEnd,
    BlockHeader,
    BlockPayload,
    Cancel,
    ConnectionClosed,
    FrameDecoder,
    Handshake,
    Have,
    Hello,
    KeepAlive,
    Message,
    PeerHandshake,
    Reject,
    Request,
    encode,
)
from swarm.store import PieceStore

log = logging.getLogger("swarm.peer")

_PAYLOAD_LOWAT = 256 * 1024

# accept() errors that end one connection or say "not now", never the accept loop.
_ACCEPT_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ACCEPT_TRANSIENT: Final = _ACCEPT_RESOURCES | {errno.ECONNABORTED, errno.EPROTO, errno.EPERM}
_ACCEPT_PAUSE_MIN: Final = 0.05
_ACCEPT_PAUSE_MAX: Final = 1.0
_SHUTDOWN_ROUNDS: Final = 50
_SHUTDOWN_ROUND_SECONDS: Final = 0.2
# Payload bytes sent or read per wait on a byte-rate cap: small enough that a
# capped peer's traffic is smooth, large enough that waits are few.
_RATE_SLICE: Final = 256 * 1024


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until ``sock`` is readable (for a listening socket: a connection is waiting)."""
    ready: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


def _set_rcvlowat(sock: socket.socket, n: int) -> int:
    """Make ``sock`` readable only once ``n`` bytes are waiting; returns ``n``."""
    with contextlib.suppress(OSError):  # not every platform lets SO_RCVLOWAT be set
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
    return n


@dataclass
class PeerConfig:
    """Settings of one peer; every one is reachable from ``swarm fetch`` flags."""

    listen_host: str = "0.0.0.0"
    listen_port: int = 0
    advertise_host: str = ""
    block_size: int = 4 * 1024 * 1024
    requests_per_peer: int = 6
    upload_slots: int = 16
    linger: float = 300.0
    tracker_timeout: float = 120.0
    fallback_direct: bool = False
    catalog: str | None = None
    origin_url: str | None = None
    origin_pieces_in_flight: int = 2
    blocks_in_flight: int = 8  # received blocks waiting for the disk thread, across connections
    range_size: int = 16 * 1024 * 1024
    origin_concurrency: int = 16
    origin_retry_time: float = 600.0  # seconds a throttled or failing origin range is retried
    durable: bool = True
    direct_io: bool = True  # write and serve pieces bypassing the page cache where possible
    keepalive: float = 20.0
    idle_timeout: float = 90.0
    serve_corrupt: bool = False  # fault injection for tests: flip a bit of every block sent
    key: ClusterKey = field(default_factory=lambda: ClusterKey(None))  # the cluster token
    handshake_timeout: float = 10.0  # an unproven connection is closed after this long
    max_pending_conns: int = 256  # accepted connections still in their handshake, at most
    open_files: int = 32  # artifact files kept open for uploads when idle
    max_upload_rate: int | None = None  # bytes/s of block payload sent to peers; None: uncapped
    max_download_rate: int | None = None  # bytes/s from peers and the origin; None: uncapped
    zone: str = ""  # this node's zone or rack, sent in announces ("" for none)
    zone_patience: float = 5.0  # seconds a same-zone peer may leave requests unanswered


class _OpenFiles:
    """The artifact's files open for uploads: every one in use, and up to ``limit`` idle.

    An artifact may have tens of thousands of files; holding each open once served
    would run the process out of descriptors. A file is closed only when no send
    is using it: closing it under ``sendfile`` could let its descriptor number be
    reused by another file, whose bytes would then go out as this block.
    """

    def __init__(self, path_of: Callable[[int], Path], limit: int) -> None:
        self._path_of = path_of
        self._limit = max(limit, 1)
        self._open: OrderedDict[int, BinaryIO] = OrderedDict()  # least recently used first
        self._users: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self._open)

    @contextlib.contextmanager
    def lease(self, file_index: int) -> Iterator[BinaryIO]:
        f = self._open.get(file_index)
        if f is None:
            f = open(self._path_of(file_index), "rb")  # noqa: SIM115 - closed by _trim or close
            self._open[file_index] = f
        self._open.move_to_end(file_index)
        self._users[file_index] += 1
        try:
            yield f
        finally:
            self._users[file_index] -= 1
            if not self._users[file_index]:
                del self._users[file_index]
            self._trim()

    def _trim(self) -> None:
        excess = len(self._open) - self._limit
        for index in list(self._open):
            if excess <= 0:
                break
            if index not in self._users:
                self._open.pop(index).close()
                excess -= 1

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open.clear()


class _Conn:
    """One connection to another peer: a reader task, a writer task, and its queues."""

    def __init__(
        self,
        node: SwarmPeer,
        sock: socket.socket,
        addr: tuple[str, int],
        outbound: bool,
        handshake: PeerHandshake,
    ) -> None:
        self.node = node
        self.sock = sock
        self.addr = addr
        self.outbound = outbound
        self.handshake = handshake
        self.deadline: asyncio.TimerHandle | None = None
        # Set when we refuse a proven dialer (duplicate, barred): the writer sends
        # our Handshake first, so the dialer sees a refusal, not a token mismatch.
        self.refused: RemoteProtocolError | None = None
        self.peer_id = b""
        self.control: deque[bytes] = deque()
        self.uploads: deque[Request] = deque()
        self.wake = asyncio.Event()
        self.requested: set[BlockRequest] = set()
        # Blocks we cancelled: the data may already be on the wire, which is no offence.
        self.cancelled: dict[BlockRequest, None] = {}
        self.bitfield: Bitfield | None = None
        self.closed = False
        self.last_recv = time.monotonic()
        self.tasks: list[asyncio.Task[None]] = []
        self.received_bytes = 0
        # In another zone than ours (both declared): what it sends counts as
        # cross-zone bytes.
        self.other_zone = False
        # Asked only for what no peer the picker counts as local has: a peer of
        # another zone, or one of ours that holds pieces but does not serve them.
        self.remote = False
        # When the requests now outstanding started waiting, and when payload last came.
        self.waiting_since = 0.0
        self.last_payload = 0.0
        # Left our requests unanswered (see SwarmPeer._zone_watch_loop): kept to one
        # request in flight, a probe, so it can't sit on a pipeline's worth of blocks.
        self.demoted = False

    def send(self, msg: Message) -> None:
        if self.closed:
            return
        if len(self.control) > 100_000:
            raise RemoteProtocolError("peer is not reading: its control queue overflowed")
        self.control.append(encode(msg))
        self.wake.set()

    def cancel(self, block: BlockRequest) -> None:
        if block in self.requested:
            self.requested.discard(block)
            self.cancelled[block] = None
            while len(self.cancelled) > 4096:
                del self.cancelled[next(iter(self.cancelled))]
            self.send(Cancel(*block))

    def __repr__(self) -> str:
        return f"<peer {self.peer_id.hex()[:8] or '?'} {self.addr[0]}:{self.addr[1]}>"


class SwarmPeer:
    """Fetch one artifact through the swarm, serve it while others need it, then leave."""

    def __init__(
        self,
        manifest: Manifest,
        dest: os.PathLike[str] | str,
        tracker: TrackerClient,
        *,
        config: PeerConfig | None = None,
        progress: Callable[[int], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.m = manifest
        self.config = config or PeerConfig()
        self.tracker = tracker
        self.progress = progress
        self.rng = rng or random.Random()
        self.peer_id = self.rng.randbytes(20)
        self.store = PieceStore(
            dest,  # type: ignore[arg-type]
            manifest,
            durable=self.config.durable,
            direct_io=self.config.direct_io,
        )
        self.block_size = min(self.config.block_size, manifest.piece_size)
        self.picker: PiecePicker[_Conn] = PiecePicker(
            manifest.piece_lengths, self.block_size, self.rng
        )
        self.uploads: UploadScheduler[_Conn, Request] = UploadScheduler(self.config.upload_slots)
        try:
            check_zone(self.config.zone)
        except BadAnnounce as exc:
            raise ConfigError(f"--zone: {exc}") from exc
        # Byte-rate caps, shared by every connection; the origin one follows the tracker.
        self.upload_limit = RateLimiter(self.config.max_upload_rate)
        self.download_limit = RateLimiter(self.config.max_download_rate)
        self.origin_limit = RateLimiter(None)
        self.origin: Origin = open_origin(self.config.origin_url or manifest.origin)
        self.reader = RangedReader(
            self.origin,
            range_size=self.config.range_size,
            max_concurrency=self.config.origin_concurrency,
            retry_time=self.config.origin_retry_time,
            rate_limit=self._origin_rate_limit,
            rate_limited=lambda: self.download_limit.limited or self.origin_limit.limited,
        )
        self.conns: dict[bytes, _Conn] = {}
        self.pending_conns: set[_Conn] = set()
        self.barred: set[bytes] = set()
        self.known_peers: dict[bytes, tuple[str, int]] = {}
        self._dials: set[bytes] = set()  # peers we are connecting to
        self.origin_tasks: dict[int, asyncio.Task[None]] = {}
        self.origin_progress: dict[int, int] = {}
        self.contributors: dict[int, set[bytes]] = {}
        self.failed_sets: list[set[bytes]] = []
        self.verifying: set[int] = set()
        self.finished = asyncio.Event()
        self._finishing = False
        self._announce_soon = asyncio.Event()
        self.swarm_complete = False
        self.listen_port = 0
        self.peer_bytes = 0
        self.cross_zone_bytes = 0
        self.peer_zones: dict[bytes, str] = {}  # from the tracker's replies
        self.uploaded_bytes = 0
        # Bytes received twice, by why: crossed our Cancel / piece already verified or
        # verifying / block already on disk.
        self.duplicate_causes = {"cancelled": 0, "had": 0, "written": 0}
        self.origin_pieces = 0
        self.corrupt_pieces = 0
        self._server: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._files = _OpenFiles(
            lambda index: self.store.dest / self.m.files[index].path, self.config.open_files
        )
        # Connections dropped before the remote proved the token (see _handshake_failed),
        # closed for not finishing the handshake in time, and refused for too many pending.
        self.auth_failures = 0
        self.handshake_timeouts = 0
        self.pending_refused = 0  # accepted and closed at once: too many pending
        self._refusal_logged = 0.0
        self._fatal: BaseException | None = None
        self._origin_pool = BufferPool(
            min(manifest.piece_size, max(manifest.piece_lengths, default=1)),
            self.config.origin_pieces_in_flight,
        )
        # Blocks received from peers wait in these buffers while the disk thread
        # writes (and hashes) them, so the readers keep reading meanwhile.
        self._block_pool = BufferPool(self.block_size, self.config.blocks_in_flight)
        # Blocks read for upload (direct I/O); rounded up to whole pages for the read.
        self._upload_pool = BufferPool(-(-self.block_size // 4096) * 4096, self.config.upload_slots)
        # One thread owns the assembly of pieces from blocks: writes, hashing and
        # verification of a piece happen in order without locks (see PieceStore).
        self._disk = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="swarm-disk")
        self._upload_wake = asyncio.Event()
        self.started = time.monotonic()
        self.finished_at: float | None = None

    # --- top level -----------------------------------------------------------------

    async def run(self) -> FetchResult:
        result = FetchResult(
            self.m.name,
            self.m.root_hex,
            str(self.store.dest),
            self.m.total_size,
            pieces=self.m.num_pieces,
        )
        startup = process_age()
        if startup is not None:
            result.extra["startup_seconds"] = round(startup, 3)
            log.info("peer engine starting %.2fs after the process started", startup)
        try:
            await asyncio.to_thread(self.store.open)
            result.reused_bytes = self.store.reused_bytes
            for piece in self.store.verified_pieces():
                self.picker.mark_have(piece)
            if self.progress and self.store.reused_bytes:
                self.progress(self.store.reused_bytes)
            await self._listen()
            self._spawn(self._accept_loop(), "accept")
            self._spawn(self._upload_loop(), "uploads")
            self._spawn(self._keepalive_loop(), "keepalive")
            if self.config.zone:
                self._spawn(self._zone_watch_loop(), "zone-watch")
            if self.store.complete:
                self._finishing = True
                await self._finish()
            announcer = asyncio.create_task(self._announce_loop())
            self._tasks.add(announcer)
            await self._wait_finished(announcer)
            result.verified = True
            await self._linger(announcer)
        finally:
            await self._shutdown()
            result.origin_bytes = self.origin.counters.bytes_read
            result.origin_retries = self.origin.counters.retries
            result.peer_bytes = self.peer_bytes
            result.seconds = (self.finished_at or time.monotonic()) - self.started
            result.extra.update(
                uploaded_bytes=self.uploaded_bytes,
                duplicate_bytes=sum(self.duplicate_causes.values()),
                duplicate_causes=dict(self.duplicate_causes),
                origin_pieces=self.origin_pieces,
                corrupt_pieces=self.corrupt_pieces,
                cross_zone_bytes=self.cross_zone_bytes,
                barred_peers=sorted(p.hex() for p in self.barred),
                auth_failures=self.auth_failures,
                handshake_timeouts=self.handshake_timeouts,
                pending_refused=self.pending_refused,
                peer_id=self.peer_id.hex(),
                linger_seconds=round(time.monotonic() - (self.finished_at or time.monotonic()), 3),
            )
        return result

    async def _origin_rate_limit(self, n: int) -> None:
        """Before an origin read of ``n`` bytes: wait out the download and origin caps."""
        if self.download_limit.limited or self.origin_limit.limited:
            await acquire_all(n, (self.download_limit, self.origin_limit))

    async def _wait_finished(self, announcer: asyncio.Task[None]) -> None:
        done_wait = asyncio.create_task(self.finished.wait())
        try:
            await asyncio.wait({done_wait, announcer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            done_wait.cancel()
        if self._fatal is not None:
            raise self._fatal
        if not self.finished.is_set():
            announcer.result()  # re-raise what ended the announcer
            raise SwarmError("announcing stopped before the artifact was complete")

    async def _linger(self, announcer: asyncio.Task[None]) -> None:
        """Keep serving until every peer of the swarm has finished (bounded by ``linger``)."""
        deadline = time.monotonic() + self.config.linger
        while not self.swarm_complete and time.monotonic() < deadline and not announcer.done():
            await asyncio.sleep(0.1)
        with contextlib.suppress(TrackerError):
            await asyncio.wait_for(self._announce(leaving=True), 3.0)

    def _spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._fatal is None:
            log.error("%s failed: %s", task.get_name(), exc)
            self._fatal = exc
            self.finished.set()  # wake the waiter, which raises it

    async def _shutdown(self) -> None:
        for conn in list(self.conns.values()) + list(self.pending_conns):
            self._close_conn(conn, None)
        await self._cancel_tasks()
        # Connections a task opened while being cancelled (see _cancel_tasks).
        for conn in list(self.conns.values()) + list(self.pending_conns):
            self._close_conn(conn, None)
        if self._server is not None:
            self._server.close()
        # Let writes already handed to the disk thread finish before the files close.
        await asyncio.get_running_loop().run_in_executor(None, self._disk.shutdown)
        self._files.close()
        self.store.close()
        await self.origin.close()

    async def _cancel_tasks(self) -> None:
        """Cancel every task of the peer and wait until each has ended.

        Cancelled once, a task can go on: on Python 3.11 ``asyncio.wait_for`` drops
        a cancellation that arrives just as what it waits for completes (the
        announcer waits that way), and a live task may spawn new ones. So cancel
        until none is left, within a bound.
        """
        ended: set[asyncio.Task[None]] = set()
        for _ in range(_SHUTDOWN_ROUNDS):
            live = [task for task in self._tasks if not task.done()]
            if not live:
                break
            for task in live:
                task.cancel()
            done, _ = await asyncio.wait(live, timeout=_SHUTDOWN_ROUND_SECONDS)
            ended |= done
        else:
            log.error("%d tasks did not end when cancelled", sum(not t.done() for t in self._tasks))
        await asyncio.gather(*ended, return_exceptions=True)

    # --- tracker -------------------------------------------------------------------

    async def _announce(self, *, leaving: bool = False) -> Reply:
        msg = Announce(
            ref=self.m.ref,
            peer_id=self.peer_id,
            port=self.listen_port,
            have=self.picker.have.to_bytes(),
            host=self.config.advertise_host,
            progress=dict(self.origin_progress),
            barred=sorted(self.barred),
            done=self.store.complete,
            leaving=leaving,
            zone=self.config.zone,
        )
        return await self.tracker.announce(msg)

    async def _announce_loop(self) -> None:
        interval = 1.0
        backoff = 0.5
        unreachable_since: float | None = None
        while True:
            try:
                reply = await self._announce()
            except TrackerError as exc:
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                down = now - unreachable_since
                log.warning(
                    "tracker unreachable for %.0fs (%s); retrying in %.1fs", down, exc, backoff
                )
                if down > self.config.tracker_timeout and not self.store.complete:
                    if self.config.fallback_direct:
                        log.warning(
                            "falling back to fetching the rest directly from the origin (--fallback-direct)"
                        )
                        await self._fallback_direct()
                        return
                    raise TrackerError(
                        f"tracker unreachable for {down:.0f}s: giving up (pass --fallback-direct to read the rest "
                        "from the origin instead)"
                    ) from exc
                await asyncio.sleep(backoff * (0.5 + self.rng.random()))
                backoff = min(backoff * 2, 10.0)
                continue
            if unreachable_since is not None:
                log.warning("tracker reachable again")
            unreachable_since, backoff = None, 0.5
            interval = reply.interval
            self._apply_reply(reply)
            # Announce early when an origin pull finished, so the next assignment
            # doesn't wait a whole interval; at most every tenth of an interval.
            await asyncio.sleep(interval / 10)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._announce_soon.wait(), interval * 0.9)
            self._announce_soon.clear()

    def _apply_reply(self, reply: Reply) -> None:
        self.swarm_complete = reply.complete
        if reply.origin_rate != self.origin_limit.rate:
            self.origin_limit.set_rate(reply.origin_rate)
        assigned = set(reply.assigned)
        for piece, task in list(self.origin_tasks.items()):
            if piece not in assigned:
                log.info("piece %d was reassigned by the tracker; dropping our origin pull", piece)
                task.cancel()
        if reply.assigned and not self.origin_pieces and not self.origin_tasks:
            log.info(
                "first origin assignment (%d pieces) %.2fs after the process started",
                len(reply.assigned),
                process_age() or 0.0,
            )
        for piece in reply.assigned:
            if (
                0 <= piece < self.m.num_pieces
                and piece not in self.origin_tasks
                and not self.store.has(piece)
            ) and self.picker.reserve(piece):
                self.origin_tasks[piece] = self._spawn(
                    self._pull_from_origin(piece), f"origin-{piece}"
                )
        self.peer_zones.update(reply.peer_zones)
        if self.config.zone:
            # A peer that dialed in before any reply named it was taken for one of our
            # zone; once its zone is known it counts, and is asked, as what it is.
            for conn in self.conns.values():
                theirs = self.peer_zones.get(conn.peer_id, "")
                if not conn.other_zone and theirs not in ("", self.config.zone):
                    conn.other_zone = True
                    was_remote, conn.remote = conn.remote, True
                    if conn.bitfield is not None and not was_remote:
                        self.picker.set_remote(conn)
        for peer_id, host, port in reply.peers:
            if peer_id == self.peer_id or peer_id in self.barred or not valid_host(host):
                continue
            self.known_peers[peer_id] = (host, port)
            # Whoever learns of the other first dials at once, rather than waiting for
            # the other's next announce; if both dial, the handshake keeps one.
            if peer_id not in self.conns and not self._dialing(peer_id):
                self._dials.add(peer_id)
                self._spawn(self._dial(peer_id, host, port), f"dial-{peer_id.hex()[:8]}")

    def _dialing(self, peer_id: bytes) -> bool:
        return peer_id in self._dials or any(c.peer_id == peer_id for c in self.pending_conns)

    async def _fallback_direct(self) -> None:
        for task in self.origin_tasks.values():
            task.cancel()
        self.store.close()
        result = await fetch_direct(
            self.m,
            self.store.dest,
            origin=self.origin,
            config=FetchConfig(
                range_size=self.config.range_size,
                durable=self.config.durable,
                direct_io=self.config.direct_io,
                origin_retry_time=self.config.origin_retry_time,
            ),
            progress=self.progress,
        )
        self.store = PieceStore(
            self.store.dest, self.m, durable=self.config.durable, direct_io=self.config.direct_io
        )
        await asyncio.to_thread(self.store.open)
        if result.verified:
            self.finished_at = time.monotonic()
            self.swarm_complete = True
            self.finished.set()

    # --- seeder role ----------------------------------------------------------------

    async def _pull_from_origin(self, index: int) -> None:
        piece = self.m.piece(index)

        def advance(n: int) -> None:
            self.origin_progress[index] = self.origin_progress.get(index, 0) + n

        try:
            async with self._origin_pool.lease(piece.length) as buf:
                for attempt in range(2):
                    # Reported in announces: the tracker's stall detection watches it move.
                    self.origin_progress[index] = 0
                    await self.reader.read(piece.path, piece.offset, buf, advance)
                    try:
                        await asyncio.to_thread(self.store.write_piece, index, buf)
                        break
                    except VerificationError as exc:
                        if attempt:
                            raise VerificationError(
                                f"{exc}: the origin's data no longer matches the published manifest {self.m.ref}",
                                piece=index,
                            ) from exc
                        log.warning("%s; reading it from the origin again", exc)
        except asyncio.CancelledError:
            self.picker.release(index)
            # Peers may hold it now (that is why the tracker took it back): ask them
            # at once, as nothing else may come along to trigger a request.
            self._fill_all()
            raise
        finally:
            self.origin_tasks.pop(index, None)
            self.origin_progress.pop(index, None)
        self.origin_pieces += 1
        self._announce_soon.set()
        self._piece_verified(index)

    # --- pieces --------------------------------------------------------------------

    def _piece_verified(self, index: int) -> None:
        for conn, block in self.picker.mark_have(index):
            conn.cancel(block)
        self.contributors.pop(index, None)
        for conn in self.conns.values():
            conn.send(Have(index))
        if self.progress:
            self.progress(self.m.piece_lengths[index])
        if self.store.complete and not self._finishing:
            self._finishing = True
            self._spawn(self._finish(), "finish")
        self._fill_all()

    async def _finish(self) -> None:
        await asyncio.to_thread(self.store.finish)
        self.finished_at = time.monotonic()
        self.finished.set()
        log.info("artifact complete and verified")
        with contextlib.suppress(TrackerError):
            reply = await self._announce()
            self._apply_reply(reply)

    async def _verify_assembled(self, index: int) -> None:
        self.verifying.add(index)
        loop = asyncio.get_running_loop()
        try:
            ok = await loop.run_in_executor(self._disk, self.store.verify_assembled, index)
        finally:
            self.verifying.discard(index)
        if ok:
            self._piece_verified(index)
            return
        self.corrupt_pieces += 1
        sources = self.contributors.pop(index, set())
        log.warning(
            "%s failed blake3 verification (from %d peers); fetching it again",
            self.m.describe_piece(index),
            len(sources),
        )
        for conn, block in self.picker.piece_failed(index):
            conn.cancel(block)
        culprits: set[bytes] = set()
        if len(sources) == 1:
            culprits = set(sources)
        else:
            for earlier in self.failed_sets:
                common = earlier & sources
                if len(common) == 1:
                    culprits |= common
            self.failed_sets.append(sources)
        for peer_id in culprits:
            self._bar(peer_id)
        self._fill_all()

    def _bar(self, peer_id: bytes) -> None:
        if peer_id in self.barred:
            return
        log.warning("barring peer %s for sending data that failed verification", peer_id.hex()[:8])
        self.barred.add(peer_id)
        conn = self.conns.get(peer_id)
        if conn is not None:
            self._close_conn(conn, RemoteProtocolError("sent corrupt data"))

    # --- connections ---------------------------------------------------------------

    async def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.listen_host, self.config.listen_port))
        sock.listen(256)
        sock.setblocking(False)
        self._server = sock
        self.listen_port = sock.getsockname()[1]
        log.info("listening for peers on %s:%d", self.config.listen_host, self.listen_port)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._server is not None
        pause = _ACCEPT_PAUSE_MIN
        while True:
            # accept() itself runs here, not in a future: a socket accepted into a
            # future just as this task is cancelled would never be closed.
            await _readable(loop, self._server)
            try:
                sock, addr = self._server.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno not in _ACCEPT_TRANSIENT:
                    raise
                # Out of descriptors or kernel memory: the connection waits in the
                # backlog; pause so as not to spin, and try again as they free up.
                if exc.errno in _ACCEPT_RESOURCES:
                    log.warning(
                        "can't accept peer connections: %s; pausing accepts for %.2fs",
                        exc.strerror or exc,
                        pause,
                    )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _ACCEPT_PAUSE_MAX)
                continue
            pause = _ACCEPT_PAUSE_MIN
            inbound_pending = sum(1 for c in self.pending_conns if not c.outbound)
            if inbound_pending >= self.config.max_pending_conns:
                sock.close()
                self._refuse_overflow(addr)
                continue
            try:
                self._start_conn(sock, addr, outbound=False)
            except OSError as exc:  # reset before we got to it
                sock.close()
                log.info("peer connection from %s:%d lost at once: %s", addr[0], addr[1], exc)

    def _refuse_overflow(self, addr: tuple[str, int]) -> None:
        self.pending_refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= 10.0:  # one line per 10 s, however many come
            self._refusal_logged = now
            log.warning(
                "refused %s:%d at once: %d connections are still in their handshake "
                "(%d refused so far)",
                addr[0],
                addr[1],
                self.config.max_pending_conns,
                self.pending_refused,
            )

    async def _dial(self, peer_id: bytes, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:  # out of descriptors: the next announce tries again
            self._dials.discard(peer_id)
            log.warning("can't open a socket to peer %s: %s", peer_id.hex()[:8], exc)
            return
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 5.0)
            conn = self._start_conn(sock, (host, port), outbound=True)
        except (OSError, TimeoutError, ValueError) as exc:  # UnicodeError: an odd name
            sock.close()
            log.info("can't connect to peer %s at %r:%d: %s", peer_id.hex()[:8], host, port, exc)
            return
        except BaseException:  # cancelled: the socket is still ours to close
            sock.close()
            raise
        finally:
            self._dials.discard(peer_id)
        conn.peer_id = peer_id

    def _start_conn(self, sock: socket.socket, addr: tuple[str, int], *, outbound: bool) -> _Conn:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
        handshake = PeerHandshake(
            self.config.key,
            dialer=outbound,
            root=self.m.root,
            peer_id=self.peer_id,
            listen_port=self.listen_port,
            nonce=new_nonce(),
        )
        conn = _Conn(self, sock, addr, outbound, handshake)
        self.pending_conns.add(conn)
        for msg in handshake.start():
            conn.send(msg)
        conn.deadline = asyncio.get_running_loop().call_later(
            self.config.handshake_timeout, self._handshake_overdue, conn
        )
        conn.tasks = [
            self._spawn_conn(self._reader(conn), conn, "reader"),
            self._spawn_conn(self._writer(conn), conn, "writer"),
        ]
        return conn

    def _handshake_overdue(self, conn: _Conn) -> None:
        if conn.closed or conn not in self.pending_conns:
            return
        self.handshake_timeouts += 1
        log.warning(
            "closing %s:%d: no handshake within %.1fs",
            conn.addr[0],
            conn.addr[1],
            self.config.handshake_timeout,
        )
        self._close_conn(conn, None)

    def _spawn_conn(self, coro: object, conn: _Conn, role: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=f"{role}-{conn.addr}")  # type: ignore[arg-type]
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if isinstance(exc, SwarmError | OSError | EOFError) or exc is None:
                self._close_conn(conn, exc)
            else:
                log.error("%s of %r crashed: %r", role, conn, exc)
                self._close_conn(conn, exc)
                if self._fatal is None:
                    self._fatal = exc
                    self.finished.set()

        task.add_done_callback(done)
        return task

    def _close_conn(self, conn: _Conn, why: BaseException | None) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.deadline is not None:
            conn.deadline.cancel()
        if why is not None and not conn.handshake.done:
            self._handshake_failed(conn, why)
        elif why is not None:
            log.info("dropping %r: %s", conn, why or type(why).__name__)
        self.pending_conns.discard(conn)
        if self.conns.get(conn.peer_id) is conn:
            del self.conns[conn.peer_id]
        self.picker.remove_peer(conn)
        self.uploads.peer_gone(conn)
        self._upload_wake.set()
        for task in conn.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        conn.sock.close()
        self._fill_all()

    def _handshake_failed(self, conn: _Conn, why: BaseException) -> None:
        """Log and count a connection that ended before the remote proved the token."""
        host, port = conn.addr
        if isinstance(why, RemoteProtocolError):
            reason = str(why)
        elif conn.handshake.heard:
            # It spoke our protocol, then left before proving itself: a proven peer
            # that refuses us still sends its Handshake first, so this is most
            # likely our proof failing its check.
            reason = (
                f"it closed the connection during the handshake ({why or type(why).__name__}): "
                "it holds another cluster token, or none?"
            )
        else:
            # Nothing received at all: a port probe, or a peer that refused us for load.
            log.info(
                "connection %s:%d closed before its hello: %s",
                host,
                port,
                why or type(why).__name__,
            )
            return
        self.auth_failures += 1
        side = "to" if conn.outbound else "from"
        log.warning("refused connection %s %s:%d: %s", side, host, port, reason)

    async def _reader(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        decoder = FrameDecoder(
            piece_lengths=self.m.piece_lengths, max_block=max(self.block_size, 1)
        )
        download = self.download_limit
        ctrl = bytearray(64 * 1024)
        block_buf: mmap.mmap | None = None  # a pool buffer between a block's header and end
        block_view = memoryview(b"")
        header: BlockHeader | None = None
        filled = 0
        discard = False
        lowat = 1
        try:
            while True:
                event = decoder.next_event()
                if event is NEED_DATA:
                    remaining = decoder.payload_remaining
                    if header is not None and remaining > 0:
                        # Wake for a payload only once a good part of it is there: at 50 MB/s
                        # a socket is readable thousands of times a second, a few bytes each
                        # time, and every wake-up costs a turn of the event loop.
                        want = min(remaining, _PAYLOAD_LOWAT)
                        if want != lowat:
                            lowat = _set_rcvlowat(conn.sock, want)
                        if download.limited:
                            # Wait before reading, so unread bytes stay in the socket
                            # and TCP slows the sender down to our cap.
                            want = min(remaining, _RATE_SLICE)
                            await download.acquire(want)
                            n = await loop.sock_recv_into(
                                conn.sock, block_view[filled : filled + want]
                            )
                            download.give_back(want - n)
                        else:
                            n = await loop.sock_recv_into(
                                conn.sock, block_view[filled : filled + remaining]
                            )
                        if n == 0:
                            raise EOFError("connection closed in the middle of a block")
                        decoder.payload_consumed(n)
                        filled += n
                        conn.last_payload = time.monotonic()
                    else:
                        if lowat != 1:
                            lowat = _set_rcvlowat(conn.sock, 1)
                        n = await loop.sock_recv_into(conn.sock, ctrl)
                        if n == 0:
                            decoder.feed_eof()
                        else:
                            decoder.feed(bytes(ctrl[:n]))
                    conn.last_recv = time.monotonic()
                    continue
                if isinstance(event, BlockHeader):
                    block = BlockRequest(event.piece, event.offset, event.length)
                    if block in conn.requested:
                        discard = False
                    elif block in conn.cancelled:
                        del conn.cancelled[block]
                        discard = True  # it crossed our Cancel on the wire
                    else:
                        raise RemoteProtocolError(f"sent block {block} that was not requested")
                    header, filled = event, 0
                    block_buf = await self._block_pool.acquire()
                    block_view = memoryview(block_buf)
                elif isinstance(event, BlockPayload):
                    block_view[filled : filled + len(event.data)] = event.data
                    filled += len(event.data)
                    if download.limited:
                        # Payload that came in with control frames: owed, paid by the next wait.
                        download.reserve(len(event.data))
                elif isinstance(event, BlockEnd):
                    assert header is not None and block_buf is not None
                    block_view.release()
                    buf, block_buf = block_buf, None  # handed on: no longer ours to release
                    if discard:
                        self.duplicate_causes["cancelled"] += header.length
                        self.peer_bytes += header.length
                        if conn.other_zone:
                            self.cross_zone_bytes += header.length
                        self._block_pool.release(buf)
                    else:
                        self._on_block(conn, header, buf)
                    header = None
                elif isinstance(event, ConnectionClosed):
                    raise EOFError("peer closed the connection")
                elif conn.refused is not None:
                    raise conn.refused
                elif isinstance(event, Hello | Handshake):
                    self._on_handshake(conn, event)
                elif not conn.handshake.done:  # the decoder refuses this; kept as a guard
                    raise RemoteProtocolError(f"{type(event).__name__} before the handshake")
                else:
                    self._on_message(conn, event)
        finally:
            if block_buf is not None:
                self._block_pool.release(block_buf)

    def _on_handshake(self, conn: _Conn, msg: Hello | Handshake) -> None:
        """A frame of the connect flow: check it, then answer (see PeerHandshake)."""
        replies = conn.handshake.receive(msg)  # raises unless proved, for our root
        if not isinstance(msg, Handshake):
            for reply in replies:
                conn.send(reply)
            return
        try:
            self._admit(conn, msg)
        except RemoteProtocolError as exc:
            if conn.outbound:
                raise  # the acceptor has already proved itself: just close
            # The dialer proved the token: answer before closing, or it would take
            # the refusal for a token mismatch.
            conn.refused = exc
        for reply in replies:
            conn.send(reply)
        if conn.refused is None:
            conn.send(BitfieldMsg.from_bitfield(self.picker.have))
            log.debug("connected to %r", conn)

    def _admit(self, conn: _Conn, msg: Handshake) -> None:
        """Make ``conn`` the connection to the proven peer ``msg`` names, or refuse it."""
        if msg.peer_id == self.peer_id or msg.peer_id in self.barred:
            raise RemoteProtocolError("connection to ourselves or to a barred peer")
        if conn.peer_id and conn.peer_id != msg.peer_id:
            raise RemoteProtocolError("peer id differs from what the tracker said")
        existing = self.conns.get(msg.peer_id)
        if existing is not None:
            # Both dialed at once. Both ends keep the connection that the peer
            # with the smaller id dialed, so they agree without another message.
            if conn.outbound != (self.peer_id < msg.peer_id):
                raise RemoteProtocolError("duplicate connection")
            self._close_conn(existing, RemoteProtocolError("duplicate connection"))
        conn.peer_id = msg.peer_id
        # A peer no reply has named yet counts as in our zone: unknown is not remote.
        theirs = self.peer_zones.get(msg.peer_id, "")
        conn.other_zone = bool(self.config.zone) and theirs not in ("", self.config.zone)
        conn.remote = conn.other_zone
        self.pending_conns.discard(conn)
        self.conns[msg.peer_id] = conn

    def _on_message(self, conn: _Conn, msg: Message) -> None:
        if isinstance(msg, BitfieldMsg):
            # conn.bitfield is the one record of the peer's pieces; the picker
            # reads it (and merges a second Bitfield into it).
            sent = msg.to_bitfield(self.m.num_pieces)
            if conn.bitfield is None:
                conn.bitfield = sent
            self.picker.add_peer(conn, sent, remote=conn.remote)
            self._fill(conn)
        elif isinstance(msg, Have):
            if conn.bitfield is None:
                conn.bitfield = Bitfield(self.m.num_pieces)
                self.picker.add_peer(conn, conn.bitfield, remote=conn.remote)
            if conn.bitfield.add(msg.piece):
                self.picker.peer_has(conn, msg.piece)
            self._fill(conn)
        elif isinstance(msg, Request):
            if not self.store.has(msg.piece) or not self.uploads.enqueue(conn, msg):
                conn.send(Reject(msg.piece, msg.offset, msg.length))
            else:
                self._upload_wake.set()
        elif isinstance(msg, Cancel):
            req = Request(msg.piece, msg.offset, msg.length)
            self.uploads.cancel(conn, req)
        elif isinstance(msg, Reject):
            block = BlockRequest(msg.piece, msg.offset, msg.length)
            conn.cancelled.pop(block, None)
            if block in conn.requested:
                conn.requested.discard(block)
                self.picker.block_failed(conn, block)
            self._fill(conn)
        elif isinstance(msg, KeepAlive):
            pass

    def _on_block(self, conn: _Conn, header: BlockHeader, buf: mmap.mmap) -> None:
        """A whole block arrived in ``buf`` (a pool buffer): hand it to the disk thread."""
        block = BlockRequest(header.piece, header.offset, header.length)
        conn.requested.discard(block)
        self.peer_bytes += header.length
        conn.received_bytes += header.length
        if conn.other_zone:
            self.cross_zone_bytes += header.length
        if self.store.has(block.piece) or header.piece in self.verifying:
            self.duplicate_causes["had"] += header.length
            self._block_pool.release(buf)
            self._fill(conn)
            return
        view = memoryview(buf)[: block.length]
        written = asyncio.get_running_loop().run_in_executor(
            self._disk, self.store.write_block, block.piece, block.offset, view
        )
        written.add_done_callback(lambda fut: self._block_written(conn, block, buf, view, fut))
        self._fill(conn)

    def _block_written(
        self,
        conn: _Conn,
        block: BlockRequest,
        buf: mmap.mmap,
        view: memoryview,
        fut: asyncio.Future[bool],
    ) -> None:
        view.release()
        self._block_pool.release(buf)
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            # The disk, not the peer, failed (full, read-only): nothing more can land.
            if self._fatal is None:
                log.error(
                    "writing a block of %s failed: %s", self.m.describe_piece(block.piece), exc
                )
                self._fatal = exc
                self.finished.set()
            return
        if not fut.result():
            self.duplicate_causes["written"] += block.length
            self._fill(conn)
            return
        # Counted even if ``conn`` has closed since: the bytes are on disk and in the
        # piece's hash, and ``contributors`` still names their source if it lied.
        self.contributors.setdefault(block.piece, set()).add(conn.peer_id)
        for other, dup in self.picker.block_received(conn, block):
            other.cancel(dup)
        if self.picker.piece_complete(block.piece) and block.piece not in self.verifying:
            self.verifying.add(block.piece)
            self._spawn(self._verify_assembled(block.piece), f"verify-{block.piece}")
        self._fill(conn)

    def _fill(self, conn: _Conn) -> None:
        """Keep ``requests_per_peer`` block requests in flight to ``conn``."""
        if conn.closed or conn.bitfield is None or self.conns.get(conn.peer_id) is not conn:
            return
        want = (1 if conn.demoted else self.config.requests_per_peer) - len(conn.requested)
        if want <= 0:
            return
        if not conn.requested:
            conn.waiting_since = time.monotonic()
        for block in self.picker.pick(conn, want):
            conn.requested.add(block)
            conn.send(Request(*block))

    def _fill_all(self) -> None:
        for conn in list(self.conns.values()):
            self._fill(conn)

    # --- uploads -------------------------------------------------------------------

    async def _upload_loop(self) -> None:
        while True:
            await self._upload_wake.wait()
            self._upload_wake.clear()
            while (nxt := self.uploads.next()) is not None:
                conn, req = nxt
                conn.uploads.append(req)
                conn.wake.set()

    async def _writer(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        # The next block is read from disk while the current one goes out, so the
        # socket doesn't sit idle for each read.
        ahead: tuple[Request, asyncio.Task[mmap.mmap | None]] | None = None
        try:
            while True:
                if conn.control:
                    data = b"".join(conn.control)
                    conn.control.clear()
                    await loop.sock_sendall(conn.sock, data)
                    continue
                if conn.refused is not None:
                    raise conn.refused
                if ahead is None and conn.uploads:
                    req = conn.uploads.popleft()
                    ahead = (req, asyncio.create_task(self._load_block(req)))
                if ahead is not None:
                    req, loading = ahead
                    ahead = None
                    if conn.uploads:
                        nxt = conn.uploads.popleft()
                        ahead = (nxt, asyncio.create_task(self._load_block(nxt)))
                    try:
                        await self._send_block(loop, conn, req, await loading)
                    finally:
                        self.uploads.done(conn, req)
                        self._upload_wake.set()
                    continue
                conn.wake.clear()
                await conn.wake.wait()
        finally:
            if ahead is not None:
                req, loading = ahead
                loading.cancel()
                loading.add_done_callback(self._release_loaded)
                self.uploads.done(conn, req)

    def _release_loaded(self, task: asyncio.Task[mmap.mmap | None]) -> None:
        if not task.cancelled() and task.exception() is None and (buf := task.result()) is not None:
            self._upload_pool.release(buf)

    async def _load_block(self, req: Request) -> mmap.mmap | None:
        """Read a block to upload into a pool buffer with direct I/O; None to use sendfile.

        The pieces were written around the page cache, so sendfile would first read
        them into fresh cache pages; a direct read into a reused buffer and one copy
        into the socket cost less (see PieceStore._write_at).
        """
        if not self.store.direct_io or self.config.serve_corrupt:
            return None
        buf = await self._upload_pool.acquire()
        reading = asyncio.get_running_loop().run_in_executor(
            None, self.store.read_direct, req.piece, req.offset, req.length, buf
        )
        try:
            ok = await reading
        except BaseException:
            if reading.done():
                self._upload_pool.release(buf)
            else:  # cancelled while the thread still reads into it
                reading.add_done_callback(lambda _: self._upload_pool.release(buf))
            raise
        if not ok:
            self._upload_pool.release(buf)
            return None
        return buf

    async def _send_block(
        self, loop: asyncio.AbstractEventLoop, conn: _Conn, req: Request, buf: mmap.mmap | None
    ) -> None:
        piece = self.m.piece(req.piece)
        await loop.sock_sendall(conn.sock, encode(BlockHeader(req.piece, req.offset, req.length)))
        if buf is not None:
            try:
                with memoryview(buf) as whole:
                    await self._send_payload(
                        lambda start, count: loop.sock_sendall(
                            conn.sock, whole[start : start + count]
                        ),
                        req.length,
                    )
            finally:
                self._upload_pool.release(buf)
        elif self.config.serve_corrupt:
            bad = bytearray(req.length)
            with self._files.lease(piece.file_index) as f:
                await asyncio.to_thread(os.preadv, f.fileno(), [bad], piece.offset + req.offset)
            bad[0] ^= 0xFF
            await self._send_payload(
                lambda start, count: loop.sock_sendall(conn.sock, bad[start : start + count]),
                req.length,
            )
        else:
            with self._files.lease(piece.file_index) as f:
                at = piece.offset + req.offset
                await self._send_payload(
                    lambda start, count: loop.sock_sendfile(conn.sock, f, at + start, count),
                    req.length,
                )
        self.uploaded_bytes += req.length

    async def _send_payload(
        self, send: Callable[[int, int], Awaitable[object]], length: int
    ) -> None:
        """Send ``length`` payload bytes with ``send(start, count)``: whole when uncapped,
        else in slices, each after the upload cap allows it."""
        limit = self.upload_limit
        if not limit.limited:
            await send(0, length)
            return
        for start in range(0, length, _RATE_SLICE):
            count = min(_RATE_SLICE, length - start)
            await limit.acquire(count)
            await send(start, count)

    async def _zone_watch_loop(self) -> None:
        """Stop counting a same-zone peer as a holder once it leaves our requests
        unanswered for ``zone_patience`` seconds (choked, capped, hostile): otherwise
        its bitfield alone would keep every peer of another zone from being asked for
        those pieces, and a complete, idle peer next door would wait unused."""
        patience = self.config.zone_patience
        while True:
            await asyncio.sleep(min(1.0, patience / 2))
            now = time.monotonic()
            demoted = False
            for conn in list(self.conns.values()):
                if (
                    not conn.remote
                    and conn.requested
                    and conn.bitfield is not None
                    and now - max(conn.waiting_since, conn.last_payload) > patience
                ):
                    conn.remote = conn.demoted = demoted = True
                    self.picker.set_remote(conn)
                    # What it sits on goes back to be asked of others.
                    for block in list(conn.requested):
                        self.picker.block_failed(conn, block)
                        conn.cancel(block)
                    log.info(
                        "%r left our requests unanswered for %.0fs: peers of other zones "
                        "may serve what it holds",
                        conn,
                        patience,
                    )
            if demoted:
                # The others first, so that what the demoted sat on goes to them.
                for conn in sorted(self.conns.values(), key=lambda c: c.demoted):
                    self._fill(conn)

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.keepalive / 2)
            now = time.monotonic()
            for conn in list(self.conns.values()):
                if now - conn.last_recv > self.config.idle_timeout:
                    self._close_conn(conn, RemoteProtocolError("peer silent for too long"))
                else:
                    conn.send(KeepAlive())
