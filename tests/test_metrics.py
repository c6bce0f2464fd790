"""Prometheus metrics of the tracker and of a lingering fetch, scraped over loopback.

The swarm test publishes a small artifact into a ``file://`` catalog, runs an
in-process tracker and two real ``SwarmPeer`` instances on 127.0.0.1, each peer
with its metrics served by ``swarm.metrics.serve_metrics``:

- seeder A reads the origin through a gated relay, so every piece is assigned to
  it before the gate opens; downloader B joins after and gets every byte from A;
- a third member of the swarm is a replica that has joined and received nothing
  yet (a real announce from a ``TrackerClient``, never finishing), so A and B
  finish and then linger, serving, while the test scrapes them;
- the tracker's ``/metrics`` parses with prometheus-client's parser and its
  per-swarm numbers equal ``GET /v1/swarms`` of the same quiet moment;
- each peer's ``/metrics`` parses and its counters equal the FetchResult JSON the
  peer returns once the late replica leaves and the swarm is complete.

The other tests check ``/metrics`` with a cluster token (open to scrapers, the
refusals counted), catalog reads, and the metrics server's own lifecycle.
Every wait is bounded; each test is bounded by ``TEST_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aio_helpers import run_bounded, wait_until
from prometheus_client.parser import text_string_to_metric_families
from servers import HTTPFileServer, free_port, populate
from swarm_helpers import ByteCountingRelay

from core.auth import ClusterKey
from core.bitfield import Bitfield
from core.errors import ConfigError
from core.manifest import Manifest
from seeder.publish import publish
from swarm.announce import Announce, TrackerClient
from swarm.fetch import FetchResult
from swarm.metrics import MetricsServer, peer_registry, serve_metrics
from swarm.peer import PeerConfig, SwarmPeer
from tracker.config import TrackerConfig
from tracker.service import Tracker

PIECE = 64 * 1024
NAME = "metrics-llm"
TEST_TIMEOUT = 60.0
WAIT = 20.0  # bound of any one wait for something that should happen soon
KEY = ClusterKey(b"metrics-cluster-token-0123456789")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def run_test(body: Callable[[], Awaitable[None]]) -> None:
    run_bounded(body, TEST_TIMEOUT)


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    await wait_until(predicate, what, timeout)


def make_files(seed: int = 7) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {"config.json": b'{"layers": 2}\n'}
    for i in range(3):
        files[f"weights/shard-{i:03d}.bin"] = rng.randbytes(2 * PIECE + 1000 * i + 17)
    return files


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and every family's type by its name."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}; have {sorted(n for n, _ in samples)}"
    return samples[key]


async def scrape(session: aiohttp.ClientSession, url: str) -> tuple[Samples, dict[str, str]]:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain"), response.headers
        return parse(await response.text())


async def get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        body: dict[str, Any] = await response.json()
        return body


async def start_tracker(tmp_path: Path, manifest_dir: Path, **overrides: Any) -> Tracker:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": free_port(),
        "catalog": manifest_dir.as_uri(),
        "announce_interval": 0.2,
        "peer_ttl": 60.0,  # the late replica announces once: it must not expire mid-test
        "stall_timeout": 30.0,
        "restart_grace": 0.0,
        "per_peer_limit": 64,  # the first seeder is given every piece at once
    }
    settings.update(overrides)
    tracker = Tracker(TrackerConfig(**settings), rng=random.Random(1))
    await tracker.start()
    return tracker


class Peers:
    """Peers started in-process, with their metrics servers; ``close`` ends them all."""

    def __init__(self, tmp: Path, manifest: Manifest, tracker_url: str) -> None:
        self.tmp = tmp
        self.manifest = manifest
        self.tracker_url = tracker_url
        self.clients: list[TrackerClient] = []
        self.runs: list[asyncio.Task[FetchResult]] = []
        self.servers: list[MetricsServer] = []

    async def start(self, name: str, **overrides: Any) -> tuple[SwarmPeer, MetricsServer]:
        settings: dict[str, Any] = {
            "listen_host": "127.0.0.1",
            "advertise_host": "127.0.0.1",
            "linger": 50.0,  # longer than the test: the swarm's completion ends it
            "tracker_timeout": 20.0,
            "durable": False,
            "direct_io": False,
        }
        settings.update(overrides)
        client = TrackerClient(self.tracker_url)
        self.clients.append(client)
        peer = SwarmPeer(
            self.manifest,
            self.tmp / name,
            client,
            config=PeerConfig(**settings),
            rng=random.Random(name),
        )
        # The wiring of `swarm fetch --metrics-listen`: after the peer, before run().
        server = await serve_metrics("127.0.0.1", 0, peer_registry(peer))
        self.servers.append(server)
        self.runs.append(asyncio.create_task(peer.run(), name=f"peer-{name}"))
        return peer, server

    async def close(self) -> None:
        for run in self.runs:
            run.cancel()
        await asyncio.gather(*self.runs, return_exceptions=True)
        for server in self.servers:
            await server.close()
        for client in self.clients:
            await client.close()


def test_tracker_and_lingering_peer_metrics_match_the_json(tmp_path: Path) -> None:
    files = make_files()
    populate(tmp_path / "www" / "model", files)
    www = HTTPFileServer(tmp_path / "www")
    www.start()
    relay = ByteCountingRelay(www.endpoint, gated=True)
    relay.start()
    size = sum(len(data) for data in files.values())

    async def body() -> None:
        manifest = await publish(
            (tmp_path / "www" / "model").as_uri(),
            NAME,
            (tmp_path / "catalog").as_uri(),
            piece_size=PIECE,
        )
        root, short = manifest.root_hex, manifest.root_hex[:12]
        labels = {"artifact": NAME, "root": short}
        tracker = await start_tracker(tmp_path, tmp_path / "catalog")
        base = f"http://127.0.0.1:{tracker.config.port}"
        peers = Peers(tmp_path, manifest, base)
        late = TrackerClient(base)
        late_id = b"late-replica-0000000"
        late_port = free_port()  # nothing listens there: it has nothing to serve yet
        try:
            seeder, seeder_metrics = await peers.start(
                "seeder", origin_url=f"{relay.endpoint}/model"
            )

            def swarm_status() -> dict[str, Any]:
                status: dict[str, Any] = tracker.status()["swarms"].get(root, {})
                return status

            await wait_for(
                lambda: swarm_status().get("origin", {}).get("in_flight") == manifest.num_pieces,
                "every piece assigned to the seeder",
            )
            have = Bitfield(manifest.num_pieces).to_bytes()
            reply = await late.announce(
                Announce(manifest.ref, late_id, late_port, have, host="127.0.0.1")
            )
            assert reply.assigned == [], "the late replica was given origin pieces"
            downloader, downloader_metrics = await peers.start("downloader")
            await wait_for(lambda: downloader.listen_port != 0, "the downloader to listen")
            relay.open_gate()
            await wait_for(
                lambda: seeder.finished_at is not None and downloader.finished_at is not None,
                "both peers to finish",
            )
            await wait_for(
                lambda: (
                    swarm_status().get("finished_peers") == 2
                    and seeder.session.stats.uploaded_bytes == downloader.session.stats.peer_bytes
                ),
                "the tracker to hear both finished, and the last upload to be counted",
            )
            assert not seeder.swarm_complete and not downloader.swarm_complete

            async with aiohttp.ClientSession() as session:
                # The tracker: /v1/swarms and /metrics of one quiet moment.
                before = await get_json(session, f"{base}/v1/swarms")
                tracked, types = await scrape(session, f"{base}/metrics")
                after = await get_json(session, f"{base}/v1/swarms")
                status = after["swarms"][root]
                quiet = {k: v for k, v in status.items() if k != "peer_list"}
                assert quiet == {
                    k: v for k, v in before["swarms"][root].items() if k != "peer_list"
                }, "the swarm changed while it was scraped"
                assert types["swarm_tracker_announces"] == "counter"
                assert types["swarm_tracker_announce_duration_seconds"] == "histogram"
                assert types["swarm_tracker_swarm_peers"] == "gauge"
                ok = sum(
                    value(tracked, "swarm_tracker_announces_total", transport=t, outcome="ok")
                    for t in ("udp", "http")
                )
                assert before["announces"] <= ok <= after["announces"]
                assert ok > 3
                timed = sum(
                    value(tracked, "swarm_tracker_announce_duration_seconds_count", transport=t)
                    for t in ("udp", "http")
                )
                refused = sum(
                    value(tracked, "swarm_tracker_announces_total", transport=t, outcome="refused")
                    for t in ("udp", "http")
                )
                assert timed == ok + refused and refused == 0
                assert value(tracked, "swarm_tracker_swarms") == 1
                expected = {
                    "swarm_tracker_swarm_peers": status["peers"],
                    "swarm_tracker_swarm_finished_peers": status["finished_peers"],
                    "swarm_tracker_swarm_pieces": status["pieces"],
                    "swarm_tracker_swarm_present_pieces": status["present_pieces"],
                    "swarm_tracker_swarm_missing_pieces": status["availability"]["missing"],
                    "swarm_tracker_swarm_piece_availability_min": status["availability"]["min"],
                    "swarm_tracker_swarm_piece_availability_mean": status["availability"]["mean"],
                    "swarm_tracker_swarm_piece_availability_max": status["availability"]["max"],
                    "swarm_tracker_swarm_origin_budget_pieces": status["origin"]["budget"],
                    "swarm_tracker_swarm_origin_pieces_in_flight": status["origin"]["in_flight"],
                    "swarm_tracker_swarm_origin_unassigned_pieces": status["origin"]["unassigned"],
                    "swarm_tracker_swarm_origin_assignments_total": status["origin"][
                        "assigned_total"
                    ],
                    "swarm_tracker_swarm_origin_reassignments_total": status["origin"][
                        "reassigned"
                    ],
                    "swarm_tracker_swarm_origin_stalls_total": status["origin"]["stalled"],
                    "swarm_tracker_swarm_lost_pieces_total": status["origin"]["lost"],
                    "swarm_tracker_swarm_origin_pulled_pieces_total": sum(
                        p["pulled"] for p in status["peer_list"]
                    ),
                    "swarm_tracker_swarm_barred_peers": len(status["barred"]),
                    "swarm_tracker_swarm_complete": float(status["swarm_complete"]),
                    "swarm_tracker_swarm_completion_ratio": status["finished_peers"]
                    / status["peers"],
                    "swarm_tracker_swarm_size_bytes": size,
                }
                for name, want in expected.items():
                    assert value(tracked, name, **labels) == pytest.approx(want), name
                # The numbers themselves: three peers, two finished, one origin copy.
                assert status["peers"] == 3 and status["finished_peers"] == 2
                assert status["availability"] == {
                    "min": 2,
                    "max": 2,
                    "mean": 2.0,
                    "missing": 0,
                }
                assert (
                    value(tracked, "swarm_tracker_swarm_origin_pulled_bytes_total", **labels)
                    == size
                )
                assert value(tracked, "swarm_tracker_swarm_origin_copies_ratio", **labels) == 1.0
                assert value(tracked, "swarm_tracker_catalog_reads_total") == 1
                assert value(tracked, "swarm_tracker_catalog_reachable") == 1

                # The lingering peers, scraped while they serve.
                assert seeder_metrics.port != downloader_metrics.port
                scraped = {
                    "seeder": (await scrape(session, seeder_metrics.url))[0],
                    "downloader": (await scrape(session, downloader_metrics.url))[0],
                }
                async with session.get(
                    seeder_metrics.url.replace("/metrics", "/healthz")
                ) as response:
                    assert response.status == 200

            # The late replica leaves: the swarm is complete and the peers end.
            await late.announce(
                Announce(manifest.ref, late_id, late_port, have, host="127.0.0.1", leaving=True)
            )
            results = dict(
                zip(("seeder", "downloader"), await asyncio.gather(*peers.runs), strict=True)
            )
            for who, result in results.items():
                got, js = scraped[who], result.to_json()
                assert js["verified"], who
                for name, field in (
                    ("swarm_peer_origin_bytes_total", "origin_bytes"),
                    ("swarm_peer_origin_retries_total", "origin_retries"),
                    ("swarm_peer_downloaded_bytes_total", "peer_bytes"),
                    ("swarm_peer_uploaded_bytes_total", "uploaded_bytes"),
                    ("swarm_peer_cut_through_bytes_total", "cut_through_bytes"),
                    ("swarm_peer_cross_zone_bytes_total", "cross_zone_bytes"),
                    ("swarm_peer_origin_pieces_total", "origin_pieces"),
                    ("swarm_peer_corrupt_pieces_total", "corrupt_pieces"),
                    ("swarm_peer_corrupt_blocks_total", "corrupt_blocks"),
                    ("swarm_peer_auth_failures_total", "auth_failures"),
                    ("swarm_peer_handshake_timeouts_total", "handshake_timeouts"),
                    ("swarm_peer_reused_bytes", "reused_bytes"),
                    ("swarm_peer_verified_pieces", "pieces"),
                    ("swarm_peer_pieces", "pieces"),
                    ("swarm_peer_artifact_bytes", "model_bytes"),
                ):
                    assert value(got, name, **labels) == js[field], f"{who}: {name} vs {field}"
                duplicates = sum(
                    value(got, "swarm_peer_duplicate_bytes_total", **labels, cause=cause)
                    for cause in js["duplicate_causes"]
                )
                assert duplicates == js["duplicate_bytes"], who
                assert value(got, "swarm_peer_barred_peers", **labels) == len(js["barred_peers"])
                assert value(got, "swarm_peer_finished", **labels) == 1
                assert value(got, "swarm_peer_swarm_complete", **labels) == 0
                assert value(got, "swarm_peer_origin_pieces_in_flight", **labels) == 0
            # Every byte left the origin once, through the seeder, and reached the downloader.
            assert results["seeder"].origin_bytes == size == relay.body_bytes()
            assert results["downloader"].origin_bytes == 0
            assert results["downloader"].peer_bytes >= size
            assert results["seeder"].extra["uploaded_bytes"] == results["downloader"].peer_bytes
        finally:
            await peers.close()
            await late.close()
            await tracker.close()

    try:
        run_test(body)
    finally:
        relay.stop()
        www.stop()


def test_metrics_are_open_with_a_token_and_count_refusals(tmp_path: Path) -> None:
    async def body() -> None:
        tracker = await start_tracker(tmp_path, tmp_path / "catalog", key=KEY)
        base = f"http://127.0.0.1:{tracker.config.port}"
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{base}/v1/swarms") as response:
                    assert response.status == 401
                samples, _ = await scrape(session, f"{base}/metrics")
                assert (
                    value(samples, "swarm_tracker_auth_failures_total", kind="unauthenticated") == 1
                )
                assert value(samples, "swarm_tracker_open") == 0
                # A datagram that is not an announce: refused, silently, and counted.
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    udp.sendto(b"\x00not an announce", ("127.0.0.1", tracker.config.port))
                for _ in range(500):
                    samples, _ = await scrape(session, f"{base}/metrics")
                    key = ("swarm_tracker_auth_failures_total", frozenset({("kind", "malformed")}))
                    if samples.get(key):
                        break
                    await asyncio.sleep(0.02)
                assert value(samples, "swarm_tracker_auth_failures_total", kind="malformed") == 1
                assert (
                    value(
                        samples, "swarm_tracker_announces_total", transport="udp", outcome="refused"
                    )
                    == 1
                )
                assert (
                    value(samples, "swarm_tracker_announces_total", transport="udp", outcome="ok")
                    == 0
                )
                # A process's own metrics come with the tracker's.
                assert value(samples, "process_resident_memory_bytes") > 0
        finally:
            await tracker.close()

    run_test(body)


def test_catalog_reads_and_failures_are_counted(tmp_path: Path) -> None:
    (tmp_path / "catalog").mkdir()

    async def body() -> None:
        tracker = await start_tracker(tmp_path, tmp_path / "catalog")
        base = f"http://127.0.0.1:{tracker.config.port}"
        try:
            async with aiohttp.ClientSession() as session:
                for _ in range(2):  # the second is answered from the negative cache
                    async with session.get(f"{base}/v1/manifest/no-such-model") as response:
                        assert response.status == 404
                samples, _ = await scrape(session, f"{base}/metrics")
            assert value(samples, "swarm_tracker_catalog_reads_total") == 1
            assert (
                value(samples, "swarm_tracker_catalog_read_failures_total", reason="not_found") == 1
            )
            assert value(samples, "swarm_tracker_catalog_read_failures_total", reason="error") == 0
            assert value(samples, "swarm_tracker_catalog_reachable") == 1
            assert value(samples, "swarm_tracker_swarms") == 0
        finally:
            await tracker.close()

    run_test(body)


def test_metrics_server_refuses_a_busy_port_and_closes(tmp_path: Path) -> None:
    files = make_files()
    populate(tmp_path / "www" / "model", files)

    async def body() -> None:
        manifest = await publish(
            (tmp_path / "www" / "model").as_uri(),
            NAME,
            (tmp_path / "catalog").as_uri(),
            piece_size=PIECE,
        )
        client = TrackerClient("http://127.0.0.1:9")
        peer = SwarmPeer(manifest, tmp_path / "dest", client, config=PeerConfig(durable=False))
        registry = peer_registry(peer)
        server = await serve_metrics("127.0.0.1", 0, registry)
        try:
            with pytest.raises(ConfigError, match="can't listen for metrics"):
                await serve_metrics("127.0.0.1", server.port, registry)
            async with aiohttp.ClientSession() as session:
                samples, _ = await scrape(session, server.url)
                labels = {"artifact": NAME, "root": manifest.root_hex[:12]}
                # Before run(): nothing moved yet, and the numbers say so.
                assert value(samples, "swarm_peer_verified_pieces", **labels) == 0
                assert value(samples, "swarm_peer_origin_bytes_total", **labels) == 0
                assert value(samples, "swarm_peer_pieces", **labels) == manifest.num_pieces
                await server.close()
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with session.get(server.url):
                        pass
        finally:
            await server.close()
            await peer.origin.close()
            await client.close()

    run_test(body)
