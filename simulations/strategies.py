"""How the artifact gets from the origin to every node: the strategies compared.

``direct``
    Every node reads every piece from the origin itself, ``origin_connections``
    ranged GETs at a time, in file order. The origin carries N copies.

``cache``
    A co-located distributed cache (the design of the case study that
    motivated swarm): consistent hashing (``cache_vnodes`` virtual nodes per
    node) makes one node the owner of each piece. Owners pull their pieces from
    the origin once, ``origin_connections`` at a time, a piece a reader is
    waiting for first; every reader reads every piece, in order and
    ``origin_connections`` at a time, from its owner. If an owner crashes, its
    pieces map to the next node on the ring, which pulls them again.

``swarm`` / ``swarm-random``
    Our design, driving the real policy classes: the tracker's
    :class:`tracker.assignment.SeederAssignment` decides which peer pulls each
    piece from the origin; each peer's :class:`swarm.picker.PiecePicker` picks
    what to request from which neighbour, and each peer's
    :class:`swarm.choker.UploadScheduler` orders the requests it serves. The
    engine does what the peer's network code does: connects each peer to
    ``peer_connections`` random others (as the tracker's reply sample would),
    keeps ``max_downloads`` requests in flight, announces each verified piece
    to the neighbours that lack it (HAVE suppression, as libtorrent does),
    reports origin progress every ``announce_interval`` and obeys the
    assignment's stall reclaims. With a ``block_size`` below the piece size it
    relays cut-through, as ``PeerSession`` (and so ``swarm fetch``) does with
    ``cut_through`` set: each block that arrives (from a
    neighbour, or a window of an origin pull) is offered to a few neighbours
    that lack the piece (``PiecePicker.offer_blocks``, the peer's Partial
    message and its ``CUT_THROUGH_*`` limits) before the piece is whole.
    Not modelled: the session's per-connection pace and
    ``PiecePicker.take_over`` (an idle connection taking over half the requests
    waiting at a slower peer); ``swarm-session`` runs it. The glue's requests
    wait at the peer they were asked of until it sends them.
    ``swarm-random`` differs only in the picker:
    new pieces are picked uniformly at random among those the neighbour has,
    instead of rarest first -- the ablation that shows what rarest first buys.

    With ``zone_preference`` (racks are the zones) the swarm runs the zone
    policy of the real system: neighbours come from
    :meth:`tracker.zones.ZoneIndex.sample` (mostly the own rack, a few other
    racks), and each picker is told which neighbours are in another rack
    (``add_peer(..., remote=True)``), so it asks them only for pieces its own
    rack lacks.
"""

from __future__ import annotations

import hashlib
import math
import random
from bisect import bisect_left
from collections import deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from librt.vecs import vec
from mypy_extensions import i64, u8

from core.bitfield import Bitfield
from seeder.reader import DEFAULT_RANGE_SIZE
from seeder.role import window_size
from simulations.engine import FlowDone, OriginRequest, Simulation
from simulations.network import Flow
from simulations.scenario import Scenario
from swarm.choker import UploadScheduler
from swarm.picker import BlockRequest, PiecePicker
from swarm.protocol import HELD_UNIT
from swarm.session import (
    CUT_THROUGH_FANOUT,
    CUT_THROUGH_HOLDERS,
    SessionConfig,
    blocks_bytes,
)
from tracker.assignment import DEFAULT_MAX_BUDGET, SeederAssignment
from tracker.origin_budget import START_BUDGET, OriginBudget
from tracker.zones import ZoneIndex

if TYPE_CHECKING:
    from simulations.session_swarm import SessionSwarm

__all__ = [
    "Cache",
    "Direct",
    "RandomOrderPicker",
    "Swarm",
    "budget_summary",
    "cache_bound",
    "cache_owners",
    "make_strategy",
]

PeerT = TypeVar("PeerT", bound=Hashable)


# -- direct -------------------------------------------------------------------


class Direct:
    """Every node pulls the whole artifact from the origin."""

    name = "direct"

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.lengths = sim.piece_lengths
        n = sim.scenario.nodes
        self.next_piece = [0] * n
        self.received = [0] * n

    def start(self) -> None:
        for node in range(self.sim.scenario.nodes):
            if self.sim.joined[node]:
                self.node_joined(node)

    def node_joined(self, node: int) -> None:
        for _ in range(self.sim.scenario.origin_connections):
            self._request(node)

    def node_crashed(self, node: int) -> None:
        pass  # the engine dropped its transfers; nothing else depends on it

    def _request(self, node: int) -> None:
        piece = self.next_piece[node]
        if piece >= len(self.lengths):
            return
        self.next_piece[node] = piece + 1
        self.sim.origin_get(node, self.lengths[piece], self._got, node)

    def _got(self, flow: Flow, now: float) -> None:
        node: int = flow.data
        self.received[node] += 1
        if self.received[node] == len(self.lengths):
            self.sim.node_finished(node)
        else:
            self._request(node)


# -- cache --------------------------------------------------------------------


def _ring_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class _Ring:
    """Consistent hashing with virtual nodes."""

    def __init__(self, nodes: list[int], vnodes: int) -> None:
        points = sorted(
            (_ring_hash(f"node-{node}-{v}"), node) for node in nodes for v in range(vnodes)
        )
        self.keys = [key for key, _ in points]
        self.nodes = [node for _, node in points]

    def owner(self, piece: int, alive: list[bool]) -> int:
        """The first live node clockwise of the piece's point."""
        start = bisect_left(self.keys, _ring_hash(f"piece-{piece}"))
        size = len(self.keys)
        for i in range(size):
            node = self.nodes[(start + i) % size]
            if alive[node]:
                return node
        raise LookupError("no live node on the ring")


def cache_owners(scenario: Scenario) -> list[int]:
    """Owner of every piece with every node up."""
    ring = _Ring(list(range(scenario.nodes)), scenario.cache_vnodes)
    alive = [True] * scenario.nodes
    return [ring.owner(piece, alive) for piece in range(len(scenario.piece_lengths()))]


def cache_bound(scenario: Scenario) -> float:
    """Fastest the cache strategy can finish: a lower bound of its own.

    The origin sends F once; each reader downloads what it does not own; each
    owner uploads what it owns to the N - 1 other readers.
    """
    lengths = scenario.piece_lengths()
    owned = [0] * scenario.nodes
    for piece, owner in enumerate(cache_owners(scenario)):
        owned[owner] += lengths[piece]
    size = float(scenario.model_size)
    rates = scenario.node_rates()
    n = scenario.nodes
    return max(
        size / scenario.origin_rate,
        max((size - owned[i]) / rates[i].down for i in range(n)),
        max(owned[i] * (n - 1) / rates[i].up for i in range(n)),
    )


class Cache:
    """Co-located distributed cache with consistent-hash ownership."""

    name = "cache"

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        scenario = sim.scenario
        self.lengths = sim.piece_lengths
        n = scenario.nodes
        self.window = scenario.origin_connections
        self.ring = _Ring(list(range(n)), scenario.cache_vnodes)
        self.owner = [self.ring.owner(p, sim.alive) for p in range(len(self.lengths))]
        self.cached = [False] * len(self.lengths)
        self.fetching: dict[int, OriginRequest] = {}
        self.waiting: dict[int, list[int]] = {}  # piece -> readers waiting for it
        self.queue: list[deque[int]] = [deque() for _ in range(n)]  # owner -> prefetch order
        self.urgent: list[deque[int]] = [deque() for _ in range(n)]
        self.pulling = [0] * n
        for piece, owner in enumerate(self.owner):
            self.queue[owner].append(piece)
        self.next_read = [0] * n
        self.received = [0] * n
        self.reads: list[dict[int, Flow | None]] = [{} for _ in range(n)]  # reader -> piece -> flow
        self.serving: list[dict[tuple[int, int], None]] = [{} for _ in range(n)]

    def start(self) -> None:
        for node in range(self.sim.scenario.nodes):
            if self.sim.joined[node]:
                self._pull(node)
        for node in range(self.sim.scenario.nodes):
            if self.sim.joined[node]:
                self.node_joined(node)

    def node_joined(self, node: int) -> None:
        self._pull(node)
        for _ in range(self.window):
            self._read_next(node)

    # -- cache tier: owners pull from the origin -------------------------------

    def _pull(self, owner: int) -> None:
        sim = self.sim
        if not sim.alive[owner] or not sim.joined[owner]:
            return
        while self.pulling[owner] < self.window:
            piece = self._next_to_pull(owner)
            if piece is None:
                return
            self.pulling[owner] += 1
            self.fetching[piece] = sim.origin_get(owner, self.lengths[piece], self._pulled, piece)

    def _next_to_pull(self, owner: int) -> int | None:
        for queue in (self.urgent[owner], self.queue[owner]):
            while queue:
                piece = queue.popleft()
                if (
                    not self.cached[piece]
                    and piece not in self.fetching
                    and self.owner[piece] == owner
                ):
                    return piece
        return None

    def _pulled(self, flow: Flow, now: float) -> None:
        piece: int = flow.data
        owner = self.owner[piece]
        del self.fetching[piece]
        self.pulling[owner] -= 1
        self.cached[piece] = True
        for reader in self.waiting.pop(piece, []):
            self._serve(piece, reader)
        self._pull(owner)

    # -- readers ----------------------------------------------------------------

    def _read_next(self, reader: int) -> None:
        piece = self.next_read[reader]
        if piece >= len(self.lengths):
            return
        self.next_read[reader] = piece + 1
        self._read(reader, piece)

    def _read(self, reader: int, piece: int) -> None:
        self.reads[reader][piece] = None
        if self.cached[piece]:
            self._serve(piece, reader)
            return
        self.waiting.setdefault(piece, []).append(reader)
        owner = self.owner[piece]
        if piece not in self.fetching:
            self.urgent[owner].append(piece)
            self._pull(owner)

    def _serve(self, piece: int, reader: int) -> None:
        owner = self.owner[piece]
        if owner == reader:
            self._done_reading(reader, piece)
            return
        flow = self.sim.send(owner, reader, self.lengths[piece], self._read_done, (reader, piece))
        self.reads[reader][piece] = flow
        self.serving[owner][(reader, piece)] = None

    def _read_done(self, flow: Flow, now: float) -> None:
        data: tuple[int, int] = flow.data
        reader, piece = data
        self.serving[self.owner[piece]].pop((reader, piece), None)
        self._done_reading(reader, piece)

    def _done_reading(self, reader: int, piece: int) -> None:
        del self.reads[reader][piece]
        self.received[reader] += 1
        if self.received[reader] == len(self.lengths):
            self.sim.node_finished(reader)
        else:
            self._read_next(reader)

    # -- faults -----------------------------------------------------------------

    def node_crashed(self, node: int) -> None:
        """The crashed owner's pieces move to the next node on the ring and are pulled again."""
        sim = self.sim
        orphans = [p for p, owner in enumerate(self.owner) if owner == node]
        readers_cut = list(self.serving[node])
        self.serving[node].clear()
        self.pulling[node] = 0
        self.reads[node].clear()
        for piece in orphans:
            self.fetching.pop(piece, None)
            self.cached[piece] = False
            new_owner = self.ring.owner(piece, sim.alive)
            self.owner[piece] = new_owner
            self.queue[new_owner].append(piece)
        for piece in orphans:
            waiters = self.waiting.get(piece)
            if waiters is not None:
                self.waiting[piece] = [r for r in waiters if r != node]
        for reader, piece in readers_cut:
            if sim.alive[reader]:
                self._read(reader, piece)
        for owner in {self.owner[p] for p in orphans}:
            self._pull(owner)


# -- swarm --------------------------------------------------------------------


UPLOADS_PER_CONN: Final = SessionConfig().uploads_per_conn
"""Uploads one connection may hold at once (the real session's ``uploads_per_conn``)."""


class _Node:
    """One node's side of the exchange: its picker, upload queue and connections.

    Pickers know their peers by these records, not by node number: a record
    hashes by identity, so the picker's lookups on every HAVE and arrival need
    neither a boxed int nor an int comparison.
    """

    __slots__ = (
        "conn_to",
        "conns",
        "cursor",
        "done",
        "held",
        "id",
        "inflight",
        "partial",
        "picker",
        "pieces",
        "pull_base",
        "pulls",
        "starved",
        "told",
        "uploads",
    )

    def __init__(self, node: int, num_pieces: int, upload_slots: int) -> None:
        self.id: i64 = node
        # The pieces it holds: every neighbour's picker reads this as its
        # record of the node (a neighbour that lacks a piece is told of it
        # at once, so its record could differ only in pieces it holds).
        self.pieces = Bitfield(num_pieces)
        self.picker: PiecePicker[_Node] | None = None  # None until it joins, and after a crash
        # Requests to serve, by the requester's end of the connection; as many
        # slots per connection as the real session gives one (without the limit a
        # slow node's requests could hold every slot of a fast one: sim-truth's
        # mixed-links fast nodes, real / simulated p50 0.54 -> 0.79 with it).
        self.uploads: UploadScheduler[_Conn, BlockRequest] = UploadScheduler(
            upload_slots, progress=_requester_progress, max_per_peer=UPLOADS_PER_CONN
        )
        # Connections in the order they were made, and by peer.
        self.conns: list[_Conn] = []
        self.conn_to: dict[int, _Conn] = {}
        self.pulls: dict[int, OriginRequest] = {}  # piece -> our origin pull (its window)
        self.pull_base: dict[int, int] = {}  # piece -> where the pull's current window starts
        # Cut-through: the blocks held of pieces not yet whole, and how many of
        # them the last offer to the neighbours said (PeerSession.partial, _told).
        self.partial: dict[int, Bitfield] = {}
        self.told: dict[int, i64] = {}
        # Bytes of its whole pieces and of the blocks in ``partial``: what its
        # Requests tell the nodes it asks (PeerSession.held, in bytes here).
        self.held: i64 = 0
        self.done = False
        self.inflight: i64 = 0  # our requests in flight, over all connections
        self.starved = False  # the last fill found nothing to request
        self.cursor: i64 = 0  # where the next fill starts in ``conns``


def _requester_progress(conn: _Conn) -> int:
    return conn.back.node.held // HELD_UNIT


def budget_summary(adaptive: OriginBudget) -> dict[str, int]:
    """Where the adaptive origin budget ended, its low point, and its throttled rounds."""
    rounds = adaptive.rounds
    return {
        "final": adaptive.budget,
        "min": min((r.budget for r in rounds), default=adaptive.budget),
        "throttled_rounds": sum(1 for r in rounds if r.throttles),
    }


class _Conn:
    """One end of a connection: what ``node`` offers the node whose list holds this."""

    __slots__ = ("asked", "back", "interest", "node", "offers")

    def __init__(self, node: _Node, interest: int) -> None:
        self.node = node  # the peer's own record
        self.interest: i64 = interest  # pieces ``node`` has that we lack
        # ``node`` offered blocks of pieces it holds part of (cut-through), and
        # our picker has not yet found them all taken or stale.
        self.offers = False
        self.asked: i64 = 0  # our requests in flight to ``node``
        self.back = self  # the other end (``node``'s record of us), set on connecting


_RANDOM_TRIES: Final = 16


class RandomOrderPicker(PiecePicker[PeerT]):
    """The real picker with one change: new pieces in random order, not rarest first.

    Everything else (finish started pieces first, reservations, endgame) is
    the parent's. Used only for the ``swarm-random`` ablation.
    """

    def _pick_new_piece(self, bits: Bitfield) -> int | None:
        # Pieces still unstarted are exactly those the parent keeps in its
        # availability buckets, the first _unstarted() of its order; ignore
        # the levels and draw uniformly among those ``bits`` has. Draw an
        # unstarted piece and keep it if the peer has it: each kept draw is
        # uniform over what the peer has, and it is cheap while the peer has
        # many of them. After _RANDOM_TRIES misses, list them all, walking
        # the shorter of the two sets (listing them on every pick, as this
        # did before, took minutes at 1000 nodes x 4096 pieces).
        unstarted = self._unstarted()
        order = self._order
        for _ in range(_RANDOM_TRIES if unstarted else 0):
            piece = int(order[i64(int(self._random() * float(unstarted)))])
            if piece in bits:
                return piece
        if unstarted < bits.count():
            candidates = [int(order[i]) for i in range(unstarted) if int(order[i]) in bits]
        else:
            candidates = [piece for piece in bits if self._bucketed(piece)]
        return self._rng.choice(candidates) if candidates else None


class Swarm:
    """Tracker assignment plus rarest-first exchange (see the module docstring)."""

    def __init__(self, sim: Simulation, *, random_order: bool = False) -> None:
        self.sim = sim
        self.name = "swarm-random" if random_order else "swarm"
        scenario = sim.scenario
        seed = scenario.seed
        self.lengths = sim.piece_lengths
        self.num_pieces = len(self.lengths)
        self.block_size = scenario.block_size or max(self.lengths)
        # Cut-through (as the peer with SessionConfig.cut_through): a block that
        # arrives is offered to neighbours that lack its piece before the piece
        # is whole, and an origin pull is read a window at a time, each window
        # offered as it lands (seeder.role's window). Needs blocks smaller than
        # pieces; with one block per piece there is nothing to relay early.
        self.cut_through = scenario.cut_through and self.block_size < max(self.lengths)
        self.relay_rng = random.Random(f"{seed}:relay")
        self.window: i64 = (
            window_size(max(self.lengths), self.block_size, DEFAULT_RANGE_SIZE)
            if self.cut_through
            else 0
        )
        self.random_order = random_order
        self.max_downloads = scenario.max_downloads
        # Bound once: compiled, naming a method makes a new bound method each time.
        self.block_done: FlowDone = self._block_done
        n = scenario.nodes
        self.assignment: SeederAssignment[int] = SeederAssignment(
            self.lengths,
            per_peer_limit=scenario.per_peer_limit,
            origin_budget=scenario.origin_budget,
            stall_timeout=scenario.stall_timeout,
            origin_copies=scenario.origin_copies,
            rng=random.Random(f"{seed}:tracker"),
        )
        self.copies = scenario.origin_copies > 1.0
        self.copy_rng = random.Random(f"{seed}:copies")
        # The tracker's adaptive origin budget, as `swarm tracker` builds it.
        self.adaptive: OriginBudget | None = None
        if scenario.adaptive_budget and scenario.origin_budget is None:
            self.adaptive = OriginBudget(
                DEFAULT_MAX_BUDGET, start=START_BUDGET, round_seconds=scenario.announce_interval
            )
            self.assignment.set_cap(self.adaptive.budget)
        self.nodes = [_Node(node, self.num_pieces, scenario.upload_slots) for node in range(n)]
        # Which pieces each node holds (each node's ``pieces`` again, laid out
        # for the HAVE fan-out), one bit each, piece-major: node x holds
        # piece p if bit p * nodes + x is set. Every HAVE reads the bit of each
        # neighbour for one piece, and a piece's row of 1000 nodes spans two
        # cache lines: the fan-out costs a cache miss or two, not one per
        # neighbour (which a node-major layout costs, bits or bytes).
        self.node_count = n
        self.have = vec[u8]([0] * ((n * self.num_pieces + 7) >> 3))
        self.holders = vec[i64]([0] * self.num_pieces)
        self.ticking = False
        # Live, joined nodes by rack, when racks are zones the swarm prefers.
        self.zones: ZoneIndex[int] | None = ZoneIndex() if scenario.zone_preference else None

    def extra(self) -> dict[str, Any]:
        stats = self.assignment.stats
        extra: dict[str, Any] = {
            "origin_assignments": stats.assigned,
            "reassigned": stats.reassigned,
            "stall_reclaims": stats.stalled,
            "pieces_lost": stats.lost,
        }
        if self.adaptive is not None:
            extra["origin_budget"] = budget_summary(self.adaptive)
        return extra

    # -- set-up -------------------------------------------------------------

    def _new_picker(self, node: int) -> PiecePicker[_Node]:
        rng = random.Random(f"{self.sim.scenario.seed}:picker:{node}")
        cls = RandomOrderPicker if self.random_order else PiecePicker
        return cls(
            self.lengths,
            self.block_size,
            rng,
            endgame_duplicates=self.sim.scenario.endgame_duplicates,
        )

    def _connect(self, a: _Node, b: _Node) -> None:
        if b.id in a.conn_to or a is b:
            return
        ab = _Conn(b, self._lacking(a, b))
        ba = _Conn(a, self._lacking(b, a))
        ab.back = ba
        ba.back = ab
        a.conns.append(ab)
        b.conns.append(ba)
        a.conn_to[b.id] = ab
        b.conn_to[a.id] = ba
        remote = self.zones is not None and self._zone(a.id) != self._zone(b.id)
        for x, y in ((a, b), (b, a)):
            picker = x.picker
            if picker is not None and not x.done:
                picker.add_peer(y, y.pieces, remote)

    def _zone(self, node: int) -> str:
        return str(self.sim.rack[node])

    def _neighbours(self, node: int, count: int) -> list[int]:
        """Up to ``count`` live nodes for ``node`` to dial, mostly of its own rack."""
        zones = self.zones
        assert zones is not None
        return zones.sample(self._zone(node), count, self.sim.rng, exclude=node)

    def _lacking(self, a: _Node, b: _Node) -> int:
        """Pieces ``b`` has that ``a`` lacks."""
        mine = a.pieces
        return sum(1 for p in b.pieces if p not in mine)

    def start(self) -> None:
        sim = self.sim
        now = sim.now
        initial = [node for node in range(sim.scenario.nodes) if sim.joined[node]]
        nodes = self.nodes
        for node in initial:
            nodes[node].picker = self._new_picker(node)
            self.assignment.peer_joined(node, now)
        # Each node dials half its connections; with the incoming ones the mean
        # degree is ``peer_connections``.
        dial = max(1, math.ceil(sim.scenario.peer_connections / 2))
        rng = sim.rng
        zones = self.zones
        if zones is not None:
            for node in initial:
                zones.add(node, self._zone(node))
            for node in initial:
                for other in self._neighbours(node, dial):
                    self._connect(nodes[node], nodes[other])
        else:
            # Each node dials random others until it has ``peer_connections``,
            # and a node that has them takes no more (the peer's max_peers):
            # every node ends with about the same degree. Draws are among the
            # nodes that still have room, so the last to dial find some; a draw
            # of itself or of a neighbour is wasted, a bounded number of times.
            target = sim.scenario.peer_connections
            room = [nodes[node] for node in initial]
            for node in initial:
                me = nodes[node]
                for _ in range(4 * target):
                    if len(me.conns) >= target or len(room) < 2:
                        break
                    at = int(rng.random() * len(room))
                    peer = room[at]
                    self._connect(me, peer)
                    if len(peer.conns) >= target:
                        room[at] = room[-1]
                        room.pop()
                if len(me.conns) >= target and me in room:
                    room.remove(me)
            # The last to dial can find every node with room a neighbour already:
            # they dial full nodes (one over, as the real peer's max_peers is well
            # above its tracker sample). Left at 6 of 10 neighbours, dragonfly-1200's
            # last node finished at 1.34 x T_min, the next slowest at 1.17.
            for node in initial:
                me = nodes[node]
                for _ in range(4 * target):
                    if len(me.conns) >= target:
                        break
                    self._connect(me, nodes[initial[int(rng.random() * len(initial))]])
        if self.adaptive is not None:
            self.adaptive.update(sim.now, 0, False)  # the first round starts now
        self._assign()
        for node in initial:
            self._fill(nodes[node])

    def node_joined(self, node: int) -> None:
        sim = self.sim
        me = self.nodes[node]
        me.picker = self._new_picker(node)
        self.assignment.peer_joined(node, sim.now)
        count = sim.scenario.peer_connections
        if self.zones is not None:
            self.zones.add(node, self._zone(node))
            chosen = self._neighbours(node, count)
        else:
            live = [
                x for x in range(sim.scenario.nodes) if sim.joined[x] and sim.alive[x] and x != node
            ]
            chosen = sim.rng.sample(live, min(len(live), count))
        for other in chosen:
            self._connect(me, self.nodes[other])
        self._assign()
        self._fill(me)

    # -- origin pulls ---------------------------------------------------------

    def _assign(self) -> None:
        sim = self.sim
        for peer, pieces in self.assignment.assign(sim.now).items():
            me = self.nodes[peer]
            picker = me.picker
            for piece in pieces:
                if picker is None or not picker.reserve(piece):
                    continue  # the tracker reclaims it when no progress comes
                self._pull_window(me, piece, 0)
        if self.copies:
            self._assign_copies()
        if not self.ticking and self.assignment.in_flight:
            self.ticking = True
            sim.at(sim.now + sim.scenario.announce_interval, self._tick)

    def _assign_copies(self) -> None:
        """Extra origin copies (``origin_copies`` > 1), as the tracker's registry hands
        them out: to nodes with room, of the pieces each lacks, rarest first. A copy
        the node's picker won't reserve (it fetches the piece from peers) is declined."""
        sim = self.sim
        now = sim.now
        assignment = self.assignment
        holders = self.holders
        for me in self.nodes:
            picker = me.picker
            if picker is None or me.done or not assignment.copy_room(me.id, now):
                continue
            lacking = sorted(
                (holders[piece], self.copy_rng.random(), piece)
                for piece in range(self.num_pieces)
                if piece not in me.pieces and piece not in me.pulls
            )
            candidates = iter([piece for _, _, piece in lacking])
            while (piece := assignment.assign_copy(me.id, now, candidates)) is not None:
                if picker.reserve(piece):
                    self._pull_window(me, piece, 0)
                else:
                    assignment.drop_copy(me.id, piece)

    def _pull_window(self, me: _Node, piece: int, start: int) -> None:
        """Read ``piece`` from the origin from ``start``: to its end, or one window."""
        length = self.lengths[piece]
        size = length - start if not self.window else min(self.window, length - start)
        me.pull_base[piece] = start
        me.pulls[piece] = self.sim.origin_get(me.id, size, self._pulled, (me, piece))

    def _pulled(self, flow: Flow, now: float) -> None:
        data: tuple[_Node, int] = flow.data
        me, piece = data
        request = me.pulls.get(piece)
        if request is None or request.flow is not flow:
            return  # taken back by the tracker
        end = me.pull_base[piece] + request.size
        if end < self.lengths[piece]:
            self._held(me, piece, me.pull_base[piece], end)
            self._pull_window(me, piece, end)
            return
        del me.pulls[piece]
        del me.pull_base[piece]
        picker = me.picker
        assert picker is not None
        self._cancel_all(me, picker.mark_have(piece))
        self._got_piece(me, piece)
        if not self.copies or not self.assignment.copy_done(me.id, piece):
            self.assignment.piece_present(piece, self.sim.now)
        self._assign()
        self._fill(me)

    def _tick(self, _: object) -> None:
        """A round of announces: origin progress to the tracker, stall reclaims, new assignments."""
        sim = self.sim
        now = sim.now
        assignment = self.assignment
        adaptive = self.adaptive
        for me in self.nodes:
            for piece, request in me.pulls.items():
                flow = request.flow
                done = me.pull_base[piece] + (0 if flow is None else int(flow.transferred(now)))
                assignment.progress(me.id, piece, done, now)
            node = me.id
            count, wait = sim.take_throttles(node)
            if count and adaptive is not None and sim.alive[node]:
                adaptive.throttled(count, wait)
        taken = assignment.tick(now)
        if adaptive is not None:
            assignment.set_cap(
                adaptive.update(now, assignment.origin_bytes, assignment.budget_bound)
            )
            if adaptive.shedding:
                # Every node announces at this tick, with its pulls that only wait
                # out a throttled answer: the tracker takes those back as it answers.
                for me in self.nodes:
                    waiting = [
                        piece
                        for piece, request in me.pulls.items()
                        if request.flow is None and request.attempt
                    ]
                    if waiting:
                        taken.extend((me.id, p) for p in assignment.shed(me.id, waiting))
        if self.copies:
            # Copies the tracker dropped (stalled) are cancelled like pieces taken back.
            seen = set(taken)
            taken.extend(
                (me.id, piece)
                for me in self.nodes
                for piece in me.pulls
                if not assignment.pulling(me.id, piece) and (me.id, piece) not in seen
            )
        for peer, piece in taken:
            me = self.nodes[peer]
            reclaimed = me.pulls.get(piece)
            if reclaimed is not None:
                del me.pulls[piece]
                del me.pull_base[piece]
                sim.cancel(reclaimed)
            self._forget_partial(me, piece)
            picker = me.picker
            if picker is not None:
                picker.release(piece)
        self.ticking = False
        self._assign()
        if not self.ticking and not assignment.all_present:
            self.ticking = True
            sim.at(now + sim.scenario.announce_interval, self._tick)

    # -- exchange -------------------------------------------------------------

    def _got_piece(self, me: _Node, piece: int) -> None:
        """``me`` verified ``piece``: tell the neighbours that lack it."""
        have = self.have
        node = me.id
        row = piece * self.node_count
        bit = row + node
        have[bit >> 3] |= u8(1 << (bit & 7))
        me.pieces.add(piece)
        self.holders[piece] += 1
        self._forget_partial(me, piece)
        me.held += self.lengths[piece]
        for conn in me.conns:
            other = conn.node
            bit = row + other.id
            if have[bit >> 3] & u8(1 << (bit & 7)):
                conn.interest -= 1
            elif not other.done:
                picker = other.picker
                if picker is not None:
                    picker.peer_has(me, piece)
                    conn.back.interest += 1
                    if other.starved:
                        self._fill(other)
            else:
                conn.back.interest += 1
        if me.pieces.complete:
            me.done = True
            self.sim.node_finished(node)

    def _held(self, me: _Node, piece: int, start: int, end: int) -> None:
        """Cut-through: ``me`` holds bytes ``start..end`` of ``piece``, which is not
        whole yet. Offer its blocks held so far to a few neighbours that lack the
        piece, while fewer than ``CUT_THROUGH_HOLDERS`` neighbours hold it whole
        (the peer's rule, ``PeerSession._checked``: past that, whole pieces
        spread it as fast and offers would only cost messages). Called only with
        cut-through on."""
        if piece in me.pieces:
            return
        size = self.block_size
        blocks = me.partial.get(piece)
        if blocks is None:
            blocks = me.partial[piece] = Bitfield(-(-self.lengths[piece] // size))
        length = self.lengths[piece]
        stop = len(blocks) if end >= length else end // size
        for index in range(-(-start // size), stop):
            if blocks.add(index):
                me.held += min(size, length - index * size)
        held = blocks.count()
        if held == len(blocks) or held <= me.told.get(piece, 0):
            return
        picker = me.picker
        if picker is None or picker.availability(piece) >= CUT_THROUGH_HOLDERS:
            return
        me.told[piece] = held
        row = piece * self.node_count
        have = self.have
        lacking: list[_Conn] = []
        for conn in me.conns:
            other = conn.node
            bit = row + other.id
            if not other.done and not have[bit >> 3] & u8(1 << (bit & 7)):
                lacking.append(conn)
        if len(lacking) > CUT_THROUGH_FANOUT:
            lacking = self.relay_rng.sample(lacking, CUT_THROUGH_FANOUT)
        offer = blocks.copy()  # what the message says: later blocks need another
        for conn in lacking:
            other = conn.node
            other_picker = other.picker
            if other_picker is not None:
                other_picker.offer_blocks(me, piece, offer)
                conn.back.offers = True
                if other.starved:
                    self._fill(other)

    def _forget_partial(self, me: _Node, piece: int) -> None:
        blocks = me.partial.pop(piece, None)
        me.told.pop(piece, None)
        if blocks is not None:
            me.held -= blocks_bytes(blocks, self.block_size, self.lengths[piece])

    def _fill(self, me: _Node) -> None:
        """Keep ``max_downloads`` requests in flight from neighbours that have what we lack."""
        picker = me.picker
        if picker is None or me.done or not self.sim.alive[me.id]:
            return
        limit = self.max_downloads
        conns = me.conns
        count = len(conns)
        while me.inflight < limit:
            request = None
            # First pass: neighbours not yet asked; second: any.
            for attempt in range(2):
                busy_ok = attempt == 1
                start = me.cursor
                for i in range(count):
                    conn = conns[(start + i) % count]
                    if (conn.interest <= 0 and not conn.offers) or (not busy_ok and conn.asked):
                        continue
                    picked = picker.pick(conn.node, 1)
                    if picked:
                        request = (conn, picked[0])
                        me.cursor = (start + i + 1) % count
                        break
                    if conn.interest <= 0:
                        conn.offers = False  # its offers are taken or stale
                if request is not None:
                    break
            if request is None:
                me.starved = True
                return
            me.starved = False
            conn, block = request
            me.inflight += 1
            conn.asked += 1
            other = conn.node
            if not other.uploads.enqueue(conn, block):
                self._unask(me, conn)
                picker.block_failed(other, block)
                return
            self._serve(other)

    def _unask(self, me: _Node, conn: _Conn) -> None:
        """One of ``me``'s requests over ``conn`` ended."""
        me.inflight -= 1
        if conn.asked > 0:
            conn.asked -= 1

    def _serve(self, src: _Node) -> None:
        uploads = src.uploads
        sim = self.sim
        while True:
            granted = uploads.next()
            if granted is None:
                return
            conn, block = granted  # the requester's end of the connection
            sim.send(src.id, conn.back.node.id, block.length, self.block_done, (conn, block))

    def _block_done(self, flow: Flow, now: float) -> None:
        data: tuple[_Conn, BlockRequest] = flow.data
        conn, block = data
        src = conn.node
        dst = conn.back.node
        src.uploads.done(conn, block)
        self._unask(dst, conn)
        picker = dst.picker
        if picker is not None and self.sim.alive[dst.id]:
            self._cancel_all(dst, picker.block_received(src, block))
            piece = block.piece
            if picker.piece_complete(piece):
                self._cancel_all(dst, picker.mark_have(piece))
                self._got_piece(dst, piece)
            elif self.cut_through:
                self._held(dst, piece, block.offset, block.offset + block.length)
            self._fill(dst)
        self._serve(src)

    def _sending(self, conn: _Conn, block: BlockRequest) -> Flow | None:
        """The flow sending ``block`` over ``conn``, if it started."""
        for flow in self.sim.up[conn.node.id].flows:  # at most ``upload_slots`` of them
            data: tuple[_Conn, BlockRequest] = flow.data
            if data[0] is conn and data[1] == block:
                return flow
        return None

    def _cancel_all(self, dst: _Node, requests: list[tuple[_Node, BlockRequest]]) -> None:
        """Cancel duplicate requests (endgame) that ``dst``'s picker returned."""
        for src, block in requests:
            conn = dst.conn_to[src.id]
            flow = self._sending(conn, block)
            if flow is not None:
                self.sim.cancel(flow)
                src.uploads.done(conn, block)
            else:
                src.uploads.cancel(conn, block)
            self._unask(dst, conn)
            self._serve(src)

    # -- faults ---------------------------------------------------------------

    def node_crashed(self, node: int) -> None:
        sim = self.sim
        now = sim.now
        me = self.nodes[node]
        me.pulls.clear()
        me.pull_base.clear()
        me.partial.clear()
        me.told.clear()
        affected: list[_Node] = []
        for conn in me.conns:
            other = conn.node
            other.conns.remove(conn.back)
            del other.conn_to[node]
            other.uploads.peer_gone(conn)
            picker = other.picker
            if picker is not None:
                # The requests it reopens went to the crashed node, whose flows
                # the engine has dropped already: nothing to cancel.
                picker.remove_peer(me)
            other.inflight -= conn.back.asked
            affected.append(other)
        me.conns = []
        me.conn_to = {}
        me.inflight = 0
        me.picker = None
        if self.zones is not None:
            self.zones.remove(node)
        self.assignment.peer_left(node, now)
        for piece in me.pieces:
            self.holders[piece] -= 1
            if self.holders[piece] == 0:
                self.assignment.piece_lost(piece)
        self._assign()
        for other in affected:
            self._serve(other)
            self._fill(other)


def make_strategy(name: str, sim: Simulation) -> Direct | Cache | Swarm | SessionSwarm:
    """The strategy called ``name`` over ``sim``."""
    if name == "direct":
        return Direct(sim)
    if name == "cache":
        return Cache(sim)
    if name == "swarm":
        return Swarm(sim)
    if name == "swarm-random":
        return Swarm(sim, random_order=True)
    if name in ("swarm-session", "swarm-session-random"):
        # Imported here: it imports this module (RandomOrderPicker).
        from simulations.session_swarm import SessionSwarm

        return SessionSwarm(sim, random_order=name.endswith("random"))
    raise ValueError(f"unknown strategy {name!r}")
