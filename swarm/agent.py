"""The node agent: one long-lived process per node that owns the node's cache.

``swarm agent --cache DIR --tracker URL --socket PATH`` keeps every artifact version
it holds in the swarm for as long as it holds it: a finished version is served to
late replicas (a fourth node an hour after the burst reads nothing from the
origin), a restarted agent takes its cache back and announces it again, and an
init container's ``swarm fetch NAME --dest DIR`` (with ``SWARM_AGENT=PATH``) asks
the agent to make the version present and then links its files into DIR: no
linger, and a second pod on the node moves no bytes over the network.

Layout of the cache::

    DIR/versions/<root>/        a version's files as ``swarm fetch --dest`` lays them
                                out, its ``.swarm/`` state included (the piece store)
    DIR/agent.json              pins and last use of each version
    DIR/agent-id                this cache's id with the tracker (``swarm warm``)
    DIR/.swarm/lock             flocked by the agent that owns the cache (one at a time)

One :class:`SwarmPeer` per version, each on a port of its own, with ``stay``: it
serves until the agent stops it. A new version of an artifact starts from the
files it shares with versions already held: a file whose size and piece digests
match one in the cache is hard-linked in (stored once), and a piece of another file
with a digest a held version has is copied from local disk; both are claimed, so
the store hashes them again from local disk instead of fetching them (a new version
that changes one small file, or one piece of a large one, fetches only that).

Capacity: with ``--capacity``, after each version completes the least recently
used versions are removed until the cache fits, never one that is pinned
(``swarm pin``), being fetched, or in use. In use means leased: a pod's view of a
version is hard links to the cache's files, so a file with more links than the
cache itself holds is in use, and the lease ends when the kubelet removes the
pod's directory. No bookkeeping can drift from what the kernel counts.

Preheating: the agent polls the tracker every few seconds with what it holds, and
fetches what the tracker asks of it (``swarm warm NAME --min-copies K``; see
``tracker.warm``).

The agent's socket speaks newline-delimited JSON, one request per connection:
``{"op": "fetch", "ref": REF}`` answers with ``progress`` lines and one ``done``
(or ``error``) line; ``{"op": "ls"}``, ``{"op": "pin" | "unpin", "ref": REF}``
answer with one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from core.errors import SwarmError, TrackerError, UnknownArtifactError
from core.manifest import FileEntry, Manifest, parse_ref
from swarm.announce import TrackerClient
from swarm.peer import PeerConfig, SwarmPeer
from swarm.store import (
    COMPLETE_MARKER,
    STATE_DIR,
    DestLock,
    check_not_link,
    manifest_path,
    read_complete_marker,
    remove_complete_marker,
    replace_file,
    state_path,
)

log = logging.getLogger(__name__)

VERSIONS: Final = "versions"
INDEX: Final = "agent.json"
AGENT_ID: Final = "agent-id"  # this cache's id with the tracker (for preheating)
MAX_REQUEST: Final = 64 * 1024  # one request line
PROGRESS_EVERY: Final = 0.5  # seconds between progress lines to a waiting fetch
LINK_TIMEOUT: Final = 3600.0  # seconds a client may take to link (or copy) what it fetched


class AgentError(SwarmError):
    """What the agent answers when it can't make a version present."""


@dataclass
class Version:
    """One artifact version in the cache and the peer that serves (or fetches) it."""

    manifest: Manifest
    path: Path
    peer: SwarmPeer
    task: asyncio.Task[Any] | None = None
    done_bytes: int = 0
    pinned: bool = False
    last_used: float = field(default_factory=time.time)
    error: str = ""
    holds: int = 0  # fetches answered and not yet linked: not evicted meanwhile

    @property
    def complete(self) -> bool:
        return self.peer.finished.is_set() and not self.error and self.peer.store.complete

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "name": m.name,
            "root": m.root_hex,
            "ref": m.ref,
            "bytes": m.total_size,
            "path": str(self.path),
            "complete": self.complete,
            "done_bytes": self.done_bytes,
            "pinned": self.pinned,
            "last_used": round(self.last_used, 3),
            "origin_bytes": self.peer.origin.counters.bytes_read,
            "peer_bytes": self.peer.session.stats.peer_bytes,
            "uploaded_bytes": self.peer.session.stats.uploaded_bytes,
            "error": self.error,
        }


class Agent:
    """The node's cache and the peers that keep it in the swarm."""

    def __init__(
        self,
        cache: Path,
        tracker: TrackerClient,
        *,
        config: PeerConfig | None = None,
        capacity: int | None = None,
    ) -> None:
        self.cache = Path(cache)
        self.tracker = tracker
        self.config = dataclasses.replace(config or PeerConfig(), stay=True, linger=0.0)
        self.capacity = capacity
        self.versions: dict[str, Version] = {}  # by root (hex)
        self._lock = asyncio.Lock()  # one version started or evicted at a time
        self._owner: DestLock | None = None  # the cache's flock: one agent per cache

    # --- lifecycle -------------------------------------------------------------------

    async def restore(self) -> None:
        """Take back what the cache holds (after a restart): every version is served
        again, and an unfinished one carries on fetching.

        Raises StoreError if another agent owns the cache: two would fight over every
        version's files (and the second would take the first's socket)."""
        (self.cache / VERSIONS).mkdir(parents=True, exist_ok=True)
        (self.cache / STATE_DIR).mkdir(exist_ok=True)
        self._owner = DestLock(self.cache).acquire()
        index = self._read_index()
        for entry in sorted((self.cache / VERSIONS).iterdir()):
            root = entry.name
            raw = _read(manifest_path(entry, root))
            if raw is None:
                log.warning("%s holds no manifest of its own; left alone", entry)
                continue
            try:
                manifest = Manifest.decode(raw)
            except SwarmError as exc:
                log.warning("%s: unreadable manifest (%s); left alone", entry, exc)
                continue
            if manifest.root_hex != root:
                log.warning("%s holds the manifest of %s; left alone", entry, manifest.ref)
                continue
            version = self._start(manifest)
            # The index is a file anyone may have edited: take only what has the right type.
            saved = index.get(root)
            if isinstance(saved, dict):
                version.pinned = saved.get("pinned") is True
                last_used = saved.get("last_used")
                if isinstance(last_used, int | float) and math.isfinite(last_used):
                    version.last_used = float(last_used)
        if self.versions:
            log.info("cache %s: serving %d versions again", self.cache, len(self.versions))

    async def close(self) -> None:
        """Stop every peer (each tells the tracker it leaves), record the index and let
        go of the cache."""
        for version in self.versions.values():
            version.peer.stop()
        tasks = [v.task for v in self.versions.values() if v.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._owner is None:
            return  # the cache was never ours (another agent owns it): nor is its index
        try:
            self._write_index()
        finally:
            self._owner.release()
            self._owner = None

    # --- versions --------------------------------------------------------------------

    def _start(self, manifest: Manifest) -> Version:
        path = self.cache / VERSIONS / manifest.root_hex
        holder: list[Version] = []

        def progress(n: int) -> None:
            if holder:
                holder[0].done_bytes += n

        peer = SwarmPeer(manifest, path, self.tracker, config=self.config, progress=progress)
        version = Version(manifest, path, peer)
        holder.append(version)
        self.versions[manifest.root_hex] = version
        version.task = asyncio.create_task(self._serve(version), name=f"serve-{manifest.ref}")
        return version

    async def _serve(self, version: Version) -> None:
        try:
            await version.peer.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reported to whoever waits for the version
            version.error = str(exc) or type(exc).__name__
            version.peer.finished.set()
            log.error("%s: %s", version.manifest.ref, version.error)

    def _held(self, name: str, root: str | None) -> list[Version]:
        """The versions held of ``name`` (whose root starts with ``root``, if given)."""
        return [
            v
            for v in self.versions.values()
            if v.manifest.name == name
            and (root is None or v.manifest.root_hex.startswith(root.lower()))
        ]

    async def ensure(self, ref: str) -> Version:
        """The version ``ref`` names, present or on its way (the manifest from the tracker)."""
        name, root = parse_ref(ref)
        if root is not None:
            for have in self._held(name, root):
                if not have.error:
                    return have
        try:
            manifest = await self.tracker.manifest(ref)
        except TrackerError as exc:
            if isinstance(exc, UnknownArtifactError):
                raise
            # The tracker is away: a version of that name already held will do.
            # Only one of the version asked for, if the ref names one.
            held = [v for v in self._held(name, root) if v.complete]
            if not held:
                raise
            newest = max(held, key=lambda v: v.last_used)
            log.warning("tracker unreachable (%s); answering with %s", exc, newest.manifest.ref)
            return newest
        async with self._lock:
            known = self.versions.get(manifest.root_hex)
            if known is not None and not known.error:
                return known
            if known is not None:  # failed before: try again
                self.versions.pop(manifest.root_hex, None)
            await asyncio.to_thread(self._seed_from_cache, manifest)
            return self._start(manifest)

    def _seed_from_cache(self, manifest: Manifest) -> None:
        """Hard-link into a new version the files it shares with versions already held,
        and claim their pieces: the store hashes them again on open, from local disk."""
        dest = self.cache / VERSIONS / manifest.root_hex
        if (dest / STATE_DIR).exists():
            return  # a version started before: its own state says what it has
        known: dict[tuple[int, int, int, bytes], Path] = {}
        for version in self.versions.values():
            if not version.complete:
                continue
            for key, held in _file_keys(version.manifest).items():
                known.setdefault(key, version.path / held.path)
        claimed = bytearray(manifest.num_pieces)
        linked = 0
        for key, entry in _file_keys(manifest).items():
            source = known.get(key)
            if source is None:
                continue
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError as exc:
                log.warning("can't link %s into %s: %s", source, target, exc)
                continue
            claimed[entry.first_piece : entry.first_piece + entry.piece_count] = b"\x01" * (
                entry.piece_count
            )
            linked += entry.size
        copied = self._copy_shared_pieces(manifest, dest, claimed)
        if linked or copied:
            (dest / STATE_DIR).mkdir(parents=True, exist_ok=True)
            replace_file(state_path(dest, manifest.root_hex), bytes(claimed), durable=False)
            log.info(
                "%s: %d bytes of whole files linked and %d bytes of pieces copied from "
                "versions already held, checked again from local disk",
                manifest.ref,
                linked,
                copied,
            )

    def _copy_shared_pieces(self, manifest: Manifest, dest: Path, claimed: bytearray) -> int:
        """Copy into a new version's files (not linked whole) the pieces a held version
        has with the same digest, and claim them; the bytes copied.

        A file that changed in part keeps the pieces that did not change: they are read
        from local disk, not fetched (they are stored twice, once per version)."""
        size = manifest.block_size
        sources: dict[tuple[bytes, int], tuple[Path, int]] = {}
        for version in self.versions.values():
            m = version.manifest
            if not version.complete or m.block_size != size:
                continue  # a piece's digest depends on the block size too
            for index in range(m.num_pieces):
                piece = m.piece(index)
                key = (m.digests[index], piece.length)
                sources.setdefault(key, (version.path / piece.path, piece.offset))
        copied = 0
        for entry in manifest.files:
            if entry.piece_count == 0 or claimed[entry.first_piece]:
                continue  # empty, or linked whole
            fd = -1
            try:
                for index in range(entry.first_piece, entry.first_piece + entry.piece_count):
                    piece = manifest.piece(index)
                    source = sources.get((manifest.digests[index], piece.length))
                    if source is None:
                        continue
                    if fd < 0:
                        target = dest / entry.path
                        target.parent.mkdir(parents=True, exist_ok=True)
                        fd = os.open(target, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
                        os.ftruncate(fd, entry.size)
                    if _copy_range(source[0], source[1], fd, piece.offset, piece.length):
                        claimed[index] = 1
                        copied += piece.length
            except OSError as exc:
                log.warning("can't copy shared pieces into %s: %s", dest / entry.path, exc)
            finally:
                if fd >= 0:
                    os.close(fd)
        return copied

    async def wait_ready(
        self, version: Version, on_progress: Callable[[Version], Any] | None = None
    ) -> None:
        """Until ``version`` is complete and verified; raises AgentError if it failed."""
        while not version.peer.finished.is_set():
            if on_progress is not None:
                await on_progress(version)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(version.peer.finished.wait(), PROGRESS_EVERY)
        if version.error or not version.peer.store.complete:
            raise AgentError(f"{version.manifest.ref}: {version.error or 'not complete'}")
        # The store marks the artifact complete right after ``finished`` is set.
        for _ in range(100):
            if (version.path / COMPLETE_MARKER).exists():
                break
            await asyncio.sleep(0.05)
        version.last_used = time.time()

    # --- capacity --------------------------------------------------------------------

    def usage(self, versions: list[Version] | None = None) -> tuple[int, set[str]]:
        """Bytes the cache's files take (a file linked into several versions counts once)
        and the roots of the versions in use: a file with more links than the cache
        itself holds is in a pod's view. One ``stat`` per file, so callers on the event
        loop run it in a thread."""
        held = list(self.versions.values()) if versions is None else versions
        inside: dict[tuple[int, int], int] = {}
        sizes: dict[tuple[int, int], int] = {}
        seen: list[tuple[str, list[os.stat_result]]] = []
        for version in held:
            stats = []
            for entry in version.manifest.files:
                try:
                    st = os.stat(version.path / entry.path)
                except OSError:
                    continue
                key = (st.st_dev, st.st_ino)
                inside[key] = inside.get(key, 0) + 1
                sizes[key] = st.st_size
                stats.append(st)
            seen.append((version.manifest.root_hex, stats))
        in_use = {
            root
            for root, stats in seen
            if any(st.st_nlink > inside[(st.st_dev, st.st_ino)] for st in stats)
        }
        return sum(sizes.values()), in_use

    def used_bytes(self) -> int:
        """Bytes the cache's files take (a file linked into several versions counts once)."""
        return self.usage()[0]

    async def evict(self) -> list[str]:
        """Remove least recently used versions until the cache fits ``capacity``: never a
        pinned one, one being fetched, or one in use. Returns the refs removed."""
        removed: list[str] = []
        if self.capacity is None:
            self._write_index()
            return removed
        async with self._lock:
            while True:
                used, in_use = await asyncio.to_thread(self.usage, list(self.versions.values()))
                if used <= self.capacity:
                    break
                candidates = sorted(
                    (
                        v
                        for v in self.versions.values()
                        if (v.complete or v.error)  # a failed fetch's files count too
                        and not v.pinned
                        and not v.holds
                        and v.manifest.root_hex not in in_use
                    ),
                    key=lambda v: v.last_used,
                )
                if not candidates:
                    log.warning(
                        "cache %s holds %d bytes, over its capacity of %d, and every version"
                        " is pinned, in use or being fetched",
                        self.cache,
                        used,
                        self.capacity,
                    )
                    break
                victim = candidates[0]
                await self._remove(victim)
                removed.append(victim.manifest.ref)
        self._write_index()
        return removed

    async def _remove(self, version: Version) -> None:
        # Out of the index before the first await: a fetch or pin that comes while the
        # peer stops must not be handed a version whose files are about to go.
        self.versions.pop(version.manifest.root_hex, None)
        version.peer.stop()
        if version.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(version.task), 10)
            except TimeoutError:
                version.task.cancel()
                await asyncio.gather(version.task, return_exceptions=True)
        await asyncio.to_thread(shutil.rmtree, version.path, True)
        log.info("evicted %s (%d bytes)", version.manifest.ref, version.manifest.total_size)

    def find(self, ref: str) -> Version:
        """A held version by ``name``, ``name@root-prefix``; the newest used if several."""
        matches = self._held(*parse_ref(ref))
        if not matches:
            raise AgentError(f"this node holds no version of {ref}")
        return max(matches, key=lambda v: v.last_used)

    def listing(self, in_use: set[str] | None = None) -> list[dict[str, Any]]:
        """Every version held, with whether it is in use (``usage()``'s roots)."""
        if in_use is None:
            in_use = self.usage()[1]
        out = []
        for version in sorted(self.versions.values(), key=lambda v: v.manifest.ref):
            item = version.summary()
            item["in_use"] = version.manifest.root_hex in in_use
            out.append(item)
        return out

    # --- preheating ------------------------------------------------------------------

    def agent_id(self) -> str:
        """This cache's id with the tracker: made once, kept across restarts."""
        path = self.cache / AGENT_ID
        raw = _read(path)
        if raw is not None and len(raw.strip()) == 32:
            try:
                return bytes.fromhex(raw.strip().decode()).hex()
            except ValueError:
                pass
        ident = os.urandom(16).hex()
        replace_file(path, ident.encode() + b"\n", durable=True)
        return ident

    async def poll(self, interval: float) -> None:
        """Every ``interval`` seconds, tell the tracker what this node holds and start
        fetching what it asks for (``swarm warm``). Runs until cancelled."""
        ident = self.agent_id()
        fetching: set[asyncio.Task[Version | None]] = set()
        while True:
            held = [v for v in self.versions.values() if not v.error]
            try:
                wanted = await self.tracker.agent_poll(
                    ident,
                    sorted(v.manifest.root_hex for v in held),
                    sorted(v.manifest.root_hex for v in held if v.complete),
                )
            except SwarmError as exc:
                log.warning("can't poll the tracker for warm requests: %s", exc)
                wanted = []
            for ref in wanted:
                log.info("warming %s, as the tracker asks", ref)
                task = asyncio.create_task(self._warm(ref), name=f"warm-{ref}")
                fetching.add(task)
                task.add_done_callback(fetching.discard)
            await asyncio.sleep(interval)

    async def _warm(self, ref: str) -> Version | None:
        try:
            version = await self.ensure(ref)
            await self.wait_ready(version)
        except SwarmError as exc:
            log.warning("warming %s failed: %s", ref, exc)
            return None
        await self.evict()
        return version

    # --- index -----------------------------------------------------------------------

    def _read_index(self) -> dict[str, dict[str, Any]]:
        raw = _read(self.cache / INDEX)
        try:
            data = json.loads(raw) if raw else {}
            versions = data.get("versions", {})
            return versions if isinstance(versions, dict) else {}
        except (ValueError, AttributeError):
            log.warning("%s is unreadable; pins and last use start afresh", self.cache / INDEX)
            return {}

    def _write_index(self) -> None:
        data = {
            "versions": {
                root: {"name": v.manifest.name, "pinned": v.pinned, "last_used": v.last_used}
                for root, v in self.versions.items()
            }
        }
        replace_file(self.cache / INDEX, json.dumps(data, indent=1).encode(), durable=True)

    # --- the socket ------------------------------------------------------------------

    async def serve_socket(self, path: Path) -> asyncio.AbstractServer:
        """Answer requests on the Unix socket ``path`` (replacing a stale one, never one
        that another agent still answers on: AgentError)."""
        with contextlib.suppress(FileNotFoundError):
            if path.is_socket():
                try:
                    _, writer = await asyncio.open_unix_connection(str(path))
                except OSError:
                    path.unlink()  # nobody listens: left by an agent that died
                else:
                    writer.close()
                    raise AgentError(f"another agent answers on {path}")
        server = await asyncio.start_unix_server(self._client, path=str(path), limit=MAX_REQUEST)
        os.chmod(path, 0o660)
        return server

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send(obj: dict[str, Any]) -> None:
            writer.write(json.dumps(obj).encode() + b"\n")
            await writer.drain()

        try:
            try:
                line = await asyncio.wait_for(reader.readline(), 10)
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("not an object")
            except (ValueError, TimeoutError, RecursionError, asyncio.LimitOverrunError) as exc:
                await send({"event": "error", "message": f"bad request: {exc}"})
                return
            await self._answer(request, send, reader)
        except (ConnectionError, OSError):
            pass  # the client went away; a fetch it asked for carries on
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer(
        self,
        request: dict[str, Any],
        send: Callable[[dict[str, Any]], Any],
        reader: asyncio.StreamReader,
    ) -> None:
        op = request.get("op")
        ref = request.get("ref")
        try:
            if op == "fetch" and isinstance(ref, str):
                started = time.monotonic()
                version = await self.ensure(ref)
                before = (
                    version.peer.origin.counters.bytes_read,
                    version.peer.session.stats.peer_bytes,
                )

                async def progress(v: Version) -> None:
                    await send(
                        {"event": "progress", "done": v.done_bytes, "total": v.manifest.total_size}
                    )

                version.holds += 1
                try:
                    await self.wait_ready(version, progress)
                    await send(
                        {
                            "event": "done",
                            **version.summary(),
                            "seconds": round(time.monotonic() - started, 3),
                            # What this request moved (0 and 0 when the node had it already).
                            "origin_bytes": version.peer.origin.counters.bytes_read - before[0],
                            "peer_bytes": version.peer.session.stats.peer_bytes - before[1],
                        }
                    )
                    # The client links the files (its lease) and then hangs up; until
                    # then the version is not evicted.
                    with contextlib.suppress(TimeoutError, OSError):
                        await asyncio.wait_for(_until_hangup(reader), LINK_TIMEOUT)
                finally:
                    version.holds -= 1
                await self.evict()
            elif op == "ls":
                used, in_use = await asyncio.to_thread(self.usage, list(self.versions.values()))
                await send({"event": "ls", "versions": self.listing(in_use), "used": used})
            elif op in ("pin", "unpin") and isinstance(ref, str):
                version = self.find(ref)
                before_pin = version.pinned
                version.pinned = op == "pin"
                try:
                    self._write_index()
                except OSError as exc:  # not recorded: not done, and the client is told
                    version.pinned = before_pin
                    raise AgentError(
                        f"can't record the {op} in {self.cache / INDEX}: {exc}"
                    ) from exc
                await send({"event": op, **version.summary()})
            else:
                await send({"event": "error", "message": f"unknown request {request!r:.200}"})
        except SwarmError as exc:
            await send({"event": "error", "message": str(exc)})


async def _until_hangup(reader: asyncio.StreamReader) -> None:
    """Until the client hangs up; whatever it sends meanwhile is read and dropped, never
    kept (a client may send without end)."""
    while await reader.read(MAX_REQUEST):
        pass


def _copy_range(source: Path, offset: int, fd: int, at: int, length: int) -> bool:
    """Copy ``length`` bytes at ``offset`` of ``source`` to ``at`` of ``fd`` (in the
    kernel where it can); False if the source is shorter or unreadable."""
    try:
        src = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        done = 0
        while done < length:
            try:
                n = os.copy_file_range(src, fd, length - done, offset + done, at + done)
            except OSError:
                data = os.pread(src, min(length - done, 1 << 22), offset + done)
                n = os.pwrite(fd, data, at + done) if data else 0
            if n == 0:
                return False
            done += n
        return True
    finally:
        os.close(src)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _file_keys(manifest: Manifest) -> dict[tuple[int, int, int, bytes], FileEntry]:
    """Each file of ``manifest`` by what makes it the same file in another version: its
    size, the piece and block sizes and its pieces' digests."""
    keys: dict[tuple[int, int, int, bytes], FileEntry] = {}
    for entry in manifest.files:
        if entry.size == 0:
            continue
        digests = b"".join(
            manifest.digests[entry.first_piece : entry.first_piece + entry.piece_count]
        )
        keys[(entry.size, manifest.piece_size, manifest.block_size, digests)] = entry
    return keys


# --- the client (swarm fetch with SWARM_AGENT, swarm ls, swarm pin) -------------------------


class AgentConnection:
    """One request to the agent and the lines of its answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer  # kept: a writer that is collected closes the connection

    async def answer(self) -> dict[str, Any]:
        """The next line of the answer; AgentError for an ``error`` line or none at all."""
        return await read_answer(self.reader)

    def close(self) -> None:
        self.writer.close()


async def ask(socket_path: str, request: dict[str, Any]) -> AgentConnection:
    """Send ``request`` to the agent at ``socket_path``."""
    try:
        reader, writer = await asyncio.open_unix_connection(socket_path, limit=1 << 24)
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
    except OSError as exc:
        raise AgentError(f"can't reach the node agent at {socket_path}: {exc}") from exc
    return AgentConnection(reader, writer)


async def read_answer(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        line = await reader.readline()
    except (OSError, ValueError) as exc:
        raise AgentError(f"the node agent's answer could not be read: {exc}") from exc
    if not line:
        raise AgentError("the node agent closed the connection without an answer")
    try:
        answer = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise AgentError(f"the node agent answered {line[:200]!r}") from exc
    if not isinstance(answer, dict):
        raise AgentError(f"the node agent answered {line[:200]!r}")
    if answer.get("event") == "error":
        raise AgentError(str(answer.get("message")))
    return answer


def link_view(source: Path, dest: Path, manifest: Manifest) -> str:
    """Make ``dest`` a view of the cached version at ``source``: hard links to its files
    (copies where the kernel won't link them: ``dest`` on another file system, or a
    caller that doesn't own the cache's files), its manifest, and the completion marker
    last. Returns "linked" or "copied".

    ``dest`` is the pod's: what stands in it is not trusted. A completion marker there
    is withdrawn before anything changes (a view that fails half way must not look
    complete), and no symbolic link inside it is followed (one planted there would
    have files replaced wherever it points). ``dest`` inside the cache is refused:
    linking over the cache's own files destroys them."""
    versions = source.resolve().parent
    where = dest.resolve()
    if where == versions or versions in where.parents:
        raise AgentError(f"{dest} is inside the node's cache {versions.parent}: use another")
    how = "linked"
    dest.mkdir(parents=True, exist_ok=True)
    _make_dirs_inside(dest, Path(STATE_DIR))
    remove_complete_marker(dest)
    for entry in manifest.files:
        target = dest / entry.path
        _make_dirs_inside(dest, Path(entry.path).parent)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
        try:
            os.link(source / entry.path, target)
        except OSError as exc:
            # Copied instead where the kernel won't link: another file system, a caller
            # that doesn't own the cache's files (fs.protected_hardlinks), too many links.
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            shutil.copyfile(source / entry.path, target)
            how = "copied"
    replace_file(manifest_path(dest, manifest.root_hex), manifest.encode(), durable=False)
    marker = read_complete_marker(source) or {"root": manifest.root_hex, "name": manifest.name}
    replace_file(dest / COMPLETE_MARKER, json.dumps(marker).encode(), durable=True)
    return how


def _make_dirs_inside(dest: Path, rel: Path) -> None:
    """Create the directories ``rel`` names inside ``dest``, one component at a time,
    refusing any that is a symbolic link (StoreError)."""
    path = dest
    for part in rel.parts:
        path = path / part
        check_not_link(path)
        with contextlib.suppress(FileExistsError):
            path.mkdir()
        check_not_link(path)  # what stood there all along, or was put there meanwhile
