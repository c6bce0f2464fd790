from __future__ import annotations

import json
import random
from collections.abc import Iterable
from typing import Any

import msgpack
import pytest

from core.bitfield import Bitfield
from swarm.picker import PiecePicker
from tracker.errors import BadAnnounceError, TrackerError
from tracker.registry import AnnounceReply, PeerAddress, SwarmRegistry

PIECE = 1000


def pid(i: int) -> bytes:
    return i.to_bytes(20, "big")


def addr(i: int) -> tuple[str, int]:
    return (f"10.0.0.{i % 250 + 1}", 7000 + i)


def make(num_pieces: int = 10, **kwargs: Any) -> SwarmRegistry:
    kwargs.setdefault("peer_ttl", 60.0)
    kwargs.setdefault("rng", random.Random(0))
    kwargs.setdefault("min_in_flight", 1)  # the per-peer limit alone, as these tests count it
    return SwarmRegistry([PIECE] * num_pieces, **kwargs)


def hello(
    registry: SwarmRegistry,
    i: int,
    now: float,
    have: Bitfield | Iterable[int] | None = None,
    progress: dict[int, int] | None = None,
) -> AnnounceReply:
    return registry.announce(pid(i), addr(i), have, progress or {}, now)


def test_first_announce_registers_and_assigns() -> None:
    registry = make(10, per_peer_limit=2)
    reply = hello(registry, 1, 0.0)
    assert len(reply.assigned) == 2
    assert reply.peers == ()
    assert reply.num_peers == 1
    assert not reply.swarm_complete
    second = hello(registry, 2, 1.0)
    assert second.peers == (PeerAddress(pid(1), *addr(1)),)
    assert set(second.assigned).isdisjoint(reply.assigned)
    assert pid(2) in registry
    assert registry.num_peers == 2


def test_peer_sample_is_bounded_random_and_excludes_self() -> None:
    registry = make(4, max_peers_in_reply=50)
    for i in range(100):
        hello(registry, i, 0.0)
    replies = [hello(registry, 7, 1.0) for _ in range(2)]
    for reply in replies:
        ids = [p.peer_id for p in reply.peers]
        assert len(ids) == 50
        assert len(set(ids)) == 50
        assert pid(7) not in ids
        assert reply.num_peers == 100
    assert replies[0].peers != replies[1].peers


def test_present_pieces_are_never_assigned() -> None:
    registry = make(10, per_peer_limit=10)
    hello(registry, 1, 0.0, have=Bitfield.from_indices(range(6), 10))
    # Peer 1 itself was assigned what nobody had.
    assert sorted(registry.assignment.assignments(pid(1))) == [6, 7, 8, 9]
    reply = hello(registry, 2, 0.0)
    assert reply.assigned == ()  # everything is present or already assigned
    assert [registry.availability(p) for p in range(10)] == [1] * 6 + [0] * 4


def test_incremental_haves_complete_the_swarm() -> None:
    registry = make(4, per_peer_limit=4)
    reply = hello(registry, 1, 0.0, have=[])
    assert sorted(reply.assigned) == [0, 1, 2, 3]
    hello(registry, 1, 1.0, have=[0, 1])
    reply = hello(registry, 1, 2.0, have=iter([2, 3]))
    assert reply.assigned == ()
    assert reply.swarm_complete
    assert registry.assignment.stats.pulled == {pid(1): 4}
    other = hello(registry, 2, 3.0)
    assert not other.swarm_complete
    done = hello(registry, 2, 4.0, have=Bitfield.full(4))
    assert done.swarm_complete
    assert registry.status()["finished_peers"] == 2


def test_origin_progress_and_stall_through_announces() -> None:
    registry = make(2, per_peer_limit=1, stall_timeout=30.0)
    first = hello(registry, 1, 0.0)
    hello(registry, 2, 0.0)
    (piece,) = first.assigned
    # Peer 1 keeps reporting the same byte count: no progress.
    for t in (10.0, 20.0):
        assert hello(registry, 1, t, progress={piece: 500}).assigned == (piece,)
    stalled = hello(registry, 1, 45.0, progress={piece: 500})
    assert piece not in stalled.assigned
    # It waits for another seeder's announce: assigned, it starts with the reply.
    assert registry.assignment.owner(piece) is None
    assert piece in hello(registry, 2, 46.0).assigned
    assert registry.assignment.owner(piece) == pid(2)


def test_a_seeder_that_finishes_a_pull_takes_the_next_piece_itself() -> None:
    registry = make(8, per_peer_limit=1)
    (first,) = hello(registry, 1, 0.0).assigned
    (second,) = hello(registry, 2, 0.0).assigned
    # Peer 1 finishes and announces at once: the next piece is its own, not one
    # parked on peer 2 (busy) or on a peer that would hear of it an interval later.
    reply = hello(registry, 1, 0.5, have=[first])
    assert len(reply.assigned) == 1 and reply.assigned[0] not in (first, second)
    assert registry.assignment.in_flight == 2


def test_slow_but_moving_seeder_keeps_its_piece() -> None:
    registry = make(2, per_peer_limit=1, stall_timeout=30.0)
    (piece,) = hello(registry, 1, 0.0).assigned
    hello(registry, 2, 0.0)
    for step in range(1, 10):
        reply = hello(registry, 1, step * 20.0, progress={piece: step})
        hello(registry, 2, step * 20.0)
        assert reply.assigned == (piece,)


def test_expired_peer_pieces_go_to_others() -> None:
    registry = make(4, peer_ttl=60.0, per_peer_limit=2)
    gone = hello(registry, 1, 0.0, have=[0]).assigned  # two of pieces 1..3
    hello(registry, 2, 30.0)  # gets the remaining one
    assert registry.expire(59.0) == []
    assert registry.expire(61.0) == [pid(1)]
    assert pid(1) not in registry
    assert registry.availability(0) == 0
    assert registry.assignment.stats.lost == 1
    # Piece 0 was only on peer 1: it goes back to the origin pool with peer 1's
    # pulls, and peer 2 (one free slot) gets the first of them.
    reply = hello(registry, 2, 62.0)
    assert len(reply.assigned) == 2
    third = hello(registry, 3, 62.0)
    assert set(reply.assigned) | set(third.assigned) == {0, 1, 2, 3}
    assert set(gone) <= set(reply.assigned) | set(third.assigned)


def test_announce_expires_silent_peers() -> None:
    registry = make(3, peer_ttl=10.0)
    hello(registry, 1, 0.0)
    hello(registry, 2, 5.0)
    reply = hello(registry, 2, 12.0)
    assert reply.num_peers == 1
    assert pid(1) not in registry


def test_leave_reassigns_and_returns_lost_pieces() -> None:
    registry = make(3, per_peer_limit=3)
    first = hello(registry, 1, 0.0)
    assert sorted(first.assigned) == [0, 1, 2]
    hello(registry, 1, 1.0, have=[0, 1])  # pulled two, still pulling 2
    hello(registry, 2, 1.0, have=[1])
    assert registry.leave(pid(1), 2.0)
    assert not registry.leave(pid(1), 2.0)
    # Piece 0 was only on peer 1 and piece 2 was its pull: both go to peer 2.
    reply = hello(registry, 2, 3.0)
    assert sorted(reply.assigned) == [0, 2]
    assert registry.availability(1) == 1


def test_replacing_bitfield_drops_pieces() -> None:
    registry = make(3, per_peer_limit=1)
    hello(registry, 1, 0.0, have=Bitfield.full(3))
    assert hello(registry, 1, 1.0).swarm_complete
    reply = hello(registry, 1, 2.0, have=Bitfield.from_indices([0, 1], 3))
    assert not reply.swarm_complete
    assert registry.availability(2) == 0
    assert reply.assigned == (2,)


def test_restart_rebuilds_from_announces() -> None:
    """A new tracker fed the next announces re-assigns nothing present or in flight."""
    before = make(20, per_peer_limit=2, rng=random.Random(1))
    haves: dict[int, list[int]] = {}
    pulls: dict[int, dict[int, int]] = {}
    for i in range(4):
        reply = hello(before, i, 0.0)
        pulls[i] = {p: 300 for p in reply.assigned}
    for i in range(4):
        haves[i] = [p for p in range(20) if i in (p % 4, (p + 1) % 4) and p < 8]
        hello(before, i, 1.0, have=haves[i], progress=pulls[i])
    present = {p for h in haves.values() for p in h}

    after = make(20, per_peer_limit=2, rng=random.Random(2), assign_after=10.0)
    for i in range(4):
        have = Bitfield.from_indices(haves[i], 20)
        in_flight = {p: b for p, b in pulls[i].items() if p not in present}
        reply = hello(after, i, 5.0, have=have, progress=in_flight)
        # In-flight pulls are adopted by the peer doing them.
        assert set(reply.assigned) == set(in_flight)
    for i in range(4):
        reply = hello(after, i, 11.0, have=[])
        assert not set(reply.assigned) & present
    owners = [after.assignment.owner(p) for p in range(20)]
    assert all(owners[p] is None for p in present)
    adopted = {p for i in range(4) for p in pulls[i] if p not in present}
    for i in range(4):
        for p in pulls[i]:
            if p in adopted:
                assert owners[p] == pid(i)


def test_status_is_json_able() -> None:
    registry = make(5)
    hello(registry, 1, 0.0, have=[0, 1])
    hello(registry, 2, 1.0)
    status = registry.status()
    decoded = json.loads(json.dumps(status))
    assert decoded["pieces"] == 5
    assert decoded["peers"] == 2
    assert decoded["present_pieces"] == 2
    assert decoded["availability"] == {"min": 0, "max": 1, "mean": 0.4, "missing": 3}
    by_id = {p["peer_id"]: p for p in decoded["peer_list"]}
    assert by_id[pid(1).hex()]["have"] == 2
    assert by_id[pid(1).hex()]["port"] == 7001
    assigned = sum(len(p["assigned"]) for p in decoded["peer_list"])
    assert assigned == decoded["origin"]["in_flight"] == 3


@pytest.mark.parametrize(
    ("peer", "address", "have", "progress", "match"),
    [
        (b"short", ("h", 1), None, {}, "peer id must be 20 bytes"),
        (pid(1), ("h",), None, {}, "address must be"),
        (pid(1), ("", 1), None, {}, "host"),
        (pid(1), ("h", 0), None, {}, "port"),
        (pid(1), ("h", 1), Bitfield(4), {}, "covers 4 pieces, the artifact has 5"),
        (pid(1), ("h", 1), [5], {}, "have names piece 5"),
        (pid(1), ("h", 1), ["x"], {}, "not an integer"),
        (pid(1), ("h", 1), None, {0: PIECE + 1}, "progress for piece 0"),
        (pid(1), ("h", 1), None, {9: 1}, "progress names piece 9"),
    ],
)
def test_bad_announces_are_refused_without_changes(
    peer: bytes, address: Any, have: Any, progress: dict[int, int], match: str
) -> None:
    registry = make(5)
    with pytest.raises(BadAnnounceError, match=match) as info:
        registry.announce(peer, address, have, progress, 0.0)
    assert isinstance(info.value, TrackerError)
    assert registry.num_peers == 0


def test_bad_configuration() -> None:
    with pytest.raises(ValueError):
        make(peer_ttl=0)
    with pytest.raises(ValueError):
        make(max_peers_in_reply=-1)


def test_hundred_peer_swarm_pulls_each_piece_once() -> None:
    """Every piece is pulled from the origin exactly once, spread over the peers."""
    num_pieces, num_peers = 300, 100
    registry = make(num_pieces, per_peer_limit=2, rng=random.Random(4))
    pulling: dict[int, list[int]] = {}
    now = 0.0
    for _ in range(50):
        for i in range(num_peers):
            done = pulling.get(i, [])[:1]  # one origin piece finished per round
            reply = hello(registry, i, now, have=done)
            pulling[i] = [p for p in reply.assigned if p not in done]
        now += 1.0
        if registry.assignment.all_present:
            break
    assert registry.assignment.all_present
    stats = registry.assignment.stats
    assert stats.assigned == num_pieces  # nothing assigned twice
    assert stats.reassigned == 0
    assert max(stats.pulled.values()) - min(stats.pulled.values()) <= 2


def test_registry_and_pickers_compose_into_a_swarm() -> None:
    """Origin pulls via the registry, exchange via pickers: each piece leaves the origin once."""
    num_pieces, num_peers, block = 24, 6, 400
    rng = random.Random(9)
    registry = make(num_pieces, per_peer_limit=1, rng=random.Random(9))
    pickers = {
        i: PiecePicker[int]([PIECE] * num_pieces, block, random.Random(i)) for i in range(num_peers)
    }
    origin_pulls = 0
    announced: dict[int, set[int]] = {i: set() for i in range(num_peers)}
    for step in range(400):
        now = float(step)
        for i, picker in pickers.items():
            have = set(picker.have)
            reply = hello(registry, i, now, have=sorted(have - announced[i]))
            announced[i] = have
            for piece in reply.assigned:  # pull one origin piece per step
                if picker.reserve(piece):
                    origin_pulls += 1
                    picker.mark_have(piece)
                break
            for j, other in pickers.items():
                if j != i:
                    other.add_peer(i, picker.have)
        for i, picker in pickers.items():
            for j in rng.sample(range(num_peers), num_peers):
                if j == i:
                    continue
                for request in picker.pick(j, 3):
                    assert request.piece in pickers[j].have
                    picker.block_received(j, request)
                    if picker.piece_complete(request.piece):
                        picker.mark_have(request.piece)
        if all(p.done for p in pickers.values()):
            break
    assert all(p.done for p in pickers.values())
    assert origin_pulls == num_pieces
    assert registry.assignment.stats.assigned == num_pieces


def test_one_report_never_bars_two_distinct_live_reporters_do() -> None:
    registry = make(4, per_peer_limit=1)
    hello(registry, 1, 0.0, have=[0, 1])  # the accused, sole holder of 0 and 1
    hello(registry, 2, 0.0)
    hello(registry, 3, 0.0)
    # Peer 2 reports it again and again: still one reporter.
    for t in (1.0, 2.0, 3.0):
        assert not registry.report(pid(2), pid(1), t)
    assert registry.barred == frozenset() and pid(1) in registry
    assert registry.reports() == {pid(1): frozenset({pid(2)})}
    # Nobody reports themselves, and peers not in the swarm do not count.
    assert not registry.report(pid(1), pid(1), 3.0)
    assert not registry.report(pid(9), pid(1), 3.0)
    assert registry.reports() == {pid(1): frozenset({pid(2)})}
    # A second live peer: barred, out of the swarm, its pieces back to the origin pool.
    assert registry.report(pid(3), pid(1), 4.0)
    assert registry.barred == frozenset({pid(1)}) and pid(1) not in registry
    assert registry.availability(0) == registry.availability(1) == 0
    assert not registry.assignment.is_present(0)
    assert registry.reports() == {}
    # Its next announce neither brings it back nor gives it work.
    reply = hello(registry, 1, 5.0, have=[0, 1])
    assert reply.assigned == () and reply.peers == () and pid(1) not in registry
    status = registry.status()
    assert status["barred"] == [pid(1).hex()] and status["reports"] == {}


def test_a_reporter_that_leaves_takes_its_report_with_it() -> None:
    registry = make(4, peer_ttl=10.0)
    for i in (1, 2, 3):
        hello(registry, i, 0.0)
    assert not registry.report(pid(2), pid(1), 1.0)
    registry.leave(pid(2), 2.0)
    assert registry.reports() == {}
    # A lone report from a newcomer is still only one report.
    hello(registry, 4, 3.0)
    assert not registry.report(pid(4), pid(1), 3.0)
    assert registry.barred == frozenset()
    # Reports against a peer that expired go with it too.
    registry.expire(12.0)
    assert pid(1) not in registry and registry.reports() == {}


def test_bar_reporters_below_two_is_refused() -> None:
    with pytest.raises(ValueError, match="bar_reporters"):
        make(4, bar_reporters=1)


def test_progress_adopts_unassigned_pieces_only_in_the_restart_grace_window() -> None:
    # Within the window (before assign_after) a report adopts the pull...
    registry = make(6, per_peer_limit=2, assign_after=10.0)
    reply = hello(registry, 1, 1.0, progress={4: 100})
    assert reply.assigned == (4,)
    # ...after it, a report for a piece not assigned to the peer is ignored.
    hello(registry, 2, 11.0)
    theirs = registry.assignment.assignments(pid(2))
    reply = hello(registry, 3, 12.0, progress={p: 999 for p in range(6)})
    assert 4 not in reply.assigned and not set(reply.assigned) & set(theirs)
    assert registry.assignment.assignments(pid(2)) == theirs
    assert registry.assignment.owner(4) == pid(1)


def test_a_reported_peers_pieces_stop_counting_so_a_lone_honest_peer_gets_them_from_the_origin() -> (
    None
):
    # Two peers: 1 holds pieces 0 and 1 (and serves them corrupt); 2 holds nothing.
    # Only 2 can report 1, and one report never bars; yet 2 must not wait forever for
    # pieces only a suspect holds: they go back to the origin pool, to 2.
    registry = make(2, per_peer_limit=2)
    hello(registry, 1, 0.0, have=[0, 1])
    reply = hello(registry, 2, 0.0)
    assert reply.assigned == () and registry.assignment.is_present(0)
    assert not registry.report(pid(2), pid(1), 1.0)
    assert registry.barred == frozenset() and pid(1) in registry
    assert registry.availability(0) == registry.availability(1) == 0
    reply = hello(registry, 2, 1.5)
    assert sorted(reply.assigned) == [0, 1]
    # The suspect pulls nothing from the origin meanwhile...
    assert hello(registry, 1, 1.6, have=[0, 1]).assigned == ()
    # ...and once its reporter has gone, its pieces count again.
    registry.leave(pid(2), 2.0)
    assert registry.availability(0) == registry.availability(1) == 1
    assert registry.assignment.is_present(0) and registry.assignment.is_present(1)


def test_a_suspect_that_is_barred_is_uncounted_once() -> None:
    registry = make(3)
    hello(registry, 1, 0.0, have=[0, 1, 2])
    hello(registry, 2, 0.0, have=[0])
    hello(registry, 3, 0.0)
    registry.report(pid(2), pid(1), 1.0)
    assert [registry.availability(p) for p in range(3)] == [1, 0, 0]
    assert registry.report(pid(3), pid(1), 2.0)
    assert [registry.availability(p) for p in range(3)] == [1, 0, 0]
    assert registry.assignment.is_present(0) and not registry.assignment.is_present(1)


def test_reporters_on_one_node_count_once_and_bars_are_forgotten_after_silence() -> None:
    registry = make(2, peer_ttl=10.0)
    hello(registry, 1, 0.0, have=[0, 1])
    # A faulty node reports 1, restarts its fetch (a new peer id) and reports again.
    registry.announce(pid(2), ("10.9.9.9", 7002), None, {}, 0.0)
    registry.announce(pid(3), ("10.9.9.9", 7003), None, {}, 0.0)
    assert not registry.report(pid(2), pid(1), 1.0)
    assert not registry.report(pid(3), pid(1), 1.0)
    assert registry.barred == frozenset()
    # A second node agrees: barred.
    hello(registry, 4, 1.0)
    assert registry.report(pid(4), pid(1), 2.0)
    assert pid(1) in registry.barred
    # The barred id keeps announcing: remembered; silent past the TTL: forgotten.
    hello(registry, 1, 8.0, have=[0, 1])
    registry.expire(17.0)
    assert pid(1) in registry.barred
    registry.expire(18.5)
    assert registry.barred == frozenset()


def test_a_peer_without_origin_credentials_is_never_assigned_origin_pieces() -> None:
    registry = make(6, per_peer_limit=2)
    plain = registry.announce(pid(1), addr(1), Bitfield(6), {}, 0.0, seeder=False)
    assert plain.assigned == ()
    # Progress it claims for a piece is not a pull to adopt: it may not pull at all.
    registry.announce(pid(1), addr(1), None, {0: 100}, 1.0, seeder=False)
    assert registry.assignment.owner(0) is None
    seeder = hello(registry, 2, 2.0)
    assert len(seeder.assigned) >= 2
    again = registry.announce(pid(1), addr(1), None, {}, 3.0, seeder=False)
    assert again.assigned == () and again.num_peers == 2


def test_the_no_origin_flag_travels_in_the_announce_and_is_checked() -> None:
    from swarm.announce import Announce, BadAnnounce

    msg = Announce(ref="m", peer_id=pid(1), port=7000, have=b"", seeder=False)
    assert Announce.decode(msg.encode()).seeder is False
    assert Announce.decode(Announce(ref="m", peer_id=pid(1), port=7000, have=b"").encode()).seeder
    raw = msgpack.unpackb(msg.encode())
    raw["noseed"] = "yes"
    with pytest.raises(BadAnnounce, match="noseed"):
        Announce.decode(msgpack.packb(raw, use_bin_type=True))


def test_origin_copies_go_to_peers_lacking_the_rarest_pieces_and_stay_within_budget() -> None:
    """With --origin-copies 2, once every piece is present a peer with room gets
    copies of the pieces it lacks; one it does not take up (its next announce does
    not report it) is dropped and its budget given back; the origin never sends
    more than 2 x F of whole pieces."""
    registry = make(4, per_peer_limit=2, origin_copies=2.0)
    first = hello(registry, 1, 0.0)
    second = hello(registry, 2, 0.1)
    assert sorted(first.assigned + second.assigned) == [0, 1, 2, 3]
    # Peer 2's pieces are still being pulled: no copies while any piece is not present.
    reply = hello(registry, 1, 1.0, have=first.assigned)
    assert reply.assigned == ()
    reply = hello(registry, 2, 1.1, have=second.assigned)
    assert sorted(reply.assigned) == sorted(first.assigned)  # what it lacks
    reply = hello(registry, 1, 1.2)
    assert sorted(reply.assigned) == sorted(second.assigned)
    assert registry.assignment.copies_of(pid(1)) == list(reply.assigned)
    # It takes one (reports progress), not the other (it got it from peer 2).
    taken, declined = reply.assigned
    reply = hello(registry, 1, 2.0, progress={taken: 10})
    assert reply.assigned == (taken,) and declined not in reply.assigned  # not offered again
    hello(registry, 1, 3.0, have=[taken], progress={taken: PIECE})
    stats = registry.assignment.stats
    assert (stats.copies, stats.copy_bytes) == (4, PIECE)
    status = registry.status()["origin"]
    assert status["copies"] == 4 and status["copy_bytes"] == PIECE
    # The budget: 4 pieces' bytes, one given back: peer 3 joins lacking everything and
    # gets one more whole piece's worth.
    reply = hello(registry, 3, 3.5)
    assert len(reply.assigned) == 1
    assert registry.assignment.stats.copies == 5


def test_no_origin_copies_by_default() -> None:
    registry = make(2, per_peer_limit=2)
    first = hello(registry, 1, 0.0)
    hello(registry, 1, 1.0, have=first.assigned)
    assert hello(registry, 2, 1.5).assigned == ()


def test_a_copy_is_charged_only_when_pulled_and_dropped_when_it_stalls() -> None:
    registry = make(2, per_peer_limit=2, origin_copies=2.0, stall_timeout=5.0)
    first = hello(registry, 1, 0.0)
    assert sorted(first.assigned) == [0, 1]
    hello(registry, 1, 1.0, have=[0, 1], progress={0: PIECE, 1: PIECE})  # its finished pulls
    assert registry.assignment.all_present
    copies = hello(registry, 2, 1.5).assigned
    assert sorted(copies) == [0, 1]  # every piece is out: the origin may serve peer 2
    # Peer 2 got piece 0 from peer 1 instead (never reported pulling it): not charged.
    # Piece 1 it pulls, reports, and then reports finished in the next announce.
    hello(registry, 2, 2.0, progress={1: 10})
    assert registry.assignment.copies_of(pid(2)) == [1]
    hello(registry, 2, 3.0, have=[0, 1], progress={1: PIECE})
    stats = registry.assignment.stats
    assert (stats.copies, stats.copy_bytes) == (2, PIECE)
    assert stats.origin_bytes == 3 * PIECE
    # Peer 3 gets copies too (one piece's worth of budget is left), takes one up and
    # stops reporting progress: with every piece present the stall scan still runs.
    taken = hello(registry, 3, 3.5).assigned
    assert len(taken) == 1
    hello(registry, 3, 4.0, progress={taken[0]: 5})
    hello(registry, 1, 20.0)
    assert registry.assignment.copies_in_flight == 0
    assert registry.status()["origin"]["copies_in_flight"] == 0
