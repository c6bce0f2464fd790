"""The peer wire protocol, sans I/O.

Nothing here touches a socket: the caller feeds received bytes into a
:class:`FrameDecoder` and pulls events out, and turns messages into bytes with
:func:`encode`. That keeps every framing edge testable without a network and lets
the engine choose how to move piece payloads (``sendfile`` out, ``recv_into`` in).

Framing
-------
Every frame starts with a 5-byte header::

    +----------------+------+------------------+
    | length: u32 BE | type | body (length - 1) |
    +----------------+------+------------------+

``length`` counts the type byte and the body, so it is at least 1. Bodies are
fixed ``struct`` layouts (network byte order), not msgpack: every field has a
fixed width, so a body's size is known from its type before a byte of it is
buffered, and nothing a remote sends can make the decoder allocate more than
``max_frame`` bytes.

A ``BLOCK`` frame's body is only its header (piece, offset, length); exactly
``length`` raw payload bytes follow the frame and are *not* counted in the frame
length. The payload never goes through an encoder, so a sender can ``sendfile``
it straight from the piece store and a receiver can ``recv_into`` its
destination buffer.

=====  ===========  ==========================================================
type   message      body
=====  ===========  ==========================================================
0      Hello        magic ``b"SWRM"``, version u16, nonce 16 B, proof 32 B
                    (54 bytes; the dialer's proof is 32 zero bytes)
1      KeepAlive    empty
2      BitfieldMsg  ``ceil(num_pieces / 8)`` bytes, BitTorrent bit order
3      Have         piece u32
4      Request      piece u32, offset u32, length u32, held u32 (KiB the sender holds)
5      Cancel       piece u32, offset u32, length u32
6      Reject       piece u32, offset u32, length u32
7      BlockHeader  piece u32, offset u32, length u32; then ``length`` payload bytes
8      Handshake    root 32 B, peer id 20 B, listen port u16, proof 32 B (86 bytes)
9      Partial      piece u32, block size u32, bits (blocks of the piece it serves)
=====  ===========  ==========================================================

Each side sends exactly one Hello, then exactly one Handshake, then anything
else; the decoder refuses any other order (a frame before the Hello, a frame
between the Hello and the Handshake, a second Hello or Handshake).

Connecting
----------
Nothing that identifies the swarm (root, peer id, bitfield) is sent to a
connection that has not proved the cluster token (:mod:`core.auth`). The
dialer speaks first and the acceptor proves the token first, so a process that
merely connects to a peer's port learns a nonce and nothing else::

    dialer                                         acceptor
    Hello(nonce_d)                           ->
                                             <-    Hello(nonce_a, proof_a)
    checks proof_a
    Handshake(root, id_d, proof_d)           ->
                                                   checks proof_d and the root
                                             <-    Handshake(root, id_a, proof_i), Bitfield
    checks proof_i and the root
    Bitfield                                 ->

    proof_a = mac("peer-accept",    nonce_d, nonce_a)
    proof_d = mac("peer-dial",      nonce_a, nonce_d, root, id_d)
    proof_i = mac("peer-accept-id", nonce_d, nonce_a, root, id_a)

Each proof covers a nonce the *checking* side chose just now, so no recorded
exchange can be replayed, and each has its own purpose, so an acceptor's proof
can't be reflected back as a dialer's. :class:`PeerHandshake` is this flow as a
pure state machine; the engine feeds it the remote's Hello and Handshake and
sends what it returns. With an open cluster key the flow is the same and every
check passes. The token protects who may join and read, not the frames after
the handshake: those carry no MAC (see the README's security model).

Versioning
----------
:data:`PROTOCOL_VERSION` is 4. 3 added the requester's piece count to Request,
which the server's upload order reads, and Partial, the checked blocks of a piece
not yet whole that the sender serves: cut-through relay. 4 counts what the
requester holds in KiB of checked data, its checked blocks of pieces not yet
whole included, instead of whole pieces: in the first second of a burst of big
pieces nobody holds a whole one, and a count of pieces left the server's order
blind just when it decides who lags (see :mod:`swarm.choker`). It changes whenever a
frame's layout or meaning changes; peers with different versions refuse each other at the Hello (there is
one version per cluster roll-out, so no negotiation). The magic and version come
first in the first frame of every version (version 1's first frame was its
Handshake, type 0, with the same prefix), so a peer of another version, older or
newer, is reported as "wrong version", not as garbage.

Errors
------
Building an invalid message (a negative piece, a 31-byte root, a block past the
largest piece) raises :class:`~core.errors.LocalProtocolError`, and so does
encoding a block longer than :data:`MAX_BLOCK`: that is our bug. (A message may
name a longer block than the wire carries: the simulator's sessions move a whole
piece as one block.) Anything invalid the remote sends raises
:class:`~core.errors.RemoteProtocolError` from :meth:`FrameDecoder.next_event`,
with a message saying what was wrong; the caller drops that peer. After an
error the decoder stays failed. :meth:`PeerHandshake.receive` raises
RemoteProtocolError too, for a bad proof, a wrong root or a frame out of order.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

from core.auth import MAC_SIZE, NONCE_SIZE, ClusterKey
from core.bitfield import Bitfield
from core.digest import PEER_ID_LENGTH
from core.errors import LocalProtocolError, RemoteProtocolError
from core.manifest import MAX_BLOCK_SIZE

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MAX_FRAME",
    "HANDSHAKE_MAGIC",
    "HELD_UNIT",
    "MAX_BLOCK",
    "MAX_HELD",
    "MAX_PIECES",
    "MAX_PIECE_LENGTH",
    "MIN_PARTIAL_BLOCK",
    "NEED_DATA",
    "PEER_ID_LENGTH",
    "PROTOCOL_VERSION",
    "ROOT_LENGTH",
    "BitfieldMsg",
    "BlockEnd",
    "BlockHeader",
    "BlockPayload",
    "Cancel",
    "ConnectionClosed",
    "Event",
    "FrameDecoder",
    "Handshake",
    "Have",
    "Hello",
    "KeepAlive",
    "Message",
    "NeedData",
    "Partial",
    "PeerHandshake",
    "Reject",
    "Request",
    "encode",
]

PROTOCOL_VERSION: Final = 4
"""Wire version spoken by this code; peers with another version are refused."""

HANDSHAKE_MAGIC: Final = b"SWRM"
ROOT_LENGTH: Final = 32


MAX_PIECES: Final = 1 << 22
"""Most pieces an artifact may have (4 Mi; a 1 TB model at 256 MiB pieces has ~4000)."""

MAX_PIECE_LENGTH: Final = 1 << 32
"""A block's ``offset + length`` never exceeds this (pieces are at most 4 GiB)."""

HELD_UNIT: Final = 1 << 10
"""A Request's ``held`` counts checked bytes in these units (KiB)."""

MAX_HELD: Final = (1 << 32) - 1
"""Largest ``held`` a Request can carry (u32: 4 TiB; a sender holding more says this)."""

MAX_BLOCK: Final = MAX_BLOCK_SIZE  # a format-2 manifest's blocks are never larger
"""Largest block payload a request may ask for or a block frame may carry."""

MIN_PARTIAL_BLOCK: Final = 16 << 10
"""Smallest block a Partial may count in (its bits for a 4 GiB piece fit in 32 KiB)."""

_MAX_PARTIAL_BITS: Final = (MAX_PIECE_LENGTH // MIN_PARTIAL_BLOCK + 7) // 8

DEFAULT_BLOCK_SIZE: Final = 4 << 20
"""Block size requesters use unless configured otherwise."""

_HEADER = struct.Struct("!IB")
_HELLO = struct.Struct(f"!4sH{NONCE_SIZE}s{MAC_SIZE}s")
_HELLO_PREFIX = struct.Struct("!4sH")
_HANDSHAKE = struct.Struct(f"!32s20sH{MAC_SIZE}s")
_PIECE = struct.Struct("!I")
_RANGE = struct.Struct("!III")
_PARTIAL = struct.Struct("!II")  # piece, block size; then the block bits
_REQUEST = struct.Struct("!IIII")  # a range and the KiB the requester holds

HEADER_SIZE: Final = _HEADER.size

DEFAULT_MAX_FRAME: Final = 1 + MAX_PIECES // 8
"""Default bound on one frame (type byte and body): a bitfield of MAX_PIECES pieces."""

# A remote's first frame may be longer than our Hello (another version); we read
# at most this much of it to report its version before refusing it.
_MAX_HELLO_BODY: Final = 1024

_U16_MAX: Final = 0xFFFF
_U32_MAX: Final = 0xFFFF_FFFF


# -- messages ---------------------------------------------------------------


def _check_int(owner: str, name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise LocalProtocolError(f"{owner}.{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise LocalProtocolError(f"{owner}.{name}={value} is outside [{low}, {high}]")


def _check_bytes(owner: str, name: str, value: object, length: int) -> None:
    if not isinstance(value, bytes):
        raise LocalProtocolError(f"{owner}.{name} must be bytes, got {type(value).__name__}")
    if len(value) != length:
        raise LocalProtocolError(f"{owner}.{name} must be {length} bytes, got {len(value)}")


_NO_PROOF: Final = bytes(MAC_SIZE)


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame each side sends: protocol version, a fresh nonce, and (acceptor) a proof.

    The dialer's Hello reveals nothing but the version; its ``proof`` is zeros.
    The acceptor's proves the token over both nonces (see the module docstring).
    """

    version: int
    nonce: bytes
    proof: bytes = _NO_PROOF

    def __post_init__(self) -> None:
        _check_int("Hello", "version", self.version, 1, _U16_MAX)
        _check_bytes("Hello", "nonce", self.nonce, NONCE_SIZE)
        _check_bytes("Hello", "proof", self.proof, MAC_SIZE)


@dataclass(frozen=True, slots=True)
class Handshake:
    """Second frame each side sends: which artifact, who it is, where it listens, and proof."""

    root: bytes
    peer_id: bytes
    listen_port: int
    proof: bytes

    def __post_init__(self) -> None:
        _check_bytes("Handshake", "root", self.root, ROOT_LENGTH)
        _check_bytes("Handshake", "peer_id", self.peer_id, PEER_ID_LENGTH)
        # 0 means "I accept no incoming connections".
        _check_int("Handshake", "listen_port", self.listen_port, 0, _U16_MAX)
        _check_bytes("Handshake", "proof", self.proof, MAC_SIZE)


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """Sent on an idle connection so the other side knows we are alive."""


@dataclass(frozen=True, slots=True)
class BitfieldMsg:
    """Every piece the sender has verified; sent once, right after the handshake."""

    bits: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.bits, bytes):
            raise LocalProtocolError(
                f"BitfieldMsg.bits must be bytes, got {type(self.bits).__name__}"
            )
        if len(self.bits) > MAX_PIECES // 8:
            raise LocalProtocolError(
                f"BitfieldMsg.bits is {len(self.bits)} bytes, more than {MAX_PIECES // 8}"
            )

    @classmethod
    def from_bitfield(cls, bitfield: Bitfield) -> BitfieldMsg:
        return cls(bitfield.to_bytes())

    def to_bitfield(self, num_pieces: int) -> Bitfield:
        """Parse the bits for an artifact of ``num_pieces`` pieces.

        Raises RemoteProtocolError if the length or spare bits are wrong (the
        message came from a remote peer).
        """
        try:
            return Bitfield.from_bytes(self.bits, num_pieces)
        except ValueError as exc:
            raise RemoteProtocolError(f"bad bitfield: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Have:
    """The sender has verified ``piece`` since its bitfield."""

    piece: int

    def __post_init__(self) -> None:
        _check_int("Have", "piece", self.piece, 0, MAX_PIECES - 1)


@dataclass(frozen=True, slots=True)
class Partial:
    """Blocks of ``piece`` the sender holds, each checked against the manifest, and
    serves before the piece is whole (cut-through relay; see :mod:`swarm.session`).

    Bit ``i`` of ``bits`` (BitTorrent bit order, as a bitfield) is bytes
    ``[i * block_size, (i + 1) * block_size)`` of the piece. A later Partial of
    the piece replaces it; a Have of the piece ends it.
    """

    piece: int
    block_size: int
    bits: bytes

    def __post_init__(self) -> None:
        _check_int("Partial", "piece", self.piece, 0, MAX_PIECES - 1)
        _check_int("Partial", "block_size", self.block_size, MIN_PARTIAL_BLOCK, MAX_BLOCK)
        if not isinstance(self.bits, bytes):
            raise LocalProtocolError(f"Partial.bits must be bytes, got {type(self.bits).__name__}")
        if not 1 <= len(self.bits) <= _MAX_PARTIAL_BITS:
            raise LocalProtocolError(
                f"Partial.bits is {len(self.bits)} bytes, not in 1..{_MAX_PARTIAL_BITS}"
            )

    @classmethod
    def of(cls, piece: int, block_size: int, blocks: Bitfield) -> Partial:
        return cls(piece, block_size, blocks.to_bytes())

    def blocks(self, num_blocks: int) -> Bitfield:
        """The bits as a bitfield of ``num_blocks``; RemoteProtocolError if they don't fit."""
        try:
            return Bitfield.from_bytes(self.bits, num_blocks)
        except ValueError as exc:
            raise RemoteProtocolError(f"bad partial of piece {self.piece}: {exc}") from exc


def _check_range(owner: str, piece: int, offset: int, length: int) -> None:
    _check_int(owner, "piece", piece, 0, MAX_PIECES - 1)
    _check_int(owner, "offset", offset, 0, _U32_MAX)
    _check_int(owner, "length", length, 1, MAX_PIECE_LENGTH)
    if offset + length > MAX_PIECE_LENGTH:
        raise LocalProtocolError(
            f"{owner} offset {offset} + length {length} runs past the largest piece "
            f"({MAX_PIECE_LENGTH} bytes)"
        )


@dataclass(frozen=True, slots=True)
class Request:
    """Please send ``length`` bytes of ``piece`` starting at ``offset``.

    ``held`` is how much checked data the requester holds as it asks, in
    :data:`HELD_UNIT` (KiB): its verified pieces and the checked blocks of pieces
    not yet whole. The server serves the requester furthest behind first (see
    :mod:`swarm.choker`). HAVEs can't tell it that, because a peer announces a
    piece only to those that lack it. It is advice, not part of the request's
    identity: a Cancel matches a Request whatever its ``held``.
    """

    piece: int
    offset: int
    length: int
    held: int = field(default=0, compare=False)

    def __post_init__(self) -> None:
        _check_range("Request", self.piece, self.offset, self.length)
        if not 0 <= self.held <= MAX_HELD:
            raise LocalProtocolError(f"Request held {self.held} is not in 0..{MAX_HELD}")


@dataclass(frozen=True, slots=True)
class Cancel:
    """Forget an earlier Request (it was served by another peer)."""

    piece: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        _check_range("Cancel", self.piece, self.offset, self.length)


@dataclass(frozen=True, slots=True)
class Reject:
    """The sender will not serve this Request (doesn't have it, or is shutting down)."""

    piece: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        _check_range("Reject", self.piece, self.offset, self.length)


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """A block of ``piece`` at ``offset``; exactly ``length`` raw payload bytes follow."""

    piece: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        _check_range("BlockHeader", self.piece, self.offset, self.length)


Message: TypeAlias = (
    Hello
    | Handshake
    | KeepAlive
    | BitfieldMsg
    | Have
    | Partial
    | Request
    | Cancel
    | Reject
    | BlockHeader
)

# -- the connect flow -------------------------------------------------------


class PeerHandshake:
    """The connect flow of one connection, as a pure state machine (see "Connecting").

    :meth:`start` gives the frames to send on connect (the dialer's Hello, nothing
    for the acceptor); :meth:`receive` takes the remote's Hello or Handshake,
    checks it, and gives the frames to send in reply. Once :attr:`done`,
    :attr:`remote` is the remote's checked Handshake. A bad proof, a wrong root or
    a frame out of order raises RemoteProtocolError, and the handshake stays failed.

    The acceptor's reply to the dialer's Handshake is its own Handshake: the
    caller sends it (and then its bitfield) only after its own checks of the
    remote's peer id (ourselves, barred, a duplicate connection).
    """

    def __init__(
        self,
        key: ClusterKey,
        *,
        dialer: bool,
        root: bytes,
        peer_id: bytes,
        listen_port: int,
        nonce: bytes,
    ) -> None:
        _check_bytes("PeerHandshake", "nonce", nonce, NONCE_SIZE)
        # Builds (and so checks) our Handshake's fields before anything is sent.
        Handshake(root, peer_id, listen_port, _NO_PROOF)
        self.key = key
        self.dialer = dialer
        self.root = root
        self.peer_id = peer_id
        self.listen_port = listen_port
        self.nonce = nonce
        self.remote_nonce = b""
        self.remote: Handshake | None = None
        self._error = ""

    @property
    def heard(self) -> bool:
        """The remote's Hello arrived: it speaks our protocol and version."""
        return bool(self.remote_nonce)

    @property
    def done(self) -> bool:
        """The remote proved the token and sent a Handshake for our root."""
        return self.remote is not None

    def start(self) -> list[Message]:
        """Frames to send as soon as the connection is up."""
        return [Hello(PROTOCOL_VERSION, self.nonce)] if self.dialer else []

    def receive(self, msg: Hello | Handshake) -> list[Message]:
        """Check the remote's ``msg``; the frames to send in reply."""
        if self._error:
            raise RemoteProtocolError(f"handshake already failed: {self._error}")
        try:
            if isinstance(msg, Hello):
                return self._hello(msg)
            return self._handshake(msg)
        except RemoteProtocolError as exc:
            self._error = str(exc)
            raise

    def _hello(self, msg: Hello) -> list[Message]:
        if self.remote_nonce:
            raise RemoteProtocolError("second hello on one connection")
        if msg.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"peer speaks protocol version {msg.version}, we speak {PROTOCOL_VERSION}"
            )
        self.remote_nonce = msg.nonce
        if not self.dialer:
            proof = self.key.mac(b"peer-accept", msg.nonce, self.nonce)
            return [Hello(PROTOCOL_VERSION, self.nonce, proof)]
        if not self.key.check(msg.proof, b"peer-accept", self.nonce, msg.nonce):
            raise RemoteProtocolError(
                "its hello does not prove our cluster token (another token, or none)"
            )
        proof = self.key.mac(b"peer-dial", msg.nonce, self.nonce, self.root, self.peer_id)
        return [Handshake(self.root, self.peer_id, self.listen_port, proof)]

    def _handshake(self, msg: Handshake) -> list[Message]:
        if not self.remote_nonce:
            raise RemoteProtocolError("handshake before the hello")
        if self.remote is not None:
            raise RemoteProtocolError("second handshake on one connection")
        purpose = b"peer-accept-id" if self.dialer else b"peer-dial"
        if not self.key.check(
            msg.proof, purpose, self.nonce, self.remote_nonce, msg.root, msg.peer_id
        ):
            raise RemoteProtocolError(
                "its handshake does not prove our cluster token (another token, or none)"
            )
        if msg.root != self.root:
            raise RemoteProtocolError(
                f"peer is in another swarm (root {msg.root.hex()[:12]}, ours {self.root.hex()[:12]})"
            )
        self.remote = msg
        if self.dialer:
            return []
        proof = self.key.mac(
            b"peer-accept-id", self.remote_nonce, self.nonce, self.root, self.peer_id
        )
        return [Handshake(self.root, self.peer_id, self.listen_port, proof)]


# -- decoder-only events ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlockPayload:
    """Payload bytes of the current block that were already buffered.

    ``data`` is a read-only view of bytes the decoder will not reuse, so it may be
    kept (or written to disk later) without copying.
    """

    data: memoryview


@dataclass(frozen=True, slots=True)
class BlockEnd:
    """The payload of the block announced by the last BlockHeader is complete."""

    piece: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The remote closed the connection cleanly, between frames."""


class NeedData(enum.Enum):
    """Sentinel type of :data:`NEED_DATA`."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
"""Returned by :meth:`FrameDecoder.next_event` when it needs more bytes."""

Event: TypeAlias = (
    Message | BlockPayload | BlockEnd | ConnectionClosed | Literal[NeedData.NEED_DATA]
)


# -- encoding ---------------------------------------------------------------

_T_HELLO: Final = 0
_T_KEEPALIVE: Final = 1
_T_BITFIELD: Final = 2
_T_HAVE: Final = 3
_T_REQUEST: Final = 4
_T_CANCEL: Final = 5
_T_REJECT: Final = 6
_T_BLOCK: Final = 7
_T_HANDSHAKE: Final = 8
_T_PARTIAL: Final = 9

_TYPE_NAMES: Final = {
    _T_HELLO: "hello",
    _T_HANDSHAKE: "handshake",
    _T_KEEPALIVE: "keep-alive",
    _T_BITFIELD: "bitfield",
    _T_HAVE: "have",
    _T_REQUEST: "request",
    _T_CANCEL: "cancel",
    _T_REJECT: "reject",
    _T_BLOCK: "block",
    _T_PARTIAL: "partial",
}

# Body size of each fixed-size frame type.
_FIXED_BODY: Final = {
    _T_KEEPALIVE: 0,
    _T_HAVE: _PIECE.size,
    _T_REQUEST: _REQUEST.size,
    _T_CANCEL: _RANGE.size,
    _T_REJECT: _RANGE.size,
    _T_BLOCK: _RANGE.size,
}

_RANGE_TYPES: Final[dict[type, int]] = {
    Cancel: _T_CANCEL,
    Reject: _T_REJECT,
    BlockHeader: _T_BLOCK,
}


def _frame(frame_type: int, body: bytes) -> bytes:
    return _HEADER.pack(1 + len(body), frame_type) + body


def _check_wire_length(msg: Request | Cancel | Reject | BlockHeader) -> None:
    if msg.length > MAX_BLOCK:
        raise LocalProtocolError(
            f"{type(msg).__name__} length {msg.length} is over the wire's largest block"
            f" ({MAX_BLOCK} bytes)"
        )


def encode(msg: Message) -> bytes:
    """The bytes of one frame.

    For a :class:`BlockHeader` this is only the frame; the caller sends the
    ``length`` payload bytes right after it. Raises LocalProtocolError for
    something that is not a message, or a block longer than :data:`MAX_BLOCK`.
    """
    if isinstance(msg, Request):
        _check_wire_length(msg)
        return _frame(_T_REQUEST, _REQUEST.pack(msg.piece, msg.offset, msg.length, msg.held))
    if isinstance(msg, Cancel | Reject | BlockHeader):
        _check_wire_length(msg)
        return _frame(_RANGE_TYPES[type(msg)], _RANGE.pack(msg.piece, msg.offset, msg.length))
    if isinstance(msg, Have):
        return _frame(_T_HAVE, _PIECE.pack(msg.piece))
    if isinstance(msg, Partial):
        return _frame(_T_PARTIAL, _PARTIAL.pack(msg.piece, msg.block_size) + msg.bits)
    if isinstance(msg, KeepAlive):
        return _frame(_T_KEEPALIVE, b"")
    if isinstance(msg, BitfieldMsg):
        return _frame(_T_BITFIELD, msg.bits)
    if isinstance(msg, Hello):
        return _frame(_T_HELLO, _HELLO.pack(HANDSHAKE_MAGIC, msg.version, msg.nonce, msg.proof))
    if isinstance(msg, Handshake):
        body = _HANDSHAKE.pack(msg.root, msg.peer_id, msg.listen_port, msg.proof)
        return _frame(_T_HANDSHAKE, body)
    raise LocalProtocolError(f"cannot encode {type(msg).__name__}: not a wire message")


# -- decoding ---------------------------------------------------------------


class _State(enum.Enum):
    HEADER = "header"
    BODY = "body"
    PAYLOAD = "payload"
    CLOSED = "closed"
    FAILED = "failed"


class FrameDecoder:
    """Turns received bytes into messages, one frame at a time.

    Feed bytes with :meth:`feed` and call :meth:`next_event` until it returns
    :data:`NEED_DATA`. Events are messages, then for each BlockHeader one or more
    :class:`BlockPayload` chunks and a :class:`BlockEnd`, and
    :class:`ConnectionClosed` after :meth:`feed_eof` at a frame boundary.

    Big payloads need not pass through the decoder at all: whenever
    ``next_event()`` returns NEED_DATA with ``payload_remaining > 0`` the buffer is
    empty, and the caller may ``recv_into`` its destination buffer (at most
    ``payload_remaining`` bytes) and then report the count with
    :meth:`payload_consumed`. Either way the next event after the last payload
    byte is BlockEnd.

    Bounds: ``max_frame`` caps a frame's length field (checked as soon as the 5-byte
    header is buffered, before any body is buffered), ``max_block`` caps request and
    block lengths, and once the layout is known (``num_pieces`` or
    ``piece_lengths``, in the constructor or via :meth:`set_layout`) pieces must be
    in range, bitfields must be exactly ``ceil(num_pieces / 8)`` bytes with clean
    spare bits, and with ``piece_lengths`` a block must lie inside its piece. The
    decoder never holds more than ``HEADER_SIZE + max_frame`` bytes of one frame;
    the caller decides how much it reads per :meth:`feed`.
    """

    def __init__(
        self,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_block: int = MAX_BLOCK,
        num_pieces: int | None = None,
        piece_lengths: Sequence[int] | None = None,
    ) -> None:
        minimum = 1 + max(_HELLO.size, _HANDSHAKE.size)
        if not minimum <= max_frame <= _U32_MAX:
            raise ValueError(f"max_frame must be in [{minimum}, {_U32_MAX}], got {max_frame}")
        if not 1 <= max_block <= MAX_BLOCK:
            raise ValueError(f"max_block must be in [1, {MAX_BLOCK}], got {max_block}")
        self.max_frame = max_frame
        self.max_block = max_block
        self._num_pieces: int | None = None
        self._piece_lengths: Sequence[int] | None = None
        self._held_limit = MAX_HELD  # the artifact's size in HELD_UNITs, once known
        if num_pieces is not None or piece_lengths is not None:
            self.set_layout(num_pieces, piece_lengths)

        self._chunks: deque[memoryview] = deque()
        self._buffered = 0
        self._eof = False
        self._state = _State.HEADER
        # Frames of the connect flow seen so far: 0, then 1 (the Hello), then 2 (the Handshake).
        self._stage = 0
        self._frame_type = 0
        self._body_size = 0
        self._block: BlockHeader | None = None
        self._payload_remaining = 0
        self._error = ""

    # -- configuration ------------------------------------------------------

    def set_layout(
        self, num_pieces: int | None = None, piece_lengths: Sequence[int] | None = None
    ) -> None:
        """Tell the decoder the artifact's piece count (and optionally lengths).

        Usually called once the handshake's root has been matched to a manifest.
        """
        if piece_lengths is not None:
            if num_pieces is not None and num_pieces != len(piece_lengths):
                raise ValueError(
                    f"num_pieces={num_pieces} disagrees with {len(piece_lengths)} piece lengths"
                )
            num_pieces = len(piece_lengths)
        if num_pieces is None:
            raise ValueError("set_layout needs num_pieces or piece_lengths")
        if not 0 <= num_pieces <= MAX_PIECES:
            raise ValueError(f"num_pieces must be in [0, {MAX_PIECES}], got {num_pieces}")
        if 1 + (num_pieces + 7) // 8 > self.max_frame:
            raise ValueError(
                f"max_frame={self.max_frame} is too small for a bitfield of {num_pieces} pieces"
            )
        self._num_pieces = num_pieces
        self._piece_lengths = piece_lengths
        if piece_lengths is not None:
            self._held_limit = min(MAX_HELD, -(-sum(piece_lengths) // HELD_UNIT))

    @property
    def num_pieces(self) -> int | None:
        return self._num_pieces

    # -- input --------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes. ``bytes`` are kept as-is; other buffers are copied."""
        if self._eof:
            raise LocalProtocolError("feed() after feed_eof()")
        if not data or self._state is _State.FAILED:
            return  # a failed connection is being dropped: don't buffer for it
        view = memoryview(data if isinstance(data, bytes) else bytes(data)).cast("B")
        self._chunks.append(view)
        self._buffered += len(view)

    def feed_eof(self) -> None:
        """The remote closed the connection; no more bytes will come."""
        self._eof = True

    @property
    def buffered(self) -> int:
        """Bytes received but not yet turned into events."""
        return self._buffered

    @property
    def payload_remaining(self) -> int:
        """Payload bytes of the current block not yet delivered (0 outside a block)."""
        return self._payload_remaining

    def payload_consumed(self, n: int) -> None:
        """Report ``n`` payload bytes the caller read itself, bypassing :meth:`feed`.

        Only allowed while nothing is buffered (after next_event() returned
        NEED_DATA inside a block) and for at most ``payload_remaining`` bytes.
        """
        if self._state is not _State.PAYLOAD:
            raise LocalProtocolError("payload_consumed() outside a block payload")
        if self._buffered:
            raise LocalProtocolError(
                f"payload_consumed() with {self._buffered} bytes still buffered; "
                "drain next_event() first"
            )
        if not 0 <= n <= self._payload_remaining:
            raise LocalProtocolError(
                f"payload_consumed({n}) but only {self._payload_remaining} payload bytes remain"
            )
        self._payload_remaining -= n

    # -- output -------------------------------------------------------------

    def next_event(self) -> Event:
        """The next event, or NEED_DATA. Raises RemoteProtocolError on bad input."""
        if self._state is _State.FAILED:
            raise RemoteProtocolError(f"connection already failed: {self._error}")
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._state = _State.FAILED
            self._error = str(exc)
            self._chunks.clear()
            self._buffered = 0
            raise

    def _fail(self, message: str) -> RemoteProtocolError:
        return RemoteProtocolError(message)

    def _next_event(self) -> Event:
        state = self._state
        if state is _State.PAYLOAD:
            return self._next_payload()
        if state is _State.CLOSED:
            return ConnectionClosed()
        if state is _State.HEADER:
            if self._buffered < HEADER_SIZE:
                return self._need_data(HEADER_SIZE)
            # The header stays buffered until the whole frame is, so ``buffered``
            # counts every byte not yet turned into an event.
            length, frame_type = _HEADER.unpack(self._peek(HEADER_SIZE))
            self._start_frame(length, frame_type)
        frame_size = HEADER_SIZE + self._body_size
        if self._buffered < frame_size:
            return self._need_data(frame_size)
        body = self._take(frame_size)[HEADER_SIZE:]
        self._state = _State.HEADER
        return self._parse_body(self._frame_type, body)

    def _need_data(self, wanted: int) -> Event:
        if not self._eof:
            return NEED_DATA
        if self._state is _State.HEADER and self._buffered == 0:
            self._state = _State.CLOSED
            return ConnectionClosed()
        where = "frame header" if self._state is _State.HEADER else self._describe_frame()
        raise self._fail(
            f"connection closed inside a {where}: got {self._buffered} of {wanted} bytes"
        )

    def _describe_frame(self) -> str:
        name = _TYPE_NAMES.get(self._frame_type, str(self._frame_type))
        if self._state is _State.PAYLOAD:
            return f"{name} payload"
        return f"{name} frame"

    def _start_frame(self, length: int, frame_type: int) -> None:
        if length == 0:
            raise self._fail("frame length is 0 (a frame has at least its type byte)")
        if length > self.max_frame:
            raise self._fail(f"frame length {length} exceeds the limit of {self.max_frame}")
        body_size = length - 1
        if frame_type not in _TYPE_NAMES:
            raise self._fail(f"unknown frame type {frame_type} (length {length})")
        name = _TYPE_NAMES[frame_type]
        if self._stage == 0:
            if frame_type != _T_HELLO:
                raise self._fail(f"expected a hello as the first frame, got a {name} frame")
            if not _HELLO_PREFIX.size <= body_size <= _MAX_HELLO_BODY:
                raise self._fail(f"hello body is {body_size} bytes, expected {_HELLO.size}")
        elif self._stage == 1:
            if frame_type != _T_HANDSHAKE:
                raise self._fail(f"expected a handshake after the hello, got a {name} frame")
            if body_size != _HANDSHAKE.size:
                raise self._fail(f"handshake body is {body_size} bytes, expected {_HANDSHAKE.size}")
        elif frame_type in (_T_HELLO, _T_HANDSHAKE):
            raise self._fail(f"second {name} on one connection")
        elif frame_type == _T_BITFIELD:
            if self._num_pieces is not None:
                expected = (self._num_pieces + 7) // 8
                if body_size != expected:
                    raise self._fail(
                        f"bitfield is {body_size} bytes, expected {expected} "
                        f"for {self._num_pieces} pieces"
                    )
            elif body_size > MAX_PIECES // 8:
                raise self._fail(f"bitfield is {body_size} bytes, more than {MAX_PIECES // 8}")
        elif frame_type == _T_PARTIAL:
            if not _PARTIAL.size < body_size <= _PARTIAL.size + _MAX_PARTIAL_BITS:
                raise self._fail(
                    f"partial frame body is {body_size} bytes, not in "
                    f"{_PARTIAL.size + 1}..{_PARTIAL.size + _MAX_PARTIAL_BITS}"
                )
        elif body_size != _FIXED_BODY[frame_type]:
            raise self._fail(
                f"{name} frame body is {body_size} bytes, expected {_FIXED_BODY[frame_type]}"
            )
        self._frame_type = frame_type
        self._body_size = body_size
        self._state = _State.BODY

    def _parse_body(self, frame_type: int, body: memoryview) -> Event:
        if frame_type == _T_HELLO:
            return self._parse_hello(body)
        if frame_type == _T_HANDSHAKE:
            root, peer_id, port, proof = _HANDSHAKE.unpack(body)
            self._stage = 2
            return Handshake(root, peer_id, port, proof)
        if frame_type == _T_KEEPALIVE:
            return KeepAlive()
        if frame_type == _T_BITFIELD:
            bits = bytes(body)
            if self._num_pieces is not None:
                try:
                    Bitfield.from_bytes(bits, self._num_pieces)
                except ValueError as exc:
                    raise self._fail(f"bad bitfield: {exc}") from exc
            return BitfieldMsg(bits)
        if frame_type == _T_HAVE:
            (piece,) = _PIECE.unpack(body)
            self._check_piece("have", piece)
            return Have(piece)
        if frame_type == _T_PARTIAL:
            piece, block_size = _PARTIAL.unpack_from(body)
            self._check_piece("partial", piece)
            if not MIN_PARTIAL_BLOCK <= block_size <= MAX_BLOCK:
                raise self._fail(
                    f"partial of piece {piece} counts in blocks of {block_size} bytes, "
                    f"not in {MIN_PARTIAL_BLOCK}..{MAX_BLOCK}"
                )
            bits = bytes(body[_PARTIAL.size :])
            if self._piece_lengths is not None:
                num_blocks = -(-self._piece_lengths[piece] // block_size)
                try:
                    Bitfield.from_bytes(bits, num_blocks)
                except ValueError as exc:
                    raise self._fail(f"bad partial of piece {piece}: {exc}") from exc
            return Partial(piece, block_size, bits)
        held = 0
        if frame_type == _T_REQUEST:
            piece, offset, length, held = _REQUEST.unpack(body)
        else:
            piece, offset, length = _RANGE.unpack(body)
        name = _TYPE_NAMES[frame_type]
        self._check_piece(name, piece)
        if not 1 <= length <= self.max_block:
            raise self._fail(
                f"{name} for piece {piece} has length {length}, limit {self.max_block}"
            )
        end = offset + length
        limit = MAX_PIECE_LENGTH
        if self._piece_lengths is not None:
            limit = self._piece_lengths[piece]
        if end > limit:
            raise self._fail(
                f"{name} for piece {piece} covers bytes {offset}..{end}, "
                f"past the piece's {limit} bytes"
            )
        if frame_type == _T_REQUEST:
            if held > self._held_limit:
                raise self._fail(
                    f"request says it holds {held} KiB, but the artifact is {self._held_limit} KiB"
                )
            return Request(piece, offset, length, held)
        if frame_type == _T_CANCEL:
            return Cancel(piece, offset, length)
        if frame_type == _T_REJECT:
            return Reject(piece, offset, length)
        header = BlockHeader(piece, offset, length)
        self._block = header
        self._payload_remaining = length
        self._state = _State.PAYLOAD
        return header

    def _parse_hello(self, body: memoryview) -> Hello:
        magic, version = _HELLO_PREFIX.unpack_from(body)
        if magic != HANDSHAKE_MAGIC:
            raise self._fail(f"hello magic is {bytes(magic)!r}, expected {HANDSHAKE_MAGIC!r}")
        if version != PROTOCOL_VERSION:
            raise self._fail(
                f"peer speaks protocol version {version}, we speak {PROTOCOL_VERSION}: "
                "every peer of a cluster must run the same swarm release"
            )
        if len(body) != _HELLO.size:
            raise self._fail(f"hello body is {len(body)} bytes, expected {_HELLO.size}")
        _, _, nonce, proof = _HELLO.unpack(body)
        self._stage = 1
        return Hello(version, nonce, proof)

    def _check_piece(self, name: str, piece: int) -> None:
        limit = self._num_pieces if self._num_pieces is not None else MAX_PIECES
        if piece >= limit:
            raise self._fail(f"{name} names piece {piece}, but there are only {limit}")

    def _next_payload(self) -> Event:
        block = self._block
        assert block is not None
        if self._payload_remaining == 0:
            self._block = None
            self._state = _State.HEADER
            return BlockEnd(block.piece, block.offset, block.length)
        if self._buffered == 0:
            if self._eof:
                raise self._fail(
                    f"connection closed inside the payload of piece {block.piece} "
                    f"offset {block.offset}: {self._payload_remaining} of "
                    f"{block.length} bytes missing"
                )
            return NEED_DATA
        chunk = self._chunks[0]
        if len(chunk) > self._payload_remaining:
            self._chunks[0] = chunk[self._payload_remaining :]
            chunk = chunk[: self._payload_remaining]
        else:
            self._chunks.popleft()
        self._buffered -= len(chunk)
        self._payload_remaining -= len(chunk)
        return BlockPayload(chunk.toreadonly())

    def _peek(self, n: int) -> bytes:
        """The first ``n`` buffered bytes, left in the buffer (caller checked they exist)."""
        first = self._chunks[0]
        if len(first) >= n:
            return bytes(first[:n])
        parts: list[memoryview] = []
        need = n
        for chunk in self._chunks:
            parts.append(chunk[:need])
            need -= len(parts[-1])
            if not need:
                break
        return b"".join(parts)

    def _take(self, n: int) -> memoryview:
        """Remove and return the first ``n`` buffered bytes (caller checked they exist)."""
        self._buffered -= n
        if n == 0:
            return memoryview(b"")
        first = self._chunks[0]
        if len(first) >= n:
            if len(first) == n:
                self._chunks.popleft()
            else:
                self._chunks[0] = first[n:]
            return first[:n]
        parts: list[memoryview] = []
        need = n
        while need:
            chunk = self._chunks.popleft()
            if len(chunk) > need:
                self._chunks.appendleft(chunk[need:])
                chunk = chunk[:need]
            parts.append(chunk)
            need -= len(chunk)
        return memoryview(b"".join(parts))
