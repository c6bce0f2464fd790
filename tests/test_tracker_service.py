"""The tracker service (``tracker/service.py``) in-process, on a real loopback port.

A small artifact is published into a ``file://`` catalog; the tracker serves its
manifest over HTTP (an unknown name is a 404 at once, with the names close to it),
answers announces over UDP (through the peers' own ``TrackerClient``) and over
HTTP, refuses garbage with 400, reports status as JSON, bars a peer only once two
peers reported it (and then the pieces only it held go back to the origin pool
instead of being waited for forever), remembers refs the catalog lacks, and says
on /healthz and /readyz whether the catalog answers. Authentication has its own
file, ``test_tracker_auth.py``.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from servers import HTTPFileServer, free_port, populate

from core.auth import ClusterKey, new_nonce
from core.bitfield import Bitfield
from core.errors import CatalogError, TrackerError, UnknownArtifactError
from core.manifest import Manifest
from seeder.publish import publish
from swarm.announce import PEER_ID_SIZE, Announce, Reply, TrackerClient
from tracker.config import TrackerConfig
from tracker.service import Tracker

PIECE = 64 * 1024
NAME = "tiny-llm"


async def _published(tmp_path: Path) -> tuple[Manifest, str]:
    rng = random.Random(7)
    origin = populate(
        tmp_path / "origin",
        {"config.json": b'{"layers": 1}\n', "weights.bin": rng.randbytes(5 * PIECE + 17)},
    )
    catalog = (tmp_path / "catalog").as_uri()
    manifest = await publish(origin.as_uri(), NAME, catalog, piece_size=PIECE)
    return manifest, catalog


def run_with_tracker(
    tmp_path: Path, body: Callable[[Tracker, Manifest, str], Awaitable[None]]
) -> None:
    """Publish, start a tracker on a free loopback port, run ``body``, close everything."""

    async def main() -> None:
        manifest, catalog = await _published(tmp_path)
        config = TrackerConfig(
            host="127.0.0.1",
            port=free_port(),
            catalog=catalog,
            announce_interval=0.2,
            peer_ttl=5.0,
            stall_timeout=5.0,
            restart_grace=0.0,
            min_origin_pieces=1,  # two per peer from the first: the counts below follow
        )
        tracker = Tracker(config, rng=random.Random(1))
        await tracker.start()
        try:
            await asyncio.wait_for(body(tracker, manifest, f"http://127.0.0.1:{config.port}"), 30.0)
        finally:
            await tracker.close()

    asyncio.run(main())


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes, dict[str, str]]:
    async with session.get(url) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


def _announce(manifest: Manifest, peer: bytes, port: int, **kw: Any) -> Announce:
    have = kw.pop("have", Bitfield(manifest.num_pieces))
    host = kw.pop("host", "127.0.0.1")
    return Announce(manifest.ref, peer, port, have.to_bytes(), host=host, **kw)


_last_ts = 0


def _signed(msg: Announce, key: ClusterKey | None = None) -> Announce:
    """``msg`` stamped and signed as a TrackerClient would (open cluster by default)."""
    global _last_ts
    _last_ts = max(int(time.time() * 1000), _last_ts + 1)
    msg.sign(key or ClusterKey(None), _last_ts, new_nonce())
    return msg


def test_manifest_endpoint(tmp_path: Path) -> None:
    async def body(tracker: Tracker, manifest: Manifest, url: str) -> None:
        async with aiohttp.ClientSession() as session:
            status, data, headers = await _get(session, f"{url}/v1/manifest/{NAME}")
            assert status == 200
            assert headers["X-Swarm-Root"] == manifest.root_hex
            assert Manifest.decode(data) == manifest
            status, data, _ = await _get(session, f"{url}/v1/manifest/{manifest.ref}")
            assert status == 200 and Manifest.decode(data).root_hex == manifest.root_hex
            status, data, _ = await _get(session, f"{url}/v1/manifest/no-such-model")
            assert status == 404 and b"no-such-model" in data
            status, _, _ = await _get(session, f"{url}/v1/manifest/{NAME}@{'0' * 64}")
            assert status == 404
            # A near miss names what the catalog does have.
            status, data, _ = await _get(session, f"{url}/v1/manifest/tiny-lm")
            assert status == 404
            assert f"known names close to it: {NAME}" in data.decode()
            status, data, _ = await _get(session, f"{url}/healthz")
            health = json.loads(data)
            assert status == 200 and health["catalog"]["reachable"] is True
            status, data, _ = await _get(session, f"{url}/readyz")
            assert status == 200 and json.loads(data)["ready"] is True
        # The peers' client reads the same endpoint, and says where a miss came from:
        # a distinct error, so that a fetch fails at once instead of retrying.
        client = TrackerClient(url)
        try:
            assert (await client.manifest(manifest.ref)).root_hex == manifest.root_hex
            with pytest.raises(UnknownArtifactError, match="HTTP 404") as info:
                await client.manifest("tiny-llm2")
            assert NAME in str(info.value) and "404" in str(info.value)
        finally:
            await client.close()

    run_with_tracker(tmp_path, body)


def test_announces_status_and_barring(tmp_path: Path) -> None:
    async def body(tracker: Tracker, manifest: Manifest, url: str) -> None:
        a, b, c = b"a" * PEER_ID_SIZE, b"b" * PEER_ID_SIZE, b"c" * PEER_ID_SIZE
        client = TrackerClient(url)
        try:
            async with aiohttp.ClientSession() as session:
                status, data, _ = await _get(session, f"{url}/v1/swarms")
                assert status == 200 and json.loads(data)["swarms"] == {}

                # Over UDP: A joins and is given origin pieces (2 per peer at once).
                reply_a = await client.announce(_announce(manifest, a, 7001))
                assert client.udp_failures == 0
                assert len(reply_a.assigned) == 2 and reply_a.peers == []
                assert reply_a.interval == pytest.approx(0.2)
                # Over HTTP: B joins, sees A, gets pieces of its own.
                async with session.post(
                    f"{url}/v1/announce", data=_signed(_announce(manifest, b, 7002)).encode()
                ) as resp:
                    assert resp.status == 200
                    reply_b = Reply.decode(await resp.read())
                assert reply_b.peers == [(a, "127.0.0.1", 7001)]
                assert reply_b.assigned and not set(reply_b.assigned) & set(reply_a.assigned)

                # A finishes its pieces: the swarm status shows them present.
                have_a = Bitfield(manifest.num_pieces)
                for piece in reply_a.assigned:
                    have_a.add(piece)
                await client.announce(_announce(manifest, a, 7001, have=have_a))
                status, data, _ = await _get(session, f"{url}/v1/swarms")
                swarm = json.loads(data)["swarms"][manifest.root_hex]
                assert swarm["ref"] == manifest.ref
                assert swarm["peers"] == 2 and swarm["present_pieces"] == 2
                assert swarm["barred"] == []

                # B got corrupt data from A: one report is shown but bars nobody.
                await client.announce(_announce(manifest, b, 7002, barred=[a]))
                await client.announce(_announce(manifest, b, 7002, barred=[a]))
                status, data, _ = await _get(session, f"{url}/v1/swarms")
                swarm = json.loads(data)["swarms"][manifest.root_hex]
                assert swarm["barred"] == [] and swarm["peers"] == 2
                assert swarm["reports"] == {a.hex(): [b.hex()]}
                # C, on another node, got corrupt data from A too: A is out of the swarm,
                # and the pieces only A held go back to be pulled from the origin.
                await client.announce(_announce(manifest, c, 7003, barred=[a], host="127.0.0.3"))
                status, data, _ = await _get(session, f"{url}/v1/swarms/{manifest.root_hex}")
                assert status == 200
                swarm = json.loads(data)
                assert sorted(p["peer_id"] for p in swarm["peer_list"]) == [b.hex(), c.hex()]
                assert swarm["present_pieces"] == 0
                assert swarm["origin"]["lost"] == 2
                # A's next announce neither brings it back nor gives it work.
                again = await client.announce(_announce(manifest, a, 7001, have=have_a))
                assert again.assigned == [] and again.peers == []
                status, data, _ = await _get(session, f"{url}/v1/swarms")
                swarm = json.loads(data)["swarms"][manifest.root_hex]
                assert swarm["barred"] == [a.hex()] and swarm["peers"] == 2
                assert swarm["reports"] == {}

                # Garbage and unknown swarms are refused without harm.
                async with session.post(f"{url}/v1/announce", data=b"\x00garbage") as resp:
                    assert resp.status == 400
                status, _, _ = await _get(session, f"{url}/v1/swarms/{'0' * 64}")
                assert status == 404
                with pytest.raises(TrackerError, match="refused"):
                    await client.announce(
                        Announce(f"{NAME}@{'0' * 64}", a, 7001, b"", host="127.0.0.1")
                    )
        finally:
            await client.close()

    run_with_tracker(tmp_path, body)


def test_a_burst_by_name_reads_the_catalog_once_and_a_republish_shows_after_the_ttl(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        manifest, catalog = await _published(tmp_path)
        tracker = Tracker(
            TrackerConfig(host="127.0.0.1", port=free_port(), catalog=catalog, manifest_ttl=0.5)
        )
        reads: list[str] = []
        real_get = tracker._catalog.get

        async def counting_get(ref: str) -> Manifest:
            reads.append(ref)
            return await real_get(ref)

        tracker._catalog.get = counting_get  # type: ignore[method-assign]
        got = await asyncio.gather(*(tracker.manifest(NAME) for _ in range(50)))
        assert {m.root_hex for m in got} == {manifest.root_hex}
        assert reads == [NAME]  # fifty concurrent look-ups, one catalog read
        assert (await tracker.manifest(manifest.ref)).root_hex == manifest.root_hex
        assert reads == [NAME]  # by root: from memory

        origin = tmp_path / "origin"
        (origin / "config.json").write_bytes(b'{"layers": 2}\n')
        newer = await publish(origin.as_uri(), NAME, catalog, piece_size=PIECE)
        assert newer.root_hex != manifest.root_hex
        assert (await tracker.manifest(NAME)).root_hex == manifest.root_hex  # within the TTL
        deadline = time.monotonic() + 10
        while (await tracker.manifest(NAME)).root_hex != newer.root_hex:
            assert time.monotonic() < deadline, "the republished version never showed"
            await asyncio.sleep(0.1)
        # The old version stays addressable by root for fetches already under way.
        assert (await tracker.manifest(manifest.ref)).root_hex == manifest.root_hex
        await tracker.close()

    asyncio.run(main())


def test_refs_the_catalog_lacks_cost_one_catalog_read_per_ttl(tmp_path: Path) -> None:
    """A flood of announces and look-ups for an unknown ref reads the catalog once,
    then again only after ``manifest_ttl``."""

    async def main() -> None:
        _, catalog = await _published(tmp_path)
        tracker = Tracker(
            TrackerConfig(host="127.0.0.1", port=free_port(), catalog=catalog, manifest_ttl=0.3)
        )
        reads: list[str] = []
        real_get = tracker._catalog.get

        async def counting_get(ref: str) -> Manifest:
            reads.append(ref)
            return await real_get(ref)

        tracker._catalog.get = counting_get  # type: ignore[method-assign]
        await tracker.start()
        client = TrackerClient(f"http://127.0.0.1:{tracker.config.port}")
        unknown = f"{NAME}@{'0' * 64}"
        try:
            for _ in range(20):
                with pytest.raises(TrackerError, match="refused"):
                    await client.announce(Announce(unknown, b"x" * PEER_ID_SIZE, 7001, b""))
            for _ in range(20):
                with pytest.raises(CatalogError):
                    await tracker.manifest(unknown)
            assert reads == [unknown]
            await asyncio.sleep(0.4)
            with pytest.raises(CatalogError):
                await tracker.manifest(unknown)
            assert reads == [unknown, unknown]
        finally:
            await client.close()
            await tracker.close()

    asyncio.run(main())


def test_healthz_and_readyz_follow_the_catalog(tmp_path: Path) -> None:
    """/healthz is 503 while the catalog does not answer; /readyz is 503 until it has."""

    async def main() -> None:
        manifest, _ = await _published(tmp_path)
        server = HTTPFileServer(tmp_path / "catalog")
        server.start()
        stopped = False
        try:
            config = TrackerConfig(
                host="127.0.0.1", port=free_port(), catalog=server.url(), health_interval=0.2
            )
            tracker = Tracker(config)
            await tracker.start()
            url = f"http://127.0.0.1:{config.port}"
            try:
                async with aiohttp.ClientSession() as session:
                    status, data, _ = await _get(session, f"{url}/healthz")
                    assert status == 200, data
                    assert json.loads(data)["catalog"]["reachable"] is True
                    status, _, _ = await _get(session, f"{url}/readyz")
                    assert status == 200
                    server.stop()
                    stopped = True
                    deadline = time.monotonic() + 10
                    while status == 200:
                        assert time.monotonic() < deadline, "/healthz never saw the catalog go"
                        await asyncio.sleep(0.1)
                        status, data, _ = await _get(session, f"{url}/healthz")
                    health = json.loads(data)
                    assert status == 503 and health["catalog"]["reachable"] is False
                    assert health["catalog"]["error"]
                    # Ready stays ready: it says the tracker got going, not that all is well.
                    status, _, _ = await _get(session, f"{url}/readyz")
                    assert status == 200
            finally:
                await tracker.close()
        finally:
            if not stopped:
                server.stop()

        # A tracker whose catalog never answered is not ready.
        dead = f"http://127.0.0.1:{free_port()}/catalog"
        config = TrackerConfig(
            host="127.0.0.1", port=free_port(), catalog=dead, health_interval=0.2
        )
        tracker = Tracker(config)
        await tracker.start()
        try:
            async with aiohttp.ClientSession() as session:
                status, data, _ = await _get(session, f"http://127.0.0.1:{config.port}/readyz")
                assert status == 503 and json.loads(data)["catalog_seen"] is False
                status, _, _ = await _get(session, f"http://127.0.0.1:{config.port}/healthz")
                assert status == 503
        finally:
            await tracker.close()
        assert manifest.name == NAME

    asyncio.run(main())
