"""tracker.warm.WarmBook: who is asked to preheat what (policy only, time passed in)."""

from __future__ import annotations

import pytest

from tracker.warm import ALL, MAX_HOLDS, WarmBook, WarmError

R = "ab" * 32


def test_just_enough_agents_are_asked_and_each_once() -> None:
    book = WarmBook(agent_ttl=30, assign_ttl=60)
    for a in "abcd":
        assert book.poll(a, set(), set(), 0.0) == []
    book.request(R, f"m@{R}", 2, 1.0)
    asked = [a for a in "abcd" if book.poll(a, set(), set(), 2.0)]
    assert asked == ["a", "b"]  # two wanted, two asked; the others not
    assert book.poll("a", set(), set(), 3.0) == []  # asked already, not again
    # a reports it holds the version (fetching): still two on their way, none more.
    assert book.poll("a", {R}, set(), 4.0) == []
    assert book.poll("c", set(), set(), 4.0) == []
    book.poll("a", {R}, {R}, 5.0)
    book.poll("b", {R}, {R}, 5.0)
    assert book.status(R, 5.0) == {
        "ref": f"m@{R}",
        "wanted": 2,
        "all_nodes": False,
        "agents": 4,
        "holding": 2,
        "verified": 2,
    }


def test_an_agent_asked_that_never_shows_the_version_is_replaced() -> None:
    book = WarmBook(agent_ttl=1000, assign_ttl=10)
    book.poll("a", set(), set(), 0.0)
    book.poll("b", set(), set(), 0.0)
    book.request(R, "m", 1, 0.0)
    assert book.poll("a", set(), set(), 1.0) == ["m"]
    assert book.poll("b", set(), set(), 2.0) == []
    assert book.poll("b", set(), set(), 12.0) == ["m"]  # a's turn expired


def test_all_nodes_follows_the_live_agents_and_dead_ones_stop_counting() -> None:
    book = WarmBook(agent_ttl=30, assign_ttl=60)
    book.request(R, "m", ALL, 0.0)
    assert book.poll("a", set(), set(), 1.0) == ["m"]
    assert book.poll("b", set(), set(), 1.0) == ["m"]
    book.poll("a", {R}, {R}, 2.0)
    book.poll("b", {R}, {R}, 2.0)
    status = book.status(R, 2.0)
    assert status is not None and status["wanted"] == 2 and status["verified"] == 2
    assert book.poll("c", set(), set(), 3.0) == ["m"]  # a node that joins later too
    # b stops polling (its node went away): it no longer counts.
    book.poll("a", {R}, {R}, 40.0)
    status = book.status(R, 40.0)
    assert status is not None and status["agents"] == 1 and status["verified"] == 1


def test_requests_merge_expire_and_are_bounded() -> None:
    book = WarmBook(request_ttl=100)
    book.request(R, "m", 1, 0.0)
    book.request(R, "m", 3, 1.0)
    assert book.status(R, 1.0)["wanted"] == 3  # type: ignore[index]
    book.request(R, "m", ALL, 2.0)
    assert book.status(R, 2.0)["all_nodes"] is True  # type: ignore[index]
    assert book.status(R, 103.0) is None
    with pytest.raises(WarmError):
        book.request(R, "m", 0, 0.0)
    with pytest.raises(WarmError):
        book.poll("a", {str(i) for i in range(MAX_HOLDS + 1)}, set(), 0.0)
    with pytest.raises(WarmError):
        book.poll("a", set(), {R}, 0.0)  # verified but not held
