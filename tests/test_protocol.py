from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.auth import ClusterKey
from core.bitfield import Bitfield
from core.errors import LocalProtocolError, RemoteProtocolError
from swarm.protocol import (
    HEADER_SIZE,
    HELD_UNIT,
    MAX_BLOCK,
    MAX_HELD,
    MIN_PARTIAL_BLOCK,
    NEED_DATA,
    PROTOCOL_VERSION,
    BitfieldMsg,
    BlockEnd,
    BlockHeader,
    BlockPayload,
    Cancel,
    ConnectionClosed,
    Event,
    FrameDecoder,
    Handshake,
    Have,
    Hello,
    KeepAlive,
    Message,
    Partial,
    PeerHandshake,
    Reject,
    Request,
    encode,
)

ROOT = bytes(range(32))
PEER = b"p" * 20
HELLO = Hello(PROTOCOL_VERSION, bytes(range(16)), b"\x11" * 32)
HANDSHAKE = Handshake(ROOT, PEER, 7000, b"\x22" * 32)
HS_BYTES = encode(HELLO) + encode(HANDSHAKE)

# Drained is a list of messages, with each block's payload as one bytes item
# followed by its BlockEnd, so differently split inputs compare equal.
Drained = list[object]


def drain(decoder: FrameDecoder, out: Drained, limit: int = 100_000) -> None:
    """Pull events until NEED_DATA, merging consecutive payload chunks."""
    for _ in range(limit):
        event = decoder.next_event()
        if event is NEED_DATA:
            return
        if isinstance(event, BlockPayload):
            chunk = bytes(event.data)
            assert chunk, "empty payload chunk"
            if out and isinstance(out[-1], bytes):
                out[-1] += chunk
            else:
                out.append(chunk)
        else:
            out.append(event)
    raise AssertionError("decoder produced events without end")


def decode_in_pieces(data: bytes, cuts: list[int], **kwargs: int) -> Drained:
    decoder = FrameDecoder(**kwargs)  # type: ignore[arg-type]
    out: Drained = []
    previous = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        decoder.feed(data[previous:cut])
        drain(decoder, out)
        previous = cut
    assert decoder.buffered == 0
    return out


def stream() -> tuple[bytes, Drained]:
    """A realistic conversation and the events it must decode to."""
    payload_a = bytes(range(256)) * 40
    payload_b = b"\x00\xff" * 3
    messages: list[tuple[Message, bytes]] = [
        (HELLO, b""),
        (HANDSHAKE, b""),
        (BitfieldMsg(b"\xa0\x80"), b""),
        (Have(3), b""),
        (Request(1, 0, 4096, held=2), b""),
        (BlockHeader(1, 0, len(payload_a)), payload_a),
        (KeepAlive(), b""),
        (BlockHeader(2, 10, len(payload_b)), payload_b),
        (Cancel(1, 4096, 4096), b""),
        (Reject(5, 0, 16), b""),
    ]
    data = b""
    expected: Drained = []
    for message, payload in messages:
        data += encode(message) + payload
        expected.append(message)
        if isinstance(message, BlockHeader):
            expected.append(payload)
            expected.append(BlockEnd(message.piece, message.offset, message.length))
    return data, expected


# -- messages ---------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        KeepAlive(),
        BitfieldMsg(b""),
        BitfieldMsg(b"\xff\x00\x80"),
        Have(0),
        Have(12345),
        Request(7, 4 << 20, 4 << 20),
        Cancel(7, 0, 1),
        Reject(0, 100, MAX_BLOCK),
        BlockHeader(9, 0, 3),
    ],
)
def test_every_message_round_trips(message: Message) -> None:
    decoder = FrameDecoder()
    decoder.feed(HS_BYTES + encode(message))
    expect_connect(decoder)
    assert decoder.next_event() == message


def expect_connect(decoder: FrameDecoder) -> None:
    assert decoder.next_event() == HELLO
    assert decoder.next_event() == HANDSHAKE


def test_connect_frames_round_trip_with_edge_values() -> None:
    for hello, handshake in (
        (
            Hello(PROTOCOL_VERSION, b"\x00" * 16),
            Handshake(b"\x00" * 32, b"\xff" * 20, 0, b"\0" * 32),
        ),
        (Hello(PROTOCOL_VERSION, b"\xff" * 16, b"\xff" * 32), Handshake(ROOT, PEER, 65535, ROOT)),
    ):
        decoder = FrameDecoder()
        decoder.feed(encode(hello) + encode(handshake))
        assert decoder.next_event() == hello
        assert decoder.next_event() == handshake
        assert decoder.next_event() is NEED_DATA


def test_frame_layout_is_length_type_body() -> None:
    assert encode(Have(258)) == b"\x00\x00\x00\x05\x03\x00\x00\x01\x02"
    assert encode(KeepAlive()) == b"\x00\x00\x00\x01\x01"
    header = encode(BlockHeader(1, 2, 3))
    assert header == struct.pack("!IBIII", 13, 7, 1, 2, 3)
    assert encode(Request(1, 2, 3, held=4)) == struct.pack("!IBIIII", 17, 4, 1, 2, 3, 4)
    assert encode(HELLO) == struct.pack("!IB4sH", 55, 0, b"SWRM", 4) + HELLO.nonce + HELLO.proof
    assert (
        encode(HANDSHAKE) == struct.pack("!IB", 87, 8) + ROOT + PEER + b"\x1b\x58" + HANDSHAKE.proof
    )


def test_dialer_hello_reveals_nothing_but_the_version() -> None:
    nonce = b"n" * 16
    wire = encode(Hello(PROTOCOL_VERSION, nonce))
    assert wire == struct.pack("!IB4sH", 55, 0, b"SWRM", PROTOCOL_VERSION) + nonce + bytes(32)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: Hello(0, bytes(16)), "version=0"),
        (lambda: Hello(PROTOCOL_VERSION, bytes(15)), "nonce must be 16 bytes"),
        (lambda: Hello(PROTOCOL_VERSION, bytes(16), bytes(31)), "proof must be 32 bytes"),
        (lambda: Handshake(ROOT[:31], PEER, 1, ROOT), "root must be 32 bytes"),
        (lambda: Handshake(ROOT, PEER + b"x", 1, ROOT), "peer_id must be 20 bytes"),
        (lambda: Handshake(ROOT, PEER, 65536, ROOT), "listen_port"),
        (lambda: Handshake(ROOT, PEER, 1, b""), "proof must be 32 bytes"),
        (lambda: Handshake("x" * 32, PEER, 1, ROOT), "root must be bytes"),  # type: ignore[arg-type]
        (lambda: Have(-1), "piece=-1"),
        (lambda: Have(True), "must be an int"),
        (lambda: Request(0, 0, 0), "length=0"),
        (lambda: Request(0, 0, (1 << 32) + 1), "length"),
        (lambda: encode(Request(0, 0, MAX_BLOCK + 1)), "largest block"),
        (lambda: Request(0, 0, 1, held=-1), "held -1"),
        (lambda: Request(0, 0, 1, held=MAX_HELD + 1), "held"),
        (lambda: encode(BlockHeader(3, 0, MAX_BLOCK + 1)), "largest block"),
        (lambda: Cancel(0, -1, 1), "offset"),
        (lambda: Reject(0, 0xFFFF_FFFF, 2), "runs past"),
        (lambda: BlockHeader(1 << 22, 0, 1), "piece"),
        (lambda: BitfieldMsg(bytearray(2)), "must be bytes"),  # type: ignore[arg-type]
    ],
)
def test_invalid_messages_are_local_errors(build: object, match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        build()  # type: ignore[operator]


def test_encoding_a_non_message_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="not a wire message"):
        encode(BlockEnd(0, 0, 1))  # type: ignore[arg-type]


def test_bitfield_message_helpers() -> None:
    bitfield = Bitfield.from_indices([0, 9], 10)
    message = BitfieldMsg.from_bitfield(bitfield)
    assert message.to_bitfield(10) == bitfield
    with pytest.raises(RemoteProtocolError, match="spare bits"):
        BitfieldMsg(b"\x00\x7f").to_bitfield(10)
    with pytest.raises(RemoteProtocolError, match="must be 3 bytes, got 2"):
        message.to_bitfield(20)


# -- streams and splitting --------------------------------------------------


def test_stream_whole() -> None:
    data, expected = stream()
    assert decode_in_pieces(data, []) == expected


def test_stream_one_byte_at_a_time() -> None:
    data, expected = stream()
    assert decode_in_pieces(data, list(range(1, len(data)))) == expected


def test_stream_with_trailing_partial_frame() -> None:
    data, expected = stream()
    trailing = encode(Request(4, 0, 10))[:-3]
    decoder = FrameDecoder()
    decoder.feed(data + trailing)
    out: Drained = []
    drain(decoder, out)
    assert out == expected
    assert decoder.buffered == len(trailing)
    decoder.feed(encode(Request(4, 0, 10))[-3:])
    assert decoder.next_event() == Request(4, 0, 10)


def test_stream_with_trailing_partial_payload() -> None:
    decoder = FrameDecoder()
    decoder.feed(HS_BYTES + encode(BlockHeader(0, 0, 10)) + b"abcd")
    expect_connect(decoder)
    assert decoder.next_event() == BlockHeader(0, 0, 10)
    event = decoder.next_event()
    assert isinstance(event, BlockPayload)
    assert bytes(event.data) == b"abcd"
    assert event.data.readonly
    assert decoder.payload_remaining == 6
    assert decoder.next_event() is NEED_DATA
    decoder.feed(b"efghij" + encode(KeepAlive()))
    event = decoder.next_event()
    assert isinstance(event, BlockPayload)
    assert bytes(event.data) == b"efghij"
    assert decoder.next_event() == BlockEnd(0, 0, 10)
    assert decoder.next_event() == KeepAlive()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=11_000), max_size=40))
def test_stream_with_random_split_points(cuts: list[int]) -> None:
    data, expected = stream()
    cuts = [c for c in cuts if c <= len(data)]
    assert decode_in_pieces(data, cuts) == expected


def test_feed_copies_mutable_buffers() -> None:
    buffer = bytearray(HS_BYTES)
    decoder = FrameDecoder()
    decoder.feed(memoryview(buffer))
    buffer[:] = bytes(len(buffer))  # the caller reuses its receive buffer
    expect_connect(decoder)


def test_payload_read_straight_into_destination() -> None:
    """The recv_into path: no payload byte passes through the decoder."""
    payload = bytes(range(200)) * 50
    wire = HS_BYTES + encode(BlockHeader(3, 0, len(payload))) + payload + encode(Have(3))
    position = 0

    def recv(n: int) -> bytes:
        nonlocal position
        chunk = wire[position : position + n]
        position += len(chunk)
        return chunk

    destination = bytearray(len(payload))
    filled = 0
    through_decoder = 0
    decoder = FrameDecoder()
    events: list[Event] = []
    for _ in range(10_000):
        event = decoder.next_event()
        if event is NEED_DATA:
            if position == len(wire):
                break
            remaining = decoder.payload_remaining
            if remaining:
                # What sock.recv_into(view[filled:filled + remaining]) would do.
                n = min(remaining, 1000)
                destination[filled : filled + n] = recv(n)
                filled += n
                decoder.payload_consumed(n)
            else:
                decoder.feed(recv(HEADER_SIZE + 2))
            continue
        if isinstance(event, BlockPayload):
            # Only bytes that arrived together with the header come this way.
            destination[filled : filled + len(event.data)] = event.data
            filled += len(event.data)
            through_decoder += len(event.data)
            continue
        events.append(event)
    assert events == [
        HELLO,
        HANDSHAKE,
        BlockHeader(3, 0, len(payload)),
        BlockEnd(3, 0, len(payload)),
        Have(3),
    ]
    assert bytes(destination) == payload
    assert through_decoder < HEADER_SIZE + 2


def test_payload_consumed_misuse_is_a_local_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(LocalProtocolError, match="outside a block"):
        decoder.payload_consumed(1)
    decoder.feed(HS_BYTES + encode(BlockHeader(0, 0, 10)) + b"ab")
    expect_connect(decoder)
    decoder.next_event()
    with pytest.raises(LocalProtocolError, match="still buffered"):
        decoder.payload_consumed(1)
    decoder.next_event()
    with pytest.raises(LocalProtocolError, match="only 8 payload bytes remain"):
        decoder.payload_consumed(9)


# -- connection close -------------------------------------------------------


def test_clean_close_between_frames() -> None:
    decoder = FrameDecoder()
    decoder.feed(HS_BYTES)
    decoder.feed_eof()
    expect_connect(decoder)
    assert decoder.next_event() == ConnectionClosed()
    assert decoder.next_event() == ConnectionClosed()
    with pytest.raises(LocalProtocolError):
        decoder.feed(b"x")


def test_truncated_hello() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode(HELLO)[:-1])
    assert decoder.next_event() is NEED_DATA
    decoder.feed_eof()
    with pytest.raises(RemoteProtocolError, match="closed inside a hello frame"):
        decoder.next_event()


def test_truncated_handshake() -> None:
    decoder = FrameDecoder()
    decoder.feed(HS_BYTES[:-1])
    assert decoder.next_event() == HELLO
    assert decoder.next_event() is NEED_DATA
    decoder.feed_eof()
    with pytest.raises(RemoteProtocolError, match="closed inside a handshake frame"):
        decoder.next_event()


def test_truncated_payload() -> None:
    decoder = FrameDecoder()
    decoder.feed(HS_BYTES + encode(BlockHeader(2, 0, 10)) + b"abc")
    decoder.feed_eof()
    expect_connect(decoder)
    assert decoder.next_event() == BlockHeader(2, 0, 10)
    assert isinstance(decoder.next_event(), BlockPayload)
    with pytest.raises(RemoteProtocolError, match="7 of 10 bytes missing"):
        decoder.next_event()


def test_truncated_header() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00")
    decoder.feed_eof()
    with pytest.raises(RemoteProtocolError, match="inside a frame header"):
        decoder.next_event()


# -- remote errors ----------------------------------------------------------


def after_handshake(**kwargs: int) -> FrameDecoder:
    decoder = FrameDecoder(**kwargs)  # type: ignore[arg-type]
    decoder.feed(HS_BYTES)
    expect_connect(decoder)
    return decoder


def test_version_1_handshake_is_refused_as_wrong_version() -> None:
    # Version 1's first frame: its Handshake, type 0, magic and version first.
    body = struct.pack("!4sH32s20sH", b"SWRM", 1, ROOT, PEER, 1)
    decoder = FrameDecoder()
    decoder.feed(struct.pack("!IB", 1 + len(body), 0) + body)
    with pytest.raises(
        RemoteProtocolError, match=f"protocol version 1, we speak {PROTOCOL_VERSION}"
    ):
        decoder.next_event()


def test_newer_version_hello_is_refused() -> None:
    body = struct.pack("!4sH16s32s", b"SWRM", PROTOCOL_VERSION + 1, bytes(16), bytes(32))
    decoder = FrameDecoder()
    decoder.feed(struct.pack("!IB", 1 + len(body), 0) + body)
    with pytest.raises(
        RemoteProtocolError,
        match=f"protocol version {PROTOCOL_VERSION + 1}, we speak {PROTOCOL_VERSION}",
    ):
        decoder.next_event()


def test_hello_of_our_version_with_wrong_length() -> None:
    body = struct.pack("!4sH16s", b"SWRM", PROTOCOL_VERSION, bytes(16))
    decoder = FrameDecoder()
    decoder.feed(struct.pack("!IB", 1 + len(body), 0) + body)
    with pytest.raises(RemoteProtocolError, match="hello body is 22 bytes, expected 54"):
        decoder.next_event()


def test_future_longer_handshake_reports_version() -> None:
    body = struct.pack("!4sH", b"SWRM", 9) + bytes(100)
    decoder = FrameDecoder()
    decoder.feed(struct.pack("!IB", 1 + len(body), 0) + body)
    with pytest.raises(RemoteProtocolError, match="version 9"):
        decoder.next_event()


def test_wrong_magic() -> None:
    decoder = FrameDecoder()
    decoder.feed(HS_BYTES.replace(b"SWRM", b"HTTP"))
    with pytest.raises(RemoteProtocolError, match="hello magic"):
        decoder.next_event()


def test_first_frame_must_be_hello() -> None:
    for first in (Have(1), HANDSHAKE, BitfieldMsg(b"\xff")):
        decoder = FrameDecoder()
        decoder.feed(encode(first))
        with pytest.raises(RemoteProtocolError, match=r"expected a hello as the first frame"):
            decoder.next_event()


def test_nothing_but_the_handshake_after_the_hello() -> None:
    for second in (Have(1), KeepAlive(), BitfieldMsg(b"\xff"), Request(0, 0, 1), HELLO):
        decoder = FrameDecoder()
        decoder.feed(encode(HELLO) + encode(second))
        assert decoder.next_event() == HELLO
        with pytest.raises(RemoteProtocolError, match=r"expected a handshake after the hello"):
            decoder.next_event()


def test_handshake_of_wrong_length_refused_from_its_header() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode(HELLO) + struct.pack("!IB", 1 + 60, 8))
    assert decoder.next_event() == HELLO
    with pytest.raises(RemoteProtocolError, match="handshake body is 60 bytes, expected 86"):
        decoder.next_event()


@pytest.mark.parametrize(("again", "name"), [(HELLO, "hello"), (HANDSHAKE, "handshake")])
def test_second_hello_or_handshake_refused(again: Message, name: str) -> None:
    decoder = after_handshake()
    decoder.feed(encode(again))
    with pytest.raises(RemoteProtocolError, match=f"second {name}"):
        decoder.next_event()


def test_failed_decoder_stays_failed() -> None:
    decoder = after_handshake()
    decoder.feed(b"\x00\x00\x00\x01\x63" + encode(KeepAlive()))
    with pytest.raises(RemoteProtocolError, match="unknown frame type 99"):
        decoder.next_event()
    assert decoder.buffered == 0
    with pytest.raises(RemoteProtocolError, match="already failed: unknown frame type"):
        decoder.next_event()
    decoder.feed(b"x" * 1000)
    assert decoder.buffered == 0


def test_oversize_frame_rejected_from_its_header() -> None:
    decoder = after_handshake(max_frame=1000)
    decoder.feed(struct.pack("!IB", 1001, 2))  # no body buffered at all
    with pytest.raises(RemoteProtocolError, match="frame length 1001 exceeds the limit of 1000"):
        decoder.next_event()


def test_zero_length_frame() -> None:
    decoder = after_handshake()
    decoder.feed(b"\x00\x00\x00\x00")
    assert decoder.next_event() is NEED_DATA
    decoder.feed(b"\x01")
    with pytest.raises(RemoteProtocolError, match="frame length is 0"):
        decoder.next_event()


def test_fixed_size_body_checked_from_header() -> None:
    decoder = after_handshake()
    decoder.feed(struct.pack("!IB", 1 + 13, 4))
    with pytest.raises(RemoteProtocolError, match="request frame body is 13 bytes, expected 16"):
        decoder.next_event()


def test_piece_out_of_range_once_layout_known() -> None:
    decoder = after_handshake(num_pieces=10)
    decoder.feed(encode(Have(9)) + encode(Have(10)))
    assert decoder.next_event() == Have(9)
    with pytest.raises(RemoteProtocolError, match="piece 10, but there are only 10"):
        decoder.next_event()


def test_layout_set_after_handshake() -> None:
    decoder = after_handshake()
    decoder.set_layout(piece_lengths=[100, 50])
    assert decoder.num_pieces == 2
    decoder.feed(encode(Request(1, 40, 10)) + encode(BlockHeader(1, 40, 11)))
    assert decoder.next_event() == Request(1, 40, 10)
    with pytest.raises(RemoteProtocolError, match=r"bytes 40\.\.51, past the piece's 50 bytes"):
        decoder.next_event()


def test_request_carries_what_the_requester_holds_in_kib() -> None:
    decoder = after_handshake()
    # 4 pieces of 1000 KiB and one of 1 byte: the artifact is 4001 KiB, rounded up.
    decoder.set_layout(piece_lengths=[1000 * HELD_UNIT] * 4 + [1])
    decoder.feed(encode(Request(3, 0, 8, held=4001)) + encode(Request(3, 8, 8, held=4002)))
    event = decoder.next_event()
    assert isinstance(event, Request) and event.held == 4001
    # More than the whole artifact is a lie the decoder refuses.
    with pytest.raises(RemoteProtocolError, match="holds 4002 KiB, but the artifact is 4001 KiB"):
        decoder.next_event()
    # The count is advice, not identity: a Cancel still finds the Request.
    assert Request(3, 0, 8, held=7) == Request(3, 0, 8)
    assert hash(Request(3, 0, 8, held=7)) == hash(Request(3, 0, 8))


def test_block_longer_than_max_block() -> None:
    decoder = after_handshake(max_block=1024)
    decoder.feed(encode(Request(0, 0, 1025)))
    with pytest.raises(RemoteProtocolError, match="length 1025, limit 1024"):
        decoder.next_event()


def test_bitfield_length_and_spare_bits() -> None:
    decoder = after_handshake(num_pieces=10)
    decoder.feed(encode(BitfieldMsg(b"\x00\x00\x00")))
    with pytest.raises(RemoteProtocolError, match="bitfield is 3 bytes, expected 2 for 10 pieces"):
        decoder.next_event()
    decoder = after_handshake(num_pieces=10)
    decoder.feed(encode(BitfieldMsg(b"\xff\xc0")) + encode(BitfieldMsg(b"\x00\x20")))
    assert decoder.next_event() == BitfieldMsg(b"\xff\xc0")
    with pytest.raises(RemoteProtocolError, match="spare bits"):
        decoder.next_event()


def test_bad_configuration() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame=10)
    with pytest.raises(ValueError):
        FrameDecoder(max_block=MAX_BLOCK + 1)
    with pytest.raises(ValueError, match="too small for a bitfield"):
        FrameDecoder(max_frame=100, num_pieces=10_000)
    with pytest.raises(ValueError, match="disagrees"):
        FrameDecoder(num_pieces=3, piece_lengths=[1, 2])


# -- garbage ----------------------------------------------------------------


def feed_garbage(decoder: FrameDecoder, data: bytes, chunk: int) -> None:
    """Feed ``data`` in chunks; only RemoteProtocolError may escape, buffers stay bounded."""
    bound = HEADER_SIZE + decoder.max_frame
    for start in range(0, len(data), chunk):
        decoder.feed(data[start : start + chunk])
        for _ in range(len(data) + 10):
            event = decoder.next_event()
            if event is NEED_DATA:
                if decoder.payload_remaining == 0:
                    assert decoder.buffered < bound
                else:
                    assert decoder.buffered == 0
                break
        else:
            raise AssertionError("decoder never asked for more data")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64), st.booleans())
def test_random_garbage_never_crashes(data: bytes, chunk: int, handshake_first: bool) -> None:
    decoder = FrameDecoder(max_frame=256, num_pieces=100)
    if handshake_first:
        decoder.feed(HS_BYTES)
        expect_connect(decoder)
    try:
        feed_garbage(decoder, data, chunk)
        decoder.feed_eof()
        for _ in range(len(data) + 10):
            if isinstance(decoder.next_event(), ConnectionClosed):
                break
    except RemoteProtocolError as exc:
        assert str(exc)


_frame_types = st.integers(min_value=0, max_value=10)


@st.composite
def plausible_frames(draw: st.DrawFn) -> bytes:
    """Frames with valid headers but random bodies, which reach the field checks."""
    frame_type = draw(_frame_types)
    body = draw(st.binary(max_size=40))
    data = struct.pack("!IB", 1 + len(body), frame_type) + body
    if frame_type == 7 and len(body) == 12:
        data += draw(st.binary(max_size=30))
    return data


@settings(max_examples=300, deadline=None)
@given(st.lists(plausible_frames(), max_size=12), st.integers(min_value=1, max_value=17))
def test_random_frames_never_crash(frames: list[bytes], chunk: int) -> None:
    decoder = FrameDecoder(max_frame=96, num_pieces=40)
    decoder.feed(HS_BYTES)
    expect_connect(decoder)
    try:
        feed_garbage(decoder, b"".join(frames), chunk)
    except RemoteProtocolError as exc:
        assert str(exc)


# -- the connect flow (PeerHandshake) ---------------------------------------

TOKEN = ClusterKey(b"0123456789abcdef-cluster-a")
OTHER_TOKEN = ClusterKey(b"0123456789abcdef-cluster-b")
OPEN = ClusterKey(None)
DIAL_ID = b"d" * 20
ACCEPT_ID = b"a" * 20


def pair(
    dial_key: ClusterKey = TOKEN,
    accept_key: ClusterKey = TOKEN,
    *,
    dial_root: bytes = ROOT,
    accept_root: bytes = ROOT,
) -> tuple[PeerHandshake, PeerHandshake]:
    dialer = PeerHandshake(
        dial_key, dialer=True, root=dial_root, peer_id=DIAL_ID, listen_port=6001, nonce=b"D" * 16
    )
    acceptor = PeerHandshake(
        accept_key,
        dialer=False,
        root=accept_root,
        peer_id=ACCEPT_ID,
        listen_port=6002,
        nonce=b"A" * 16,
    )
    return dialer, acceptor


def exchange(dialer: PeerHandshake, acceptor: PeerHandshake) -> list[list[Message]]:
    """Run the flow through the wire encoding; what each side sent, turn by turn."""
    wires = {id(dialer): FrameDecoder(), id(acceptor): FrameDecoder()}  # what each receives

    def deliver(messages: list[Message], to: PeerHandshake) -> list[Message]:
        decoder = wires[id(to)]
        decoder.feed(b"".join(encode(m) for m in messages))
        replies: list[Message] = []
        for _ in range(len(messages) + 1):
            event = decoder.next_event()
            if event is NEED_DATA:
                return replies
            assert isinstance(event, Hello | Handshake)
            replies += to.receive(event)
        raise AssertionError("more events than messages")

    sent: list[list[Message]] = []
    assert not acceptor.start(), "the acceptor speaks only when spoken to"
    to_acceptor = dialer.start()
    for _ in range(2):
        sent.append(to_acceptor)
        to_dialer = deliver(to_acceptor, acceptor)
        sent.append(to_dialer)
        to_acceptor = deliver(to_dialer, dialer)
        if dialer.done and acceptor.done:
            assert not to_acceptor
            return sent
    raise AssertionError("the connect flow did not finish in 2 round trips")


@pytest.mark.parametrize(("dial_key", "accept_key"), [(TOKEN, TOKEN), (OPEN, OPEN)])
def test_connect_flow_with_the_same_key(dial_key: ClusterKey, accept_key: ClusterKey) -> None:
    dialer, acceptor = pair(dial_key, accept_key)
    sent = exchange(dialer, acceptor)
    # The order of the module docstring: Hello, Hello, Handshake, Handshake.
    assert [[type(m).__name__ for m in step] for step in sent] == [
        ["Hello"],
        ["Hello"],
        ["Handshake"],
        ["Handshake"],
    ]
    assert dialer.remote is not None and acceptor.remote is not None
    assert (dialer.remote.peer_id, dialer.remote.listen_port) == (ACCEPT_ID, 6002)
    assert (acceptor.remote.peer_id, acceptor.remote.listen_port) == (DIAL_ID, 6001)
    first = sent[0][0]
    assert isinstance(first, Hello) and first.proof == bytes(32)


def test_proofs_are_the_documented_macs() -> None:
    dialer, acceptor = pair()
    sent = exchange(dialer, acceptor)
    hello_a, hs_d, hs_a = sent[1][0], sent[2][0], sent[3][0]
    assert isinstance(hello_a, Hello) and isinstance(hs_d, Handshake)
    assert isinstance(hs_a, Handshake)
    d, a = b"D" * 16, b"A" * 16
    assert hello_a.proof == TOKEN.mac(b"peer-accept", d, a)
    assert hs_d.proof == TOKEN.mac(b"peer-dial", a, d, ROOT, DIAL_ID)
    assert hs_a.proof == TOKEN.mac(b"peer-accept-id", d, a, ROOT, ACCEPT_ID)


def test_dialer_refuses_an_acceptor_without_our_token() -> None:
    for accept_key in (OTHER_TOKEN, OPEN):
        dialer, acceptor = pair(TOKEN, accept_key)
        hello = acceptor.receive(dialer.start()[0])[0]
        assert isinstance(hello, Hello)
        with pytest.raises(RemoteProtocolError, match="hello does not prove our cluster token"):
            dialer.receive(hello)
        assert not dialer.done
        with pytest.raises(RemoteProtocolError, match="already failed"):
            dialer.receive(hello)


def test_acceptor_refuses_a_dialer_without_our_token() -> None:
    # An open dialer accepts any acceptor, then its own proof fails at a token acceptor.
    dialer, acceptor = pair(OPEN, TOKEN)
    hello = acceptor.receive(dialer.start()[0])[0]
    assert isinstance(hello, Hello)
    handshake = dialer.receive(hello)[0]
    assert isinstance(handshake, Handshake)
    with pytest.raises(RemoteProtocolError, match="handshake does not prove our cluster token"):
        acceptor.receive(handshake)
    assert not acceptor.done


def test_a_recorded_dialer_handshake_is_useless_on_a_new_connection() -> None:
    dialer, acceptor = pair()
    recorded = exchange(dialer, acceptor)[2][0]
    assert isinstance(recorded, Handshake)
    _, fresh = pair()
    fresh.nonce = b"B" * 16  # each connection draws a new nonce
    fresh.receive(Hello(PROTOCOL_VERSION, b"D" * 16))
    with pytest.raises(RemoteProtocolError, match="does not prove"):
        fresh.receive(recorded)


def test_an_acceptor_proof_cannot_be_reflected_as_a_dialer_proof() -> None:
    # A stranger dials A, gets A's proofs, and tries to use them as its own.
    _, acceptor = pair()
    hello_a = acceptor.receive(Hello(PROTOCOL_VERSION, b"S" * 16))[0]
    assert isinstance(hello_a, Hello)
    with pytest.raises(RemoteProtocolError, match="does not prove"):
        acceptor.receive(Handshake(ROOT, b"s" * 20, 1, hello_a.proof))


def test_wrong_root_is_refused_by_the_acceptor_before_it_says_anything() -> None:
    dialer, acceptor = pair(dial_root=b"\x01" * 32)
    hello = acceptor.receive(dialer.start()[0])[0]
    assert isinstance(hello, Hello)
    handshake = dialer.receive(hello)[0]
    assert isinstance(handshake, Handshake)
    with pytest.raises(RemoteProtocolError, match="another swarm"):
        acceptor.receive(handshake)


def test_wrong_root_is_refused_by_the_dialer() -> None:
    dialer, _ = pair()
    dialer.start()
    a = b"A" * 16
    dialer.receive(Hello(PROTOCOL_VERSION, a, TOKEN.mac(b"peer-accept", b"D" * 16, a)))
    other = b"\x02" * 32
    proof = TOKEN.mac(b"peer-accept-id", b"D" * 16, a, other, ACCEPT_ID)
    with pytest.raises(RemoteProtocolError, match="another swarm"):
        dialer.receive(Handshake(other, ACCEPT_ID, 1, proof))


def test_connect_frames_out_of_order() -> None:
    dialer, acceptor = pair()
    with pytest.raises(RemoteProtocolError, match="handshake before the hello"):
        acceptor.receive(HANDSHAKE)
    dialer.start()
    hello = Hello(PROTOCOL_VERSION, b"A" * 16, TOKEN.mac(b"peer-accept", b"D" * 16, b"A" * 16))
    dialer.receive(hello)
    with pytest.raises(RemoteProtocolError, match="second hello"):
        dialer.receive(hello)


def test_handshake_checks_its_own_fields() -> None:
    with pytest.raises(LocalProtocolError, match="nonce must be 16 bytes"):
        PeerHandshake(OPEN, dialer=True, root=ROOT, peer_id=PEER, listen_port=1, nonce=b"x")
    with pytest.raises(LocalProtocolError, match="listen_port"):
        PeerHandshake(OPEN, dialer=True, root=ROOT, peer_id=PEER, listen_port=-1, nonce=bytes(16))


def test_partial_round_trips_and_is_checked_against_the_piece() -> None:
    decoder = after_handshake()
    decoder.set_layout(piece_lengths=[10 * MIN_PARTIAL_BLOCK, MIN_PARTIAL_BLOCK])
    good = Partial(0, MIN_PARTIAL_BLOCK, b"\xa0\x40")  # blocks 0, 2 and 9 of 10
    decoder.feed(encode(good))
    event = decoder.next_event()
    assert event == good and isinstance(event, Partial)
    assert list(event.blocks(10)) == [0, 2, 9]
    # Bits past the piece's last block are a lie the decoder refuses.
    decoder.feed(encode(Partial(1, MIN_PARTIAL_BLOCK, b"\xc0")))
    with pytest.raises(RemoteProtocolError, match="bad partial of piece 1"):
        decoder.next_event()
    with pytest.raises(LocalProtocolError, match="block_size"):
        Partial(0, 1024, b"\x80")
