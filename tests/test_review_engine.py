"""Review of the peer engine (PeerSession and its asyncio driver): defects, each a test.

Every test here states what should happen; each fails until its defect is fixed.
Session tests drive :class:`swarm.session.PeerSession` by events alone
(``tests/session_helpers.py``); the driver tests build a :class:`swarm.peer.SwarmPeer`
in-process and touch only loopback sockets, each bounded by ``TEST_TIMEOUT``.
Artifacts are pieces of 32 bytes in blocks of 16 unless a test says otherwise.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any

from aio_helpers import run_bounded, wait_until
from session_helpers import Harness, Remote, make_session, pid

from core.digest import PEER_ID_LENGTH, digest
from core.manifest import Manifest
from swarm.announce import TrackerClient
from swarm.peer import PeerConfig, SwarmPeer, _Conn
from swarm.picker import BlockRequest
from swarm.protocol import BitfieldMsg, Have, KeepAlive, Reject, Request
from swarm.session import (
    Action,
    BlockStored,
    Close,
    Closed,
    Dial,
    PieceFailed,
    PieceVerified,
    PullDone,
    PullFailed,
    Received,
    SessionConfig,
    StartPull,
    StoreBlock,
    TrackerReplied,
    Verify,
)

BLOCK = 16
PIECE = 2 * BLOCK
ME = pid(50)
TEST_TIMEOUT = 20.0


def harness(num_pieces: int = 8, *, have: Iterable[int] = (), **config: Any) -> Harness:
    config.setdefault("block_size", BLOCK)
    return Harness(make_session([PIECE] * num_pieces, peer_id=ME, have=have, **config))


def closes_of(actions: list[Action], conn: int) -> list[Close]:
    return [a for a in actions if isinstance(a, Close) and a.conn == conn]


def verifies(actions: list[Action]) -> list[int]:
    return [a.piece for a in actions if isinstance(a, Verify)]


def deliver(
    h: Harness, remote: Remote, block: BlockRequest, *, written: bool = True
) -> list[Action]:
    """``remote`` sends ``block``; the driver's store reports it ``written`` (False: it
    found the block on disk already, as ``PieceStore.write_block`` does)."""
    out = h.start_block(remote, block)
    out += h.finish_block(remote)
    for action in list(out):
        if isinstance(action, StoreBlock):
            out += h.feed(BlockStored(action.conn, action.block, written=written))
    return out


def stay_alive_until(h: Harness, remotes: list[Remote], end: float) -> list[Action]:
    """Tick to ``end`` with every remote sending keepalives (alive, just idle)."""
    out: list[Action] = []
    while h.now < end:
        h.now += 5.0
        for remote in remotes:
            h.feed(Received(remote.conn, KeepAlive()))
        out += h.tick(h.now)
    return out


# -- 1. a block "already on disk" is never counted: the piece hangs -----------------


def test_a_block_the_store_already_holds_still_completes_its_piece() -> None:
    """A's block 0 of piece 1 is written, A leaves; the tracker assigns piece 1 to us
    (the reservation drops the picker's partial, the store keeps its assembly), then
    takes it back when B, complete, joins (the driver feeds PullFailed once cancelled).
    B's block 0 is "on disk already" (written=False): the session never marks it
    received, so piece 1 never completes and nobody is asked for that block again."""
    h = harness(num_pieces=2, have=[0], requests_per_peer=2)
    a = h.connect(pid(1), bitfield=[1])
    first = BlockRequest(1, 0, BLOCK)
    assert first in a.outstanding
    deliver(h, a, first)
    h.feed(Closed(a.conn, "connection reset"))
    assert StartPull(1) in h.feed(TrackerReplied(assigned=[1]))
    h.feed(TrackerReplied(assigned=[]))  # taken back: a complete peer joined
    h.feed(PullFailed(1))  # the driver's task, cancelled

    b = h.connect(pid(2), bitfield=[1])
    assert sorted(b.outstanding) == [first, BlockRequest(1, BLOCK, BLOCK)]
    actions = deliver(h, b, first, written=False)  # A's copy is on disk for this attempt
    actions += deliver(h, b, BlockRequest(1, BLOCK, BLOCK))
    actions += stay_alive_until(h, [b], 200.0)
    assert verifies(actions) == [1], "piece 1 is whole on disk but never verified: the fetch hangs"


def test_a_piece_written_by_a_cancelled_pull_is_not_lost() -> None:
    """The tracker takes back piece 3 just as ``write_piece`` finished in its thread: the
    driver's task sees CancelledError and feeds PullFailed, though the store has the piece
    verified. Every block a peer then sends is "on disk already" (written=False)."""
    h = harness(num_pieces=4, have=[0, 1, 2])
    h.feed(TrackerReplied(assigned=[3]))
    peer = h.connect(pid(1), bitfield=range(4))
    h.feed(TrackerReplied(assigned=[]))
    h.feed(PullFailed(3))
    actions: list[Action] = []
    for block in sorted(peer.outstanding):
        actions += deliver(h, peer, block, written=False)
    actions += stay_alive_until(h, [peer], 200.0)
    assert verifies(actions) == [3] or h.session.complete, (
        "every block of piece 3 is on disk, yet it is neither verified nor asked again"
    )


def test_pull_done_after_a_take_back_counts_the_piece() -> None:
    """PullDone says "written and verified"; after a take-back it is dropped unheard."""
    h = harness(num_pieces=4, have=[0, 1, 2])
    h.feed(TrackerReplied(assigned=[3]))
    h.feed(TrackerReplied(assigned=[]))
    h.feed(PullDone(3))  # the cancel came too late: the piece is on disk, verified
    assert h.session.has(3) and h.session.complete


# -- 2. a Reject is re-requested of the same connection at once, forever ------------


def test_a_rejected_block_is_not_asked_again_of_the_peer_that_rejected_it() -> None:
    h = harness(num_pieces=1, requests_per_peer=1)
    rejecter = h.connect(pid(1), bitfield=[0])
    (block,) = rejecter.outstanding
    for _ in range(50):  # each Reject arrives one round trip after its Request
        h.now += 0.001
        h.feed(Received(rejecter.conn, Reject(*block)))
        if rejecter.closed:
            break
    asked = rejecter.requests().count(block)
    assert asked <= 2, f"the rejecting peer was asked for {block} {asked} times in 50 ms"


# -- 3. blame: a barred liar's old failures bar an honest peer ----------------------


def test_failures_already_explained_by_a_barred_peer_do_not_bar_an_honest_one() -> None:
    """L corrupts piece 0 (with honest H1) and piece 1 (with honest H2): L is barred.
    Then piece 2 fails with H1 and X (another liar): the stale set {L, H1} shares only
    H1 with {H1, X}, so H1, honest, is barred and reported, and X is not."""
    h = harness(num_pieces=3, requests_per_peer=1)
    liar, h1 = h.connect(pid(1), bitfield=[0]), h.connect(pid(2), bitfield=[0])
    for remote in (liar, h1):
        (block,) = remote.outstanding
        actions = deliver(h, remote, block)
    assert verifies(actions) == [0]
    h.feed(PieceFailed(0))
    for remote in (liar, h1):  # piece 0 again, from the same two: good this time
        (block,) = remote.outstanding
        actions = deliver(h, remote, block)
    assert verifies(actions) == [0]
    h.feed(PieceVerified(0))

    h.feed(Received(liar.conn, Have(1)))
    h2 = h.connect(pid(3), bitfield=[1])
    for remote in (liar, h2):
        (block,) = remote.outstanding
        assert block.piece == 1
        actions = deliver(h, remote, block)
    assert verifies(actions) == [1]
    h.feed(PieceFailed(1))
    assert h.session.barred == {pid(1)}

    h.feed(Received(h1.conn, Have(2)))
    x = h.connect(pid(4), bitfield=[2])
    for remote in (h1, x):
        (block,) = remote.outstanding
        assert block.piece == 2
        actions = deliver(h, remote, block)
    assert verifies(actions) == [2]
    h.feed(PieceFailed(2))
    assert pid(2) not in h.session.barred, "honest H1 barred for a failure L explained"


# -- 4. an upload's deadline ignores its length --------------------------------------


def test_an_upload_gets_the_time_a_receive_of_the_same_block_gets() -> None:
    """A receive of a block may take request_timeout + length / MIN_BLOCK_RATE; an upload
    only request_timeout, whatever its length (or the operator's --max-upload-rate)."""
    big = 16 << 20  # MAX_BLOCK
    h = Harness(make_session([big], peer_id=ME, have=[0], block_size=big, request_timeout=30.0))
    reader = h.connect(pid(1), bitfield=[])
    h.feed(Received(reader.conn, Request(0, 0, big)))
    assert reader.uploads == [Request(0, 0, big)]
    h.now = 40.0  # 16 MiB at 0.4 MiB/s: within the 46 s we would give it to arrive
    h.feed(Received(reader.conn, KeepAlive()))
    assert not closes_of(h.tick(40.0), reader.conn)


# -- 5. hostile or malformed input ----------------------------------------------------


def test_a_bad_bitfield_closes_the_connection_instead_of_raising() -> None:
    """Like a HAVE outside the artifact: a Close, not an exception out of handle()
    (the driver's FrameDecoder checks it first; the simulator's wire does not)."""
    h = harness(num_pieces=4)
    remote = h.connect(pid(1), bitfield=None)
    try:
        actions = h.feed(Received(remote.conn, BitfieldMsg(b"\xff\xff\xff")))
    except Exception as exc:
        raise AssertionError(f"handle() raised {exc!r} on a peer's bad bitfield") from exc
    assert closes_of(actions, remote.conn)


def test_a_tracker_reply_with_a_port_out_of_range_is_not_dialed() -> None:
    """The host is checked (valid_host), the port is not: Dial(port=70000) reaches the
    driver, whose sock_connect raises OverflowError, which _dial does not catch, so the
    dial task's failure ends the whole peer (SwarmPeer._fail)."""
    h = harness()
    actions = h.feed(TrackerReplied(peers=[(pid(1), "127.0.0.1", 70000), (pid(2), "127.0.0.1", 0)]))
    assert [a for a in actions if isinstance(a, Dial)] == []


# -- 6. state that grows without bound --------------------------------------------------


def test_redial_backoff_is_not_kept_forever_for_peers_we_never_dial() -> None:
    """Every inbound peer closed by a rule gets a _retry_at entry; only admission
    removes one, so a stream of short-lived peers (fresh ids) grows it without bound."""
    h = harness()
    for n in range(300):
        remote = h.connect(n.to_bytes(PEER_ID_LENGTH, "big"), bitfield=[])
        h.start_block(remote, BlockRequest(0, 0, BLOCK))  # unrequested: closed by our rule
        assert remote.closed
    h.tick(1000.0)  # past the longest backoff
    assert len(h.session._retry_at) < 300, "one entry per peer ever closed, never pruned"


# -- 7. configuration --------------------------------------------------------------------


def test_every_session_setting_reaches_the_session_from_peer_config() -> None:
    """SessionConfig says every setting is reachable from ``swarm fetch``; PeerConfig
    (and so the CLI) has no max_peers, endgame_duplicates or max_upload_queue."""
    session_fields = {f.name for f in fields(SessionConfig)}
    peer_fields = {f.name for f in fields(PeerConfig)}
    assert session_fields - peer_fields == set()


# -- 8. the driver ------------------------------------------------------------------------


def _peer(tmp_path: Path, **config: Any) -> tuple[SwarmPeer, TrackerClient]:
    data = random.Random(3).randbytes(3 * 1024)
    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / "w.bin").write_bytes(data)
    digests = [digest(data[o : o + n]) for _, o, n in Manifest.layout([("w.bin", len(data))], 1024)]
    manifest = Manifest.build(
        name="review",
        origin=origin.as_uri(),
        piece_size=1024,
        files=[("w.bin", len(data))],
        digests=digests,
    )
    tracker = TrackerClient("http://127.0.0.1:9")  # never called
    settings: dict[str, Any] = {"listen_host": "127.0.0.1", "durable": False, "direct_io": False}
    settings.update(config)
    peer = SwarmPeer(
        manifest, tmp_path / "dest", tracker, config=PeerConfig(**settings), rng=random.Random(1)
    )
    return peer, tracker


def _run(tmp_path: Path, body: Callable[[SwarmPeer], Awaitable[None]], **config: Any) -> None:
    async def main() -> None:
        peer, tracker = _peer(tmp_path, **config)
        try:
            await body(peer)
        finally:
            await peer._shutdown()
            await tracker.close()

    run_bounded(main, TEST_TIMEOUT)


def test_an_upload_buffer_comes_back_when_the_block_header_cannot_be_sent(
    tmp_path: Path,
) -> None:
    """_send_block releases its pool buffer only once the header is out: a peer that
    resets (or a close that cancels the writer) while the header waits leaks it. After
    ``upload_slots`` such sends, _load_block waits forever: the peer serves no one."""

    async def body(peer: SwarmPeer) -> None:
        loop = asyncio.get_running_loop()
        buf = await peer._upload_pool.acquire()
        ours, theirs = socket.socketpair()
        theirs.close()  # the downloader went away
        ours.setblocking(False)
        conn = _Conn(1, ours, ("127.0.0.1", 1), outbound=False)
        try:
            await peer._send_block(loop, conn, Request(0, 0, 1024), buf)
        except OSError:
            pass  # the send fails; what matters is the buffer
        finally:
            ours.close()
        try:
            again = await asyncio.wait_for(peer._upload_pool.acquire(), 2.0)
        except TimeoutError:
            raise AssertionError(
                "the only upload buffer leaked: no block is ever sent again"
            ) from None
        peer._upload_pool.release(again)

    _run(tmp_path, body, upload_slots=1)


def test_concurrent_dials_stay_within_the_connection_limit(tmp_path: Path) -> None:
    """_dial checks len(conns) before its await, so every dial of one tracker reply
    passes the check and opens its socket: up to max_peers (50) over the limit that
    is meant to keep descriptors for the store."""
    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(6)]

    async def body(peer: SwarmPeer) -> None:
        peer.max_conns = 2  # as connection_limit() gives for a small RLIMIT_NOFILE
        peers = [(pid(10 + i), "127.0.0.1", s.getsockname()[1]) for i, s in enumerate(listeners)]
        peer._feed(TrackerReplied(peers=peers))
        await wait_until(lambda: not peer.session.dialing, "the dials to end", 10.0)
        assert len(peer.conns) <= peer.max_conns, f"{len(peer.conns)} connections, limit 2"

    try:
        _run(tmp_path, body)
    finally:
        for s in listeners:
            s.close()


def test_a_bad_port_in_a_tracker_reply_does_not_end_the_peer(tmp_path: Path) -> None:
    """The driver's side of the port check: _dial catches OSError, TimeoutError and
    ValueError; sock_connect raises OverflowError for port 70000, the dial task fails
    and _task_done makes that the peer's fatal error."""

    async def body(peer: SwarmPeer) -> None:
        peer._feed(TrackerReplied(peers=[(pid(1), "127.0.0.1", 70000)]))
        await wait_until(
            lambda: not peer.session.dialing or peer._fatal is not None, "the dial", 5.0
        )
        assert peer._fatal is None, f"one bad tracker entry ended the peer: {peer._fatal!r}"

    _run(tmp_path, body)
