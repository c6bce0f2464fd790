"""Byte-rate caps with real peers on loopback, and the wire fields that carry them.

Each swarm test publishes a 12 MiB artifact into a ``file://`` catalog, runs an
in-process tracker (``tracker.service.Tracker``) on 127.0.0.1 and real
``SwarmPeer`` instances, and samples a byte counter while the transfer runs:

- ``max_upload_rate`` on a peer that has everything: the bytes it serves;
- ``max_download_rate`` on a peer that fetches from an uncapped one: the bytes it
  receives;
- the tracker's ``origin_rate`` with one peer pulling from the origin: the bytes
  it reads from the origin.

Each check is bytes over the measured interval (from the first sample that saw
bytes move to the one that saw the last), against the cap plus the bucket's
burst, with a 5 % tolerance. The first part checks the pure pieces: the
registry's equal shares and the announce/reply fields (``zone``, ``orate``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
from aio_helpers import run_bounded, wait_until
from servers import free_port, populate

from core.bitfield import Bitfield
from core.errors import ConfigError
from core.manifest import Manifest
from seeder.publish import publish
from swarm.announce import MAX_ZONE_LENGTH, Announce, BadAnnounce, Reply, TrackerClient
from swarm.fetch import FetchResult
from swarm.peer import PeerConfig, SwarmPeer
from swarm.ratelimit import default_burst
from tracker.config import TrackerConfig
from tracker.registry import SwarmRegistry
from tracker.service import Tracker

MiB = 1024 * 1024
PIECE = 1 * MiB
BLOCK = 128 * 1024
CAP = 4 * MiB
TOLERANCE = 0.05
NAME = "capped-llm"
TEST_TIMEOUT = 60.0
WAIT = 30.0
SAMPLE_EVERY = 0.005
MAX_SAMPLES = 20_000  # bounds a sampling loop: 100 s at SAMPLE_EVERY


# --- the pure parts --------------------------------------------------------------


def registry(origin_rate: int | None, pieces: int = 8, per_peer: int = 2) -> SwarmRegistry:
    return SwarmRegistry(
        [PIECE] * pieces,
        peer_ttl=10.0,
        rng=random.Random(1),
        per_peer_limit=per_peer,
        min_in_flight=1,  # the per-peer limit alone: a lone first peer takes no more
        origin_rate=origin_rate,
    )


def pid(i: int) -> bytes:
    return bytes([i]) * 20


def test_registry_shares_the_origin_rate_equally_among_peers_pulling() -> None:
    reg = registry(12 * MiB)
    empty = Bitfield(8)
    first = reg.announce(pid(1), ("10.0.0.1", 7000), empty, {}, now=0.0)
    assert first.assigned and first.origin_rate == 12 * MiB  # alone: the whole cap
    second = reg.announce(pid(2), ("10.0.0.2", 7000), empty, {}, now=0.1)
    assert second.assigned and second.origin_rate == 6 * MiB
    third = reg.announce(pid(3), ("10.0.0.3", 7000), empty, {}, now=0.2)
    assert third.origin_rate == 4 * MiB
    assert reg.origin_holders == 3
    assert reg.status()["origin"]["rate_share"] == 4 * MiB
    # One leaves: the others' shares grow on their next announce.
    reg.leave(pid(3), now=0.3)
    again = reg.announce(pid(1), ("10.0.0.1", 7000), empty, {}, now=0.4)
    assert again.origin_rate == 6 * MiB


def test_registry_without_a_cap_hands_out_zero_and_refuses_a_negative_one() -> None:
    reg = registry(None)
    reply = reg.announce(pid(1), ("10.0.0.1", 7000), Bitfield(8), {}, now=0.0)
    assert reply.assigned and reply.origin_rate == 0
    with pytest.raises(ValueError, match="origin_rate"):
        registry(-5)


def test_a_peer_done_pulling_stops_sharing_the_cap() -> None:
    reg = registry(10 * MiB, pieces=2, per_peer=1)
    a = reg.announce(pid(1), ("10.0.0.1", 7000), Bitfield(2), {}, now=0.0)
    b = reg.announce(pid(2), ("10.0.0.2", 7000), Bitfield(2), {}, now=0.1)
    assert len(a.assigned) == len(b.assigned) == 1 and b.origin_rate == 5 * MiB
    have = Bitfield(2)
    for piece in a.assigned:
        have.add(piece)
    done = reg.announce(pid(1), ("10.0.0.1", 7000), have, {}, now=0.2)
    assert done.assigned == ()  # pulled all it had: no longer a holder
    assert reg.announce(pid(2), ("10.0.0.2", 7000), Bitfield(2), {}, now=0.3).origin_rate == (
        10 * MiB
    )


def announce(**overrides: Any) -> Announce:
    values: dict[str, Any] = {"ref": "m@" + "ab" * 32, "peer_id": pid(1), "port": 7000}
    values.update(overrides)
    return Announce(have=b"\x00", **values)


def test_zone_travels_in_announces_only_when_set_and_is_validated() -> None:
    plain = announce()
    assert b"zone" not in plain.encode()
    assert Announce.decode(plain.encode()).zone == ""
    zoned = announce(zone="us-east-1a")
    assert Announce.decode(zoned.encode()).zone == "us-east-1a"
    assert Announce.decode(announce(zone="z" * MAX_ZONE_LENGTH).encode()).zone
    for bad in ("z" * (MAX_ZONE_LENGTH + 1), "rack 1", "-leading", "zone\n"):
        with pytest.raises(BadAnnounce, match="zone"):
            Announce.decode(announce(zone=bad).encode())
    raw = msgpack.unpackb(plain.encode())
    raw["zone"] = 7
    with pytest.raises(BadAnnounce, match="zone"):
        Announce.decode(msgpack.packb(raw, use_bin_type=True))


def test_origin_rate_travels_in_replies_only_when_set_and_is_validated() -> None:
    reply = Reply([1], [], False, 2, 1.0, txn=5)
    assert b"orate" not in reply.encode()
    assert Reply.decode(reply.encode()).origin_rate == 0
    reply.origin_rate = 3 * MiB
    assert Reply.decode(reply.encode()).origin_rate == 3 * MiB
    for bad in (-1, 1.5, "fast", 1 << 60):
        raw = msgpack.unpackb(reply.encode())
        raw["orate"] = bad
        with pytest.raises(BadAnnounce, match="origin rate"):
            Reply.decode(msgpack.packb(raw, use_bin_type=True))


# --- real peers on loopback -----------------------------------------------------


def make_files(seed: int = 11) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"weights/shard-{i}.bin": rng.randbytes(4 * MiB) for i in range(3)}


@dataclass
class Cluster:
    tmp: Path
    manifest: Manifest
    tracker: Tracker
    tracker_url: str
    clients: list[TrackerClient] = field(default_factory=list)
    runs: list[asyncio.Task[FetchResult]] = field(default_factory=list)

    def start_peer(
        self, name: str, dest: str = "", **overrides: Any
    ) -> tuple[SwarmPeer, asyncio.Task[FetchResult]]:
        settings: dict[str, Any] = {
            "listen_host": "127.0.0.1",
            "advertise_host": "127.0.0.1",
            "linger": 10.0,
            "tracker_timeout": 20.0,
            "durable": False,
            "direct_io": False,
            "block_size": BLOCK,
            "range_size": 256 * 1024,
        }
        settings.update(overrides)
        client = TrackerClient(self.tracker_url)
        self.clients.append(client)
        peer = SwarmPeer(
            self.manifest,
            self.tmp / (dest or name),
            client,
            config=PeerConfig(**settings),
            rng=random.Random(name),
        )
        run = asyncio.create_task(peer.run(), name=f"peer-{name}")
        self.runs.append(run)
        return peer, run

    async def seeded(self, **settings: Any) -> SwarmPeer:
        """A peer that has the whole artifact and stays to serve it, once the tracker
        knows it has every piece.

        A peer alone in a swarm leaves as soon as it has everything (the swarm is
        complete), so a first peer pulls the artifact and leaves, a stand-in that
        never finishes joins, and the seed then starts on the first one's files.
        """
        _, prep = self.start_peer("prep", dest="seed", linger=0.0)
        assert (await asyncio.wait_for(prep, WAIT)).verified
        client = TrackerClient(self.tracker_url)
        self.clients.append(client)
        stand_in = Announce(
            ref=self.manifest.ref,
            peer_id=b"\xee" * 20,
            port=free_port(),  # nobody listens: peers that dial it are refused
            have=Bitfield(self.manifest.num_pieces).to_bytes(),
            host="127.0.0.1",
        )
        await client.announce(stand_in)
        seed, _ = self.start_peer("seed", **{"linger": WAIT, **settings})

        def tracker_knows() -> bool:
            swarm = self.tracker.status()["swarms"].get(self.manifest.root_hex)
            return swarm is not None and swarm["finished_peers"] == 1 and swarm["peers"] == 2

        await wait_for(tracker_knows, "the tracker to know the seed has every piece")
        return seed

    async def close(self) -> None:
        for run in self.runs:
            run.cancel()
        await asyncio.gather(*self.runs, return_exceptions=True)
        for client in self.clients:
            await client.close()


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path, origin_rate: int | None = None) -> AsyncIterator[Cluster]:
    populate(tmp_path / "www" / "model", make_files())
    catalog = (tmp_path / "catalog").as_uri()
    manifest = await publish((tmp_path / "www" / "model").as_uri(), NAME, catalog, piece_size=PIECE)
    config = TrackerConfig(
        host="127.0.0.1",
        port=free_port(),
        catalog=catalog,
        announce_interval=0.2,
        peer_ttl=60.0,  # the stand-in of ``seeded`` announces once
        stall_timeout=5.0,
        restart_grace=0.0,
        origin_rate=origin_rate,
    )
    tracker = Tracker(config, rng=random.Random(1))
    await tracker.start()
    state = Cluster(tmp_path, manifest, tracker, f"http://127.0.0.1:{config.port}")
    try:
        yield state
    finally:
        await state.close()
        await tracker.close()


def run_test(body: Callable[[], Awaitable[None]]) -> None:
    run_bounded(body, TEST_TIMEOUT)


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    await wait_until(predicate, what, WAIT)


@dataclass
class Measured:
    moved: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.moved / self.seconds


async def measure(
    counter: Callable[[], int], total: int, run: asyncio.Task[FetchResult]
) -> Measured:
    """Sample ``counter`` until it reaches ``total``: bytes and time between the first
    sample that saw it move and the sample that saw it reach ``total``. Fails if
    ``run`` ends first."""
    start_bytes = counter()
    first: tuple[float, int] | None = None
    for _ in range(MAX_SAMPLES):
        now, value = time.monotonic(), counter()
        if first is None and value > start_bytes:
            first = (now, value)
        if value >= total:
            assert first is not None
            if now <= first[0]:
                raise AssertionError("everything moved between two samples: nothing was capped")
            return Measured(value - first[1], now - first[0])
        if run.done():
            raise AssertionError(f"the fetch ended with {value} of {total} bytes: {run.result()}")
        await asyncio.sleep(SAMPLE_EVERY)
    raise AssertionError(f"only {counter()} of {total} bytes moved in {MAX_SAMPLES} samples")


def check_cap(measured: Measured, cap: int, what: str) -> None:
    """At most cap × time + burst, and (the cap being the only limit) at least cap × time
    less one burst: both within the tolerance."""
    burst = default_burst(cap)
    ratio = measured.rate / cap
    print(f"{what}: {measured.moved} B in {measured.seconds:.3f} s = {ratio:.4f} of the cap")
    assert measured.moved <= (1 + TOLERANCE) * cap * measured.seconds + burst, (what, ratio)
    assert measured.moved >= (1 - TOLERANCE) * cap * measured.seconds - burst, (what, ratio)


@pytest.mark.parametrize("direct_io", [False, True], ids=["sendfile", "direct-read"])
def test_max_upload_rate_caps_the_bytes_a_peer_serves(tmp_path: Path, direct_io: bool) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as c:
            total = c.manifest.total_size
            seed = await c.seeded(max_upload_rate=CAP, direct_io=direct_io)
            assert seed.upload_limit.limited and not seed.download_limit.limited
            _, run = c.start_peer("leech", linger=0.0)
            measured = await measure(lambda: seed.session.stats.uploaded_bytes, total, run)
            result = await asyncio.wait_for(run, WAIT)
            assert result.verified and result.peer_bytes == total and result.origin_bytes == 0
            check_cap(measured, CAP, "upload")

    run_test(body)


def test_max_download_rate_caps_the_bytes_a_peer_receives(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as c:
            total = c.manifest.total_size
            await c.seeded()
            leech, run = c.start_peer("leech", linger=0.0, max_download_rate=CAP)
            measured = await measure(lambda: leech.session.stats.peer_bytes, total, run)
            result = await asyncio.wait_for(run, WAIT)
            assert result.verified and result.peer_bytes == total and result.origin_bytes == 0
            check_cap(measured, CAP, "download")

    run_test(body)


def test_the_trackers_origin_rate_caps_a_lone_peers_origin_reads(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path, origin_rate=CAP) as c:
            total = c.manifest.total_size
            peer, run = c.start_peer("lone", linger=0.0)
            measured = await measure(lambda: peer.origin.counters.bytes_read, total, run)
            result = await asyncio.wait_for(run, WAIT)
            assert result.verified and result.origin_bytes == total
            assert peer.origin_limit.rate == CAP  # the tracker's share for the only puller
            check_cap(measured, CAP, "origin")

    run_test(body)


def test_bad_zone_and_rates_are_config_errors(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as c:
            with pytest.raises(ConfigError, match="zone"):
                c.start_peer("zoned", zone="has space")
            with pytest.raises(ConfigError, match="bytes per second"):
                c.start_peer("negative", max_upload_rate=-1)

    run_test(body)
