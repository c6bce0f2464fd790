"""The ``swarm-session`` model: every simulated node runs the peer's own :class:`swarm.session.PeerSession`.

The ``swarm`` strategy (:mod:`simulations.strategies`) drives the production
picker, upload scheduler and seeder assignment through the simulator's own
glue, at piece granularity, and runs ``fireworks-kimi n1000-o25`` in about 45 s
compiled. This model drives the whole session instead, block by block, with
the peer's defaults (4 MiB blocks, 12 requests per connection, 16 upload
slots, up to 50 connections): it is the cross-check that the glue behaves
like the shipped peer, and it is slow. Measured compiled on the 2-core VM
(2026-12-03, one run each, this model vs the glue): ``fireworks-kimi
n1000-o25`` with one 256 MiB block per piece and one request per connection
1,036 s vs 42 s; ``kraken-2600`` 606 s vs 4.6 s; ``faults`` 250 s vs 0.2 s;
``dragonfly-1200`` 21 s vs 0.3 s. With the peer's 4 MiB blocks a 1 TiB
artifact is 262 million block transfers per 1000 nodes. Its results differ
where the pipeline is deep and pieces are small (``dragonfly-1200`` p50/max
3.70/4.36 x T_min against the glue's 1.45/1.86: every node asks all of its
~55 neighbours at once and enters endgame almost at once), which is the
policy work issue 15 starts from.

Every node is a
:class:`swarm.session.PeerSession` (the state machine the real peer
drives: picker, upload slots, requests in flight per connection,
handshakes, HAVEs, timeouts, origin pulls), and the tracker is one
:class:`tracker.registry.SwarmRegistry` with its
:class:`tracker.assignment.SeederAssignment`, asked as the tracker service
asks it. This module is only the driver the asyncio peer is for a real
node: it carries out the sessions' actions on the simulated network and
feeds them the events that follow.

- Each node announces on joining, every ``announce_interval`` after, and
  at once when its session asks (an origin pull finished), as the peer
  does; the reply's peer sample (``peer_connections`` peers, the
  tracker's ``max_peers_in_reply``) and origin assignments go to the
  session. Origin progress is reported with each announce.
- A dial connects at once (or fails if the peer is down). Control messages
  (handshake, bitfield, HAVE, request, cancel, reject) arrive at once, in
  order; only block payloads take time. A connection sends its blocks one
  after another (one TCP stream), each a flow from the sender's uplink to
  the receiver's downlink; blocks are stored and pieces verified as soon as
  they arrive (simulated data is never corrupt).
- Every session gets a Tick each second (timeouts, keepalives, expiries).
- A crash stops the node's flows, closes its connections at the other
  ends and takes it out of the registry.

``swarm-random`` differs only in the picker: new pieces are picked
uniformly at random among those the neighbour has, instead of rarest
first -- the ablation that shows what rarest first buys.

With ``zone_preference`` (racks are the zones) each node declares its rack
as its zone: the registry samples peers mostly from the own rack
(:class:`tracker.zones.ZoneIndex`), and the session asks other racks only
for pieces its own rack lacks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any, Final

from core.auth import ClusterKey
from core.digest import PEER_ID_LENGTH
from seeder.reader import DEFAULT_RANGE_SIZE
from seeder.role import window_size
from simulations.engine import FlowDone, OriginRequest, Simulation
from simulations.network import Flow
from simulations.strategies import RandomOrderPicker, budget_summary
from swarm.picker import BlockRequest, PiecePicker
from swarm.protocol import Request
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
    PieceVerified,
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
from tracker.assignment import DEFAULT_MAX_BUDGET
from tracker.origin_budget import OriginBudget
from tracker.registry import SwarmRegistry

__all__ = ["SessionSwarm", "host_of", "peer_id_of"]


# -- swarm --------------------------------------------------------------------

_PORT: Final = 7000
_TICK: Final = 1.0  # seconds between a session's Ticks: the peer's timer
_TICK_EVENT: Final = Tick()

_PEER: Final = SessionConfig()  # the peer's defaults, read off an instance (see scenario.py)


def peer_id_of(node: int) -> bytes:
    """The peer id of simulated ``node``: its number, big-endian."""
    return node.to_bytes(PEER_ID_LENGTH, "big")


def host_of(node: int) -> str:
    """The (made-up) address of simulated ``node``."""
    return f"10.{(node >> 16) & 255}.{(node >> 8) & 255}.{node & 255}"


class _Node:
    """One simulated peer: its session, its connections and its origin pulls."""

    __slots__ = (
        "alive",
        "announce_at",
        "announce_turn",
        "ends",
        "host",
        "id",
        "peer_id",
        "pull_base",
        "pulls",
        "reported",
        "session",
        "zone",
    )

    def __init__(self, node: int, zone: str) -> None:
        self.id = node
        self.peer_id = peer_id_of(node)
        self.host = host_of(node)
        self.zone = zone
        self.session: PeerSession | None = None  # None until it joins
        self.alive = False  # joined and not crashed
        self.ends: dict[int, _End] = {}  # its open connections, by its conn id
        self.pulls: dict[int, OriginRequest] = {}  # piece -> origin pull (its current window)
        self.pull_base: dict[int, int] = {}  # piece -> where its current window starts
        self.reported: dict[int, int] = {}  # piece -> origin bytes told to the session
        self.announce_at = 0.0  # when its next announce is due
        self.announce_turn = 0  # which scheduled announce is the live one


class _End:
    """One end of a connection: the blocks its node sends over it, one flow at a time.

    A connection's blocks go out one after another, as over one TCP stream: the
    first of ``requests`` is the one flowing.
    """

    __slots__ = ("flow", "id", "node", "other", "requests")

    def __init__(self, conn: int, node: _Node) -> None:
        self.id = conn
        self.node = node
        self.other = self  # the far end, set on connecting
        self.requests: list[Request] = []
        self.flow: Flow | None = None


class SessionSwarm:
    """Every node a :class:`swarm.session.PeerSession`, one tracker registry (see the
    module docstring)."""

    def __init__(self, sim: Simulation, *, random_order: bool = False) -> None:
        self.sim = sim
        self.name = "swarm-session-random" if random_order else "swarm-session"
        scenario = sim.scenario
        self.lengths = sim.piece_lengths
        self.random_order = random_order
        self.interval = scenario.announce_interval
        self.root = hashlib.blake2b(scenario.name.encode(), digest_size=32).digest()
        self.registry = SwarmRegistry(
            self.lengths,
            # Crashed nodes leave at once (below); every other one announces each interval.
            peer_ttl=3 * scenario.announce_interval,
            rng=random.Random(f"{scenario.seed}:tracker"),
            max_peers_in_reply=scenario.peer_connections,
            per_peer_limit=scenario.per_peer_limit,
            origin_budget=scenario.origin_budget,
            origin_copies=scenario.origin_copies,
            stall_timeout=scenario.stall_timeout,
            # The tracker's adaptive origin budget, as `swarm tracker` builds it.
            adaptive_budget=OriginBudget(
                DEFAULT_MAX_BUDGET, round_seconds=scenario.announce_interval
            )
            if scenario.adaptive_budget and scenario.origin_budget is None
            else None,
        )
        # The peer's defaults; a scenario's block_size (0: one block per piece
        # for the glue) replaces the peer's only when it is set.
        self.config = dataclasses.replace(
            _PEER,
            block_size=scenario.block_size or _PEER.block_size,
            cut_through=CUT_THROUGH_BLOCKS if scenario.cut_through else 0,
        )
        # With cut-through a pull is read a window at a time, as seeder.role reads
        # a format-2 piece, and each window is served once it is in.
        self.window = (
            window_size(max(sim.piece_lengths), self.config.block_size, DEFAULT_RANGE_SIZE)
            if scenario.cut_through
            else 0
        )
        zoned = scenario.zone_preference
        self.nodes = [
            _Node(node, str(sim.rack[node]) if zoned else "") for node in range(scenario.nodes)
        ]
        self.by_peer_id = {node.peer_id: node for node in self.nodes}
        # Every connection end by its id (ids are never reused); None once closed.
        self.ends: list[_End | None] = []
        # Events to feed, in order: (node, event) pairs in two lists. Control
        # messages are delivered through it at once, without recursion.
        self._queue_nodes: list[_Node] = []
        self._queue_events: list[Event] = []
        # Bound once: compiled, naming a method makes a new bound method each time.
        self.block_done: FlowDone = self._block_done
        self.pull_done: FlowDone = self._pull_done

    def extra(self) -> dict[str, Any]:
        stats = self.registry.assignment.stats
        expired = duplicate = 0
        peers: list[int] = []
        for node in self.nodes:
            session = node.session
            if session is not None:
                expired += session.stats.requests_expired
                duplicate += sum(session.stats.duplicate_causes.values())
                if node.alive:
                    peers.append(len(session.peers))
        extra: dict[str, Any] = {
            "origin_assignments": stats.assigned,
            "reassigned": stats.reassigned,
            "stall_reclaims": stats.stalled,
            "pieces_lost": stats.lost,
            "requests_expired": expired,
            "duplicate_bytes": duplicate,
            "mean_peers": sum(peers) / len(peers) if peers else 0.0,
        }
        adaptive = self.registry.adaptive
        if adaptive is not None:
            extra["origin_budget"] = budget_summary(adaptive)
        return extra

    # -- nodes ----------------------------------------------------------------

    def start(self) -> None:
        sim = self.sim
        initial = [node for node in range(sim.scenario.nodes) if sim.joined[node]]
        # Peers that start together reach the tracker in no particular order.
        sim.rng.shuffle(initial)
        for node in initial:
            self.node_joined(node)

    def node_joined(self, node: int) -> None:
        sim = self.sim
        me = self.nodes[node]
        config = self.config
        if me.zone:
            config = dataclasses.replace(config, zone=me.zone)
        session = PeerSession(
            self.lengths,
            root=self.root,
            peer_id=me.peer_id,
            key=ClusterKey(None),
            config=config,
            rng=random.Random(f"{sim.scenario.seed}:peer:{node}"),
            listen_port=_PORT,
            picker_factory=RandomOrderPicker if self.random_order else PiecePicker,
        )
        me.session = session
        me.alive = True
        sim.at(sim.now + _TICK, self._tick, me)
        self._announce(me)

    def node_crashed(self, node: int) -> None:
        """Its flows are gone (the engine dropped them); its peers see the connections close."""
        me = self.nodes[node]
        if not me.alive:
            return
        me.alive = False
        for end in list(me.ends.values()):
            other = end.other
            self._forget(end)
            self._push(other.node, Closed(other.id, "connection reset"))
        me.pulls.clear()
        me.reported.clear()
        self.registry.leave(me.peer_id, self.sim.now)
        self._drain()

    # -- the tracker ----------------------------------------------------------

    def _announce(self, me: _Node) -> None:
        """One announce of ``me`` to the registry, as the tracker service answers it."""
        session = me.session
        assert session is not None
        now = self.sim.now
        for piece, request in me.pulls.items():
            flow = request.flow
            done = me.pull_base.get(piece, 0)
            if flow is not None:
                done = min(done + int(flow.transferred(now)), self.lengths[piece])
            told = me.reported.get(piece, 0)
            if done > told:
                me.reported[piece] = done
                self._push(me, OriginProgress(piece, done - told))
        self._drain()
        registry = self.registry
        throttles, retry_after = self.sim.take_throttles(me.id)
        progress = session.announce_progress()
        answer = registry.announce(
            me.peer_id,
            (me.host, _PORT),
            session.have,
            progress,
            now,
            me.zone,
            throttles=throttles,
            retry_after=retry_after,
            # Pulls that only wait out a throttled answer, as the peer reports them.
            waiting=[p for p, r in me.pulls.items() if r.flow is None and r.attempt],
        )
        session.announced(progress)
        for culprit in session.barred:
            registry.report(me.peer_id, culprit, now)
        barred = registry.barred
        self._push(
            me,
            TrackerReplied(
                peers=[
                    (p.peer_id, p.host, p.port) for p in answer.peers if p.peer_id not in barred
                ],
                assigned=answer.assigned,
                peer_zones={p.peer_id: p.zone for p in answer.peers if p.zone},
                complete=registry.swarm_complete,
            ),
        )
        self._schedule_announce(me, now + self.interval)
        self._drain()

    def _schedule_announce(self, me: _Node, when: float) -> None:
        me.announce_at = when
        me.announce_turn += 1
        self.sim.at(when, self._announce_due, (me, me.announce_turn))

    def _announce_due(self, arg: tuple[_Node, int]) -> None:
        me, turn = arg
        if me.alive and turn == me.announce_turn:
            self._announce(me)

    def _announce_soon(self, me: _Node) -> None:
        # The peer's reply comes back after a round trip; here the tracker answers
        # at once, in an event of its own (not inside the session's handling).
        if self.sim.now < me.announce_at:
            self._schedule_announce(me, self.sim.now)

    def _tick(self, me: _Node) -> None:
        if not me.alive:
            return
        self._push(me, _TICK_EVENT)
        self._drain()
        self.sim.at(self.sim.now + _TICK, self._tick, me)

    # -- feeding sessions and carrying out their actions ----------------------

    def _push(self, node: _Node, event: Event) -> None:
        self._queue_nodes.append(node)
        self._queue_events.append(event)

    def _drain(self) -> None:
        """Feed every queued event, and those their actions cause, in order."""
        nodes = self._queue_nodes
        events = self._queue_events
        now = self.sim.now
        i = 0
        while i < len(events):
            node = nodes[i]
            event = events[i]
            i += 1
            session = node.session
            if node.alive and session is not None:
                self._carry_out(node, session.handle(event, now))
        nodes.clear()
        events.clear()

    def _carry_out(self, me: _Node, actions: list[Action]) -> None:
        ends = self.ends
        for action in actions:
            if isinstance(action, Send):
                end = ends[action.conn]
                if end is not None:
                    other = end.other
                    self._push(other.node, Received(other.id, action.msg))
            elif isinstance(action, SendBlock):
                end = ends[action.conn]
                if end is not None:
                    end.requests.append(action.request)
                    if end.flow is None:
                        self._send_next(end)
            elif isinstance(action, StoreBlock):
                self._push(me, BlockStored(action.conn, action.block))
            elif isinstance(action, Verify):
                self._push(me, PieceVerified(action.piece))
            elif isinstance(action, Complete):
                self.sim.node_finished(me.id)
            elif isinstance(action, Dial):
                self._dial(me, action.peer_id)
            elif isinstance(action, Close):
                end = ends[action.conn]
                if end is not None:
                    other = end.other
                    self._forget(end)
                    self._push(other.node, Closed(other.id, "closed by the remote"))
            elif isinstance(action, StartPull):
                piece = action.piece
                self._pull_window(me, piece, 0)
                me.reported[piece] = 0
            elif isinstance(action, CancelPull):
                request = me.pulls.pop(action.piece, None)
                me.reported.pop(action.piece, None)
                me.pull_base.pop(action.piece, None)
                if request is not None:
                    self.sim.cancel(request)
                self._push(me, PullFailed(action.piece))
            elif isinstance(action, AnnounceSoon):
                self._announce_soon(me)
            # Progress needs nothing: the session's bitfield goes with each announce.

    def _dial(self, me: _Node, peer_id: bytes) -> None:
        """Connected at once if the peer is up, refused if not."""
        target = self.by_peer_id.get(peer_id)
        if target is None or not target.alive:
            self._push(me, DialFailed(peer_id))
            return
        ends = self.ends
        mine = _End(len(ends), me)
        theirs = _End(len(ends) + 1, target)
        mine.other = theirs
        theirs.other = mine
        ends.append(mine)
        ends.append(theirs)
        me.ends[mine.id] = mine
        target.ends[theirs.id] = theirs
        self._push(me, Opened(mine.id, True, peer_id))
        self._push(target, Opened(theirs.id, False))

    def _forget(self, end: _End) -> None:
        """Both ends of ``end``'s connection close; blocks on the way are dropped."""
        sim = self.sim
        for side in (end, end.other):
            self.ends[side.id] = None
            side.node.ends.pop(side.id, None)
            side.requests.clear()
            flow = side.flow
            if flow is not None:
                side.flow = None
                if flow.running:
                    sim.cancel(flow)

    # -- blocks and origin pulls ----------------------------------------------

    def _send_next(self, end: _End) -> None:
        """Start the flow of ``end``'s next block; its header reaches the far end at once."""
        request = end.requests[0]
        other = end.other
        end.flow = self.sim.send(end.node.id, other.node.id, request.length, self.block_done, end)
        block = BlockRequest(request.piece, request.offset, request.length)
        self._push(other.node, BlockStarted(other.id, block))

    def _block_done(self, flow: Flow, now: float) -> None:
        end: _End = flow.data
        end.flow = None
        request = end.requests.pop(0)
        other = end.other
        block = BlockRequest(request.piece, request.offset, request.length)
        self._push(other.node, BlockReceived(other.id, block))
        self._push(end.node, UploadDone(end.id, request))
        if end.requests:
            self._send_next(end)
        self._drain()

    def _pull_window(self, me: _Node, piece: int, start: int) -> None:
        """Read ``piece`` from ``start``: to its end, or one window with cut-through."""
        length = self.lengths[piece]
        size = length - start if not self.window else min(self.window, length - start)
        me.pull_base[piece] = start
        me.pulls[piece] = self.sim.origin_get(me.id, size, self.pull_done, (me, piece))

    def _pull_done(self, flow: Flow, now: float) -> None:
        data: tuple[_Node, int] = flow.data
        me, piece = data
        request = me.pulls.get(piece)
        if request is None or request.flow is not flow:
            return
        end = me.pull_base[piece] + request.size
        if end < self.lengths[piece]:
            self._push(me, OriginChecked(piece, end))
            self._pull_window(me, piece, end)
            self._drain()
            return
        del me.pulls[piece]
        me.pull_base.pop(piece, None)
        me.reported.pop(piece, None)
        self._push(me, PullDone(piece))
        self._drain()
