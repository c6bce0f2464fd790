"""The tracker's soft state for one swarm (one artifact root).

For every peer the registry keeps its address, the pieces it has verified, when
it was last heard from and whether it has finished; from those it keeps the
availability of every piece, and it owns the swarm's
:class:`~tracker.assignment.SeederAssignment`, which decides who pulls each
missing piece from the origin.

All of it is *soft state*: it is rebuilt from announces. After a tracker
restart, the first announce of each peer brings back its have-set (so a piece
some peer already has is never assigned again) and its origin progress (so a
pull in flight is adopted by its peer instead of started again elsewhere).
Because a restarted tracker hears from peers one at a time, the owner can hold
back new origin assignments until ``assign_after`` (e.g. one announce interval
after start-up), so that peers not yet heard from are not pre-empted.

Announces are the only input, and each one does the policy's periodic work:
peers not heard from for ``peer_ttl`` seconds expire (their origin pieces go to
others), stalled origin pieces are taken back, and free origin slots are filled.
The owner may also call :meth:`SwarmRegistry.expire` and :meth:`SwarmRegistry.tick`
from a timer so that this happens in a quiet swarm too.

Origin progress for a piece not assigned to the reporting peer adopts it only
before ``assign_after`` (the restart grace window, when assignments lost with the
old tracker are rebuilt); after that such reports are ignored, so a peer can't
take pieces from their seeders by claiming progress on them.

Barring needs evidence. A peer that received data failing verification reports
its source (:meth:`SwarmRegistry.report`); the source is barred for the swarm
only once live peers on ``bar_reporters`` distinct hosts, none of them barred, have
reported it. Why that rule fits one cluster: with a cluster token, every peer
that reaches the registry proved it, and nodes with the token are trusted not
to lie on purpose; but one node can still be wrong (bad RAM or a flaky NIC corrupts
what it receives, so it blames an honest source), so one report is not enough.
Two independent nodes seeing corrupt data from the same source is strong
evidence that the source is at fault, and it is cheap to wait for: the
reporters have already stopped using the source themselves.

The cluster-wide origin rate cap (``origin_rate``, bytes/s) is shared equally by
the peers whose last reply gave them origin pieces: each reply carries this peer's
share, recomputed on every announce. What a peer pulls is what its last reply told
it, so the holders are counted from replies, not from the assignment as it stands.
A share shrinks only when its peer next announces: for up to one announce interval
after new holders join, the sum of the shares handed out can exceed the cap.

Time and randomness are passed in; nothing here does I/O.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.bitfield import Bitfield
from core.digest import PEER_ID_LENGTH
from swarm.hosts import valid_host
from tracker.assignment import DEFAULT_MAX_BUDGET, MIN_IN_FLIGHT, SeederAssignment
from tracker.errors import BadAnnounceError
from tracker.origin_budget import OriginBudget
from tracker.zones import NO_ZONE, ZoneIndex

__all__ = ["AnnounceReply", "PeerAddress", "SwarmRegistry"]


TICK_EVERY = 0.25  # seconds between looks for stalled origin pulls (stall_timeout is 30)


@dataclass(frozen=True, slots=True)
class PeerAddress:
    """Where to reach a peer of the swarm."""

    peer_id: bytes
    host: str
    port: int
    zone: str = ""


@dataclass(frozen=True, slots=True)
class AnnounceReply:
    """What the tracker tells an announcing peer."""

    assigned: tuple[int, ...]
    """Every piece this peer should pull from the origin now (not only new ones):
    a piece pulled before and missing here was taken away, so drop it."""
    peers: tuple[PeerAddress, ...]
    """A random sample of other live peers to connect to."""
    swarm_complete: bool
    """Every known peer has every piece."""
    num_peers: int
    """Live peers in the swarm, this one included."""
    origin_rate: int = 0
    """Bytes per second this peer may read from the origin (its share of the
    cluster's origin cap); 0 means uncapped."""


class _Peer:
    __slots__ = ("address", "finished", "have", "last_seen", "seeder", "suspect")

    def __init__(
        self, address: PeerAddress, num_pieces: int, now: float, *, seeder: bool = True
    ) -> None:
        # Where to reach it, as its replies list it: built when it changes, not for
        # every reply it is in (50 frozen dataclasses per announce were half the cost
        # of one at 5000 peers).
        self.address = address
        self.have = Bitfield(num_pieces)
        self.last_seen = now
        self.finished = num_pieces == 0
        self.suspect = False  # reported for corrupt data: its pieces don't count
        self.seeder = seeder  # may read the origin (False: never assigned origin pieces)

    @property
    def host(self) -> str:
        return self.address.host

    @property
    def port(self) -> int:
        return self.address.port

    @property
    def zone(self) -> str:
        return self.address.zone


class SwarmRegistry:
    """Peers, their pieces and origin assignments for one swarm; see the module docstring.

    ``max_peers_in_reply`` bounds the peer sample of an announce reply; the
    assignment knobs are passed to :class:`~tracker.assignment.SeederAssignment`.
    """

    def __init__(
        self,
        piece_lengths: Sequence[int],
        *,
        peer_ttl: float,
        rng: random.Random,
        max_peers_in_reply: int = 50,
        per_peer_limit: int = 2,
        min_in_flight: int = MIN_IN_FLIGHT,
        origin_budget: int | None = None,
        stall_timeout: float = 30.0,
        assign_after: float = float("-inf"),
        bar_reporters: int = 2,
        origin_rate: int | None = None,
        adaptive_budget: OriginBudget | None = None,
        origin_copies: float = 1.0,
    ) -> None:
        if bar_reporters < 2:
            raise ValueError(
                f"bar_reporters must be >= 2 (one report never bars), got {bar_reporters}"
            )
        if peer_ttl <= 0:
            raise ValueError(f"peer_ttl must be > 0, got {peer_ttl}")
        if max_peers_in_reply < 0:
            raise ValueError(f"max_peers_in_reply must be >= 0, got {max_peers_in_reply}")
        if origin_rate is not None and (isinstance(origin_rate, bool) or origin_rate < 0):
            raise ValueError(f"origin_rate must be >= 0 bytes/s, got {origin_rate!r}")
        self.origin_rate = origin_rate or 0
        self._lengths = list(piece_lengths)
        self.peer_ttl = peer_ttl
        self.max_peers_in_reply = max_peers_in_reply
        self.assign_after = assign_after
        self._ticked = float("-inf")  # when stalls were last looked for
        self._rng = rng
        self.assignment: SeederAssignment[bytes] = SeederAssignment(
            self._lengths,
            per_peer_limit=per_peer_limit,
            min_in_flight=min_in_flight,
            origin_budget=origin_budget,
            max_budget=DEFAULT_MAX_BUDGET if adaptive_budget is None else adaptive_budget.ceiling,
            stall_timeout=stall_timeout,
            origin_copies=origin_copies,
            rng=rng,
        )
        # Adapts the origin budget to what the origin gives (None: fixed budget).
        self.adaptive = adaptive_budget
        if adaptive_budget is not None:
            self.assignment.set_cap(adaptive_budget.budget)
        # Least recently seen first, so expiry pops from the front.
        self._peers: OrderedDict[bytes, _Peer] = OrderedDict()
        # The same peers in a list with O(1) removal, to sample replies in O(k).
        # The same peers by zone, to sample replies in O(k), same zone first.
        self._zones: ZoneIndex[bytes] = ZoneIndex()
        self._avail = [0] * len(self._lengths)
        self._finished = 0
        self.bar_reporters = bar_reporters
        # Barred peer id -> when it was last heard from; forgotten once silent for
        # peer_ttl (a restarted process has a new id), so the set stays bounded.
        self._barred: OrderedDict[bytes, float] = OrderedDict()
        # accused -> live peers that reported it, and the reverse, so a leaving
        # reporter's reports go with it. Only live peers are accused or reporters:
        # both stay bounded by the swarm's size.
        self._reports: dict[bytes, set[bytes]] = {}
        self._reported_by: dict[bytes, set[bytes]] = {}
        # Live peers whose last reply gave them origin pieces: they share origin_rate.
        self._holding: set[bytes] = set()

    # -- read-only state ----------------------------------------------------

    @property
    def num_pieces(self) -> int:
        return len(self._lengths)

    @property
    def num_peers(self) -> int:
        return len(self._peers)

    def __contains__(self, peer: object) -> bool:
        return peer in self._peers

    def availability(self, piece: int) -> int:
        """Live peers that have verified ``piece``."""
        return self._avail[piece]

    def have(self, peer: bytes) -> Bitfield | None:
        """A copy of ``peer``'s have-set, or None if it is not in the swarm."""
        known = self._peers.get(peer)
        return None if known is None else known.have.copy()

    @property
    def barred(self) -> frozenset[bytes]:
        """Peers out of the swarm for good: several peers caught them sending corrupt data."""
        return frozenset(self._barred)

    def reports(self) -> dict[bytes, frozenset[bytes]]:
        """Live peers reported for corrupt data, with the live peers that reported them."""
        return {accused: frozenset(by) for accused, by in self._reports.items()}

    @property
    def swarm_complete(self) -> bool:
        """At least one peer, and every peer has finished."""
        return bool(self._peers) and self._finished == len(self._peers)

    # -- announces ----------------------------------------------------------

    def announce(
        self,
        peer: bytes,
        addr: tuple[str, int],
        have: Bitfield | Iterable[int] | None,
        progress: Mapping[int, int],
        now: float,
        zone: str = NO_ZONE,
        seeder: bool = True,
        throttles: int = 0,
        retry_after: float | None = None,
        waiting: Iterable[int] = (),
    ) -> AnnounceReply:
        """Record an announce from ``peer`` and answer it.

        ``zone`` is the zone or rack the peer declared (see :mod:`tracker.zones`):
        its reply's peer sample favours that zone. A peer that is not a ``seeder``
        (no origin credentials) is never assigned origin pieces; it is served by the
        peers that are.

        ``have`` is either a :class:`Bitfield` of every piece the peer has
        verified (it replaces what was known), an iterable of pieces verified
        since the last announce (added to what was known), or None (no change).
        ``progress`` maps each piece the peer is pulling from the origin to the
        bytes it has so far; ``throttles`` counts the origin's throttled answers
        (429, 503, SlowDown) the peer saw since its last announce and
        ``retry_after`` is the longest Retry-After among them: the adaptive origin
        budget (:mod:`tracker.origin_budget`) backs off on them; ``waiting`` lists
        the peer's pulls that only wait out a throttled answer, which the tracker
        takes back while it is over a lowered budget. Raises BadAnnounceError for invalid input, before
        changing anything. A barred peer is not registered and gets an empty reply.
        """
        host, port, have = self._check(peer, addr, have, progress)
        if peer in self._barred:
            self._barred[peer] = now
            self._barred.move_to_end(peer)
            self.expire(now)
            return AnnounceReply((), (), self.swarm_complete, len(self._peers))
        known = self._peers.get(peer)
        if known is None:
            known = self._peers[peer] = _Peer(
                PeerAddress(peer, host, port, zone), self.num_pieces, now, seeder=seeder
            )
            self._zones.add(peer, zone)
            if known.finished:
                self._finished += 1
            if seeder:
                self.assignment.peer_joined(peer, now)
        else:
            known.last_seen = now
            if known.host != host or known.port != port or known.zone != zone:
                if known.zone != zone:
                    self._zones.add(peer, zone)
                known.address = PeerAddress(peer, host, port, zone)
            self._peers.move_to_end(peer)
        self.expire(now)  # others only: this peer was just seen

        if isinstance(have, Bitfield):
            self._replace_have(known, have, now)
        elif have is not None:
            for piece in have:
                self._add_piece(known, piece, now)
        adopting = now < self.assign_after
        for piece, bytes_done in progress.items():
            if piece in known.have:
                continue
            if not adopting and not self.assignment.pulling(peer, piece):
                # Outside the restart grace window the tracker's assignments are
                # whole: a pull it did not hand out is not one to protect, and
                # adopting it would let any peer take pieces from their seeders.
                continue
            self.assignment.progress(peer, piece, bytes_done, now)
        for piece in self.assignment.copies_of(peer):
            # Its copies, as the last reply gave them. A peer reports each pull it
            # finished in its next announce's progress: a copy it has and reported
            # is done; one it has from peers, or is not pulling, it declined.
            reported = piece in progress or self.assignment.copy_reported(peer, piece)
            if piece in known.have and reported:
                self.assignment.copy_done(peer, piece)
            elif piece in known.have or piece not in progress:
                self.assignment.drop_copy(peer, piece)
        if throttles and self.adaptive is not None and self.assignment.assignments(peer):
            # Only a peer pulling for the swarm speaks for the origin: one that holds no
            # pull (or may not read the origin) can't make the cluster back off.
            self.adaptive.throttled(throttles, retry_after)

        self.tick(now, announcer=peer)
        if self.adaptive is not None and self.adaptive.shedding:
            # The origin throttles and the budget went down: this peer's pulls that
            # only wait out a throttled answer go back (its reply lists every piece
            # it keeps, and it cancels the rest).
            self.assignment.shed(peer, waiting)
        if seeder and not known.finished and self.assignment.copy_room(peer, now):
            self._assign_copies(peer, known.have, now)
        assigned = tuple(self.assignment.assignments(peer))
        if assigned:
            self._holding.add(peer)
        else:
            self._holding.discard(peer)
        return AnnounceReply(
            assigned=assigned,
            peers=self._sample_peers(peer),
            swarm_complete=self.swarm_complete,
            num_peers=len(self._peers),
            origin_rate=self.origin_share(),
        )

    def _assign_copies(self, peer: bytes, have: Bitfield, now: float) -> None:
        """Extra origin copies for ``peer`` while the assignment has room for them:
        the pieces it lacks, rarest in the swarm first (random among equals)."""
        rng, avail = self._rng, self._avail
        lacking = [
            (avail[piece], rng.random(), piece)
            for piece in range(self.num_pieces)
            if piece not in have
        ]
        heapq.heapify(lacking)  # popped as far as needed: a few pieces, not all sorted

        def rarest() -> Iterator[int]:
            while lacking:
                yield heapq.heappop(lacking)[2]

        candidates = rarest()
        while self.assignment.assign_copy(peer, now, candidates) is not None:
            pass

    @property
    def origin_holders(self) -> int:
        """Live peers whose last reply gave them origin pieces."""
        return len(self._holding)

    def origin_share(self) -> int:
        """Each origin holder's share of ``origin_rate`` in bytes/s (0: uncapped)."""
        if not self.origin_rate:
            return 0
        return max(1, self.origin_rate // max(1, len(self._holding)))

    def _check(
        self,
        peer: bytes,
        addr: tuple[str, int],
        have: Bitfield | Iterable[int] | None,
        progress: Mapping[int, int],
    ) -> tuple[str, int, Bitfield | list[int] | None]:
        if not isinstance(peer, bytes) or len(peer) != PEER_ID_LENGTH:
            raise BadAnnounceError(f"peer id must be {PEER_ID_LENGTH} bytes, got {peer!r}")
        try:
            host, port = addr
        except (TypeError, ValueError) as exc:
            raise BadAnnounceError(f"address must be (host, port), got {addr!r}") from exc
        if not isinstance(host, str) or not valid_host(host):
            raise BadAnnounceError(
                f"address host must be an IP address or DNS name, got {str(host)[:80]!r}"
            )
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 0xFFFF:
            raise BadAnnounceError(f"address port must be in 1..65535, got {port!r}")
        if isinstance(have, Bitfield):
            if len(have) != self.num_pieces:
                raise BadAnnounceError(
                    f"have bitfield covers {len(have)} pieces, the artifact has {self.num_pieces}"
                )
        elif have is not None:
            have = list(have)  # it may be a one-shot iterator
            for piece in have:
                self._check_piece("have", piece)
        for piece, bytes_done in progress.items():
            self._check_piece("progress", piece)
            length = self._lengths[piece]
            if (
                not isinstance(bytes_done, int)
                or isinstance(bytes_done, bool)
                or not 0 <= bytes_done <= length
            ):
                raise BadAnnounceError(
                    f"progress for piece {piece} is {bytes_done!r} bytes, the piece has {length}"
                )
        return host, port, have

    def _check_piece(self, field: str, piece: object) -> None:
        if not isinstance(piece, int) or isinstance(piece, bool):
            raise BadAnnounceError(f"{field} names piece {piece!r}, not an integer")
        if not 0 <= piece < self.num_pieces:
            raise BadAnnounceError(
                f"{field} names piece {piece}, the artifact has {self.num_pieces} pieces"
            )

    def _count_in(self, piece: int, now: float) -> None:
        self._avail[piece] += 1
        if self._avail[piece] == 1:  # held by one at least: present from now on
            self.assignment.piece_present(piece, now)

    def _count_out(self, piece: int) -> None:
        self._avail[piece] -= 1
        if self._avail[piece] == 0:
            self.assignment.piece_lost(piece)

    def _add_piece(self, known: _Peer, piece: int, now: float) -> None:
        if known.have.add(piece):
            if not known.suspect:
                self._count_in(piece, now)
            if known.have.complete:
                known.finished = True
                self._finished += 1

    def _drop_piece(self, known: _Peer, piece: int) -> None:
        if known.have.discard(piece):
            if known.finished:
                known.finished = False
                self._finished -= 1
            if not known.suspect:
                self._count_out(piece)

    def _replace_have(self, known: _Peer, have: Bitfield, now: float) -> None:
        """The peer's whole have-set, replacing what was known: the counts of the pieces
        gained and lost move in one pass (a peer joining with 2000 of 4000 pieces cost
        2000 bitfield updates one at a time: 4 ms, most of a 5000-peer join storm)."""
        old_bytes, new_bytes = known.have.to_bytes(), have.to_bytes()
        if old_bytes == new_bytes:
            return
        old = int.from_bytes(old_bytes, "big")
        new = int.from_bytes(new_bytes, "big")
        changed = old ^ new
        n, nbytes = self.num_pieces, len(new_bytes)
        gained = Bitfield.from_bytes((changed & new).to_bytes(nbytes, "big"), n)
        lost = Bitfield.from_bytes((changed & old).to_bytes(nbytes, "big"), n)
        known.have = Bitfield.from_bytes(new_bytes, n)
        finished = known.have.complete
        if finished != known.finished:
            self._finished += 1 if finished else -1
            known.finished = finished
        if known.suspect:
            return  # its pieces don't count
        for piece in gained:
            self._count_in(piece, now)
        for piece in lost:
            self._count_out(piece)

    def _sample_peers(self, peer: bytes) -> tuple[PeerAddress, ...]:
        picks = self._zones.sample(
            self._peers[peer].zone, self.max_peers_in_reply, self._rng, exclude=peer
        )
        peers = self._peers
        return tuple([peers[p].address for p in picks])

    def report(self, reporter: bytes, accused: bytes, now: float) -> bool:
        """``reporter`` received data from ``accused`` that failed verification.

        Counted only between two live peers, neither barred (a reporter repeats its
        reports in every announce, so one against a peer not here yet counts when it
        comes). Once ``bar_reporters`` distinct peers reported it, ``accused`` is
        barred and leaves the swarm (see the module docstring). Returns True if
        this report barred it.
        """
        if (
            reporter == accused
            or reporter not in self._peers
            or accused not in self._peers
            or reporter in self._barred
        ):
            return False
        by = self._reports.setdefault(accused, set())
        if reporter in by:
            return False
        by.add(reporter)
        self._reported_by.setdefault(reporter, set()).add(accused)
        # Independent means on different nodes: a faulty node that restarts its fetch
        # (a new peer id), or an agent and a fetch on one node, count once.
        hosts = {self._peers[r].host for r in by}
        if len(hosts) < self.bar_reporters:
            self._set_suspect(accused, True, now)
            return False
        self._barred[accused] = now
        # Pieces only it held go back to the origin pool: otherwise they would count
        # as present, never be assigned again, and the swarm would wait for them.
        self.leave(accused, now)
        return True

    # -- departures and periodic work ---------------------------------------

    def leave(self, peer: bytes, now: float) -> bool:
        """``peer`` said goodbye (or is known dead): forget it, reassign its pulls.

        Pieces only it had go back to the origin pool. Returns False if unknown.
        """
        known = self._peers.pop(peer, None)
        if known is None:
            return False
        self._zones.remove(peer)
        if known.finished:
            self._finished -= 1
        self._holding.discard(peer)
        for reporter in self._reports.pop(peer, ()):
            self._reported_by[reporter].discard(peer)
        for accused in self._reported_by.pop(peer, ()):
            by = self._reports[accused]
            by.discard(peer)
            if not by:
                del self._reports[accused]
                self._set_suspect(accused, False, now)
        self.assignment.peer_left(peer, now)
        if not known.suspect:
            for piece in known.have:
                self._count_out(piece)
        return True

    def _set_suspect(self, peer: bytes, suspect: bool, now: float) -> None:
        """A reported peer's pieces stop counting as present, and it pulls nothing
        from the origin, until its reporters are gone (or it is barred).

        Without this, in a swarm where only one honest peer could report it, a peer
        serving corrupt data would be barred by nobody, and the pieces only it holds
        would count as present, never be assigned to a seeder, and keep the honest
        peer waiting forever. The cost of a wrong report (a faulty reporter) is a
        re-pull from the origin of the pieces only the accused holds, never a bar.
        """
        known = self._peers.get(peer)
        if known is None or known.suspect == suspect:
            return
        known.suspect = suspect
        if suspect:
            self._holding.discard(peer)
            self.assignment.peer_left(peer, now)
            for piece in known.have:
                self._count_out(piece)
        else:
            if known.seeder:
                self.assignment.peer_joined(peer, now)
            for piece in known.have:
                self._count_in(piece, now)

    def expire(self, now: float) -> list[bytes]:
        """Peers not heard from for ``peer_ttl`` seconds leave. Returns their ids."""
        expired: list[bytes] = []
        while self._barred and now - next(iter(self._barred.values())) >= self.peer_ttl:
            self._barred.popitem(last=False)
        while self._peers:
            peer, known = next(iter(self._peers.items()))
            if now - known.last_seen < self.peer_ttl:
                break
            self.leave(peer, now)
            expired.append(peer)
        return expired

    def tick(self, now: float, announcer: bytes | None = None) -> list[tuple[bytes, int]]:
        """Take back stalled origin pieces and fill free origin slots (``announcer``:
        only its slots, as its announce is answered; see ``SeederAssignment.assign``).

        Returns the (peer, piece) pairs taken back for stalling.
        """
        # Stalls are looked for at most every TICK_EVERY seconds, and only while pieces
        # are being pulled: the scan walks every seeder, and ran on every announce
        # (5000 peers: the largest cost of an announce after the have-sets).
        stalled: list[tuple[bytes, int]] = []
        busy = self.assignment.in_flight or self.assignment.copies_in_flight
        if busy and now - self._ticked >= TICK_EVERY:
            self._ticked = now
            stalled = self.assignment.tick(now)
        adaptive = self.adaptive
        if adaptive is not None:
            assignment = self.assignment
            cap = adaptive.update(now, assignment.origin_bytes, assignment.budget_bound)
            assignment.set_cap(cap)
        if now >= self.assign_after:
            self.assignment.assign(now, only=announcer)
        return stalled

    # -- status -------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """A JSON-able summary for the status page and ``--json`` output."""
        avail = self._avail
        stats = self.assignment.stats
        present = sum(1 for piece in range(self.num_pieces) if self.assignment.is_present(piece))
        return {
            "pieces": self.num_pieces,
            "peers": len(self._peers),
            "finished_peers": self._finished,
            "swarm_complete": self.swarm_complete,
            "present_pieces": present,
            "barred": sorted(p.hex() for p in self._barred),
            "reports": {
                accused.hex(): sorted(p.hex() for p in by)
                for accused, by in sorted(self._reports.items())
            },
            "availability": {
                "min": min(avail, default=0),
                "max": max(avail, default=0),
                "mean": sum(avail) / len(avail) if avail else 0.0,
                "missing": sum(1 for a in avail if a == 0),
            },
            "origin": {
                "budget": self.assignment.budget,
                "adaptive": None
                if self.adaptive is None
                else {
                    "budget": self.adaptive.budget,
                    "good": self.adaptive.good,
                    "limit": self.adaptive.limit,
                    "ceiling": self.adaptive.ceiling,
                    "throttles_seen": self.adaptive.throttles_seen,
                    "backoffs": self.adaptive.backoffs,
                    "last_rounds": [
                        {
                            "at": r.at,
                            "rate": r.rate,
                            "throttles": r.throttles,
                            "budget": r.budget,
                            "why": r.why,
                        }
                        for r in self.adaptive.rounds[-8:]
                    ],
                },
                "in_flight": self.assignment.in_flight,
                "unassigned": self.assignment.unassigned,
                "assigned_total": stats.assigned,
                "reassigned": stats.reassigned,
                "stalled": stats.stalled,
                "lost": stats.lost,
                "copies_allowed": self.assignment.origin_copies,
                "copies": stats.copies,
                "copies_in_flight": self.assignment.copies_in_flight,
                "copy_bytes": stats.copy_bytes,
                "rate_cap": self.origin_rate,
                "holders": len(self._holding),
                "rate_share": self.origin_share(),
            },
            "peer_list": [
                {
                    "peer_id": peer.hex(),
                    "host": known.host,
                    "port": known.port,
                    "have": known.have.count(),
                    "finished": known.finished,
                    "last_seen": known.last_seen,
                    "assigned": self.assignment.assignments(peer),
                    "pulled": stats.pulled.get(peer, 0),
                }
                for peer, known in self._peers.items()
            ],
        }
