"""Zone preference: the tracker's peer sample (tracker.zones) and its effect in the simulator."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
from servers import free_port

from core.errors import ConfigError
from simulations.runner import run_strategy
from simulations.scenario import Scenario
from tracker.zones import ZoneIndex, split_sample


def index_of(sizes: dict[str, int]) -> ZoneIndex[str]:
    """Peers "a0", "a1", ... in zone "a", and so on."""
    index: ZoneIndex[str] = ZoneIndex()
    for zone, count in sizes.items():
        for i in range(count):
            index.add(f"{zone}{i}", zone)
    return index


def zone_of(peer: str) -> str:
    return peer.rstrip("0123456789")


# -- the split -----------------------------------------------------------------


def test_split_gives_most_places_to_the_own_zone_and_a_few_to_others() -> None:
    assert split_sample(50, 100, 100) == (37, 13)
    assert split_sample(10, 100, 100) == (7, 3)
    assert split_sample(5, 100, 100) == (3, 2)
    assert split_sample(4, 100, 100) == (2, 2)  # the cross-zone minimum
    assert split_sample(2, 100, 100) == (1, 1)  # never more than half
    assert split_sample(1, 100, 100) == (1, 0)
    assert split_sample(0, 100, 100) == (0, 0)


def test_a_short_group_leaves_its_places_to_the_other() -> None:
    assert split_sample(10, 3, 100) == (3, 7)  # small zone: others fill the sample
    assert split_sample(10, 100, 1) == (9, 1)  # one other zone peer: the own zone fills
    assert split_sample(10, 0, 0) == (0, 0)
    assert split_sample(10, 4, 2) == (4, 2)  # everyone, when fewer than k


def test_split_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        split_sample(-1, 1, 1)
    with pytest.raises(ValueError, match="cross_share"):
        split_sample(4, 1, 1, cross_share=1.5)


# -- the index and its samples ------------------------------------------------


def test_sample_prefers_the_own_zone_and_keeps_cross_zone_peers() -> None:
    index = index_of({"a": 30, "b": 30, "c": 30})
    rng = random.Random(1)
    for _ in range(50):
        got = index.sample("a", 20, rng, exclude="a0")
        assert len(got) == len(set(got)) == 20
        assert "a0" not in got
        zones = [zone_of(p) for p in got]
        assert zones.count("a") == 15
        assert {"b", "c"} >= set(zones[15:])
        assert zones[:15] == ["a"] * 15  # same zone first


def test_cross_zone_peers_come_from_every_other_zone_over_many_samples() -> None:
    index = index_of({"a": 10, "b": 10, "c": 10, "d": 10})
    rng = random.Random(2)
    seen: set[str] = set()
    for _ in range(100):
        seen.update(zone_of(p) for p in index.sample("a", 8, rng, exclude="a3"))
    assert seen == {"a", "b", "c", "d"}


def test_a_lone_peer_in_its_zone_still_gets_a_full_sample() -> None:
    index = index_of({"a": 1, "b": 40})
    got = index.sample("a", 10, random.Random(3), exclude="a0")
    assert len(got) == 10 and all(zone_of(p) == "b" for p in got)


def test_a_zone_with_few_outsiders_fills_from_itself() -> None:
    index = index_of({"a": 40, "b": 1})
    got = index.sample("a", 10, random.Random(3), exclude="a0")
    assert sorted(zone_of(p) for p in got) == ["a"] * 9 + ["b"]


def test_no_zone_means_a_uniform_sample_of_everyone() -> None:
    index = index_of({"a": 5, "b": 5})
    index.add("x", "")
    rng = random.Random(4)
    counts = {"a": 0, "b": 0, "x": 0}
    for _ in range(200):
        got = index.sample("", 4, rng, exclude="x")
        assert "x" not in got and len(set(got)) == 4
        for peer in got:
            counts[zone_of(peer)] += 1
    assert counts["x"] == 0
    assert 300 < counts["a"] < 500 and 300 < counts["b"] < 500  # 400 each if uniform


def test_without_zones_the_sample_is_a_plain_random_sample() -> None:
    # What the tracker's reply sample was before zones: the same peers, in the
    # same order, and the shared rng left in the same state.
    peers = [f"p{i}" for i in range(30)]
    index: ZoneIndex[str] = ZoneIndex()
    for peer in peers:
        index.add(peer)
    for seed in range(5):
        ours, plain = random.Random(seed), random.Random(seed)
        got = index.sample("", 10, ours, exclude="p7")
        picks = plain.sample(range(len(peers)), 11)
        expected = [peers[i] for i in picks if peers[i] != "p7"][:10]
        assert got == expected
        assert ours.random() == plain.random()


def test_small_swarm_returns_everyone_else() -> None:
    index = index_of({"a": 2, "b": 1})
    assert sorted(index.sample("a", 10, random.Random(0), exclude="a1")) == ["a0", "b0"]
    assert index.sample("a", 0, random.Random(0)) == []
    assert ZoneIndex[str]().sample("a", 5, random.Random(0)) == []


def test_same_seed_same_sample() -> None:
    index = index_of({"a": 25, "b": 25, "c": 25})
    first = [index.sample("b", 12, random.Random(9), exclude="b2") for _ in range(3)]
    assert first[0] == first[1] == first[2]
    other = index.sample("b", 12, random.Random(10), exclude="b2")
    assert other != first[0]


def test_add_move_remove_keep_the_index_whole() -> None:
    index = index_of({"a": 3, "b": 2})
    assert len(index) == 5 and index.zones() == {"a": 3, "b": 2}
    index.add("a0", "b")  # moved
    assert index.zone("a0") == "b" and index.zones() == {"a": 2, "b": 3}
    assert index.remove("a1") and not index.remove("a1")
    index.remove("a2")
    assert index.zones() == {"b": 3} and "a2" not in index
    assert index.zone("a2") is None
    assert sorted(index.sample("b", 5, random.Random(0))) == ["a0", "b0", "b1"]
    assert sorted(index) == ["a0", "b0", "b1"]


# -- the simulator: preference keeps bytes inside racks --------------------------

RACKS = Scenario(
    name="zones-test",
    seed=3,
    strategies=("swarm",),
    model_size=512 * 1024**2,
    piece_size=32 * 1024**2,
    nodes=60,
    nic_gbps=25.0,
    origin_gbps=20.0,
    rack_size=10,
    oversubscription=4.0,
    max_downloads=4,  # as zones.toml: see there why
)


def test_zone_preference_moves_fewer_bytes_across_racks() -> None:
    plain = run_strategy(RACKS, "swarm").summary()
    zoned = run_strategy(RACKS.with_overrides(zone_preference=True), "swarm").summary()
    for summary in (plain, zoned):
        assert summary["completed"] == RACKS.nodes
        assert summary["origin_ratio"] == pytest.approx(1.0)
        # Every piece must enter each of the other five racks at least once.
        assert summary["cross_rack_bytes"] >= 5 * RACKS.model_size
        assert summary["cross_rack_bytes"] <= summary["peer_bytes"]
    assert zoned["cross_rack_bytes"] < 0.5 * plain["cross_rack_bytes"]
    assert zoned["cross_rack_ratio"] == zoned["cross_rack_bytes"] / RACKS.model_size


def test_without_racks_nothing_crosses_and_preference_is_refused() -> None:
    flat = RACKS.with_overrides(rack_size=0, oversubscription=1.0)
    assert run_strategy(flat, "swarm").summary()["cross_rack_bytes"] == 0
    with pytest.raises(ConfigError, match="zone_preference needs rack_size"):
        flat.with_overrides(zone_preference=True)


def test_zone_preference_survives_a_crash_and_late_joiners() -> None:
    from simulations.scenario import Crash, Join

    scenario = RACKS.with_overrides(
        zone_preference=True, crashes=(Crash(node=4, at=0.1),), join=Join(10, 0.05, 0.01)
    )
    summary = run_strategy(scenario, "swarm").summary()
    assert summary["crashed"] == 1
    assert summary["completed"] == RACKS.nodes - 1
    assert summary["incomplete"] == 0


def test_the_simulate_table_shows_cross_rack_bytes_only_with_racks() -> None:
    from rich.console import Console

    from simulations.cli import results_table

    def render(scenario: Scenario) -> str:
        console = Console(width=200, record=True, file=io.StringIO())
        console.print(results_table([run_strategy(scenario, "swarm")]))
        return console.export_text()

    assert "cross-rack ÷ F" in render(RACKS.with_overrides(zone_preference=True))
    assert "cross-rack" not in render(RACKS.with_overrides(rack_size=0, oversubscription=1.0))


# --- real peers on loopback -------------------------------------------------------


@pytest.mark.parametrize("zoned", [True, False], ids=["zones", "no-zones"])
def test_a_peer_takes_what_its_zone_has_from_its_zone(tmp_path: Path, zoned: bool) -> None:
    """Two complete seeds, one in zone a and one in zone b, and a fetch in zone a: with
    zones declared, zone b's seed serves at most the first requests sent before zone
    a's seed was heard from; without, both serve."""
    import asyncio
    import shutil

    from test_rate_caps import BLOCK, WAIT, cluster, run_test, wait_for

    from core.bitfield import Bitfield
    from swarm.announce import Announce, TrackerClient

    async def body() -> None:
        async with cluster(tmp_path) as c:
            _, prep = c.start_peer("prep", dest="seed-a", linger=0.0)
            assert (await asyncio.wait_for(prep, WAIT)).verified
            shutil.copytree(tmp_path / "seed-a", tmp_path / "seed-b")
            client = TrackerClient(c.tracker_url)
            c.clients.append(client)
            stand_in = Announce(  # an unfinished member, so the seeds stay
                ref=c.manifest.ref,
                peer_id=b"\xee" * 20,
                port=free_port(),
                have=Bitfield(c.manifest.num_pieces).to_bytes(),
                host="127.0.0.1",
            )
            await client.announce(stand_in)
            zone_a, zone_b = ("a", "b") if zoned else ("", "")
            c.start_peer("seed-a", linger=WAIT, zone=zone_a)
            seed_b, seed_b_run = c.start_peer("seed-b", linger=WAIT, zone=zone_b)

            def both_seeding() -> bool:
                swarm = c.tracker.status()["swarms"].get(c.manifest.root_hex)
                return swarm is not None and swarm["finished_peers"] == 2

            await wait_for(both_seeding, "the tracker to know both seeds")
            # Two requests per connection: a pipeline (2 of the manifest's 1 MiB
            # blocks) stays well under what zone b serves without zones.
            fetcher, run = c.start_peer("fetch", linger=0.0, zone=zone_a, requests_per_peer=2)
            result = await asyncio.wait_for(run, WAIT)
            assert result.verified
            served_by_b = seed_b.session.stats.uploaded_bytes
            if zoned:
                assert result.extra["cross_zone_bytes"] == served_by_b
                # Requests may reach zone b before zone a's bitfield is in: one pipeline
                # of the blocks the fetch asks for (a format-2 manifest's, not BLOCK).
                assert fetcher.block_size >= BLOCK
                assert served_by_b <= 2 * fetcher.block_size, served_by_b
            else:
                assert result.extra["cross_zone_bytes"] == 0  # no zones, nothing is remote
                assert served_by_b >= c.manifest.total_size // 4, served_by_b
            del seed_b_run

    run_test(body)


def test_a_same_zone_peer_that_does_not_serve_stops_counting_as_a_holder(tmp_path: Path) -> None:
    """A complete peer of our zone capped at 1 KB/s (as a choking or hostile one would
    be) and a complete peer of another zone: once the first has left our requests
    unanswered for ``zone_patience``, the other zone is asked, instead of the fetch
    crawling at the first one's pace (or reading the artifact from the origin)."""
    import asyncio
    import shutil

    from test_rate_caps import WAIT, cluster, run_test, wait_for

    async def body() -> None:
        async with cluster(tmp_path) as c:
            await c.seeded(zone="b")
            shutil.copytree(
                tmp_path / "seed", tmp_path / "stuck", ignore=shutil.ignore_patterns(".swarm*")
            )
            c.start_peer("stuck", zone="a", max_upload_rate=1_000, linger=WAIT)

            def both_seeding() -> bool:
                swarm = c.tracker.status()["swarms"][c.manifest.root_hex]
                return bool(swarm["finished_peers"] >= 2)

            await wait_for(both_seeding, "the stuck seed to be known complete")
            _, run = c.start_peer("fetch", zone="a", zone_patience=1.0, linger=0.0)
            result = await asyncio.wait_for(run, WAIT)
            assert result.verified
            assert result.extra["cross_zone_bytes"] >= c.manifest.total_size // 2, result.extra

    run_test(body)
