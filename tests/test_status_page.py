"""The tracker's status page (``tracker/status_page.py``, ``tracker/static/``).

Pure parts first: availability is downsampled to a bounded strip with a missing
piece never averaged away, and a swarm's JSON is bounded (peers, cells) whatever
its size, with origin bytes the lengths of the pieces pulled from the origin.

Then a real tracker with a cluster token on loopback: the page, its assets and
``status.json`` answer without the token (a browser can't sign requests) while
``/v1/swarms`` still refuses; and Debian's Chromium, headless, driven by Selenium
through the system chromedriver, loads ``/`` and shows a running swarm's name
and numbers, then a live rate once the swarm moves, with no console errors. That
test skips, saying why, only where no browser is installed (``.ci/run`` installs
``chromium`` and ``chromium-driver``).
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from servers import free_port, populate

from core.auth import ClusterKey
from core.bitfield import Bitfield
from core.manifest import Manifest
from seeder.publish import publish
from swarm.announce import PEER_ID_SIZE, Announce, Reply, TrackerClient
from tracker.config import TrackerConfig
from tracker.registry import SwarmRegistry
from tracker.service import Tracker
from tracker.status_page import StatusLimits, availability_cells, swarm_snapshot

PIECE = 64 * 1024
NAME = "status-llm"
TOKEN = b"status-page-test-token-0123456789"
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium")
SCREENSHOT = Path("/tmp/status-page.png")
T = TypeVar("T")


# --------------------------------------------------------------------------------------
# pure parts
# --------------------------------------------------------------------------------------


def test_availability_cells_keep_a_missing_piece() -> None:
    assert availability_cells([3, 1, 2], 2048) == [3, 1, 2]
    avail = [2] * 5000
    avail[4321] = 0
    cells = availability_cells(avail, 2048)
    assert len(cells) == 2048
    # Exactly the cell covering piece 4321 shows it missing.
    assert cells.count(0) == 1
    index = cells.index(0)
    assert index * 5000 // 2048 <= 4321 < (index + 1) * 5000 // 2048
    assert availability_cells([], 2048) == []


def _manifest(num_pieces: int, *, tail: int = 17) -> Manifest:
    """A manifest of one file: ``num_pieces - 1`` full pieces and a short last one."""
    size = (num_pieces - 1) * PIECE + tail
    return Manifest.build(
        name=NAME,
        origin="file:///nowhere",
        piece_size=PIECE,
        files=[("weights.bin", size)],
        digests=[bytes([i % 256]) * 32 for i in range(num_pieces)],
    )


def test_swarm_snapshot_is_bounded() -> None:
    pieces, peers = 5000, 120
    manifest = _manifest(pieces)
    # No origin assignments: this test is about sizes.
    registry = SwarmRegistry(
        manifest.piece_lengths, peer_ttl=1000.0, rng=random.Random(3), assign_after=1e9
    )
    for i in range(peers):
        have = Bitfield(pieces)
        for piece in range(i):
            have.add(piece)
        registry.announce(bytes([i]) * PEER_ID_SIZE, (f"10.0.1.{i}", 7000), have, {}, float(i))

    limits = StatusLimits(max_peers=50, max_cells=2048)
    snap = swarm_snapshot(manifest, registry, 200.0, limits)
    assert snap["name"] == NAME and snap["root"] == manifest.root_hex
    assert snap["peers"] == peers and snap["pieces"] == pieces
    assert snap["present_pieces"] == peers - 1
    cells = snap["availability"]["cells"]
    assert len(cells) == 2048
    # Cell 0 covers pieces 0 and 1: it shows the rarer, piece 1 (peers 2..119 have it).
    assert cells[0] == peers - 2 and cells[-1] == 0
    assert snap["availability"]["missing"] == pieces - (peers - 1)
    # The least advanced peers are the ones listed, each with its last announce's age.
    listed = snap["peer_list"]
    assert len(listed) == 50
    assert [p["have"] for p in listed] == list(range(50))
    assert [p["seen_seconds_ago"] for p in listed] == [200.0 - i for i in range(50)]
    held = sum(registry.availability(p) * n for p, n in enumerate(manifest.piece_lengths))
    assert snap["held_bytes"] == held
    # Bounded on the wire too: 120 peers and 5000 pieces stay well under 64 KiB.
    assert len(json.dumps(snap)) < 64 * 1024


def test_origin_bytes_are_the_lengths_of_pulled_pieces() -> None:
    manifest = _manifest(3)  # two full pieces and one of 17 bytes
    registry = SwarmRegistry(
        manifest.piece_lengths, peer_ttl=60.0, rng=random.Random(5), origin_budget=2
    )
    seeder = b"s" * PEER_ID_SIZE
    have: set[int] = set()
    for step in range(3):  # every announce reports the last pieces and gets new ones
        reply = registry.announce(seeder, ("10.0.0.1", 7000), list(have), {}, float(step))
        snap = swarm_snapshot(manifest, registry, float(step), StatusLimits())
        assert snap["origin"]["bytes"] == sum(manifest.piece_lengths[p] for p in have)
        have |= set(reply.assigned)
    assert have == {0, 1, 2}
    registry.announce(seeder, ("10.0.0.1", 7000), list(have), {}, 3.0)
    snap = swarm_snapshot(manifest, registry, 3.0, StatusLimits())
    assert snap["origin"]["bytes"] == manifest.total_size == 2 * PIECE + 17
    assert snap["origin"]["ratio"] == 1.0 and snap["origin"]["pieces"] == 3
    assert snap["complete"] and snap["finished_peers"] == 1


# --------------------------------------------------------------------------------------
# a real tracker with a token, on a thread of its own
# --------------------------------------------------------------------------------------


@dataclass
class RunningTracker:
    tracker: Tracker
    manifest: Manifest
    loop: asyncio.AbstractEventLoop
    client: TrackerClient

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.tracker.config.port}"

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def announce(self, peer: bytes, port: int, have: set[int]) -> Reply:
        bits = Bitfield(self.manifest.num_pieces)
        for piece in have:
            bits.add(piece)
        msg = Announce(self.manifest.ref, peer, port, bits.to_bytes(), host="127.0.0.1")
        return self.run(self.client.announce(msg))


@pytest.fixture
def running_tracker(tmp_path: Path) -> Iterator[RunningTracker]:
    """A tracker with a cluster token on a loopback port, serving from its own loop."""
    key = ClusterKey(TOKEN)
    rng = random.Random(11)
    origin = populate(
        tmp_path / "origin",
        {"config.json": b'{"layers": 2}\n', "weights.bin": rng.randbytes(40 * PIECE + 17)},
    )
    catalog = (tmp_path / "catalog").as_uri()
    manifest = asyncio.run(publish(origin.as_uri(), NAME, catalog, piece_size=PIECE, key=key))
    config = TrackerConfig(
        host="127.0.0.1",
        port=free_port(),
        catalog=catalog,
        announce_interval=1.0,
        peer_ttl=600.0,  # the test's peers announce only when it says so
        stall_timeout=600.0,
        restart_grace=0.0,
        origin_budget=2,
        key=key,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="tracker", daemon=True)
    thread.start()
    tracker = Tracker(config, rng=random.Random(1))
    client = TrackerClient(f"http://127.0.0.1:{config.port}", key=key)
    running = RunningTracker(tracker, manifest, loop, client)
    try:
        running.run(tracker.start())
        yield running
    finally:
        try:
            running.run(running.client.close())
            running.run(tracker.close())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10.0)
            if not thread.is_alive():
                loop.close()


@dataclass(frozen=True)
class KnownSwarm:
    """What the page must show for the swarm ``make_swarm`` built."""

    pieces: int
    peers: int
    finished: int
    origin_bytes: int
    haves: dict[str, int]  # peer id (hex) -> pieces


def make_swarm(running: RunningTracker) -> KnownSwarm:
    """Four peers with known numbers: a seeder of two origin pieces, a complete peer,
    one with the first 20 pieces, one with every other piece."""
    manifest = running.manifest
    total = manifest.num_pieces
    seeder, full, half, sparse = (bytes([c]) * PEER_ID_SIZE for c in b"sfhp")
    # The seeder comes first: with an origin budget of 2 it is given two pieces.
    assigned = running.announce(seeder, 7001, set()).assigned
    assert len(assigned) == 2
    # Every other piece arrives from elsewhere, so nothing more is assigned; then
    # the seeder's two pieces are verified there: the origin sent exactly those.
    rest = set(range(total)) - set(assigned)
    running.announce(full, 7002, rest)
    running.announce(seeder, 7001, set(assigned))
    running.announce(full, 7002, set(range(total)))
    running.announce(half, 7003, set(range(20)))
    running.announce(sparse, 7004, set(range(0, total, 2)))
    lengths = manifest.piece_lengths
    return KnownSwarm(
        pieces=total,
        peers=4,
        finished=1,
        origin_bytes=sum(lengths[p] for p in assigned),
        haves={
            seeder.hex(): 2,
            full.hex(): total,
            half.hex(): 20,
            sparse.hex(): len(range(0, total, 2)),
        },
    )


async def _get(url: str) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


def test_page_and_its_data_are_open_with_a_token(running_tracker: RunningTracker) -> None:
    known = make_swarm(running_tracker)
    url = running_tracker.url
    status, body, headers = asyncio.run(_get(f"{url}/"))
    assert status == 200 and b'src="static/status.js"' in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for asset in ("static/status.js", "static/status.css"):
        status, body, _ = asyncio.run(_get(f"{url}/{asset}"))
        assert status == 200 and body
    status, body, _ = asyncio.run(_get(f"{url}/status.json"))
    assert status == 200
    data = json.loads(body)
    assert data["open"] is False and data["swarms_total"] == 1
    (swarm,) = data["swarms"]
    assert swarm["name"] == NAME and swarm["root"] == running_tracker.manifest.root_hex
    assert (swarm["peers"], swarm["finished_peers"]) == (known.peers, known.finished)
    assert swarm["present_pieces"] == swarm["pieces"] == known.pieces
    assert swarm["origin"]["bytes"] == known.origin_bytes
    assert {p["peer_id"]: p["have"] for p in swarm["peer_list"]} == known.haves
    # No manifest in it: no file names, no origin URL.
    assert b"weights.bin" not in body and b"file://" not in body
    # Everything else still needs the token; so do names under /static/ that aren't assets.
    for path in ("/v1/swarms", f"/v1/manifest/{NAME}", "/static/other.js"):
        status, _, _ = asyncio.run(_get(f"{url}{path}"))
        assert status == 401, path


# --------------------------------------------------------------------------------------
# the page in headless Chromium
# --------------------------------------------------------------------------------------


def _chromium() -> str | None:
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    return shutil.which("chromium")


def test_status_page_in_headless_chromium(running_tracker: RunningTracker) -> None:
    chromium = _chromium()
    if chromium is None or not CHROMEDRIVER.is_file():
        pytest.skip(
            "no browser: Debian's chromium and chromium-driver are not installed "
            f"(need a chromium binary and {CHROMEDRIVER}; .ci/run installs both with apt-get)"
        )
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    known = make_swarm(running_tracker)
    root = running_tracker.manifest.root_hex
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1100")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager then downloads nothing.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(f"{running_tracker.url}/")
        card = f'section.swarm[data-root="{root}"]'

        def fresh(read: Callable[[], str]) -> str:
            # The page re-renders on every poll: an element just found may be
            # replaced before it is read. Find it again, a few times at most.
            for _ in range(5):
                try:
                    return read()
                except StaleElementReferenceException:
                    continue
            return read()

        def text(selector: str) -> str:
            def read() -> str:
                found = driver.find_elements(By.CSS_SELECTOR, f"{card} {selector}")
                return found[0].text if found else ""

            return fresh(read)

        WebDriverWait(driver, 30, poll_frequency=0.2).until(
            lambda _: text('[data-field="name"]') == NAME
        )
        assert text('[data-field="root"]') == root
        assert text('[data-field="peers"] .value') == str(known.peers)
        assert f"{known.finished} finished" in text('[data-field="peers"]')
        assert text('[data-field="pieces"] .value') == f"{known.pieces} / {known.pieces}"
        size = running_tracker.manifest.total_size
        assert text('[data-field="origin"] .value') == f"{known.origin_bytes / size:.3f}"
        for peer_id, have in known.haves.items():
            assert f"{have} / {known.pieces}" in text(f'tr[data-peer="{peer_id}"]')
        cells = fresh(
            lambda: str(
                driver.find_element(
                    By.CSS_SELECTOR, f'{card} canvas[data-field="availability"]'
                ).get_attribute("data-cells")
            )
        )
        assert cells == str(known.pieces)
        assert "swarms" in fresh(lambda: driver.find_element(By.ID, "summary").text)

        # The swarm moves: a rate appears, computed in the page from its polls.
        running_tracker.announce(bytes([ord("h")]) * PEER_ID_SIZE, 7003, set(range(known.pieces)))
        WebDriverWait(driver, 30, poll_frequency=0.2).until(
            lambda _: (
                text('[data-field="received"] .value').endswith("/s")
                and not text('[data-field="received"] .value').startswith("0 B")
            )
        )
        assert text('[data-field="peers"] .sub') == f"{known.finished + 1} finished"

        SCREENSHOT.unlink(missing_ok=True)
        assert driver.save_screenshot(str(SCREENSHOT))
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert severe == [], severe
    finally:
        driver.quit()
