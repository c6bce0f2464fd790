"""Who pulls each piece from the origin: the tracker's seeder assignment policy.

Invariant 1 of the design says every byte leaves object storage once per
cluster. This class is where that is decided: every piece not yet present
anywhere in the swarm is assigned to exactly one live peer (its *seeder* for
that piece), and a piece some peer has verified is never assigned again.
Everything else moves peer to peer.

Spreading the burst
    Each peer pulls at most ``per_peer_limit`` pieces at a time and the whole
    cluster at most ``origin_budget`` (None: ``per_peer_limit`` * live peers, at
    most ``DEFAULT_MAX_BUDGET``), so the origin rate grows with the cluster but can
    be capped (and adapted, via :meth:`SeederAssignment.set_budget`, when the
    object store throttles).

    Why a cap by default: pieces in flight share the origin's egress, so they
    finish together, and a piece helps nobody until it is whole. With two pulls
    per peer a 1000-node cluster had 2000 pieces of a 4096-piece artifact in
    flight: they left the origin in two waves and the fabric idled for the first
    half of the run. Too low a cap starves a fast origin instead. Simulator,
    fireworks-kimi (``swarm simulate`` with ``origin_budget`` set): 1000 nodes,
    256 GiB, 25 Gbit/s origin: 1.39 x T_min uncapped, 1.08 x with 256, 1.02 x
    with 64; but 100 nodes, 1 TiB, 100 Gbit/s origin: 1.43 x uncapped and with
    256, 2.0 x with 64 (64 single-stream pulls of ~100 MB/s can't fill it).
    A small swarm is not held to two pulls a peer: the cluster keeps at least
    ``min_in_flight`` (4, what ``swarm fetch --direct`` keeps and
    ``PeerConfig.origin_pieces_in_flight`` pulls at once) pieces in flight when
    it has the peers, plus ``lookahead`` (2) held ahead while the pool holds
    ``LOOKAHEAD_POOL`` times that many or more: a lone peer holds six, pulls
    four, and two wait for a buffer, so its next pull starts the moment one
    ends, not an announce round trip later; two peers hold three each. Pieces a
    peer took while the swarm was smaller count against its own share of the
    budget, not a newcomer's, so a peer that joins later still gets its
    ``limit``. A lone peer used to hold two, and learned its next pieces only
    from the reply to the announce it sent when one finished: with 4 MiB pieces
    from a ``file://`` origin it reached 0.75 of ``--direct``'s throughput
    (``benchmarks/origin_path.py``); holding four, 0.85-0.87.
    A free origin slot goes to the peer with the least load (pieces it has
    pulled plus pieces it is pulling), random among equals. With N peers and P
    pieces each pulls about P/N, but a peer that pulls faster frees its slots
    sooner and so pulls more: nothing waits on the slowest node. And a seeder
    pulling at under half the median rate gets no new pieces while faster ones
    can take them (:meth:`SeederAssignment.slow`): the pieces it would pull reach
    everyone else late and through its own slow uplink.

Order of pieces
    The pool of unassigned pieces is shuffled with the ``rng``. Concurrent
    origin reads then fall on different files (and object-store partitions)
    instead of hammering one object, and every file's pieces appear in the swarm
    spread out over time, which rarest-first exchange handles best. Pieces that
    come back to the pool (their seeder left or stalled) go to its front: they
    have waited longest.

Stalls
    A seeder reports how many bytes of each assigned piece it has
    (:meth:`SeederAssignment.progress`). A piece whose byte count has not
    advanced for ``stall_timeout`` seconds goes back to the pool and to another
    peer, and is removed from the stalled peer's assignments (the peer learns
    this from its next announce reply and drops it). Stall detection is by
    progress, not by a deadline scaled to piece size: a slow seeder that keeps
    moving keeps its piece, a stuck one loses it after ``stall_timeout``
    whatever the piece size. A piece with no bytes yet may be waiting for one of
    its peer's buffers (held ahead): it stalls only when none of that peer's
    pulls has moved for ``stall_timeout`` either. Peers report progress at
    least once per announce, so ``stall_timeout`` must be longer than the
    announce interval.

Origin copies (``origin_copies`` > 1)
    Invariant 1 holds by default: one origin copy of every piece. An operator
    whose origin is in the cluster and cheap to read may allow more, up to
    ``origin_copies`` times the artifact's bytes in all: the origin then acts as
    one more uploader. It does so only where it would otherwise idle, so it can
    only shorten the burst: a *copy* (:meth:`SeederAssignment.assign_copy`) is
    handed out only while no piece waits for its one origin copy (the pool is
    empty) and an origin slot under the budget is free, to a peer with room
    under its limit that is not slow, for the rarest piece it lacks (the caller
    lists the candidates). A copy is that peer's own: it never goes back to the
    pool; one that stalls, or that the peer declined (it was fetching the piece
    from peers already), is dropped and not offered to that peer again. Copies
    are of pieces some peer holds (never of one its seeder is still pulling), and
    they give way: when pieces come back to the pool (a seeder left or stalled,
    a piece was lost) and no slot is free, copies are dropped, least read first.
    A copy is charged to the budget as handed out and refunded only if dropped
    before any of it was read, so the origin never sends more than the budget
    in whole copies.

Time (``now``) and randomness (``rng``) are passed in; nothing here reads the
clock or does I/O.
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

__all__ = [
    "DEFAULT_MAX_BUDGET",
    "MAX_ORIGIN_COPIES",
    "MIN_IN_FLIGHT",
    "SLOW_SEEDER",
    "AssignmentStats",
    "SeederAssignment",
]

MAX_ORIGIN_COPIES: Final = 100.0
"""The most origin copies an operator may allow (``--origin-copies``)."""


def origin_copies_problem(copies: float) -> str | None:
    """What is wrong with ``copies`` as an origin-copies budget ("must be ..."), or None."""
    if 1.0 <= copies <= MAX_ORIGIN_COPIES:
        return None
    return f"must be between 1 and {MAX_ORIGIN_COPIES:g}, got {copies}"


DEFAULT_MAX_BUDGET = 256
"""The cluster's origin pieces in flight when no budget is set, however many peers."""

MIN_IN_FLIGHT = 4
LOOKAHEAD: Final = 2
LOOKAHEAD_POOL: Final = 4
"""Origin pieces a small swarm keeps in flight at least (``swarm fetch --direct``'s
``pieces_in_flight``), spread over its peers."""

SLOW_SEEDER: Final = 0.5
"""A seeder pulling at less than this fraction of the median rate gets no new pieces
while others can take them (:meth:`SeederAssignment.slow`)."""
MIN_RATED: Final = 4
"""Seeders with a finished pull needed before any is judged slow."""
RATE_LIFE: Final = 3.0
MIN_RATE_LIFE: Final = 10.0
"""How long a seeder's judged rate holds: ``RATE_LIFE`` times the pull it came from,
at least ``MIN_RATE_LIFE`` seconds."""

PeerT = TypeVar("PeerT", bound=Hashable)

_POOL = 0
_ASSIGNED = 1
_PRESENT = 2


@dataclass
class AssignmentStats(Generic[PeerT]):
    """Counters since the assignment policy was created."""

    pulled: dict[PeerT, int] = field(default_factory=dict)
    """Pieces each peer pulled from the origin and the swarm then had."""
    assigned: int = 0
    """Assignments made (including re-assignments)."""
    reassigned: int = 0
    """Pieces taken from a seeder that left or stalled and put back in the pool."""
    stalled: int = 0
    """Of those, pieces taken away because their progress stopped."""
    lost: int = 0
    """Pieces that were present, then lost with every peer holding them."""
    pulled_bytes: int = 0
    """Bytes of the pieces in ``pulled``: what the origin sent that the swarm kept."""
    origin_bytes: int = 0
    """Bytes the seeders reported reading from the origin (progress, and the rest of a
    piece when it became present): the origin throughput the budget adapts to."""
    copies: int = 0
    """Extra origin copies handed out (``origin_copies`` > 1)."""
    copy_bytes: int = 0
    """Bytes of those copies that their peers finished (and so read from the origin)."""


class _Pull:
    """One piece being pulled by its seeder."""

    __slots__ = ("bytes_done", "reported", "since", "started")

    def __init__(self, bytes_done: int, since: float) -> None:
        self.bytes_done = bytes_done
        self.since = since  # when bytes_done last advanced (or the assignment)
        self.started = since  # the assignment
        self.reported = False  # its peer reported progress on it (a copy it took up)


class _Seeder(Generic[PeerT]):
    __slots__ = (
        "copies",
        "dropped",
        "joined",
        "moved",
        "pulled",
        "pulls",
        "rate",
        "rated_until",
    )

    def __init__(self, joined: float) -> None:
        self.joined = joined
        self.moved = joined  # when any of its pulls last advanced
        self.pulled = 0
        self.pulls: dict[int, _Pull] = {}
        self.copies: dict[int, _Pull] = {}  # extra origin copies it pulls for itself
        self.dropped: set[int] = set()  # copies it stalled on or declined: not offered again
        self.rate = 0.0  # bytes/s of its finished pulls, smoothed; 0: none finished yet
        self.rated_until = 0.0  # the rate is stale after this (see SeederAssignment.slow)


class SeederAssignment(Generic[PeerT]):
    """Assigns every missing piece to exactly one live peer; see the module docstring."""

    def __init__(
        self,
        piece_lengths: Sequence[int],
        *,
        per_peer_limit: int = 2,
        min_in_flight: int = MIN_IN_FLIGHT,
        lookahead: int = LOOKAHEAD,
        origin_budget: int | None = None,
        max_budget: int = DEFAULT_MAX_BUDGET,
        stall_timeout: float = 30.0,
        origin_copies: float = 1.0,
        rng: random.Random,
    ) -> None:
        if problem := origin_copies_problem(origin_copies):
            raise ValueError(f"origin_copies {problem}")
        if per_peer_limit < 1:
            raise ValueError(f"per_peer_limit must be >= 1, got {per_peer_limit}")
        if min_in_flight < 1:
            raise ValueError(f"min_in_flight must be >= 1, got {min_in_flight}")
        if stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be > 0, got {stall_timeout}")
        self._lengths = list(piece_lengths)
        self.per_peer_limit = per_peer_limit
        self.min_in_flight = min_in_flight
        # Only a swarm whose minimum is above the per-peer limit (a small one) holds
        # pieces ahead; see the module docstring.
        self.lookahead = max(0, lookahead) if min_in_flight > per_peer_limit else 0
        self.stall_timeout = stall_timeout
        if max_budget < 1:
            raise ValueError(f"max_budget must be >= 1, got {max_budget}")
        self.max_budget = max_budget
        self._budget: int | None = None
        self._cap: int | None = None
        self.set_budget(origin_budget)
        self._rng = rng

        order = list(range(len(self._lengths)))
        rng.shuffle(order)
        # May hold stale entries (pieces since assigned or present): skipped on pop.
        self._pool: deque[int] = deque(order)
        self._state = bytearray(len(self._lengths))  # _POOL / _ASSIGNED / _PRESENT
        self._pool_count = len(order)
        self._owner: dict[int, PeerT] = {}
        # Peers a piece was taken from for stalling; avoided when reassigning it.
        self._stalled_on: dict[int, set[PeerT]] = {}
        # Bytes last reported for a piece taken back for stalling: a later report
        # adopts the piece only if it went past this.
        self._stalled_bytes: dict[int, int] = {}
        self._seeders: dict[PeerT, _Seeder[PeerT]] = {}
        self._in_flight = 0
        # Extra origin copies: bytes still allowed, and copies being pulled.
        self.origin_copies = origin_copies
        self._copy_bytes_left = round((origin_copies - 1.0) * sum(self._lengths))
        self._copies_in_flight = 0
        self._smallest = min(self._lengths, default=0)
        self._stats: AssignmentStats[PeerT] = AssignmentStats()
        self._median_rate: float | None = None  # of the rated seeders; None: recompute
        self._median_at = 0.0

    # -- configuration ------------------------------------------------------

    def set_budget(self, budget: int | None) -> None:
        """Cap on pieces pulled from the origin at once by the whole cluster.

        None means :attr:`limit` * live peers, at most ``max_budget``
        (see the module docstring). Lowering it below what is in
        flight takes nothing away; it only holds back new assignments.
        """
        if budget is not None and budget < 1:
            raise ValueError(f"origin budget must be >= 1 or None, got {budget}")
        self._budget = budget

    def set_cap(self, cap: int | None) -> None:
        """A cap under :attr:`budget`, set by what the origin gives
        (:class:`tracker.origin_budget.OriginBudget`); None for none."""
        if cap is not None and cap < 1:
            raise ValueError(f"origin cap must be >= 1 or None, got {cap}")
        self._cap = cap

    @property
    def budget(self) -> int:
        """The cluster-wide cap in effect now."""
        base = self._base_budget()
        return base if self._cap is None else min(base, self._cap)

    @property
    def origin_bytes(self) -> int:
        """:attr:`AssignmentStats.origin_bytes`, without copying the stats."""
        return self._stats.origin_bytes

    @property
    def budget_bound(self) -> bool:
        """Whether pieces wait for the budget: some unassigned, every slot in use."""
        return self._pool_count > 0 and self._in_flight >= self.budget

    def _base_budget(self) -> int:
        if self._budget is not None:
            return self._budget
        # Pieces a peer took while the swarm was smaller (and its limit higher) count
        # against its own share, not a newcomer's.
        limit = self.limit
        shares = sum(max(limit, len(s.pulls)) for s in self._seeders.values())
        return min(shares, self.max_budget)

    @property
    def limit(self) -> int:
        """Pieces one peer may pull at once now: ``per_peer_limit``, or more while
        the live peers are too few to keep ``min_in_flight`` in flight."""
        peers = max(1, len(self._seeders))
        wanted = self.min_in_flight
        if self.lookahead and self._pool_count >= LOOKAHEAD_POOL * (wanted + self.lookahead):
            wanted += self.lookahead
        return max(self.per_peer_limit, -(-wanted // peers))

    # -- read-only state ----------------------------------------------------

    @property
    def num_pieces(self) -> int:
        return len(self._lengths)

    @property
    def in_flight(self) -> int:
        """Pieces assigned and not yet present."""
        return self._in_flight

    @property
    def unassigned(self) -> int:
        """Pieces neither present nor assigned."""
        return self._pool_count

    @property
    def all_present(self) -> bool:
        return self._pool_count == 0 and self._in_flight == 0

    @property
    def peers(self) -> list[PeerT]:
        return list(self._seeders)

    def is_present(self, piece: int) -> bool:
        return self._state[piece] == _PRESENT

    def owner(self, piece: int) -> PeerT | None:
        """The peer pulling ``piece`` from the origin now, if any."""
        return self._owner.get(piece)

    def assignments(self, peer: PeerT) -> list[int]:
        """Pieces ``peer`` should be pulling from the origin now, in assignment order
        (its copies, if any, after its pieces)."""
        seeder = self._seeders.get(peer)
        return [] if seeder is None else [*seeder.pulls, *seeder.copies]

    def pulling(self, peer: PeerT, piece: int) -> bool:
        """Whether ``peer`` should be pulling ``piece``: as its seeder, or as a copy."""
        seeder = self._seeders.get(peer)
        return seeder is not None and (piece in seeder.pulls or piece in seeder.copies)

    def copies_of(self, peer: PeerT) -> list[int]:
        """The extra origin copies ``peer`` is pulling for itself."""
        seeder = self._seeders.get(peer)
        return [] if seeder is None else list(seeder.copies)

    @property
    def copies_in_flight(self) -> int:
        return self._copies_in_flight

    def progress_of(self, peer: PeerT, piece: int) -> int | None:
        """Bytes of ``piece`` that ``peer`` last reported, or None if not its piece."""
        seeder = self._seeders.get(peer)
        if seeder is None:
            return None
        pull = seeder.pulls.get(piece) or seeder.copies.get(piece)
        return None if pull is None else pull.bytes_done

    @property
    def stats(self) -> AssignmentStats[PeerT]:
        """A snapshot of the counters."""
        s = self._stats
        return AssignmentStats(
            dict(s.pulled),
            s.assigned,
            s.reassigned,
            s.stalled,
            s.lost,
            s.pulled_bytes,
            s.origin_bytes,
            s.copies,
            s.copy_bytes,
        )

    # -- events -------------------------------------------------------------

    def peer_joined(self, peer: PeerT, now: float) -> None:
        """``peer`` is live and can pull pieces (no effect if already known)."""
        if peer not in self._seeders:
            self._seeders[peer] = _Seeder(now)
            self._stats.pulled.setdefault(peer, 0)

    def peer_left(self, peer: PeerT, now: float) -> list[int]:
        """``peer`` left or expired: its pieces go back to the pool. Returns them."""
        seeder = self._seeders.get(peer)
        if seeder is None:
            return []
        returned = list(seeder.pulls)
        for piece in reversed(returned):  # keep their order at the pool's front
            self._unassign(peer, piece)
        for piece in list(seeder.copies):
            self.drop_copy(peer, piece)
        del self._seeders[peer]
        self._median_rate = None
        self._stats.reassigned += len(returned)
        for stalled in self._stalled_on.values():
            stalled.discard(peer)
        return returned

    def piece_present(self, piece: int, now: float | None = None) -> PeerT | None:
        """Some peer verified ``piece``: never assign it again.

        Returns the peer that was pulling it, credited in :attr:`stats`, or None.
        With ``now``, the pull's duration updates its seeder's pull rate (see
        :meth:`slow`).
        """
        self._check_piece(piece)
        state = self._state[piece]
        if state == _PRESENT:
            return None
        self._state[piece] = _PRESENT
        self._stalled_on.pop(piece, None)
        self._stalled_bytes.pop(piece, None)
        if state == _POOL:
            self._pool_count -= 1  # its pool entry is skipped when reached
            return None
        owner = self._owner.pop(piece)
        seeder = self._seeders[owner]
        pull = seeder.pulls.pop(piece)
        if now is not None and now > pull.started:
            sample = self._lengths[piece] / (now - pull.started)
            seeder.rate = sample if seeder.rate == 0 else (seeder.rate + sample) / 2
            seeder.rated_until = now + max(MIN_RATE_LIFE, RATE_LIFE * (now - pull.started))
            if not self._median_rate:
                self._median_rate = None  # not enough rated yet: count again
        self._stats.origin_bytes += max(0, self._lengths[piece] - pull.bytes_done)
        self._in_flight -= 1
        self._seeders[owner].pulled += 1
        self._stats.pulled[owner] = self._stats.pulled.get(owner, 0) + 1
        self._stats.pulled_bytes += self._lengths[piece]
        return owner

    def piece_lost(self, piece: int) -> bool:
        """Every peer holding ``piece`` is gone: it must come from the origin again.

        Returns True if the piece went back to the pool.
        """
        self._check_piece(piece)
        if self._state[piece] != _PRESENT:
            return False
        self._state[piece] = _POOL
        self._pool.appendleft(piece)
        self._pool_count += 1
        self._stats.lost += 1
        return True

    def progress(self, peer: PeerT, piece: int, bytes_done: int, now: float) -> bool:
        """``peer`` reports ``bytes_done`` bytes of ``piece`` pulled from the origin.

        Progress restarts the stall clock only if the count advanced. A report
        of bytes for a piece in the pool (unassigned) *adopts* it: the peer is
        already pulling it (e.g. the tracker restarted and lost its
        assignments), and giving it to someone else would pull it twice. For a
        piece taken back for stalling, the count must have gone past the last
        one reported before the stall. Returns True if the piece is (now) assigned to ``peer``.
        Reports for pieces assigned elsewhere or present are ignored.
        """
        self._check_piece(piece)
        seeder = self._seeders.get(peer)
        if seeder is None:
            return False
        pull = seeder.pulls.get(piece) or seeder.copies.get(piece)
        if pull is not None:
            pull.reported = True
            if bytes_done > pull.bytes_done:
                self._stats.origin_bytes += min(bytes_done, self._lengths[piece]) - min(
                    pull.bytes_done, self._lengths[piece]
                )
                pull.bytes_done = bytes_done
                pull.since = seeder.moved = now
            return True
        if self._state[piece] != _POOL or bytes_done <= self._stalled_bytes.get(piece, 0):
            return False
        self._assign(peer, piece, now, bytes_done)
        return True

    def assign(self, now: float, only: PeerT | None = None) -> dict[PeerT, list[int]]:
        """Hand out unassigned pieces to free origin slots; returns the new ones per peer.

        ``only``: to that seeder alone, up to its limit (the tracker assigns to the
        peer whose announce it is answering; see :meth:`_assign_to`).
        """
        if self._pool_count == 0 or not self._seeders:
            return {}  # before the budget, which walks every seeder
        if self._copies_in_flight:
            # A piece lost while a peer pulls a copy of it: that copy is its pull now.
            for peer, seeder in self._seeders.items():
                for lost in [p for p in seeder.copies if self._state[p] == _POOL]:
                    self._assign(peer, lost, now, 0)
            if self._pool_count == 0:
                return {}
        free = self.budget - self._in_flight - self._copies_in_flight
        if free < self._pool_count and self._copies_in_flight:
            free += self._yield_copies(self._pool_count - max(free, 0))
        if free <= 0:
            return {}
        if only is not None:
            return self._assign_to(only, free, now)
        rng = self._rng
        limit = self.limit
        heap: list[tuple[int, float, int, PeerT]] = []
        held_back: list[tuple[int, float, int, PeerT]] = []  # slow seeders: if no one else
        for order, (peer, seeder) in enumerate(self._seeders.items()):
            if len(seeder.pulls) < limit:
                entry = (seeder.pulled + len(seeder.pulls), rng.random(), order, peer)
                (held_back if self.slow(peer, now) else heap).append(entry)
        if not heap:
            heap = held_back
        heapq.heapify(heap)
        new: dict[PeerT, list[int]] = {}
        while free > 0 and heap:
            piece = self._pop_pool()
            if piece is None:
                break
            entry = self._pop_eligible(heap, piece)
            load, _, order, peer = entry
            self._assign(peer, piece, now, 0)
            new.setdefault(peer, []).append(piece)
            free -= 1
            if len(self._seeders[peer].pulls) < limit:
                heapq.heappush(heap, (load + 1, rng.random(), order, peer))
        return new

    def copy_room(self, peer: PeerT, now: float) -> bool:
        """Whether :meth:`assign_copy` could give ``peer`` a copy now (before its
        candidates are worked out): copies allowed and bytes left for them, the
        origin would otherwise idle (no piece waits in the pool, a slot is free),
        and ``peer`` has room under its limit and is not slow."""
        if self._copy_bytes_left < self._smallest or self._pool_count > 0:
            return False
        if self._in_flight + self._copies_in_flight >= self.budget:
            return False
        seeder = self._seeders.get(peer)
        if seeder is None or len(seeder.pulls) + len(seeder.copies) >= self.limit:
            return False
        return not self.slow(peer, now)

    def assign_copy(self, peer: PeerT, now: float, candidates: Iterable[int]) -> int | None:
        """An extra origin copy for ``peer`` of the first of ``candidates`` that fits
        the copies' budget (the caller lists pieces ``peer`` lacks, rarest first),
        if :meth:`copy_room` allows; the piece, or None. See the module docstring."""
        if not self.copy_room(peer, now):
            return None
        seeder = self._seeders[peer]
        for piece in candidates:
            self._check_piece(piece)
            length = self._lengths[piece]
            if (
                self._state[piece] != _PRESENT
                or piece in seeder.copies
                or piece in seeder.dropped
                or length > self._copy_bytes_left
            ):
                continue
            seeder.copies[piece] = _Pull(0, now)
            self._copy_bytes_left -= length
            self._copies_in_flight += 1
            self._stats.copies += 1
            return piece
        return None

    def copy_reported(self, peer: PeerT, piece: int) -> bool:
        """Whether ``peer`` ever reported progress on its copy of ``piece`` (took it up)."""
        seeder = self._seeders.get(peer)
        pull = None if seeder is None else seeder.copies.get(piece)
        return pull is not None and pull.reported

    def _pop_copy(self, peer: PeerT, piece: int) -> _Pull | None:
        """Take ``peer``'s copy of ``piece`` out of flight; None if it has none."""
        seeder = self._seeders.get(peer)
        pull = None if seeder is None else seeder.copies.pop(piece, None)
        if pull is not None:
            self._copies_in_flight -= 1
        return pull

    def copy_done(self, peer: PeerT, piece: int) -> bool:
        """``peer`` pulled its copy of ``piece`` and verified it: the copy is done.
        (A copy the peer has from peers instead is :meth:`drop_copy`'s.)"""
        pull = self._pop_copy(peer, piece)
        if pull is None:
            return False
        self._stats.copy_bytes += self._lengths[piece]
        self._stats.origin_bytes += max(0, self._lengths[piece] - pull.bytes_done)
        return True

    def drop_copy(self, peer: PeerT, piece: int, *, again: bool = False) -> bool:
        """Forget ``peer``'s copy of ``piece`` (it stalled, declined it, or left). Its
        bytes go back to the budget only if none was read; ``peer`` is not offered
        the piece again unless ``again`` (the copy only made way for other pulls)."""
        pull = self._pop_copy(peer, piece)
        if pull is None:
            return False
        if not again:
            self._seeders[peer].dropped.add(piece)
        if pull.bytes_done == 0:
            self._copy_bytes_left += self._lengths[piece]
        return True

    def _yield_copies(self, wanted: int) -> int:
        """Drop up to ``wanted`` copies, least read first, so that pieces waiting for
        their one origin copy get slots; returns how many were dropped."""
        least = sorted(
            (pull.bytes_done, order, peer, piece)
            for order, (peer, seeder) in enumerate(self._seeders.items())
            for piece, pull in seeder.copies.items()
        )[:wanted]
        for _, _, peer, piece in least:
            self.drop_copy(peer, piece, again=True)
        return len(least)

    def median_rate(self, now: float) -> float:
        """The median pull rate (bytes/s) of the seeders that finished a pull; 0
        while fewer than ``MIN_RATED`` have.

        Recomputed at most once a second (it sorts every seeder's rate, and a
        1000-node tracker answers about that many announces a second).
        """
        if self._median_rate is None or now >= self._median_at + 1.0:
            rates = sorted(s.rate for s in self._seeders.values() if s.rate > 0)
            self._median_rate = rates[len(rates) // 2] if len(rates) >= MIN_RATED else 0.0
            self._median_at = now
        return self._median_rate

    def slow(self, peer: PeerT, now: float) -> bool:
        """Whether ``peer`` pulls at less than ``SLOW_SEEDER`` of the median rate.

        A slow seeder gets no new origin pieces while faster ones are there to
        take them: every piece it pulls reaches the others only through it, at
        its pace. A node whose link is a quarter of the others' (its pulls share
        its downlink with everything it fetches from peers, so they crawl) held
        back the pieces it pulled, and every fast node waited for them: the
        shaped ``mixed-links`` run (8 nodes, two at 100 Mbit/s, the rest at 400)
        had the fast nodes at 1.62 x their own bound, and 1.33 with this rule;
        the session-driven simulator of that run gives 1.36 without it, 1.12
        with it, and 1.06-1.10 with no origin pieces for the slow nodes at all
        (the rest: pieces they pulled before they were judged). A seeder's rate is measured from its finished
        pulls (assignment to present), so a node is judged by what it did. A
        judgement lasts ``RATE_LIFE`` times the pull it came from (at least
        ``MIN_RATE_LIFE`` seconds): then the seeder may take one piece again and
        be measured anew, so a node that was slow only for a while (a burst of
        other traffic, a pull that waited for a buffer) is not passed over for
        the rest of the burst.
        """
        seeder = self._seeders.get(peer)
        if seeder is None or seeder.rate == 0 or now >= seeder.rated_until:
            return False
        return seeder.rate < SLOW_SEEDER * self.median_rate(now)

    def _assign_to(self, peer: PeerT, free: int, now: float) -> dict[PeerT, list[int]]:
        """Up to ``free`` pieces for ``peer``, within its limit.

        A piece assigned to another seeder reaches it only with the reply to its
        next announce, up to an announce interval later; given to the peer being
        answered, it starts now. So a seeder that finishes a pull (and announces
        at once) takes the next piece itself, and the origin is not left idle
        for an interval with pieces waiting (measured with the session-driven
        simulator, 100 nodes, 16 GiB, origin at 100 Gbit/s: half the pulls had
        finished at 0.9 s and the rest were started only at 5.0 s). Each seeder
        still holds at most ``limit`` pulls, which spreads them over the swarm.
        A piece ``peer`` stalled on is left for another seeder, if there is one.
        """
        seeder = self._seeders.get(peer)
        if seeder is None or self.slow(peer, now):
            return {}
        room = min(free, self.limit - len(seeder.pulls))
        new: list[int] = []
        passed: list[int] = []
        while room > 0:
            piece = self._pop_pool()
            if piece is None:
                break
            avoid = self._stalled_on.get(piece)
            if avoid and peer in avoid and len(avoid) < len(self._seeders):
                passed.append(piece)
                continue
            self._assign(peer, piece, now, 0)
            new.append(piece)
            room -= 1
        for piece in reversed(passed):
            self._pool.appendleft(piece)  # still in the pool: its count never moved
        return {peer: new} if new else {}

    def tick(self, now: float) -> list[tuple[PeerT, int]]:
        """Take back pieces whose progress stopped for ``stall_timeout`` seconds.

        They go back to the pool (the next :meth:`assign` gives them to another
        peer if there is one). Returns the (peer, piece) pairs taken away.
        """
        stalled: list[tuple[PeerT, int]] = []
        for peer, seeder in self._seeders.items():
            for piece, pull in seeder.pulls.items():
                # A piece not started may wait for one of the peer's buffers (pieces
                # held ahead): it stalls only when nothing the peer pulls moves either.
                if now - pull.since >= self.stall_timeout and (
                    pull.bytes_done > 0 or now - seeder.moved >= self.stall_timeout
                ):
                    stalled.append((peer, piece))
        stalled_copies = [
            (peer, piece)
            for peer, seeder in self._seeders.items()
            for piece, pull in seeder.copies.items()
            if now - pull.since >= self.stall_timeout
        ]
        for peer, piece in stalled_copies:
            self.drop_copy(peer, piece)  # its peer gets the piece from peers
        for peer, piece in reversed(stalled):
            bytes_done = self._seeders[peer].pulls[piece].bytes_done
            self._stalled_bytes[piece] = max(self._stalled_bytes.get(piece, 0), bytes_done)
            self._unassign(peer, piece)
            self._stalled_on.setdefault(piece, set()).add(peer)
        self._stats.reassigned += len(stalled)
        self._stats.stalled += len(stalled)
        return stalled

    def shed(self, peer: PeerT, waiting: Iterable[int]) -> list[int]:
        """Take back ``peer``'s pulls of the pieces in ``waiting`` (pulls with nothing
        on the wire, only waiting out a throttled answer, as its announce says) while
        more are in flight than the budget allows: it was lowered because the origin
        throttles, and lowering it takes nothing away; those pulls would keep asking a
        throttling origin. Only waiting pulls: one that is reading would be read
        twice once given to another peer. The pieces go back to the pool's front;
        returns them.
        """
        excess = self._in_flight + self._copies_in_flight - self.budget
        seeder = self._seeders.get(peer)
        if excess <= 0 or seeder is None:
            return []
        waiting = list(waiting)  # walked twice: its copies, then its pieces
        for piece in waiting:
            if excess > 0 and self.drop_copy(peer, piece, again=True):  # copies go first
                excess -= 1
        taken = [piece for piece in waiting if piece in seeder.pulls][:excess]
        for piece in reversed(taken):
            self._unassign(peer, piece)
        self._stats.reassigned += len(taken)
        return taken

    # -- internals ----------------------------------------------------------

    def _check_piece(self, piece: int) -> None:
        if not 0 <= piece < len(self._lengths):
            raise ValueError(f"piece {piece} is out of range (0..{len(self._lengths) - 1})")

    def _pop_pool(self) -> int | None:
        while self._pool:
            piece = self._pool.popleft()
            if self._state[piece] == _POOL and piece not in self._owner:
                return piece
        return None

    def _pop_eligible(
        self, heap: list[tuple[int, float, int, PeerT]], piece: int
    ) -> tuple[int, float, int, PeerT]:
        """The least-loaded peer that did not stall on ``piece`` (any, if all did)."""
        avoid = self._stalled_on.get(piece)
        if not avoid:
            return heapq.heappop(heap)
        skipped: list[tuple[int, float, int, PeerT]] = []
        chosen = None
        while heap:
            entry = heapq.heappop(heap)
            if entry[3] not in avoid:
                chosen = entry
                break
            skipped.append(entry)
        if chosen is None:
            chosen = skipped.pop(0)
        for entry in skipped:
            heapq.heappush(heap, entry)
        return chosen

    def _assign(self, peer: PeerT, piece: int, now: float, bytes_done: int) -> None:
        copy = self._pop_copy(peer, piece)
        if copy is not None:
            # A lost piece this peer pulls a copy of: the copy becomes the piece's one
            # pull, its bytes counted there and its budget given back.
            bytes_done = max(bytes_done, copy.bytes_done)
            self._copy_bytes_left += self._lengths[piece]
        if self._state[piece] == _POOL:
            self._pool_count -= 1
        self._state[piece] = _ASSIGNED
        self._owner[piece] = peer
        self._seeders[peer].pulls[piece] = _Pull(bytes_done, now)
        self._in_flight += 1
        self._stats.assigned += 1

    def _unassign(self, peer: PeerT, piece: int) -> None:
        del self._seeders[peer].pulls[piece]
        del self._owner[piece]
        self._in_flight -= 1
        self._state[piece] = _POOL
        self._pool_count += 1
        self._pool.appendleft(piece)
