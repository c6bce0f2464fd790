from __future__ import annotations

import random
from collections import Counter

import pytest

from swarm.choker import MAX_PASSED, MAX_SKIPS, UploadScheduler


def drain(scheduler: UploadScheduler[str, int]) -> list[tuple[str, int]]:
    """Serve everything, finishing each send right after it starts."""
    served: list[tuple[str, int]] = []
    for _ in range(10_000):
        grant = scheduler.next()
        if grant is None:
            break
        served.append(grant)
        scheduler.done(*grant)
    return served


def test_every_requester_is_served() -> None:
    scheduler: UploadScheduler[str, int] = UploadScheduler(2)
    for peer in ("a", "b", "c"):
        assert scheduler.enqueue(peer, 1)
    assert sorted(drain(scheduler)) == [("a", 1), ("b", 1), ("c", 1)]
    assert scheduler.pending == 0
    assert scheduler.active == 0


def test_round_robin_does_not_let_a_deep_pipeline_starve_others() -> None:
    scheduler: UploadScheduler[str, int] = UploadScheduler(1)
    for request in range(50):
        scheduler.enqueue("greedy", request)
    scheduler.enqueue("small", 0)
    scheduler.enqueue("small", 1)
    served = drain(scheduler)
    assert served[:4] == [("greedy", 0), ("small", 0), ("greedy", 1), ("small", 1)]
    assert [r for p, r in served if p == "greedy"] == list(range(50))  # FIFO per peer


def test_slots_are_bounded_and_freed_by_done() -> None:
    scheduler: UploadScheduler[str, int] = UploadScheduler(2)
    for request in range(3):
        scheduler.enqueue("a", request)
    first = scheduler.next()
    second = scheduler.next()
    assert first == ("a", 0) and second == ("a", 1)
    assert scheduler.next() is None  # both slots busy
    assert scheduler.active == 2
    assert scheduler.active_for("a") == [0, 1]
    scheduler.done("a", 1)
    assert scheduler.next() == ("a", 2)
    scheduler.done("a", 99)  # unknown: ignored
    assert scheduler.active == 2


def test_cancel_only_pending() -> None:
    scheduler: UploadScheduler[str, int] = UploadScheduler(1)
    scheduler.enqueue("a", 1)
    scheduler.enqueue("a", 2)
    assert scheduler.next() == ("a", 1)
    assert not scheduler.cancel("a", 1)  # already sending
    assert scheduler.cancel("a", 2)
    assert not scheduler.cancel("a", 2)
    assert scheduler.queued("a") == 0
    scheduler.done("a", 1)
    assert scheduler.next() is None


def test_duplicates_and_queue_bound() -> None:
    scheduler: UploadScheduler[str, int] = UploadScheduler(1, max_queue=2)
    assert scheduler.enqueue("a", 1)
    assert scheduler.enqueue("a", 1)  # same request: kept once
    assert scheduler.enqueue("a", 2)
    assert not scheduler.enqueue("a", 3)
    assert scheduler.queued("a") == 2
    assert scheduler.enqueue("b", 3)  # the bound is per peer


def test_peer_gone_frees_slots_and_queue() -> None:
    scheduler: UploadScheduler[str, int] = UploadScheduler(2)
    for request in range(4):
        scheduler.enqueue("a", request)
    scheduler.enqueue("b", 0)
    grants = [scheduler.next(), scheduler.next()]
    assert grants == [("a", 0), ("b", 0)]
    assert scheduler.peer_gone("a") == [0]
    assert scheduler.active == 1
    assert scheduler.pending == 0
    scheduler.done("a", 0)  # late completion of a gone peer: ignored
    assert scheduler.active == 1


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        UploadScheduler(0)
    with pytest.raises(ValueError):
        UploadScheduler(1, max_queue=0)


def test_fair_share_under_random_arrivals() -> None:
    rng = random.Random(11)
    scheduler: UploadScheduler[str, int] = UploadScheduler(3)
    peers = [f"p{i}" for i in range(8)]
    served: Counter[str] = Counter()
    in_flight: list[tuple[str, int]] = []
    counter = 0
    for _ in range(3000):
        for peer in peers:  # everyone keeps its pipeline full
            while scheduler.queued(peer) < (1 + peers.index(peer) * 4):
                counter += 1
                scheduler.enqueue(peer, counter)
        while (grant := scheduler.next()) is not None:
            in_flight.append(grant)
        finished = in_flight.pop(rng.randrange(len(in_flight)))
        scheduler.done(*finished)
        served[finished[0]] += 1
    # Pipelines 1..29 deep, yet every peer got about the same share.
    assert max(served.values()) - min(served.values()) <= 0.1 * 3000 / len(peers)


def test_a_peer_holds_at_most_max_per_peer_slots_however_its_requests_arrive() -> None:
    sched: UploadScheduler[str, int] = UploadScheduler(16, max_per_peer=2)
    granted = []
    for request in range(10):  # one at a time, each granted before the next arrives
        sched.enqueue("greedy", request)
        while (nxt := sched.next()) is not None:
            granted.append(nxt)
    assert granted == [("greedy", 0), ("greedy", 1)]
    sched.enqueue("modest", 100)
    assert sched.next() == ("modest", 100)  # another peer is served meanwhile
    sched.done("greedy", 0)
    assert sched.next() == ("greedy", 2) and sched.next() is None


def test_the_requester_furthest_behind_is_served_first() -> None:
    held = {"ahead": 90, "behind": 3, "middle": 40}
    sched: UploadScheduler[str, int] = UploadScheduler(1, progress=held.__getitem__)
    for peer in ("ahead", "middle", "behind"):
        sched.enqueue(peer, 0)
        sched.enqueue(peer, 1)
    order = [peer for peer, _ in drain(sched)]
    assert order == ["behind", "behind", "middle", "middle", "ahead", "ahead"]


def test_progress_is_read_at_each_grant_and_ties_go_round_robin() -> None:
    held = {"a": 5, "b": 5, "c": 9}
    sched: UploadScheduler[str, int] = UploadScheduler(1, progress=held.__getitem__)
    for peer in ("a", "b", "c"):
        for request in range(3):
            sched.enqueue(peer, request)
    served = []
    for _ in range(4):
        grant = sched.next()
        assert grant is not None
        served.append(grant[0])
        sched.done(*grant)
    assert served == ["a", "b", "a", "b"]  # equals alternate; c, ahead, waits
    held["c"] = 0  # c's next Request says it fell behind (say its disk was wiped)
    grant = sched.next()
    assert grant is not None and grant[0] == "c"


def test_a_peer_behind_still_holds_at_most_max_per_peer_slots() -> None:
    held = {"liar": 0, "honest": 50}
    sched: UploadScheduler[str, int] = UploadScheduler(4, max_per_peer=2, progress=held.__getitem__)
    for request in range(10):
        sched.enqueue("liar", request)
        sched.enqueue("honest", request)
    grants = [sched.next() for _ in range(4)]
    peers = Counter(grant[0] for grant in grants if grant is not None)
    assert peers == {"liar": 2, "honest": 2}
    assert sched.next() is None


def test_of_a_peers_first_requests_the_block_with_fewest_copies_goes_first() -> None:
    # Block -> copies known (holders of its piece + times sent); a send adds one.
    copies = {10: 3, 11: 1, 12: 0, 13: 1, 14: 0}
    scheduler: UploadScheduler[str, int] = UploadScheduler(1, copies=copies.__getitem__)
    for block in copies:
        scheduler.enqueue("a", block)
    served = []
    for _ in range(len(copies)):
        grant = scheduler.next()
        assert grant is not None
        served.append(grant[1])
        copies[grant[1]] += 1
        scheduler.done(*grant)
    # 14 (no copies) is beyond the first LOOKAHEAD (4) until 12 has gone; then
    # it goes before 11 and 13, which go in arrival order (equal copies).
    assert served == [12, 14, 11, 13, 10]


def test_a_request_passed_over_max_skips_times_goes_next() -> None:
    scheduler: UploadScheduler[str, int] = UploadScheduler(1, copies=lambda r: 1 if r == 0 else 0)
    scheduler.enqueue("a", 0)  # the oldest: every fresh block passes it
    fresh = iter(range(1, 1000))
    for _ in range(3):
        scheduler.enqueue("a", next(fresh))
    served = []
    for _ in range(MAX_SKIPS + 1):
        grant = scheduler.next()
        assert grant is not None
        served.append(grant[1])
        scheduler.done(*grant)
        scheduler.enqueue("a", next(fresh))  # a stream of fresher requests
    assert 0 not in served[:MAX_SKIPS] and served[MAX_SKIPS] == 0


def test_a_peer_ahead_waits_at_most_max_passed_grants_for_peers_behind() -> None:
    progress = {"ahead": 2}
    sched: UploadScheduler[str, int] = UploadScheduler(1, progress=lambda p: progress.get(p, 0))
    assert sched.enqueue("ahead", 0)
    for i in range(3 * MAX_PASSED):
        assert sched.enqueue(f"behind-{i}", i)
    granted = []
    for _ in range(3 * MAX_PASSED + 1):
        grant = sched.next()
        assert grant is not None
        granted.append(grant[0])
        sched.done(*grant)
    # Peers further behind go first, but not forever: the one that led the
    # line is served once it has lost MAX_PASSED grants in a row.
    assert granted.index("ahead") == MAX_PASSED
    assert granted[:MAX_PASSED] == [f"behind-{i}" for i in range(MAX_PASSED)]


def test_the_passed_count_starts_over_when_the_head_of_the_line_is_served() -> None:
    progress = {"a": 5, "b": 5}
    sched: UploadScheduler[str, int] = UploadScheduler(1, progress=lambda p: progress.get(p, 0))
    for request in range(2):
        assert sched.enqueue("a", request)
        assert sched.enqueue("b", request)
    for i in range(MAX_PASSED):
        assert sched.enqueue(f"behind-{i}", i)
    order = []
    for _ in range(4 + MAX_PASSED + 1):
        grant = sched.next()
        if grant is None:
            break
        order.append(grant[0])
        sched.done(*grant)
    assert order[MAX_PASSED] == "a"  # passed MAX_PASSED times at the head
    assert sorted(order) == sorted(
        ["a", "a", "b", "b"] + [f"behind-{i}" for i in range(MAX_PASSED)]
    )
