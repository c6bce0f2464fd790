"""The peer: one ``swarm fetch --tracker`` process on a GPU node, as an asyncio driver.

Every rule of the peer lives in :class:`swarm.session.PeerSession`: what to
request from whom, what to serve, whom to trust, blame and bar, when a request or
a handshake has taken too long, which origin pulls to run. This module does only
the I/O around it: sockets, the disk and the origin. It feeds the session events
(a message arrived, a block was stored, a piece verified, an origin pull
progressed, the tracker replied, a second passed) and carries out the actions it
returns (send, store, verify, pull, dial, close).

Connections use raw non-blocking sockets with ``loop.sock_*``: payloads are read
with ``recv_into`` straight into a reused block buffer and sent from a direct-I/O
read (or ``sock_sendfile`` from the page cache). Each connection has one reader
task and one writer task; the session is touched only from the event loop, so it
needs no locks. One disk thread owns the assembly of pieces from blocks: writes,
hashing and verification of a piece happen in order without locks (see
PieceStore).

Cut-through relay (format-2 manifests, on by default): a block checked against
its digest as it lands, and each window of an origin pull, is served before its
piece is whole; the store refuses to send any bytes that are neither verified nor
checked (``PieceStore.servable``).

Byte-rate caps (``swarm.limiter``), each per process and shared by every
connection: ``max_upload_rate`` paces block payloads sent, a slice at a time;
``max_download_rate`` paces payload reads from peers (a read waits before its
``recv_into``, so TCP backpressure slows the sender) and this peer's origin reads;
and the origin rate the tracker hands out in each announce reply (this peer's
share of the cluster's origin cap) paces origin reads too. Uncapped, a block
costs one attribute read.

Running out of descriptors pauses accepting (and fails a dial, retried later),
never ends the peer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import itertools
import logging
import mmap
import os
import random
import resource
import select
import socket
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Final

from core.auth import ClusterKey, new_nonce
from core.buffers import BufferPool
from core.cpus import usable_cores
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
from seeder.retry import Backoff, tracker_retry
from seeder.role import origin_window, pull_piece
from swarm.announce import (
    MAX_PROGRESS_ENTRIES,
    Announce,
    BadAnnounce,
    Reply,
    TrackerClient,
    check_zone,
)
from swarm.fetch import FetchConfig, FetchResult, fetch_direct, process_age
from swarm.limiter import RateLimiter, acquire_all
from swarm.picker import BlockRequest
from swarm.protocol import (
    NEED_DATA,
    BlockEnd,
    BlockHeader,
    BlockPayload,
    ConnectionClosed,
    FrameDecoder,
    Message,
    Reject,
    Request,
    encode,
)
from swarm.session import (
    CUT_THROUGH_BLOCKS,
    Action,
    AnnounceSoon,
    BlockReceived,
    BlockStarted,
    BlockStored,
    CancelPull,
    Close,
    Closed,
    Complete,
    Dial,
    DialFailed,
    Event,
    Opened,
    OriginChecked,
    OriginProgress,
    PeerSession,
    PieceFailed,
    PieceVerified,
    Progress,
    PullDone,
    PullFailed,
    Received,
    Send,
    SendBlock,
    SessionConfig,
    StartPull,
    StoreBlock,
    Tick,
    TrackerReplied,
    UploadDone,
    Verify,
)
from swarm.store import PieceStore

log = logging.getLogger("swarm.peer")

_PAYLOAD_LOWAT = 256 * 1024
_TICK: Final = 0.5  # seconds between the session's Tick events
_CLOSE_FLUSH: Final = 2.0  # seconds a closing connection may take to send what is queued
_DIAL_TIMEOUT: Final = 5.0
_MAX_CONTROL_QUEUE: Final = 100_000  # frames queued for one connection that does not read
# Descriptors kept for everything but peer connections (the store's files, the files
# served, the tracker client, threads' pipes): half the limit, at most this many.
_FD_RESERVE: Final = 256


def connection_limit() -> int:
    """How many peer connections this process may hold open at once.

    Each takes a descriptor; the store and the tracker client need theirs too, so
    connections get what the limit leaves after a reserve. At the limit, new
    connections are closed at once and dials wait: a flood of connections can slow
    the peer down, never make a disk write or an accept fail for want of a descriptor.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(8, soft - min(soft // 2, _FD_RESERVE))


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


_SOCKET_BUFFER: Final = 4 * 1024 * 1024


def unsent_limit(block_size: int) -> int:
    """Unsent bytes a peer connection's socket may hold before a send waits: a quarter
    block (at least 64 KiB). See :func:`tune_socket`."""
    return max(64 * 1024, block_size // 4)


def tune_socket(sock: socket.socket, unsent: int) -> None:
    """Set a peer connection's options: no Nagle delay, 4 MiB buffers, and at most
    ``unsent`` bytes waiting in the kernel beyond those on the wire (TCP_NOTSENT_LOWAT).

    With 4 MiB send buffers alone (8 MiB as Linux counts them), an uploader wrote
    blocks into its sockets as fast as its upload slots freed, and 30-48 MB waited
    in its peers' sockets toward each node in the shaped fabric-bound run (``ss -tn``
    every 0.4 s): a block was sent about 0.8 s after the scheduler chose it, so the
    kernel's flows, not the scheduler's order (least progress first, fewest copies
    first), decided who got an uplink's bytes. A send now completes when the socket
    is nearly drained, so a slot stays busy while its block is on its way and the
    next one is chosen when it can go. Measured, shaped fabric-bound, swarm alone,
    three runs each alternating (slowest node ÷ T_min, p50 in brackets): without
    1.086 (1.081), 1.124 (1.105) and, earlier the same evening, 1.111 (1.098); with
    256 KiB 1.088 (1.068), 1.089 (1.072), 1.084 (1.067). The limit only holds back
    bytes that are not yet sent: what is in flight is the congestion window's.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, _SOCKET_BUFFER)
    if unsent > 0:
        with contextlib.suppress(OSError, AttributeError):  # Linux and macOS have it
            sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, min(unsent, _SOCKET_BUFFER)
            )


def _set_rcvlowat(sock: socket.socket, n: int) -> int:
    """Make ``sock`` readable only once ``n`` bytes are waiting; returns ``n``."""
    with contextlib.suppress(OSError):  # not every platform lets SO_RCVLOWAT be set
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, n)
    return n


# A block's payload of at least this many bytes is received on a thread of its own
# (the GIL is released while it waits and copies), not by the event loop: the
# loop's copies capped a node at one core's worth, ~3 GB/s (benchmarks/dataplane).
_OFF_LOOP_MIN: Final = 256 * 1024
_RECV_POLL_MS: Final = 250  # a receiving thread looks at whether its connection closed this often


def _recv_payload(
    sock: socket.socket,
    view: memoryview,
    closed: Callable[[], bool],
    slots: threading.BoundedSemaphore | None = None,
) -> int:
    """Fill ``view`` from ``sock`` on a worker thread; returns ``len(view)``.

    The socket stays non-blocking (the event loop still writes to it): the thread
    waits in ``poll`` (woken only once ``_PAYLOAD_LOWAT`` bytes are there) and stops
    when ``closed()`` says the connection was closed meanwhile. Raises EOFError if
    the peer closes first, OSError when the socket is closed under it. Gives back
    one of ``slots`` when it ends.
    """
    try:
        return _recv_into(sock, view, closed)
    finally:
        if slots is not None:
            slots.release()


def _recv_into(sock: socket.socket, view: memoryview, closed: Callable[[], bool]) -> int:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    got = 0
    lowat = 0
    while got < len(view):
        if closed():
            raise EOFError("connection closed while a block arrived")
        want = min(len(view) - got, _PAYLOAD_LOWAT)
        if want != lowat:
            lowat = _set_rcvlowat(sock, want)
        if not poller.poll(_RECV_POLL_MS):
            continue
        try:
            n = sock.recv_into(view[got:])
        except (BlockingIOError, InterruptedError):
            continue
        if n == 0:
            raise EOFError("connection closed in the middle of a block")
        got += n
    return got


_S: Final = SessionConfig()  # the session's defaults, stated once there


@dataclass
class PeerConfig:
    """Settings of one peer; every one is reachable from ``swarm fetch`` flags.

    The policy settings (block size to handshake timeout) go to the session; their
    defaults are :class:`swarm.session.SessionConfig`'s.
    """

    listen_host: str = "0.0.0.0"
    listen_port: int = 0
    advertise_host: str = ""
    block_size: int = _S.block_size
    requests_per_peer: int = _S.requests_per_peer
    upload_slots: int = _S.upload_slots
    uploads_per_conn: int = _S.uploads_per_conn
    request_timeout: float = _S.request_timeout
    handshake_timeout: float = _S.handshake_timeout
    max_pending_conns: int = _S.max_pending_conns
    max_peers: int = _S.max_peers
    endgame_duplicates: int = _S.endgame_duplicates
    max_upload_queue: int = _S.max_upload_queue
    # Cut-through relay: blocks checked on arrival (format 2) are served before
    # their piece is whole; a Partial per this many more blocks held. 0: off.
    cut_through: int = CUT_THROUGH_BLOCKS
    keepalive: float = _S.keepalive
    idle_timeout: float = _S.idle_timeout
    zone: str = _S.zone  # this node's zone or rack, sent in announces ("" for none)
    zone_patience: float = _S.zone_patience
    linger: float = 300.0
    # The node agent's peers: serve after completion until stop(), whatever linger says.
    stay: bool = False
    # May read the origin (has the object store's credentials); False: the tracker
    # never assigns this peer origin pieces, and it is served by the peers that may.
    seeder: bool = True
    tracker_timeout: float = 120.0
    fallback_direct: bool = False
    catalog: str | None = None
    origin_url: str | None = None
    origin_pieces_in_flight: int = (
        FetchConfig.pieces_in_flight
    )  # as --direct; the tracker hands a lone peer as many
    blocks_in_flight: int = 8  # received blocks waiting for a worker, across connections
    # Threads that check and write received blocks (and verify pieces); 0: the cores
    # this process may use (core.cpus.usable_cores: affinity and cgroup quota).
    workers: int = 0
    range_size: int = FetchConfig.range_size
    origin_concurrency: int = FetchConfig.origin_concurrency
    origin_retry_time: float = FetchConfig.origin_retry_time  # seconds an origin range is retried
    durable: bool = True
    direct_io: bool = True  # write and serve pieces bypassing the page cache where possible
    serve_corrupt: bool = False  # fault injection for tests: flip a bit of every block sent
    key: ClusterKey = field(default_factory=lambda: ClusterKey(None))  # the cluster token
    open_files: int = 32  # artifact files kept open for uploads when idle
    # TCP_NOTSENT_LOWAT of peer connections (tune_socket); 0: unsent_limit(block), <0: unset
    unsent_bytes: int = 0
    max_upload_rate: int | None = None  # bytes/s of block payload sent to peers; None: uncapped
    max_download_rate: int | None = None  # bytes/s from peers and the origin; None: uncapped

    def session_config(self) -> SessionConfig:
        """The session's settings: every field of SessionConfig, from ours of that name."""
        return SessionConfig(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(SessionConfig)}
        )


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
    """One connection's I/O: its socket, a reader task, a writer task and their queues."""

    def __init__(
        self, conn_id: int, sock: socket.socket, addr: tuple[str, int], outbound: bool
    ) -> None:
        self.id = conn_id
        self.sock = sock
        self.addr = addr
        self.outbound = outbound
        self.control: deque[bytes] = deque()  # encoded frames to send, before any block
        self.blocks: deque[Request] = deque()  # blocks to send (SendBlock), in order
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.closing = False  # the session closed it: the writer sends what is queued, then ends
        self.closed = False
        self.other_zone = False  # counted once proven (cross-zone bytes)

    def __repr__(self) -> str:
        return f"<conn {self.id} {self.addr[0]}:{self.addr[1]}>"


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
        try:
            check_zone(self.config.zone)
        except BadAnnounce as exc:
            raise ConfigError(f"--zone: {exc}") from exc
        self.store = PieceStore(
            dest,  # type: ignore[arg-type]
            manifest,
            durable=self.config.durable,
            direct_io=self.config.direct_io,
        )
        session_config = self.config.session_config()
        if manifest.block_size and session_config.block_size != manifest.block_size:
            # Format 2: every peer asks for exactly the manifest's blocks, so each is
            # checked as it lands and peers given different --block-size values still
            # agree on what a request may be (a decoder refuses larger ones).
            log.info(
                "requesting blocks of %d bytes, the manifest's block size, not %d",
                manifest.block_size,
                session_config.block_size,
            )
            session_config = dataclasses.replace(session_config, block_size=manifest.block_size)
        if not manifest.block_size and session_config.cut_through:
            # Format 1 has no block digests: nothing is known good before its piece.
            session_config = dataclasses.replace(session_config, cut_through=0)
        self.session = PeerSession(
            manifest.piece_lengths,
            root=manifest.root,
            peer_id=self.peer_id,
            key=self.config.key,
            config=session_config,
            rng=self.rng,
            nonce=new_nonce,
        )
        self.block_size = self.session.block_size
        # Byte-rate caps, shared by every connection; the origin one follows the tracker.
        self.upload_limit = RateLimiter(self.config.max_upload_rate)
        self.download_limit = RateLimiter(self.config.max_download_rate)
        self.origin_limit = RateLimiter(None)
        self.origin: Origin = open_origin(self.config.origin_url or manifest.origin)
        self._throttles_told = 0  # of origin.counters.throttled, reported to the tracker
        self._pull_activity: dict[int, list[int]] = {}  # see _pull_from_origin
        self.reader = RangedReader(
            self.origin,
            range_size=self.config.range_size,
            max_concurrency=self.config.origin_concurrency,
            retry_time=self.config.origin_retry_time,
            rate_limit=self._origin_rate_limit,
            rate_limited=lambda: self.download_limit.limited or self.origin_limit.limited,
        )
        self.conns: dict[int, _Conn] = {}  # every open connection, proven or not
        self.max_conns = connection_limit()
        self.conns_refused = 0  # accepted and closed at once: at the connection limit
        self._dials = 0  # dials under way: each will hold a descriptor
        self._conn_ids = itertools.count(1)
        self.origin_tasks: dict[int, asyncio.Task[None]] = {}
        # Received blocks waiting for the session's StoreBlock, in their pool buffers.
        self._received: dict[tuple[int, BlockRequest], mmap.mmap] = {}
        self.finished = asyncio.Event()
        self._finishing = False
        self._announce_soon = asyncio.Event()
        self.listen_port = 0
        self._server: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._files = _OpenFiles(
            lambda index: self.store.dest / self.m.files[index].path, self.config.open_files
        )
        self._refusal_logged = 0.0
        self._refusals_seen = 0
        self._fatal: BaseException | None = None
        # An origin pull's buffer: a window of a format-2 piece, else the piece;
        # a quarter of a small piece only when its blocks are relayed as they land.
        self._origin_pool = BufferPool(
            origin_window(manifest, self.config.range_size, relayed=bool(self.session.cut_through)),
            self.config.origin_pieces_in_flight,
        )
        # Blocks received from peers wait in these buffers while the disk thread
        # writes (and hashes) them, so the readers keep reading meanwhile.
        self._block_pool = BufferPool(self.block_size, self.config.blocks_in_flight)
        # Blocks read for upload (direct I/O); rounded up to whole pages for the read.
        self._upload_pool = BufferPool(-(-self.block_size // 4096) * 4096, self.config.upload_slots)
        self.workers = self.config.workers or usable_cores()
        self._disk = concurrent.futures.ThreadPoolExecutor(
            self.workers, thread_name_prefix="swarm-disk"
        )
        # Block payloads arrive on these (see _recv_payload). Anyone may connect in,
        # so connections can outnumber the threads: a payload that finds no thread
        # free is received by the event loop as before, never queued behind a peer
        # that stalls mid-block (whose thread waits until the session closes it).
        receivers = max(1, self.config.max_peers)
        self._recv = concurrent.futures.ThreadPoolExecutor(
            receivers, thread_name_prefix="swarm-recv"
        )
        self._recv_slots = threading.BoundedSemaphore(receivers)
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self._stopping = False

    # --- what reports and metrics read ----------------------------------------------

    @property
    def barred(self) -> set[bytes]:
        return self.session.barred

    @property
    def swarm_complete(self) -> bool:
        return self.session.swarm_complete

    # --- the session ---------------------------------------------------------------

    def _feed(self, event: Event) -> None:
        """Apply ``event`` to the session and carry out what it asks."""
        self._apply(self.session.handle(event, time.monotonic()))

    def _apply(self, actions: Sequence[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send(action.conn, action.msg)
            elif isinstance(action, SendBlock):
                conn = self.conns.get(action.conn)
                if conn is not None and not conn.closing:
                    conn.blocks.append(action.request)
                    conn.wake.set()
                else:  # gone meanwhile: the slot is free again
                    self._feed(UploadDone(action.conn, action.request))
            elif isinstance(action, StoreBlock):
                self._store_block(action.conn, action.block)
            elif isinstance(action, Verify):
                self._spawn(self._verify(action.piece), f"verify-{action.piece}")
            elif isinstance(action, Progress):
                if self.progress:
                    self.progress(action.length)
            elif isinstance(action, StartPull):
                self._start_pull(action.piece)
            elif isinstance(action, CancelPull):
                task = self.origin_tasks.get(action.piece)
                if task is not None:
                    task.cancel()
            elif isinstance(action, Dial):
                self._spawn(
                    self._dial(action.peer_id, action.host, action.port),
                    f"dial-{action.peer_id.hex()[:8]}",
                )
            elif isinstance(action, Close):
                conn = self.conns.get(action.conn)
                if conn is not None:
                    self._close_conn(conn, flush=True)
            elif isinstance(action, AnnounceSoon):
                self._announce_soon.set()
            elif isinstance(action, Complete) and not self._finishing:
                self._finishing = True
                self._spawn(self._finish(), "finish")

    def _send(self, conn_id: int, msg: Message) -> None:
        conn = self.conns.get(conn_id)
        if conn is None or conn.closed:
            return
        if len(conn.control) > _MAX_CONTROL_QUEUE:
            self._close_conn(conn)
            self._feed(Closed(conn.id, "peer is not reading: its control queue overflowed", True))
            return
        conn.control.append(encode(msg))
        conn.wake.set()

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
            # Blocks of unfinished pieces kept from a run that stopped (checked again).
            result.extra["kept_block_bytes"] = self.store.kept_block_bytes
            self.session.restore(self.store.verified_pieces(), self.store.kept_blocks)
            if self.progress and self.store.reused_bytes:
                self.progress(self.store.reused_bytes)
            await self._listen()
            self._spawn(self._accept_loop(), "accept")
            self._spawn(self._tick_loop(), "tick")
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
            stats = self.session.stats
            result.origin_bytes = self.origin.counters.bytes_read
            result.origin_retries = self.origin.counters.retries
            result.peer_bytes = stats.peer_bytes
            result.seconds = (self.finished_at or time.monotonic()) - self.started
            result.extra.update(
                uploaded_bytes=stats.uploaded_bytes,
                cut_through_bytes=stats.cut_through_bytes,
                duplicate_bytes=sum(stats.duplicate_causes.values()),
                duplicate_causes=dict(stats.duplicate_causes),
                origin_pieces=stats.origin_pieces,
                corrupt_pieces=stats.corrupt_pieces,
                corrupt_blocks=stats.corrupt_blocks,
                read_back_bytes=self.store.read_back_bytes,
                workers=self.workers,
                cross_zone_bytes=stats.cross_zone_bytes,
                barred_peers=sorted(p.hex() for p in self.session.barred),
                auth_failures=stats.auth_failures,
                handshake_timeouts=stats.handshake_timeouts,
                pending_refused=stats.pending_refused,
                conns_refused=self.conns_refused,
                requests_expired=stats.requests_expired,
                slow_closes=stats.slow_closes,
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

    def stop(self) -> None:
        """Leave the swarm: a lingering or staying peer tells the tracker and ``run`` returns."""
        self._stopping = True

    async def _linger(self, announcer: asyncio.Task[None]) -> None:
        """Keep serving until every peer of the swarm has finished (bounded by ``linger``),
        or, with ``stay``, until ``stop()``."""
        deadline = time.monotonic() + self.config.linger
        while (
            not self._stopping
            and (self.config.stay or (not self.swarm_complete and time.monotonic() < deadline))
            and not announcer.done()
        ):
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
        if exc is not None:
            self._fail(f"{task.get_name()} failed: {exc}", exc)

    def _fail(self, message: str, exc: BaseException) -> None:
        """Something the peer can't go on without failed (the disk, the origin): end it."""
        if self._fatal is None:
            log.error("%s", message)
            self._fatal = exc
            self.finished.set()  # wake the waiter, which raises it

    async def _shutdown(self) -> None:
        for conn in list(self.conns.values()):
            self._close_conn(conn)
        await self._cancel_tasks()
        # Connections a task opened while being cancelled (see _cancel_tasks).
        for conn in list(self.conns.values()):
            self._close_conn(conn)
        if self._server is not None:
            self._server.close()
        # Let writes already handed to the disk thread finish before the files close;
        # receiving threads end within _RECV_POLL_MS of their connection's close.
        await asyncio.get_running_loop().run_in_executor(None, self._disk.shutdown)
        await asyncio.get_running_loop().run_in_executor(None, self._recv.shutdown)
        for buf in self._received.values():
            self._block_pool.release(buf)
        self._received.clear()
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

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(_TICK)
            self._feed(Tick())
            refused = self.session.stats.pending_refused
            if refused != self._refusals_seen:
                self._refusals_seen = refused
                now = time.monotonic()
                if now - self._refusal_logged >= 10.0:  # one line per 10 s, however many come
                    self._refusal_logged = now
                    log.warning(
                        "refused connections at once: %d are still in their handshake "
                        "(%d refused so far)",
                        self.config.max_pending_conns,
                        refused,
                    )

    # --- tracker -------------------------------------------------------------------

    async def _announce(self, *, leaving: bool = False) -> Reply:
        # The origin's throttled answers since the last announce, for the tracker's
        # adaptive origin budget; counted again if this announce is lost.
        counters = self.origin.counters
        throttles = counters.throttled - self._throttles_told
        retry_after = counters.retry_after
        progress = self.session.announce_progress()
        if len(progress) > MAX_PROGRESS_ENTRIES:  # finished pulls wait for the next one
            progress = dict(list(self.session.origin_progress.items())[:MAX_PROGRESS_ENTRIES])
        # Pulls with nothing on the wire, only waiting out a throttled answer: the
        # tracker may take these back when the origin throttles (none of it read).
        waiting = [
            piece
            for piece, (reading, held) in self._pull_activity.items()
            if not reading and held and not progress.get(piece)
        ]
        msg = Announce(
            ref=self.m.ref,
            peer_id=self.peer_id,
            port=self.listen_port,
            have=self.session.have.to_bytes(),
            host=self.config.advertise_host,
            progress=progress,
            barred=sorted(self.session.barred),
            done=self.store.complete,
            leaving=leaving,
            zone=self.config.zone,
            seeder=self.config.seeder,
            throttles=throttles,
            retry_after=retry_after,
            waiting=waiting[:MAX_PROGRESS_ENTRIES],
        )
        reply = await self.tracker.announce(msg)
        self.session.announced(progress)
        self._throttles_told += throttles
        if counters.retry_after == retry_after:
            counters.retry_after = 0.0
        return reply

    async def _announce_loop(self) -> None:
        backoff = Backoff(tracker_retry(self.config.tracker_timeout))
        while True:
            try:
                reply = await self._announce()
            except TrackerError as exc:
                now = time.monotonic()
                delay = backoff.fail(now, self.rng)
                down = backoff.failing_for(now)
                log.warning(
                    "tracker unreachable for %.0fs (%s); retrying in %.1fs", down, exc, delay
                )
                if not backoff.allows(now, delay) and not self.store.complete:
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
                await asyncio.sleep(delay)
                continue
            if backoff.failures:
                log.warning("tracker reachable again")
            backoff.reset()
            self._apply_reply(reply)
            # Announce again as soon as an origin pull finished, so the next
            # assignment comes while the other pulls still run: one announce in
            # flight at a time, and pulls that finish meanwhile share the next.
            # Only verified origin pieces trigger it, so a peer announces at most
            # as often as it completes pieces (a floor of a tenth of the interval
            # here made a lone peer 23x slower than --direct with 4 MiB pieces).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._announce_soon.wait(), reply.interval)
            self._announce_soon.clear()

    def _apply_reply(self, reply: Reply) -> None:
        if reply.origin_rate != self.origin_limit.rate:
            self.origin_limit.set_rate(reply.origin_rate)
        if reply.assigned and not self.session.stats.origin_pieces and not self.origin_tasks:
            log.info(
                "first origin assignment (%d pieces) %.2fs after the process started",
                len(reply.assigned),
                process_age() or 0.0,
            )
        self._feed(
            TrackerReplied(
                peers=reply.peers,
                assigned=reply.assigned,
                peer_zones=reply.peer_zones,
                complete=reply.complete,
            )
        )

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
            self.session.swarm_complete = True
            self.finished.set()

    # --- seeder role ----------------------------------------------------------------

    def _start_pull(self, index: int) -> None:
        if index in self.origin_tasks:
            return
        self.origin_tasks[index] = self._spawn(self._pull_from_origin(index), f"origin-{index}")

    async def _pull_from_origin(self, index: int) -> None:
        piece = self.m.piece(index)

        def attempt(_: int) -> None:
            # Reported in announces: the tracker's stall detection watches it move.
            self._feed(OriginProgress(index, 0, reset=True))

        def advance(n: int) -> None:
            self._feed(OriginProgress(index, n))

        # [ranges reading, ranges waiting out a throttled answer] of this pull.
        counts = self._pull_activity[index] = [0, 0]

        def activity(reading: int, waiting: int) -> None:
            counts[0] += reading
            counts[1] += waiting

        try:
            async with self._origin_pool.lease(min(piece.length, self._origin_pool.size)) as buf:
                await pull_piece(
                    self.reader,
                    self.store,
                    self.m,
                    index,
                    buf,
                    advance,
                    on_attempt=attempt,
                    activity=activity,
                    checked=lambda end: self._feed(OriginChecked(index, end)),
                )
        except BaseException:
            self._pull_activity.pop(index, None)
            self.origin_tasks.pop(index, None)
            # Cancelled (the tracker took it back) or failed: peers may hold it now,
            # and the session asks them at once.
            self._feed(PullFailed(index))
            raise
        self._pull_activity.pop(index, None)
        self.origin_tasks.pop(index, None)
        self._feed(PullDone(index))

    # --- blocks and pieces -----------------------------------------------------------

    def _store_block(self, conn_id: int, block: BlockRequest) -> None:
        buf = self._received.pop((conn_id, block), None)
        if buf is None:  # not received here (cannot happen): tell the session it is not stored
            self._feed(BlockStored(conn_id, block, written=False))
            return
        view = memoryview(buf)[: block.length]
        written = asyncio.get_running_loop().run_in_executor(
            self._disk, self.store.write_block, block.piece, block.offset, view
        )
        written.add_done_callback(lambda fut: self._block_written(conn_id, block, buf, view, fut))

    def _block_written(
        self,
        conn_id: int,
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
        if isinstance(exc, VerificationError):
            # The block did not match its digest: nothing was written; its sender lied.
            self._feed(BlockStored(conn_id, block, written=False, corrupt=True))
            return
        if exc is not None:
            # The disk, not the peer, failed (full, read-only): nothing more can land.
            self._fail(
                f"writing a block of {self.m.describe_piece(block.piece)} failed: {exc}", exc
            )
            return
        self._feed(BlockStored(conn_id, block, written=fut.result()))

    async def _verify(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._disk, self.store.verify_assembled, index)
        if not ok:
            log.warning("%s failed blake3 verification", self.m.describe_piece(index))
        self._feed(PieceVerified(index) if ok else PieceFailed(index))

    async def _finish(self) -> None:
        await asyncio.to_thread(self.store.finish)
        self.finished_at = time.monotonic()
        self.finished.set()
        log.info("artifact complete and verified")
        with contextlib.suppress(TrackerError):
            reply = await self._announce()
            self._apply_reply(reply)

    # --- connections ---------------------------------------------------------------

    async def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.config.listen_host, self.config.listen_port))
        sock.listen(256)
        sock.setblocking(False)
        self._server = sock
        self.listen_port = self.session.listen_port = sock.getsockname()[1]
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
            if len(self.conns) + self._dials >= self.max_conns:
                sock.close()
                self._refuse_at_limit(addr)
                continue
            try:
                self._start_conn(sock, addr, outbound=False)
            except OSError as exc:  # reset before we got to it
                sock.close()
                log.info("peer connection from %s:%d lost at once: %s", addr[0], addr[1], exc)

    def _refuse_at_limit(self, addr: tuple[str, int]) -> None:
        self.conns_refused += 1
        now = time.monotonic()
        if now - self._refusal_logged >= 10.0:  # one line per 10 s, however many come
            self._refusal_logged = now
            log.warning(
                "refused %s:%d at once: %d connections are open, the most this process's "
                "descriptor limit allows (%d refused so far)",
                addr[0],
                addr[1],
                len(self.conns),
                self.conns_refused,
            )

    async def _dial(self, peer_id: bytes, host: str, port: int) -> None:
        if len(self.conns) + self._dials >= self.max_conns:
            log.info("not dialing peer %s: at the connection limit", peer_id.hex()[:8])
            self._feed(DialFailed(peer_id))
            return
        self._dials += 1
        try:
            await self._connect(peer_id, host, port)
        finally:
            self._dials -= 1

    async def _connect(self, peer_id: bytes, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as exc:  # out of descriptors: tried again later
            log.warning("can't open a socket to peer %s: %s", peer_id.hex()[:8], exc)
            self._feed(DialFailed(peer_id))
            return
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), _DIAL_TIMEOUT)
            self._start_conn(sock, (host, port), outbound=True, peer_id=peer_id)
        except (OSError, TimeoutError, ValueError, OverflowError) as exc:  # odd names, ports
            sock.close()
            log.info("can't connect to peer %s at %r:%d: %s", peer_id.hex()[:8], host, port, exc)
            self._feed(DialFailed(peer_id))
        except BaseException:  # cancelled: the socket is still ours to close
            sock.close()
            raise

    def _start_conn(
        self, sock: socket.socket, addr: tuple[str, int], *, outbound: bool, peer_id: bytes = b""
    ) -> None:
        sock.setblocking(False)
        tune_socket(sock, self.config.unsent_bytes or unsent_limit(self.block_size))
        conn = _Conn(next(self._conn_ids), sock, addr, outbound)
        self.conns[conn.id] = conn
        conn.tasks = [
            self._spawn_conn(self._reader(conn), conn, "reader"),
            self._spawn_conn(self._writer(conn), conn, "writer"),
        ]
        self._feed(Opened(conn.id, outbound, peer_id, f"{addr[0]}:{addr[1]}"))

    def _spawn_conn(self, coro: object, conn: _Conn, role: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=f"{role}-{conn.addr}")  # type: ignore[arg-type]
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                if conn.closing and role == "writer":
                    self._close_conn(conn)
                return
            exc = t.exception()
            was_open = not conn.closed
            self._close_conn(conn)
            if not was_open:
                return
            if isinstance(exc, RemoteProtocolError):
                self._feed(Closed(conn.id, str(exc), remote_fault=True))
            elif exc is None or isinstance(exc, SwarmError | OSError | EOFError):
                self._feed(Closed(conn.id, str(exc or "") or type(exc).__name__))
            else:
                log.error("%s of %r crashed: %r", role, conn, exc)
                self._feed(Closed(conn.id, repr(exc)))
                self._fail(f"{role} of {conn!r} crashed: {exc!r}", exc)

        task.add_done_callback(done)
        return task

    def _close_conn(self, conn: _Conn, *, flush: bool = False) -> None:
        """Close ``conn``; with ``flush``, once what is queued on it has been sent."""
        if conn.closed:
            return
        if flush and conn.control and not conn.closing:
            # The writer sends what is queued (a refusal's Handshake), then ends.
            conn.closing = True
            conn.blocks.clear()
            conn.wake.set()
            for task in conn.tasks:
                if task.get_name().startswith("reader") and task is not asyncio.current_task():
                    task.cancel()
            asyncio.get_running_loop().call_later(_CLOSE_FLUSH, self._close_conn, conn)
            return
        conn.closed = True
        self.conns.pop(conn.id, None)
        for task in conn.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        conn.sock.close()

    async def _reader(self, conn: _Conn) -> None:
        loop = asyncio.get_running_loop()
        decoder = FrameDecoder(
            piece_lengths=self.m.piece_lengths, max_block=max(self.block_size, 1)
        )
        download = self.download_limit
        ctrl = bytearray(64 * 1024)
        block_buf: mmap.mmap | None = None  # a pool buffer between a block's header and end
        block_view = memoryview(b"")
        block: BlockRequest | None = None
        filled = 0
        lowat = 1
        # A payload a thread is receiving into ``block_buf`` (see _recv_payload).
        receiving: concurrent.futures.Future[int] | None = None
        try:
            while True:
                event = decoder.next_event()
                if event is NEED_DATA:
                    remaining = decoder.payload_remaining
                    if block is not None and remaining > 0:
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
                        elif remaining >= _OFF_LOOP_MIN and self._recv_slots.acquire(
                            blocking=False
                        ):
                            receiving = self._recv.submit(
                                _recv_payload,
                                conn.sock,
                                block_view[filled : filled + remaining],
                                lambda: conn.closed or conn.closing,
                                self._recv_slots,
                            )
                            n = await asyncio.wrap_future(receiving)
                            receiving = None
                            lowat = 0  # the thread moved it: set it again before the next wait
                        else:
                            n = await loop.sock_recv_into(
                                conn.sock, block_view[filled : filled + remaining]
                            )
                        if n == 0:
                            raise EOFError("connection closed in the middle of a block")
                        decoder.payload_consumed(n)
                        filled += n
                    else:
                        if lowat != 1:
                            lowat = _set_rcvlowat(conn.sock, 1)
                        n = await loop.sock_recv_into(conn.sock, ctrl)
                        if n == 0:
                            decoder.feed_eof()
                        else:
                            decoder.feed(bytes(ctrl[:n]))
                    continue
                if isinstance(event, BlockHeader):
                    block = BlockRequest(event.piece, event.offset, event.length)
                    self._feed(BlockStarted(conn.id, block))
                    if conn.closed or conn.closing:
                        return  # the session refused it
                    filled = 0
                    block_buf = await self._block_pool.acquire()
                    block_view = memoryview(block_buf)
                elif isinstance(event, BlockPayload):
                    block_view[filled : filled + len(event.data)] = event.data
                    filled += len(event.data)
                    if download.limited:
                        # Payload that came in with control frames: owed, paid by the next wait.
                        download.reserve(len(event.data))
                elif isinstance(event, BlockEnd):
                    assert block is not None and block_buf is not None
                    block_view.release()
                    key = (conn.id, block)
                    # Handed on: the session's StoreBlock takes it, or it goes back.
                    self._received[key] = block_buf
                    block_buf = None
                    self._feed(BlockReceived(conn.id, block))
                    leftover = self._received.pop(key, None)
                    if leftover is not None:
                        self._block_pool.release(leftover)
                    block = None
                elif isinstance(event, ConnectionClosed):
                    raise EOFError("peer closed the connection")
                else:
                    self._feed(Received(conn.id, event))
                    if conn.closed or conn.closing:
                        return
        finally:
            if block_buf is not None:
                if receiving is not None and not receiving.done():
                    # Cancelled while a thread still fills it (it stops within
                    # _RECV_POLL_MS of the close): the buffer goes back to the pool
                    # only once that thread is done with it.
                    buf, pool = block_buf, self._block_pool

                    def give_back(_: object) -> None:
                        with contextlib.suppress(RuntimeError):  # the loop has closed
                            loop.call_soon_threadsafe(pool.release, buf)

                    receiving.add_done_callback(give_back)
                else:
                    self._block_pool.release(block_buf)

    # --- uploads -------------------------------------------------------------------

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
                if conn.closing:
                    return
                if ahead is None and (req := self._next_block(conn)) is not None:
                    ahead = (req, asyncio.create_task(self._load_block(req)))
                if ahead is not None:
                    req, loading = ahead
                    ahead = None
                    if (nxt := self._next_block(conn)) is not None:
                        ahead = (nxt, asyncio.create_task(self._load_block(nxt)))
                    try:
                        await self._send_block(loop, conn, req, await loading)
                    finally:
                        self._feed(UploadDone(conn.id, req))
                    continue
                conn.wake.clear()
                await conn.wake.wait()
        finally:
            if ahead is not None:
                req, loading = ahead
                loading.cancel()
                loading.add_done_callback(self._release_loaded)
                self._feed(UploadDone(conn.id, req))

    def _next_block(self, conn: _Conn) -> Request | None:
        """The next block to send on ``conn``. One the store no longer holds checked
        (its piece failed verification after the session granted it: the session
        learns of it a moment later) is refused with a Reject, not sent."""
        while conn.blocks:
            req = conn.blocks.popleft()
            if self.store.servable(req.piece, req.offset, req.length):
                return req
            self._send(conn.id, Reject(req.piece, req.offset, req.length))
            self._feed(UploadDone(conn.id, req))
        return None

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
        header = encode(BlockHeader(req.piece, req.offset, req.length))
        if buf is not None:
            try:
                await loop.sock_sendall(conn.sock, header)
                with memoryview(buf) as whole:
                    await self._send_payload(
                        lambda start, count: loop.sock_sendall(
                            conn.sock, whole[start : start + count]
                        ),
                        req.length,
                    )
            finally:
                self._upload_pool.release(buf)
            return
        # Sent from the file as it is: only verified pieces and checked blocks.
        self.store.require_servable(req.piece, req.offset, req.length)
        await loop.sock_sendall(conn.sock, header)
        if self.config.serve_corrupt:
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
