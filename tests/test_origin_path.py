"""A lone peer's origin pulls through the tracker: back to back, not one announce interval apart.

The tracker hands a peer at most ``per_peer_limit`` (2) origin pieces at a time,
so a lone peer learns its next piece from the reply to the announce it sends when
a pull finishes. The peer used to wait at least a tenth of the announce interval
between announces: with 4 MiB pieces a lone 1 GiB fetch took 26 s where
``--direct`` took 1.2 s. Here the interval is 10 s, so that wait would be 1 s per
pair of pieces (63 s for 128 pieces) on top of the new tracker's restart grace
(1.5 intervals, 15 s, before it assigns anything), and the fetch must finish
inside the bound below: it does not measure speed, it fails on the wait.
"""

from __future__ import annotations

from pathlib import Path

from fetch_helpers import make_model, publish, swarm
from servers import LOOPBACK, populate
from swarm_helpers import TrackerProcess

KiB = 1024
PIECES = 128


def test_a_lone_peer_pulls_its_origin_pieces_without_waiting_for_the_announce_interval(
    tmp_path: Path,
) -> None:
    files = make_model(5, {"model.bin": PIECES * 16 * KiB - 11, "config.json": 11})
    populate(tmp_path / "origin" / "m", files)
    catalog = (tmp_path / "catalog").as_uri()
    published = publish(
        (tmp_path / "origin" / "m").as_uri(), "m", catalog, piece_size="16KiB", files=sorted(files)
    )
    tracker = TrackerProcess(
        catalog,
        {},
        tmp_path / "logs",
        announce_interval=10.0,
        peer_ttl=30.0,
        stall_timeout=20.0,
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
            "--no-fsync",
            "--json",
            timeout=40,
        )
    finally:
        tracker.stop()
    result = run.ok()
    assert result["verified"] and result["root"] == published["root"], run.describe()
    # Every piece from the origin, each once (pieces end at file ends: one more than PIECES).
    assert result["origin_pieces"] == result["pieces"] == PIECES + 1, run.describe()
    assert result["origin_bytes"] == result["model_bytes"] == PIECES * 16 * KiB
    assert result["peer_bytes"] == 0
    for path, data in files.items():
        assert (tmp_path / "dest" / path).read_bytes() == data
