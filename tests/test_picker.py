"""PiecePicker tests in libtorrent's style: pickers built from availability strings.

``"1213*"`` means piece 0 is held by one peer, piece 1 by two, piece 2 by one,
piece 3 by three, and piece 4 is already ours. The holders are peers "h0",
"h1", ... (peer ``hK`` holds every piece whose availability is > K), and the
peer we pick from is ``SEED``, which holds every piece and so adds 1 to every
availability without changing their order.
"""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.bitfield import Bitfield
from swarm.picker import BlockRequest, PiecePicker

BLOCK = 16
SEED = "seed"


def make(
    availability: str,
    *,
    blocks_per_piece: int = 1,
    seed: int = 0,
    endgame_duplicates: int = 2,
    with_seed: bool = True,
) -> PiecePicker[str]:
    size = len(availability)
    picker: PiecePicker[str] = PiecePicker(
        [BLOCK * blocks_per_piece] * size,
        BLOCK,
        random.Random(seed),
        endgame_duplicates=endgame_duplicates,
    )
    levels = [0 if c == "*" else int(c) for c in availability]
    for k in range(max(levels, default=0)):
        picker.add_peer(
            f"h{k}", Bitfield.from_indices([i for i, a in enumerate(levels) if a > k], size)
        )
    if with_seed:
        picker.add_peer(SEED, Bitfield.full(size))
    for piece, c in enumerate(availability):
        if c == "*":
            picker.mark_have(piece)
    return picker


def pieces(blocks: list[BlockRequest]) -> list[int]:
    return [b.piece for b in blocks]


def pick_order(picker: PiecePicker[str], peer: str = SEED) -> list[int]:
    """Pick one block at a time until nothing is left; the order pieces started in."""
    order: list[int] = []
    for _ in range(picker.num_pieces + 1):
        picked = picker.pick(peer, 1)
        if not picked or (picker.in_endgame and picked[0].piece in order):
            break
        order.append(picked[0].piece)
    return order


def test_rarest_first() -> None:
    order = pick_order(make("1213"))
    assert set(order[:2]) == {0, 2}
    assert order[2:] == [1, 3]


def test_rarest_first_skips_pieces_we_have() -> None:
    order = pick_order(make("3*1*2"))
    assert order == [2, 4, 0]


def test_availability_follows_haves_and_departures() -> None:
    picker = make("2222")
    assert picker.availability(0) == 3
    late = Bitfield(4)
    picker.add_peer("late", late)
    late.add(1)
    picker.peer_has("late", 1)
    assert picker.availability(1) == 4
    picker.remove_peer("h0")
    picker.remove_peer("h1")
    assert [picker.availability(p) for p in range(4)] == [1, 2, 1, 1]
    order = pick_order(picker)
    assert order[-1] == 1


def test_picker_reads_the_engines_record_of_a_peer() -> None:
    picker = make("0000", with_seed=False)
    record = Bitfield(4)
    picker.add_peer("x", record)
    assert picker.pick("x", 1) == []
    record.add(2)  # the engine adds to its record, then tells the picker
    picker.peer_has("x", 2)
    assert pieces(picker.pick("x", 1)) == [2]
    assert picker.availability(2) == 1
    assert picker.peer_bitfield("x") == record
    assert picker.peer_bitfield("x") is not record  # callers get a copy


def test_departure_uncounts_only_pieces_we_lack() -> None:
    # An engine need not announce a piece to a peer that has it (HAVE
    # suppression), so a departing peer's record may hold pieces we have that
    # were never counted: they must not drive a count below zero.
    picker = make("*00", with_seed=False)
    record = Bitfield.from_indices([1], 3)
    picker.add_peer("x", record)
    record.add(0)  # we have piece 0: not announced to us
    picker.remove_peer("x")
    assert [picker.availability(p) for p in (1, 2)] == [0, 0]
    assert picker.availability(0) == 0


def test_random_tie_break_depends_on_seed_only() -> None:
    first = {make("1" * 20, seed=s).pick(SEED, 1)[0].piece for s in range(30)}
    assert len(first) > 5
    runs = [pick_order(make("1" * 20, seed=7)) for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    assert sorted(runs[0]) == list(range(20))


def test_tie_break_among_the_rarest_only() -> None:
    for seed in range(20):
        assert make("3131113", seed=seed).pick(SEED, 1)[0].piece in {1, 3, 4, 5}


def test_never_picks_what_the_peer_lacks() -> None:
    picker = make("1111", with_seed=False)
    picker.add_peer("x", Bitfield.from_indices([2], 4))
    assert pieces(picker.pick("x", 10)) == [2]
    assert picker.pick("x", 10) == []
    assert picker.pick("unknown", 10) == []


def test_blocks_cover_piece_with_short_last_block() -> None:
    picker: PiecePicker[str] = PiecePicker([40, 16], BLOCK, random.Random(0))
    picker.add_peer("x", Bitfield.full(2))
    assert picker.blocks(0) == [
        BlockRequest(0, 0, 16),
        BlockRequest(0, 16, 16),
        BlockRequest(0, 32, 8),
    ]
    got = picker.pick("x", 10)
    assert sorted(got) == sorted(picker.blocks(0) + picker.blocks(1))
    assert picker.outstanding("x") == sorted(got)


def test_in_progress_pieces_are_finished_first() -> None:
    # Piece 0 is common, piece 1 is rare; once piece 0 is started, the next
    # peer finishes it before starting the rare one.
    picker = make("51", blocks_per_piece=4, with_seed=False)
    picker.add_peer("a", Bitfield.from_indices([0], 2))
    first = picker.pick("a", 2)
    assert first == [BlockRequest(0, 0, 16), BlockRequest(0, 16, 16)]
    picker.add_peer("b", Bitfield.full(2))
    second = picker.pick("b", 3)
    assert second == [BlockRequest(0, 32, 16), BlockRequest(0, 48, 16), BlockRequest(1, 0, 16)]
    assert picker.in_progress() == [0, 1]


def test_reserved_pieces_are_never_picked() -> None:
    picker = make("1211")
    assert picker.reserve(0)
    assert picker.reserve(2)
    assert picker.is_reserved(0)
    assert sorted(pick_order(picker)) == [1, 3]
    picker.release(2)
    assert pieces(picker.pick(SEED, 5)) == [2]
    # Reserved pieces are not part of the endgame either.
    assert picker.in_endgame
    assert picker.pick(SEED, 5) == []


def test_reserve_refused_when_had_or_in_progress() -> None:
    picker = make("11*")
    picker.pick(SEED, 1)
    started = picker.in_progress()[0]
    assert not picker.reserve(started)
    assert not picker.reserve(2)
    other = 1 - started
    assert picker.reserve(other)
    picker.mark_have(other)
    assert not picker.is_reserved(other)
    with pytest.raises(ValueError, match="out of range"):
        picker.reserve(3)


def test_reserve_takes_over_a_partial_that_no_connected_peer_can_finish() -> None:
    # The only holder sent half the piece and was then dropped (barred for corrupt
    # data, say); the tracker then assigns us the piece because nobody holds it.
    picker = make("1", blocks_per_piece=2, with_seed=False)
    first = picker.pick("h0", 1)
    picker.block_received("h0", first[0])
    assert picker.in_progress() == [0]
    assert not picker.reserve(0)  # h0 is still here and can finish it
    picker.remove_peer("h0")
    assert picker.reserve(0)
    assert picker.is_reserved(0)
    assert picker.in_progress() == []
    picker.add_peer("h1", Bitfield.full(1))
    assert picker.pick("h1", 2) == []  # reserved: never requested from peers


def test_block_failed_reopens_block() -> None:
    picker = make("1", blocks_per_piece=2, with_seed=False)
    first = picker.pick("h0", 1)
    picker.block_failed("h0", first[0])
    assert picker.outstanding("h0") == []
    assert picker.pick("h0", 2) == [BlockRequest(0, 0, 16), BlockRequest(0, 16, 16)]
    picker.block_failed("h0", BlockRequest(0, 999, 1))  # unknown: ignored


def test_piece_complete_mark_have_and_done() -> None:
    picker = make("11", blocks_per_piece=2)
    blocks = picker.pick(SEED, 4)
    assert len(blocks) == 4
    for block in blocks[:3]:
        assert picker.block_received(SEED, block) == []
    assert not picker.piece_complete(blocks[3].piece)
    assert picker.piece_complete(blocks[0].piece)
    picker.block_received(SEED, blocks[3])
    assert picker.missing_count == 2
    for piece in (0, 1):
        assert picker.piece_complete(piece)
        assert picker.mark_have(piece) == []
    assert picker.done
    assert picker.missing_count == 0
    assert not picker.in_endgame
    assert picker.pick(SEED, 4) == []
    assert list(picker.have) == [0, 1]


def test_piece_failed_resets_every_block() -> None:
    picker = make("1", blocks_per_piece=3)
    blocks = picker.pick(SEED, 3)
    for block in blocks:
        picker.block_received(SEED, block)
    assert picker.piece_complete(0)
    assert picker.piece_failed(0) == []
    assert not picker.piece_complete(0)
    assert picker.in_progress() == []
    picker.remove_peer(SEED)  # the peer that sent bad data is dropped
    assert picker.pick("h0", 3) == blocks


def test_duplicate_or_bogus_block_received_is_ignored() -> None:
    picker = make("1", blocks_per_piece=2)
    block = picker.pick(SEED, 1)[0]
    assert picker.block_received(SEED, block) == []
    assert picker.block_received(SEED, block) == []
    assert picker.block_received(SEED, BlockRequest(0, 3, 16)) == []
    assert picker.block_received(SEED, BlockRequest(0, 16, 5)) == []
    assert not picker.piece_complete(0)


def test_peer_gone_returns_its_requests() -> None:
    picker = make("2", blocks_per_piece=3, with_seed=False)
    got = picker.pick("h0", 2)
    assert picker.remove_peer("h0") == got
    assert picker.availability(0) == 1
    assert picker.pick("h1", 5) == picker.blocks(0)
    assert picker.peer_gone("h1") == picker.blocks(0)
    assert picker.outstanding("h1") == []


def test_endgame_duplicates_and_cancels() -> None:
    picker = make("3", blocks_per_piece=2, with_seed=False)
    a = picker.pick("h0", 2)
    assert picker.in_endgame
    b = picker.pick("h1", 5)
    assert sorted(b) == sorted(a)  # each block now in flight twice
    assert picker.pick("h2", 5) == []  # endgame_duplicates=2 reached
    assert picker.pick("h0", 5) == []  # never twice to the same peer
    cancels = picker.block_received("h1", a[0])
    assert cancels == [("h0", a[0])]
    assert a[0] not in picker.outstanding("h0")
    assert picker.outstanding("h1") == [a[1]]
    # A cancelled copy arriving late is harmless.
    assert picker.block_received("h0", a[0]) == []


def test_endgame_duplicates_go_only_to_idle_peers() -> None:
    picker = make("3", blocks_per_piece=3, with_seed=False)
    a = picker.pick("h0", 2)
    b = picker.pick("h1", 1)  # the last open block
    assert picker.in_endgame
    assert picker.pick("h1", 5) == []  # h1 still has its own block in flight
    picker.block_received("h1", b[0])
    assert sorted(picker.pick("h1", 5)) == sorted(a)  # now idle: duplicates
    assert picker.pick("h2", 5) == []  # each block is in flight twice already


def test_endgame_with_more_duplicates_prefers_least_requested() -> None:
    picker = make("4", blocks_per_piece=2, with_seed=False, endgame_duplicates=3)
    first = picker.pick("h0", 2)
    assert picker.pick("h1", 1) == [first[0]]
    assert picker.pick("h2", 1) == [first[1]]
    assert picker.pick("h3", 2) == first
    cancels = picker.block_received("h0", first[0])
    assert sorted(cancels) == [("h1", first[0]), ("h3", first[0])]


def test_no_endgame_while_pieces_are_unstarted() -> None:
    picker = make("10", with_seed=False)  # piece 1 has no source yet
    picker.pick("h0", 1)
    assert not picker.in_endgame
    assert picker.pick("h0", 1) == []


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="block_size"):
        PiecePicker([1], 0, random.Random(0))
    with pytest.raises(ValueError, match="piece 1 has length 0"):
        PiecePicker([1, 0], 4, random.Random(0))
    picker: PiecePicker[str] = PiecePicker([1, 1], 4, random.Random(0))
    with pytest.raises(ValueError, match="bitfield of 3 pieces"):
        picker.add_peer("x", Bitfield(3))


def test_add_peer_twice_merges() -> None:
    picker: PiecePicker[str] = PiecePicker([1, 1, 1], 4, random.Random(0))
    picker.add_peer("x", Bitfield.from_indices([0], 3))
    picker.add_peer("x", Bitfield.from_indices([0, 2], 3))
    assert [picker.availability(p) for p in range(3)] == [1, 0, 1]


# -- whole downloads and invariants -------------------------------------------


def run_download(picker: PiecePicker[int], peers: list[int], rng: random.Random) -> int:
    """Drive a picker to completion with peers that answer in random order."""
    in_flight: list[tuple[int, BlockRequest]] = []
    steps = 0
    for steps in range(1, 100_000):
        for peer in peers:
            for block in picker.pick(peer, 4 - len(picker.outstanding(peer))):
                assert picker.peer_bitfield(peer) is not None
                assert block.piece in picker.peer_bitfield(peer)  # type: ignore[operator]
                assert block.piece not in picker.have
                in_flight.append((peer, block))
        if picker.done:
            return steps
        assert in_flight, "stalled with nothing in flight"
        peer, block = in_flight.pop(rng.randrange(len(in_flight)))
        if block not in picker.outstanding(peer):
            continue  # cancelled
        for other, dup in picker.block_received(peer, block):
            assert dup == block and other != peer
        if picker.piece_complete(block.piece):
            picker.mark_have(block.piece)
    raise AssertionError(f"download did not finish in {steps} steps")


def assert_layout(picker: PiecePicker[int]) -> None:
    """The availability buckets hold exactly the unstarted pieces, each in its level's bucket."""
    order, pos, bounds = list(picker._order), list(picker._pos), list(picker._bounds)
    assert sorted(order) == list(range(picker.num_pieces))
    assert all(order[pos[piece]] == piece for piece in range(picker.num_pieces))
    assert bounds[0] == 0 and bounds == sorted(bounds)
    for level in range(len(bounds) - 1):
        for piece in order[bounds[level] : bounds[level + 1]]:
            assert picker.availability(piece) == level
    unstarted = {
        p
        for p in range(picker.num_pieces)
        if p not in picker.have and not picker.is_reserved(p) and p not in picker.in_progress()
    }
    assert set(order[: bounds[-1]]) == unstarted


def test_full_download_from_partial_peers() -> None:
    rng = random.Random(3)
    num_pieces = 60
    picker: PiecePicker[int] = PiecePicker([40] * 59 + [7], BLOCK, random.Random(1))
    records = [
        Bitfield.from_indices(rng.sample(range(num_pieces), 25), num_pieces) for _ in range(6)
    ]
    for peer, record in enumerate(records):
        picker.add_peer(peer, record)
    for piece in range(num_pieces):
        if records[piece % 6].add(piece):  # every piece has a source
            picker.peer_has(piece % 6, piece)
    run_download(picker, list(range(6)), rng)
    assert picker.done


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["pick", "recv", "fail", "gone", "has", "reserve"]), st.integers(0, 99)
        ),
        max_size=80,
    ),
    st.integers(0, 2**32),
)
def test_invariants_under_random_events(events: list[tuple[str, int]], seed: int) -> None:
    num_pieces, num_peers, dups = 8, 4, 2
    rng = random.Random(seed)
    picker: PiecePicker[int] = PiecePicker(
        [BLOCK * 2 + 3] * num_pieces, BLOCK, random.Random(seed), dups
    )
    held: dict[int, set[int]] = {}
    records: dict[int, Bitfield] = {}
    for peer in range(num_peers):
        held[peer] = set(rng.sample(range(num_pieces), 3))
        records[peer] = Bitfield.from_indices(held[peer], num_pieces)
        picker.add_peer(peer, records[peer])
    endgame_seen = False
    for kind, n in events:
        peer = n % num_peers
        if kind == "pick":
            for block in picker.pick(peer, 1 + n % 5):
                assert block.piece in held[peer]
                assert block.piece not in picker.have
                assert not picker.is_reserved(block.piece)
        elif kind == "recv" and picker.outstanding(peer):
            block = picker.outstanding(peer)[n % len(picker.outstanding(peer))]
            picker.block_received(peer, block)
            if picker.piece_complete(block.piece):
                if n % 7 == 0:
                    picker.piece_failed(block.piece)
                else:
                    picker.mark_have(block.piece)
        elif kind == "fail" and picker.outstanding(peer):
            picker.block_failed(peer, picker.outstanding(peer)[0])
        elif kind == "gone":  # and back at once, with nothing
            picker.remove_peer(peer)
            held[peer] = set()
            records[peer] = Bitfield(num_pieces)
            picker.add_peer(peer, records[peer])
        elif kind == "has":
            piece = n % num_pieces
            held[peer].add(piece)
            if records[peer].add(piece):
                picker.peer_has(peer, piece)
        elif kind == "reserve":
            picker.reserve(n % num_pieces)
        # Invariants.
        copies: dict[BlockRequest, int] = {}
        for p in range(num_peers):
            for block in picker.outstanding(p):
                copies[block] = copies.get(block, 0) + 1
                assert block.piece in held[p]
        assert all(c <= dups for c in copies.values())
        endgame_seen = endgame_seen or picker.in_endgame
        if not endgame_seen:
            assert all(c == 1 for c in copies.values())
        for piece in range(num_pieces):
            if piece not in picker.have:  # counts are kept for the pieces we lack
                assert picker.availability(piece) == sum(piece in h for h in held.values())
        assert picker.missing_count == num_pieces - len(list(picker.have))
        assert_layout(picker)


def test_picks_are_cheap_with_many_pieces() -> None:
    num_pieces = 100_000
    rng = random.Random(5)
    picker: PiecePicker[int] = PiecePicker([BLOCK] * num_pieces, BLOCK, random.Random(5))
    for peer in range(8):
        picker.add_peer(
            peer, Bitfield.from_indices(rng.sample(range(num_pieces), 2_000), num_pieces)
        )
    # One peer holds only common pieces, so the rare buckets have nothing for it.
    picker.add_peer(99, Bitfield.from_indices(range(0, num_pieces, 1000), num_pieces))
    start = time.perf_counter()
    picked = 0
    for _ in range(300):
        for peer in (*range(8), 99):
            picked += len(picker.pick(peer, 1))
    elapsed = time.perf_counter() - start
    assert picked > 2000
    assert elapsed < 2.0, f"2700 picks took {elapsed:.2f}s"


# -- zones: remote peers serve only what no same-zone peer has ------------------


def make_zoned(local: str, remote: str, *, blocks_per_piece: int = 1) -> PiecePicker[str]:
    """Like :func:`make` with no SEED: ``local`` availability held by same-zone peers
    "h0", "h1", ..., ``remote`` availability by other-zone peers "r0", "r1", ...
    """
    size = len(local)
    assert len(remote) == size
    picker: PiecePicker[str] = PiecePicker(
        [BLOCK * blocks_per_piece] * size, BLOCK, random.Random(0)
    )
    for prefix, text, is_remote in (("h", local, False), ("r", remote, True)):
        levels = [int(c) for c in text]
        for k in range(max(levels, default=0)):
            held = [i for i, a in enumerate(levels) if a > k]
            picker.add_peer(f"{prefix}{k}", Bitfield.from_indices(held, size), remote=is_remote)
    return picker


def test_remote_peer_is_asked_only_for_pieces_no_local_peer_has() -> None:
    picker = make_zoned("1100", "1111")
    assert picker.is_remote("r0") and not picker.is_remote("h0")
    assert [picker.local_availability(p) for p in range(4)] == [1, 1, 0, 0]
    assert [picker.availability(p) for p in range(4)] == [2, 2, 1, 1]
    assert sorted(pieces(picker.pick("r0", 10))) == [2, 3]
    assert picker.pick("r0", 10) == []
    assert sorted(pieces(picker.pick("h0", 10))) == [0, 1]


def test_remote_peer_serves_a_piece_once_its_local_holders_leave() -> None:
    picker = make_zoned("1100", "1111")
    assert sorted(pieces(picker.pick("r0", 10))) == [2, 3]
    picker.remove_peer("h0")
    assert [picker.local_availability(p) for p in range(4)] == [0, 0, 0, 0]
    assert sorted(pieces(picker.pick("r0", 10))) == [0, 1]


def test_open_blocks_of_a_started_piece_stay_local() -> None:
    picker = make_zoned("1", "1", blocks_per_piece=3)
    assert picker.pick("h0", 1) == [BlockRequest(0, 0, 16)]
    assert picker.pick("r0", 5) == []  # h0 can serve the other two blocks
    assert picker.pick("h0", 5) == [BlockRequest(0, 16, 16), BlockRequest(0, 32, 16)]


def test_haves_are_counted_by_zone() -> None:
    picker = make_zoned("00", "11")
    record = Bitfield(2)
    picker.add_peer("late", record)  # same zone
    record.add(0)
    picker.peer_has("late", 0)
    remote_record = Bitfield(2)
    picker.add_peer("far", remote_record, remote=True)
    remote_record.add(1)
    picker.peer_has("far", 1)
    assert [picker.local_availability(p) for p in (0, 1)] == [1, 0]
    assert [picker.availability(p) for p in (0, 1)] == [2, 2]
    assert pieces(picker.pick("r0", 5)) == [1]
    assert pieces(picker.pick("far", 5)) == []  # piece 1 is requested already
    picker.remove_peer("far")
    assert picker.availability(1) == 1 and picker.local_availability(1) == 0


def test_adding_a_remote_peer_again_keeps_its_flag() -> None:
    picker = make_zoned("00", "10")
    picker.add_peer("r0", Bitfield.from_indices([1], 2))  # merge; remote stays
    assert picker.is_remote("r0")
    assert [picker.local_availability(p) for p in (0, 1)] == [0, 0]
    assert sorted(pieces(picker.pick("r0", 5))) == [0, 1]


def test_endgame_duplicates_may_go_to_an_idle_remote_peer() -> None:
    picker = make_zoned("1", "1", blocks_per_piece=2)
    first = picker.pick("h0", 2)
    assert picker.in_endgame
    assert sorted(picker.pick("r0", 5)) == sorted(first)


def test_remote_picks_skip_local_pieces_on_the_long_scan_too() -> None:
    # Many pieces only the local peer holds fill the rarest bucket, so the
    # bucket scan gives up and walks the remote peer's own pieces instead.
    num_pieces = 300
    remote_only = set(range(295, 300))
    for seed in range(10):
        picker: PiecePicker[str] = PiecePicker([BLOCK] * num_pieces, BLOCK, random.Random(seed))
        picker.add_peer("h0", Bitfield.from_indices(range(290), num_pieces))
        held = [*range(10), *remote_only]
        picker.add_peer("r0", Bitfield.from_indices(held, num_pieces), remote=True)
        got = pieces(picker.pick("r0", 20))
        assert sorted(got) == sorted(remote_only)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["pick", "recv", "gone", "has"]), st.integers(0, 99))),
    st.integers(0, 2**32),
)
def test_remote_peers_never_get_a_locally_held_piece_before_endgame(
    events: list[tuple[str, int]], seed: int
) -> None:
    num_pieces, num_peers = 8, 4  # peers 0 and 1 are local, 2 and 3 remote
    rng = random.Random(seed)
    picker: PiecePicker[int] = PiecePicker([BLOCK * 2] * num_pieces, BLOCK, random.Random(seed))
    held: dict[int, set[int]] = {}
    records: dict[int, Bitfield] = {}
    for peer in range(num_peers):
        held[peer] = set(rng.sample(range(num_pieces), 3))
        records[peer] = Bitfield.from_indices(held[peer], num_pieces)
        picker.add_peer(peer, records[peer], remote=peer >= 2)
    for kind, n in events:
        peer = n % num_peers
        if kind == "pick":
            endgame = picker.in_endgame
            local_holders = {p for p in range(num_pieces) if any(p in held[q] for q in range(2))}
            for block in picker.pick(peer, 1 + n % 4):
                assert block.piece in held[peer]
                if peer >= 2 and not endgame:
                    assert block.piece not in local_holders
        elif kind == "recv" and picker.outstanding(peer):
            block = picker.outstanding(peer)[0]
            picker.block_received(peer, block)
            if picker.piece_complete(block.piece):
                picker.mark_have(block.piece)
        elif kind == "gone":
            picker.remove_peer(peer)
            held[peer] = set()
            records[peer] = Bitfield(num_pieces)
            picker.add_peer(peer, records[peer], remote=peer >= 2)
        elif kind == "has":
            piece = n % num_pieces
            held[peer].add(piece)
            if records[peer].add(piece):
                picker.peer_has(peer, piece)
        for piece in range(num_pieces):
            if piece not in picker.have:
                assert picker.local_availability(piece) == sum(piece in held[q] for q in range(2))


def test_a_peer_found_to_be_remote_after_it_was_added_is_asked_only_for_what_no_local_peer_has() -> (
    None
):
    picker: PiecePicker[str] = PiecePicker([100] * 4, 100, random.Random(1))
    local, later = Bitfield(4), Bitfield(4)
    for piece in (0, 1):
        local.add(piece)
    for piece in (0, 1, 2, 3):
        later.add(piece)
    picker.add_peer("local", local)
    picker.add_peer("later", later)  # its zone not known yet: taken for a local peer
    picker.set_remote("later")
    assert picker.is_remote("later")
    assert picker.local_availability(0) == 1 and picker.local_availability(2) == 0
    asked = {block.piece for block in picker.pick("later", 4)}
    assert asked <= {2, 3} and asked
    picker.set_remote("later")  # idempotent
    assert picker.local_availability(3) == 0


def _pickable(picker: PiecePicker[int], peer: int, bits: Bitfield) -> list[int]:
    """Pieces ``peer`` could be asked for now, computed from scratch (no endgame)."""
    remote = picker.is_remote(peer)
    return [
        piece
        for piece in bits
        if (picker._bucketed(piece) or piece in picker._open_partials)
        and (not remote or picker.local_availability(piece) == 0)
    ]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                ["pick", "recv", "fail", "gone", "has", "reserve", "release", "remote"]
            ),
            st.integers(0, 99),
        ),
        max_size=120,
    ),
    st.integers(0, 2**32),
)
@settings(max_examples=300)
def test_a_peer_found_idle_is_skipped_only_while_nothing_new_is_pickable(
    events: list[tuple[str, int]], seed: int
) -> None:
    """The idle shortcut never hides a block: every empty pick outside endgame is
    confirmed by a scan from scratch (several blocks per piece, remote peers,
    releases, departures)."""
    num_pieces, num_peers = 6, 5
    rng = random.Random(seed)
    picker: PiecePicker[int] = PiecePicker([BLOCK * 3] * num_pieces, BLOCK, random.Random(seed))
    records: dict[int, Bitfield] = {}
    for peer in range(num_peers):
        records[peer] = Bitfield.from_indices(rng.sample(range(num_pieces), 2), num_pieces)
        picker.add_peer(peer, records[peer], remote=peer >= 3)
    empty = 0
    for kind, n in events:
        peer = n % num_peers
        if kind == "pick":
            picked = picker.pick(peer, 1 + n % 3)
            if not picked and not picker.in_endgame and not picker.done:
                empty += 1
                assert _pickable(picker, peer, records[peer]) == []
        elif kind == "recv" and picker.outstanding(peer):
            block = picker.outstanding(peer)[n % len(picker.outstanding(peer))]
            picker.block_received(peer, block)
            if picker.piece_complete(block.piece):
                if n % 5 == 0:
                    picker.piece_failed(block.piece)
                else:
                    picker.mark_have(block.piece)
        elif kind == "fail" and picker.outstanding(peer):
            picker.block_failed(peer, picker.outstanding(peer)[0])
        elif kind == "gone":
            picker.remove_peer(peer)
            records[peer] = Bitfield(num_pieces)
            picker.add_peer(peer, records[peer], remote=n % 2 == 0)
        elif kind == "has":
            piece = n % num_pieces
            if records[peer].add(piece):
                picker.peer_has(peer, piece)
        elif kind == "reserve":
            picker.reserve(n % num_pieces)
        elif kind == "release" and picker.is_reserved(n % num_pieces):
            picker.release(n % num_pieces)
        elif kind == "remote":
            picker.set_remote(peer)


def test_an_idle_peer_gets_a_block_that_another_peer_gave_back() -> None:
    picker: PiecePicker[str] = PiecePicker([BLOCK * 3] * 4, BLOCK, random.Random(0))
    a = Bitfield.from_indices([0], 4)
    picker.add_peer("a", a)
    picker.add_peer("b", Bitfield.from_indices([0], 4))
    taken = picker.pick("b", 3)
    assert pieces(taken) == [0, 0, 0]
    assert picker.pick("a", 3) == []  # found idle
    picker.block_failed("b", taken[1])
    assert picker.pick("a", 3) == [taken[1]]
    assert picker.pick("a", 3) == []
    picker.add_peer("c", Bitfield.from_indices([1], 4))
    assert picker.pick("a", 3) == []  # c's piece is no use to a
    a.add(1)
    picker.peer_has("a", 1)
    assert pieces(picker.pick("a", 1)) == [1]  # its own new piece
    assert pieces(picker.pick("c", 3)) == [1, 1]  # the open rest of a started piece


def test_offered_blocks_of_a_partial_holder_are_asked_before_new_pieces() -> None:
    picker: PiecePicker[str] = PiecePicker([BLOCK * 8] * 3, BLOCK, random.Random(1), spread=True)
    picker.add_peer("full", Bitfield.from_indices([1], 3))
    picker.add_peer("relay", Bitfield(3))
    picker.offer_blocks("relay", 0, Bitfield.from_indices([2, 5, 6], 8))
    assert picker.offered("relay")[0] == Bitfield.from_indices([2, 5, 6], 8)
    got = picker.pick("relay", 8)
    assert sorted(b.offset // BLOCK for b in got) == [2, 5, 6]  # only what it offered
    assert pieces(got) == [0, 0, 0]
    # The rest of piece 0 is open for anyone who has it; the full holder gets piece 1.
    assert pieces(picker.pick("full", 2)) == [1, 1]
    # A Have of the piece ends the offer.
    picker.add_peer("relay", Bitfield.from_indices([0], 3))
    picker.peer_has("relay", 0)
    assert 0 not in picker.offered("relay")


def test_spread_asks_different_blocks_of_one_piece_from_random_starts() -> None:
    starts = set()
    for seed in range(8):
        picker: PiecePicker[str] = PiecePicker(
            [BLOCK * 64], BLOCK, random.Random(seed), spread=True
        )
        picker.add_peer("seed", Bitfield.full(1))
        starts.add(picker.pick("seed", 1)[0].offset)
    assert len(starts) > 4  # lowest-first would start every node at block 0


def test_an_idle_peer_takes_over_half_the_requests_waiting_at_a_slow_one() -> None:
    # Every block of the one piece is asked of "slow", the only holder at the time;
    # then "fast" arrives holding it too, and has nothing left to pick.
    picker: PiecePicker[str] = PiecePicker([8 * BLOCK], BLOCK, random.Random(0))
    picker.add_peer("slow", Bitfield.full(1))
    asked = picker.pick("slow", 8)
    assert len(asked) == 8
    picker.add_peer("fast", Bitfield.full(1))
    assert picker.pick("fast", 8) == []
    # Not from a peer that serves us as fast, nor one of the blocks arriving now.
    assert picker.take_over("fast", 8, slower=lambda other: False) == []
    moved = picker.take_over("fast", 8, arriving={asked[-1]}, slower=lambda other: True)
    # Half of the 8, the newest first, never one of the first 2 (they may be on the
    # wire already) nor the one arriving.
    assert [peer for peer, _ in moved] == ["slow"] * 4
    assert [block for _, block in moved] == asked[6:2:-1]
    # Recorded as asked of "fast" now: a block that comes from it is no duplicate,
    # and "fast", holding requests, takes no more.
    assert picker.take_over("fast", 8, slower=lambda other: True) == []
    assert picker.block_received("fast", asked[3]) == []


def test_take_over_leaves_a_peer_that_holds_few_requests_alone() -> None:
    picker: PiecePicker[str] = PiecePicker([2 * BLOCK], BLOCK, random.Random(0))
    picker.add_peer("slow", Bitfield.full(1))
    assert len(picker.pick("slow", 2)) == 2  # no more than it may be sending already
    picker.add_peer("fast", Bitfield.full(1))
    assert picker.take_over("fast", 8, slower=lambda other: True, sending=2) == []
