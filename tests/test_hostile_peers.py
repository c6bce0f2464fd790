"""Hostile and unlucky peers against real ``swarm tracker`` and ``swarm fetch`` processes.

Each test runs a tracker and honest peers as subprocesses on loopback (the harness
of ``tests/swarm_helpers.py``), each peer reading the origin (S3) through a
``ByteCountingRelay`` of its own, and hostile peers written here with the sans-I/O
wire protocol (``tests/hostile_peer.py``). In each, a victim ``swarm fetch`` must
finish from the honest peers, within a bounded time: exit 0, verified, files
byte-identical, and origin bytes where they belong.

The findings of issue 13 they reproduce:

1. An origin pull the tracker takes back (a complete peer joined) is asked of the
   peer that has the piece at once, not after that peer's ``--linger``.
2. Two peers that claim every piece and never answer requests: their requests
   expire (``--request-timeout``) and go to the honest peer.
3. Eight peers that start every block and trickle its payload a byte a second:
   a block that slow drops its connection, so they can't pin the receive buffers.
4. One connection that sends 32 requests and never reads can't hold every upload
   slot of a complete peer: another fetch is still served.
5. Connections that never send a handshake are closed, and a fetch is served
   meanwhile; a peer with few file descriptors, flooded with connections, neither
   dies (downloading) nor stops accepting (complete).

A complete peer ("seed") is a ``swarm fetch`` started on a destination that a
``swarm fetch --direct`` filled beforehand, straight from S3 (so its origin bytes
are not counted at any relay). A complete peer leaves as soon as the tracker says
every peer has finished, so where it must wait for a fetch not yet started, a
stand-in (a silent hostile peer that claims nothing) keeps the swarm incomplete.
"""

from __future__ import annotations

import resource
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import S3Bucket
from hostile_peer import (
    Behaviour,
    HostilePeers,
    Target,
    accepts_handshake,
    close_all,
    hog_uploads,
    idle_connections,
    wait_closed,
)
from servers import LOOPBACK, S3Server, free_port, venv_binary
from swarm_helpers import (
    COMPLETE_MARKER,
    FetchOutcome,
    FetchProcess,
    KiB,
    MiB,
    Published,
    Swarm,
    SwarmLab,
    assert_finished,
    cli_env,
    make_model,
    publish_model,
    range_reads,
    wait_until,
)

from swarm.protocol import Request

TEST_TIMEOUT = 120
SEED_LINGER = 60.0
"""A complete peer's ``--linger``: a victim that waited for it to run out fails its bound."""
VICTIM_TIMEOUT = SEED_LINGER / 2
"""How long a victim may take once its honest peer is up (they finish in seconds)."""
REQUEST_TIMEOUT = "3"
ORIGIN_RATE = 1 * MiB
HANDSHAKE_TIMEOUT = 10.0
"""The peer's deadline for a connection's handshake (``PeerConfig.handshake_timeout``)."""
FLOOD = 500
LOW_NOFILE = 64
FD_FLOOD = 200
SEED_READY = 20.0
STOP_WAIT = 5.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(TEST_TIMEOUT)]


@pytest.fixture
def lab(s3_server: S3Server, tmp_path: Path) -> Iterator[SwarmLab]:
    swarms = SwarmLab(s3_server, tmp_path)
    try:
        yield swarms
    finally:
        swarms.close()


@pytest.fixture
def hostiles() -> Iterator[Callable[[Swarm], HostilePeers]]:
    """``hostiles(swarm)`` starts hostile peers of that swarm; all stopped after the test."""
    started: list[HostilePeers] = []

    def start(swarm: Swarm) -> HostilePeers:
        peers = HostilePeers(swarm.tracker.url, target_of(swarm.model))
        peers.start()
        started.append(peers)
        return peers

    try:
        yield start
    finally:
        for peers in started:
            peers.stop()


def publish(
    bucket: S3Bucket, name: str, seed: int, *, piece_size: int, shards: list[int]
) -> Published:
    return publish_model(
        bucket, name, make_model(seed, shards), piece_size=piece_size, prefix=f"models/{name}"
    )


def target_of(model: Published) -> Target:
    return Target(model.ref, model.root, model.pieces)


def complete_copy(s3: S3Server, model: Published, dest: Path) -> Path:
    """Fill ``dest`` with a recorded, complete copy (``swarm fetch --direct``, straight from S3)."""
    run = subprocess.run(
        [
            venv_binary("swarm"),
            "fetch",
            model.name,
            "--direct",
            "--catalog",
            model.catalog,
            "--dest",
            str(dest),
            "--no-fsync",
            "--json",
        ],
        env=cli_env(s3.env()),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert (dest / COMPLETE_MARKER).is_file()
    return dest


def peer_entry(swarm: Swarm, peer: FetchProcess) -> dict[str, Any] | None:
    """The tracker's record of ``peer`` (found by its listening port)."""
    status = swarm.status()
    for entry in status["peer_list"] if status else []:
        if entry["port"] == peer.port:
            assert isinstance(entry, dict)
            return entry
    return None


def start_seed(swarm: Swarm, dest: Path, *extra: str, nofile: int | None = None) -> FetchProcess:
    """A complete peer on ``dest``, once the tracker lists it as finished (with
    ``nofile``, its descriptor limit lowered as soon as it exists)."""
    seed = swarm.add_peer("seed", *extra, dest=dest, linger=SEED_LINGER, port=free_port())
    if nofile is not None:
        limit_descriptors(seed, nofile)

    def listed() -> bool:
        if not seed.alive():
            return True  # its outcome says why
        entry = peer_entry(swarm, seed)
        return entry is not None and entry["have"] == swarm.model.pieces

    wait_until(listed, timeout=SEED_READY, what="the seed to be listed with every piece")
    assert_running(seed)
    return seed


def assert_running(peer: FetchProcess) -> None:
    """``peer`` is still running; if not, fail with how it ended."""
    if not peer.alive():
        raise AssertionError(f"exited early: {peer.wait(STOP_WAIT).describe()}")


def assert_clean(outcome: FetchOutcome) -> None:
    assert "Traceback" not in outcome.stderr, outcome.describe()


def finish_victim(swarm: Swarm, victim: FetchProcess) -> dict[str, Any]:
    """The victim ends verified within ``VICTIM_TIMEOUT``, everything from peers."""
    [outcome] = swarm.wait_peers([victim], VICTIM_TIMEOUT)
    assert_clean(outcome)
    result = assert_finished(swarm, outcome, victim)
    # Every piece was present in the swarm all along: not a byte from the origin.
    assert result["origin_bytes"] == 0 == swarm.origin_body_bytes(), result
    assert result["peer_bytes"] >= swarm.model.model_bytes, result
    return result


def let_seed_go(
    swarm: Swarm, hostile: HostilePeers, stand_in: bytes, seed: FetchProcess
) -> dict[str, Any]:
    """The stand-in leaves, so the seed does: its summary (it exits 0, no traceback)."""
    hostile.leave(stand_in)
    [outcome] = swarm.wait_peers([seed], 20.0)
    assert_clean(outcome)
    return assert_finished(swarm, outcome, seed)


def limit_descriptors(peer: FetchProcess, limit: int) -> None:
    """Lower ``peer``'s RLIMIT_NOFILE; called right after the spawn, before it opens its
    store or any socket."""
    resource.prlimit(peer.pid, resource.RLIMIT_NOFILE, (limit, limit))


# --------------------------------------------------------------------------------------
# 1. An origin piece taken back


def test_an_origin_pull_taken_back_is_asked_of_the_peer_that_holds_the_piece(
    s3_server: S3Server, s3_bucket: S3Bucket, lab: SwarmLab, tmp_path: Path
) -> None:
    # 1 MiB pieces at 1 MiB/s for the whole cluster, two pulls at a time: each pull
    # lasts about 2 s, so the complete peer joins with pulls in flight.
    model = publish(
        s3_bucket, "takeback-llm", 21, piece_size=1 * MiB, shards=[5 * MiB + 4_321, 5 * MiB - 77]
    )
    seed_dest = complete_copy(s3_server, model, tmp_path / "seed")
    swarm = lab.start(
        model, per_peer_relays=True, tracker_args=("--origin-rate-limit", str(ORIGIN_RATE))
    )
    lone = swarm.add_peer("lone", linger=0.0, port=free_port())
    wait_until(
        lambda: lone.verified_pieces(model.root) >= 2 or not lone.alive(),
        timeout=30.0,
        what="the lone peer to pull 2 pieces from the origin",
    )
    entry = peer_entry(swarm, lone)
    assert_running(lone)
    assert entry is not None and entry["assigned"], f"no pull in flight: {entry}"
    assert lone.verified_pieces(model.root) < model.pieces, "finished before the seed joined"

    joined = time.monotonic()
    seed = swarm.add_peer("seed", dest=seed_dest, linger=SEED_LINGER, port=free_port())
    # Bounded well below the seed's linger: waiting it out would fail here.
    [outcome] = swarm.wait_peers([lone], VICTIM_TIMEOUT)
    took = time.monotonic() - joined
    assert_clean(outcome)
    result = assert_finished(swarm, outcome, lone)

    # The peer counts what it read; a pull taken back is dropped with what was still in
    # flight to it (the socket's buffers, a read's chunk: 256 KiB in 1 of 7 full runs today),
    # which left the origin all the same. At most two pulls run at once.
    unread = swarm.origin_body_bytes("lone") - result["origin_bytes"]
    assert 0 <= unread <= 2 * MiB, (unread, result)
    assert swarm.origin_body_bytes("seed") == 0
    # The seed served what the lone peer lacked, the pulls it lost included.
    assert result["peer_bytes"] > 0, result
    assert result["origin_pieces"] < model.pieces, result
    # About one copy from the origin: what was pulled, plus the part of each lost pull.
    assert swarm.origin_body_bytes() <= model.model_bytes, swarm.origin_body_bytes()
    assert max(range_reads(swarm).values()) == 1, range_reads(swarm)
    # The seed saw the swarm complete and left long before its linger ran out.
    [left] = swarm.wait_peers([seed], 20.0)
    assert_clean(left)
    served = assert_finished(swarm, left, seed)
    assert served["uploaded_bytes"] > 0, served
    print(
        f"takeback: finished {took:.1f} s after the seed started; origin "
        f"{swarm.origin_body_bytes() / model.model_bytes:.3f} x F, "
        f"{result['origin_pieces']} of {model.pieces} pieces pulled"
    )


# --------------------------------------------------------------------------------------
# 2-3. Peers that claim every piece and never deliver


def _hold_then_rescue(
    s3_server: S3Server,
    bucket: S3Bucket,
    lab: SwarmLab,
    hostiles: Callable[[Swarm], HostilePeers],
    tmp_path: Path,
    behaviour: Behaviour,
    count: int,
) -> tuple[dict[str, Any], HostilePeers]:
    """``count`` hostile peers get the victim first; then the honest seed joins."""
    name = f"{behaviour.value}-llm"
    model = publish(bucket, name, 22, piece_size=128 * KiB, shards=[2 * MiB + 4_321, 1 * MiB - 77])
    seed_dest = complete_copy(s3_server, model, tmp_path / "seed")
    swarm = lab.start(model, per_peer_relays=True)
    hostile = hostiles(swarm)
    # Claiming every piece to the tracker too: it assigns nobody an origin pull.
    for i in range(count):
        hostile.add_listener(f"127.0.0.{31 + i}", behaviour)
    victim = swarm.add_peer("victim", "--request-timeout", REQUEST_TIMEOUT, linger=0.0)

    def engaged() -> bool:
        tally = hostile.tally
        asked = tally.handshakes >= count and tally.requests >= count
        return asked or not victim.alive()

    wait_until(engaged, timeout=20.0, what=f"the victim to ask the {count} hostile peers")
    assert_running(victim)
    start_seed(swarm, seed_dest)
    return finish_victim(swarm, victim), hostile


def test_silent_peers_claiming_every_piece_do_not_hold_a_fetch(
    s3_server: S3Server,
    s3_bucket: S3Bucket,
    lab: SwarmLab,
    hostiles: Callable[[Swarm], HostilePeers],
    tmp_path: Path,
) -> None:
    result, hostile = _hold_then_rescue(
        s3_server, s3_bucket, lab, hostiles, tmp_path, Behaviour.SILENT, 2
    )
    assert hostile.tally.payload_bytes == 0
    print(
        f"silent: {hostile.tally.requests} requests to the silent peers; {result['seconds']:.1f} s"
    )


def test_trickling_peers_do_not_pin_the_receive_buffers(
    s3_server: S3Server,
    s3_bucket: S3Bucket,
    lab: SwarmLab,
    hostiles: Callable[[Swarm], HostilePeers],
    tmp_path: Path,
) -> None:
    result, hostile = _hold_then_rescue(
        s3_server, s3_bucket, lab, hostiles, tmp_path, Behaviour.TRICKLE, 8
    )
    tally = hostile.tally
    # They were asked, and started blocks they never finished.
    assert tally.blocks_started > 0, tally
    print(
        f"trickle: {tally.blocks_started} blocks started, {tally.payload_bytes} B trickled, "
        f"{tally.closed_by_remote} connections dropped by the victim; {result['seconds']:.1f} s"
    )


# --------------------------------------------------------------------------------------
# 4. A connection that asks and never reads


def test_a_connection_that_never_reads_does_not_hold_every_upload_slot(
    s3_server: S3Server,
    s3_bucket: S3Bucket,
    lab: SwarmLab,
    hostiles: Callable[[Swarm], HostilePeers],
    tmp_path: Path,
) -> None:
    model = publish(
        s3_bucket, "hog-llm", 23, piece_size=1 * MiB, shards=[4 * MiB + 4_321, 3 * MiB - 77]
    )
    seed_dest = complete_copy(s3_server, model, tmp_path / "seed")
    swarm = lab.start(model, per_peer_relays=True)
    target = target_of(model)
    hostile = hostiles(swarm)
    stand_in, _ = hostile.add_listener("127.0.0.51", Behaviour.SILENT, target.nothing())
    seed = start_seed(swarm, seed_dest)
    # 32 distinct requests of about a piece each: 32 MiB, far more than the socket
    # buffers between the two hold, so the seed's sends to it stop for good.
    requests = [
        Request(piece, 0, model.piece_lengths[piece] - k)
        for k in range(4)
        for piece in range(model.pieces)
    ][:32]
    assert len(set(requests)) == 32
    hog = hog_uploads((LOOPBACK, seed.port), target, requests)
    try:
        fetch = swarm.add_peer("fetch", linger=0.0)
        finish_victim(swarm, fetch)
    finally:
        hog.close()
    served = let_seed_go(swarm, hostile, stand_in, seed)
    # It served the fetch, whatever it managed to push into the hog's buffers.
    assert served["uploaded_bytes"] >= model.model_bytes, served


# --------------------------------------------------------------------------------------
# 5. Connections without a handshake; running out of descriptors


def test_connections_that_never_handshake_are_closed_and_a_fetch_is_served(
    s3_server: S3Server,
    s3_bucket: S3Bucket,
    lab: SwarmLab,
    hostiles: Callable[[Swarm], HostilePeers],
    tmp_path: Path,
) -> None:
    model = publish(
        s3_bucket, "nohello-llm", 24, piece_size=256 * KiB, shards=[2 * MiB + 4_321, 1 * MiB - 77]
    )
    seed_dest = complete_copy(s3_server, model, tmp_path / "seed")
    swarm = lab.start(model, per_peer_relays=True)
    target = target_of(model)
    hostile = hostiles(swarm)
    stand_in, _ = hostile.add_listener("127.0.0.52", Behaviour.SILENT, target.nothing())
    seed = start_seed(swarm, seed_dest)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= FLOOD + 256, f"this test opens {FLOOD} sockets; the hard limit is {hard}"
    if soft < FLOOD + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FLOOD + 256, hard))
    socks = idle_connections((LOOPBACK, seed.port), FLOOD)
    try:
        fetch = swarm.add_peer("fetch", linger=0.0)
        finish_victim(swarm, fetch)
        closed, received = wait_closed(socks, HANDSHAKE_TIMEOUT + 20.0)
    finally:
        close_all(socks)
    # Every one closed (at the handshake deadline, or refused at once), and a
    # stranger that proved nothing was sent nothing.
    assert closed == FLOOD, f"{FLOOD - closed} of {FLOOD} connections still open"
    assert received == 0, received
    served = let_seed_go(swarm, hostile, stand_in, seed)
    assert served["handshake_timeouts"] + served["pending_refused"] >= FLOOD, served


def test_a_downloading_peer_out_of_descriptors_keeps_going(
    s3_server: S3Server,
    s3_bucket: S3Bucket,
    lab: SwarmLab,
    hostiles: Callable[[Swarm], HostilePeers],
    tmp_path: Path,
) -> None:
    model = publish(
        s3_bucket,
        "nofile-down-llm",
        25,
        piece_size=128 * KiB,
        shards=[2 * MiB + 4_321, 1 * MiB - 77],
    )
    seed_dest = complete_copy(s3_server, model, tmp_path / "seed")
    swarm = lab.start(model, per_peer_relays=True)
    target = target_of(model)
    hostile = hostiles(swarm)
    stand_in, _ = hostile.add_listener("127.0.0.53", Behaviour.SILENT, target.nothing())
    # Capped, so the download lasts a few seconds and the flood lands mid-way.
    seed = start_seed(swarm, seed_dest, "--max-upload-rate", str(1 * MiB))
    down = swarm.add_peer("down", linger=0.0, port=free_port())
    limit_descriptors(down, LOW_NOFILE)
    wait_until(
        lambda: down.verified_pieces(model.root) >= 1 or not down.alive(),
        timeout=20.0,
        what="the download to verify a piece",
    )
    assert_running(down)
    assert down.verified_pieces(model.root) < model.pieces, "finished before the flood"
    socks = idle_connections((LOOPBACK, down.port), FD_FLOOD)
    try:
        finish_victim(swarm, down)
    finally:
        close_all(socks)
    let_seed_go(swarm, hostile, stand_in, seed)


def test_a_complete_peer_out_of_descriptors_keeps_accepting(
    s3_server: S3Server,
    s3_bucket: S3Bucket,
    lab: SwarmLab,
    hostiles: Callable[[Swarm], HostilePeers],
    tmp_path: Path,
) -> None:
    model = publish(
        s3_bucket,
        "nofile-seed-llm",
        26,
        piece_size=256 * KiB,
        shards=[2 * MiB + 4_321, 1 * MiB - 77],
    )
    seed_dest = complete_copy(s3_server, model, tmp_path / "seed")
    swarm = lab.start(model, per_peer_relays=True)
    target = target_of(model)
    hostile = hostiles(swarm)
    stand_in, _ = hostile.add_listener("127.0.0.54", Behaviour.SILENT, target.nothing())
    seed = start_seed(swarm, seed_dest, nofile=LOW_NOFILE)
    socks = idle_connections((LOOPBACK, seed.port), FD_FLOOD)
    try:
        # The first close comes at the handshake deadline: by then it has been out
        # of descriptors, with most of the flood still waiting to be accepted.
        closed, _ = wait_closed(socks, HANDSHAKE_TIMEOUT + 20.0, at_least=1)
        assert closed >= 1, "the seed closed none of the connections"
    finally:
        close_all(socks)
    assert_running(seed)
    wait_until(
        lambda: accepts_handshake((LOOPBACK, seed.port), target, timeout=2.0),
        timeout=HANDSHAKE_TIMEOUT + 20.0,
        what="the seed to accept a connection and answer its hello",
    )
    fetch = swarm.add_peer("fetch", linger=0.0)
    finish_victim(swarm, fetch)
    served = let_seed_go(swarm, hostile, stand_in, seed)
    assert served["uploaded_bytes"] >= model.model_bytes, served
