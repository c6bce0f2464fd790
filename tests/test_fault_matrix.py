"""The fault matrix: real ``swarm tracker`` and ``swarm fetch`` processes on loopback, one fault each.

Each scenario is a small burst (a ~7 MiB artifact in 256 KiB pieces, 4-5 peers)
against a real S3 server (rclone). Every peer reads the origin through a
``ByteCountingRelay`` of its own, so the origin bytes of each peer, a killed one's
too, are counted at the origin's side. Origin reads wait at the relays' gates until
every peer has joined and holds an origin assignment, and the relays pace each
connection, so the fault lands while pulls are in flight.

The faults: a fifth of the peers SIGKILLed (a seeder with pieces assigned among
them); the tracker SIGKILLed and restarted on its port; the origin answering 503
SlowDown and 429 with Retry-After to a third of the requests for a while; a peer
serving corrupt blocks; garbage and an oversized frame on a peer's port; the disk
full (a tmpfs, root only) at the start and mid-fetch, then freed; a wrong cluster
token; forged announces without the token.

After each burst:

- every live node ends verified: exit 0, one JSON summary, the completion marker,
  files byte-identical to the source;
- a node that failed has no completion marker (or, the corrupt peer, an honest one);
- each live peer's reported ``origin_bytes`` equals what its relay counted, and
  every origin byte beyond the artifact's size is accounted for: a re-read of what
  a killed, corrupt or failed peer had pulled, or of a pull a tracker restart
  dropped; origin faults cost none, each being a counted ``origin_retries``;
- each peer's peak RSS (VmHWM, followed while it runs) stays under ``MAX_RSS``.

The cluster-token scenarios run once ``swarm fetch`` has ``--token-file``.
"""

from __future__ import annotations

import errno
import functools
import os
import secrets
import socket
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import S3Bucket
from servers import LOOPBACK, FaultPlan, FaultyHTTPServer, S3Server, free_port, venv_binary
from swarm_helpers import (
    COMPLETE_MARKER,
    LINGER,
    FetchOutcome,
    FetchProcess,
    MiB,
    Published,
    Swarm,
    SwarmLab,
    assert_finished,
    cli_env,
    make_model,
    publish_model,
    tree_digests,
    wait_until,
)

KiB = 1024
PIECE_SIZE = 256 * KiB
PEERS = 5
# Per origin connection: a 256 KiB piece takes a quarter of a second, so the origin
# phase lasts a few seconds and a fault lands with pulls in flight.
RATE = 1 * MiB
MAX_RSS = 400 * 1000 * 1000
KILLED_PEER_TTL = 3.0
SCENARIO_TIMEOUT = 120

pytestmark = [pytest.mark.slow, pytest.mark.timeout(SCENARIO_TIMEOUT)]


@pytest.fixture
def lab(s3_server: S3Server, tmp_path: Path) -> Iterator[SwarmLab]:
    swarms = SwarmLab(s3_server, tmp_path)
    try:
        yield swarms
    finally:
        swarms.close()


def small_model(
    bucket: S3Bucket,
    name: str,
    seed: int,
    token: bytes | None = None,
    piece_size: int = PIECE_SIZE,
) -> Published:
    """~7.2 MiB in 31 pieces of 256 KiB over four files, sizes not multiples of a piece."""
    files = make_model(seed, [4 * MiB + 4_321, 3 * MiB - 77])
    return publish_model(
        bucket, name, files, piece_size=piece_size, prefix=f"models/{name}", token=token
    )


def finish(swarm: Swarm, peers: list[FetchProcess]) -> dict[str, dict[str, Any]]:
    """Wait for ``peers``; each must end verified with bounded memory. Their summaries by name."""
    results = {}
    for outcome, peer in zip(swarm.wait_peers(peers), peers, strict=True):
        result = assert_finished(swarm, outcome, peer)
        assert outcome.max_rss is not None, f"{peer.name} was not reaped by wait4"
        assert outcome.max_rss < MAX_RSS, f"{peer.name}: peak RSS {outcome.max_rss / 1e6:.0f} MB"
        result["max_rss"] = outcome.max_rss
        results[peer.name] = result
    peaks = ", ".join(f"{r['max_rss'] / 1e6:.0f}" for r in results.values())
    print(f"{swarm.model.name}: peak RSS per peer (MB): {peaks}")
    return results


def assert_not_complete(peer: FetchProcess) -> None:
    assert not (peer.dest / COMPLETE_MARKER).exists(), f"{peer.name} did not finish but is marked"


def assert_marker_honest(swarm: Swarm, peer: FetchProcess) -> None:
    """A completion marker, wherever there is one, stands for exactly the source's bytes."""
    if (peer.dest / COMPLETE_MARKER).exists():
        assert tree_digests(peer.dest) == swarm.model.digests, f"{peer.name}: marked but differs"


def assert_origin_accounted(
    swarm: Swarm, results: dict[str, dict[str, Any]], *, lost: tuple[str, ...] = ()
) -> int:
    """What each live peer says it read is what its relay saw; the extra bytes are bounded
    by what the ``lost`` peers (killed, barred, failed) read. Returns the extra bytes."""
    for name, result in results.items():
        counted = swarm.origin_body_bytes(name)
        assert result["origin_bytes"] == counted, (name, result["origin_bytes"], counted)
    total = swarm.origin_body_bytes()
    extra = total - swarm.model.model_bytes
    lost_bytes = sum(swarm.origin_body_bytes(name) for name in lost)
    assert 0 <= extra <= lost_bytes, (total, swarm.model.model_bytes, lost_bytes)
    assert swarm.relay_errors() == []
    return extra


def complete_reads(swarm: Swarm, names: list[str]) -> Counter[tuple[str, tuple[int, int] | None]]:
    """How often the peers ``names`` read each (object, range) from the origin in full."""
    return Counter(
        (e.key, e.range)
        for name in names
        for e in swarm.relay_for(name).exchanges()
        if e.complete and e.status is not None and e.status < 300
    )


def start_burst(
    lab: SwarmLab, model: Published, names: list[str], **options: Any
) -> tuple[Swarm, list[FetchProcess]]:
    """A gated, paced swarm of peers on known ports, released once every one seeds."""
    swarm = lab.start(model, gated=True, rate=RATE, per_peer_relays=True, **options)
    peers = [swarm.add_peer(name, port=free_port()) for name in names]
    swarm.wait_all_seeding(len(peers))
    swarm.open_gates()
    return swarm, peers


def peer_entry(swarm: Swarm, peer: FetchProcess) -> dict[str, Any] | None:
    """The tracker's record of ``peer`` (found by its listening port)."""
    status = swarm.status()
    if status is None:
        return None
    for entry in status["peer_list"]:
        if entry["port"] == peer.port:
            assert isinstance(entry, dict)
            return entry
    return None


# --------------------------------------------------------------------------------------
# 1. Peers killed mid-burst


def test_sigkill_a_fifth_of_the_peers_including_a_seeder_with_pieces_assigned(
    s3_bucket: S3Bucket, lab: SwarmLab
) -> None:
    # Smaller pieces than the other scenarios: a killed seeder's pulls in flight and
    # the pieces only it held are read again, and with 256 KiB pieces two of them
    # alone are 7% of this artifact; a real 1 TB artifact has ~4000 pieces.
    model = small_model(s3_bucket, "killed-llm", 11, piece_size=64 * KiB)
    names = [f"peer-{i}" for i in range(PEERS)]
    swarm, peers = start_burst(lab, model, names, peer_ttl=KILLED_PEER_TTL)

    victims: list[FetchProcess] = []

    def a_seeder_midway() -> bool:
        for peer in peers:
            entry = peer_entry(swarm, peer)
            if entry and entry["assigned"] and peer.verified_pieces(model.root) >= 1:
                victims.append(peer)
                return True
        return False

    wait_until(a_seeder_midway, timeout=30.0, what="a peer holding a piece and pulling more")
    victim = victims[0]
    victim.kill()  # one of five: 20% of the swarm
    assert victim.verified_pieces(model.root) < model.pieces, "the victim finished first"
    assert_not_complete(victim)

    survivors = [p for p in peers if p is not victim]
    results = finish(swarm, survivors)
    extra = assert_origin_accounted(swarm, results, lost=(victim.name,))
    assert extra <= 0.05 * model.model_bytes, f"origin {1 + extra / model.model_bytes:.3f} x F"
    # Only the dead peer's pulls are read twice: no survivor read a range another
    # survivor read in full.
    assert max(complete_reads(swarm, [p.name for p in survivors]).values()) == 1
    status = swarm.status()
    assert status is not None and status["origin"]["reassigned"] >= 1, status
    assert all(r["barred_peers"] == [] for r in results.values())
    print(f"killed 1/{PEERS}: origin {1 + extra / model.model_bytes:.3f} x F")


# --------------------------------------------------------------------------------------
# 2. The tracker restarted mid-burst


def test_the_tracker_killed_and_restarted_midway_the_swarm_finishes(
    s3_bucket: S3Bucket, lab: SwarmLab
) -> None:
    model = small_model(s3_bucket, "restart-llm", 12)
    swarm, peers = start_burst(lab, model, [f"peer-{i}" for i in range(PEERS)])

    def some_pieces_present() -> bool:
        status = swarm.status()
        return status is not None and status["present_pieces"] >= 4

    wait_until(some_pieces_present, timeout=30.0, what="4 pieces present in the swarm")
    swarm.tracker.kill()
    assert not any((p.dest / COMPLETE_MARKER).exists() for p in peers), "killed too late"
    time.sleep(0.6)  # two announce intervals: the peers find it gone
    swarm.tracker.start()  # same port: the peers' next announces rebuild its state

    results = finish(swarm, peers)
    status = swarm.status()
    assert status is not None, "the restarted tracker never heard of the swarm"
    # Rebuilt from announces, the new tracker saw every peer finish and let them go.
    assert all(r["linger_seconds"] < LINGER / 2 for r in results.values()), results
    # A pull the new tracker does not adopt is dropped by its peer and pulled again:
    # at most the pulls in flight at the kill, 2 per peer (the tracker's default
    # --per-peer-origin-pieces). Every such byte is in its peer's origin_bytes.
    for name, result in results.items():
        assert result["origin_bytes"] == swarm.origin_body_bytes(name), name
    extra = swarm.origin_body_bytes() - model.model_bytes
    assert 0 <= extra <= 2 * PEERS * PIECE_SIZE, extra
    assert max(complete_reads(swarm, list(results)).values()) <= 2
    print(f"tracker restart: origin {1 + extra / model.model_bytes:.3f} x F")


# --------------------------------------------------------------------------------------
# 3. The origin browns out: 503 SlowDown and 429 with Retry-After


def test_origin_answering_503_and_429_with_retry_after_to_a_third_of_requests(
    s3_server: S3Server,
    s3_bucket: S3Bucket,
    lab: SwarmLab,
    faulty_http_server: Callable[..., FaultyHTTPServer],
) -> None:
    model = small_model(s3_bucket, "brownout-llm", 13)
    faults = 8
    front = faulty_http_server(
        upstream=s3_server.endpoint,
        plan=FaultPlan(
            every=3,
            status=503,
            alternate_status=429,
            retry_after="1",
            style="s3",
            limit=faults,
        ),
    )
    swarm, peers = start_burst(
        lab, model, [f"peer-{i}" for i in range(PEERS)], upstream=front.endpoint
    )
    results = finish(swarm, peers)

    assert front.faults == faults, (front.faults, front.eligible)
    statuses = Counter(e.status for e in swarm.exchanges())
    assert statuses[503] == faults // 2 and statuses[429] == faults // 2, statuses
    # An error answer carries no data: not one origin byte is read twice, and
    # every fault was retried and counted as such.
    assert assert_origin_accounted(swarm, results) == 0
    assert sum(r["origin_retries"] for r in results.values()) >= faults, [
        r["origin_retries"] for r in results.values()
    ]
    # The seeders told the tracker of the throttled answers (each at most once), and
    # its origin budget backed off on them.
    status = swarm.status()
    assert status is not None
    adaptive = status["origin"]["adaptive"]
    assert 1 <= adaptive["throttles_seen"] <= faults, adaptive


# --------------------------------------------------------------------------------------
# 4. A peer that serves corrupt data


def test_a_peer_serving_corrupt_blocks_is_never_believed_and_the_rest_finish(
    s3_bucket: S3Bucket, lab: SwarmLab
) -> None:
    model = small_model(s3_bucket, "corrupt-llm", 14)
    swarm = lab.start(model, gated=True, rate=RATE, per_peer_relays=True)
    # Each on a loopback address of its own, as on nodes of their own: the tracker
    # counts reports by node, and bars the liar once two nodes caught it.
    honest = [
        swarm.add_peer(f"peer-{i}", port=free_port(), host=f"127.0.0.{11 + i}")
        for i in range(PEERS - 1)
    ]
    liar = swarm.add_peer("liar", "--serve-corrupt", port=free_port(), host="127.0.0.20")
    # The liar seeds pieces of its own, so the others must ask it for those.
    swarm.wait_all_seeding(PEERS)
    entry = peer_entry(swarm, liar)
    assert entry is not None
    liar_id = entry["peer_id"]
    swarm.open_gates()

    results = finish(swarm, honest)  # byte-identical files: none of the liar's data stuck
    assert liar_id not in {r["peer_id"] for r in results.values()}
    # The manifest is of format 2: each lie is a block refused before it is written,
    # blamed on its one sender; no piece is ever assembled from it and failed.
    assert sum(r["corrupt_blocks"] for r in results.values()) > 0
    assert sum(r["corrupt_pieces"] for r in results.values()) == 0
    for r in results.values():
        # Whoever caught the liar barred it locally; nobody else was blamed.
        assert r["barred_peers"] in ([], [liar_id]), r
        assert (r["corrupt_blocks"] > 0) == (r["barred_peers"] == [liar_id]), r
    # What the liar pulled from the origin may be read again for the others; nothing else.
    assert_origin_accounted(swarm, results, lost=(liar.name,))
    assert max(complete_reads(swarm, [p.name for p in honest]).values()) == 1
    caught_by = sum(r["corrupt_blocks"] > 0 for r in results.values())
    status = swarm.status()
    assert status is not None
    print(f"corrupt-llm: {caught_by} nodes caught the liar")
    if caught_by >= 2:  # reported from two nodes: out of the swarm at the tracker too
        assert status["barred"] == [liar_id], status
    liar.stop()
    assert_marker_honest(swarm, liar)


# --------------------------------------------------------------------------------------
# 5. Garbage and an oversized frame on a peer's port


def _dropped(sock: socket.socket, timeout: float) -> tuple[bool, int]:
    """Read until the peer closes the connection (bounded): (closed, bytes received)."""
    received = 0
    deadline = time.monotonic() + timeout
    sock.settimeout(0.2)
    while time.monotonic() < deadline and received <= 1 << 20:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, received
        if not data:
            return True, received
        received += len(data)
    return False, received


def test_garbage_and_an_oversized_frame_are_dropped_and_the_peer_keeps_serving(
    s3_bucket: S3Bucket, lab: SwarmLab
) -> None:
    model = small_model(s3_bucket, "garbage-llm", 15)
    swarm, peers = start_burst(lab, model, [f"peer-{i}" for i in range(PEERS)])
    target = peers[0]
    wait_until(
        lambda: target.verified_pieces(model.root) >= 1,
        timeout=30.0,
        what=f"{target.name} to hold a piece",
    )
    entry = peer_entry(swarm, target)
    assert entry is not None, "the tracker lists the target"
    attacks = {
        # A frame of an unknown type where the handshake should be, then noise.
        "garbage": struct.pack(">IB", 16, 0xEE) + secrets.token_bytes(4096),
        # A header announcing a frame of almost 4 GiB.
        "oversized": struct.pack(">IB", 0xFFFFFFF0, 7) + secrets.token_bytes(64),
    }
    socks = {what: socket.create_connection((LOOPBACK, entry["port"]), 5.0) for what in attacks}
    try:
        for what, payload in attacks.items():
            socks[what].sendall(payload)
        for what, sock in socks.items():
            closed, received = _dropped(sock, 10.0)
            assert closed, f"{what}: the peer kept the connection open"
            # At most a handshake went out: no piece data to a stranger.
            assert received <= 1024, f"{what}: the peer sent {received} bytes"
    finally:
        for sock in socks.values():
            sock.close()
    with socket.create_connection((LOOPBACK, entry["port"]), 5.0):
        pass  # still listening (it lingers until the whole swarm has finished)

    results = finish(swarm, peers)
    assert results[target.name]["uploaded_bytes"] > 0, "the target stopped serving"
    # It said why, with the length it refused.
    assert str(0xFFFFFFF0) in target.stderr_tail(100_000), target.stderr_tail()
    # Nothing forced a retry: exactly one origin copy.
    assert assert_origin_accounted(swarm, results) == 0
    assert all(r["barred_peers"] == [] for r in results.values())


# --------------------------------------------------------------------------------------
# 6. The disk fills mid-fetch, then is freed


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``tmpfs(size)`` mounts a tmpfs of ``size`` bytes (again: remounts it at that size)."""
    mount = tmp_path / "tmpfs"
    mounted = False

    def size_to(size: int) -> Path:
        nonlocal mounted
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        mount.mkdir(exist_ok=True)
        options = f"size={size}" if not mounted else f"remount,size={size}"
        run = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if run.returncode != 0:
            if mounted:
                raise AssertionError(f"remount failed: {run.stderr.strip()}")
            pytest.skip(f"can't mount a tmpfs here: {run.stderr.strip()}")
        mounted = True
        return mount

    try:
        yield size_to
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mount)], timeout=10, check=False)


def _fill(directory: Path) -> Path:
    """Take every free byte of the file system of ``directory``."""
    filler = directory / "filler"
    chunk = b"\xff" * MiB
    with open(filler, "wb", buffering=0) as f:
        for _ in range(1024):  # bounded: a tmpfs of at most 1 GiB
            try:
                f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        else:
            raise AssertionError("the file system did not fill up")
    for size in (64 * KiB, 4 * KiB):  # the last pages too
        with open(filler, "ab", buffering=0) as f:
            for _ in range(64):
                try:
                    f.write(b"\xff" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return filler


def _error_line(outcome: FetchOutcome) -> str:
    """A clean failure: non-zero exit, no traceback, exactly one ``error:`` line."""
    assert outcome.returncode == 1, outcome.describe()
    assert "Traceback" not in outcome.stderr, outcome.describe()
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, outcome.describe()
    return errors[0]


def test_a_full_disk_fails_cleanly_and_the_fetch_resumes_once_space_is_freed(
    s3_bucket: S3Bucket, tmpfs: Callable[[int], Path], lab: SwarmLab
) -> None:
    # tmpfs before lab: fixtures end in reverse, so the peers stop before the umount.
    model = small_model(s3_bucket, "diskfull-llm", 16)
    F = model.model_bytes
    mount = tmpfs(int(F * 0.6) // 4096 * 4096)
    dest = mount / "model"
    swarm = lab.start(model, gated=True, rate=RATE, per_peer_relays=True, peer_ttl=KILLED_PEER_TTL)
    # Too small from the start: refused before a byte is read.
    small = swarm.add_peer("too-small", dest=dest)
    line = _error_line(small.wait(20.0))
    assert "no space left" in line.lower(), line
    assert_not_complete(small)
    assert swarm.origin_body_bytes(small.name) == 0

    # Room for the artifact and its state; the rest of the disk fills mid-fetch.
    tmpfs(F + 1 * MiB)
    filling = swarm.add_peer("filling", dest=dest)
    swarm.wait_all_seeding(1)
    swarm.open_gates()
    wait_until(
        lambda: filling.verified_pieces(model.root) >= 2,
        timeout=30.0,
        what="the fetch to verify 2 pieces",
    )
    had = filling.verified_set(model.root)
    assert len(had) < model.pieces, "finished before the disk filled"
    filler = _fill(mount)
    line = _error_line(filling.wait(30.0))
    assert "no space left" in line.lower(), line
    assert_not_complete(filling)

    # Freed: the same destination resumes, keeping every piece it had verified.
    filler.unlink()
    tmpfs(F + 4 * MiB)
    again = swarm.add_peer("again", dest=dest)
    result = finish(swarm, [again])["again"]
    # Every piece verified before the disk filled is still there (and checked).
    assert result["reused_bytes"] >= sum(model.piece_lengths[i] for i in had) > 0, result
    assert result["reused_bytes"] + result["origin_bytes"] + result["peer_bytes"] >= F
    extra = assert_origin_accounted(swarm, {"again": result}, lost=("filling",))
    print(f"disk full: origin {1 + extra / F:.3f} x F, reused {result['reused_bytes']} B")


# --------------------------------------------------------------------------------------
# 7. The cluster token


@functools.cache
def _cli_has_token_flag() -> bool:
    run = subprocess.run(
        [venv_binary("swarm"), "fetch", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env({"COLUMNS": "200", "NO_COLOR": "1"}),
        check=False,
    )
    return "--token-file" in run.stdout


needs_token = pytest.mark.skipif(
    not _cli_has_token_flag(), reason="swarm fetch has no --token-file yet"
)


def _token_file(directory: Path, name: str) -> tuple[Path, bytes]:
    token = secrets.token_hex(24).encode()
    path = directory / name
    path.write_bytes(token + b"\n")
    return path, token


@needs_token
def test_a_fetch_with_the_wrong_token_never_joins_and_the_rest_finish(
    s3_bucket: S3Bucket, lab: SwarmLab, tmp_path: Path
) -> None:
    right, token = _token_file(tmp_path, "right.token")
    wrong, _ = _token_file(tmp_path, "wrong.token")
    model = small_model(s3_bucket, "token-llm", 17, token)
    swarm = lab.start(
        model,
        gated=True,
        rate=RATE,
        per_peer_relays=True,
        token=token,
        tracker_args=("--token-file", str(right)),
    )
    peers = [
        swarm.add_peer(f"peer-{i}", "--token-file", str(right), port=free_port()) for i in range(3)
    ]
    intruder = swarm.add_peer(
        "intruder", "--token-file", str(wrong), "--tracker-timeout", "3", port=free_port()
    )
    outcome = intruder.wait(20.0)  # its --tracker-timeout is 3 s
    assert outcome.returncode != 0, outcome.describe()
    assert "Traceback" not in outcome.stderr, outcome.describe()
    assert len([x for x in outcome.stderr.splitlines() if x.startswith("error:")]) == 1
    assert_not_complete(intruder)
    assert swarm.origin_body_bytes(intruder.name) == 0

    swarm.wait_all_seeding(len(peers))
    status = swarm.status()
    assert status is not None
    assert intruder.port not in {p["port"] for p in status["peer_list"]}
    swarm.open_gates()
    results = finish(swarm, peers)
    assert assert_origin_accounted(swarm, results) == 0


def _forged_announce(ref: str, peer_id: bytes, have: bytes, port: int, **fields: Any) -> bytes:
    """An announce in the wire format, signed with a made-up MAC (no token known)."""
    body: dict[str, Any] = {
        "v": 1,
        "ref": ref,
        "peer": peer_id,
        "port": port,
        "host": LOOPBACK,
        "have": have,
        "progress": [],
        "done": False,
        "leaving": False,
        "txn": 7,
        "barred": [],
        "ts": int(time.time() * 1000),
        "nonce": secrets.token_bytes(16),
        "mac": secrets.token_bytes(32),
    }
    body.update(fields)
    packed = msgpack.packb(body, use_bin_type=True)
    assert isinstance(packed, bytes)
    return packed


@needs_token
def test_forged_announces_without_the_token_change_nothing(
    s3_bucket: S3Bucket, lab: SwarmLab, tmp_path: Path
) -> None:
    token_path, token = _token_file(tmp_path, "cluster.token")
    model = small_model(s3_bucket, "forged-llm", 18, token)
    swarm = lab.start(
        model,
        gated=True,
        rate=RATE,
        per_peer_relays=True,
        token=token,
        tracker_args=("--token-file", str(token_path)),
    )
    peers = [
        swarm.add_peer(f"peer-{i}", "--token-file", str(token_path), port=free_port())
        for i in range(4)
    ]
    swarm.wait_all_seeding(len(peers))
    status = swarm.status()
    assert status is not None
    real_ids = [bytes.fromhex(p["peer_id"]) for p in status["peer_list"]]
    nbytes = (model.pieces + 7) // 8
    have_all = bytes([0xFF] * nbytes)
    if model.pieces % 8:
        have_all = have_all[:-1] + bytes([(0xFF << (8 - model.pieces % 8)) & 0xFF])
    fake = secrets.token_bytes(20)
    forgeries = [
        # A stranger reports every real peer as corrupt.
        _forged_announce(model.ref, fake, bytes(nbytes), 9, barred=real_ids),
        # Real peers report each other (speaking for a peer it is not).
        *(
            _forged_announce(model.ref, real_ids[i], bytes(nbytes), 9, barred=[real_ids[i - 1]])
            for i in range(len(real_ids))
        ),
        # A stranger claims every piece, and to be pulling every piece.
        _forged_announce(model.ref, fake, have_all, 9),
        _forged_announce(
            model.ref,
            secrets.token_bytes(20),
            bytes(nbytes),
            9,
            progress=[[p, 1] for p in range(model.pieces)],
        ),
        # A real peer is said to leave.
        _forged_announce(model.ref, real_ids[0], bytes(nbytes), 9, leaving=True),
    ]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp.settimeout(0.5)
        for _ in range(3):  # bounded: three rounds during the burst
            for datagram in forgeries:
                udp.sendto(datagram, (LOOPBACK, swarm.tracker.port))
            if swarm.gates_open is False:
                swarm.open_gates()
            with pytest.raises(TimeoutError):  # nothing is answered without the token
                udp.recvfrom(65536)
    finally:
        udp.close()

    results = finish(swarm, peers)
    assert assert_origin_accounted(swarm, results) == 0
    assert all(r["barred_peers"] == [] for r in results.values())
    refused = swarm.tracker.status()["auth_failures"]
    assert sum(refused.values()) >= 3 * len(forgeries), refused
    status = swarm.status()
    assert status is not None
    assert status["barred"] == [], status["barred"]
    listed = {p["peer_id"] for p in status["peer_list"]}
    assert fake.hex() not in listed
