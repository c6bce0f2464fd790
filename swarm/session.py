"""The peer session: every rule of one peer, and no I/O.

A :class:`PeerSession` is the state machine of one peer of one swarm. It owns the
piece picker, the upload scheduler, every connection's handshake, bitfield and
requested and cancelled blocks, the contributors of each piece (for blame), the
origin pulls the tracker assigned, and every timeout. It never reads a clock,
opens a socket or starts a thread: the caller (the asyncio peer in
:mod:`swarm.peer`, or the simulator) feeds it **events** with the time they
happened, and carries out the **actions** it returns::

    actions = session.handle(Received(conn, msg), now)
    for action in actions:
        ...  # Send, SendBlock, StoreBlock, Verify, StartPull, CancelPull, Dial, Close, ...

Connections are named by the caller (any int, unique while open). An action on a
connection the session has closed, or an event about one, is simply ignored, so a
driver never needs to know whether a close has reached it yet.

The rules, each tested in ``tests/test_session.py``:

- **Handshake.** Nothing but the connect flow (:class:`swarm.protocol.PeerHandshake`)
  is accepted until the remote proved the cluster token; an unproven connection
  is closed after ``handshake_timeout``, and at most ``max_pending_conns``
  accepted connections wait at a time. If both peers dial each other, both keep
  the connection the peer with the smaller id dialed. A proven dialer that we
  refuse (duplicate, barred) still gets our Handshake first, so it can tell a
  refusal from a token mismatch.
- **Requests.** ``requests_per_peer`` blocks in flight per connection (by default
  :func:`requests_in_flight` of the block size), picked
  rarest first; a block that was not requested closes the connection; a block that
  crossed our Cancel on the wire is dropped without offence. A connection that
  leaves our requests unanswered for ``request_timeout`` has them expire: they go
  to other peers, and it is kept to one request in flight (a probe) until it
  delivers again. A block whose payload takes longer than ``request_timeout`` plus
  its length at :data:`MIN_BLOCK_RATE` closes its connection (a trickle would
  otherwise pin a receive buffer). A connection left with nothing in flight and
  nothing to pick takes over half the requests waiting at a slower peer
  (:meth:`PeerSession._take_over`, ``PiecePicker.take_over``).
- **Uploads.** Requests for pieces we hold are served over ``upload_slots``
  slots, the requester that holds least first (each Request says how many KiB of
  checked data its sender holds; see :mod:`swarm.choker`), at most ``uploads_per_conn``
  per connection (a connection that asks for much and never reads can't hold
  every slot); an upload that does not finish within ``request_timeout`` closes
  its connection.
- **Cut-through** (``cut_through`` > 0; format-2 manifests, whose blocks are
  checked as they land). Blocks checked on arrival, and origin windows checked as
  they land (:class:`OriginChecked`), are served before their piece is whole: a
  Partial (which blocks of the piece we hold) goes to a few random neighbours
  that lack the piece while few of them hold it whole, and a requester asks a
  piece's blocks from a random one on, so the nodes fetching a piece from its one
  seeder get different blocks and trade them. Session-driven simulator, 12 nodes,
  2 GiB in 256 MiB pieces (tests/test_sim_session_swarm.py): 3.80 -> 1.93 x T_min;
  100 nodes, 16 GiB, n100-o100: 2.51 -> 1.64. The peer runs it with
  :data:`CUT_THROUGH_BLOCKS` (``swarm fetch --cut-through``); its store serves
  only blocks it checked (``PieceStore.servable``).
- **Trust.** A piece counts, is announced (HAVE, only to connections that lack it)
  and is served whole only once verified; before that, only its blocks checked
  against the manifest's block digests are served (cut-through). A piece that
  fails verification is blamed on its one source, or on the one source two
  failed pieces share; that peer is barred for the swarm (closed, never admitted
  again, reported to the tracker).
- **Origin pulls.** Pieces the tracker assigns are reserved in the picker and
  pulled; one the tracker takes back is released and asked of peers at once.
- **Zones.** Peers of another zone are asked only for what no same-zone peer has;
  a same-zone peer that leaves requests unanswered for ``zone_patience`` is
  treated as one of another zone from then on.
- **Liveness.** A keepalive after ``keepalive`` seconds of our silence; a
  connection silent for ``idle_timeout`` is closed. A peer closed for a timeout or
  that could not be reached is not dialed again for a while (doubling, capped).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from core.auth import NONCE_SIZE, ClusterKey
from core.bitfield import Bitfield
from core.errors import RemoteProtocolError
from swarm.choker import UploadScheduler
from swarm.hosts import valid_host
from swarm.picker import BlockRequest, PiecePicker
from swarm.protocol import (
    HELD_UNIT,
    MAX_BLOCK,
    MAX_HELD,
    MIN_PARTIAL_BLOCK,
    BitfieldMsg,
    Cancel,
    Handshake,
    Have,
    Hello,
    KeepAlive,
    Message,
    Partial,
    PeerHandshake,
    Reject,
    Request,
)

__all__ = [
    "CUT_THROUGH_BLOCKS",
    "Action",
    "AnnounceSoon",
    "BlockReceived",
    "BlockStarted",
    "BlockStored",
    "CancelPull",
    "Close",
    "Closed",
    "Complete",
    "Dial",
    "DialFailed",
    "Event",
    "Opened",
    "OriginChecked",
    "OriginProgress",
    "PeerSession",
    "PieceFailed",
    "PieceVerified",
    "Progress",
    "PullDone",
    "PullFailed",
    "Received",
    "Send",
    "SendBlock",
    "SessionConfig",
    "SessionStats",
    "StartPull",
    "StoreBlock",
    "Tick",
    "TrackerReplied",
    "UploadDone",
    "Verify",
    "blocks_bytes",
]

log = logging.getLogger("swarm.session")

CUT_THROUGH_HOLDERS: Final = 4
"""Partials of a piece go out only while fewer neighbours than this hold it whole."""

CUT_THROUGH_FANOUT: Final = 8
"""Neighbours each Partial goes to (random ones among those lacking the piece)."""

CUT_THROUGH_BLOCKS: Final = 2
"""The peer's ``cut_through``: a Partial for every 2 blocks more held (the
simulators' value; a session made without it has cut-through off)."""

_CANCELLED_MEMORY: Final = 4096  # cancelled blocks remembered per connection
_REDIAL_MIN: Final = 5.0  # seconds before a peer that failed us is dialed again, doubling
_REDIAL_MAX: Final = 300.0
# A block's payload may take request_timeout plus its length at this rate before its
# connection is closed: enough for a big block over a busy link, not for a trickle.
MIN_BLOCK_RATE: Final = 1024 * 1024


@dataclass(frozen=True)
class SessionConfig:
    """The policy settings of a peer; every one is reachable from ``swarm fetch`` flags.

    Not slotted: the CLI and :class:`swarm.peer.PeerConfig` read the defaults off
    the class (``SessionConfig.block_size``), so they are stated only here.
    """

    block_size: int = 4 * 1024 * 1024
    requests_per_peer: int = 0  # 0: by the block size, see requests_in_flight
    upload_slots: int = 16
    uploads_per_conn: int = 2  # one block sending, one read ahead
    request_timeout: float = 30.0
    handshake_timeout: float = 10.0
    max_pending_conns: int = 256
    # Connections beyond which no one new is dialed (others may still dial us): the
    # tracker's reply sample, so a peer knows a reply's worth of neighbours at most.
    max_peers: int = 50
    keepalive: float = 20.0
    idle_timeout: float = 90.0
    zone: str = ""
    zone_patience: float = 5.0
    endgame_duplicates: int = 2
    max_upload_queue: int = 256
    # Cut-through relay: blocks checked on arrival are served before their piece is
    # whole, and a Partial goes out each time we hold this many more blocks of a
    # piece that few neighbours hold whole (see PeerSession._checked). 0: off (a
    # format-1 manifest's blocks are checked only with their piece).
    cut_through: int = 0


PIPELINE_BYTES: Final = 12 * 1024 * 1024
MIN_REQUESTS: Final = 6
MAX_REQUESTS: Final = 12


def requests_in_flight(block_size: int) -> int:
    """Block requests kept in flight per connection by default: ``PIPELINE_BYTES`` of
    blocks, at least 6 and at most 12 (12 of 1 MiB blocks, 6 of 4 MiB ones).

    Measured 2026-12-06. On the shaped fabric-bound testbed (8 nodes at 400 Mbit/s,
    1 MiB blocks), 6 per connection left downlinks short of work: 1.14 and 1.15 x
    T_min against 1.09 and 1.10 with 12, alternating runs (the simulator of that run,
    ``benchmarks.sim_truth``: 1.06-1.09 against 1.017). With 4 MiB blocks 12 was worse:
    the session-driven mixed fleet (``tests/test_sim_session_swarm.py``, seeds 1-8)
    put its worst node at 1.17 x its own bound against 1.15 with 6, and at 3 or 4
    per connection seed 4 went to 1.48 and 1.26; with 1 MiB blocks 6 and 12 both
    keep every seed within 1.07 (with ``swarm.choker.LOOKAHEAD`` 12).
    """
    return max(MIN_REQUESTS, min(MAX_REQUESTS, PIPELINE_BYTES // max(1, block_size)))


SENT_TRACKED: Final = 65536
"""Blocks whose send counts a session keeps (see ``PeerSession._sent``)."""


@dataclass
class SessionStats:
    """Counters of one session, reported in ``swarm fetch --json`` and metrics."""

    peer_bytes: int = 0
    cross_zone_bytes: int = 0
    uploaded_bytes: int = 0
    origin_pieces: int = 0
    corrupt_pieces: int = 0
    corrupt_blocks: int = 0  # format 2: blocks refused on arrival (their sender is barred)
    cut_through_bytes: int = 0  # uploaded from pieces we did not hold whole yet
    auth_failures: int = 0
    handshake_timeouts: int = 0
    pending_refused: int = 0
    requests_expired: int = 0
    slow_closes: int = 0
    # Bytes received twice, by why: crossed our Cancel / piece already verified or
    # verifying / block already on disk.
    duplicate_causes: dict[str, int] = field(
        default_factory=lambda: {"cancelled": 0, "had": 0, "written": 0}
    )


# -- events: what the driver tells the session ---------------------------------------


@dataclass(frozen=True, slots=True)
class Opened:
    """A connection is up. ``peer_id``: whom we dialed (outbound), else empty;
    ``addr``: the remote's address, for logs."""

    conn: int
    outbound: bool
    peer_id: bytes = b""
    addr: str = ""


@dataclass(frozen=True, slots=True)
class DialFailed:
    """Dialing ``peer_id`` (a :class:`Dial` action) failed before a connection was up."""

    peer_id: bytes


@dataclass(frozen=True, slots=True)
class Received:
    """A control message arrived on ``conn`` (anything but block payload)."""

    conn: int
    msg: Message


@dataclass(frozen=True, slots=True)
class BlockStarted:
    """The header of a block arrived on ``conn``; its payload follows."""

    conn: int
    block: BlockRequest


@dataclass(frozen=True, slots=True)
class BlockReceived:
    """The whole payload of the block that started on ``conn`` arrived."""

    conn: int
    block: BlockRequest


@dataclass(frozen=True, slots=True)
class BlockStored:
    """A :class:`StoreBlock` finished; ``written`` False: it was on disk already.

    ``corrupt``: the block did not match the manifest's block digest and was not
    written (format 2); its sender is barred and the block asked of others.
    """

    conn: int
    block: BlockRequest
    written: bool = True
    corrupt: bool = False


@dataclass(frozen=True, slots=True)
class PieceVerified:
    """A :class:`Verify` found the assembled piece good."""

    piece: int


@dataclass(frozen=True, slots=True)
class PieceFailed:
    """A :class:`Verify` found the assembled piece bad (its blocks are thrown away)."""

    piece: int


@dataclass(frozen=True, slots=True)
class UploadDone:
    """A :class:`SendBlock` finished (or failed): its slot is free."""

    conn: int
    request: Request


@dataclass(frozen=True, slots=True)
class OriginProgress:
    """``nbytes`` of an origin pull of ``piece`` arrived (``reset``: an attempt restarts)."""

    piece: int
    nbytes: int
    reset: bool = False


@dataclass(frozen=True, slots=True)
class OriginChecked:
    """Bytes ``[0, length)`` of the origin pull of ``piece`` are on disk, each block
    checked against the manifest: with cut-through on, they may be served now."""

    piece: int
    length: int


@dataclass(frozen=True, slots=True)
class PullDone:
    """The origin pull of ``piece`` finished: written and verified."""

    piece: int


@dataclass(frozen=True, slots=True)
class PullFailed:
    """The origin pull of ``piece`` ended without the piece (cancelled, or failed)."""

    piece: int


@dataclass(frozen=True, slots=True)
class TrackerReplied:
    """An announce reply: peers to know, pieces to pull, zones, whether all are done."""

    peers: Sequence[tuple[bytes, str, int]] = ()
    assigned: Sequence[int] = ()
    peer_zones: Mapping[bytes, str] = field(default_factory=dict)
    complete: bool = False


@dataclass(frozen=True, slots=True)
class Closed:
    """``conn`` ended: closed by the remote, a socket error, or a frame we refused.

    ``reason`` says why for the log; ``remote_fault``: the remote broke the protocol.
    """

    conn: int
    reason: str = ""
    remote_fault: bool = False


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: timeouts, keepalives and expiries are checked (call about once a second)."""


Event = (
    Opened
    | DialFailed
    | Received
    | BlockStarted
    | BlockReceived
    | BlockStored
    | PieceVerified
    | PieceFailed
    | UploadDone
    | OriginProgress
    | OriginChecked
    | PullDone
    | PullFailed
    | TrackerReplied
    | Closed
    | Tick
)


# -- actions: what the session asks of the driver ------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send a control message on ``conn``."""

    conn: int
    msg: Message


@dataclass(frozen=True, slots=True)
class SendBlock:
    """Send the block ``request`` names (a verified piece's bytes) on ``conn``; then
    feed :class:`UploadDone`."""

    conn: int
    request: Request


@dataclass(frozen=True, slots=True)
class StoreBlock:
    """Write the block just received on ``conn``; then feed :class:`BlockStored`."""

    conn: int
    block: BlockRequest


@dataclass(frozen=True, slots=True)
class Verify:
    """Every block of ``piece`` is stored: hash it; feed PieceVerified or PieceFailed."""

    piece: int


@dataclass(frozen=True, slots=True)
class StartPull:
    """Pull ``piece`` from the origin; feed OriginProgress, then PullDone or PullFailed."""

    piece: int


@dataclass(frozen=True, slots=True)
class CancelPull:
    """Stop pulling ``piece``; feed PullFailed when it has stopped."""

    piece: int


@dataclass(frozen=True, slots=True)
class Dial:
    """Connect to ``peer_id``; feed Opened(outbound=True) or DialFailed."""

    peer_id: bytes
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Close:
    """Close ``conn`` once what was sent on it has gone out. The session has
    forgotten it already: feeding Closed for it is harmless."""

    conn: int
    reason: str


@dataclass(frozen=True, slots=True)
class Progress:
    """``piece`` (``length`` bytes) is verified and ours."""

    piece: int
    length: int


@dataclass(frozen=True, slots=True)
class Complete:
    """Every piece is verified (given once)."""


@dataclass(frozen=True, slots=True)
class AnnounceSoon:
    """Something the tracker should hear before the next interval (an origin piece)."""


Action = (
    Send
    | SendBlock
    | StoreBlock
    | Verify
    | StartPull
    | CancelPull
    | Dial
    | Close
    | Progress
    | Complete
    | AnnounceSoon
)


class _Conn:
    """The session's record of one connection."""

    __slots__ = (
        "addr",
        "bitfield",
        "block_time",
        "cancelled",
        "discarding",
        "established",
        "handshake",
        "held",
        "id",
        "last_block",
        "last_recv",
        "last_sent",
        "opened_at",
        "other_zone",
        "outbound",
        "peer_id",
        "receiving",
        "receiving_since",
        "rejects",
        "remote",
        "requested",
        "snubbed",
        "uploads",
        "waiting_since",
    )

    def __init__(
        self,
        conn: int,
        outbound: bool,
        peer_id: bytes,
        handshake: PeerHandshake,
        now: float,
        addr: str = "",
    ) -> None:
        self.id = conn
        self.addr = addr
        self.outbound = outbound
        self.peer_id = peer_id
        self.handshake = handshake
        self.established = False
        self.opened_at = now
        self.bitfield: Bitfield | None = None
        # Our requests in flight on it, oldest first.
        self.requested: dict[BlockRequest, None] = {}
        # Blocks we cancelled: the data may already be on the wire, which is no offence.
        self.cancelled: dict[BlockRequest, None] = {}
        self.receiving: BlockRequest | None = None  # the block whose payload is arriving
        self.receiving_since = 0.0
        self.discarding = False  # that block crossed our Cancel: dropped when whole
        self.waiting_since = now  # when the requests now in flight started waiting
        self.last_block = now
        self.block_time = 0.0  # seconds it takes per block it sends us, smoothed (0: unknown)
        self.last_recv = now
        self.last_sent = now
        self.snubbed = False  # left requests unanswered: one request in flight, a probe
        self.rejects = 0  # our requests it rejected since it last delivered a block
        self.other_zone = False  # in another zone than ours (both declared)
        # Asked only for what no same-zone peer has: another zone's, or a snubbed one of ours.
        self.remote = False
        self.uploads: dict[Request, float] = {}  # blocks being sent to it, since when
        self.held = 0  # KiB it holds, as its latest Request said (Request.held)

    def __repr__(self) -> str:
        return f"<peer {self.peer_id.hex()[:8] or '?'} {self.addr or self.id}>"


def blocks_bytes(blocks: Bitfield, block_size: int, length: int) -> int:
    """Bytes that ``blocks`` (of a piece of ``length`` in ``block_size`` blocks) cover:
    the piece's last block may be short."""
    held = blocks.count() * block_size
    if len(blocks) - 1 in blocks:
        held -= block_size * len(blocks) - length
    return held


def _held(conn: _Conn) -> int:
    return conn.held


class PeerSession:
    """The rules of one peer of one swarm (see the module docstring)."""

    def __init__(
        self,
        piece_lengths: Sequence[int],
        *,
        root: bytes,
        peer_id: bytes,
        key: ClusterKey,
        config: SessionConfig | None = None,
        rng: random.Random | None = None,
        nonce: Callable[[], bytes] | None = None,
        have: Iterable[int] = (),
        listen_port: int = 0,
        picker_factory: Callable[..., PiecePicker[Any]] = PiecePicker,
    ) -> None:
        """``picker_factory`` makes the picker (called as ``PiecePicker`` is): a variant
        of the policy for the simulator's ablations."""
        self.config = config or SessionConfig()
        self.lengths = list(piece_lengths)
        self.num_pieces = len(self.lengths)
        self.root = root
        self.peer_id = peer_id
        self.key = key
        self.listen_port = listen_port
        self.rng = rng or random.Random()
        self._nonce = nonce or (lambda: self.rng.randbytes(NONCE_SIZE))
        self.block_size = max(1, min(self.config.block_size, max(self.lengths, default=1)))
        self.requests_per_peer = self.config.requests_per_peer or requests_in_flight(
            self.block_size
        )
        # Blocks more held before another Partial; 0 (off) too when blocks are of a
        # size a Partial can't count in.
        self.cut_through = (
            self.config.cut_through if MIN_PARTIAL_BLOCK <= self.block_size <= MAX_BLOCK else 0
        )
        self.picker: PiecePicker[_Conn] = picker_factory(
            self.lengths,
            self.block_size,
            self.rng,
            endgame_duplicates=self.config.endgame_duplicates,
            spread=bool(self.cut_through),
        )
        self.uploads: UploadScheduler[_Conn, Request] = UploadScheduler(
            self.config.upload_slots,
            max_queue=self.config.max_upload_queue,
            max_per_peer=self.config.uploads_per_conn,
            progress=_held,
            copies=self._copies,
        )
        # Times we sent each block, for the upload order (swarm.choker): counts of
        # at most SENT_TRACKED blocks, forgotten all at once past that (they only
        # order a peer's next few requests; a fresh count costs a little order).
        self._sent: dict[Request, int] = {}
        self.stats = SessionStats()
        self.conns: dict[int, _Conn] = {}  # every open connection, proven or not
        self.peers: dict[bytes, _Conn] = {}  # proven connections, by peer id
        self.pending = 0  # accepted (inbound) connections still in their handshake
        self.barred: set[bytes] = set()
        self.known_peers: dict[bytes, tuple[str, int]] = {}
        self.peer_zones: dict[bytes, str] = {}
        self.dialing: set[bytes] = set()
        self._retry_at: dict[bytes, tuple[float, float]] = {}  # peer -> (not before, backoff)
        self.pulls: set[int] = set()  # origin pulls running
        # Cut-through: per piece not yet whole, its blocks on disk and checked
        # (served to peers), and how many of them the last Partial told.
        self.partial: dict[int, Bitfield] = {}
        self._told: dict[int, int] = {}
        # Bytes of the verified pieces and of the blocks in ``partial``: what our
        # Requests say we hold (Request.held), for the servers' upload order.
        self._whole_bytes = 0
        self._partial_bytes = 0
        self.origin_progress: dict[int, int] = {}
        # Pulls finished since the tracker last heard: reported once more, whole, so
        # it can tell an origin copy pulled from one the peer had from peers.
        self.origin_finished: dict[int, int] = {}
        self.contributors: dict[int, set[bytes]] = {}
        self.failed_sets: list[set[bytes]] = []
        self.verifying: set[int] = set()
        # Blocks handed to the driver to store, with the record of their source (kept
        # even if it closes meanwhile: the picker and blame still need it).
        self._storing: dict[tuple[int, BlockRequest], _Conn] = {}
        self.swarm_complete = False
        self._completed = False
        for piece in have:
            self._mark_have(piece)
        self._completed = self.picker.done

    # -- what the driver reads ----------------------------------------------------

    @property
    def complete(self) -> bool:
        """Every piece is verified."""
        return self.picker.done

    @property
    def have(self) -> Bitfield:
        return self.picker.have

    def has(self, piece: int) -> bool:
        return self.picker.has(piece)

    def peer_of(self, conn: int) -> bytes:
        """The proven peer id of ``conn`` (empty if unknown or not proven)."""
        record = self.conns.get(conn)
        return record.peer_id if record is not None and record.established else b""

    def is_other_zone(self, conn: int) -> bool:
        record = self.conns.get(conn)
        return record is not None and record.other_zone

    def restore(
        self, pieces: Iterable[int], blocks: Mapping[int, Sequence[int]] | None = None
    ) -> None:
        """Pieces found verified on disk at start-up, before any connection, and
        ``blocks``: for unfinished pieces, the offsets of blocks found checked on disk
        (a fetch that stopped part-way); those are never asked for again."""
        for piece in pieces:
            self._mark_have(piece)
        for piece, offsets in (blocks or {}).items():
            self.picker.restore_blocks(piece, offsets)
        self._completed = self.picker.done

    # -- events -------------------------------------------------------------------

    def handle(self, event: Event, now: float) -> list[Action]:
        """Apply ``event`` (which happened at ``now``); the actions to carry out, in order."""
        out: list[Action] = []
        if isinstance(event, Received):
            conn = self.conns.get(event.conn)
            if conn is not None:
                self._received(conn, event.msg, now, out)
        elif isinstance(event, BlockReceived):
            conn = self.conns.get(event.conn)
            if conn is not None:
                self._block_received(conn, event.block, now, out)
        elif isinstance(event, BlockStored):
            if event.corrupt:
                self._block_corrupt(event.conn, event.block, now, out)
            else:
                self._block_stored(event.conn, event.block, event.written, now, out)
        elif isinstance(event, UploadDone):
            self._upload_done(event.conn, event.request, now, out)
        elif isinstance(event, BlockStarted):
            conn = self.conns.get(event.conn)
            if conn is not None:
                self._block_started(conn, event.block, now, out)
        elif isinstance(event, OriginProgress):
            if event.piece in self.pulls:
                done = 0 if event.reset else self.origin_progress.get(event.piece, 0)
                self.origin_progress[event.piece] = done + event.nbytes
        elif isinstance(event, OriginChecked):
            if event.piece in self.pulls:
                self._checked(event.piece, 0, event.length, now, out)
        elif isinstance(event, Tick):
            self._tick(now, out)
        elif isinstance(event, PieceVerified):
            self.verifying.discard(event.piece)
            if not self.has(event.piece):
                self._piece_ours(event.piece, now, out)
        elif isinstance(event, PieceFailed):
            self._piece_failed(event.piece, now, out)
        elif isinstance(event, PullDone):
            self._pull_done(event.piece, now, out)
        elif isinstance(event, PullFailed):
            self._pull_ended(event.piece, now, out)
        elif isinstance(event, TrackerReplied):
            self._tracker_replied(event, now, out)
        elif isinstance(event, Opened):
            self._opened(event, now, out)
        elif isinstance(event, DialFailed):
            self.dialing.discard(event.peer_id)
            self._retry_later(event.peer_id, now)
        elif isinstance(event, Closed):
            conn = self.conns.get(event.conn)
            if conn is not None:
                self._closed(conn, event.reason, event.remote_fault, now, out)
        return out

    # -- connections --------------------------------------------------------------

    def _opened(self, event: Opened, now: float, out: list[Action]) -> None:
        if event.outbound:
            self.dialing.discard(event.peer_id)
        elif self.pending >= self.config.max_pending_conns:
            self.stats.pending_refused += 1
            out.append(Close(event.conn, "too many connections are still in their handshake"))
            return
        handshake = PeerHandshake(
            self.key,
            dialer=event.outbound,
            root=self.root,
            peer_id=self.peer_id,
            listen_port=self.listen_port,
            nonce=self._nonce(),
        )
        conn = _Conn(event.conn, event.outbound, event.peer_id, handshake, now, event.addr)
        self.conns[event.conn] = conn
        if not event.outbound:
            self.pending += 1
        for msg in handshake.start():
            self._send(conn, msg, now, out)

    def _send(self, conn: _Conn, msg: Message, now: float, out: list[Action]) -> None:
        conn.last_sent = now
        out.append(Send(conn.id, msg))

    def _handshake_msg(
        self, conn: _Conn, msg: Hello | Handshake, now: float, out: list[Action]
    ) -> None:
        try:
            replies = conn.handshake.receive(msg)  # raises unless proved, for our root
        except RemoteProtocolError as exc:
            self._refused(conn, str(exc), now, out)
            return
        if not isinstance(msg, Handshake):
            for reply in replies:
                self._send(conn, reply, now, out)
            return
        refusal = self._admit(conn, msg, now, out)
        if refusal:
            if not conn.outbound:
                # The dialer proved the token: answer before closing, or it would
                # take the refusal for a token mismatch.
                for reply in replies:
                    self._send(conn, reply, now, out)
            self._drop(conn, now, out)
            out.append(Close(conn.id, refusal))
            return
        for reply in replies:
            self._send(conn, reply, now, out)
        self._send(conn, BitfieldMsg.from_bitfield(self.picker.have), now, out)
        for piece, blocks in self.partial.items():
            if self._told.get(piece):
                self._send(conn, Partial.of(piece, self.block_size, blocks), now, out)

    def _admit(self, conn: _Conn, msg: Handshake, now: float, out: list[Action]) -> str:
        """Make ``conn`` the connection to the proven peer ``msg`` names; else why not."""
        if msg.peer_id == self.peer_id or msg.peer_id in self.barred:
            return "connection to ourselves or to a barred peer"
        if conn.peer_id and conn.peer_id != msg.peer_id:
            return "peer id differs from what the tracker said"
        existing = self.peers.get(msg.peer_id)
        if existing is not None:
            # Both dialed at once. Both ends keep the connection that the peer
            # with the smaller id dialed, so they agree without another message.
            if conn.outbound != (self.peer_id < msg.peer_id):
                return "duplicate connection"
            self._drop(existing, now, out)
            out.append(Close(existing.id, "duplicate connection"))
        conn.peer_id = msg.peer_id
        conn.established = True
        conn.last_recv = conn.last_block = conn.waiting_since = now
        if not conn.outbound:
            self.pending -= 1
        self.peers[msg.peer_id] = conn
        self._retry_at.pop(msg.peer_id, None)
        # A peer no reply has named yet counts as in our zone: unknown is not remote.
        zone = self.config.zone
        theirs = self.peer_zones.get(msg.peer_id, "")
        conn.other_zone = bool(zone) and theirs not in ("", zone)
        conn.remote = conn.other_zone
        return ""

    def _refused(self, conn: _Conn, reason: str, now: float, out: list[Action]) -> None:
        """``conn`` failed the handshake: drop it with a warning, counted."""
        self.stats.auth_failures += 1
        side = "to" if conn.outbound else "from"
        log.warning("refused connection %s %r: %s", side, conn, reason)
        if conn.outbound and conn.peer_id:
            self._retry_later(conn.peer_id, now)
        self._drop(conn, now, out)
        out.append(Close(conn.id, reason))

    def _closed(
        self, conn: _Conn, reason: str, remote_fault: bool, now: float, out: list[Action]
    ) -> None:
        if not conn.established:
            if remote_fault:
                self._refused(conn, reason, now, out)
                return
            if conn.handshake.heard:
                # It spoke our protocol, then left before proving itself: a proven peer
                # that refuses us still sends its Handshake first, so this is most
                # likely our proof failing its check.
                self._refused(
                    conn,
                    f"it closed the connection during the handshake ({reason}): "
                    "it holds another cluster token, or none?",
                    now,
                    out,
                )
                return
            log.info("%r closed before its hello: %s", conn, reason)
            if conn.outbound and conn.peer_id:
                self._retry_later(conn.peer_id, now)
        else:
            if reason:
                log.info("dropping %r: %s", conn, reason)
            if remote_fault:
                self._retry_later(conn.peer_id, now)
        self._drop(conn, now, out)

    def _close(
        self, conn: _Conn, reason: str, now: float, out: list[Action], *, retry: bool = True
    ) -> None:
        """Close a connection by our own rule."""
        log.info("closing %r: %s", conn, reason)
        if retry and conn.peer_id:
            self._retry_later(conn.peer_id, now)
        self._drop(conn, now, out)
        out.append(Close(conn.id, reason))

    def _drop(self, conn: _Conn, now: float, out: list[Action]) -> None:
        """Forget ``conn``: its requests go back to be asked of others."""
        if self.conns.pop(conn.id, None) is None:
            return
        if not conn.established:
            if not conn.outbound:
                self.pending -= 1
        elif self.peers.get(conn.peer_id) is conn:
            del self.peers[conn.peer_id]
        self.picker.remove_peer(conn)
        self.uploads.peer_gone(conn)
        conn.requested.clear()
        self._grant(now, out)
        self._fill_all(now, out)

    def _retry_later(self, peer_id: bytes, now: float) -> None:
        """Don't dial ``peer_id`` again for a while (longer each time it fails us)."""
        _, backoff = self._retry_at.get(peer_id, (0.0, _REDIAL_MIN / 2))
        backoff = min(backoff * 2, _REDIAL_MAX)
        self._retry_at[peer_id] = (now + backoff, backoff)

    # -- messages -----------------------------------------------------------------

    def _received(self, conn: _Conn, msg: Message, now: float, out: list[Action]) -> None:
        conn.last_recv = now
        if not conn.established:
            if isinstance(msg, Hello | Handshake):
                self._handshake_msg(conn, msg, now, out)
            else:
                self._refused(conn, f"{type(msg).__name__} before the handshake", now, out)
            return
        if isinstance(msg, Have):
            if not 0 <= msg.piece < self.num_pieces:
                self._close(conn, f"HAVE of piece {msg.piece} of {self.num_pieces}", now, out)
                return
            self._have(conn, msg.piece, now, out)
        elif isinstance(msg, Partial):
            self._partial(conn, msg, now, out)
        elif isinstance(msg, Request):
            if not self._in_range(msg.piece, msg.offset, msg.length):
                self._close(
                    conn,
                    f"request of piece {msg.piece} bytes {msg.offset}+{msg.length}, outside the artifact",
                    now,
                    out,
                )
                return
            self._request(conn, msg, now, out)
        elif isinstance(msg, BitfieldMsg):
            try:
                sent = msg.to_bitfield(self.num_pieces)
            except RemoteProtocolError as exc:
                self._close(conn, str(exc), now, out)
                return
            if conn.bitfield is None:
                # The one record of the peer's pieces: the picker reads it (and
                # merges a second Bitfield into it).
                conn.bitfield = sent
            self.picker.add_peer(conn, sent, remote=conn.remote)
            self._fill(conn, now, out)
        elif isinstance(msg, Cancel):
            self.uploads.cancel(conn, Request(msg.piece, msg.offset, msg.length))
        elif isinstance(msg, Reject):
            block = BlockRequest(msg.piece, msg.offset, msg.length)
            conn.cancelled.pop(block, None)
            if block in conn.requested:
                del conn.requested[block]
                self.picker.block_failed(conn, block)
                bits = conn.bitfield
                if bits is not None and block.piece not in bits:
                    # Asked on a Partial the peer no longer serves (the piece failed
                    # there, or its pull was taken back): no offence, ask elsewhere.
                    self.picker.withdraw_offer(conn, block.piece)
                    self._fill_all(now, out)
                    return
                conn.rejects += 1
                if conn.rejects > self.requests_per_peer:
                    # An honest peer rejects only when its upload queue is full; one that
                    # rejects what its bitfield claims, again and again, would otherwise
                    # be asked for the same blocks forever, and hold them from others.
                    self._close(conn, f"rejected {conn.rejects} requests in a row", now, out)
                    return
            self._fill_all(now, out)
        elif isinstance(msg, Hello | Handshake):
            self._close(conn, f"a second {type(msg).__name__} on one connection", now, out)

    def _partial(self, conn: _Conn, msg: Partial, now: float, out: list[Action]) -> None:
        """``conn`` serves some blocks of a piece it is still fetching: ask it for them."""
        piece = msg.piece
        if not 0 <= piece < self.num_pieces:
            self._close(conn, f"PARTIAL of piece {piece} of {self.num_pieces}", now, out)
            return
        length = self.lengths[piece]
        theirs = -(-length // msg.block_size)
        try:
            sent = msg.blocks(theirs)
        except RemoteProtocolError as exc:
            self._close(conn, str(exc), now, out)
            return
        bits = conn.bitfield
        if bits is None:
            bits = conn.bitfield = Bitfield(self.num_pieces)
            self.picker.add_peer(conn, bits, remote=conn.remote)
        if piece in bits or self.picker.has(piece):
            return
        size = self.block_size
        if msg.block_size == size:
            blocks = sent
        else:  # ours is served if every block of theirs it overlaps is
            blocks = Bitfield(-(-length // size))
            for index in range(len(blocks)):
                first = index * size // msg.block_size
                last = (min(length, (index + 1) * size) - 1) // msg.block_size
                if all(i in sent for i in range(first, last + 1)):
                    blocks.add(index)
        self.picker.offer_blocks(conn, piece, blocks)
        self._fill(conn, now, out)

    def _servable(self, piece: int, offset: int, length: int) -> bool:
        """Whether we hold bytes ``offset..+length`` of ``piece`` checked (whole, or cut-through)."""
        if self.picker.has(piece):
            return True
        blocks = self.partial.get(piece)
        if blocks is None:
            return False
        size = self.block_size
        return all(i in blocks for i in range(offset // size, (offset + length - 1) // size + 1))

    def _in_range(self, piece: int, offset: int, length: int) -> bool:
        return (
            0 <= piece < self.num_pieces
            and offset >= 0
            and 0 < length <= self.lengths[piece] - offset
        )

    def _have(self, conn: _Conn, piece: int, now: float, out: list[Action]) -> None:
        bits = conn.bitfield
        if bits is None:
            bits = conn.bitfield = Bitfield(self.num_pieces)
            self.picker.add_peer(conn, bits, remote=conn.remote)
        if bits.add(piece) and not self.picker.has(piece):
            self.picker.peer_has(conn, piece)
            self._fill(conn, now, out)

    def _request(self, conn: _Conn, msg: Request, now: float, out: list[Action]) -> None:
        conn.held = msg.held
        servable = self._servable(msg.piece, msg.offset, msg.length)
        if not servable or not self.uploads.enqueue(conn, msg):
            self._send(conn, Reject(msg.piece, msg.offset, msg.length), now, out)
            return
        self._grant(now, out)

    # -- blocks from peers --------------------------------------------------------

    def _block_started(
        self, conn: _Conn, block: BlockRequest, now: float, out: list[Action]
    ) -> None:
        conn.last_recv = now
        if not conn.established:
            self._refused(conn, "block before the handshake", now, out)
            return
        if block in conn.requested:
            conn.discarding = False
        elif block in conn.cancelled:
            del conn.cancelled[block]
            conn.discarding = True  # it crossed our Cancel on the wire
        else:
            self._close(conn, f"sent block {tuple(block)} that was not requested", now, out)
            return
        conn.receiving = block
        conn.receiving_since = now

    def _block_received(
        self, conn: _Conn, block: BlockRequest, now: float, out: list[Action]
    ) -> None:
        conn.receiving = None
        if block in conn.requested:
            # Its pace: the time since its previous block, or since our requests
            # started waiting on it if it had none to send.
            took = now - max(conn.last_block, conn.waiting_since)
            conn.block_time = took if not conn.block_time else (3 * conn.block_time + took) / 4
        conn.last_recv = conn.last_block = now
        stats = self.stats
        stats.peer_bytes += block.length
        if conn.other_zone:
            stats.cross_zone_bytes += block.length
        conn.rejects = 0
        if conn.snubbed:
            conn.snubbed = False
            log.info("%r serves again", conn)
        if conn.discarding or block not in conn.requested:
            # It crossed our Cancel on the wire (or we cancelled it while it arrived).
            conn.discarding = False
            conn.cancelled.pop(block, None)
            stats.duplicate_causes["cancelled"] += block.length
        else:
            del conn.requested[block]
            if self.picker.has(block.piece) or block.piece in self.verifying:
                stats.duplicate_causes["had"] += block.length
            else:
                self._storing[(conn.id, block)] = conn
                out.append(StoreBlock(conn.id, block))
        self._fill(conn, now, out)

    def _block_stored(
        self, conn_id: int, block: BlockRequest, written: bool, now: float, out: list[Action]
    ) -> None:
        source = self._storing.pop((conn_id, block), None)
        conn = self.conns.get(conn_id)
        if source is None:
            return  # not a block we asked to store
        piece = block.piece
        if not written and any(key[1] == block for key in self._storing):
            # Another copy of this block was being written when this one was turned
            # away (workers run at once): that copy's report decides, and names its
            # sender among the contributors, whichever report comes first.
            self.stats.duplicate_causes["written"] += block.length
            return
        if not written:
            # On disk already (an earlier source's, or a pull's): these bytes are not
            # in the piece, but the block is there, and counts as received all the same.
            self.stats.duplicate_causes["written"] += block.length
        if self.picker.has(piece) or piece in self.verifying:
            return
        if written:
            # Counted even if the connection has closed since: the bytes are on disk
            # and in the piece's hash, and this names their source if it lied.
            self.contributors.setdefault(piece, set()).add(source.peer_id)
        for other, dup in self.picker.block_received(source, block):
            self._cancel(other, dup, now, out)
        self._checked(piece, block.offset, block.offset + block.length, now, out)
        if self.picker.piece_complete(piece):
            self.verifying.add(piece)
            out.append(Verify(piece))
        if conn is not None:
            self._fill(conn, now, out)

    def _block_corrupt(
        self, conn_id: int, block: BlockRequest, now: float, out: list[Action]
    ) -> None:
        """The block failed its digest before it was written: its one sender lied."""
        source = self._storing.pop((conn_id, block), None)
        if source is None:
            return
        self.stats.corrupt_blocks += 1
        log.warning(
            "block %d+%d of piece %d from %r failed its digest; asking others",
            block.offset,
            block.length,
            block.piece,
            source,
        )
        self.picker.block_failed(source, block)
        self._bar(source.peer_id, now, out)
        self._fill_all(now, out)

    def _cancel(self, conn: _Conn, block: BlockRequest, now: float, out: list[Action]) -> None:
        if block not in conn.requested:
            return
        del conn.requested[block]
        conn.cancelled[block] = None
        while len(conn.cancelled) > _CANCELLED_MEMORY:
            del conn.cancelled[next(iter(conn.cancelled))]
        self._send(conn, Cancel(block.piece, block.offset, block.length), now, out)

    # -- pieces -------------------------------------------------------------------

    def _mark_have(self, piece: int) -> list[tuple[_Conn, BlockRequest]]:
        """Record ``piece`` as verified; the picker's duplicate requests to cancel."""
        if not self.picker.has(piece):
            self._whole_bytes += self.lengths[piece]
        return self.picker.mark_have(piece)

    @property
    def held(self) -> int:
        """What our Requests say we hold (``Request.held``): KiB of verified pieces and
        of checked blocks of pieces not yet whole (cut-through), at most ``MAX_HELD``."""
        return min(MAX_HELD, (self._whole_bytes + self._partial_bytes) // HELD_UNIT)

    def _piece_ours(self, piece: int, now: float, out: list[Action]) -> None:
        """``piece`` is verified (from peers or the origin): count it, tell, move on."""
        self._forget_partial(piece)
        for conn, block in self._mark_have(piece):
            self._cancel(conn, block, now, out)
        self.contributors.pop(piece, None)
        have = Have(piece)
        for conn in self.peers.values():
            # HAVE suppression: a peer that has the piece has no use for the news.
            bits = conn.bitfield
            if bits is None or piece not in bits:
                self._send(conn, have, now, out)
        out.append(Progress(piece, self.lengths[piece]))
        if self.picker.done and not self._completed:
            self._completed = True
            out.append(Complete())
        self._fill_all(now, out)

    def _checked(self, piece: int, start: int, end: int, now: float, out: list[Action]) -> None:
        """Cut-through: the whole blocks within bytes ``start..end`` of ``piece`` are on
        disk and checked. Serve them, and tell the neighbours that lack the piece
        once ``cut_through`` more blocks are held than the last Partial said, while
        fewer than :data:`CUT_THROUGH_HOLDERS` of them hold it whole (once more do,
        whole pieces spread it as fast, and Partials would only cost messages)."""
        step = self.cut_through
        if not step or self.picker.has(piece):
            return
        total = self.lengths[piece]
        size = self.block_size
        blocks = self.partial.get(piece)
        if blocks is None:
            blocks = self.partial[piece] = Bitfield(-(-total // size))
        stop = len(blocks) if end >= total else end // size
        for index in range(-(-start // size), stop):
            if blocks.add(index):
                self._partial_bytes += min(size, total - index * size)
        held = blocks.count()
        if held == len(blocks) or held - self._told.get(piece, 0) < step:
            return  # whole: a Have follows; or not enough new to tell
        if self.picker.availability(piece) >= CUT_THROUGH_HOLDERS:
            return
        self._told[piece] = held
        partial = Partial.of(piece, size, blocks)
        lacking = [
            conn
            for conn in self.peers.values()
            if conn.bitfield is None or piece not in conn.bitfield
        ]
        if len(lacking) > CUT_THROUGH_FANOUT:
            # Every neighbour told of every block costs a message per block and
            # neighbour; a few random ones each time spread the news as well.
            lacking = self.rng.sample(lacking, CUT_THROUGH_FANOUT)
        for conn in lacking:
            self._send(conn, partial, now, out)

    def _forget_partial(self, piece: int) -> None:
        """Nothing of ``piece`` is served cut-through any more (whole, failed, or dropped)."""
        blocks = self.partial.pop(piece, None)
        self._told.pop(piece, None)
        if blocks is not None:
            self._partial_bytes -= blocks_bytes(blocks, self.block_size, self.lengths[piece])

    def _piece_failed(self, piece: int, now: float, out: list[Action]) -> None:
        self.verifying.discard(piece)
        self.stats.corrupt_pieces += 1
        self._forget_partial(piece)  # its blocks are thrown away
        sources = self.contributors.pop(piece, set())
        sources.discard(b"")
        log.warning(
            "piece %d failed blake3 verification (from %d peers); fetching it again",
            piece,
            len(sources),
        )
        for conn, block in self.picker.piece_failed(piece):
            self._cancel(conn, block, now, out)
        culprits: set[bytes] = set()
        if len(sources) == 1:
            culprits = set(sources)
        else:
            for earlier in self.failed_sets:
                common = earlier & sources
                if len(common) == 1:
                    culprits |= common
            self.failed_sets.append(sources)
        for peer_id in sorted(culprits):
            self._bar(peer_id, now, out)
        if culprits:
            # Failures a barred peer explains blame no one else: a stale set would pin
            # the next liar's failures on an honest peer it once shared a piece with.
            self.failed_sets = [f for f in self.failed_sets if not f & self.barred]
        self._fill_all(now, out)

    def _bar(self, peer_id: bytes, now: float, out: list[Action]) -> None:
        if peer_id in self.barred:
            return
        log.warning("barring peer %s for sending data that failed verification", peer_id.hex()[:8])
        self.barred.add(peer_id)
        self.known_peers.pop(peer_id, None)
        conn = self.peers.get(peer_id)
        if conn is not None:
            self._drop(conn, now, out)
            out.append(Close(conn.id, "sent corrupt data"))

    # -- origin pulls and the tracker ---------------------------------------------

    def _tracker_replied(self, reply: TrackerReplied, now: float, out: list[Action]) -> None:
        self.swarm_complete = reply.complete
        assigned = set(reply.assigned)
        for piece in sorted(self.pulls - assigned):
            log.info("piece %d was reassigned by the tracker; dropping our origin pull", piece)
            out.append(CancelPull(piece))
            self._pull_ended(piece, now, out)
        for piece in reply.assigned:
            if (
                0 <= piece < self.num_pieces
                and piece not in self.pulls
                and piece not in self.verifying
                and self.picker.reserve(piece)
            ):
                self.pulls.add(piece)
                self.origin_progress[piece] = 0
                out.append(StartPull(piece))
        self.peer_zones.update(reply.peer_zones)
        zone = self.config.zone
        if zone:
            # A peer that dialed in before any reply named it was taken for one of our
            # zone; once its zone is known it counts, and is asked, as what it is.
            for conn in self.peers.values():
                theirs = self.peer_zones.get(conn.peer_id, "")
                if not conn.other_zone and theirs not in ("", zone):
                    conn.other_zone = True
                    self._make_remote(conn)
        for peer_id, host, port in reply.peers:
            if (
                peer_id == self.peer_id
                or peer_id in self.barred
                or not valid_host(host)
                or not 0 < port < 65536
            ):
                continue
            self.known_peers[peer_id] = (host, port)
            # Whoever learns of the other first dials at once, rather than waiting for
            # the other's next announce; if both dial, the handshake keeps one.
            if peer_id in self.peers or peer_id in self.dialing or self._connecting(peer_id):
                continue
            if len(self.peers) + len(self.dialing) >= self.config.max_peers:
                continue
            retry = self._retry_at.get(peer_id)
            if retry is not None and now < retry[0]:
                continue
            self.dialing.add(peer_id)
            out.append(Dial(peer_id, host, port))

    def _connecting(self, peer_id: bytes) -> bool:
        return any(c.peer_id == peer_id and not c.established for c in self.conns.values())

    def _pull_done(self, piece: int, now: float, out: list[Action]) -> None:
        # Also after a take-back: a pull cancelled while its write ran may still land.
        if piece in self.pulls:
            self.pulls.discard(piece)
            self.origin_progress.pop(piece, None)
            self.origin_finished[piece] = self.lengths[piece]
        elif self.picker.has(piece):
            return
        self.stats.origin_pieces += 1
        out.append(AnnounceSoon())
        if not self.picker.has(piece):
            self._piece_ours(piece, now, out)

    def announce_progress(self) -> dict[int, int]:
        """An announce's ``progress``: bytes of each origin pull running, and each
        finished since the last announce that reached the tracker (see
        :meth:`announced`), whole."""
        return {**self.origin_finished, **self.origin_progress}

    def announced(self, progress: Mapping[int, int]) -> None:
        """An announce with ``progress`` reached the tracker: its finished pulls are told."""
        for piece in progress:
            if piece not in self.origin_progress:
                self.origin_finished.pop(piece, None)

    def _pull_ended(self, piece: int, now: float, out: list[Action]) -> None:
        """An origin pull stopped without the piece: peers may serve it, ask them now."""
        if piece not in self.pulls:
            return
        self.pulls.discard(piece)
        self.origin_progress.pop(piece, None)
        self._forget_partial(piece)
        self.picker.release(piece)
        self._fill_all(now, out)

    # -- requests -----------------------------------------------------------------

    def _fill(self, conn: _Conn, now: float, out: list[Action]) -> None:
        """Keep ``requests_per_peer`` block requests in flight to ``conn`` (one if snubbed)."""
        if conn.bitfield is None or not conn.established:
            return
        want = (1 if conn.snubbed else self.requests_per_peer) - len(conn.requested)
        if want <= 0:
            return
        picked = self.picker.pick(conn, want)
        if not picked and not conn.requested and not conn.snubbed and conn.block_time:
            picked = self._take_over(conn, want, now, out)
        if not picked:
            return
        if not conn.requested:
            conn.waiting_since = now
        held = self.held
        for block in picked:
            conn.requested[block] = None
            self._send(conn, Request(block.piece, block.offset, block.length, held), now, out)

    def _take_over(
        self, conn: _Conn, want: int, now: float, out: list[Action]
    ) -> list[BlockRequest]:
        """``conn`` is idle with nothing to pick: take over requests waiting at the
        peer with the most of them, if it sends to us slower (``PiecePicker.take_over``).

        A peer's pace is the smoothed time per block it sent us, or the time its
        requests have waited since its last block if that is longer (a stalled or
        silent peer is slow now, whatever it did before); ``conn`` needs a measured
        pace of its own. Never moved: a block on the wire or being stored, and the
        first ``uploads_per_conn`` requests of each peer in the order asked (the
        ones it may be sending: a Cancel that crosses a block wastes its uplink).
        """
        sending = self.config.uploads_per_conn or self.config.upload_slots
        keep: set[BlockRequest] = {block for _, block in self._storing}
        for other in self.peers.values():
            if other.receiving is not None:
                keep.add(other.receiving)
            for n, block in enumerate(other.requested):
                if n >= sending:
                    break
                keep.add(block)
        pace = conn.block_time

        def slower(other: _Conn) -> bool:
            waited = now - max(other.last_block, other.waiting_since) if other.requested else 0.0
            return max(other.block_time, waited) > pace

        moved = self.picker.take_over(conn, want, keep, slower, sending)
        for other, block in moved:
            self._cancel(other, block, now, out)
        return [block for _, block in moved]

    def _fill_all(self, now: float, out: list[Action]) -> None:
        # The snubbed last, so that what they sat on goes to the others.
        snubbed = []
        for conn in list(self.peers.values()):
            if conn.snubbed:
                snubbed.append(conn)
            else:
                self._fill(conn, now, out)
        for conn in snubbed:
            self._fill(conn, now, out)

    def _make_remote(self, conn: _Conn) -> None:
        if not conn.remote:
            conn.remote = True
            if conn.bitfield is not None:
                self.picker.set_remote(conn)

    # -- uploads ------------------------------------------------------------------

    def _grant(self, now: float, out: list[Action]) -> None:
        while (granted := self.uploads.next()) is not None:
            conn, request = granted
            piece = request.piece
            if not self.picker.has(piece):
                if not self._servable(piece, request.offset, request.length):
                    # Queued on blocks that are gone (the piece failed, or its pull
                    # was taken back): nothing checked to send.
                    self.uploads.done(conn, request)
                    self._send(conn, Reject(piece, request.offset, request.length), now, out)
                    continue
                self.stats.cut_through_bytes += request.length
            conn.uploads[request] = now
            sent = self._sent
            if len(sent) >= SENT_TRACKED:
                sent.clear()
            sent[request] = sent.get(request, 0) + 1
            out.append(SendBlock(conn.id, request))

    def _copies(self, request: Request) -> int:
        """Copies of ``request``'s block we know of: the connected peers holding its
        piece, and the times we sent it (the upload order; see swarm.choker)."""
        return self.picker.availability(request.piece) + self._sent.get(request, 0)

    def _upload_done(self, conn_id: int, request: Request, now: float, out: list[Action]) -> None:
        conn = self.conns.get(conn_id)
        if conn is None:
            return
        if conn.uploads.pop(request, None) is not None:
            self.stats.uploaded_bytes += request.length
            conn.last_sent = now
        self.uploads.done(conn, request)
        self._grant(now, out)

    # -- time ---------------------------------------------------------------------

    def _tick(self, now: float, out: list[Action]) -> None:
        cfg = self.config
        expired: list[_Conn] = []
        for conn in list(self.conns.values()):
            if conn.id not in self.conns:
                continue  # dropped by an earlier rule of this tick (a duplicate, say)
            if not conn.established:
                if now - conn.opened_at > cfg.handshake_timeout:
                    self.stats.handshake_timeouts += 1
                    log.warning(
                        "closing %r: no handshake within %.1fs", conn, cfg.handshake_timeout
                    )
                    self._drop(conn, now, out)
                    out.append(Close(conn.id, "no handshake in time"))
                continue
            if now - conn.last_recv > cfg.idle_timeout:
                self._close(conn, f"peer silent for {cfg.idle_timeout:.0f}s", now, out)
                continue
            receiving = conn.receiving
            if (
                receiving is not None
                and now - conn.receiving_since
                > cfg.request_timeout + receiving.length / MIN_BLOCK_RATE
            ):
                self.stats.slow_closes += 1
                self._close(
                    conn, f"a block's payload took {now - conn.receiving_since:.0f}s", now, out
                )
                continue
            if conn.uploads and any(
                now - since > cfg.request_timeout + request.length / MIN_BLOCK_RATE
                for request, since in conn.uploads.items()
            ):
                self.stats.slow_closes += 1
                self._close(
                    conn,
                    f"it did not take a block we sent within {cfg.request_timeout:.0f}s",
                    now,
                    out,
                )
                continue
            if conn.requested:
                waited = now - max(conn.waiting_since, conn.last_block)
                if conn.receiving is None and waited > cfg.request_timeout:
                    expired.append(conn)
                elif cfg.zone and not conn.remote and waited > cfg.zone_patience:
                    # Judged on whole blocks, even while one arrives: a peer of our zone
                    # that can't deliver a block in that time is as slow as one of
                    # another zone, and its holding a piece must not keep them unasked.
                    log.info(
                        "%r left our requests unanswered for %.0fs: peers of other zones "
                        "may serve what it holds",
                        conn,
                        cfg.zone_patience,
                    )
                    self._make_remote(conn)
                    expired.append(conn)
            if now - conn.last_sent >= cfg.keepalive:
                self._send(conn, KeepAlive(), now, out)
        if self._retry_at:
            # A backoff that has run out is the same as none.
            stale = [p for p, (until, _) in self._retry_at.items() if now > until + _REDIAL_MAX]
            for peer_id in stale:
                del self._retry_at[peer_id]
        for conn in expired:
            self._expire(conn, now, out)
        if expired:
            self._fill_all(now, out)

    def _expire(self, conn: _Conn, now: float, out: list[Action]) -> None:
        """``conn`` left our requests unanswered: they go to others; it keeps a probe."""
        if not conn.snubbed:
            log.info(
                "%r left %d requests unanswered: asking other peers", conn, len(conn.requested)
            )
        conn.snubbed = True
        self.stats.requests_expired += len(conn.requested)
        for block in list(conn.requested):
            self.picker.block_failed(conn, block)
            self._cancel(conn, block, now, out)
        conn.waiting_since = now
