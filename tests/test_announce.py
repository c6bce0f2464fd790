"""The announce codec (``swarm/announce.py``): round trips, MACs and hostile input.

Every decode of bytes that did not come from ``encode`` either yields a valid
message or raises ``BadAnnounce`` (a ``TrackerError``), never another exception:
the tracker's UDP and HTTP endpoints rely on that to refuse one bad datagram
without dropping the endpoint. A signed announce or reply verifies after a round
trip through the wire, and no longer does once any field is changed.
"""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.auth import ClusterKey, new_nonce
from core.errors import TrackerError
from swarm.announce import (
    MAX_BARRED,
    PEER_ID_SIZE,
    Announce,
    BadAnnounce,
    Reply,
    http_auth_header,
    http_auth_parts,
    parse_http_auth,
)

ROOT = "ab" * 32
REF = f"llama@{ROOT}"

peer_ids = st.binary(min_size=PEER_ID_SIZE, max_size=PEER_ID_SIZE)

announces = st.builds(
    Announce,
    ref=st.sampled_from([REF, "org/model@" + "0" * 64, "plain-name"]),
    peer_id=peer_ids,
    port=st.integers(1, 65535),
    have=st.binary(max_size=512),
    host=st.just("")
    | st.ip_addresses().map(str)
    | st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
    progress=st.dictionaries(st.integers(0, 10**6), st.integers(0, 2**40), max_size=20),
    done=st.booleans(),
    leaving=st.booleans(),
    txn=st.integers(0, 2**31),
    barred=st.lists(peer_ids, max_size=8),
    ts=st.integers(0, 2**62),
    nonce=st.binary(max_size=16),
    mac=st.binary(max_size=32),
)

replies = st.builds(
    Reply,
    assigned=st.lists(st.integers(0, 10**6), max_size=20),
    peers=st.lists(st.tuples(peer_ids, st.text(max_size=30), st.integers(1, 65535)), max_size=10),
    complete=st.booleans(),
    num_peers=st.integers(0, 10**6),
    interval=st.floats(0.05, 3600),
    txn=st.integers(0, 2**31),
    error=st.text(max_size=50),
    mac=st.binary(max_size=32),
)

# Anything msgpack can carry, nested a little.
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _decodes_or_refuses(decode: Any, data: bytes) -> None:
    try:
        decode(data)
    except BadAnnounce as exc:
        assert isinstance(exc, TrackerError)
        assert str(exc)


@given(announces)
def test_announce_round_trip(msg: Announce) -> None:
    assert Announce.decode(msg.encode()) == msg


@given(replies)
def test_reply_round_trip(reply: Reply) -> None:
    assert Reply.decode(reply.encode()) == reply


def test_announce_without_barred_field_still_decodes() -> None:
    """Peers built before ``barred`` existed send announces without it."""
    msg = Announce(REF, b"p" * PEER_ID_SIZE, 7000, b"\xff")
    fields = msgpack.unpackb(msg.encode(), raw=False)
    del fields["barred"]
    assert Announce.decode(msgpack.packb(fields, use_bin_type=True)) == msg


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("v", 2, "version"),
        ("peer", b"short", "peer id"),
        ("port", 0, "port"),
        ("port", 70000, "port"),
        ("port", True, "port"),
        ("ref", 5, "ref"),
        ("have", "text", "bitfield"),
        ("host", "h" * 256, "host"),
        ("progress", [[1, -1]], "progress"),
        ("progress", [[1]], "progress"),
        ("progress", {"1": 2}, "progress"),
        ("barred", [b"x" * 19], "barred"),
        ("barred", [b"x" * PEER_ID_SIZE] * (MAX_BARRED + 1), "barred"),
        ("barred", b"x" * PEER_ID_SIZE, "barred"),
    ],
)
def test_announce_field_refused(field: str, value: object, match: str) -> None:
    fields = msgpack.unpackb(Announce(REF, b"p" * PEER_ID_SIZE, 7000, b"\x00").encode(), raw=False)
    fields[field] = value
    with pytest.raises(BadAnnounce, match=match):
        Announce.decode(msgpack.packb(fields, use_bin_type=True))


@pytest.mark.parametrize("missing", ["v", "ref", "peer", "port", "host", "have", "progress"])
def test_announce_missing_field_refused(missing: str) -> None:
    fields = msgpack.unpackb(Announce(REF, b"p" * PEER_ID_SIZE, 7000, b"").encode(), raw=False)
    del fields[missing]
    with pytest.raises(BadAnnounce, match=missing):
        Announce.decode(msgpack.packb(fields, use_bin_type=True))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x91\x01", msgpack.packb([1, 2]), b"\x80" + b"x"])
def test_not_a_map_refused(data: bytes) -> None:
    with pytest.raises(BadAnnounce):
        Announce.decode(data)
    with pytest.raises(BadAnnounce):
        Reply.decode(data)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_decoders(data: bytes) -> None:
    _decodes_or_refuses(Announce.decode, data)
    _decodes_or_refuses(Reply.decode, data)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=10), msgpack_values, max_size=8))
def test_random_maps_never_crash_the_decoders(obj: dict[str, Any]) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    _decodes_or_refuses(Announce.decode, data)
    _decodes_or_refuses(Reply.decode, data)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    announces,
    replies,
    st.sampled_from(
        [
            "v",
            "ref",
            "peer",
            "port",
            "host",
            "have",
            "progress",
            "done",
            "leaving",
            "txn",
            "barred",
            "ts",
            "nonce",
            "mac",
        ]
    ),
    st.sampled_from(["txn", "assign", "peers", "complete", "npeers", "interval", "error", "mac"]),
    msgpack_values,
)
def test_one_wrong_field_never_crashes_the_decoders(
    msg: Announce, reply: Reply, a_field: str, r_field: str, value: object
) -> None:
    """A valid message with one field replaced by anything: valid, or BadAnnounce."""
    fields = msgpack.unpackb(msg.encode(), raw=False)
    fields[a_field] = value
    _decodes_or_refuses(Announce.decode, msgpack.packb(fields, use_bin_type=True))
    rfields = msgpack.unpackb(reply.encode(), raw=False)
    rfields[r_field] = value
    _decodes_or_refuses(Reply.decode, msgpack.packb(rfields, use_bin_type=True))


@given(announces, st.integers(0, 400))
def test_truncated_announce_refused(msg: Announce, cut: int) -> None:
    data = msg.encode()
    if cut < len(data):
        with pytest.raises(BadAnnounce):
            Announce.decode(data[:cut])


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 2**64 - 1, -1.5])
@pytest.mark.parametrize("field", ["npeers", "txn", "interval", "complete", "error"])
def test_odd_numbers_in_a_reply(field: str, value: float) -> None:
    """A float where an int belongs (infinity overflows ``int()``) is refused, not raised."""
    fields = msgpack.unpackb(Reply([1], [], False, 3, 1.0, 9).encode(), raw=False)
    fields[field] = value
    _decodes_or_refuses(Reply.decode, msgpack.packb(fields, use_bin_type=True))


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 2**64 - 1])
@pytest.mark.parametrize("field", ["port", "txn", "done", "leaving", "v"])
def test_odd_numbers_in_an_announce(field: str, value: float) -> None:
    fields = msgpack.unpackb(Announce(REF, b"p" * PEER_ID_SIZE, 7000, b"").encode(), raw=False)
    fields[field] = value
    _decodes_or_refuses(Announce.decode, msgpack.packb(fields, use_bin_type=True))


KEY = ClusterKey(b"a cluster token of some length")


@given(announces)
def test_signed_announce_verifies_after_the_wire_and_not_when_changed(msg: Announce) -> None:
    msg.sign(KEY, 1_700_000_000_000, new_nonce())
    received = Announce.decode(msg.encode())
    assert received.verify(KEY)
    assert not received.verify(ClusterKey(b"another cluster token, same size"))
    received.leaving = not received.leaving
    assert not received.verify(KEY)
    assert received.verify(ClusterKey(None))  # an open cluster checks nothing


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("peer", b"q" * PEER_ID_SIZE),
        ("barred", [b"z" * PEER_ID_SIZE]),
        ("progress", [[1, 5]]),
        ("ts", 1_700_000_000_001),
        ("nonce", b"n" * 16),
        ("ref", "other@" + "cd" * 32),
    ],
)
def test_any_changed_field_breaks_the_announce_mac(field: str, value: object) -> None:
    msg = Announce(REF, b"p" * PEER_ID_SIZE, 7000, b"\x00", progress={1: 4})
    msg.sign(KEY, 1_700_000_000_000, b"0" * 16)
    fields = msgpack.unpackb(msg.encode(), raw=False)
    fields[field] = value
    assert not Announce.decode(msgpack.packb(fields, use_bin_type=True)).verify(KEY)


@given(replies)
def test_signed_reply_is_bound_to_its_request(reply: Reply) -> None:
    nonce = new_nonce()
    reply.sign(KEY, nonce)
    received = Reply.decode(reply.encode())
    assert received.verify(KEY, nonce)
    assert not received.verify(KEY, new_nonce())
    received.assigned = [*received.assigned, 7]
    assert not received.verify(KEY, nonce)


def test_an_open_tracker_leaves_replies_unsigned() -> None:
    reply = Reply([1], [], False, 1, 1.0, 3)
    reply.sign(ClusterKey(None), b"n" * 16)
    assert reply.mac == b""
    assert not Reply.decode(reply.encode()).verify(KEY, b"n" * 16)


def test_an_integral_interval_survives_the_mac() -> None:
    """A reply built with ``interval=2`` (an int) re-encodes alike after decoding."""
    reply = Reply([1], [], False, 1, 2, 3)
    reply.sign(KEY, b"n" * 16)
    assert Reply.decode(reply.encode()).verify(KEY, b"n" * 16)


def test_http_auth_header_round_trip() -> None:
    value, nonce = http_auth_header(KEY, "get", "/v1/swarms", b"", 1_700_000_000_000)
    parsed = parse_http_auth(value)
    assert parsed is not None
    ts, got_nonce, mac = parsed
    assert (ts, got_nonce) == (1_700_000_000_000, nonce)
    assert KEY.check(mac, b"http", *http_auth_parts("GET", "/v1/swarms", ts, nonce, b""))
    assert not KEY.check(mac, b"http", *http_auth_parts("GET", "/v1/swarms", ts, nonce, b"x"))
    for bad in ("", "1.2", "x.00.00", f"1.{'0' * 32}.{'0' * 10}", "1." + "g" * 32 + "." + "0" * 64):
        assert parse_http_auth(bad) is None


@pytest.mark.parametrize(
    "host",
    [
        "a" * 64,
        "x..y",
        "-lead.example",
        "10.0.0.7\u202e1.0.0.721",
        "h\nERROR forged",
        "é.example",
        "a b",
    ],
)
def test_a_host_that_is_not_an_address_is_refused_everywhere(host: str) -> None:
    """One announce with such a host ended every fetch told about it (the dialer's
    resolver raised), forged text log lines, and spoofed the status page."""
    from swarm.hosts import valid_host
    from tracker.errors import BadAnnounceError
    from tracker.registry import SwarmRegistry

    assert not valid_host(host)
    msg = Announce("m@" + "ab" * 32, b"p" * PEER_ID_SIZE, 7001, b"\x00", host=host)
    with pytest.raises(BadAnnounce, match="advertised host"):
        Announce.decode(msg.encode())
    registry = SwarmRegistry([1000], peer_ttl=10.0, rng=random.Random(1))
    with pytest.raises(BadAnnounceError, match="IP address or DNS name"):
        registry.announce(b"p" * PEER_ID_SIZE, (host, 7001), None, {}, 0.0)


@pytest.mark.parametrize("host", ["10.0.0.7", "::1", "node-7.cluster.local", "n7", "fd00::7"])
def test_addresses_and_dns_names_are_valid_hosts(host: str) -> None:
    from swarm.hosts import valid_host

    assert valid_host(host)
