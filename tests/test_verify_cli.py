"""``swarm verify DIR`` as an operator runs it: a damaged copy is named piece by piece,
exits 1, and ``--repair`` fetches just the bad pieces (from the origin via the catalog,
or through a tracker), after which the copy verifies again."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fetch_helpers import assert_same_files, fetch_args, make_model, publish, swarm
from servers import populate

KiB = 1024
PIECE = 64 * KiB
FILES = make_model(11, {"config.json": 900, "w/a.bin": 5 * PIECE + 17, "w/b.bin": 3 * PIECE})


def _flip(path: Path, offset: int) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x55]))
    # The edit lands within the mtime clock tick of the fetch's last write on a fast
    # machine; a human edit comes seconds later. Model that time passing.
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def fetched(tmp_path: Path) -> tuple[Path, str, str]:
    populate(tmp_path / "origin", FILES)
    catalog = (tmp_path / "catalog").as_uri()
    published = publish((tmp_path / "origin").as_uri(), "tiny", catalog, piece_size="64KiB")
    dest = tmp_path / "dest"
    swarm(*fetch_args("tiny", catalog, dest)).ok()
    return dest, catalog, published["root"]


def test_verify_names_bad_pieces_and_repair_fetches_only_them(
    fetched: tuple[Path, str, str],
) -> None:
    dest, catalog, root = fetched
    clean = swarm("verify", str(dest), "--json").ok()
    assert clean["verified"] is True and clean["root"] == root and clean["bad_pieces"] == []

    _flip(dest / "w/a.bin", 2 * PIECE + 5)  # piece 2 of w/a.bin
    (dest / "w/b.bin").unlink()  # all 3 of w/b.bin
    bad = swarm("verify", str(dest), "--json")
    assert bad.returncode == 1, bad.describe()
    report = bad.json()
    assert report["verified"] is False
    named = {(p["path"], p["start"], p["end"]) for p in report["bad_pieces"]}
    assert named == {
        ("w/a.bin", 2 * PIECE, 3 * PIECE),
        ("w/b.bin", 0, PIECE),
        ("w/b.bin", PIECE, 2 * PIECE),
        ("w/b.bin", 2 * PIECE, 3 * PIECE),
    }
    assert not (dest / ".swarm-complete").exists(), "a damaged copy stayed marked complete"
    assert "bytes" in bad.stderr and "w/a.bin" in bad.stderr

    repaired = swarm("verify", str(dest), "--repair", "--catalog", catalog, "--json").ok()
    assert repaired["repair"]["verified"] is True
    assert repaired["repair"]["origin_bytes"] == 4 * PIECE  # the bad pieces, nothing more
    assert_same_files(dest, FILES)
    assert swarm("verify", str(dest), "--json").ok()["verified"] is True


def test_repair_needs_a_source_and_an_empty_dir_is_a_clear_error(tmp_path: Path) -> None:
    run = swarm("verify", str(tmp_path), "--repair")
    assert run.returncode == 2 and "--tracker" in run.error_line()
    run = swarm("verify", str(tmp_path))
    assert run.returncode == 1 and str(tmp_path) in run.error_line()


def test_repair_through_a_tracker_fetches_only_the_bad_pieces(
    fetched: tuple[Path, str, str],
) -> None:
    import subprocess
    import time
    import urllib.request

    from fetch_helpers import cli_env, swarm_argv
    from servers import LOOPBACK, free_port

    dest, catalog, _ = fetched
    _flip(dest / "config.json", 10)
    port = free_port()
    tracker = subprocess.Popen(
        swarm_argv("tracker", "--listen", f"{LOOPBACK}:{port}", "--catalog", catalog),
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/readyz", timeout=0.5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the tracker never became ready"
                time.sleep(0.05)
        url = f"http://{LOOPBACK}:{port}"
        out = swarm("verify", str(dest), "--repair", "--tracker", url, "--json").ok()
    finally:
        tracker.terminate()
        tracker.wait(timeout=10)
    assert out["verified"] is False and len(out["bad_pieces"]) == 1
    assert out["repair"]["verified"] is True
    assert out["repair"]["origin_bytes"] == len(FILES["config.json"])
    assert out["repair"]["reused_bytes"] == sum(map(len, FILES.values())) - len(
        FILES["config.json"]
    )
    assert_same_files(dest, FILES)
