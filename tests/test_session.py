"""PeerSession rules, driven by events alone with a fake clock (no sockets, no time).

Artifacts are small: pieces of 32 bytes in blocks of 16 unless a test says otherwise,
so a piece is two blocks and every block request can be named. ``Harness`` (in
``tests/session_helpers.py``) puts fake remotes, running the real connect flow, at
the other end of each connection; ``Wire`` connects two real sessions.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any, TypeVar

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from session_helpers import (
    OPEN,
    OTHER_TOKEN,
    ROOT,
    TOKEN,
    Harness,
    Remote,
    Wire,
    block_of,
    make_session,
    pid,
)

from core.auth import ClusterKey
from core.bitfield import Bitfield
from swarm.picker import BlockRequest
from swarm.protocol import (
    MIN_PARTIAL_BLOCK,
    PROTOCOL_VERSION,
    BitfieldMsg,
    Cancel,
    Handshake,
    Have,
    Hello,
    KeepAlive,
    Message,
    Partial,
    Reject,
    Request,
)
from swarm.session import (
    MIN_BLOCK_RATE,
    Action,
    BlockReceived,
    BlockStarted,
    BlockStored,
    CancelPull,
    Close,
    Closed,
    Dial,
    Event,
    Opened,
    PeerSession,
    PieceFailed,
    PieceVerified,
    Progress,
    PullDone,
    PullFailed,
    Received,
    Send,
    SendBlock,
    SessionConfig,
    StartPull,
    StoreBlock,
    Tick,
    TrackerReplied,
    UploadDone,
    Verify,
)

A = TypeVar("A")

BLOCK = 16
PIECE = 2 * BLOCK
ME = pid(50)  # the session under test; remotes are pid(1), pid(2), ...


def harness(num_pieces: int = 8, *, have: Iterable[int] = (), **config: Any) -> Harness:
    config.setdefault("block_size", BLOCK)
    config.setdefault("requests_per_peer", 6)  # what these cases count on
    return Harness(make_session([PIECE] * num_pieces, peer_id=ME, have=have, **config))


def requests_in(actions: list[Action], conn: int) -> list[BlockRequest]:
    return [
        BlockRequest(a.msg.piece, a.msg.offset, a.msg.length)
        for a in actions
        if isinstance(a, Send) and a.conn == conn and isinstance(a.msg, Request)
    ]


def closes_of(actions: list[Action], conn: int) -> list[Close]:
    return [a for a in actions if isinstance(a, Close) and a.conn == conn]


def of_kind(actions: list[Action], kind: type[A]) -> list[A]:
    return [a for a in actions if isinstance(a, kind)]


# -- handshake ---------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, TOKEN], ids=["open", "token"])
def test_handshake_between_two_sessions(token: bytes | None) -> None:
    key = ClusterKey(token)
    seeder = make_session([PIECE] * 4, peer_id=pid(1), key=key, have=range(4), block_size=BLOCK)
    leecher = make_session([PIECE] * 4, peer_id=pid(2), key=key, block_size=BLOCK)
    wire = Wire()
    out_conn, in_conn = wire.dial(leecher, seeder)
    wire.pump()

    assert leecher.peer_of(out_conn) == pid(1)
    assert seeder.peer_of(in_conn) == pid(2)
    assert not wire.closes(leecher) and not wire.closes(seeder)
    assert leecher.stats.auth_failures == seeder.stats.auth_failures == 0
    # Each told the other what it has, and the leecher asks the seeder for blocks.
    (bits,) = wire.sent(seeder, in_conn, BitfieldMsg)
    assert isinstance(bits, BitfieldMsg) and bits.to_bitfield(4).complete
    assert wire.sent(leecher, out_conn, BitfieldMsg)
    assert wire.sent(leecher, out_conn, Request)


@pytest.mark.parametrize(
    ("dialer_token", "acceptor_token"),
    [(TOKEN, OTHER_TOKEN), (None, TOKEN), (TOKEN, None)],
    ids=["other-token", "dialer-without-token", "acceptor-without-token"],
)
def test_wrong_token_is_refused(dialer_token: bytes | None, acceptor_token: bytes | None) -> None:
    dialer = make_session([PIECE] * 4, peer_id=pid(1), key=ClusterKey(dialer_token))
    acceptor = make_session([PIECE] * 4, peer_id=pid(2), key=ClusterKey(acceptor_token))
    wire = Wire()
    out_conn, in_conn = wire.dial(dialer, acceptor)
    wire.pump()

    assert dialer.peer_of(out_conn) == b"" and acceptor.peer_of(in_conn) == b""
    assert not dialer.peers and not acceptor.peers
    assert not dialer.conns and not acceptor.conns
    # The dialer checks the acceptor's Hello first; with no token of its own it accepts
    # anything, and the acceptor finds its Handshake wrong. The other side, closed on
    # during the handshake, counts it as a failure too.
    checker = acceptor if dialer_token is None else dialer
    assert "does not prove our cluster token" in wire.closes(checker)[0].reason
    assert dialer.stats.auth_failures == acceptor.stats.auth_failures == 1
    # Nothing but the connect flow went over the wire.
    for session, conn in ((dialer, out_conn), (acceptor, in_conn)):
        assert all(isinstance(m, Hello | Handshake) for m in wire.sent(session, conn))


def test_other_swarm_root_is_refused() -> None:
    h = harness()
    remote = h.connect(pid(1), root=bytes(32))
    assert remote.closed and not h.admitted(remote)
    assert h.session.stats.auth_failures == 1


@pytest.mark.parametrize(
    "msg",
    [Request(0, 0, BLOCK), Have(0), BitfieldMsg(b"\xff"), KeepAlive(), Cancel(0, 0, BLOCK)],
    ids=lambda m: type(m).__name__,
)
@pytest.mark.parametrize("outbound", [False, True], ids=["accepted", "dialed"])
def test_message_before_handshake_is_refused(msg: Message, outbound: bool) -> None:
    h = harness(have=range(8))
    h.feed(Opened(1, outbound, pid(1) if outbound else b""))
    actions = h.feed(Received(1, msg))
    assert closes_of(actions, 1)
    assert h.session.stats.auth_failures == 1
    assert 1 not in h.session.conns
    assert not of_kind(actions, SendBlock)
    # Anything more on it is ignored: the session has forgotten it.
    assert h.feed(Received(1, Hello(PROTOCOL_VERSION, bytes(16)))) == []


def test_handshake_before_hello_and_block_before_handshake_are_refused() -> None:
    h = harness()
    h.feed(Opened(1, False))
    handshake = Handshake(ROOT, pid(1), 7000, bytes(32))
    assert closes_of(h.feed(Received(1, handshake)), 1)
    h.feed(Opened(2, False))
    assert closes_of(h.feed(BlockStarted(2, BlockRequest(0, 0, BLOCK))), 2)
    assert h.session.stats.auth_failures == 2
    assert h.session.pending == 0


def test_unproven_connection_closed_after_handshake_timeout() -> None:
    h = harness(handshake_timeout=10.0)
    h.feed(Opened(1, False))  # says nothing
    h.feed(Opened(2, True, pid(2)))  # we sent our Hello; no answer
    h.feed(Received(1, Hello(PROTOCOL_VERSION, bytes(16))))  # a Hello, then nothing
    proven = h.connect(pid(3), bitfield=range(8))
    assert h.admitted(proven)

    assert not of_kind(h.tick(9.5), Close)
    actions = h.tick(10.5)
    assert {a.conn for a in of_kind(actions, Close)} == {1, 2}
    assert h.session.stats.handshake_timeouts == 2
    assert h.session.pending == 0
    assert h.admitted(proven)


def test_max_pending_conns_refuses_the_next_inbound_at_once() -> None:
    h = harness(max_pending_conns=2)
    assert h.feed(Opened(1, False)) == []
    assert h.feed(Opened(2, False)) == []
    actions = h.feed(Opened(3, False))
    assert closes_of(actions, 3) and len(actions) == 1
    assert h.session.stats.pending_refused == 1
    assert 3 not in h.session.conns
    # Connections we dial are not limited by it.
    assert of_kind(h.feed(Opened(4, True, pid(4))), Send)
    remote = h.connect(pid(5))  # a third inbound one: refused too
    assert remote.closed and h.session.stats.pending_refused == 2
    # One that leaves frees its place; one that proves itself frees it too.
    h.feed(Closed(1))
    remote = h.connect(pid(6))
    assert h.admitted(remote)
    assert h.session.pending == 1  # conn 2 still waits
    assert not closes_of(h.feed(Opened(7, False)), 7)
    assert h.session.pending == 2


@pytest.mark.parametrize("order", ["fifo", *range(12)])
@pytest.mark.parametrize("smaller", ["a", "b"])
def test_duplicate_connections_both_ends_keep_the_one_the_smaller_id_dialed(
    order: str | int, smaller: str
) -> None:
    ids = (pid(1), pid(2)) if smaller == "a" else (pid(2), pid(1))
    a = make_session([PIECE] * 4, peer_id=ids[0], have=[0, 1], block_size=BLOCK)
    b = make_session([PIECE] * 4, peer_id=ids[1], have=[2, 3], block_size=BLOCK)
    wire = Wire()
    a_out, b_in = wire.dial(a, b)
    b_out, a_in = wire.dial(b, a)
    wire.pump(None if order == "fifo" else random.Random(order))

    assert list(a.peers) == [b.peer_id] and list(b.peers) == [a.peer_id]
    assert len(a.conns) == 1 and len(b.conns) == 1
    a_conn, b_conn = a.peers[b.peer_id].id, b.peers[a.peer_id].id
    # Both kept the two ends of one connection: the one the smaller id dialed.
    kept = {(a_out, b_in), (a_in, b_out)}
    assert (a_conn, b_conn) in kept
    assert wire.dialed[a_conn] == min(ids)
    assert a.stats.auth_failures == b.stats.auth_failures == 0
    # And the kept connection works: each asks the other for what it lacks.
    assert wire.sent(a, a_conn, Request) and wire.sent(b, b_conn, Request)


# -- blocks from peers -------------------------------------------------------------


def test_unrequested_block_closes_the_connection() -> None:
    h = harness(requests_per_peer=2)
    remote = h.connect(pid(1), bitfield=range(8))
    asked = remote.requests()
    assert len(asked) == 2
    stranger = next(
        BlockRequest(p, o, BLOCK)
        for p in range(8)
        for o in (0, BLOCK)
        if BlockRequest(p, o, BLOCK) not in asked
    )
    actions = h.start_block(remote, stranger)
    assert closes_of(actions, remote.conn)
    assert not h.admitted(remote)
    assert not of_kind(h.finish_block(remote), StoreBlock)


def test_block_that_crossed_our_cancel_is_dropped_without_offence() -> None:
    h = harness(request_timeout=30.0)
    remote = h.connect(pid(1), bitfield=range(8))
    asked = remote.requests()
    h.tick(31.0)  # expires them all; one comes back as a probe
    cancelled = remote.cancels()
    assert sorted(cancelled) == sorted(asked)
    probe = list(remote.outstanding)
    crossed = next(b for b in cancelled if b not in probe)

    actions = h.deliver(remote, crossed)
    assert not of_kind(actions, Close) and h.admitted(remote)
    assert not of_kind(actions, StoreBlock)
    assert h.session.stats.duplicate_causes["cancelled"] == crossed.length


# -- request expiry ----------------------------------------------------------------


def _silent_and_spare(h: Harness) -> tuple[Remote, Remote]:
    """A silent remote holding 6 requests (3 whole pieces), and an idle one that has
    exactly those pieces (so it gets nothing until they come free)."""
    silent = h.connect(pid(1), bitfield=range(8))
    pieces = sorted({b.piece for b in silent.requests()})
    assert len(silent.requests()) == 6 and len(pieces) == 3
    spare = h.connect(pid(2), bitfield=pieces)
    assert spare.requests() == []
    return silent, spare


def test_silent_peer_requests_expire_to_another_peer() -> None:
    h = harness(request_timeout=30.0)
    silent, spare = _silent_and_spare(h)
    asked = set(silent.outstanding)

    h.now = 20.0
    h.feed(Received(silent.conn, KeepAlive()))  # alive, just not answering
    assert not requests_in(h.tick(29.9), spare.conn)
    actions = h.tick(30.5)
    assert set(silent.cancels()) == asked
    assert set(requests_in(actions, spare.conn)) == asked
    assert h.session.stats.requests_expired == 6
    # The silent one keeps a single request: a probe.
    assert len(silent.outstanding) <= 1
    assert h.admitted(silent)


def test_snubbed_peer_keeps_one_probe_until_it_delivers() -> None:
    h = harness(request_timeout=30.0)
    silent, spare = _silent_and_spare(h)
    h.tick(30.5)
    assert len(silent.outstanding) == 1
    (probe,) = silent.outstanding

    # Other peers' progress does not give it more.
    for block in list(spare.outstanding):
        h.now += 0.1
        actions = h.deliver(spare, block)
        for verify in of_kind(actions, Verify):
            h.feed(PieceVerified(verify.piece))
        assert len(silent.outstanding) <= 1
    assert h.session.stats.requests_expired == 6

    # A block from it un-snubs it: it gets a full pipeline again.
    h.now += 1.0
    h.deliver(silent, probe)
    assert len(silent.outstanding) == 6


def test_trickling_block_closes_the_connection() -> None:
    h = harness(request_timeout=30.0)
    trickler = h.connect(pid(1), bitfield=range(8))
    h.now = 1.0
    block = next(iter(trickler.outstanding))
    h.start_block(trickler, block)  # a header, then the payload never completes

    deadline = 1.0 + 30.0 + block.length / MIN_BLOCK_RATE
    h.feed(Received(trickler.conn, KeepAlive()))
    assert not closes_of(h.tick(deadline - 0.01), trickler.conn)
    assert trickler.cancels() == []  # a block is arriving: its requests do not expire
    actions = h.tick(deadline + 0.5)
    assert closes_of(actions, trickler.conn)
    assert h.session.stats.slow_closes == 1


# -- endgame -----------------------------------------------------------------------


def test_endgame_duplicates_go_out_and_the_loser_gets_a_cancel() -> None:
    h = harness(num_pieces=3, have=[0, 1])
    a = h.connect(pid(1), bitfield=range(3))
    last = [BlockRequest(2, 0, BLOCK), BlockRequest(2, BLOCK, BLOCK)]
    assert sorted(a.outstanding) == last
    b = h.connect(pid(2), bitfield=range(3))
    assert sorted(b.outstanding) == last  # endgame: the same blocks, from b too
    assert h.session.picker.in_endgame

    h.deliver(b, last[0])
    assert a.cancels() == [last[0]] and b.cancels() == []
    # a's copy was already on the wire: dropped, counted, no offence.
    actions = h.deliver(a, last[0])
    assert not of_kind(actions, Close) and not of_kind(actions, StoreBlock)
    assert h.session.stats.duplicate_causes["cancelled"] == BLOCK
    # a wins the second block: b gets the Cancel this time.
    actions = h.deliver(a, last[1])
    assert b.cancels() == [last[1]]
    assert of_kind(actions, Verify)
    assert h.admitted(a) and h.admitted(b)


# -- blame -------------------------------------------------------------------------


def test_corrupt_piece_from_one_peer_bars_it() -> None:
    h = harness(num_pieces=2)
    liar = h.connect(pid(1), bitfield=[0])
    honest = h.connect(pid(2), bitfield=[1])
    for block in list(liar.outstanding):
        actions = h.deliver(liar, block)
    assert [a.piece for a in of_kind(actions, Verify)] == [0]

    actions = h.feed(PieceFailed(0))
    assert closes_of(actions, liar.conn)
    assert pid(1) in h.session.barred
    assert h.session.stats.corrupt_pieces == 1
    assert h.admitted(honest)
    assert not any(isinstance(a, Send) and isinstance(a.msg, Have) for a in actions)

    # Never admitted again, whichever side dials.
    again = h.connect(pid(1), bitfield=[0])
    assert again.closed and not h.admitted(again)
    again = h.connect(pid(1), bitfield=[0], outbound=True)
    assert again.closed and not h.admitted(again)
    actions = h.feed(
        TrackerReplied(peers=[(pid(1), "127.0.0.1", 7001), (pid(3), "127.0.0.1", 7003)])
    )
    assert [a.peer_id for a in of_kind(actions, Dial)] == [pid(3)]


def test_two_failed_pieces_bar_the_one_peer_they_share() -> None:
    h = harness(num_pieces=2, requests_per_peer=1)
    b = h.connect(pid(2), bitfield=[0])
    c = h.connect(pid(3), bitfield=[1])
    a = h.connect(pid(1), bitfield=[0, 1])
    assert list(b.outstanding) == [BlockRequest(0, 0, BLOCK)]
    assert list(c.outstanding) == [BlockRequest(1, 0, BLOCK)]
    assert list(a.outstanding) == [BlockRequest(0, BLOCK, BLOCK)]
    h.deliver(a, BlockRequest(0, BLOCK, BLOCK))
    assert list(a.outstanding) == [BlockRequest(1, BLOCK, BLOCK)]
    verified: list[int] = []
    for remote, block in (
        (b, BlockRequest(0, 0, BLOCK)),
        (a, BlockRequest(1, BLOCK, BLOCK)),
        (c, BlockRequest(1, 0, BLOCK)),
    ):
        verified += [v.piece for v in of_kind(h.deliver(remote, block), Verify)]
    assert verified == [0, 1]
    assert h.session.contributors == {0: {pid(1), pid(2)}, 1: {pid(1), pid(3)}}

    actions = h.feed(PieceFailed(0))
    assert not of_kind(actions, Close) and not h.session.barred  # two suspects: wait
    actions = h.feed(PieceFailed(1))
    assert h.session.barred == {pid(1)}
    assert closes_of(actions, a.conn)
    assert h.admitted(b) and h.admitted(c)


# -- a peer leaving ----------------------------------------------------------------


def test_peer_leaving_mid_piece_its_blocks_go_to_another_peer() -> None:
    h = harness()
    leaving = h.connect(pid(1), bitfield=range(8))
    first = min(leaving.outstanding)
    h.deliver(leaving, first)  # one block of that piece is in
    held = set(leaving.outstanding)
    assert len(held) == 6 and (first.piece, BLOCK) in {(b.piece, b.offset) for b in held}
    # Another peer with the pieces whose missing blocks are all asked of the leaving one,
    # so it has nothing to do yet (the refill after the delivery started a piece with an
    # open block: left out).
    refill = list(leaving.outstanding)[-1]
    pieces = sorted({b.piece for b in held} - {refill.piece})
    spare = h.connect(pid(2), bitfield=pieces)
    assert spare.requests() == []
    wanted = {b for b in held if b.piece in pieces}

    actions = h.feed(Closed(leaving.conn, "connection reset"))
    assert set(requests_in(actions, spare.conn)) == wanted


# -- uploads -----------------------------------------------------------------------


def test_upload_slots_per_connection_and_fairness() -> None:
    h = harness(num_pieces=16, have=range(16), uploads_per_conn=2, upload_slots=16)
    greedy = h.connect(pid(1), bitfield=[])
    modest = h.connect(pid(2), bitfield=[])
    asks = [Request(p, o, BLOCK) for p in range(16) for o in (0, BLOCK)]
    for request in asks:
        h.feed(Received(greedy.conn, request))
    assert len(greedy.uploads) == 2
    # Another connection is served meanwhile.
    for request in asks[:4]:
        h.feed(Received(modest.conn, request))
    assert len(modest.uploads) == 2

    for _ in range(5):  # each finished send frees exactly one slot for it
        h.now += 1.0
        actions = h.upload_done(greedy, greedy.uploads[0])
        assert len(of_kind(actions, SendBlock)) == 1
        assert len(greedy.uploads) == 2
    sent = [a.request for a in h.actions if isinstance(a, SendBlock) and a.conn == greedy.conn]
    assert sent == asks[:7]  # in the order asked, none twice


def test_the_requester_holding_least_is_served_first() -> None:
    h = harness(num_pieces=8, have=range(8), upload_slots=1)
    first = h.connect(pid(1), bitfield=[])
    ahead = h.connect(pid(2), bitfield=range(6))
    behind = h.connect(pid(3), bitfield=[1])
    h.feed(Received(first.conn, Request(0, 0, BLOCK, held=0)))  # takes the one slot
    h.feed(Received(ahead.conn, Request(7, 0, BLOCK, held=6)))
    h.feed(Received(behind.conn, Request(7, 0, BLOCK, held=1)))
    h.upload_done(first, first.uploads[0])
    assert behind.uploads == [Request(7, 0, BLOCK)] and not ahead.uploads
    h.upload_done(behind, behind.uploads[0])
    assert ahead.uploads == [Request(7, 0, BLOCK)]


def test_requests_say_how_many_kib_we_hold_checked_blocks_included() -> None:
    size = MIN_PARTIAL_BLOCK  # 16 KiB
    lengths = [4 * size, 4 * size, 3 * size + 1024]  # piece 2's last block is 1 KiB
    session = make_session(
        lengths, peer_id=ME, block_size=size, cut_through=1, have=[2], requests_per_peer=1
    )
    h = Harness(session)
    source = h.connect(pid(1), bitfield=[0, 1, 2])

    def held_asked() -> list[int]:
        return [msg.held for msg in source.sent if isinstance(msg, Request)]

    assert held_asked() == [49] and session.held == 49
    # Each block checked on arrival counts at once (a piece of 256 MiB is not
    # "nothing" to the upload order while its blocks come in), and the next
    # Request says so; a piece made whole counts once, ...
    first = next(iter(source.outstanding)).piece
    for n in range(1, 5):
        h.deliver(source, next(iter(source.outstanding)))
        assert session.held == 49 + 16 * n
    h.feed(PieceVerified(first))
    assert session.held == 49 + 64
    # ... and a failed piece's blocks not at all once they are thrown away.
    for _ in range(4):
        h.deliver(source, next(iter(source.outstanding)))
    assert session.held == 49 + 128
    h.feed(PieceFailed(1 - first))
    assert session.held == 49 + 64
    # The next Request goes out as a block arrives, before it is checked: one behind.
    assert held_asked()[:5] == [49, 49, 65, 81, 97]


def test_upload_not_taken_in_time_closes_its_connection() -> None:
    h = harness(have=range(8), request_timeout=30.0)
    stalled = h.connect(pid(1), bitfield=[])
    reader = h.connect(pid(2), bitfield=[])
    h.feed(Received(stalled.conn, Request(0, 0, BLOCK)))
    assert len(stalled.uploads) == 1
    for t in (5.0, 25.0):
        h.now = t
        h.feed(Received(reader.conn, Request(1, 0, BLOCK)))
        h.upload_done(reader, reader.uploads[0])
    h.feed(Received(stalled.conn, KeepAlive()))  # alive, just not reading

    assert not of_kind(h.tick(29.9), Close)
    actions = h.tick(30.5)
    assert closes_of(actions, stalled.conn)
    assert not closes_of(actions, reader.conn)
    assert h.session.stats.slow_closes == 1


def test_requests_for_pieces_we_lack_are_rejected() -> None:
    h = harness(have=range(7))
    remote = h.connect(pid(1), bitfield=[])
    actions = h.feed(Received(remote.conn, Request(7, 0, BLOCK)))
    assert [a.msg for a in actions if isinstance(a, Send)] == [Reject(7, 0, BLOCK)]
    assert not of_kind(actions, SendBlock)
    actions = h.feed(Received(remote.conn, Request(6, BLOCK, BLOCK)))
    assert [a.request for a in of_kind(actions, SendBlock)] == [Request(6, BLOCK, BLOCK)]


# -- origin pulls ------------------------------------------------------------------


def test_origin_piece_taken_back_is_asked_of_peers_at_once() -> None:
    h = harness(num_pieces=4, have=[0, 1, 2])
    assert h.feed(TrackerReplied(assigned=[3])) == [StartPull(3)]
    peer = h.connect(pid(1), bitfield=range(4))
    assert peer.requests() == []  # reserved for our own pull

    actions = h.feed(TrackerReplied(assigned=[]))
    assert CancelPull(3) in actions
    assert sorted(requests_in(actions, peer.conn)) == [
        BlockRequest(3, 0, BLOCK),
        BlockRequest(3, BLOCK, BLOCK),
    ]
    # The pull's end, reported by the driver later, asks for nothing twice.
    h.feed(PullFailed(3))
    assert not peer.requested_twice and len(peer.requests()) == 2


def test_origin_pull_done_announces_and_completes() -> None:
    h = harness(num_pieces=2, have=[0])
    h.feed(TrackerReplied(assigned=[1]))
    lacking = h.connect(pid(1), bitfield=[])
    holding = h.connect(pid(2), bitfield=[1])
    actions = h.feed(PullDone(1))
    assert Progress(1, PIECE) in actions
    assert Have(1) in lacking.got(Have) and holding.got(Have) == []
    assert h.session.complete and h.session.stats.origin_pieces == 1


# -- HAVE suppression --------------------------------------------------------------


def test_have_only_to_connections_whose_bitfield_lacks_it() -> None:
    h = harness(num_pieces=4)
    source = h.connect(pid(1), bitfield=[0])
    for block in list(source.outstanding):
        h.deliver(source, block)
    lacks = h.connect(pid(2), bitfield=[1])
    has = h.connect(pid(3), bitfield=[0, 2])
    silent = h.connect(pid(4), bitfield=None)  # no bitfield yet
    told = h.connect(pid(5), bitfield=[])
    h.feed(Received(told.conn, Have(0)))  # announced it after its bitfield

    h.feed(PieceVerified(0))
    assert lacks.got(Have) == [Have(0)] and silent.got(Have) == [Have(0)]
    assert source.got(Have) == [] and has.got(Have) == [] and told.got(Have) == []


# -- property: random interleavings from several fake peers ------------------------

LENGTHS = [40, 40, 25, 40, 10, 32]  # blocks of 16: some pieces end in a short block
NUM_PEERS = 3

# How often each kind of op comes: deliveries and the driver's disk work move pieces
# along, so they come most often.
_WEIGHTS = {
    "block": 4,
    "io": 3,
    "request": 3,
    "upload_done": 1,
    "connect": 1,
    "have": 1,
    "reject": 1,
    "tick": 1,
    "close": 1,
    "tracker": 1,
    "pull": 1,
}
_KINDS = [kind for kind, weight in _WEIGHTS.items() for _ in range(weight)]
_TICKS = [0.0, 1.0, 5.0, 12.0, 31.0, 95.0]
# (kind, which peer / piece / pending item, another choice, a flag): read by _Model.run.
_op = st.tuples(st.sampled_from(_KINDS), st.integers(0, 15), st.integers(0, 15), st.booleans())


class _Model:
    """What the property checks every action against."""

    def __init__(self, h: Harness, have: set[int], pieces: list[set[int]]) -> None:
        self.h = h
        self.verified = set(have)
        self.pieces = pieces  # what each fake peer holds (and may announce)
        self.live: dict[int, Remote] = {}  # fake peer index -> its open connection
        self.io: list[Action] = []  # StoreBlock and Verify the driver has not finished
        self.pulls: list[int] = []  # StartPull given, not cancelled or finished
        self.asked: dict[int, list[Request]] = {}  # conn -> what the remote requested
        self.problems: list[str] = []

    def feed(self, event: Event) -> None:
        if isinstance(event, PieceVerified | PullDone):
            self.verified.add(event.piece)
        actions = self.h.feed(event)
        cfg = self.h.session.config
        for action in actions:
            if isinstance(action, StoreBlock | Verify):
                self.io.append(action)
            elif isinstance(action, StartPull):
                self.pulls.append(action.piece)
            elif isinstance(action, CancelPull) and action.piece in self.pulls:
                self.pulls.remove(action.piece)
            elif isinstance(action, SendBlock):
                if action.request.piece not in self.verified:
                    self.problems.append(f"served unverified piece: {action}")
                if action.request not in self.asked.get(action.conn, []):
                    self.problems.append(f"served what was not asked: {action}")
            elif isinstance(action, Send):
                msg = action.msg
                if isinstance(msg, Have) and msg.piece not in self.verified:
                    self.problems.append(f"announced unverified piece: {action}")
                elif isinstance(msg, BitfieldMsg):
                    bits = set(msg.to_bitfield(len(LENGTHS)))
                    if not bits <= self.verified:
                        self.problems.append(f"bitfield offers unverified {bits - self.verified}")
                elif isinstance(msg, Request):
                    remote = self.h.remotes[action.conn]
                    if msg.piece not in remote.announced:
                        self.problems.append(f"asked for a piece the peer lacks: {action}")
                    if msg.piece in self.verified:
                        self.problems.append(f"asked for a piece we have: {action}")
                    if msg.piece in self.pulls:
                        self.problems.append(f"asked peers for a piece we pull: {action}")
                    if len(remote.outstanding) > cfg.requests_per_peer:
                        self.problems.append(f"more than requests_per_peer to {remote.conn}")
        for remote in self.h.remotes.values():
            if remote.requested_twice:
                self.problems.append(
                    f"conn {remote.conn} asked twice for {remote.requested_twice} while outstanding"
                )
                remote.requested_twice.clear()
            if len(remote.uploads) > cfg.uploads_per_conn and not remote.closed:
                self.problems.append(f"conn {remote.conn} holds {len(remote.uploads)} uploads")

    def run(self, op: tuple[str, int, int, bool]) -> None:
        h = self.h
        kind, a, b, flag = op
        for index, live in list(self.live.items()):
            if live.closed:
                del self.live[index]
        if kind == "io":
            if self.io:
                action = self.io.pop(a % len(self.io))
                if isinstance(action, StoreBlock):
                    self.feed(BlockStored(action.conn, action.block))
                elif isinstance(action, Verify):
                    good = b % 6 != 0  # now and then a piece fails verification
                    self.feed(PieceVerified(action.piece) if good else PieceFailed(action.piece))
            return
        if kind == "tick":
            h.now += _TICKS[a % len(_TICKS)]
            self.feed(Tick())
            return
        if kind == "tracker":
            assigned = sorted({a % len(LENGTHS), b % len(LENGTHS)})[: a % 3]
            self.feed(TrackerReplied(assigned=assigned))
            return
        if kind == "pull":
            if self.pulls:
                piece = self.pulls.pop(a % len(self.pulls))
                self.feed(PullDone(piece) if flag else PullFailed(piece))
            return
        i = a % NUM_PEERS
        remote = self.live.get(i)
        if kind == "connect":
            if remote is None:
                self.connect(i, outbound=flag)
            return
        if remote is None:
            return
        conn = remote.conn
        if kind == "have":
            piece = b % len(LENGTHS)
            self.pieces[i].add(piece)
            remote.announced.add(piece)
            self.feed(Received(conn, Have(piece)))
        elif kind == "block":
            if remote.receiving is not None:
                self.finish_block(remote)
                return
            # What it was asked for, or what it had started sending before our Cancel.
            choices = sorted(remote.outstanding) + sorted(remote.cancelled)
            if choices:
                block = choices[b % len(choices)]
                remote.cancelled.pop(block, None)
                remote.receiving = block
                self.feed(BlockStarted(conn, block))
                if flag:  # the payload follows at once
                    self.finish_block(remote)
        elif kind == "reject":
            choices = sorted(x for x in remote.outstanding if x != remote.receiving)
            if choices:
                block = choices[b % len(choices)]
                self.feed(Received(conn, Reject(block.piece, block.offset, block.length)))
        elif kind == "request":
            piece = b % len(LENGTHS)
            offset = 16 * (a // NUM_PEERS) % LENGTHS[piece]
            request = Request(piece, offset, min(16, LENGTHS[piece] - offset))
            self.asked.setdefault(conn, []).append(request)
            self.feed(Received(conn, request))
        elif kind == "upload_done":
            if remote.uploads:
                self.feed(UploadDone(conn, remote.uploads.pop(b % len(remote.uploads))))
        elif kind == "close":
            self.feed(Closed(conn, "gone", remote_fault=flag))

    def connect(self, i: int, *, outbound: bool) -> None:
        remote = self.h.connect(pid(i + 1), bitfield=None, outbound=outbound)
        if self.h.admitted(remote):
            self.live[i] = remote
            bits = Bitfield.from_indices(self.pieces[i], len(LENGTHS))
            remote.announced |= set(bits)
            self.feed(Received(remote.conn, BitfieldMsg.from_bitfield(bits)))

    def finish_block(self, remote: Remote) -> None:
        block = remote.receiving
        assert block is not None
        remote.receiving = None
        self.feed(BlockReceived(remote.conn, block))


@settings(max_examples=200, deadline=None)
@example(  # one connection asking for a block three times, reading none: 2 sends at most
    have=frozenset([0]),
    pieces=[frozenset()] * NUM_PEERS,
    dialed=[False] * NUM_PEERS,
    ops=[("request", 0, 0, False)] * 3,
    seed=0,
)
@given(
    have=st.frozensets(st.integers(0, len(LENGTHS) - 1), max_size=3),
    pieces=st.lists(
        st.frozensets(st.integers(0, len(LENGTHS) - 1)), min_size=NUM_PEERS, max_size=NUM_PEERS
    ),
    dialed=st.lists(st.booleans(), min_size=NUM_PEERS, max_size=NUM_PEERS),
    ops=st.lists(_op, min_size=30, max_size=150),
    seed=st.integers(0, 3),
)
def test_random_interleavings_ask_nothing_twice_and_offer_nothing_unverified(
    have: frozenset[int],
    pieces: list[frozenset[int]],
    dialed: list[bool],
    ops: list[tuple[str, int, int, bool]],
    seed: int,
) -> None:
    """Fake peers connect, announce, deliver (whole, or a header now and the payload
    later), reject, request, leave and come back; the driver stores, verifies (now and
    then a piece fails), finishes uploads and origin pulls; the tracker assigns and
    takes back; the clock jumps. After every event: (a) no block is asked twice of one
    peer while the first request is outstanding (in endgame too: duplicates go to other
    peers), (b) every Have, bitfield and SendBlock offers only verified pieces; and
    requests go only to peers that announced the piece, never for a piece we have or
    pull, at most ``requests_per_peer`` per peer, at most ``uploads_per_conn`` sends per
    connection."""
    session = PeerSession(
        LENGTHS,
        root=ROOT,
        peer_id=ME,
        key=OPEN,
        config=SessionConfig(
            block_size=16,
            requests_per_peer=3,
            upload_slots=3,
            uploads_per_conn=2,
            endgame_duplicates=2,
        ),
        rng=random.Random(seed),
        have=have,
    )
    model = _Model(Harness(session), set(have), [set(p) for p in pieces])
    # Every fake peer connects first (some dialed by us); later ops close and reconnect.
    for i, outbound in enumerate(dialed):
        model.connect(i, outbound=outbound)
    for op in ops:
        model.run(op)
        assert not model.problems, (op, model.problems)


def test_a_have_or_request_outside_the_artifact_closes_the_connection() -> None:
    h = harness(num_pieces=4, have=range(4))
    bad_have = h.connect(pid(1), bitfield=[])
    actions = h.feed(Received(bad_have.conn, Have(99)))
    assert any(isinstance(a, Close) and a.conn == bad_have.conn for a in actions)
    bad_request = h.connect(pid(2), bitfield=[])
    actions = h.feed(Received(bad_request.conn, Request(0, 4096, 16)))
    assert any(isinstance(a, Close) and a.conn == bad_request.conn for a in actions)
    assert not any(isinstance(a, SendBlock) for a in actions)


def test_cut_through_serves_checked_blocks_before_the_piece_is_whole() -> None:
    size = MIN_PARTIAL_BLOCK
    h = Harness(make_session([4 * size] * 2, peer_id=ME, block_size=size, cut_through=1))
    source = h.connect(pid(1), bitfield=[0, 1])
    lacking = h.connect(pid(2), bitfield=[])
    first = next(m for m in source.sent if isinstance(m, Request) and m.piece == 0)
    block = block_of(first)
    h.feed(BlockStarted(source.conn, block))
    h.feed(BlockReceived(source.conn, block))
    actions = h.feed(BlockStored(source.conn, block))
    told = [a for a in of_kind(actions, Send) if isinstance(a.msg, Partial)]
    assert [a.conn for a in told] == [lacking.conn]  # not the source: it has the piece
    partial = told[0].msg
    assert isinstance(partial, Partial) and list(partial.blocks(4)) == [first.offset // size]
    # The block we hold is served; one we don't is rejected.
    h.feed(Received(lacking.conn, Request(0, first.offset, first.length)))
    assert lacking.uploads == [Request(0, first.offset, first.length)]
    other = (first.offset + size) % (4 * size)
    rejected = h.feed(Received(lacking.conn, Request(0, other, size)))
    assert [a.msg for a in of_kind(rejected, Send)] == [Reject(0, other, size)]


def test_requests_in_flight_default_to_twelve_mib_of_blocks_between_six_and_twelve() -> None:
    from swarm.session import requests_in_flight

    mib = 1024 * 1024
    assert [requests_in_flight(b * mib // 4) for b in (1, 4, 8, 16, 64)] == [12, 12, 6, 6, 6]
    # A session left at the default keeps that many in flight to a peer holding everything.
    session = Harness(make_session([4 * mib] * 8, peer_id=ME, block_size=mib))
    assert session.session.requests_per_peer == 12
    assert len(session.connect(pid(1), bitfield=range(8)).requests()) == 12
    pinned = harness(requests_per_peer=3)
    assert len(pinned.connect(pid(1), bitfield=range(8)).requests()) == 3


def _take_over_session(n_pieces: int = 2) -> Harness:
    size = MIN_PARTIAL_BLOCK
    return Harness(
        make_session([4 * size] * n_pieces, peer_id=ME, block_size=size, requests_per_peer=8)
    )


def test_take_over_leaves_a_block_being_stored_where_it_is() -> None:
    h = _take_over_session()
    x = h.connect(pid(1), bitfield=[0, 1])
    asked = list(x.outstanding)
    assert len(asked) == 8
    h.now = 1.0
    # X delivers the block the picker lists last; the driver is still writing it.
    last = asked[-1]
    h.feed(BlockStarted(x.conn, last))
    h.feed(BlockReceived(x.conn, last))
    assert (x.conn, last) in h.session._storing
    y = h.connect(pid(2), bitfield=[0, 1])
    assert last not in y.requests(), "a block already here, being written, asked again of Y"


def test_an_idle_peer_takes_over_requests_waiting_at_a_stalled_one() -> None:
    h = _take_over_session(n_pieces=3)
    x = h.connect(pid(1), bitfield=[0, 1])
    assert len(x.outstanding) == 8
    h.now = 0.1
    h.deliver(x, next(iter(x.outstanding)))  # one block in 0.1 s: pace 0.1
    y = h.connect(pid(2), bitfield=[2])
    for _ in range(4):
        h.now += 0.5
        h.deliver(y, next(iter(y.outstanding)))  # Y: 0.5 s a block
    h.feed(PieceVerified(2))
    # X now sends nothing for 20 s (its 7 requests wait); Y is idle.
    for t in range(3, 21):
        h.tick(float(t))
    before = len(y.requests())
    h.feed(Received(y.conn, Have(0)))
    h.feed(Received(y.conn, Have(1)))
    assert len(y.requests()) > before, (
        "X sent one block fast, then nothing for 20 s: its pace is now"
    )


def test_a_peer_of_unknown_pace_takes_over_nothing() -> None:
    h = _take_over_session()
    x = h.connect(pid(1), bitfield=[0, 1])
    h.now = 0.001
    h.deliver(x, next(iter(x.outstanding)))  # 1 ms per block: very fast
    y = h.connect(pid(2), bitfield=[0, 1])  # never measured: block_time 0
    assert y.requests() == [], (
        f"new unmeasured peer took {len(y.requests())} from a 1 ms/block peer"
    )
