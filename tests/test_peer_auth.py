"""The peer wire protocol's cluster token, with real peers on loopback.

Each test publishes a small artifact into a ``file://`` catalog, runs an
in-process tracker (``tracker.service.Tracker``) on 127.0.0.1 and real
``SwarmPeer`` instances, and talks to them over real sockets:

- a stranger (a raw socket) is sent a Hello and nothing else; garbage, a wrong
  proof, a version-1 handshake or an oversized frame gets it dropped, logged and
  counted;
- peers holding different tokens (or a token and none) never exchange a byte,
  and both count the refusals; peers with the same token swarm normally;
- a connection that says nothing, or stops mid-handshake, is closed at the
  handshake deadline; past ``max_pending_conns`` new ones are closed at once;
- one bad connection costs only itself: the peer goes on serving honest peers;
- the peer keeps at most ``open_files`` idle files open for uploads;
- running out of descriptors pauses accepting, and accepting resumes.

A peer that must stay up while a test talks to it reads the origin through a
gated relay (``ByteCountingRelay``): its origin pulls wait until the test opens
the gate. Every wait is bounded; each test is bounded by ``TEST_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import resource
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aio_helpers import run_bounded, wait_until
from servers import HTTPFileServer, free_port, populate
from swarm_helpers import ByteCountingRelay

from core.auth import ClusterKey, new_nonce
from core.manifest import Manifest
from seeder.publish import publish
from swarm.announce import TrackerClient
from swarm.fetch import FetchResult
from swarm.peer import PeerConfig, SwarmPeer, _OpenFiles
from swarm.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    BitfieldMsg,
    FrameDecoder,
    Handshake,
    Hello,
    Message,
    PeerHandshake,
    encode,
)
from tracker.config import TrackerConfig
from tracker.service import Tracker

PIECE = 64 * 1024
NAME = "auth-llm"
TEST_TIMEOUT = 60.0
WAIT = 15.0  # bound of any one wait for something that should happen soon
HANDSHAKE_TIMEOUT = 1.0

KEY = ClusterKey(b"test-cluster-token-0123456789")
OTHER_KEY = ClusterKey(b"another-cluster-token-0123456789")
OPEN = ClusterKey(None)


def make_files(count: int = 3, seed: int = 5) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {"config.json": b'{"layers": 2}\n'}
    for i in range(count):
        files[f"weights/shard-{i:03d}.bin"] = rng.randbytes(2 * PIECE + 1000 * i + 17)
    return files


@dataclass
class Cluster:
    """A published artifact and a tracker for it; peers started in it are closed by ``close``."""

    tmp: Path
    files: dict[str, bytes]
    manifest: Manifest
    tracker_url: str
    www: HTTPFileServer
    relays: list[ByteCountingRelay] = field(default_factory=list)
    clients: list[TrackerClient] = field(default_factory=list)
    runs: list[asyncio.Task[FetchResult]] = field(default_factory=list)

    def gated_origin(self) -> tuple[str, ByteCountingRelay]:
        """An origin URL whose reads wait until the relay's gate is opened."""
        relay = ByteCountingRelay(self.www.endpoint, gated=True)
        relay.start()
        self.relays.append(relay)
        return f"{relay.endpoint}/model", relay

    def start_peer(
        self, name: str, key: ClusterKey, **overrides: Any
    ) -> tuple[SwarmPeer, asyncio.Task[FetchResult]]:
        settings: dict[str, Any] = {
            "listen_host": "127.0.0.1",
            "advertise_host": "127.0.0.1",
            "linger": 5.0,
            "tracker_timeout": 20.0,
            "durable": False,
            "direct_io": False,  # uploads go through the sendfile path and its file cache
            "handshake_timeout": HANDSHAKE_TIMEOUT,
            "key": key,
        }
        settings.update(overrides)
        client = TrackerClient(self.tracker_url)
        self.clients.append(client)
        peer = SwarmPeer(
            self.manifest,
            self.tmp / name,
            client,
            config=PeerConfig(**settings),
            rng=random.Random(f"{name}-{len(self.runs)}"),  # a new peer id per start
        )
        run = asyncio.create_task(peer.run(), name=f"peer-{name}")
        self.runs.append(run)
        return peer, run

    async def close(self) -> None:
        while _strangers:
            await _strangers.pop().close()
        for run in self.runs:
            run.cancel()
        await asyncio.gather(*self.runs, return_exceptions=True)
        for client in self.clients:
            await client.close()
        for relay in self.relays:
            relay.stop()

    def check_copy(self, name: str) -> None:
        for rel, data in self.files.items():
            assert (self.tmp / name / rel).read_bytes() == data, f"{name}: {rel} differs"


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path, files: dict[str, bytes] | None = None, *, restart_grace: float = 0.0
) -> AsyncIterator[Cluster]:
    files = files or make_files()
    populate(tmp_path / "www" / "model", files)
    catalog = (tmp_path / "catalog").as_uri()
    manifest = await publish((tmp_path / "www" / "model").as_uri(), NAME, catalog, piece_size=PIECE)
    config = TrackerConfig(
        host="127.0.0.1",
        port=free_port(),
        catalog=catalog,
        announce_interval=0.2,
        peer_ttl=5.0,
        stall_timeout=5.0,
        restart_grace=restart_grace,
    )
    tracker = Tracker(config, rng=random.Random(1))
    await tracker.start()
    www = HTTPFileServer(tmp_path / "www")
    www.start()
    state = Cluster(tmp_path, files, manifest, f"http://127.0.0.1:{config.port}", www)
    try:
        yield state
    finally:
        await state.close()
        await tracker.close()
        www.stop()


def run_test(body: Callable[[], Awaitable[None]]) -> None:
    run_bounded(body, TEST_TIMEOUT)


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    await wait_until(predicate, what, timeout)


async def listening(peer: SwarmPeer) -> int:
    await wait_for(lambda: peer.listen_port != 0, "the peer to listen")
    return peer.listen_port


_strangers: list[Stranger] = []  # closed when the test's cluster closes


class Stranger:
    """A raw loopback connection to a peer, decoding what the peer sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.received = b""
        self.local_port = int(writer.get_extra_info("sockname")[1])

    @classmethod
    async def connect(cls, port: int, sock: socket.socket | None = None) -> Stranger:
        if sock is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        else:
            reader, writer = await asyncio.open_connection(sock=sock)
        stranger = cls(reader, writer)
        _strangers.append(stranger)
        return stranger

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def next_message(self) -> Message:
        for _ in range(1000):
            event = self.decoder.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, Hello | Handshake | BitfieldMsg), event
                return event
            data = await asyncio.wait_for(self.reader.read(65536), WAIT)
            assert data, "the peer closed the connection"
            self.received += data
            self.decoder.feed(data)
        raise AssertionError("no message in 1000 reads")

    async def closed_by_peer(self) -> bytes:
        """Wait until the peer closes the connection; the bytes it sent meanwhile."""
        got = b""
        for _ in range(1000):
            try:
                data = await asyncio.wait_for(self.reader.read(65536), WAIT)
            except ConnectionResetError:
                return got
            if not data:
                return got
            got += data
        raise AssertionError("the peer kept sending")

    async def quiet_for(self, seconds: float) -> bytes:
        """What the peer sends within ``seconds`` (nothing, for a silent peer)."""
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(self.reader.read(65536), seconds)
        return b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def auth_warnings(caplog: pytest.LogCaptureFixture, stranger: Stranger) -> list[str]:
    """Peer warnings that name this stranger's address."""
    where = f"127.0.0.1:{stranger.local_port}"
    return [
        r.getMessage()
        for r in caplog.records
        if r.name in ("swarm.peer", "swarm.session")
        and r.levelno == logging.WARNING
        and where in r.getMessage()
    ]


# --------------------------------------------------------------------------------------
# strangers
# --------------------------------------------------------------------------------------


def test_a_stranger_is_sent_only_a_hello_and_dropped_for_a_wrong_proof(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swarm.peer")

    async def body() -> None:
        async with cluster(tmp_path) as c:
            origin, relay = c.gated_origin()
            peer, run = c.start_peer("a", KEY, origin_url=origin)
            port = await listening(peer)
            root, peer_id = c.manifest.root, peer.peer_id

            # Connected but silent: the peer says nothing at all.
            silent = await Stranger.connect(port)
            assert await silent.quiet_for(0.3) == b""

            # Our Hello: the answer is a Hello with a proof, and nothing more.
            stranger = await Stranger.connect(port)
            await stranger.send(encode(Hello(PROTOCOL_VERSION, new_nonce())))
            hello = await stranger.next_message()
            assert isinstance(hello, Hello) and hello.proof != bytes(32)
            assert await stranger.quiet_for(0.3) == b""
            assert len(stranger.received) == 59  # one frame: 5-byte header, 54-byte body
            assert root not in stranger.received and peer_id not in stranger.received
            # A Handshake that proves another token: dropped, logged, counted.
            fake = Handshake(root, b"s" * 20, 1, OTHER_KEY.mac(b"peer-dial", b"x"))
            await stranger.send(encode(fake))
            assert await stranger.closed_by_peer() == b""
            await wait_for(
                lambda: peer.session.stats.auth_failures == 1, "the failure to be counted"
            )
            [line] = auth_warnings(caplog, stranger)
            assert "does not prove our cluster token" in line

            # Garbage instead of a Hello (an HTTP request): dropped, counted.
            garbage = await Stranger.connect(port)
            await garbage.send(b"GET /v1/swarms HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await garbage.closed_by_peer() == b""
            await wait_for(
                lambda: peer.session.stats.auth_failures == 2, "the garbage to be counted"
            )
            [line] = auth_warnings(caplog, garbage)
            assert "exceeds the limit" in line

            # A version-1 peer's first frame: refused as the wrong version.
            old = await Stranger.connect(port)
            v1 = struct.pack("!4sH32s20sH", b"SWRM", 1, root, b"o" * 20, 7000)
            await old.send(struct.pack("!IB", 1 + len(v1), 0) + v1)
            assert await old.closed_by_peer() == b""
            await wait_for(
                lambda: peer.session.stats.auth_failures == 3, "the old version to be counted"
            )
            [line] = auth_warnings(caplog, old)
            assert f"protocol version 1, we speak {PROTOCOL_VERSION}" in line

            # A frame other than the handshake after the hello.
            eager = await Stranger.connect(port)
            await eager.send(
                encode(Hello(PROTOCOL_VERSION, new_nonce())) + encode(BitfieldMsg(b"\xff"))
            )
            assert isinstance(await eager.next_message(), Hello)
            assert await eager.closed_by_peer() == b""
            await wait_for(
                lambda: peer.session.stats.auth_failures == 4, "the early bitfield to be counted"
            )

            relay.open_gate()
            result = await asyncio.wait_for(run, WAIT)
            assert result.verified
            assert result.extra["auth_failures"] == 4
            c.check_copy("a")

    run_test(body)


def test_silent_and_stalled_connections_are_closed_at_the_handshake_deadline(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swarm.peer")

    async def body() -> None:
        async with cluster(tmp_path) as c:
            origin, relay = c.gated_origin()
            peer, run = c.start_peer("a", KEY, origin_url=origin)
            port = await listening(peer)
            silent = await Stranger.connect(port)
            stalled = await Stranger.connect(port)
            await stalled.send(encode(Hello(PROTOCOL_VERSION, new_nonce())))
            assert isinstance(await stalled.next_message(), Hello)
            # Both are closed by the peer (each read is bounded by WAIT).
            assert await silent.closed_by_peer() == b""
            assert await stalled.closed_by_peer() == b""
            await wait_for(
                lambda: peer.session.stats.handshake_timeouts == 2, "both timeouts to be counted"
            )
            for s in (silent, stalled):
                assert "no handshake within" in auth_warnings(caplog, s)[0]
            assert peer.session.stats.auth_failures == 0
            relay.open_gate()
            result = await asyncio.wait_for(run, WAIT)
            assert result.extra["handshake_timeouts"] == 2

    run_test(body)


def test_pending_connections_are_bounded(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as c:
            origin, relay = c.gated_origin()
            peer, run = c.start_peer(
                "a", KEY, origin_url=origin, max_pending_conns=3, handshake_timeout=30.0
            )
            port = await listening(peer)
            waiting = [await Stranger.connect(port) for _ in range(3)]
            await wait_for(lambda: peer.session.pending == 3, "three pending connections")
            extra = [await Stranger.connect(port) for _ in range(2)]
            for s in extra:
                assert await s.closed_by_peer() == b""
            assert peer.session.stats.pending_refused == 2
            # The first three are still open and are answered once they speak.
            for s in waiting:
                await s.send(encode(Hello(PROTOCOL_VERSION, new_nonce())))
                assert isinstance(await s.next_message(), Hello)
            relay.open_gate()
            result = await asyncio.wait_for(run, WAIT)
            assert result.verified and result.extra["pending_refused"] == 2

    run_test(body)


# --------------------------------------------------------------------------------------
# peers
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_a", "key_b"), [(KEY, OTHER_KEY), (KEY, OPEN)], ids=["two-tokens", "token-and-open"]
)
def test_peers_with_different_tokens_never_exchange_data(
    tmp_path: Path, key_a: ClusterKey, key_b: ClusterKey
) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as c:
            a, run_a = c.start_peer("a", key_a)
            b, run_b = c.start_peer("b", key_b)
            # Each has pieces only the other has (the tracker spreads origin pulls),
            # so neither can finish; both keep trying, and keep refusing.
            await wait_for(
                lambda: a.session.stats.auth_failures >= 2 and b.session.stats.auth_failures >= 2,
                "both peers to count refused connections",
            )
            await wait_for(
                lambda: (
                    a.session.stats.origin_pieces + b.session.stats.origin_pieces
                    == c.manifest.num_pieces
                ),
                "the origin pulls to finish",
            )
            assert not run_a.done() and not run_b.done()
            assert (
                a.session.stats.peer_bytes,
                a.session.stats.uploaded_bytes,
                b.session.stats.peer_bytes,
                b.session.stats.uploaded_bytes,
            ) == (0, 0, 0, 0)
            assert not a.session.peers and not b.session.peers

    run_test(body)


def test_peers_with_the_same_token_swarm(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path, make_files(count=6)) as c:
            _, run_a = c.start_peer("a", KEY)
            _, run_b = c.start_peer("b", KEY)
            results = await asyncio.wait_for(asyncio.gather(run_a, run_b), TEST_TIMEOUT / 2)
            for name, result in zip("ab", results, strict=True):
                assert result.verified
                assert result.extra["auth_failures"] == 0
                assert result.extra["handshake_timeouts"] == 0
                assert result.peer_bytes + result.origin_bytes == c.manifest.total_size
                c.check_copy(name)
            assert sum(r.peer_bytes for r in results) > 0

    run_test(body)


def test_open_peers_swarm(tmp_path: Path) -> None:
    async def body() -> None:
        async with cluster(tmp_path) as c:
            _, run_a = c.start_peer("a", OPEN)
            _, run_b = c.start_peer("b", OPEN)
            results = await asyncio.wait_for(asyncio.gather(run_a, run_b), TEST_TIMEOUT / 2)
            assert all(r.verified and r.extra["auth_failures"] == 0 for r in results)
            assert sum(r.peer_bytes for r in results) > 0

    run_test(body)


async def proven_stranger(port: int, root: bytes, key: ClusterKey) -> Stranger:
    """A raw connection that completes the handshake with ``key``, as a dialer would."""
    stranger = await Stranger.connect(port)
    flow = PeerHandshake(
        key, dialer=True, root=root, peer_id=os.urandom(20), listen_port=0, nonce=new_nonce()
    )
    await stranger.send(b"".join(encode(m) for m in flow.start()))
    hello = await stranger.next_message()
    assert isinstance(hello, Hello)
    await stranger.send(b"".join(encode(m) for m in flow.receive(hello)))
    handshake = await stranger.next_message()
    assert isinstance(handshake, Handshake)
    assert flow.receive(handshake) == [] and flow.done
    assert isinstance(await stranger.next_message(), BitfieldMsg)
    return stranger


def test_garbage_and_oversized_frames_drop_only_that_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swarm.peer")

    async def body() -> None:
        async with cluster(tmp_path) as c:
            origin, relay = c.gated_origin()
            a, run_a = c.start_peer("a", KEY, origin_url=origin)
            port = await listening(a)
            root = c.manifest.root
            # Before the handshake: an oversized frame length, and random bytes.
            big = await Stranger.connect(port)
            await big.send(struct.pack("!IB", 0x7FFF_FFFF, 0) + b"x" * 100)
            noise = await Stranger.connect(port)
            await noise.send(random.Random(3).randbytes(4096))
            # After a proven handshake: an oversized frame, and an unknown frame type.
            proven_big = await proven_stranger(port, root, KEY)
            await proven_big.send(struct.pack("!IB", 0x7FFF_FFFF, 2))
            proven_noise = await proven_stranger(port, root, KEY)
            await proven_noise.send(b"\x00\x00\x00\x01\x63")
            for s in (big, noise, proven_big, proven_noise):
                await s.closed_by_peer()
            # One that stays open with half a frame sent, while an honest peer swarms.
            half = await proven_stranger(port, root, KEY)
            await half.send(b"\x00\x00\x00")
            await wait_for(
                lambda: a.session.stats.auth_failures == 2, "the two strangers to be counted"
            )
            await wait_for(
                lambda: len(a.session.peers) == 1, "only the half-frame stranger to remain"
            )
            relay.open_gate()
            _, run_b = c.start_peer("b", KEY)
            result_a, result_b = await asyncio.wait_for(
                asyncio.gather(run_a, run_b), TEST_TIMEOUT / 2
            )
            assert result_a.verified and result_b.verified
            assert result_a.peer_bytes + result_b.peer_bytes > 0
            # The proven ones are protocol errors, not authentication failures.
            assert result_a.extra["auth_failures"] == 2, caplog.text
            c.check_copy("a")
            c.check_copy("b")

    run_test(body)


# --------------------------------------------------------------------------------------
# descriptors
# --------------------------------------------------------------------------------------


def test_open_files_are_bounded_and_never_closed_in_use(tmp_path: Path) -> None:
    paths = {i: tmp_path / f"{i}.bin" for i in range(6)}
    for i, path in paths.items():
        path.write_bytes(bytes([i]) * 10)
    files = _OpenFiles(paths.__getitem__, 2)
    try:
        seen = []
        for i in range(3):
            with files.lease(i) as f:
                seen.append(f)
        assert len(files) == 2 and [f.closed for f in seen] == [True, False, False]
        with files.lease(1) as f1, files.lease(3), files.lease(4):
            assert len(files) == 4  # every one in use, and the idle 2: nothing to close yet
            with files.lease(5) as f5:
                assert f5.read() == bytes([5]) * 10
            # 2 and 5 were idle and closed; 1, 3, 4 are in use and stay open
            assert len(files) == 3 and not f1.closed and f1.read() == bytes([1]) * 10
        assert len(files) == 2
    finally:
        files.close()
    assert len(files) == 0 and f1.closed


def test_peers_trade_an_artifact_of_many_files_with_few_open(tmp_path: Path) -> None:
    files = {f"shards/{i:03d}.bin": random.Random(i).randbytes(3000 + i) for i in range(40)}

    async def body() -> None:
        # Both are known before the tracker assigns anything (its start-up grace):
        # a peer alone pulls back to back, and 40 files of 3 KB would all be its.
        async with cluster(tmp_path, files, restart_grace=1.0) as c:
            # The tracker splits the origin pulls between the two, so each uploads
            # about half of the 40 files to the other through a cache of 4.
            _, run_a = c.start_peer("a", KEY, open_files=4)
            _, run_b = c.start_peer("b", KEY, open_files=4)
            results = await asyncio.wait_for(asyncio.gather(run_a, run_b), TEST_TIMEOUT / 2)
            for name, result in zip("ab", results, strict=True):
                assert result.verified
                assert result.extra["uploaded_bytes"] > 5 * 3000, result.extra
                c.check_copy(name)

    run_test(body)


def test_running_out_of_descriptors_pauses_accepting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swarm.peer")

    async def body() -> None:
        async with cluster(tmp_path) as c:
            origin, relay = c.gated_origin()
            peer, run = c.start_peer("a", KEY, origin_url=origin)
            port = await listening(peer)
            loop = asyncio.get_running_loop()
            clients = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            fillers: list[int] = []
            highest = max(int(n) for n in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 16, hard))
            try:
                for _ in range(highest + 16):  # take every descriptor left under the limit
                    try:
                        fillers.append(os.open(os.devnull, os.O_RDONLY))
                    except OSError:
                        break
                assert fillers, "no descriptor was free to take"
                for client in clients:
                    client.setblocking(False)
                    await loop.sock_connect(client, ("127.0.0.1", port))
                await wait_for(
                    lambda: "can't accept peer connections" in caplog.text,
                    "the peer to hit the descriptor limit",
                )
            finally:
                for fd in fillers:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            # Accepting resumed: both waiting connections are answered.
            for client in clients:
                stranger = await Stranger.connect(port, client)
                await stranger.send(encode(Hello(PROTOCOL_VERSION, new_nonce())))
                assert isinstance(await stranger.next_message(), Hello)
            relay.open_gate()
            assert (await asyncio.wait_for(run, WAIT)).verified

    run_test(body)
