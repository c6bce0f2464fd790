"""Which peers to put in an announce reply when peers declare a zone (or rack).

A peer may declare a zone: a failure and bandwidth domain such as a rack, whose
nodes share a top-of-rack switch, or a cloud availability zone. Traffic inside a
zone is cheap and fast; traffic between zones crosses oversubscribed uplinks
(or is billed per byte). The tracker therefore fills most of a peer's sample
with peers of its own zone, and the picker (:mod:`swarm.picker`) asks a peer of
another zone only for pieces no same-zone neighbour has.

The split, and why
    Of a sample of ``k`` peers, about a quarter (``cross_share``, at least
    ``min_cross``, at most half) come from other zones; the rest from the
    peer's own zone, while it has enough peers. The cross-zone peers are the
    zone's import links: every piece must enter each zone at least once (from
    the origin or from another zone), so each zone needs some. Cross-zone
    neighbours are cheap to keep, because the picker moves bytes over them only
    for pieces missing from the zone; and they are what keeps a zone from
    islanding itself: with each of its peers holding a few neighbours in random
    other zones, the graph of zones is connected with overwhelming
    probability, even when a zone has only a few peers or loses its seeders.
    A zone with too few peers to fill its share leaves the rest to other zones,
    and the other way round, so a sample is never smaller than without zones.

A peer with no zone (``""``) gets a uniform sample of everyone, as without
zones; to a peer that has one, a zoneless peer is in another zone.

Pure policy: randomness is passed in, nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Hashable, Iterator, Sequence
from typing import Final, Generic, TypeVar

__all__ = ["CROSS_SHARE", "MIN_CROSS", "NO_ZONE", "ZoneIndex", "split_sample"]

PeerT = TypeVar("PeerT", bound=Hashable)

NO_ZONE: Final = ""
CROSS_SHARE: Final = 0.25
"""Fraction of a sample drawn from other zones (see the module docstring)."""
MIN_CROSS: Final = 2
"""Cross-zone peers in every sample of at least ``2 * MIN_CROSS`` peers."""


def split_sample(
    k: int,
    same_available: int,
    other_available: int,
    *,
    cross_share: float = CROSS_SHARE,
    min_cross: int = MIN_CROSS,
) -> tuple[int, int]:
    """How many of a sample of up to ``k`` peers to draw from the own zone and from others.

    ``same_available`` and ``other_available`` are the candidates in each group
    (the asking peer not counted). Returns ``(same, cross)``: cross-zone peers
    get ``max(min_cross, ceil(k * cross_share))`` places, never more than half
    of ``k``; a group too small for its places leaves them to the other group.
    """
    if k < 0 or same_available < 0 or other_available < 0:
        raise ValueError(f"counts must be >= 0, got {k}, {same_available}, {other_available}")
    if not 0.0 <= cross_share <= 1.0 or min_cross < 0:
        raise ValueError(f"cross_share must be in [0, 1] and min_cross >= 0, got {cross_share}")
    cross_places = min(max(min_cross, math.ceil(k * cross_share)), k // 2)
    same = min(same_available, k - min(cross_places, other_available))
    cross = min(other_available, k - same)
    return same, cross


class ZoneIndex(Generic[PeerT]):
    """Live peers by zone, for samples that prefer the asking peer's zone.

    Each zone's peers are kept in a list with O(1) removal (the last one moves
    into the hole), so adding, removing and moving a peer cost O(1), and a
    sample of ``k`` costs O(k log k + number of zones), never the swarm's size.
    """

    def __init__(self) -> None:
        self._members: dict[str, list[PeerT]] = {}
        self._where: dict[PeerT, tuple[str, int]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, peer: object) -> bool:
        return peer in self._where

    def __iter__(self) -> Iterator[PeerT]:
        return iter(self._where)

    def zone(self, peer: PeerT) -> str | None:
        """``peer``'s zone, or None if it is not in the index."""
        where = self._where.get(peer)
        return None if where is None else where[0]

    def zones(self) -> dict[str, int]:
        """Peers per zone."""
        return {zone: len(members) for zone, members in self._members.items()}

    def add(self, peer: PeerT, zone: str = NO_ZONE) -> None:
        """Add ``peer`` in ``zone``; a known peer moves to ``zone`` if it differs."""
        where = self._where.get(peer)
        if where is not None:
            if where[0] == zone:
                return
            self.remove(peer)
        members = self._members.setdefault(zone, [])
        self._where[peer] = (zone, len(members))
        members.append(peer)

    def remove(self, peer: PeerT) -> bool:
        """Forget ``peer``; False if it was not in the index."""
        where = self._where.pop(peer, None)
        if where is None:
            return False
        zone, index = where
        members = self._members[zone]
        last = members.pop()
        if last != peer:
            members[index] = last
            self._where[last] = (zone, index)
        if not members:
            del self._members[zone]
        return True

    def sample(
        self,
        zone: str,
        k: int,
        rng: random.Random,
        *,
        exclude: PeerT | None = None,
    ) -> list[PeerT]:
        """Up to ``k`` distinct peers for a peer of ``zone``, same zone first (see the module doc).

        ``exclude`` (the asking peer) is never returned. The result lists the
        same-zone peers, then the cross-zone ones.
        """
        if k <= 0 or not self._where:
            return []
        skip = exclude if exclude is not None and exclude in self._where else None
        if zone == NO_ZONE:
            everyone = list(self._members.values())
            return _draw(everyone, len(self._where), k, rng, skip)
        same_members = self._members.get(zone, [])
        others = [members for name, members in self._members.items() if name != zone]
        own_skip = skip is not None and self._where[skip][0] == zone
        same_available = len(same_members) - (1 if own_skip else 0)
        other_total = len(self._where) - len(same_members)
        other_available = other_total - (1 if skip is not None and not own_skip else 0)
        same, cross = split_sample(k, same_available, other_available)
        return [
            *_draw([same_members], len(same_members), same, rng, skip),
            *_draw(others, other_total, cross, rng, skip),
        ]


def _draw(
    groups: Sequence[Sequence[PeerT]],
    total: int,
    count: int,
    rng: random.Random,
    skip: PeerT | None,
) -> list[PeerT]:
    """``count`` distinct peers drawn uniformly from the concatenation of ``groups``.

    ``total`` is the groups' combined length. One spare is drawn so that ``skip``
    can be dropped without a second round. With one group this is exactly the
    draw of a plain ``rng.sample`` of the group, so a swarm without zones gets
    the samples (and leaves the shared ``rng`` in the state) it always did.
    """
    if count <= 0 or total <= 0:
        return []
    starts: list[int] = []
    base = 0
    for group in groups:
        starts.append(base)
        base += len(group)
    picked: list[PeerT] = []
    for position in rng.sample(range(total), min(total, count + 1)):
        index = bisect_right(starts, position) - 1
        peer = groups[index][position - starts[index]]
        if peer != skip:
            picked.append(peer)
    del picked[count:]
    return picked
