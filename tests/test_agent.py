"""The node agent through real processes on loopback: a tracker, ``swarm agent``s, each
with a cache of its own (a node), and ``swarm fetch --dest DIR`` with ``SWARM_AGENT``
(an init container). The origin is a ``file://`` directory; the bytes each fetch
moved come from the agent's answer (origin and peers, for that request).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fetch_helpers import publish, swarm, swarm_concurrently
from servers import LOOPBACK
from swarm_helpers import Processes, TrackerProcess, _Process

from swarm.verify import verify_dir

MiB = 1024 * 1024
READY = 30.0  # seconds an agent may take to open its socket


class AgentProcess(_Process):
    """``swarm agent --cache DIR --tracker URL --socket PATH`` on loopback."""

    def __init__(self, name: str, tmp: Path, tracker: str, *extra: str) -> None:
        self.cache = tmp / name / "cache"
        self.socket = tmp / name / "agent.sock"
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(
            [
                "-v",
                "agent",
                "--cache",
                str(self.cache),
                "--tracker",
                tracker,
                "--socket",
                str(self.socket),
                "--listen",
                LOOPBACK,
                "--no-fsync",
                *extra,
            ],
            {},
            tmp / "logs",
            name,
        )

    def start(self) -> AgentProcess:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self.spawn()
        deadline = time.monotonic() + READY
        while not self.socket.exists():
            assert self.alive(), f"{self.name} exited:\n{self.stderr_tail()}"
            assert time.monotonic() < deadline, f"{self.name} not ready:\n{self.stderr_tail()}"
            time.sleep(0.05)
        return self

    def fetch_args(self, ref: str, dest: Path) -> list[str]:
        return ["fetch", ref, "--dest", str(dest), "--agent", str(self.socket), "--json"]

    def fetch(self, ref: str, dest: Path) -> dict[str, Any]:
        return swarm(*self.fetch_args(ref, dest)).ok()

    def ls(self) -> dict[str, Any]:
        return swarm("ls", "--socket", str(self.socket), "--json").ok()


def _model(root: Path, files: dict[str, int], seed: int) -> dict[str, bytes]:
    import random

    rng = random.Random(seed)
    out = {}
    for name, size in files.items():
        data = rng.randbytes(size)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        out[name] = data
    return out


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Path, str, TrackerProcess, Processes]]:
    origin = tmp_path / "origin"
    origin.mkdir()
    catalog = (tmp_path / "catalog").as_uri()
    procs = Processes()
    try:
        tracker = procs.add(
            TrackerProcess(
                catalog,
                {},
                tmp_path / "logs",
                announce_interval=1.0,
                peer_ttl=5.0,
                stall_timeout=20.0,
            )
        )
        tracker.start()
        yield origin, catalog, tracker, procs
    finally:
        procs.close()


FILES = {"model.bin": 24 * MiB + 123, "config.json": 300}


def _same(dest: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (dest / name).read_bytes() == data, name
    assert (dest / ".swarm-complete").exists()
    assert verify_dir(dest).ok


def test_a_late_node_reads_nothing_from_the_origin_and_a_second_pod_moves_nothing(
    tmp_path: Path, cluster: tuple[Path, str, TrackerProcess, Processes]
) -> None:
    origin, catalog, tracker, procs = cluster
    files = _model(origin, FILES, 1)
    total = sum(len(d) for d in files.values())
    publish(origin.as_uri(), "m", catalog, piece_size="8MiB")
    agents = [procs.add(AgentProcess(f"node{i}", tmp_path, tracker.url)).start() for i in range(3)]
    runs = swarm_concurrently(
        *(a.fetch_args("m", tmp_path / f"pod{i}") for i, a in enumerate(agents)), timeout=90
    )
    burst = [run.ok() for run in runs]
    for i, got in enumerate(burst):
        _same(tmp_path / f"pod{i}", files)
        assert got["view"] == "linked"
    assert sum(g["origin_bytes"] for g in burst) == total  # one origin copy for the burst

    # Every fetch process has exited; the agents still hold the version. A node that
    # joins later is served by them.
    late = procs.add(AgentProcess("node3", tmp_path, tracker.url)).start()
    got = late.fetch("m", tmp_path / "late-pod")
    _same(tmp_path / "late-pod", files)
    assert got["origin_bytes"] == 0 and got["peer_bytes"] >= total  # endgame copies count too

    # A second pod on the same node: no bytes over the network, the same inodes.
    again = late.fetch("m", tmp_path / "second-pod")
    assert again["origin_bytes"] == 0 and again["peer_bytes"] == 0
    cached = Path(again["cache_path"]) / "model.bin"
    assert os.stat(tmp_path / "second-pod" / "model.bin").st_ino == os.stat(cached).st_ino
    listing = late.ls()["versions"]
    assert [v["ref"] for v in listing] == [got["ref"]] and listing[0]["in_use"]


def test_a_killed_agent_keeps_its_cache_and_serves_it_again(
    tmp_path: Path, cluster: tuple[Path, str, TrackerProcess, Processes]
) -> None:
    origin, catalog, tracker, procs = cluster
    files = _model(origin, FILES, 2)
    total = sum(len(d) for d in files.values())
    publish(origin.as_uri(), "m", catalog, piece_size="8MiB")
    first = procs.add(AgentProcess("node0", tmp_path, tracker.url)).start()
    assert first.fetch("m", tmp_path / "pod0")["origin_bytes"] == total
    first.kill()
    # The origin goes away: from now on only the restarted agent can serve the bytes.
    os.rename(origin, tmp_path / "origin-gone")
    restarted = procs.add(AgentProcess("node0", tmp_path, tracker.url)).start()
    deadline = time.monotonic() + 30
    while not any(v["complete"] for v in restarted.ls()["versions"]):
        assert time.monotonic() < deadline, restarted.stderr_tail()
        time.sleep(0.2)
    other = procs.add(AgentProcess("node1", tmp_path, tracker.url)).start()
    got = other.fetch("m", tmp_path / "pod1")
    assert got["origin_bytes"] == 0 and got["peer_bytes"] >= total  # endgame copies count too
    _same(tmp_path / "pod1", files)


def test_a_new_version_reads_only_the_changed_file_from_the_origin(
    tmp_path: Path, cluster: tuple[Path, str, TrackerProcess, Processes]
) -> None:
    origin, catalog, tracker, procs = cluster
    files = _model(origin, FILES, 3)
    v1 = publish(origin.as_uri(), "m", catalog, piece_size="8MiB")
    agent = procs.add(AgentProcess("node0", tmp_path, tracker.url)).start()
    agent.fetch("m", tmp_path / "pod-v1")
    changed = b'{"temperature": 0.7}\n'
    (origin / "config.json").write_bytes(changed)
    files["config.json"] = changed
    v2 = publish(origin.as_uri(), "m", catalog, piece_size="8MiB")
    assert v2["root"] != v1["root"]
    # A rollout names its version (the tracker may answer "m" from its manifest cache).
    got = agent.fetch(v2["ref"], tmp_path / "pod-v2")
    assert got["root"] == v2["root"]
    assert got["origin_bytes"] == len(changed) and got["peer_bytes"] == 0
    _same(tmp_path / "pod-v2", files)
    # The unchanged file is one file on disk for both versions.
    cache = agent.cache / "versions"
    assert (cache / v1["root"] / "model.bin").stat().st_ino == (
        cache / v2["root"] / "model.bin"
    ).stat().st_ino


def test_eviction_keeps_pinned_and_leased_versions(
    tmp_path: Path, cluster: tuple[Path, str, TrackerProcess, Processes]
) -> None:
    origin, catalog, tracker, procs = cluster
    refs = []
    for seed in range(3):
        (origin / f"v{seed}").mkdir()
        _model(origin / f"v{seed}", {"model.bin": 4 * MiB}, 10 + seed)
        refs.append(publish((origin / f"v{seed}").as_uri(), "m", catalog, piece_size="4MiB")["ref"])
    # Room for one version and a half.
    agent = procs.add(AgentProcess("node0", tmp_path, tracker.url, "--capacity", "6MiB")).start()
    agent.fetch(refs[0], tmp_path / "pod0")  # pod0 holds links: v0 is in use
    agent.fetch(refs[1], tmp_path / "pod1")
    held = {v["ref"] for v in agent.ls()["versions"]}
    assert held == {refs[0], refs[1]}  # over capacity, but both are in use
    pinned = swarm("pin", refs[1], "--socket", str(agent.socket))
    assert pinned.returncode == 0, pinned.describe()
    # The pods go away (the kubelet removes their directories): the leases end.
    shutil.rmtree(tmp_path / "pod0")
    shutil.rmtree(tmp_path / "pod1")
    agent.fetch(refs[2], tmp_path / "pod2")
    held = {v["ref"] for v in agent.ls()["versions"]}
    # v0: unpinned and unused, the least recently used: gone. v1 pinned, v2 in use.
    assert held == {refs[1], refs[2]}
    assert not (agent.cache / "versions" / refs[0].split("@")[1]).exists()
    index = json.loads((agent.cache / "agent.json").read_text())
    assert index["versions"][refs[1].split("@")[1]]["pinned"] is True


def test_nodes_without_origin_credentials_are_never_seeders_and_still_finish(
    tmp_path: Path, cluster: tuple[Path, str, TrackerProcess, Processes]
) -> None:
    origin, catalog, tracker, procs = cluster
    files = _model(origin, FILES, 4)
    total = sum(len(d) for d in files.values())
    publish(origin.as_uri(), "m", catalog, piece_size="4MiB")
    # Two nodes may not read the origin: were either assigned a piece, its pull would
    # fail (their --origin names nothing) and the burst would not finish.
    nowhere = (tmp_path / "no-such-origin").as_uri()
    plain = [
        procs.add(
            AgentProcess(f"plain{i}", tmp_path, tracker.url, "--no-origin", "--origin", nowhere)
        ).start()
        for i in range(2)
    ]
    seeder = procs.add(AgentProcess("seeder", tmp_path, tracker.url)).start()
    runs = swarm_concurrently(
        *(a.fetch_args("m", tmp_path / f"pod-{a.name}") for a in [*plain, seeder]), timeout=90
    )
    got = {a.name: run.ok() for a, run in zip([*plain, seeder], runs, strict=True)}
    assert got["plain0"]["origin_bytes"] == got["plain1"]["origin_bytes"] == 0
    assert got["seeder"]["origin_bytes"] == total
    for a in [*plain, seeder]:
        _same(tmp_path / f"pod-{a.name}", files)


def test_warm_ends_with_k_verified_copies_then_all_nodes(
    tmp_path: Path, cluster: tuple[Path, str, TrackerProcess, Processes]
) -> None:
    origin, catalog, tracker, procs = cluster
    files = _model(origin, FILES, 5)
    total = sum(len(d) for d in files.values())
    published = publish(origin.as_uri(), "m", catalog, piece_size="4MiB")
    agents = [
        procs.add(AgentProcess(f"node{i}", tmp_path, tracker.url, "--poll-interval", "0.3")).start()
        for i in range(3)
    ]
    warm = swarm("warm", "m", "--tracker", tracker.url, "--min-copies", "2", "--json", timeout=90)
    got = warm.ok()
    assert got["verified"] >= 2 and got["wanted"] == 2 and got["root"] == published["root"]

    def holding() -> list[dict[str, Any]]:
        return [v for a in agents for v in a.ls()["versions"] if v["root"] == published["root"]]

    verified = [v for v in holding() if v["complete"]]
    assert len(verified) >= 2
    # Each copy came through the swarm: one origin copy for all of them.
    assert sum(v["origin_bytes"] for v in holding()) == total

    got = swarm("warm", "m", "--tracker", tracker.url, "--all-nodes", "--json", timeout=90).ok()
    assert got["verified"] == got["wanted"] == 3
    assert all(v["complete"] for v in holding()) and len(holding()) == 3
    # A pod on any node is now served from its own cache.
    pod = agents[2].fetch("m", tmp_path / "pod")
    assert pod["origin_bytes"] == 0 and pod["peer_bytes"] == 0
    _same(tmp_path / "pod", files)


def test_a_file_changed_in_one_piece_fetches_only_that_piece(
    tmp_path: Path, cluster: tuple[Path, str, TrackerProcess, Processes]
) -> None:
    origin, catalog, tracker, procs = cluster
    files = _model(origin, FILES, 6)
    v1 = publish(origin.as_uri(), "m", catalog, piece_size="8MiB")
    agent = procs.add(AgentProcess("node0", tmp_path, tracker.url)).start()
    agent.fetch(v1["ref"], tmp_path / "pod-v1")
    # One byte of model.bin's second 8 MiB piece changes (a fine-tune of one layer).
    data = bytearray(files["model.bin"])
    data[8 * MiB + 5] ^= 0xFF
    (origin / "model.bin").write_bytes(bytes(data))
    files["model.bin"] = bytes(data)
    v2 = publish(origin.as_uri(), "m", catalog, piece_size="8MiB")
    got = agent.fetch(v2["ref"], tmp_path / "pod-v2")
    assert got["origin_bytes"] == 8 * MiB and got["peer_bytes"] == 0
    _same(tmp_path / "pod-v2", files)
    _same(tmp_path / "pod-v1", {k: v for k, v in files.items() if k != "model.bin"})
