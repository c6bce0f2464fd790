"""End to end: the real ``swarm publish`` and ``swarm fetch --direct`` as subprocesses.

Every test drives the installed console script against real servers on loopback
(rclone's S3, the GCS emulator, aiohttp file servers, the fault-injecting front) and
checks what an operator sees: exit codes, the one JSON object on stdout, one-line
errors on stderr, and the files and completion marker left in ``--dest``.

- round trip on every backend (S3, GCS, HTTP, file): byte-identical files, every byte
  read from the origin exactly once, ``NAME@ROOT`` and root prefixes, old versions
  still fetchable after a new publish;
- resume: a fetch killed with SIGKILL midway re-reads only what was not verified;
- tampering: origin bytes changed after publishing fail the fetch, naming file and piece;
- origin faults: 503/429 with and without Retry-After are retried, counted, and the
  fetch still verifies; a missing object fails fast;
- unusable destinations and unknown names give a one-line error, no traceback.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import GCSBucket, S3Bucket
from fetch_helpers import (
    COMPLETE_MARKER,
    assert_same_files,
    cli_env,
    complete_marker,
    fetch_args,
    make_model,
    piece_table,
    publish,
    swarm,
    swarm_argv,
    swarm_concurrently,
    verified_pieces,
)
from servers import FaultPlan, FaultyHTTPServer, GCSServer, HTTPFileServer, S3Server, populate

KiB = 1024
MiB = 1024 * KiB

# Several files: an empty one, one byte, sizes that are and are not multiples of the
# piece size, some in subdirectories. 64 KiB pieces: 38 of them.
PIECE_SIZE = 64 * KiB
MODEL_SIZES = {
    "config.json": 1_234,
    "empty.txt": 0,
    "tokenizer/tokenizer.model": 99_999,
    "weights/model-00001-of-00002.safetensors": 1_500_007,
    "weights/model-00002-of-00002.safetensors": 10 * PIECE_SIZE,
    "weights/one-byte.bin": 1,
}
MODEL = make_model(1, MODEL_SIZES)
MODEL_BYTES = sum(len(data) for data in MODEL.values())
PREFIX = "models/tiny-llm"

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Placed:
    """An artifact's files on one backend, and a catalog to publish it into."""

    kind: str
    origin: str
    catalog: str
    # Keys to pass as --file: HTTP origins can't list.
    keys: tuple[str, ...]
    remove: Callable[[str], None]
    """Delete one object from the origin (for the 404 test)."""


def place(
    kind: str,
    files: dict[str, bytes],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    prefix: str = PREFIX,
) -> Placed:
    """Put ``files`` under ``prefix`` on backend ``kind``; the catalog sits beside them."""
    if kind == "s3":
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        root = populate(bucket.path / prefix, files)
        return Placed(
            kind,
            f"{bucket.url}/{prefix}",
            f"{bucket.url}/catalog",
            (),
            lambda key: (root / key).unlink(),
        )
    if kind == "gcs":
        gbucket: GCSBucket = request.getfixturevalue("gcs_bucket")
        server: GCSServer = request.getfixturevalue("gcs_server")
        for key, data in files.items():
            server.upload(gbucket.name, f"{prefix}/{key}", data)

        def remove(key: str) -> None:
            name = urllib.parse.quote(f"{prefix}/{key}", safe="")
            url = f"{server.endpoint}/storage/v1/b/{gbucket.name}/o/{name}"
            with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=10):
                pass

        return Placed(kind, f"{gbucket.url}/{prefix}", f"{gbucket.url}/catalog", (), remove)
    catalog = (tmp_path / "catalog").as_uri()
    if kind == "http":
        start: Callable[[Path], HTTPFileServer] = request.getfixturevalue("http_files_server")
        root = populate(tmp_path / "www" / prefix, files)
        server_http = start(tmp_path / "www")
        return Placed(
            kind,
            server_http.url(prefix),
            catalog,
            tuple(sorted(files)),
            lambda key: (root / key).unlink(),
        )
    assert kind == "file"
    root = populate(tmp_path / "origin" / prefix, files)
    return Placed(kind, root.as_uri(), catalog, (), lambda key: (root / key).unlink())


def check_fetch_summary(summary: dict[str, object], name: str, root: str, dest: Path) -> None:
    """A complete, verified fetch of MODEL that read each byte from the origin once."""
    assert summary["artifact"] == name
    assert summary["root"] == root
    assert summary["verified"] is True
    assert summary["model_bytes"] == MODEL_BYTES
    assert summary["origin_bytes"] == MODEL_BYTES
    assert summary["peer_bytes"] == 0
    assert summary["reused_bytes"] == 0
    assert isinstance(summary["seconds"], float) and summary["seconds"] > 0
    marker = complete_marker(dest)
    assert marker is not None and marker["root"] == root


# -- 1. round trip on every backend -------------------------------------------------


@pytest.mark.parametrize("kind", ["s3", "gcs", "http", "file"])
def test_round_trip_every_backend(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    placed = place(kind, MODEL, request, tmp_path)
    published = publish(
        placed.origin, "tiny-llm", placed.catalog, piece_size="64KiB", files=placed.keys
    )
    assert published["model_bytes"] == MODEL_BYTES
    assert published["files"] == len(MODEL)
    assert published["piece_size"] == PIECE_SIZE
    # Format 2: blocks of 4 MiB at most the piece size (a 64 KiB piece is one block).
    assert published["format"] == 2 and published["block_size"] == PIECE_SIZE
    assert published["pieces"] == len(piece_table(MODEL, PIECE_SIZE))

    dest = tmp_path / "dest"
    summary = swarm(*fetch_args("tiny-llm", placed.catalog, dest)).ok()
    check_fetch_summary(summary, "tiny-llm", published["root"], dest)
    assert_same_files(dest, MODEL)


def test_versions_by_root_and_prefix_survive_a_new_publish(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    v1 = place("s3", MODEL, request, tmp_path, prefix="models/llm-v1")
    model_v2 = dict(MODEL)
    model_v2["weights/model-00002-of-00002.safetensors"] = make_model(2, {"w": 10 * PIECE_SIZE})[
        "w"
    ]
    v2 = place("s3", model_v2, request, tmp_path, prefix="models/llm-v2")
    assert v1.catalog == v2.catalog  # one bucket, one catalog, two versions of one name

    name = "org/llm"
    first = publish(v1.origin, name, v1.catalog, piece_size="65536")
    second = publish(v2.origin, name, v2.catalog, piece_size="64KiB")
    assert first["root"] != second["root"]

    latest, by_root, by_prefix = tmp_path / "latest", tmp_path / "by-root", tmp_path / "by-prefix"
    expected = [
        (name, latest, model_v2, second["root"]),
        (f"{name}@{first['root']}", by_root, MODEL, first["root"]),
        (f"{name}@{first['root'][:10]}", by_prefix, MODEL, first["root"]),
    ]
    runs = swarm_concurrently(*(fetch_args(ref, v1.catalog, dest) for ref, dest, _, _ in expected))
    for run, (_, dest, files, root) in zip(runs, expected, strict=True):
        check_fetch_summary(run.ok(), name, root, dest)
        assert_same_files(dest, files)


# -- 2. resume after SIGKILL ----------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_fetch_resumes_without_rereading_verified_pieces(
    faulty_http_server: Callable[..., FaultyHTTPServer], tmp_path: Path, signum: signal.Signals
) -> None:
    piece_size = 1 * MiB
    pieces_in_flight = 2
    files = make_model(
        3,
        {
            "model-00001.safetensors": 13 * MiB + 5,
            "model-00002.safetensors": 12 * MiB - 3,
            "extra/lora.bin": 6 * MiB + 100_000,
            "extra/empty": 0,
        },
    )
    total = sum(len(d) for d in files.values())
    table = piece_table(files, piece_size)
    populate(tmp_path / "www" / "big", files)
    # The origin holds every request 100 ms, so the first fetch takes seconds: "midway" is wide.
    slow = faulty_http_server(
        directory=tmp_path / "www", plan=FaultPlan(every=0, response_delay=0.1)
    )
    catalog = (tmp_path / "catalog").as_uri()
    published = publish(slow.url("big"), "big", catalog, piece_size="1MiB", files=sorted(files))
    root = published["root"]
    assert published["pieces"] == len(table)

    dest = tmp_path / "dest"
    args = fetch_args(
        "big",
        catalog,
        dest,
        "--pieces-in-flight",
        str(pieces_in_flight),
        "--origin-concurrency",
        "2",
        "--range-size",
        "512KiB",
    )
    with (
        open(tmp_path / "first.out", "wb") as out,
        open(tmp_path / "first.err", "wb") as err,
    ):
        proc = subprocess.Popen(
            swarm_argv(*args), env=cli_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
        try:
            deadline = time.monotonic() + 30.0
            recorded: list[int] = []
            while time.monotonic() < deadline:
                assert proc.poll() is None, (
                    f"fetch exited ({proc.returncode}) before it could be killed midway: "
                    f"{(tmp_path / 'first.err').read_text()[-2000:]}"
                )
                recorded = verified_pieces(dest, root)
                if len(recorded) >= 4:
                    break
                time.sleep(0.01)
            else:
                pytest.fail(f"only {len(recorded)} pieces verified after 30 s")
            proc.send_signal(signum)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
    if signum == signal.SIGTERM:
        # Stopped cleanly: the shell's 128 + 15, one line saying why, no traceback.
        stderr = (tmp_path / "first.err").read_text()
        assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
        assert "Traceback" not in stderr and "SIGTERM" in stderr, stderr[-2000:]
    else:
        assert proc.returncode == -signal.SIGKILL

    verified = verified_pieces(dest, root)
    assert 4 <= len(verified) < len(table), f"{len(verified)} of {len(table)} pieces verified"
    assert not (dest / COMPLETE_MARKER).exists(), "a killed fetch left the artifact marked complete"
    # What the state calls verified is on disk, intact.
    for i in verified:
        span = table[i]
        with open(dest / span.path, "rb") as f:
            f.seek(span.offset)
            assert f.read(span.length) == files[span.path][span.offset : span.offset + span.length]
    verified_bytes = sum(table[i].length for i in verified)
    slow.plan = FaultPlan(every=0)  # full speed for the second run
    missing_bytes = total - verified_bytes

    summary = swarm(*args).ok()
    assert summary["verified"] is True
    assert summary["root"] == root
    assert summary["model_bytes"] == total
    assert summary["reused_bytes"] == verified_bytes > 0
    assert summary["origin_bytes"] <= missing_bytes + pieces_in_flight * piece_size
    # No faults were injected, so nothing verified is read twice and nothing missing is skipped.
    assert summary["origin_bytes"] == missing_bytes
    assert summary["origin_retries"] == 0
    assert complete_marker(dest) is not None
    assert_same_files(dest, files)


# -- 3. tampering -----------------------------------------------------------------------


def test_bytes_changed_at_the_origin_after_publish_fail_the_fetch(
    request: pytest.FixtureRequest, s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    placed = place("s3", MODEL, request, tmp_path)
    published = publish(placed.origin, "tiny-llm", placed.catalog, piece_size="64KiB")

    victim, offset = "weights/model-00001-of-00002.safetensors", 700_001
    (piece,) = [
        p
        for p in piece_table(MODEL, PIECE_SIZE)
        if p.path == victim and p.offset <= offset < p.offset + p.length
    ]
    obj = s3_bucket.path / PREFIX / victim
    data = bytearray(obj.read_bytes())
    data[offset] ^= 0xFF
    obj.write_bytes(bytes(data))

    dest = tmp_path / "dest"
    run = swarm(*fetch_args("tiny-llm", placed.catalog, dest))
    line = run.error_line()
    assert victim in line, run.describe()
    assert f"piece {piece.index} " in line, run.describe()
    assert "blake3" in line, run.describe()
    assert complete_marker(dest) is None
    assert piece.index not in verified_pieces(dest, published["root"])


# -- 4. origin faults -------------------------------------------------------------------

FAULTS = {
    "http-503-retry-after": ("http", FaultPlan(every=3, status=503, retry_after="1", limit=4)),
    "http-429": ("http", FaultPlan(every=2, status=429, limit=10)),
    "s3-503-slowdown": ("s3", FaultPlan(every=3, status=503, style="s3", limit=8)),
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_throttling_origin_still_yields_a_verified_fetch(
    case: str,
    request: pytest.FixtureRequest,
    faulty_http_server: Callable[..., FaultyHTTPServer],
    tmp_path: Path,
) -> None:
    kind, plan = FAULTS[case]
    quiet = FaultPlan(every=0)
    env: dict[str, str] = {}
    if kind == "http":
        populate(tmp_path / "www" / PREFIX, MODEL)
        front = faulty_http_server(directory=tmp_path / "www", plan=quiet)
        origin, catalog, keys = front.url(PREFIX), (tmp_path / "catalog").as_uri(), sorted(MODEL)
    else:
        s3_server: S3Server = request.getfixturevalue("s3_server")
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        populate(bucket.path / PREFIX, MODEL)
        # boto3 talks to the front, which forwards every request to rclone unchanged.
        front = faulty_http_server(upstream=s3_server.endpoint, plan=quiet)
        env = {"AWS_ENDPOINT_URL": front.endpoint}
        origin, catalog, keys = f"{bucket.url}/{PREFIX}", f"{bucket.url}/catalog", []
    published = publish(origin, "tiny-llm", catalog, piece_size="64KiB", files=keys, env=env)

    front.plan = plan  # faults only while fetching, so they all land on the fetch's reads
    dest = tmp_path / "dest"
    run = swarm(*fetch_args("tiny-llm", catalog, dest), env=env)
    summary = run.ok()
    check_fetch_summary(summary, "tiny-llm", published["root"], dest)
    assert "origin throttling" in run.stderr, "retries must be logged"
    assert_same_files(dest, MODEL)
    assert front.faults == plan.limit, f"the plan injected {front.faults} faults"
    assert summary["origin_retries"] == front.faults
    if plan.retry_after is not None:
        seconds = summary["seconds"]
        assert isinstance(seconds, float)
        assert seconds >= float(plan.retry_after), "Retry-After was not honoured"


@pytest.mark.parametrize("kind", ["s3", "gcs", "http"])
def test_missing_object_fails_fast_naming_it(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    placed = place(kind, MODEL, request, tmp_path)
    publish(placed.origin, "tiny-llm", placed.catalog, piece_size="64KiB", files=placed.keys)
    gone = "tokenizer/tokenizer.model"
    placed.remove(gone)

    dest = tmp_path / "dest"
    run = swarm(*fetch_args("tiny-llm", placed.catalog, dest), timeout=30)
    line = run.error_line()
    assert gone in line, run.describe()
    assert re.search(r"not found|no such", line, re.IGNORECASE), run.describe()
    # Fail fast: not one retry (each would be logged as "origin retry"), and far less time
    # than the retry budget's backoff (tens of seconds), even on a loaded machine.
    assert "origin retry" not in run.stderr, run.describe()
    assert run.seconds < 30, run.describe()
    assert complete_marker(dest) is None


# -- 5. unusable destinations and unknown names -----------------------------------------


def test_unusable_destinations_and_unknown_names_fail_with_one_line_errors(
    tmp_path: Path,
) -> None:
    origin = populate(tmp_path / "origin", MODEL)
    catalog = (tmp_path / "catalog").as_uri()
    publish(origin.as_uri(), "tiny-llm", catalog, piece_size="64KiB")
    # A destination below a regular file (brackets in the path must survive the printer).
    blocker = tmp_path / "models[v1]"
    blocker.write_bytes(b"not a directory")
    below_file = blocker / "dest"
    # A destination where one of the artifact's files would go is a directory.
    occupied = tmp_path / "occupied"
    (occupied / "config.json").mkdir(parents=True)
    unknown_name, unknown_version = tmp_path / "unknown-name", tmp_path / "unknown-version"
    cases = [
        ("tiny-llm", below_file, [str(below_file), "not a directory"]),
        ("tiny-llm", occupied, [str(occupied / "config.json")]),
        ("no-such-model", unknown_name, ["'no-such-model'", catalog]),
        ("tiny-llm@deadbeef00", unknown_version, ["deadbeef00", catalog]),
    ]
    runs = swarm_concurrently(*(fetch_args(ref, catalog, dest) for ref, dest, _ in cases))
    for run, (_, dest, fragments) in zip(runs, cases, strict=True):
        line = run.error_line()
        for fragment in fragments:
            assert fragment.lower() in line.lower(), run.describe()
        assert complete_marker(dest) is None
    assert blocker.read_bytes() == b"not a directory"
    assert not unknown_name.exists() and not unknown_version.exists()


def test_fetch_without_a_catalog_is_a_usage_error(tmp_path: Path) -> None:
    run = swarm("fetch", "tiny-llm", "--dest", str(tmp_path / "dest"), "--direct", "--json")
    line = run.error_line()
    assert "--catalog" in line and "SWARM_CATALOG" in line, run.describe()
    assert run.returncode == 2, run.describe()
