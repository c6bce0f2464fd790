"""End to end: real ``swarm tracker`` and ``swarm fetch`` processes swarming on loopback.

The artifact and its catalog live in a real S3-compatible server (rclone). The
tracker reads the catalog from it directly; the peers read data through a
``ByteCountingRelay``, so the bytes that leave the origin are counted at the
origin's side (HTTP response bodies, headers excluded), not by the peers.

A clean swarm of 6 peers: every copy identical, origin bytes == model size exactly
(each piece's range requested once), every peer seeded at least one piece, and at
least (N-1)/N of what the peers received came from each other. Origin reads are
held at the relay's gate until every peer has joined and holds an origin
assignment, so that the burst is spread over all of them however slowly the
processes start. Two fast tests check the instrument. Swarms under faults (killed
peers, a restarted tracker, a corrupt peer, ...) are in ``test_fault_matrix.py``.
"""

from __future__ import annotations

import http.client
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import S3Bucket
from servers import LOOPBACK, HTTPFileServer, S3Server, populate
from swarm_helpers import (
    LINGER,
    ByteCountingRelay,
    HTTPMeter,
    MeterError,
    MiB,
    Swarm,
    SwarmLab,
    assert_finished,
    make_model,
    publish_model,
    range_reads,
    wait_until,
)

PIECE_SIZE = 1 * MiB


@pytest.fixture
def lab(s3_server: S3Server, tmp_path: Path) -> Iterator[SwarmLab]:
    swarms = SwarmLab(s3_server, tmp_path)
    try:
        yield swarms
    finally:
        swarms.close()


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


def test_relay_counts_what_the_upstream_sent(
    tmp_path: Path, http_files_server: Callable[[Path], HTTPFileServer]
) -> None:
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
    s3_bucket: S3Bucket, lab: SwarmLab
) -> None:
    peers_n = 6
    model = publish_model(
        s3_bucket,
        "swarm-llm",
        make_model(1, [11 * MiB + 12_345, 12 * MiB + 7]),
        piece_size=PIECE_SIZE,
    )
    # The gate holds every origin read until all peers have joined and been given
    # pieces to seed, so none finishes the artifact before the last one arrives.
    swarm: Swarm = lab.start(model, gated=True)
    peers = [swarm.add_peer(f"peer-{i}") for i in range(peers_n)]
    swarm.wait_all_seeding(peers_n)
    swarm.open_gates()
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
    assert all(
        r["corrupt_pieces"] == r["corrupt_blocks"] == 0 and r["barred_peers"] == [] for r in results
    )
    # Every block from a peer was checked as it landed (format 2): none read back to hash.
    assert all(r["read_back_bytes"] == 0 for r in results), [r["read_back_bytes"] for r in results]
    # They left because the tracker said every peer had finished, not at the linger bound.
    assert all(r["linger_seconds"] < LINGER / 2 for r in results), results
