"""The node agent reviewed as a hostile client of its socket, a careless operator and a
broken disk would treat it: in-process, each agent with a cache of its own in a tmp
directory and a tracker URL nobody listens on (a cached version is served without
one; a fetch that needs the tracker fails as it would with the tracker away).
Versions are laid into the cache with a real :class:`PieceStore`, so every peer the
agent starts opens, verifies and serves real files.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aio_helpers import run_bounded, wait_until

from core.digest import digest
from core.errors import StoreError, TrackerError
from core.manifest import Manifest
from swarm.agent import (
    INDEX,
    MAX_REQUEST,
    VERSIONS,
    Agent,
    AgentError,
    ask,
    link_view,
    read_answer,
)
from swarm.announce import TrackerClient
from swarm.peer import PeerConfig
from swarm.store import COMPLETE_MARKER, STATE_DIR, PieceStore

MiB = 1024 * 1024
NOBODY = "http://127.0.0.1:9"  # a tracker URL nobody listens on


def artifact(files: dict[str, bytes], piece_size: int = 1024) -> Manifest:
    sizes = [(p, len(d)) for p, d in files.items()]
    digests = [digest(files[p][o : o + n]) for p, o, n in Manifest.layout(sizes, piece_size)]
    return Manifest.build(
        name="m", origin="file:///nowhere", piece_size=piece_size, files=sizes, digests=digests
    )


def place(cache: Path, files: dict[str, bytes], *, pieces: int | None = None) -> Manifest:
    """Lay a version into ``cache`` as the agent keeps it: all of it verified and marked
    complete, or only its first ``pieces`` (a fetch that stopped part way)."""
    m = artifact(files)
    with PieceStore(cache / VERSIONS / m.root_hex, m, durable=False) as store:
        for i in range(m.num_pieces if pieces is None else pieces):
            p = m.piece(i)
            store.write_piece(i, memoryview(files[p.path][p.offset : p.offset + p.length]))
        if pieces is None:
            store.finish()
    return m


@asynccontextmanager
async def running_agent(cache: Path, *, capacity: int | None = None) -> AsyncIterator[Agent]:
    tracker = TrackerClient(NOBODY, udp_timeouts=(0.05,), http_timeout=1.0)
    config = PeerConfig(listen_host="127.0.0.1", listen_port=0, durable=False, tracker_timeout=0.1)
    agent = Agent(cache, tracker, config=config, capacity=capacity)
    try:
        await agent.restore()
        yield agent
    finally:
        await agent.close()
        await tracker.close()


async def complete(agent: Agent, m: Manifest) -> None:
    version = agent.versions[m.root_hex]
    await wait_until(lambda: version.complete, f"{m.ref} served again", 10)


# --- link_view: the pod's DIR is not trusted ------------------------------------------


def test_a_view_does_not_follow_a_directory_symlink_planted_in_dest(tmp_path: Path) -> None:
    m = place(tmp_path / "cache", {"sub/a.bin": os.urandom(3000), "b.bin": b"b"})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.bin").write_bytes(b"precious")
    dest = tmp_path / "pod"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    with pytest.raises(StoreError, match="symbolic link"):
        link_view(tmp_path / "cache" / VERSIONS / m.root_hex, dest, m)
    assert (outside / "a.bin").read_bytes() == b"precious"
    assert not (dest / COMPLETE_MARKER).exists()


def test_a_view_does_not_write_its_manifest_through_a_state_dir_symlink(tmp_path: Path) -> None:
    m = place(tmp_path / "cache", {"a.bin": os.urandom(3000)})
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "pod"
    dest.mkdir()
    (dest / STATE_DIR).symlink_to(outside)
    with pytest.raises(StoreError, match="symbolic link"):
        link_view(tmp_path / "cache" / VERSIONS / m.root_hex, dest, m)
    assert list(outside.iterdir()) == []


def test_a_view_that_fails_half_way_does_not_keep_an_old_completion_marker(
    tmp_path: Path,
) -> None:
    m = place(tmp_path / "cache", {"a.bin": os.urandom(3000), "z.bin": os.urandom(10)})
    dest = tmp_path / "pod"
    # What an earlier view of another version left: its marker, and a directory where
    # this version has a file (so linking this version fails after its first file).
    (dest / "z.bin").mkdir(parents=True)
    (dest / "z.bin" / "keep").write_bytes(b"x")
    (dest / COMPLETE_MARKER).write_text(json.dumps({"root": "00" * 32, "name": "m"}))
    with pytest.raises(OSError):
        link_view(tmp_path / "cache" / VERSIONS / m.root_hex, dest, m)
    assert not (dest / COMPLETE_MARKER).exists()


def test_a_view_into_the_cache_itself_is_refused_and_the_cache_keeps_its_files(
    tmp_path: Path,
) -> None:
    files = {"a.bin": os.urandom(3000), "b.bin": b"b"}
    m = place(tmp_path / "cache", files)
    source = tmp_path / "cache" / VERSIONS / m.root_hex
    with pytest.raises(AgentError, match="inside the node's cache"):
        link_view(source, source, m)
    for name, data in files.items():
        assert (source / name).read_bytes() == data


# --- the cache and its index ----------------------------------------------------------


@pytest.mark.parametrize(
    "saved",
    ["pinned", {"last_used": "yesterday"}, {"last_used": None, "pinned": "no"}],
)
def test_an_index_with_entries_of_the_wrong_type_does_not_stop_the_agent(
    tmp_path: Path, saved: object
) -> None:
    cache = tmp_path / "cache"
    m = place(cache, {"a.bin": os.urandom(3000)})
    (cache / INDEX).write_text(json.dumps({"versions": {m.root_hex: saved}}))

    async def body() -> None:
        async with running_agent(cache) as agent:
            await complete(agent, m)
            assert not agent.versions[m.root_hex].pinned

    run_bounded(body, 30)


def test_a_second_agent_on_the_same_cache_is_refused_and_leaves_the_index_alone(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    m = place(cache, {"a.bin": os.urandom(3000)})

    async def body() -> None:
        async with running_agent(cache) as first:
            await complete(first, m)
            first.versions[m.root_hex].pinned = True
            first._write_index()
            with pytest.raises(StoreError, match="in use"):
                async with running_agent(cache):
                    pass
            assert first.versions[m.root_hex].complete
            index = json.loads((cache / INDEX).read_text())
            assert index["versions"][m.root_hex]["pinned"] is True

    run_bounded(body, 30)


def test_a_pin_that_cannot_be_recorded_is_answered_with_an_error_and_not_kept(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    m = place(cache, {"a.bin": os.urandom(3000)})

    async def body() -> None:
        async with running_agent(cache) as agent:
            server = await agent.serve_socket(tmp_path / "agent.sock")
            try:
                (cache / (INDEX + ".tmp")).mkdir()  # the index can't be written
                conn = await ask(str(tmp_path / "agent.sock"), {"op": "pin", "ref": m.ref})
                try:
                    with pytest.raises(AgentError, match="can't record the pin"):
                        await conn.answer()
                finally:
                    conn.close()
                assert not agent.versions[m.root_hex].pinned
                (cache / (INDEX + ".tmp")).rmdir()
            finally:
                server.close()
                await server.wait_closed()

    run_bounded(body, 30)


# --- eviction -------------------------------------------------------------------------


def test_a_fetch_or_pin_during_an_eviction_is_not_handed_the_version_being_removed(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    old = place(cache, {"a.bin": os.urandom(3000)})
    new = place(cache, {"a.bin": os.urandom(3000)})

    async def body() -> None:
        async with running_agent(cache, capacity=3000) as agent:
            await complete(agent, old)
            await complete(agent, new)
            agent.versions[old.root_hex].last_used = time.time() - 60
            evicting = asyncio.create_task(agent.evict())
            await asyncio.sleep(0.05)
            assert not evicting.done()  # the old version's peer is stopping
            with pytest.raises(AgentError):
                agent.find(old.ref)
            got = None
            with pytest.raises(TrackerError):  # the tracker is away: nothing to answer with
                got = await agent.ensure(old.ref)
            assert await evicting == [old.ref]
            assert got is None or got.path.exists()

    run_bounded(body, 30)


def test_with_the_tracker_away_a_fetch_of_a_named_version_is_not_answered_with_another(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    held = place(cache, {"a.bin": os.urandom(3000)})
    other = artifact({"a.bin": os.urandom(3000)})

    async def body() -> None:
        async with running_agent(cache) as agent:
            await complete(agent, held)
            with pytest.raises(TrackerError):
                await agent.ensure(other.ref)
            # By name alone, what the node holds is the best answer it has.
            assert (await agent.ensure("m")).manifest.root_hex == held.root_hex

    run_bounded(body, 30)


def test_a_version_whose_fetch_failed_is_evicted_when_the_cache_is_over_capacity(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    failed = place(cache, {"a.bin": os.urandom(8000)}, pieces=2)

    async def body() -> None:
        async with running_agent(cache, capacity=1000) as agent:
            version = agent.versions[failed.root_hex]
            # Incomplete, and the tracker is away past --tracker-timeout: it fails.
            await wait_until(lambda: bool(version.error), "the fetch to fail", 15)
            assert await agent.evict() == [failed.ref]
            assert not (cache / VERSIONS / failed.root_hex).exists()
            assert agent.used_bytes() == 0

    run_bounded(body, 40)


# --- the socket -----------------------------------------------------------------------


def test_a_deeply_nested_request_is_answered_with_an_error(tmp_path: Path) -> None:
    cache = tmp_path / "cache"

    async def body() -> None:
        async with running_agent(cache) as agent:
            server = await agent.serve_socket(tmp_path / "agent.sock")
            try:
                reader, writer = await asyncio.open_unix_connection(str(tmp_path / "agent.sock"))
                writer.write(b"[" * (MAX_REQUEST - 100) + b"\n")
                await writer.drain()
                with pytest.raises(AgentError, match="bad request"):
                    await read_answer(reader)
                writer.close()
                await writer.wait_closed()
            finally:
                server.close()
                await server.wait_closed()

    run_bounded(body, 30)


def test_a_client_that_sends_without_end_after_its_answer_does_not_grow_the_agent(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    m = place(cache, {"a.bin": os.urandom(3000)})
    chunk = b"x" * MiB
    sent = 48

    async def body() -> None:
        async with running_agent(cache) as agent:
            await complete(agent, m)
            server = await agent.serve_socket(tmp_path / "agent.sock")
            try:
                conn = await ask(str(tmp_path / "agent.sock"), {"op": "fetch", "ref": m.ref})
                answer = await conn.answer()
                while answer["event"] == "progress":
                    answer = await conn.answer()
                assert answer["event"] == "done"
                tracemalloc.start()
                try:
                    for _ in range(sent):  # the agent reads each before the next is sent
                        conn.writer.write(chunk)
                        await conn.writer.drain()
                    await asyncio.sleep(0.2)
                    held, _ = tracemalloc.get_traced_memory()
                finally:
                    tracemalloc.stop()
                assert held < 8 * MiB, f"the agent kept {held / MiB:.0f} MiB of {sent} sent"
                conn.close()
                await conn.writer.wait_closed()
                await wait_until(lambda: not agent.versions[m.root_hex].holds, "the hang-up", 5)
            finally:
                server.close()
                await server.wait_closed()

    run_bounded(body, 60)


def test_a_garbled_answer_from_the_agent_is_an_agent_error(tmp_path: Path) -> None:
    async def garble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"this is not json\n")
        await writer.drain()
        writer.close()

    async def body() -> None:
        server = await asyncio.start_unix_server(garble, path=str(tmp_path / "agent.sock"))
        try:
            conn = await ask(str(tmp_path / "agent.sock"), {"op": "ls"})
            try:
                with pytest.raises(AgentError, match="not json"):
                    await conn.answer()
            finally:
                conn.close()
        finally:
            server.close()
            await server.wait_closed()

    run_bounded(body, 10)


@pytest.mark.skipif(
    os.geteuid() != 0 or Path("/proc/sys/fs/protected_hardlinks").read_text().strip() != "1",
    reason="needs root (to become another user) and fs.protected_hardlinks=1",
)
def test_a_pod_that_does_not_own_the_cache_files_gets_a_copied_view(tmp_path: Path) -> None:
    # The agent runs as root; an init container as another user may read the cache's
    # files but, with fs.protected_hardlinks, not link them.
    files = {"a.bin": os.urandom(3000)}
    shared = Path(tempfile.mkdtemp(prefix="review-agent-"))
    try:
        shared.chmod(0o755)
        m = place(shared / "cache", files)
        source = shared / "cache" / VERSIONS / m.root_hex
        for path in (shared / "cache", shared / "cache" / VERSIONS, source):
            path.chmod(0o755)
        dest = shared / "pod"
        dest.mkdir(mode=0o777)
        dest.chmod(0o777)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the pod's user
            try:
                os.close(read_end)
                os.setgid(65534)
                os.setuid(65534)
                how = link_view(source, dest, m)
            except BaseException as exc:
                how = f"{type(exc).__name__}: {exc}"
            os.write(write_end, how.encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            how = pipe.read().decode()
        os.waitpid(pid, 0)
        assert how == "copied"
        assert (dest / "a.bin").read_bytes() == files["a.bin"]
        assert (dest / COMPLETE_MARKER).exists()
    finally:
        shutil.rmtree(shared)


def test_an_agent_does_not_take_the_socket_of_one_still_answering_but_replaces_a_stale_one(
    tmp_path: Path,
) -> None:
    socket = tmp_path / "agent.sock"

    async def body() -> None:
        async with running_agent(tmp_path / "first") as first:
            server = await first.serve_socket(socket)
            try:
                async with running_agent(tmp_path / "second") as second:
                    with pytest.raises(AgentError, match="another agent answers"):
                        await second.serve_socket(socket)
                conn = await ask(str(socket), {"op": "ls"})
                try:
                    assert (await conn.answer())["event"] == "ls"
                finally:
                    conn.close()
            finally:
                server.close()
                await server.wait_closed()
        # The first agent is gone (on Python 3.11 its socket file stays): a new one
        # replaces the stale socket.
        assert socket.is_socket()
        async with running_agent(tmp_path / "first") as again:
            server = await again.serve_socket(socket)
            server.close()
            await server.wait_closed()

    run_bounded(body, 30)
