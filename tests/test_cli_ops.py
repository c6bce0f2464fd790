"""The command line as an operator runs it under Kubernetes: no terminal, logs collected.

Each end-to-end case runs the real ``swarm`` console script with stderr on a pipe or
a file, as ``kubectl logs`` sees it: log records are JSON lines by default, a fetch
logs a progress line at a steady interval (counted, not timed), the tracker says
where it listens at the default level, and every option has a ``SWARM_*`` form.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from fetch_helpers import fetch_args, make_model, publish, swarm
from rich.console import Console
from servers import LOOPBACK, FaultPlan, FaultyHTTPServer, populate
from swarm_helpers import TrackerProcess

from cli import logs
from cli.progress import ProgressSample

MiB = 1024 * 1024
INTERVAL = "0.5"
CORE_FIELDS = ("ts", "level", "logger", "message")


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every line of ``stderr`` parsed as one JSON object (failing on any line that isn't)."""
    records = []
    for line in stderr.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise AssertionError(f"not a JSON line: {line!r}\n--- stderr\n{stderr}") from exc
        assert isinstance(obj, dict), line
        for field in CORE_FIELDS:
            assert field in obj, f"{field} missing from {line}"
        assert obj["ts"].endswith("Z") and obj["ts"][10] == "T", obj["ts"]
        records.append(obj)
    return records


def progress_events(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("event") == "progress"]


def assert_progress_counts(events: list[dict[str, Any]], total: int) -> None:
    """A first line at the start, lines in between, a last one at the end, bytes never going back."""
    assert len(events) >= 3, f"expected several progress lines, got {events}"
    done = [e["bytes_done"] for e in events]
    assert done == sorted(done), done
    assert done[0] < total and done[-1] == total, done
    assert len(set(done)) >= 2, done
    assert [e["final"] for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1]["outcome"] == "done" and events[-1]["percent"] == 100.0
    assert all(e["bytes_total"] == total for e in events)


@pytest.fixture
def slow_model(
    faulty_http_server: Callable[..., FaultyHTTPServer], tmp_path: Path
) -> Iterator[tuple[dict[str, Any], FaultyHTTPServer, int]]:
    """A 6 MiB artifact published on an origin that holds each request 0.2 s."""
    files = make_model(17, {"model.safetensors": 6 * MiB - 7, "config.json": 300})
    populate(tmp_path / "www" / "m", files)
    server = faulty_http_server(
        directory=tmp_path / "www", plan=FaultPlan(every=0, response_delay=0.2)
    )
    catalog = (tmp_path / "catalog").as_uri()
    published = publish(server.url("m"), "m", catalog, piece_size="1MiB", files=sorted(files))
    published["catalog"] = catalog
    yield published, server, sum(len(d) for d in files.values())


# The origin answers one 512 KiB range at a time, 0.2 s each: about 2.5 s for 6 MiB.
SLOW_FETCH = ("--pieces-in-flight", "1", "--origin-concurrency", "1", "--range-size", "512KiB")


def test_a_fetch_without_a_terminal_logs_json_progress_lines(
    slow_model: tuple[dict[str, Any], FaultyHTTPServer, int], tmp_path: Path
) -> None:
    published, _, total = slow_model
    dest = tmp_path / "dest"
    args = fetch_args("m", published["catalog"], dest, *SLOW_FETCH, "--progress-interval", INTERVAL)
    run = swarm(*args)
    result = run.ok()
    assert result["verified"] and result["model_bytes"] == total

    events = progress_events(json_lines(run.stderr))
    assert_progress_counts(events, total)
    for event in events:
        assert event["logger"] == "swarm.progress" and event["level"] == "info"
        assert event["artifact"] == "m" and event["root"] == published["root"], event
        assert "origin_bytes" not in event  # a direct fetch has no origin/peer split


def test_text_logs_from_the_environment_are_plain_lines(
    slow_model: tuple[dict[str, Any], FaultyHTTPServer, int], tmp_path: Path
) -> None:
    published, _, _ = slow_model
    dest = tmp_path / "dest"
    run = swarm(
        "fetch",
        "m",
        "--direct",
        *SLOW_FETCH,
        env={
            "SWARM_LOG_FORMAT": "text",
            "SWARM_PROGRESS_INTERVAL": INTERVAL,
            "SWARM_CATALOG": published["catalog"],
            "SWARM_FETCH_DEST": str(dest),
        },
    )
    assert run.returncode == 0, run.describe()
    lines = [line for line in run.stderr.splitlines() if " swarm.progress: " in line]
    assert len(lines) >= 3, run.describe()
    assert all(not line.startswith("{") and " INFO swarm.progress: m: " in line for line in lines)
    assert "(100.0%)" in lines[-1] and "done in" in lines[-1], lines[-1]
    assert (
        "verified in" in run.stderr and (dest / "model.safetensors").stat().st_size == 6 * MiB - 7
    )


def test_a_swarm_fetch_reports_origin_and_peer_bytes_and_the_tracker_its_address(
    slow_model: tuple[dict[str, Any], FaultyHTTPServer, int], tmp_path: Path
) -> None:
    published, _, total = slow_model
    tracker = TrackerProcess(
        published["catalog"],
        {},
        tmp_path / "logs",
        announce_interval=0.5,
        peer_ttl=5.0,
        stall_timeout=10.0,
    )
    tracker.start()
    try:
        run = swarm(
            "fetch",
            "m",
            "--tracker",
            tracker.url,
            "--dest",
            str(tmp_path / "dest"),
            "--listen",
            f"{LOOPBACK}:0",
            "--linger",
            "0",
            "--json",
            *SLOW_FETCH,
            "--progress-interval",
            INTERVAL,
        )
    finally:
        tracker.stop()
    result = run.ok()
    assert result["verified"], run.describe()

    events = progress_events(json_lines(run.stderr))
    assert_progress_counts(events, total)
    peer_ids = {e.get("peer_id") for e in events}
    assert len(peer_ids) == 1 and isinstance(peer_id := peer_ids.pop(), str), peer_ids
    assert len(bytes.fromhex(peer_id)) == 20
    assert all(e["root"] == published["root"] for e in events)
    origin = [e["origin_bytes"] for e in events]
    assert origin == sorted(origin) and all(e["peer_bytes"] == 0 for e in events), events
    assert origin[-1] == result["origin_bytes"] >= total  # the only peer pulls every piece

    tracker_records = json_lines(tracker.stderr_path.read_text())
    started = [r for r in tracker_records if r["message"].startswith("tracker listening on")]
    assert len(started) == 1, tracker_records
    assert f"{LOOPBACK}:{tracker.port}" in started[0]["message"]
    assert started[0]["level"] == "info" and started[0]["logger"] == "swarm.tracker"
    serving = [r for r in tracker_records if r["message"].startswith("tracker serving catalog")]
    assert len(serving) == 1, tracker_records
    assert serving[0]["catalog"] == published["catalog"] and serving[0]["auth"] == "open"


def test_an_option_set_in_its_swarm_env_form_takes_effect(
    slow_model: tuple[dict[str, Any], FaultyHTTPServer, int], tmp_path: Path
) -> None:
    published, server, total = slow_model
    dest = tmp_path / "dest"
    base_requests = server.requests
    server.max_in_flight = 0  # publishing read it concurrently; only the fetch counts
    run = swarm(
        "fetch",
        "m",
        "--catalog",
        published["catalog"],
        "--direct",
        env={
            "SWARM_FETCH_DEST": str(dest),
            "SWARM_FETCH_JSON": "1",
            "SWARM_FETCH_ORIGIN_CONCURRENCY": "1",
            "SWARM_FETCH_PIECES_IN_FLIGHT": "1",
            "SWARM_FETCH_RANGE_SIZE": "256KiB",
        },
    )
    result = run.ok()  # SWARM_FETCH_JSON made it print the JSON summary
    assert result["verified"] and result["dest"] == str(dest)
    assert server.max_in_flight == 1, "SWARM_FETCH_ORIGIN_CONCURRENCY=1 was not honoured"
    # 256 KiB ranges: at least one request per 256 KiB of the artifact.
    assert server.requests - base_requests >= total // (256 * 1024)


def test_version_comes_from_the_package_metadata() -> None:
    run = swarm("--version", timeout=30)
    assert run.returncode == 0, run.describe()
    assert run.stdout.strip() == f"swarm {version('swarm')}"


@pytest.mark.parametrize(
    ("command", "shown", "raw"),
    [
        ("publish", "256MiB", "268435456"),
        ("fetch", "16MiB", "16777216"),
        ("demo", "256MiB", "268435456"),
    ],
)
def test_size_defaults_show_in_human_units(command: str, shown: str, raw: str) -> None:
    run = swarm(command, "--help", env={"COLUMNS": "250"}, timeout=30)  # no wrapping
    assert run.returncode == 0, run.describe()
    assert f"default: {shown}" in run.stdout, run.stdout
    assert raw not in run.stdout
    assert f"SWARM_{command.upper()}_" in run.stdout  # the env form is documented


def test_json_formatter_carries_bound_context_and_extra_fields() -> None:
    stream = io.StringIO()
    quiet = Console(file=io.StringIO(), force_terminal=False)
    try:
        assert logs.configure(None, logging.WARNING, quiet, stream=stream) == "json"
        logs.bind(artifact="kimi", root="ab" * 32, peer_id=None)
        logging.getLogger("swarm.peer").warning("barring %s", "peer", extra={"peer": "0a0b"})
        logging.getLogger("swarm.peer").info("not shown at WARNING")
        logging.getLogger(logs.PROGRESS_LOGGER).info(
            "shown at any level", extra=logs.as_extra({"name": "m", "seconds": 1.5})
        )
    finally:
        logs.bind(artifact=None, root=None)
        logs.unconfigure()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "barring peer" and first["level"] == "warning"
    assert first["logger"] == "swarm.peer" and first["peer"] == "0a0b"
    assert first["artifact"] == "kimi" and first["root"] == "ab" * 32
    assert "peer_id" not in first
    assert second["message"] == "shown at any level" and second["logger"] == logs.PROGRESS_LOGGER
    assert second["name_"] == "m" and second["seconds"] == 1.5


def test_progress_sample_arithmetic() -> None:
    sample = ProgressSample("m", 250, 1000, elapsed=5.0, rate=50.0, sources=(200, 50))
    assert sample.percent == 25.0 and sample.eta == 15.0
    assert (
        sample.message()
        == "m: 250 B of 1000 B (25.0%), 50 B/s, ETA 0m15s; origin 200 B, peers 50 B"
    )
    fields = sample.fields()
    assert fields["origin_bytes"] == 200 and fields["peer_bytes"] == 50
    stalled = ProgressSample("m", 250, 1000, elapsed=5.0, rate=0.0)
    assert stalled.eta is None and "ETA" not in stalled.message()
    last = ProgressSample("m", 1000, 1000, elapsed=20.0, rate=50.0, final=True, stopped=False)
    assert last.eta is None and last.message().endswith("done in 20.0s")
