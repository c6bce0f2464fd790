"""End to end: real ``swarm tracker`` and ``swarm fetch`` processes swarming on loopback.

The artifact and its catalog live in a real S3-compatible server (rclone). The
tracker reads the catalog from it directly; the peers read data through a
``ByteCountingRelay``, so the bytes that leave the origin are counted at the
origin's side (HTTP response bodies, headers excluded), not by the peers.

- a clean swarm of 6 peers: every copy identical, origin bytes == model size
  exactly (each piece's range requested once), every peer seeded at least one
  piece, and at least (N-1)/N of what the peers received came from each other;
- a peer serving corrupt blocks is caught, barred, and the rest finish verified;
- a peer SIGKILLed midway: the rest finish; the origin re-reads at most what it
  had in flight or alone held;
- the tracker SIGKILLed and restarted on the same port midway: the swarm finishes.

Origin reads are held at the relay's gate until every peer has joined and holds
an origin assignment, so that the burst is spread over all of them however slowly
the processes start; in the fault tests the relay also paces each connection so
the faults land while pulls are in flight. Two fast tests check the instrument.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import S3Bucket
from servers import LOOPBACK, S3Server, free_port, populate
from swarm_helpers import (
    COMPLETE_MARKER,
    ByteCountingRelay,
    FetchOutcome,
    FetchProcess,
    HTTPMeter,
    MeterError,
    Processes,
    TrackerProcess,
    processes,
    tree_digests,
    wait_until,
)

from seeder.publish import publish

KiB = 1024
MiB = 1024 * KiB
PIECE_SIZE = 1 * MiB
PREFIX = "models/swarm-llm"
CATALOG_PREFIX = "catalog"

# Announces are frequent so that a dead peer or tracker shows quickly. Peers are
# declared dead (TTL) or stalled only when a test means it: a loaded CI machine
# can hold a live peer's announce, or a 1 MiB pull's only progress report, for
# seconds, and a needless reassignment reads the origin twice.
ANNOUNCE_INTERVAL = 0.3
PEER_TTL = 10.0
KILLED_PEER_TTL = 3.0
STALL_TIMEOUT = 30.0
LINGER = 20.0
FETCH_TIMEOUT = 30.0


def make_model(seed: int, shard_sizes: list[int]) -> dict[str, bytes]:
    """Seeded random shards plus small config files; sizes not multiples of the piece size."""
    rng = random.Random(seed)
    files = {
        "config.json": b'{"architectures": ["SwarmForCausalLM"], "layers": 4}\n',
        "tokenizer/tokenizer.json": rng.randbytes(150_001),
    }
    for i, size in enumerate(shard_sizes):
        files[f"weights/model-{i + 1:05d}-of-{len(shard_sizes):05d}.safetensors"] = rng.randbytes(
            size
        )
    return files


@dataclass(frozen=True)
class Published:
    """An artifact in the S3 bucket and its manifest in the S3 catalog."""

    name: str
    ref: str
    root: str
    files: dict[str, bytes]
    model_bytes: int
    pieces: int
    catalog: str
    digests: dict[str, str]


def publish_model(bucket: S3Bucket, name: str, files: dict[str, bytes]) -> Published:
    """Write ``files`` into the bucket and publish them (in-process, straight to rclone)."""
    populate(bucket.path / PREFIX, files)
    catalog = f"{bucket.url}/{CATALOG_PREFIX}"
    manifest = asyncio.run(publish(f"{bucket.url}/{PREFIX}", name, catalog, piece_size=PIECE_SIZE))
    model_bytes = sum(len(data) for data in files.values())
    assert manifest.total_size == model_bytes
    digests = tree_digests(bucket.path / PREFIX)
    return Published(
        name,
        manifest.ref,
        manifest.root_hex,
        files,
        model_bytes,
        manifest.num_pieces,
        catalog,
        digests,
    )


@dataclass
class Swarm:
    """A running tracker, the relay in front of the origin, and the peers."""

    model: Published
    tracker: TrackerProcess
    relay: ByteCountingRelay
    peers: list[FetchProcess]
    procs: Processes
    peer_env: dict[str, str]
    logs: Path
    tmp: Path

    def add_peer(self, name: str, *extra: str, port: int = 0) -> FetchProcess:
        peer = self.procs.add(
            FetchProcess(
                name,
                self.model.name,
                self.tracker.url,
                self.tmp / name,
                self.peer_env,
                self.logs,
                linger=LINGER,
                port=port,
                extra=extra,
            )
        )
        peer.spawn()
        self.peers.append(peer)
        return peer

    def status(self) -> dict[str, Any] | None:
        return self.tracker.swarm_status(self.model.root)

    def wait_all_seeding(self, count: int) -> None:
        """Until the tracker knows ``count`` peers and has given each an origin piece."""

        def ready() -> bool:
            status = self.status()
            if status is None or len(status["peer_list"]) < count:
                return False
            return all(p["assigned"] for p in status["peer_list"])

        wait_until(ready, timeout=30.0, what=f"{count} peers each with an origin assignment")

    def wait_peers(self, peers: list[FetchProcess]) -> list[FetchOutcome]:
        """Wait for ``peers`` to exit (bounded); on timeout, fail with the tracker's view."""
        deadline = time.monotonic() + FETCH_TIMEOUT
        try:
            return [p.wait(max(1.0, deadline - time.monotonic())) for p in peers]
        except AssertionError as exc:
            try:
                status = json.dumps(self.status(), indent=1)[:6000]
            except (OSError, AssertionError) as why:
                status = f"(tracker status unavailable: {why})"
            pending = [e for e in self.relay.exchanges() if not e.complete]
            raise AssertionError(
                f"{exc}\n--- origin: {len(self.relay.exchanges())} requests, "
                f"{self.relay.body_bytes()} body bytes, unanswered or partial: {pending[:8]}"
                f"\n--- tracker status\n{status}"
            ) from None

    def origin_body_bytes(self) -> int:
        """Response body bytes of data objects that left the origin (through the relay)."""
        data_keys = {f"{self._bucket()}/{PREFIX}/{path}" for path in self.model.files}
        exchanges = self.relay.exchanges()
        others = [e for e in exchanges if e.key not in data_keys]
        assert not others, f"peers asked the origin for more than data: {others[:5]}"
        return sum(e.body_bytes for e in exchanges)

    def _bucket(self) -> str:
        return self.model.catalog.removeprefix("s3://").split("/", 1)[0]


@pytest.fixture
def swarm_factory(s3_server: S3Server, s3_bucket: S3Bucket, tmp_path: Path) -> Iterator[Any]:
    relays: list[ByteCountingRelay] = []
    with processes() as procs:

        def start(
            model: Published,
            *,
            gated: bool = False,
            rate: float | None = None,
            peer_ttl: float = PEER_TTL,
            stall_timeout: float = STALL_TIMEOUT,
        ) -> Swarm:
            relay = ByteCountingRelay(s3_server.endpoint, gated=gated, rate=rate)
            relay.start()
            relays.append(relay)
            logs = tmp_path / "logs"
            tracker = procs.add(
                TrackerProcess(
                    model.catalog,
                    s3_server.env(),
                    logs,
                    announce_interval=ANNOUNCE_INTERVAL,
                    peer_ttl=peer_ttl,
                    stall_timeout=stall_timeout,
                )
            )
            tracker.start()
            return Swarm(
                model,
                tracker,
                relay,
                [],
                procs,
                s3_server.env(endpoint=relay.endpoint),
                logs,
                tmp_path,
            )

        try:
            yield start
        finally:
            procs.close()
            for relay in relays:
                relay.stop()


def assert_finished(swarm: Swarm, outcome: FetchOutcome, peer: FetchProcess) -> dict[str, Any]:
    """Exit 0, one JSON summary saying verified, the marker, and byte-identical files."""
    assert outcome.returncode == 0, outcome.describe()
    result = outcome.json()
    assert result["verified"] is True, outcome.describe()
    assert result["root"] == swarm.model.root
    assert result["model_bytes"] == swarm.model.model_bytes
    assert (peer.dest / COMPLETE_MARKER).is_file(), f"{peer.name}: no completion marker"
    assert tree_digests(peer.dest) == swarm.model.digests, f"{peer.name}: files differ"
    return result


def range_reads(swarm: Swarm) -> Counter[tuple[str, tuple[int, int] | None]]:
    """How often each (object, byte range) was requested from the origin."""
    return Counter((e.key, e.range) for e in swarm.relay.exchanges())


# --------------------------------------------------------------------------------------
# The instrument first: the relay counts exactly the body bytes the server sent.


def test_meter_counts_bodies_not_headers_fed_one_byte_at_a_time() -> None:
    meter = HTTPMeter()
    requests = (
        b"GET /b/k HTTP/1.1\r\nHost: x\r\nRange: bytes=10-19\r\n\r\n"
        b"HEAD /b/k HTTP/1.1\r\nHost: x\r\n\r\n"
        b"PUT /b/new HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /b/chunked HTTP/1.1\r\n\r\n"
    )
    responses = (
        b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\n\r\n0123456789"
        b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n"
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;ext=1\r\nabcd\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    for i in range(len(requests)):
        meter.client_data(requests[i : i + 1])
    for i in range(len(responses)):
        meter.server_data(responses[i : i + 1])
    got = [(e.method, e.key, e.range, e.status, e.body_bytes, e.complete) for e in meter.exchanges]
    assert got == [
        ("GET", "b/k", (10, 19), 206, 10, True),
        ("HEAD", "b/k", None, 200, 0, True),
        ("PUT", "b/new", None, 200, 0, True),
        ("GET", "b/chunked", None, 200, 14, True),
    ]
    with pytest.raises(MeterError):
        HTTPMeter().server_data(b"HTTP/1.1 200 OK\r\n\r\n")  # a response nobody asked for


def test_relay_counts_what_the_upstream_sent(tmp_path: Path, http_files_server: Any) -> None:
    data = random.Random(5).randbytes(300_001)
    server = http_files_server(populate(tmp_path, {"obj.bin": data}))
    with ByteCountingRelay(server.endpoint, rate=4 * MiB) as relay:
        conn = http.client.HTTPConnection(LOOPBACK, relay.port, timeout=10)
        try:  # one keep-alive connection, several requests
            for headers in ({}, {"Range": "bytes=100-199"}):
                conn.request("GET", "/obj.bin", headers=headers)
                assert len(conn.getresponse().read()) in (len(data), 100)
            conn.request("GET", "/missing")
            conn.getresponse().read()
        finally:
            conn.close()
        wait_until(lambda: len(relay.exchanges()) == 3, timeout=5.0, what="3 exchanges")
        statuses = [e.status for e in relay.exchanges()]
        assert statuses == [200, 206, 404]
        bodies = [e.body_bytes for e in relay.exchanges()]
        assert bodies[:2] == [len(data), 100]
        assert relay.body_bytes() == sum(bodies)
        assert relay.server_bytes > relay.body_bytes()  # headers are relayed, not counted
        assert relay.connections == 1 and relay.errors == []


@pytest.mark.slow
def test_swarm_reads_the_origin_once_and_peers_trade_the_rest(
    s3_server: S3Server, s3_bucket: S3Bucket, swarm_factory: Any
) -> None:
    peers_n = 6
    model = publish_model(s3_bucket, "swarm-llm", make_model(1, [11 * MiB + 12_345, 12 * MiB + 7]))
    # The gate holds every origin read until all peers have joined and been given
    # pieces to seed, so none finishes the artifact before the last one arrives.
    swarm: Swarm = swarm_factory(model, gated=True)
    peers = [swarm.add_peer(f"peer-{i}") for i in range(peers_n)]
    swarm.wait_all_seeding(peers_n)
    swarm.relay.open_gate()
    outcomes = swarm.wait_peers(peers)
    results = [assert_finished(swarm, o, p) for o, p in zip(outcomes, peers, strict=True)]

    # Counted at the origin's side: exactly one copy, every piece's range once.
    assert swarm.relay.errors == []
    assert swarm.origin_body_bytes() == model.model_bytes
    reads = range_reads(swarm)
    assert len(reads) == model.pieces and set(reads.values()) == {1}
    assert all(e.status in (200, 206) and e.complete for e in swarm.relay.exchanges())
    # The peers' own counters agree with the relay.
    assert sum(r["origin_bytes"] for r in results) == model.model_bytes
    assert sum(r["origin_pieces"] for r in results) == model.pieces
    # The burst was spread: every peer seeded at least one piece.
    assert all(r["origin_pieces"] >= 1 for r in results), [r["origin_pieces"] for r in results]
    # And the rest moved peer to peer.
    peer_bytes = sum(r["peer_bytes"] for r in results)
    received = peer_bytes + sum(r["origin_bytes"] for r in results)
    assert peer_bytes / received >= (peers_n - 1) / peers_n
    # A block sent just before its receiver shut down may never have been read.
    assert sum(r["uploaded_bytes"] for r in results) >= peer_bytes
    assert all(r["corrupt_pieces"] == 0 and r["barred_peers"] == [] for r in results)
    # They left because the tracker said every peer had finished, not at the linger bound.
    assert all(r["linger_seconds"] < LINGER / 2 for r in results), results


@pytest.mark.slow
def test_a_peer_serving_corrupt_blocks_is_barred_and_the_rest_finish(
    s3_server: S3Server, s3_bucket: S3Bucket, swarm_factory: Any
) -> None:
    model = publish_model(s3_bucket, "corrupt-llm", make_model(2, [8 * MiB + 99]))
    swarm: Swarm = swarm_factory(model, gated=True)
    honest = [swarm.add_peer(f"peer-{i}") for i in range(5)]
    liar = swarm.add_peer("liar", "--serve-corrupt", port=free_port())
    # The liar seeds pieces of its own, so the others must get those from it first:
    # only after they bar it, and the tracker hears of it, do they go back to the origin.
    swarm.wait_all_seeding(len(swarm.peers))
    swarm.relay.open_gate()
    outcomes = swarm.wait_peers(honest)
    results = [assert_finished(swarm, o, p) for o, p in zip(outcomes, honest, strict=True)]

    honest_ids = {r["peer_id"] for r in results}
    status = swarm.status()
    assert status is not None
    assert len(status["barred"]) == 1, status["barred"]
    liar_id = status["barred"][0]
    assert liar_id not in honest_ids
    # The tracker dropped it from the swarm: it is no longer listed to anyone.
    assert liar_id not in {p["peer_id"] for p in status["peer_list"]}
    assert liar.port not in {p["port"] for p in status["peer_list"]}
    # Every honest peer that asked the liar for blocks caught it; nobody else was blamed.
    assert sum(r["corrupt_pieces"] for r in results) > 0
    assert all(r["barred_peers"] in ([], [liar_id]) for r in results), results
    assert any(r["barred_peers"] == [liar_id] for r in results)
    for r in results:
        assert (r["corrupt_pieces"] > 0) == (r["barred_peers"] == [liar_id]), r
    # Pieces the liar pulled were read from the origin again for the others: each
    # piece's range at most twice. (Barred by every peer that met it and out of the
    # tracker's swarm, the liar itself may never finish; nobody waited for it.)
    assert swarm.origin_body_bytes() >= model.model_bytes
    assert max(range_reads(swarm).values()) <= 2


@pytest.mark.slow
def test_a_peer_killed_midway_does_not_stop_the_rest(
    s3_server: S3Server, s3_bucket: S3Bucket, swarm_factory: Any
) -> None:
    model = publish_model(s3_bucket, "killed-llm", make_model(3, [22 * MiB + 5]))
    # 2 MiB/s per origin connection: a 1 MiB piece takes half a second, so the victim
    # is killed with origin pulls in flight.
    swarm: Swarm = swarm_factory(model, gated=True, rate=2 * MiB, peer_ttl=KILLED_PEER_TTL)
    survivors = [swarm.add_peer(f"peer-{i}") for i in range(5)]
    victim = swarm.add_peer("victim", port=free_port())
    swarm.wait_all_seeding(len(swarm.peers))
    swarm.relay.open_gate()

    def victim_midway() -> bool:
        if victim.verified_pieces(model.root) < 1:
            return False
        status = swarm.status()
        return status is not None and any(
            p["assigned"] and p["port"] == victim.port for p in status["peer_list"]
        )

    wait_until(victim_midway, timeout=30.0, what="the victim to hold a piece and pull more")
    victim.kill()
    held = victim.verified_pieces(model.root)
    assert held < model.pieces, "the victim finished before it was killed"

    outcomes = swarm.wait_peers(survivors)
    for outcome, peer in zip(outcomes, survivors, strict=True):
        assert_finished(swarm, outcome, peer)
    # The origin re-read at most what the victim was pulling (2 pieces at once per
    # peer) plus the pieces it alone held: its verified pieces bound those.
    extra = swarm.origin_body_bytes() - model.model_bytes
    assert 0 <= extra <= (held + 2) * PIECE_SIZE, (extra, held)
    assert max(range_reads(swarm).values()) <= 2
    status = swarm.status()
    assert status is not None
    assert status["origin"]["reassigned"] >= 1, status["origin"]


@pytest.mark.slow
def test_the_tracker_killed_and_restarted_midway_the_swarm_finishes(
    s3_server: S3Server, s3_bucket: S3Bucket, swarm_factory: Any
) -> None:
    model = publish_model(s3_bucket, "restart-llm", make_model(4, [22 * MiB + 5]))
    # 1 MiB/s per origin connection: the origin phase alone takes a few seconds.
    swarm: Swarm = swarm_factory(model, gated=True, rate=1 * MiB)
    peers = [swarm.add_peer(f"peer-{i}") for i in range(6)]
    swarm.wait_all_seeding(len(peers))
    swarm.relay.open_gate()

    def some_pieces_present() -> bool:
        status = swarm.status()
        return status is not None and status["present_pieces"] >= 4

    wait_until(some_pieces_present, timeout=30.0, what="4 pieces present in the swarm")
    swarm.tracker.kill()
    assert not any((p.dest / COMPLETE_MARKER).exists() for p in peers), "killed too late"
    time.sleep(2 * ANNOUNCE_INTERVAL)  # the peers find it gone
    swarm.tracker.start()  # same port: the peers' next announces rebuild its state

    outcomes = swarm.wait_peers(peers)
    results = [assert_finished(swarm, o, p) for o, p in zip(outcomes, peers, strict=True)]
    status = swarm.status()
    assert status is not None, "the restarted tracker never heard of the swarm"
    # Rebuilt from announces, the new tracker saw every peer finish and let them go.
    assert all(r["linger_seconds"] < LINGER / 2 for r in results), results
    # What a restart may cost: pulls under way that had reported no bytes yet are
    # not adopted by the new tracker (the peer drops them on its first reply and the
    # piece is pulled again), so at most the pulls in flight at the kill, 2 per peer.
    extra = swarm.origin_body_bytes() - model.model_bytes
    assert 0 <= extra <= 2 * len(peers) * PIECE_SIZE, extra
    assert max(range_reads(swarm).values()) <= 2
