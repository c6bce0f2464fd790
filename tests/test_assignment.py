from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.assignment import SeederAssignment

PIECE = 1000


def make(
    num_pieces: int,
    peers: int = 0,
    *,
    seed: int = 0,
    per_peer_limit: int = 2,
    min_in_flight: int = 1,
    origin_budget: int | None = None,
    stall_timeout: float = 30.0,
    lookahead: int = 0,
) -> SeederAssignment[str]:
    policy: SeederAssignment[str] = SeederAssignment(
        [PIECE] * num_pieces,
        per_peer_limit=per_peer_limit,
        min_in_flight=min_in_flight,
        lookahead=lookahead,
        origin_budget=origin_budget,
        stall_timeout=stall_timeout,
        rng=random.Random(seed),
    )
    for i in range(peers):
        policy.peer_joined(f"p{i}", 0.0)
    return policy


def check_invariants(policy: SeederAssignment[str]) -> None:
    owners: dict[int, str] = {}
    for peer in policy.peers:
        current = policy.assignments(peer)
        for piece in current:
            assert piece not in owners, f"piece {piece} assigned to two peers"
            assert not policy.is_present(piece)
            assert policy.owner(piece) == peer
            owners[piece] = peer
    assert policy.in_flight == len(owners)
    present = sum(policy.is_present(p) for p in range(policy.num_pieces))
    assert policy.unassigned == policy.num_pieces - present - len(owners)


@pytest.mark.parametrize(("num_peers", "num_pieces"), [(4, 40), (7, 100), (10, 10), (3, 1)])
def test_balance_with_round_robin_completions(num_peers: int, num_pieces: int) -> None:
    policy = make(num_pieces, num_peers, seed=num_peers)
    now = 0.0
    for _ in range(num_pieces * 2):
        policy.assign(now)
        check_invariants(policy)
        for peer in policy.peers:
            current = policy.assignments(peer)
            if current:
                assert policy.piece_present(current[0]) == peer
        now += 1.0
        if policy.all_present:
            break
    assert policy.all_present
    pulled = policy.stats.pulled
    assert sum(pulled.values()) == num_pieces
    share = num_pieces / num_peers
    assert all(share - 1 <= n <= share + 1 for n in pulled.values()), pulled


def test_every_piece_assigned_once_and_limits_respected() -> None:
    policy = make(20, 3, per_peer_limit=2)
    new = policy.assign(0.0)
    assert sorted(len(v) for v in new.values()) == [2, 2, 2]
    assigned = [p for pieces in new.values() for p in pieces]
    assert len(set(assigned)) == 6
    assert policy.assign(1.0) == {}  # every slot busy
    assert policy.in_flight == 6
    assert policy.unassigned == 14
    check_invariants(policy)


def test_default_budget_grows_with_the_cluster_up_to_a_cap() -> None:
    from tracker.assignment import DEFAULT_MAX_BUDGET

    small = make(1000, 5)
    assert small.budget == 2 * 5
    big = make(10_000, 500)
    assert big.budget == DEFAULT_MAX_BUDGET
    in_flight = sum(len(a) for a in big.assign(0.0).values())
    assert in_flight == DEFAULT_MAX_BUDGET
    big.set_budget(1000)  # an operator's explicit budget is not capped
    assert big.budget == 1000


def test_origin_budget_caps_the_cluster() -> None:
    policy = make(20, 5, origin_budget=3)
    new = policy.assign(0.0)
    assert sum(len(v) for v in new.values()) == 3
    assert len(new) == 3  # spread over three peers, not two pieces on one
    assert policy.assign(0.0) == {}
    policy.set_budget(4)
    assert sum(len(v) for v in policy.assign(0.0).values()) == 1
    policy.set_budget(1)  # lowering takes nothing away
    assert policy.in_flight == 4
    first = policy.peers[0]
    for piece in list(policy.assignments(first)):
        policy.piece_present(piece)
    assert policy.assign(0.0) == {}
    assert policy.budget == 1
    policy.set_budget(None)
    assert policy.budget == 10
    with pytest.raises(ValueError):
        policy.set_budget(0)


def test_present_pieces_are_never_assigned() -> None:
    policy = make(10, 2, per_peer_limit=10)
    for piece in (0, 3, 9):
        assert policy.piece_present(piece) is None
    new = policy.assign(0.0)
    handed_out = sorted(p for pieces in new.values() for p in pieces)
    assert handed_out == [1, 2, 4, 5, 6, 7, 8]
    assert policy.unassigned == 0
    check_invariants(policy)


def test_present_while_assigned_credits_the_seeder() -> None:
    policy = make(4, 1)
    piece = policy.assign(0.0)["p0"][0]
    assert policy.piece_present(piece) == "p0"
    assert policy.piece_present(piece) is None  # twice: no double credit
    assert policy.stats.pulled == {"p0": 1}
    assert piece not in policy.assignments("p0")


def test_order_is_a_seeded_shuffle() -> None:
    def order(seed: int) -> list[int]:
        policy = make(50, 1, seed=seed, per_peer_limit=50)
        return policy.assign(0.0)["p0"]

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(50))
    assert order(1) != list(range(50))


def test_peer_left_returns_its_pieces_to_others() -> None:
    policy = make(10, 2)
    new = policy.assign(0.0)
    gone = policy.peer_left("p0", 5.0)
    assert gone == new["p0"]
    assert policy.assignments("p0") == []
    assert policy.stats.reassigned == 2
    policy.peer_joined("p2", 5.0)
    again = policy.assign(5.0)
    # The returned pieces come first, to the least-loaded peer with room.
    assert again == {"p2": gone}
    check_invariants(policy)
    assert policy.peer_left("nobody", 6.0) == []


def test_stall_reassigns_after_timeout_without_progress() -> None:
    policy = make(4, 2, per_peer_limit=1, stall_timeout=30.0)
    new = policy.assign(0.0)
    stuck_piece = new["p0"][0]
    moving_piece = new["p1"][0]
    policy.progress("p0", stuck_piece, 100, 1.0)
    for t in range(2, 60, 5):
        policy.progress("p1", moving_piece, t * 10, float(t))  # slow but moving
        policy.progress("p0", stuck_piece, 100, float(t))  # same count: no progress
        stalled = policy.tick(float(t))
        if t < 31:
            assert stalled == []
    assert policy.assignments("p0") == []
    assert policy.assignments("p1") == [moving_piece]
    assert policy.stats.stalled == 1
    assert policy.progress_of("p1", moving_piece) == 570


def test_stall_is_measured_from_last_progress() -> None:
    policy = make(1, 2, per_peer_limit=1, stall_timeout=10.0)
    [(first, [piece])] = policy.assign(0.0).items()
    second = "p1" if first == "p0" else "p0"
    policy.progress(first, piece, 5, 9.0)
    assert policy.tick(18.9) == []
    assert policy.tick(19.0) == [(first, piece)]
    # Repeating the old count does not win the piece back.
    assert not policy.progress(first, piece, 5, 19.5)
    # The stalled peer is avoided when the piece is reassigned.
    assert policy.assign(19.0) == {second: [piece]}
    # Its late report for the piece (now the other peer's) is ignored.
    assert not policy.progress(first, piece, 50, 20.0)
    assert policy.owner(piece) == second


def test_a_piece_waiting_for_its_peers_buffer_stalls_only_when_the_peer_does() -> None:
    """A lone peer holds more pieces than it pulls at once (4 + 2 held ahead): the
    two not started report no bytes while the four move. They are not taken back
    while any pull of that peer moves; once nothing moves, they are."""
    policy = make(40, 1, per_peer_limit=2, min_in_flight=4, stall_timeout=10.0, lookahead=2)
    held = policy.assign(0.0)["p0"]
    assert len(held) == 6  # 4 pulled, 2 held ahead: the pool has 40
    pulling, waiting = held[:4], held[4:]
    for t in range(1, 40):
        for k, piece in enumerate(pulling):
            policy.progress("p0", piece, t * 10 + k, float(t))
        assert policy.tick(float(t)) == [], t
    assert sorted(policy.assignments("p0")) == sorted(held)
    # Nothing moves from t=39 on: every piece stalls 10 s later, the waiting ones too.
    assert policy.tick(48.9) == []
    assert sorted(p for _, p in policy.tick(49.0)) == sorted(pulling + waiting)


def test_a_small_swarm_holds_pieces_ahead_only_while_the_pool_has_plenty() -> None:
    """Defaults: a lone peer holds 4 + 2 while the pool has at least 4 x 6 pieces,
    and just the 4 it pulls near the end; a newcomer still gets its share; a big
    swarm (minimum not above the per-peer limit) never holds ahead."""
    for pieces, held, newcomer in ((40, 6, 3), (20, 4, 2)):
        policy: SeederAssignment[str] = SeederAssignment([PIECE] * pieces, rng=random.Random(0))
        policy.peer_joined("p0", 0.0)
        assert len(policy.assign(0.0)["p0"]) == held
        policy.peer_joined("p1", 1.0)
        assert len(policy.assign(1.0).get("p1", [])) == newcomer
    big: SeederAssignment[str] = SeederAssignment(
        [PIECE] * 400, min_in_flight=2, rng=random.Random(0)
    )
    assert big.lookahead == 0


def test_stalled_piece_adopted_back_when_it_moves_again() -> None:
    policy = make(1, 1, stall_timeout=10.0)
    piece = policy.assign(0.0)["p0"][0]
    policy.progress("p0", piece, 5, 1.0)
    assert policy.tick(11.0) == [("p0", piece)]
    assert policy.progress("p0", piece, 6, 12.0)
    assert policy.assignments("p0") == [piece]


def test_stalled_peer_gets_piece_back_if_it_is_the_only_one() -> None:
    policy = make(1, 1, stall_timeout=10.0)
    piece = policy.assign(0.0)["p0"][0]
    assert policy.tick(10.0) == [("p0", piece)]
    assert policy.assign(10.0) == {"p0": [piece]}


def test_progress_adopts_pool_pieces_after_tracker_restart() -> None:
    policy = make(6, 2, per_peer_limit=2)
    # A fresh tracker hears about a pull it knows nothing of.
    assert policy.progress("p1", 4, 300, 0.0)
    assert policy.assignments("p1") == [4]
    assert policy.progress_of("p1", 4) == 300
    assert not policy.progress("p0", 4, 500, 0.0)  # already p1's
    assert not policy.progress("p0", 5, 0, 0.0)  # no bytes: not a pull
    assert not policy.progress("stranger", 5, 10, 0.0)
    new = policy.assign(0.0)
    assert 4 not in [p for pieces in new.values() for p in pieces]
    check_invariants(policy)


def test_lost_piece_goes_back_to_the_pool() -> None:
    policy = make(3, 1, per_peer_limit=3)
    policy.piece_present(1)
    assert not policy.piece_lost(0)  # never present
    assert policy.piece_lost(1)
    assert policy.stats.lost == 1
    assert sorted(policy.assign(0.0)["p0"]) == [0, 1, 2]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        make(1, per_peer_limit=0)
    with pytest.raises(ValueError):
        make(1, stall_timeout=0)
    with pytest.raises(ValueError, match="out of range"):
        make(2).piece_present(2)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["join", "leave", "assign", "present", "progress", "tick", "lost"]),
            st.integers(0, 1000),
        ),
        max_size=60,
    ),
    st.integers(0, 2**32),
)
def test_invariants_under_random_events(events: list[tuple[str, int]], seed: int) -> None:
    num_pieces = 12
    policy = make(num_pieces, 2, seed=seed, stall_timeout=5.0, origin_budget=None)
    now = 0.0
    ever_present: set[int] = set()
    for kind, n in events:
        now += n % 4
        peer = f"p{n % 4}"
        if kind == "join":
            policy.peer_joined(peer, now)
        elif kind == "leave":
            policy.peer_left(peer, now)
        elif kind == "assign":
            room = policy.budget - policy.in_flight
            new = policy.assign(now)
            assert sum(map(len, new.values())) <= max(0, room)
            for who, pieces in new.items():
                for piece in pieces:
                    assert piece not in ever_present or not policy.is_present(piece)
                    assert policy.owner(piece) == who
            for who in new:
                assert len(policy.assignments(who)) <= policy.per_peer_limit
        elif kind == "present":
            piece = n % num_pieces
            policy.piece_present(piece)
            ever_present.add(piece)
        elif kind == "progress":
            pieces = policy.assignments(peer)
            if pieces:
                piece = pieces[n % len(pieces)]
                before = policy.progress_of(peer, piece) or 0
                policy.progress(peer, piece, before + n % 3, now)
        elif kind == "tick":
            for who, piece in policy.tick(now):
                assert piece not in policy.assignments(who)
        elif kind == "lost":
            piece = n % num_pieces
            if policy.piece_lost(piece):
                ever_present.discard(piece)
        check_invariants(policy)
        for piece in ever_present:
            assert policy.owner(piece) is None


def test_a_small_swarm_keeps_min_in_flight_pieces_pulling() -> None:
    """A lone peer pulls four at once (what --direct keeps), two peers two each, and
    the per-peer limit rules again once there are peers enough."""
    policy = make(40, 1, per_peer_limit=2, min_in_flight=4)
    assert policy.limit == 4 and policy.budget == 4
    assert len(policy.assign(0.0)["p0"]) == 4
    policy.peer_joined("p1", 1.0)
    # p0's four, taken while alone, count against its own share, not p1's.
    assert policy.limit == 2 and policy.budget == 6
    assert {peer: len(pieces) for peer, pieces in policy.assign(1.0).items()} == {"p1": 2}
    for piece in policy.assignments("p0")[:2]:
        policy.piece_present(piece)
    assert policy.assign(2.0) == {}  # both at the per-peer limit now
    for i in range(2, 5):
        policy.peer_joined(f"p{i}", 3.0)
    assert policy.limit == 2 and policy.budget == 10
    check_invariants(policy)
    with pytest.raises(ValueError, match="min_in_flight"):
        make(4, min_in_flight=0)


def test_a_seeder_pulling_at_under_half_the_median_rate_gets_no_new_pieces() -> None:
    policy = make(100, peers=5, per_peer_limit=1)
    first = policy.assign(0.0)
    assert sorted(first) == ["p0", "p1", "p2", "p3", "p4"]
    # p0..p3 finish their first pull in 1 s (1000 B/s), p4 in 4 s (250 B/s).
    for peer in ("p0", "p1", "p2", "p3"):
        policy.piece_present(first[peer][0], 1.0)
    assert not policy.slow("p4", 1.0)  # not rated yet: judged only by a pull it finished
    policy.piece_present(first["p4"][0], 4.0)
    assert policy.median_rate(4.0) == pytest.approx(1000.0)
    assert policy.slow("p4", 4.0) and not policy.slow("p0", 4.0)
    assert policy.assign(4.0, only="p4") == {}  # the piece waits for a faster seeder
    assert len(policy.assign(4.0, only="p0")["p0"]) == 1
    # The general round passes it over too while others have room...
    others = policy.assign(4.0)
    assert "p4" not in others and sorted(others) == ["p1", "p2", "p3"]
    # ...but takes it when no one else can pull.
    assert policy.assign(4.0) == {"p4": [policy.assignments("p4")[0]]}
    check_invariants(policy)
    # A faster pull brings it back (the rate is smoothed over its pulls).
    policy.piece_present(policy.assignments("p4")[0], 4.5)
    assert not policy.slow("p4", 4.5)
    # Without a time (older callers), a finished pull says nothing of the rate.
    before = policy.median_rate(10.0)
    policy.piece_present(policy.assignments("p0")[0])
    assert policy.median_rate(20.0) == before


def test_rates_of_a_seeder_that_left_no_longer_count() -> None:
    policy = make(20, peers=4, per_peer_limit=1)
    first = policy.assign(0.0)
    for peer, done in (("p0", 1.0), ("p1", 1.0), ("p2", 1.0), ("p3", 8.0)):
        policy.piece_present(first[peer][0], done)
    assert policy.slow("p3", 8.0)
    policy.peer_left("p0", 9.0)
    assert policy.median_rate(9.0) == 0 and not policy.slow("p3", 9.0)  # three rated: no judgement


def test_a_slow_judgement_lapses_so_the_seeder_is_measured_again() -> None:
    policy = make(50, peers=5, per_peer_limit=1)
    first = policy.assign(0.0)
    for peer in ("p0", "p1", "p2", "p3"):
        policy.piece_present(first[peer][0], 1.0)
    policy.piece_present(first["p4"][0], 5.0)  # a 5 s pull: judged for 15 s
    assert policy.slow("p4", 19.9) and policy.assign(19.9, only="p4") == {}
    assert not policy.slow("p4", 20.0)
    assert len(policy.assign(20.0, only="p4")["p4"]) == 1  # one piece, measured anew


def _all_present(policy: SeederAssignment[str], now: float = 1.0) -> None:
    """Every piece pulled once (its one origin copy), by whoever got it."""
    while policy.unassigned or policy.in_flight:
        policy.assign(now)
        for peer in policy.peers:
            for piece in policy.assignments(peer):
                policy.piece_present(piece, now)


def test_no_extra_origin_copies_by_default() -> None:
    policy = make(4, 2)
    _all_present(policy)
    assert not policy.copy_room("p0", 2.0)
    assert policy.assign_copy("p0", 2.0, [0, 1, 2, 3]) is None
    with pytest.raises(ValueError, match="origin_copies"):
        SeederAssignment([PIECE], origin_copies=0.5, rng=random.Random(0))


def test_copies_go_out_only_while_the_origin_would_idle_and_within_their_budget() -> None:
    policy: SeederAssignment[str] = SeederAssignment(
        [PIECE] * 6, per_peer_limit=2, min_in_flight=1, origin_copies=4 / 3, rng=random.Random(0)
    )
    policy.peer_joined("p0", 0.0)
    policy.peer_joined("p1", 0.0)
    policy.assign(0.0)
    # Pieces still wait for their one origin copy: the origin has better to do.
    assert policy.unassigned and not policy.copy_room("p0", 0.5)
    _all_present(policy)
    # A third of an artifact of copies (2 pieces), the rarest candidate first.
    assert policy.assign_copy("p0", 2.0, [3, 1]) == 3
    assert policy.assignments("p0") == [3] and policy.pulling("p0", 3)
    assert policy.copies_in_flight == 1 and policy.owner(3) is None
    assert policy.assign_copy("p0", 2.0, [3, 1]) == 1  # its limit is 2
    assert not policy.copy_room("p0", 2.0)  # at its limit
    assert not policy.copy_room("p1", 2.0)  # and the budget's bytes are spent
    # A copy that stalls is dropped, not put back for anyone else; once any of it
    # was read its bytes stay spent (the budget is a cap on what the origin sends).
    assert policy.progress("p0", 1, 400, 3.0)
    assert policy.copy_done("p0", 3)
    assert policy.tick(40.0) == [] and policy.copies_of("p0") == []
    assert policy.unassigned == 0 and policy.all_present
    stats = policy.stats
    assert (stats.copies, stats.copy_bytes) == (2, PIECE)
    assert stats.origin_bytes == 6 * PIECE + PIECE + 400  # one copy each, one more, 400 B
    assert not policy.copy_room("p1", 41.0)  # nothing left of the budget
    assert policy.assign_copy("p1", 41.0, [2, 0]) is None
    # A peer that leaves takes its copies with it.
    policy2: SeederAssignment[str] = SeederAssignment(
        [PIECE] * 2, per_peer_limit=2, min_in_flight=1, origin_copies=3.0, rng=random.Random(1)
    )
    policy2.peer_joined("a", 0.0)
    _all_present(policy2)
    assert policy2.assign_copy("a", 2.0, [0]) == 0
    assert policy2.peer_left("a", 3.0) == [] and policy2.copies_in_flight == 0


def test_copies_give_way_to_pieces_that_need_their_one_origin_copy() -> None:
    """A seeder leaves with its pulls after the copies went out: the copies are
    dropped (least read first) so its pieces get slots at once; a lost piece that
    a peer pulls a copy of becomes that peer's pull, not a second one."""
    policy: SeederAssignment[str] = SeederAssignment(
        [PIECE] * 4,
        per_peer_limit=2,
        min_in_flight=1,
        origin_budget=2,
        origin_copies=3.0,
        rng=random.Random(0),
    )
    for peer in ("a", "b"):
        policy.peer_joined(peer, 0.0)
    _all_present(policy)
    assert policy.assign_copy("a", 2.0, [0, 1, 2, 3]) is not None
    assert policy.assign_copy("b", 2.0, [0, 1, 2, 3]) is not None
    assert policy.copies_in_flight == 2 and not policy.copy_room("a", 2.0)  # budget of 2
    a_copy = policy.copies_of("a")[0]
    assert policy.progress("a", a_copy, 100, 2.5)
    # b's copy is the least read: it makes way when a lost piece needs the slot.
    lost = next(p for p in range(4) if p != a_copy)
    assert policy.piece_lost(lost)
    new = policy.assign(3.0)
    assert policy.copies_of("b") == [] and policy.copies_of("a") == [a_copy]
    assert sum(len(v) for v in new.values()) == 1 and policy.in_flight == 1
    # a's copy piece is lost too: it is a's pull from now on, read bytes kept.
    assert policy.piece_lost(a_copy)
    policy.peer_left("b", 4.0)
    policy.assign(4.0)
    assert policy.owner(a_copy) == "a" and policy.copies_of("a") == []
    assert policy.progress_of("a", a_copy) == 100
    assert policy.assignments("a").count(a_copy) == 1
