"""Upload policy: which requesting peer is served next.

BitTorrent chokes most peers and unchokes the few that upload to it fastest
(tit-for-tat), with one "optimistic" unchoke to discover new partners. That
machinery exists to punish free riders on the open internet. A swarm here is
one trusted cluster: every node wants every other node to finish, and none of
them is a free rider, so choking would only leave upload capacity idle and slow
the nodes that happen to have nothing to offer yet (the ones that just joined,
and need data most).

So nobody is choked: every peer that sends a request is served. What remains to
decide is order. A node has a fixed number of upload slots (``max_active``
concurrent block sends, enough to fill its link without thrashing the disk),
granted one block per turn from a FIFO queue of pending requests per peer: a
peer that pipelines 64 requests cannot starve one that sent 2. A peer holds at
most ``max_per_peer`` slots at a time: a connection's sends go out one after
another anyway, and a peer that asks for much and then stops reading would
otherwise hold every slot while the peers it should serve wait.

Which waiting peer gets a free slot: with ``progress`` (how much a peer holds:
the KiB of checked data its latest Request said, ``Request.held``, blocks of
pieces not yet whole included), the one **furthest behind**; ties, and every
grant without ``progress``, go round-robin. A burst
ends when its last node finishes, and a node that is behind has the most to
fetch and, holding little, the least to trade; serving it first evens the
nodes out so that they finish together instead of a tail finishing alone on a
few uplinks. Measured with the simulator (``swarm simulate fireworks-kimi
--variant n100-o100``, 100 nodes, the origin at the fabric's speed), round-robin
finished at p50/max 1.20/1.41 x T_min, least-progress-first at 1.20/1.20.
Rarest-first picking (the requester's side) still decides *what* moves; this
decides *to whom* first, and the two don't fight: a piece that is rare is
requested by the nodes that lack it, which are the ones behind.

Least progress first is not strict: the peer at the head of the line is
granted after it lost ``MAX_PASSED`` grants in a row to peers further behind.
A seeder that pulled two pieces from the origin is "ahead" of every node that
has none yet, and strict order left it unserved by every neighbour until they
all caught up: it took its first block from a peer at 1.6 s where the others
did at 0.7 s, and finished last. Measured with the glue simulator
(``swarm simulate dragonfly-1200 --nodes 300``, cut-through, 16 slots; and
``fireworks-kimi --variant n100-o100``), max / T_min: strict 1.25 and 1.034,
MAX_PASSED 4: 1.16 and 1.039, 2: 1.16 and 1.044; round-robin (progress
bucketed to nothing) 1.17 and 1.07.

Progress counts checked data, not whole pieces (protocol 4; 3 sent a piece
count). In the first second of a burst nobody holds a whole piece of 16 or 256
MiB, so every requester was "furthest behind" at once and the order was
round-robin just when it decides who falls behind for good: a node's finish is
about F/d plus the downlink time it lost at the start. Measured with the glue
simulator (``swarm simulate kraken-2600`` and ``dragonfly-1200 --native``),
max / T_min went 1.111 -> 1.092 and 1.161 -> 1.141 (p99 1.08 -> 1.08 and
1.139 -> 1.124).

The cost is trust in a number the requester sends: a peer that claims to hold
nothing is served first, up to ``max_per_peer`` slots of every node it asks.
Inside one cluster of peers that share a key (the README's security model) that
is a fairness bug in a misbehaving peer, not a way in; it can't take more than
its ``max_per_peer`` share of any node.

Which of a peer's requests goes first: with ``copies`` (how many copies of a
requested block we know are out there: the connected peers that hold its
piece, plus the times we have sent the block), the one of its first
``LOOKAHEAD`` pending requests with the fewest, arrival order among equals. A
block we alone hold, sent once, can be fetched from whoever took it; sent
seven times, it used our uplink seven times for what one send and six relays
between the receivers would have done. That is what a slow node's uplink
does in a mixed fleet: the pieces it pulled from the origin are rarest, every
fast node queues the same blocks at it, and FIFO serving sent each block to
each of them in turn while the fast nodes' own uplinks idled. Measured with
``swarm-session`` on 8 nodes at 400 Mbit/s, two of them at 100, origin
1 Gbit/s, 512 MiB in 4 MiB pieces (the shaped ``mixed-links`` run), worst
fast node ÷ its own bound over seeds 1-8: FIFO 1.19 (1 MiB blocks, cut-through)
and 1.66 (4 MiB blocks); fewest copies first 1.07 and 1.15. Ordering whole
peers by copies instead (their first request only) changed nothing. The
window must cover what a peer keeps in flight: at 12 requests per connection
(``swarm.session.requests_in_flight`` of 1 MiB blocks) a window of 4 left seed 4's
worst node at 1.32 x its own bound, a window of 12 at 1.05 (and at 6 requests
the two windows gave the same runs). A request passed over ``MAX_SKIPS`` times in a row
is sent next, so none waits behind a stream of fresher ones until its
requester times it out.

The order is the wire's order only while the kernel does not queue far ahead of
it: each peer connection holds at most a quarter block unsent
(:func:`swarm.peer.tune_socket`); with 8 MiB send buffers, blocks went out ~0.8 s
after they were granted, in the order TCP's flows shared the uplink.

The scheduler is pure bookkeeping: the engine calls :meth:`UploadScheduler.enqueue`
for each Request, :meth:`~UploadScheduler.next` whenever a slot may be free, and
:meth:`~UploadScheduler.done` when a send finishes.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["LOOKAHEAD", "MAX_PASSED", "MAX_SKIPS", "UploadScheduler"]

PeerT = TypeVar("PeerT", bound=Hashable)
RequestT = TypeVar("RequestT", bound=Hashable)

LOOKAHEAD = 12
"""With ``copies``: how many of a peer's pending requests (from its oldest) are weighed."""
MAX_SKIPS = 16
"""With ``copies``: grants in a row a peer's oldest request may be passed over."""
MAX_PASSED = 4
"""With ``progress``: grants in a row the peer at the head of the line may lose to
peers further behind before it is served (see the module docstring)."""


class _Queue(Generic[PeerT, RequestT]):
    """One peer's pending requests, in arrival order.

    A plain list: a peer keeps a few requests pending (its pipeline, at most
    ``max_queue``), so the scan for a duplicate is shorter than hashing the
    request twice would be, and taking the first moves a few pointers.
    (Lists, not deques, because the compiled simulator runs this code and
    list operations compile to native calls; deque methods stay generic.)
    """

    __slots__ = ("active", "parked", "passed", "peer", "requests", "skips")

    def __init__(self, peer: PeerT) -> None:
        self.peer = peer
        self.requests: list[RequestT] = []
        self.active = 0  # slots it holds
        self.parked = False  # has requests, out of the ring while it holds max_per_peer
        self.skips = 0  # grants in a row that passed over its oldest request
        self.passed = 0  # grants in a row to a peer further behind, while it led the line


class UploadScheduler(Generic[PeerT, RequestT]):
    """Queue of upload requests with ``max_active`` send slots: the waiting peer
    with the least ``progress`` first, round-robin among equals; of its requests,
    the one with the fewest ``copies`` among its first ``LOOKAHEAD``.

    ``max_queue`` bounds the pending requests kept per peer; beyond it
    :meth:`enqueue` refuses (the engine answers with a Reject), so a misbehaving
    peer cannot grow our memory without bound.
    """

    def __init__(
        self,
        max_active: int,
        *,
        max_queue: int = 256,
        max_per_peer: int = 0,
        progress: Callable[[PeerT], int] | None = None,
        copies: Callable[[RequestT], int] | None = None,
    ) -> None:
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}")
        if max_per_peer < 0:
            raise ValueError(f"max_per_peer must be >= 0, got {max_per_peer}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_active = max_active
        self.max_queue = max_queue
        self.max_per_peer = max_per_peer or max_active  # 0: no limit of its own
        self.progress = progress
        self.copies = copies
        # Peer -> its queue of pending requests.
        self._queues: dict[PeerT, _Queue[PeerT, RequestT]] = {}
        # The queues that are not empty, in round-robin order (at most one per
        # connected peer, so a list's pop(0) is cheap).
        self._ring: list[_Queue[PeerT, RequestT]] = []
        # Sends in progress, in the order they were granted (at most
        # ``max_active``, so a scan beats any index).
        self._active_peers: list[PeerT] = []
        self._active_requests: list[RequestT] = []
        self._pending_count = 0

    @property
    def active(self) -> int:
        """Sends in progress."""
        return len(self._active_peers)

    @property
    def pending(self) -> int:
        """Requests waiting for a slot, over all peers."""
        return self._pending_count

    def queued(self, peer: PeerT) -> int:
        """Requests of ``peer`` waiting for a slot."""
        queue = self._queues.get(peer)
        return 0 if queue is None else len(queue.requests)

    def active_for(self, peer: PeerT) -> list[RequestT]:
        """Requests of ``peer`` being sent now."""
        return [
            request
            for other, request in zip(self._active_peers, self._active_requests, strict=True)
            if other == peer
        ]

    def enqueue(self, peer: PeerT, request: RequestT) -> bool:
        """Queue ``request`` from ``peer``.

        Returns False if ``peer`` already has ``max_queue`` requests pending (the
        engine should reject it). A request already pending is not queued twice.
        """
        queue = self._queues.get(peer)
        if queue is None:
            queue = self._queues[peer] = _Queue(peer)
        requests = queue.requests
        if request in requests:
            return True  # already pending: it keeps its place
        size = len(requests)
        if size >= self.max_queue:
            return False
        requests.append(request)
        self._pending_count += 1
        if not size and not queue.parked:
            if queue.active >= self.max_per_peer:
                queue.parked = True  # in line again when one of its sends is done
            else:
                self._ring.append(queue)
        return True

    def cancel(self, peer: PeerT, request: RequestT) -> bool:
        """Drop a pending request; False if it was not pending (maybe already sending)."""
        queue = self._queues.get(peer)
        if queue is None or request not in queue.requests:
            return False
        queue.requests.remove(request)
        self._pending_count -= 1
        if not queue.requests:
            if queue.parked:
                queue.parked = False
            else:
                self._ring.remove(queue)
        return True

    def next(self) -> tuple[PeerT, RequestT] | None:
        """Grant a slot: the next (peer, request) to send, or None if none can start.

        None means either every slot is busy or nothing is pending. Call it
        repeatedly until None to fill every free slot.
        """
        if len(self._active_peers) >= self.max_active or not self._ring:
            return None
        ring = self._ring
        progress = self.progress
        if progress is None or len(ring) == 1 or ring[0].passed >= MAX_PASSED:
            queue = ring.pop(0)
        else:
            best = 0
            least = progress(ring[0].peer)
            for i in range(1, len(ring)):
                held = progress(ring[i].peer)
                if held < least:
                    best = i
                    least = held
            if best:
                ring[0].passed += 1
            queue = ring.pop(best)
        queue.passed = 0
        requests = queue.requests
        request = requests.pop(self._choose(queue))
        self._pending_count -= 1
        queue.active += 1
        if requests:
            if queue.active >= self.max_per_peer:
                queue.parked = True  # back in line when one of its sends is done
            else:
                self._ring.append(queue)  # back of the line
        peer = queue.peer
        self._active_peers.append(peer)
        self._active_requests.append(request)
        return peer, request

    def _choose(self, queue: _Queue[PeerT, RequestT]) -> int:
        """Which of ``queue``'s requests to send: its index (see the module docstring)."""
        copies = self.copies
        requests = queue.requests
        if copies is None or len(requests) == 1 or queue.skips >= MAX_SKIPS:
            queue.skips = 0  # its oldest goes: nothing passed over it
            return 0
        best = 0
        fewest = copies(requests[0])
        for i in range(1, min(LOOKAHEAD, len(requests))):
            known = copies(requests[i])
            if known < fewest:
                best = i
                fewest = known
        queue.skips = queue.skips + 1 if best else 0
        return best

    def done(self, peer: PeerT, request: RequestT) -> None:
        """The send of ``request`` to ``peer`` finished (or failed): free its slot.

        Unknown pairs (e.g. after :meth:`peer_gone`) are ignored.
        """
        peers = self._active_peers
        requests = self._active_requests
        for i in range(len(peers)):
            # Identity first: compiled, == on arbitrary objects is a generic call.
            if (peers[i] is peer or peers[i] == peer) and (
                requests[i] is request or requests[i] == request
            ):
                del peers[i]
                del requests[i]
                queue = self._queues.get(peer)
                if queue is not None:
                    queue.active -= 1
                    if queue.parked:
                        queue.parked = False
                        self._ring.append(queue)
                return

    def peer_gone(self, peer: PeerT) -> list[RequestT]:
        """``peer`` disconnected: drop its queue and free its slots.

        Returns the requests that were being sent to it (the engine aborts them).
        """
        queue = self._queues.pop(peer, None)
        if queue is not None and queue.requests:
            self._pending_count -= len(queue.requests)
            if not queue.parked:
                self._ring.remove(queue)
        gone = self.active_for(peer)
        if gone:
            kept = [i for i, other in enumerate(self._active_peers) if other != peer]
            self._active_peers = [self._active_peers[i] for i in kept]
            self._active_requests = [self._active_requests[i] for i in kept]
        return gone
