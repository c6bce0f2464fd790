"""Harness for driving :class:`swarm.session.PeerSession` by events alone (``tests/test_session.py``).

Time is a plain float the test moves by hand; nothing here opens a socket or reads a clock.

- ``make_session``: a session over a small artifact with a seeded ``random.Random``.
- ``Harness``: one session under test and the fake remotes at the other end of its
  connections. ``connect`` runs the real connect flow (a :class:`PeerHandshake` on the
  remote side), ``feed`` hands the session an event at ``Harness.now`` and records
  what each remote was sent, and the harness keeps, per connection, the model a
  remote would have of our requests: sent, cancelled, rejected or answered.
- ``Wire``: real sessions connected back to back. Every ``Send`` on one end arrives
  as ``Received`` at the other, in order per direction; a ``Close`` arrives as
  ``Closed`` after what was sent before it. ``pump`` delivers in send order or, with
  an ``rng``, in a random order across connections (still in order on each).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.auth import NONCE_SIZE, ClusterKey
from core.bitfield import Bitfield
from core.digest import PEER_ID_LENGTH
from core.errors import RemoteProtocolError
from swarm.picker import BlockRequest
from swarm.protocol import (
    BitfieldMsg,
    Cancel,
    Handshake,
    Hello,
    Message,
    PeerHandshake,
    Reject,
    Request,
)
from swarm.session import (
    Action,
    BlockReceived,
    BlockStarted,
    BlockStored,
    Close,
    Closed,
    Event,
    Opened,
    PeerSession,
    Received,
    Send,
    SendBlock,
    SessionConfig,
    StoreBlock,
    Tick,
    UploadDone,
)

ROOT = bytes(range(32))
OPEN = ClusterKey(None)
TOKEN = b"secret-cluster-token-0123456789"
OTHER_TOKEN = b"another-cluster-token-987654321"


def pid(n: int) -> bytes:
    """A peer id; ``pid(1) < pid(2) < ...``."""
    return bytes([n]) * PEER_ID_LENGTH


def make_session(
    lengths: Sequence[int],
    *,
    peer_id: bytes = b"\x00" * PEER_ID_LENGTH,
    key: ClusterKey = OPEN,
    have: Iterable[int] = (),
    seed: int = 0,
    **config: Any,
) -> PeerSession:
    return PeerSession(
        lengths,
        root=ROOT,
        peer_id=peer_id,
        key=key,
        config=SessionConfig(**config),
        rng=random.Random(seed),
        have=have,
    )


def block_of(msg: Request | Cancel | Reject) -> BlockRequest:
    return BlockRequest(msg.piece, msg.offset, msg.length)


@dataclass
class Remote:
    """The fake peer at the other end of one connection, and what it was sent."""

    peer_id: bytes
    conn: int
    handshake: PeerHandshake
    sent: list[Message] = field(default_factory=list)  # what the session sent it
    uploads: list[Request] = field(default_factory=list)  # SendBlocks not yet done
    # Our requests as the remote sees them: asked and neither cancelled, rejected nor
    # answered (oldest first); and those cancelled whose data may still be sent.
    outstanding: dict[BlockRequest, None] = field(default_factory=dict)
    cancelled: dict[BlockRequest, None] = field(default_factory=dict)
    requested_twice: list[BlockRequest] = field(default_factory=list)
    announced: set[int] = field(default_factory=set)  # pieces it told the session it has
    receiving: BlockRequest | None = None
    closed: str = ""  # why the session closed it ("" while open)
    refused: str = ""  # why the remote's own handshake check failed

    def got(self, kind: type) -> list[Message]:
        return [m for m in self.sent if isinstance(m, kind)]

    def requests(self) -> list[BlockRequest]:
        return [block_of(m) for m in self.sent if isinstance(m, Request)]

    def cancels(self) -> list[BlockRequest]:
        return [block_of(m) for m in self.sent if isinstance(m, Cancel)]


class Harness:
    """One session under test, the fake remotes on its connections, and a fake clock."""

    def __init__(self, session: PeerSession) -> None:
        self.session = session
        self.now = 0.0
        self.remotes: dict[int, Remote] = {}
        self.actions: list[Action] = []
        self._next_conn = 1000  # raw Opened events in tests use small ids

    # -- events -----------------------------------------------------------------

    def feed(self, event: Event) -> list[Action]:
        """Apply ``event`` at ``self.now``; update the remotes' records; the actions."""
        remote = self.remotes.get(getattr(event, "conn", -1))
        if remote is not None:
            if isinstance(event, BlockReceived):
                remote.outstanding.pop(event.block, None)
                remote.cancelled.pop(event.block, None)
            elif isinstance(event, Received) and isinstance(event.msg, Reject):
                remote.outstanding.pop(block_of(event.msg), None)
            elif isinstance(event, Closed):
                self._gone(remote, event.reason or "closed by the remote")
        actions = self.session.handle(event, self.now)
        self.actions.extend(actions)
        for action in actions:
            self._observe(action)
        return actions

    def _observe(self, action: Action) -> None:
        if isinstance(action, Send | SendBlock | Close):
            remote = self.remotes.get(action.conn)
            if remote is None:
                return
            if isinstance(action, Close):
                self._gone(remote, action.reason)
            elif isinstance(action, SendBlock):
                remote.uploads.append(action.request)
            else:
                msg = action.msg
                remote.sent.append(msg)
                if isinstance(msg, Request):
                    block = block_of(msg)
                    if block in remote.outstanding:
                        remote.requested_twice.append(block)
                    remote.outstanding[block] = None
                elif isinstance(msg, Cancel):
                    block = block_of(msg)
                    if block in remote.outstanding:
                        del remote.outstanding[block]
                        remote.cancelled[block] = None

    @staticmethod
    def _gone(remote: Remote, reason: str) -> None:
        if not remote.closed:
            remote.closed = reason
        remote.outstanding.clear()

    def tick(self, at: float) -> list[Action]:
        self.now = at
        return self.feed(Tick())

    # -- the connect flow -------------------------------------------------------

    def connect(
        self,
        peer_id: bytes,
        *,
        bitfield: Iterable[int] | None = (),
        outbound: bool = False,
        key: ClusterKey = OPEN,
        root: bytes = ROOT,
    ) -> Remote:
        """Open a connection (``outbound``: the session dialed) and run the handshake
        with a real :class:`PeerHandshake` at the remote's end; then, if the session
        admitted it and ``bitfield`` is not None, send the remote's bitfield."""
        conn = self._next_conn
        self._next_conn += 1
        handshake = PeerHandshake(
            key,
            dialer=not outbound,
            root=root,
            peer_id=peer_id,
            listen_port=7000,
            nonce=bytes([conn % 256]) * NONCE_SIZE,
        )
        remote = Remote(peer_id, conn, handshake)
        self.remotes[conn] = remote
        new = len(remote.sent)
        to_session: list[Message] = list(handshake.start())
        self.feed(Opened(conn, outbound, peer_id if outbound else b""))
        for _ in range(6):  # Hello, Hello, Handshake, Handshake: never more rounds
            for msg in remote.sent[new:]:
                if isinstance(msg, Hello | Handshake) and not remote.refused:
                    try:
                        to_session += handshake.receive(msg)
                    except RemoteProtocolError as exc:
                        remote.refused = str(exc)
            new = len(remote.sent)
            if remote.refused and not remote.closed:
                self.feed(Closed(conn, remote.refused))
            if not to_session or remote.closed:
                break
            for msg in to_session:
                self.feed(Received(conn, msg))
            to_session = []
        if bitfield is not None and self.admitted(remote):
            self.send_bitfield(remote, bitfield)
        return remote

    def admitted(self, remote: Remote) -> bool:
        return not remote.closed and self.session.peer_of(remote.conn) == remote.peer_id

    def send_bitfield(self, remote: Remote, pieces: Iterable[int]) -> list[Action]:
        bits = Bitfield.from_indices(pieces, self.session.num_pieces)
        remote.announced |= set(bits)
        return self.feed(Received(remote.conn, BitfieldMsg.from_bitfield(bits)))

    # -- blocks -----------------------------------------------------------------

    def start_block(self, remote: Remote, block: BlockRequest) -> list[Action]:
        remote.receiving = block
        return self.feed(BlockStarted(remote.conn, block))

    def finish_block(self, remote: Remote) -> list[Action]:
        block = remote.receiving
        assert block is not None
        remote.receiving = None
        return self.feed(BlockReceived(remote.conn, block))

    def deliver(self, remote: Remote, block: BlockRequest, *, store: bool = True) -> list[Action]:
        """``remote`` sends ``block`` whole; with ``store``, the driver stores it at once."""
        out = self.start_block(remote, block)
        out += self.finish_block(remote)
        if store:
            for action in list(out):
                if isinstance(action, StoreBlock):
                    out += self.feed(BlockStored(action.conn, action.block))
        return out

    def upload_done(self, remote: Remote, request: Request) -> list[Action]:
        remote.uploads.remove(request)
        return self.feed(UploadDone(remote.conn, request))


# -- two real sessions back to back ----------------------------------------------


@dataclass
class _End:
    session: PeerSession
    conn: int


class Wire:
    """Real sessions connected back to back, with a fake clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self._next_conn = 100
        self._other: dict[tuple[int, int], _End] = {}  # (id(session), conn) -> far end
        self._queues: dict[tuple[int, int], deque[tuple[int, PeerSession, Event]]] = {}
        self._seq = 0
        self.actions: dict[int, list[Action]] = {}  # id(session) -> every action it gave
        self.dialed: dict[int, bytes] = {}  # conn (dialer's end) -> dialer's peer id

    def dial(self, dialer: PeerSession, acceptor: PeerSession) -> tuple[int, int]:
        """Open a connection from ``dialer`` to ``acceptor``: (dialer's conn, acceptor's)."""
        out_conn, in_conn = self._next_conn, self._next_conn + 1
        self._next_conn += 2
        self._other[(id(dialer), out_conn)] = _End(acceptor, in_conn)
        self._other[(id(acceptor), in_conn)] = _End(dialer, out_conn)
        self.dialed[out_conn] = dialer.peer_id
        self.dialed[in_conn] = dialer.peer_id
        self._apply(acceptor, acceptor.handle(Opened(in_conn, outbound=False), self.now))
        self._apply(
            dialer,
            dialer.handle(Opened(out_conn, outbound=True, peer_id=acceptor.peer_id), self.now),
        )
        return out_conn, in_conn

    def _apply(self, session: PeerSession, actions: list[Action]) -> None:
        self.actions.setdefault(id(session), []).extend(actions)
        for action in actions:
            if not isinstance(action, Send | Close):
                continue
            far = self._other.get((id(session), action.conn))
            if far is None:
                continue
            event: Event = (
                Received(far.conn, action.msg)
                if isinstance(action, Send)
                else Closed(far.conn, action.reason)
            )
            self._seq += 1
            key = (id(far.session), far.conn)
            self._queues.setdefault(key, deque()).append((self._seq, far.session, event))

    def pump(self, rng: random.Random | None = None, limit: int = 10_000) -> int:
        """Deliver until nothing is in flight; how many events were delivered."""
        for count in range(limit):
            ready = [q for q in self._queues.values() if q]
            if not ready:
                return count
            queue = rng.choice(ready) if rng is not None else min(ready, key=lambda q: q[0][0])
            _, session, event = queue.popleft()
            self._apply(session, session.handle(event, self.now))
        raise AssertionError(f"the wire was still busy after {limit} deliveries")

    def sent(self, session: PeerSession, conn: int, kind: type = object) -> list[Message]:
        return [
            a.msg
            for a in self.actions.get(id(session), [])
            if isinstance(a, Send) and a.conn == conn and isinstance(a.msg, kind)
        ]

    def closes(self, session: PeerSession) -> list[Close]:
        return [a for a in self.actions.get(id(session), []) if isinstance(a, Close)]
