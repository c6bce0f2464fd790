"""Which blocks to request from which peer: rarest first, finish what is started.

One :class:`PiecePicker` lives in each downloading peer (and in each simulated
peer). It knows the pieces every connected peer has, the pieces we have, the
pieces we are pulling from the origin ourselves, and every block request in
flight; the engine asks it what to request next from a given peer.

Why rarest first
    Every piece starts out on exactly one node (the seeder the tracker assigned
    it to). If peers fetched pieces in file order, they would all want the same
    few pieces at once and leave the rest on a single node, so the swarm's
    upload capacity would sit idle and, when that node left, the piece would
    need a second origin fetch. Fetching the piece the fewest neighbours hold
    spreads copies of every piece as fast as possible, keeps the swarm's piece
    diversity high (every peer soon has something every other peer wants) and
    means no piece becomes the bottleneck when early peers leave. Ties are broken
    at random so that peers seeing the same availability don't all choose the
    same piece.

Why finish what is started
    A piece is verified (blake3) and can be served onwards only once all of its
    blocks are in. Before starting a new piece, a peer is asked for the open
    blocks of pieces already in progress, so a piece is fetched from several
    peers at once and completes quickly instead of many pieces being half done.

Why remote peers come last
    A peer in another zone (rack, availability zone) is reached over an
    oversubscribed uplink, or one billed per byte. The engine adds such a peer
    with ``remote=True``, and the picker asks it only for pieces that no
    same-zone connection has: a piece enters the zone once, over one uplink,
    and then spreads inside it. Counting holders per zone costs one more count
    per piece, kept only when a remote peer announces it, so a picker with no
    remote peers does exactly what it did without zones. Endgame duplicates may
    still go to a remote peer: they go only to idle peers, only at the very end.

Why endgame
    At the very end every missing block is already requested, and one slow peer
    holding the last request would delay the whole download. Then a block may be
    requested from up to ``endgame_duplicates`` peers; the first copy to arrive
    wins and :meth:`PiecePicker.block_received` returns the other requests so
    the engine can cancel them.

Cost
    Pieces not yet started are kept in buckets by availability, each bucket in
    random order (a piece is inserted at a random position). A pick looks at
    the rarest buckets starting from a random position and stops at the first
    piece the peer has; if that scan grows longer than the peer's own piece
    count, it switches to scanning the peer's pieces instead. Availability
    changes move a piece between buckets in O(1). The buckets are one flat
    array of machine ints (``librt.vecs``), so the compiled simulator touches a
    few cache lines per HAVE, not a list of boxed ints. Block bookkeeping exists only
    for pieces in progress. Nothing here depends on the clock or on global
    randomness; the ``random.Random`` is passed in.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Final, Generic, NamedTuple, TypeVar

from librt.vecs import append, vec
from mypy_extensions import i32, i64, u8

from core.bitfield import Bitfield

__all__ = ["BlockRequest", "PiecePicker"]

PeerT = TypeVar("PeerT", bound=Hashable)

_OPEN: Final[u8] = 0
_REQUESTED: Final[u8] = 1
_RECEIVED: Final[u8] = 2


class BlockRequest(NamedTuple):
    """A block: ``length`` bytes of ``piece`` starting at ``offset``."""

    piece: int
    offset: int
    length: int


class _Partial(Generic[PeerT]):
    """Block states of one piece in progress."""

    __slots__ = ("next_open", "open", "received", "requesters", "state")

    def __init__(self, num_blocks: int) -> None:
        self.state = vec[u8](bytes(num_blocks))  # all _OPEN
        # Block index -> peers it is requested from (only for REQUESTED blocks).
        self.requesters: dict[int, list[PeerT]] = {}
        self.open = num_blocks
        self.received = 0
        self.next_open = 0  # no block below this index is open


class PiecePicker(Generic[PeerT]):
    """Rarest-first block picker for one downloading peer.

    ``piece_lengths[i]`` is the length of piece ``i``; pieces are split into
    blocks of ``block_size`` bytes (the last block of a piece may be shorter).
    Peers are any hashable ids (the engine's connections; the simulator's node
    records).

    The engine keeps the record of which pieces each peer has (a
    :class:`Bitfield` per peer) and hands it to the picker, which reads it
    but keeps no copy: one record per peer, not two to keep in step, and an
    announced piece costs the picker one count. (libtorrent's picker is told
    the same way.)

    The engine's calls, in order of a piece's life:

    * ``add_peer(peer, bitfield, remote)`` / ``peer_has(peer, piece)`` /
      ``remove_peer(peer)`` as peers connect, announce and leave (``remote``:
      the peer is in another zone);
    * ``pick(peer, n)`` to fill ``peer``'s request pipeline;
    * ``block_received(peer, block)`` (cancel the duplicates it returns) or
      ``block_failed(peer, block)`` (rejected, timed out);
    * ``piece_complete(piece)`` tells when to verify; then ``mark_have(piece)`` or
      ``piece_failed(piece)``.

    Pieces we pull from the origin as the assigned seeder are ``reserve``\\ d and
    never requested from peers until ``release``\\ d or marked had.
    """

    def __init__(
        self,
        piece_lengths: Sequence[int],
        block_size: int,
        rng: random.Random,
        endgame_duplicates: int = 2,
        spread: bool = False,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if endgame_duplicates < 1:
            raise ValueError(f"endgame_duplicates must be >= 1, got {endgame_duplicates}")
        for index, length in enumerate(piece_lengths):
            if length < 1:
                raise ValueError(f"piece {index} has length {length}; pieces must be >= 1 byte")
        self._lengths = list(piece_lengths)
        self._block_size = block_size
        self._rng = rng
        # Bound once: compiled, rng.random() looks the method up on every call.
        self._random: Callable[[], float] = rng.random
        self._endgame_duplicates = endgame_duplicates
        # Blocks of a piece are asked from a random one on (see _take_spread), not
        # lowest first: for cut-through, where blocks move before their piece is whole.
        self._spread = spread
        num_pieces = len(self._lengths)

        self._have = Bitfield(num_pieces)
        self._reserved: set[int] = set()
        self._avail = vec[i32]([0] * num_pieces)
        self._peers: dict[PeerT, Bitfield] = {}
        # Peers in another zone, and per piece how many of them hold it (kept,
        # like _avail, for the pieces we lack): _avail - _remote_avail is the
        # piece's same-zone availability.
        self._remote: set[PeerT] = set()
        self._remote_avail = vec[i32]([0] * num_pieces)

        # Pieces not had, not reserved and not started ("bucketed"), sorted by
        # availability in one array: _order[_bounds[k]:_bounds[k + 1]] is the
        # bucket of availability k (in random order), and _order[_bounds[-1]:]
        # holds the pieces that are not bucketed. _pos[piece] is the piece's
        # index in _order. (libtorrent's piece picker keeps the same layout.)
        self._order = vec[i32](range(num_pieces))
        self._pos = vec[i32](range(num_pieces))
        self._bounds = vec[i32]([0, num_pieces])

        # Pieces in progress (insertion order = start order), and those of them
        # with at least one open block. A piece's requesters are the one record
        # of which peer each block is requested from: a request costs no
        # per-peer bookkeeping, and a peer's requests are found (rarely: when it
        # leaves, in endgame) by walking the pieces in progress.
        self._partials: dict[int, _Partial[PeerT]] = {}
        self._open_partials: dict[int, None] = {}

        # Peers whose last pick found nothing, with the epoch it found nothing
        # at. The epoch moves whenever a block or piece may have become
        # available to peers that had nothing to offer (a block re-opened, a
        # piece back among the unstarted, a change of which pieces remote
        # peers may serve); a peer's own new piece drops its entry if the piece
        # is one we could ask for. (Starting a piece needs no move: an idle
        # peer holds no unstarted piece it may be asked for, so it holds none
        # of the blocks a start opens.)
        # An engine asks every connection after each verified piece and each
        # HAVE: measured in the simulator (1000 nodes, ~39 connections each),
        # 71 picks per node and piece, nearly all of them empty scans.
        self._epoch = 0
        self._idle: dict[PeerT, int] = {}

        # Cut-through offers: peer -> {piece: the blocks of it the peer serves},
        # for pieces it holds part of (see offer_blocks). A piece is dropped from
        # a peer's offers when the peer announces it whole, when we have it, and
        # with the peer.
        self._offers: dict[PeerT, dict[int, Bitfield]] = {}

    # -- read-only state ------------------------------------------------------

    @property
    def num_pieces(self) -> int:
        return len(self._lengths)

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def have(self) -> Bitfield:
        """A copy of the pieces we have verified."""
        return self._have.copy()

    def has(self, piece: int) -> bool:
        """True if we have verified ``piece`` (no copy of the bitfield made)."""
        return piece in self._have

    @property
    def missing_count(self) -> int:
        """Pieces we have not verified yet (including reserved and in-progress ones)."""
        return self.num_pieces - self._have.count()

    @property
    def done(self) -> bool:
        return self._have.complete

    @property
    def in_endgame(self) -> bool:
        """True when every block of every missing, unreserved piece is requested or in."""
        return not self.done and self._unstarted() == 0 and not self._open_partials

    def availability(self, piece: int) -> int:
        """How many connected peers have ``piece`` (kept for the pieces we lack)."""
        return int(self._avail[piece])

    def is_reserved(self, piece: int) -> bool:
        return piece in self._reserved

    def in_progress(self) -> list[int]:
        """Pieces with block requests out or blocks received, oldest first."""
        return list(self._partials)

    def outstanding(self, peer: PeerT) -> list[BlockRequest]:
        """Requests in flight to ``peer``."""
        return sorted(self._requested_from(peer))

    def _requested_from(self, peer: PeerT) -> list[BlockRequest]:
        return [
            self._block(piece, index)
            for piece, partial in self._partials.items()
            for index, peers in partial.requesters.items()
            if peer in peers
        ]

    def blocks(self, piece: int) -> list[BlockRequest]:
        """Every block of ``piece``, in order."""
        length = self._lengths[piece]
        size = self._block_size
        return [
            BlockRequest(piece, offset, min(size, length - offset))
            for offset in range(0, length, size)
        ]

    # -- buckets --------------------------------------------------------------
    #
    # Moving a piece one level up or down swaps it with the last (or first)
    # piece of its bucket and shifts the boundary between the two buckets by
    # one: O(1), and all in flat arrays of machine ints (which the compiled
    # simulator, ``swarm simulate --native``, reads without boxing). Taking a
    # piece out of the buckets, or putting one back, walks it across the levels
    # above its own: O(number of levels), which is at most the number of peers.

    def _unstarted(self) -> i64:
        """How many pieces are bucketed: they fill ``_order`` up to this index."""
        return i64(self._bounds[len(self._bounds) - 1])

    def _bucketed(self, piece: int) -> bool:
        """True if ``piece`` is not had, not reserved and not started."""
        return i64(self._pos[piece]) < self._unstarted()

    def _swap(self, i: i64, j: i64) -> None:
        """Swap the pieces at positions ``i`` and ``j`` of the order."""
        order = self._order
        pos = self._pos
        a = order[i]
        b = order[j]
        order[i] = b
        order[j] = a
        pos[i64(b)] = i32(i)
        pos[i64(a)] = i32(j)

    def _shuffle_in(self, at: i64, lo: i64, hi: i64) -> None:
        """The piece at ``at`` just joined the bucket ``[lo, hi)``: swap it to a random place.

        (Inside-out Fisher-Yates, so a bucket stays shuffled even though pieces
        arrive grouped by the peer that has them, and a scan from a random
        start meets any peer's pieces early. ``random()`` rather than
        ``randrange()``: this runs on every HAVE, and the bias of flooring a
        double is nil at bucket sizes.)
        """
        size = hi - lo
        if size > 1:
            other = lo + i64(int(self._random() * float(size)))
            if other != at:
                self._swap(at, other)

    def _raise(self, piece: int) -> None:
        """A bucketed piece's availability went up by one: move it to the next bucket."""
        start = self._bounds
        level = i64(self._avail[piece])
        if level + 2 >= len(start):
            start = self._bounds = append(start, start[len(start) - 1])
        last = i64(start[level + 1]) - 1
        self._swap(i64(self._pos[piece]), last)
        start[level + 1] = i32(last)
        self._shuffle_in(last, last, i64(start[level + 2]))

    def _lower(self, piece: int) -> None:
        """A bucketed piece's availability went down by one: move it to the previous bucket."""
        start = self._bounds
        level = i64(self._avail[piece])
        first = i64(start[level])
        self._swap(i64(self._pos[piece]), first)
        start[level] = i32(first + 1)
        self._shuffle_in(first, i64(start[level - 1]), first + 1)

    def _unbucket(self, piece: int) -> None:
        """Take a bucketed piece out: walk it up across the levels above its own."""
        start = self._bounds
        for level in range(i64(self._avail[piece]), len(start) - 1):
            last = i64(start[level + 1]) - 1
            self._swap(i64(self._pos[piece]), last)
            start[level + 1] = i32(last)

    def _rebucket(self, piece: int) -> None:
        """Put a piece that is not bucketed back into the bucket of its availability."""
        level = i64(self._avail[piece])
        start = self._bounds
        while level + 2 > len(start):
            start = self._bounds = append(start, start[len(start) - 1])
        top = len(start) - 1
        end = i64(start[top])
        self._swap(i64(self._pos[piece]), end)
        start[top] = i32(end + 1)
        # Now the last piece of the top bucket; walk it down to its own.
        for upper in range(top - 1, level, -1):
            first = i64(start[upper])
            self._swap(i64(self._pos[piece]), first)
            start[upper] = i32(first + 1)
        self._shuffle_in(i64(self._pos[piece]), i64(start[level]), i64(start[level + 1]))
        self._epoch += 1

    def _set_avail(self, piece: int, delta: int) -> None:
        """One more (``delta`` = 1) or one fewer (-1) connected peer has ``piece``."""
        if self._bucketed(piece):
            if delta > 0:
                self._raise(piece)
            else:
                self._lower(piece)
        self._avail[piece] += i32(delta)

    def _unbucket_if_needed(self, piece: int) -> None:
        if self._bucketed(piece):
            self._unbucket(piece)

    def _rebucket_if_free(self, piece: int) -> None:
        if (
            not self._bucketed(piece)
            and piece not in self._have
            and piece not in self._reserved
            and piece not in self._partials
        ):
            self._rebucket(piece)

    # -- peers ----------------------------------------------------------------

    def add_peer(self, peer: PeerT, bitfield: Bitfield, remote: bool = False) -> None:
        """``peer`` connected; ``bitfield`` is the engine's record of its pieces.

        The picker reads the record from now on. The engine only ever adds to
        it, and calls :meth:`peer_has` for each piece it adds. Adding a known
        peer again merges ``bitfield`` into the record already given (and keeps
        the ``remote`` flag it was first added with).

        ``remote``: the peer is in another zone than ours; it is asked only for
        pieces no same-zone peer has (see the module docstring).
        """
        if len(bitfield) != self.num_pieces:
            raise ValueError(
                f"bitfield of {len(bitfield)} pieces for an artifact of {self.num_pieces}"
            )
        known = self._peers.get(peer)
        if peer in self._idle:
            del self._idle[peer]
        if remote:
            self._epoch += 1  # more remote holders: other remote peers may serve more
        if known is None:
            self._peers[peer] = bitfield
            if remote:
                self._remote.add(peer)
            for piece in bitfield:
                self._set_avail(piece, 1)
                if remote:
                    self._remote_avail[piece] += 1
            return
        remote = peer in self._remote
        for piece in bitfield:
            if known.add(piece):
                self._set_avail(piece, 1)
                if remote:
                    self._remote_avail[piece] += 1

    def peer_has(self, peer: PeerT, piece: int) -> None:
        """``piece`` was just added to the record of ``peer``, a connected peer.

        Call it once per piece added. It only counts the piece: the picker
        looks ``peer`` up only if it has remote peers, which keeps a HAVE to
        the fewest memory reads (it runs for every neighbour of every peer that
        verifies a piece).
        """
        self._set_avail(piece, 1)
        if self._offers:
            offers = self._offers.get(peer)
            if offers is not None and piece in offers:
                del offers[piece]
        if self._remote and peer in self._remote:
            self._remote_avail[piece] += 1
            self._epoch += 1
        elif peer in self._idle and (self._bucketed(piece) or piece in self._open_partials):
            del self._idle[peer]

    def remove_peer(self, peer: PeerT) -> list[BlockRequest]:
        """``peer`` disconnected: forget its pieces; its requests go back to open.

        Returns the requests that were in flight to it (now open again).
        """
        known = self._peers.pop(peer, None)
        if peer in self._idle:
            del self._idle[peer]
        self._offers.pop(peer, None)
        if known is not None:
            have = self._have
            remote = peer in self._remote
            if self._remote and not remote:
                self._epoch += 1  # fewer same-zone holders: remote peers may serve more
            if remote:
                self._remote.discard(peer)
            for piece in known:
                # Counts matter only for pieces we lack, and only those are
                # sure to have been counted: an engine need not announce a
                # piece to a peer that has it already (HAVE suppression).
                if piece not in have:
                    self._set_avail(piece, -1)
                    if remote:
                        self._remote_avail[piece] -= 1
        returned = sorted(self._requested_from(peer))
        for block in returned:
            self._unrequest(peer, block)
        return returned

    def peer_gone(self, peer: PeerT) -> list[BlockRequest]:
        """Alias of :meth:`remove_peer`."""
        # A method, not ``peer_gone = remove_peer``: mypyc (swarm simulate
        # --native) cannot compile a class attribute aliasing a method.
        return self.remove_peer(peer)

    def offer_blocks(self, peer: PeerT, piece: int, blocks: Bitfield) -> None:
        """``peer`` (connected) serves ``blocks`` of ``piece`` (a bitfield over the
        piece's blocks, in our block size), a piece it does not hold whole yet:
        they may be asked of it (cut-through). The picker keeps ``blocks``.

        Offered blocks are asked after the open blocks of pieces in progress and
        before any new piece: a piece that only partial holders have is the
        rarest there is (usually on its way from the origin). An offer replaces
        the peer's last one of the piece; one of a piece we have, or one the
        peer holds whole, changes nothing.
        """
        self._check_piece(piece)
        if len(blocks) != -(-self._lengths[piece] // self._block_size):
            raise ValueError(f"offer of {len(blocks)} blocks for piece {piece}")
        bits = self._peers.get(peer)
        if bits is None or piece in bits or piece in self._have:
            return
        offers = self._offers.get(peer)
        if offers is None:
            offers = self._offers[peer] = {}
        offers[piece] = blocks
        if peer in self._idle:
            del self._idle[peer]

    def withdraw_offer(self, peer: PeerT, piece: int) -> None:
        """``peer`` no longer serves the blocks of ``piece`` it offered (it rejected a
        request there); a later :meth:`offer_blocks` may offer them again."""
        offers = self._offers.get(peer)
        if offers is not None:
            offers.pop(piece, None)

    def offered(self, peer: PeerT) -> dict[int, Bitfield]:
        """``peer``'s cut-through offers: piece -> the blocks of it it serves."""
        return {piece: bits.copy() for piece, bits in self._offers.get(peer, {}).items()}

    def set_remote(self, peer: PeerT) -> None:
        """A connected peer turned out to be in another zone (the engine learned its zone
        after it was added): from now on it is asked only for what no same-zone peer has."""
        known = self._peers.get(peer)
        if known is None or peer in self._remote:
            return
        self._remote.add(peer)
        self._epoch += 1
        for piece in known:
            if piece not in self._have:
                self._remote_avail[piece] += 1

    def is_remote(self, peer: PeerT) -> bool:
        """True if ``peer`` was added as a peer of another zone."""
        return peer in self._remote

    def local_availability(self, piece: int) -> int:
        """How many connected same-zone peers have ``piece`` (kept for the pieces we lack)."""
        return int(self._avail[piece]) - int(self._remote_avail[piece])

    def peer_bitfield(self, peer: PeerT) -> Bitfield | None:
        known = self._peers.get(peer)
        return None if known is None else known.copy()

    # -- our own pieces -------------------------------------------------------

    def mark_have(self, piece: int) -> list[tuple[PeerT, BlockRequest]]:
        """We verified ``piece`` (from peers or the origin).

        Returns requests still in flight for it, which the engine should cancel.
        """
        self._check_piece(piece)
        leftovers = self._drop_partial(piece)
        self._reserved.discard(piece)
        self._unbucket_if_needed(piece)
        self._have.add(piece)
        return leftovers

    def reserve(self, piece: int) -> bool:
        """We will pull ``piece`` from the origin: never request it from peers.

        Returns False (and reserves nothing) if we already have the piece or are
        downloading it from connected peers that have it; the engine should then
        not fetch it from the origin. A partial that no connected peer can finish
        (its sources left or were barred, say for serving corrupt blocks) is
        dropped: the tracker assigns only pieces nobody in the swarm holds, so the
        origin is the only way left to get it.
        """
        self._check_piece(piece)
        if piece in self._have:
            return False
        partial = self._partials.get(piece)
        if partial is not None:
            if self._avail[piece] > 0 or partial.requesters:
                return False
            self._drop_partial(piece)
        self._unbucket_if_needed(piece)
        self._reserved.add(piece)
        return True

    def release(self, piece: int) -> None:
        """The origin fetch of ``piece`` was abandoned: peers may serve it again."""
        self._check_piece(piece)
        self._reserved.discard(piece)
        self._rebucket_if_free(piece)

    def restore_blocks(self, piece: int, offsets: Sequence[int]) -> None:
        """Blocks of ``piece`` already on disk and checked, kept by a fetch that stopped
        part-way: the piece is in progress with them received, and they are never asked
        for. Offsets that are not whole blocks of the piece are ignored; so is a piece
        that is had or reserved."""
        self._check_piece(piece)
        if piece in self._have or piece in self._reserved:
            return
        if piece not in self._partials:
            self._start(piece)
        partial = self._partials[piece]
        size = self._block_size
        for offset in offsets:
            index = offset // size
            if (
                offset != index * size
                or not 0 <= index < len(partial.state)
                or partial.state[index] != _OPEN
            ):
                continue
            partial.state[index] = _RECEIVED
            partial.open -= 1
            partial.received += 1
        if not partial.open and piece in self._open_partials:
            del self._open_partials[piece]
        self._epoch += 1

    def _check_piece(self, piece: int) -> None:
        if not 0 <= piece < len(self._lengths):
            raise ValueError(f"piece {piece} is out of range (0..{len(self._lengths) - 1})")

    # -- picking --------------------------------------------------------------

    def pick(self, peer: PeerT, max_blocks: int) -> list[BlockRequest]:
        """Up to ``max_blocks`` new requests to send to ``peer``.

        Open blocks of pieces in progress come first (oldest piece first), then
        blocks of new pieces, rarest first with random tie-break. In endgame, a
        peer with nothing else in flight is handed blocks already requested from
        other peers (each at most ``endgame_duplicates`` times in flight). Only
        when it would otherwise be idle: every duplicate costs another peer's
        upload, and in a swarm whose uplinks are the limit, duplicates handed to
        busy peers cost more than they save (measured: ~10% of the bytes each
        peer received were duplicates in the fabric-bound testbed run before
        this rule), and only once no more blocks are left to arrive than there
        are peers: with a deep request pipeline "everything requested" comes long
        before the end, and a race for a block sends it twice over the uplinks
        that bound such a swarm. Only pieces ``peer`` has and
        we neither have nor reserve are picked; from a remote peer, only those
        that no same-zone peer has (endgame duplicates aside). The returned
        requests are recorded as in flight to ``peer``.
        """
        bits = self._peers.get(peer)
        if bits is None or max_blocks <= 0 or self.done:
            return []
        endgame = self.in_endgame  # duplicates depend on the whole state: no shortcut
        if not endgame:
            idle = self._idle.get(peer)
            if idle is not None and idle == self._epoch:
                return []
        picked = self._pick(peer, bits, max_blocks, endgame)
        if picked or endgame:
            if peer in self._idle:
                del self._idle[peer]
        else:
            self._idle[peer] = self._epoch
        return picked

    def _pick(
        self, peer: PeerT, bits: Bitfield, max_blocks: int, endgame: bool
    ) -> list[BlockRequest]:
        remote = bool(self._remote) and peer in self._remote
        picked: list[BlockRequest] = []
        if self._open_partials:
            avail = self._avail
            remote_avail = self._remote_avail
            for piece in list(self._open_partials):
                if piece in bits and (not remote or avail[piece] == remote_avail[piece]):
                    self._take_open(peer, piece, max_blocks - len(picked), picked)
                    if len(picked) >= max_blocks:
                        return picked
        if self._offers:
            offers = self._offers.get(peer)
            if offers:
                self._take_offered(peer, offers, max_blocks, picked)
                if len(picked) >= max_blocks:
                    return picked
        while len(picked) < max_blocks:
            new_piece = self._pick_new_remote_piece(bits) if remote else self._pick_new_piece(bits)
            if new_piece is None:
                break
            self._start(new_piece)
            self._take_open(peer, new_piece, max_blocks - len(picked), picked)
        if (
            not picked
            and endgame
            and self._blocks_to_go() <= len(self._peers)
            and not self._requested_from(peer)
        ):
            self._take_endgame(peer, bits, max_blocks - len(picked), picked)
        return picked

    def _take_offered(
        self, peer: PeerT, offers: dict[int, Bitfield], max_blocks: int, out: list[BlockRequest]
    ) -> None:
        """Open blocks within ``peer``'s cut-through offers, oldest offer first."""
        for piece in list(offers):
            if piece in self._have:
                del offers[piece]
                continue
            if piece in self._reserved:
                continue  # we pull it from the origin ourselves
            partial = self._partials.get(piece)
            if partial is None:
                if not self._bucketed(piece):
                    continue
                self._start(piece)
                partial = self._partials[piece]
            elif not partial.open:
                continue
            self._take_spread(peer, piece, max_blocks - len(out), out, offers[piece])
            if len(out) >= max_blocks:
                return

    def _pick_new_piece(self, bits: Bitfield) -> int | None:
        """The rarest unstarted piece ``bits`` has, random among equals; None if none."""
        # Scanning the buckets costs the number of pieces looked at; scanning
        # the peer's own pieces costs its piece count. Start with the buckets
        # (cheap when the peer has many of the rare pieces) and switch when the
        # scan grows longer than the peer's piece count.
        budget: i64 = bits.count() + 16
        random = self._random
        order = self._order
        bounds = self._bounds
        for level in range(1, len(bounds) - 1):  # level 0: nobody has these
            lo = i64(bounds[level])
            size = i64(bounds[level + 1]) - lo
            if not size:
                continue
            begin = i64(int(random() * float(size)))
            scan = min(size, budget)
            for i in range(scan):
                j = begin + i
                piece = int(order[lo + (j - size if j >= size else j)])
                if piece in bits:
                    return piece
            if scan < size:
                return self._pick_from_peer_pieces(bits)
            budget -= size
        return None

    def _pick_new_remote_piece(self, bits: Bitfield) -> int | None:
        """The rarest unstarted piece ``bits`` has and no same-zone peer has; None if none.

        The same scan as :meth:`_pick_new_piece` with one more condition, kept
        apart so the common path carries no zone test.
        """
        budget: i64 = bits.count() + 16
        random = self._random
        order = self._order
        bounds = self._bounds
        avail = self._avail
        remote_avail = self._remote_avail
        for level in range(1, len(bounds) - 1):
            lo = i64(bounds[level])
            size = i64(bounds[level + 1]) - lo
            if not size:
                continue
            begin = i64(int(random() * float(size)))
            scan = min(size, budget)
            for i in range(scan):
                j = begin + i
                piece = int(order[lo + (j - size if j >= size else j)])
                if piece in bits and avail[piece] == remote_avail[piece]:
                    return piece
            if scan < size:
                return self._pick_from_peer_pieces(bits, True)
            budget -= size
        return None

    def _pick_from_peer_pieces(self, bits: Bitfield, remote: bool = False) -> int | None:
        best_level = -1
        ties: list[int] = []
        pos = self._pos
        avail = self._avail
        end = self._unstarted()
        remote_avail = self._remote_avail
        for piece in bits:
            if i64(pos[piece]) >= end or (remote and avail[piece] != remote_avail[piece]):
                continue
            level = int(avail[piece])
            if level == best_level:
                ties.append(piece)
            elif level < best_level or best_level < 0:
                best_level = level
                ties = [piece]
        return self._rng.choice(ties) if ties else None

    def _start(self, piece: int) -> None:
        self._unbucket(piece)
        num_blocks = -(-self._lengths[piece] // self._block_size)
        self._partials[piece] = _Partial(num_blocks)
        self._open_partials[piece] = None

    def _block(self, piece: int, index: int) -> BlockRequest:
        offset = index * self._block_size
        length = min(self._block_size, self._lengths[piece] - offset)
        # tuple.__new__ directly: the NamedTuple's own __new__ is generated
        # Python code, a frame per call, and this runs for every request.
        return tuple.__new__(BlockRequest, (piece, offset, length))

    def _take_spread(
        self, peer: PeerT, piece: int, limit: int, out: list[BlockRequest], only: Bitfield | None
    ) -> None:
        """Request up to ``limit`` open blocks of ``piece`` from ``peer`` (of ``only``,
        if given), in order from a random block on, wrapping around.

        With cut-through, the nodes that fetch a piece from its one holder (its
        seeder, as it arrives from the origin) ask for different blocks, and
        then trade them with each other; lowest-first would have every one of
        them ask for the same few blocks, and the holder send those again and
        again.
        """
        partial = self._partials[piece]
        state = partial.state
        count = len(state)
        start = i64(int(self._random() * float(count)))
        taken = 0
        for step in range(count):
            if taken >= limit or not partial.open:
                break
            index = start + step
            if index >= count:
                index -= count
            if state[index] != _OPEN or (only is not None and index not in only):
                continue
            state[index] = _REQUESTED
            partial.requesters[index] = [peer]
            partial.open -= 1
            out.append(self._block(piece, index))
            taken += 1
        while partial.next_open < count and state[partial.next_open] != _OPEN:
            partial.next_open += 1
        if not partial.open and piece in self._open_partials:
            del self._open_partials[piece]

    def _take_open(self, peer: PeerT, piece: int, limit: int, out: list[BlockRequest]) -> None:
        if self._spread:
            self._take_spread(peer, piece, limit, out, None)
            return
        partial = self._partials[piece]
        state = partial.state
        index = partial.next_open
        taken = 0
        while taken < limit and partial.open:
            while state[index] != _OPEN:
                index += 1
            state[index] = _REQUESTED
            partial.requesters[index] = [peer]
            partial.open -= 1
            out.append(self._block(piece, index))
            taken += 1
            index += 1
        partial.next_open = index
        if not partial.open and piece in self._open_partials:
            del self._open_partials[piece]

    def _blocks_to_go(self) -> int:
        """Blocks of pieces in progress not received yet (in endgame, all that is left)."""
        return sum(len(p.state) - p.received for p in self._partials.values())

    def _take_endgame(
        self, peer: PeerT, bits: Bitfield, limit: int, out: list[BlockRequest]
    ) -> None:
        # Fewest copies in flight first, then oldest piece: the blocks most at
        # risk of holding up completion.
        candidates: list[tuple[int, int, int, int]] = []
        for order, (piece, partial) in enumerate(self._partials.items()):
            if piece not in bits:
                continue
            for index, peers in partial.requesters.items():
                if len(peers) < self._endgame_duplicates and peer not in peers:
                    candidates.append((len(peers), order, piece, index))
        candidates.sort()
        for _, _, piece, index in candidates[:limit]:
            self._partials[piece].requesters[index].append(peer)
            out.append(self._block(piece, index))

    def take_over(
        self,
        peer: PeerT,
        max_blocks: int,
        arriving: Collection[BlockRequest] = (),
        slower: Callable[[PeerT], bool] | None = None,
        sending: int = 2,
    ) -> list[tuple[PeerT, BlockRequest]]:
        """Move requests to ``peer``, which has none in flight and nothing to pick:
        up to ``max_blocks`` blocks it serves (pieces it holds, or its cut-through
        offers) that are requested from the one peer with the most requests in
        flight, among those ``slower`` says serve us slower than ``peer``; at most
        half of them, and never more than leave it ``sending`` (its upload slots
        per connection). The newest in piece order go, none in ``arriving``: the
        engine puts there what must stay (blocks on the wire or being stored, and
        the requests the holder may be sending, which only it knows the order of).
        They are recorded as in flight to ``peer``; the engine cancels them at the
        peer they came from (returned with each block) and asks ``peer`` for them.

        Requests are asked of a peer as soon as it holds a block, and wait there
        however slowly it serves them: every node asks the one slow node that
        pulled a piece from the origin for its blocks, and at the end waits for it
        to send each of them to each of them, while the nodes that took the first
        copies sit idle. Halving moves a queue towards the peers that drain theirs
        without moving it back and forth.
        """
        bits = self._peers.get(peer)
        if bits is None or max_blocks <= 0 or self.done:
            return []
        offers = self._offers.get(peer) if self._offers else None
        remote = bool(self._remote) and peer in self._remote
        # Per other peer, the blocks it holds requests of that ``peer`` serves, and
        # how many requests it holds in the pieces ``peer`` serves.
        movable: dict[PeerT, list[tuple[int, int]]] = {}
        counts: dict[PeerT, int] = {}
        for piece, partial in self._partials.items():
            only: Bitfield | None = None
            if piece not in bits:
                only = offers.get(piece) if offers else None
                if only is None:
                    continue
            elif remote and self._avail[piece] != self._remote_avail[piece]:
                continue  # a same-zone peer has it
            for index, peers in partial.requesters.items():
                for other in peers:
                    counts[other] = counts.get(other, 0) + 1
                if len(peers) != 1 or peers[0] == peer:
                    continue
                if only is not None and index not in only:
                    continue
                if arriving and self._block(piece, index) in arriving:
                    continue
                movable.setdefault(peers[0], []).append((piece, index))
        if peer in counts:
            return []
        best: PeerT | None = None
        for other in movable:
            if (
                counts[other] > sending
                and (slower is None or slower(other))
                and (best is None or counts[other] > counts[best])
            ):
                best = other
        if best is None:
            return []
        count = counts[best]
        take = min(max_blocks, count // 2, count - sending, len(movable[best]))
        if take <= 0:
            return []
        moved: list[tuple[PeerT, BlockRequest]] = []
        for piece, index in reversed(movable[best][-take:]):
            self._partials[piece].requesters[index] = [peer]
            moved.append((best, self._block(piece, index)))
        return moved

    # -- results --------------------------------------------------------------

    def _index(self, block: BlockRequest) -> int:
        return block.offset // self._block_size

    def block_received(self, peer: PeerT, block: BlockRequest) -> list[tuple[PeerT, BlockRequest]]:
        """``peer`` delivered ``block``.

        Returns the other peers the same block is still requested from (endgame
        duplicates); they are no longer counted as in flight and the engine
        should send them a Cancel. A block that was already received, or that
        belongs to a piece not in progress, changes nothing and returns [].
        """
        piece = block.piece
        partial = self._partials.get(piece)
        if partial is None:
            return []
        size = self._block_size
        offset = block.offset
        index = offset // size
        if (
            not 0 <= index < len(partial.state)
            or offset != index * size
            or block.length != min(size, self._lengths[piece] - offset)
            or partial.state[index] == _RECEIVED
        ):
            return []
        if partial.state[index] == _OPEN:
            partial.open -= 1
            if not partial.open:
                del self._open_partials[piece]
        partial.state[index] = _RECEIVED
        partial.received += 1
        cancels: list[tuple[PeerT, BlockRequest]] = []
        requesters = partial.requesters.get(index)
        if requesters is not None:
            del partial.requesters[index]
            for other in requesters:
                if other is not peer and other != peer:  # identity first: no generic call
                    cancels.append((other, block))
        return cancels

    def block_failed(self, peer: PeerT, block: BlockRequest) -> None:
        """The request of ``block`` to ``peer`` failed (rejected, timed out, cancelled)."""
        if 0 <= block.piece < len(self._lengths) and block == self._block(
            block.piece, self._index(block)
        ):
            self._unrequest(peer, block)

    def _unrequest(self, peer: PeerT, block: BlockRequest) -> None:
        partial = self._partials.get(block.piece)
        if partial is None:
            return
        index = self._index(block)
        peers = partial.requesters.get(index)
        if peers is None or peer not in peers:
            return
        peers.remove(peer)
        if peers:
            return
        del partial.requesters[index]
        partial.state[index] = _OPEN
        partial.open += 1
        partial.next_open = min(partial.next_open, index)
        self._open_partials[block.piece] = None
        self._epoch += 1

    def piece_complete(self, piece: int) -> bool:
        """True when every block of ``piece`` has been received (time to verify)."""
        partial = self._partials.get(piece)
        return partial is not None and partial.received == len(partial.state)

    def piece_failed(self, piece: int) -> list[tuple[PeerT, BlockRequest]]:
        """``piece`` failed verification: throw its blocks away and start over.

        The piece goes back among the unstarted pieces (so it may come from other
        peers this time). Returns requests still in flight for it, to cancel.
        """
        self._check_piece(piece)
        leftovers = self._drop_partial(piece)
        self._rebucket_if_free(piece)
        return leftovers

    def _drop_partial(self, piece: int) -> list[tuple[PeerT, BlockRequest]]:
        # ``in`` and ``del`` rather than pop(piece, None): compiled, those are
        # native dict operations and pop is a generic method call.
        partial = self._partials.get(piece)
        if partial is None:
            return []
        del self._partials[piece]
        if piece in self._open_partials:
            del self._open_partials[piece]
        leftovers: list[tuple[PeerT, BlockRequest]] = []
        if not partial.requesters:
            return leftovers
        for index, peers in sorted(partial.requesters.items()):
            block = self._block(piece, index)
            for peer in peers:
                leftovers.append((peer, block))
        return leftovers
