"""Who the tracker answers: the cluster token, forged announces, replays, amplification, TLS.

Each finding of issue 12 about the tracker is reproduced here against a real
tracker on loopback, or against the pure ``AnnounceGate``:

- any announce could bar any peer, and one datagram with a victim's id (read
  from ``GET /v1/swarms``) could make it leave; a fake peer's progress for every
  piece took them from their real seeders;
- nothing was authenticated: any process could announce, read manifests and
  ``/v1/swarms``; a rogue tracker could answer with another artifact's manifest;
- a 1-byte datagram drew a 93-byte reply (a reflection amplifier).

UDP exchanges use a plain socket with a short receive timeout, so "no reply" is
a bounded wait; a second loopback address (127.0.0.2) plays another host.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from servers import free_port, populate

from core.auth import ClusterKey, new_nonce
from core.bitfield import Bitfield
from core.errors import TrackerError
from core.manifest import Manifest
from seeder.publish import publish
from swarm.announce import (
    AUTH_HEADER,
    PEER_ID_SIZE,
    Announce,
    Reply,
    TrackerAuthError,
    TrackerClient,
    http_auth_header,
)
from tracker.config import TrackerConfig
from tracker.service import AnnounceGate, Tracker, _RefusalLog

PIECE = 64 * 1024
NAME = "tiny-llm"
TOKEN = ClusterKey(b"correct horse battery staple 42")
OTHER = ClusterKey(b"some other cluster's token 1234")
OPEN = ClusterKey(None)

VICTIM, LIAR, HONEST = b"v" * PEER_ID_SIZE, b"l" * PEER_ID_SIZE, b"h" * PEER_ID_SIZE


async def _publish(
    tmp_path: Path, name: str = NAME, pieces: int = 5, key: ClusterKey = OPEN
) -> tuple[Manifest, str]:
    rng = random.Random(name)
    origin = populate(
        tmp_path / f"origin-{name}",
        {"config.json": b"{}\n", "weights.bin": rng.randbytes(pieces * PIECE - 3)},
    )
    catalog = (tmp_path / "catalog").as_uri()
    return await publish(origin.as_uri(), name, catalog, piece_size=PIECE, key=key), catalog


def run_tracker(
    tmp_path: Path,
    key: ClusterKey,
    body: Callable[[Tracker, Manifest, str], Awaitable[None]],
    **config: Any,
) -> None:
    async def main() -> None:
        manifest, catalog = await _publish(tmp_path, key=key)
        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": free_port(),
            "catalog": catalog,
            "announce_interval": 0.2,
            "peer_ttl": 5.0,
            "stall_timeout": 5.0,
            "restart_grace": 0.0,
            "key": key,
        }
        settings.update(config)
        tracker = Tracker(TrackerConfig(**settings), rng=random.Random(1))
        await tracker.start()
        scheme = "https" if settings.get("tls_cert") else "http"
        try:
            await asyncio.wait_for(
                body(tracker, manifest, f"{scheme}://127.0.0.1:{settings['port']}"), 30.0
            )
        finally:
            await tracker.close()

    asyncio.run(main())


def _announce(manifest: Manifest, peer: bytes, port: int, **kw: Any) -> Announce:
    have = kw.pop("have", Bitfield(manifest.num_pieces))
    return Announce(manifest.ref, peer, port, have.to_bytes(), host="127.0.0.1", **kw)


_last_ts = 0


def _signed(msg: Announce, key: ClusterKey, *, ts: int | None = None) -> Announce:
    global _last_ts
    if ts is None:
        ts = _last_ts = max(int(time.time() * 1000), _last_ts + 1)
    msg.sign(key, ts, new_nonce())
    return msg


def _udp(data: bytes, port: int, source: str = "127.0.0.1", wait: float = 0.5) -> bytes | None:
    """Send one datagram from ``source`` and return the reply, or None after ``wait`` s."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(wait)
        sock.sendto(data, ("127.0.0.1", port))
        try:
            return sock.recvfrom(65536)[0]
        except TimeoutError:
            return None


async def udp(data: bytes, port: int, source: str = "127.0.0.1", wait: float = 0.5) -> bytes | None:
    return await asyncio.to_thread(_udp, data, port, source, wait)


def _swarm(tracker: Tracker, manifest: Manifest) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(json.dumps(tracker.status()))
    swarm: dict[str, Any] = status["swarms"][manifest.root_hex]
    return swarm


def _peer_ids(tracker: Tracker, manifest: Manifest) -> set[str]:
    return {p["peer_id"] for p in _swarm(tracker, manifest)["peer_list"]}


# --- forged announces (open cluster: the host binding is what stops them) ---------------


def test_one_forged_datagram_neither_bars_nor_removes_a_peer(tmp_path: Path) -> None:
    async def body(tracker: Tracker, manifest: Manifest, url: str) -> None:
        port = tracker.config.port
        client = TrackerClient(url)
        try:
            await client.announce(_announce(manifest, VICTIM, 7001))
            assert _peer_ids(tracker, manifest) == {VICTIM.hex()}
            # An attacker on another host reports the victim as a liar...
            forged = _signed(_announce(manifest, LIAR, 7666, barred=[VICTIM]), OPEN)
            assert await udp(forged.encode(), port, source="127.0.0.2", wait=5.0) is not None
            # ...and speaks for it, saying it leaves.
            leave = _signed(_announce(manifest, VICTIM, 7001, leaving=True), OPEN)
            assert await udp(leave.encode(), port, source="127.0.0.2") is None
            swarm = _swarm(tracker, manifest)
            assert swarm["barred"] == []
            assert {p["peer_id"] for p in swarm["peer_list"]} == {VICTIM.hex(), LIAR.hex()}
            assert swarm["reports"] == {VICTIM.hex(): [LIAR.hex()]}
            assert tracker.status()["auth_failures"] == {"foreign_host": 1}
            # The victim itself still can leave.
            await client.announce(_announce(manifest, VICTIM, 7001, leaving=True))
            assert _peer_ids(tracker, manifest) == {LIAR.hex()}
        finally:
            await client.close()

    run_tracker(tmp_path, OPEN, body)


def test_fake_progress_for_every_piece_takes_nothing_from_real_seeders(tmp_path: Path) -> None:
    async def body(tracker: Tracker, manifest: Manifest, url: str) -> None:
        client = TrackerClient(url)
        try:
            real = await client.announce(_announce(manifest, HONEST, 7001))
            assert len(real.assigned) == 4  # alone: the small-swarm floor
            everything = {p: 1 for p in range(manifest.num_pieces)}
            fake = await client.announce(_announce(manifest, LIAR, 7002, progress=everything))
            assert set(fake.assigned).isdisjoint(real.assigned)
            for _ in range(3):
                fake = await client.announce(_announce(manifest, LIAR, 7002, progress=everything))
            again = await client.announce(_announce(manifest, HONEST, 7001))
            assert again.assigned == real.assigned
        finally:
            await client.close()

    run_tracker(tmp_path, OPEN, body)


# --- the cluster token --------------------------------------------------------------------


def test_without_the_token_nothing_is_answered(tmp_path: Path) -> None:
    async def body(tracker: Tracker, manifest: Manifest, url: str) -> None:
        port = tracker.config.port
        async with aiohttp.ClientSession() as session:
            for path in ("/v1/swarms", f"/v1/manifest/{NAME}", f"/v1/swarms/{manifest.root_hex}"):
                async with session.get(url + path) as resp:
                    assert resp.status == 401, path
                    assert "token" in (await resp.text())
            # Liveness and readiness stay open, for the kubelet.
            for path in ("/healthz", "/readyz"):
                async with session.get(url + path) as resp:
                    assert resp.status == 200, path
            # A header made with another token, or for another path, is refused too.
            value, _ = http_auth_header(OTHER, "GET", "/v1/swarms", b"", int(time.time() * 1000))
            async with session.get(url + "/v1/swarms", headers={AUTH_HEADER: value}) as resp:
                assert resp.status == 401
            value, _ = http_auth_header(TOKEN, "GET", "/healthz", b"", int(time.time() * 1000))
            async with session.get(url + "/v1/swarms", headers={AUTH_HEADER: value}) as resp:
                assert resp.status == 401
            # The same header replayed is refused the second time.
            value, _ = http_auth_header(TOKEN, "GET", "/v1/swarms", b"", int(time.time() * 1000))
            async with session.get(url + "/v1/swarms", headers={AUTH_HEADER: value}) as resp:
                assert resp.status == 200
            async with session.get(url + "/v1/swarms", headers={AUTH_HEADER: value}) as resp:
                assert resp.status == 401
            # An unsigned (or wrongly signed) announce over HTTP or UDP.
            for key in (OPEN, OTHER):
                msg = _signed(_announce(manifest, LIAR, 7002), key).encode()
                value, _ = http_auth_header(
                    TOKEN, "POST", "/v1/announce", msg, int(time.time() * 1000)
                )
                async with session.post(
                    url + "/v1/announce", data=msg, headers={AUTH_HEADER: value}
                ) as resp:
                    assert resp.status == 401
                assert await udp(msg, port) is None
        assert manifest.root_hex not in tracker.status()["swarms"]  # never reached the catalog
        failures = tracker.status()["auth_failures"]
        assert failures["unauthenticated"] == 3 and failures["replay"] == 1
        assert failures["bad_mac"] == 2 + 4

        # The peers' client, without the token or with another one, is told so.
        for key in (OPEN, OTHER):
            client = TrackerClient(url, key=key, udp_timeouts=(0.1,))
            try:
                with pytest.raises(TrackerAuthError, match="token"):
                    await client.manifest(NAME)
                with pytest.raises(TrackerAuthError, match="token"):
                    await client.announce(_announce(manifest, LIAR, 7002))
                assert client.udp_failures == 1  # silence on UDP, then 401 over HTTP
            finally:
                await client.close()
        assert tracker.status()["swarms"] == {}

    run_tracker(tmp_path, TOKEN, body)


def test_unauthenticated_bodies_are_refused_before_they_are_read(tmp_path: Path) -> None:
    """A request the header already condemns is refused without reading its body (30
    unauthenticated 8 MiB posts once took the tracker from 55 to 317 MB), and an odd
    header is a 401, never a 500."""

    async def body(tracker: Tracker, manifest: Manifest, url: str) -> None:
        big = b"\0" * (900 * 1024)
        now = int(time.time() * 1000)
        stale, _ = http_auth_header(TOKEN, "POST", "/v1/announce", big, now - 10 * 60_000)
        future, _ = http_auth_header(TOKEN, "POST", "/v1/announce", big, now + 5 * 60_000)
        async with aiohttp.ClientSession() as session:
            for headers in (
                {},
                {AUTH_HEADER: "\u00b2.00.00"},
                {AUTH_HEADER: stale},
                {AUTH_HEADER: future},
            ):
                async with session.post(url + "/v1/announce", data=big, headers=headers) as resp:
                    assert resp.status == 401, headers
            # A GET that carries a body is refused whatever its header says.
            value, _ = http_auth_header(TOKEN, "GET", "/v1/swarms", b"x", int(time.time() * 1000))
            async with session.get(
                url + "/v1/swarms", data=b"x", headers={AUTH_HEADER: value}
            ) as resp:
                assert resp.status == 401
        failures = tracker.status()["auth_failures"]
        assert failures["unauthenticated"] == 3 and failures["stale"] == 2, failures

    run_tracker(tmp_path, TOKEN, body)


def test_with_the_token_everything_works(tmp_path: Path) -> None:
    async def body(tracker: Tracker, manifest: Manifest, url: str) -> None:
        # Generous UDP timeouts: this asserts the announces went over UDP.
        client = TrackerClient(url, key=TOKEN, udp_timeouts=(2.0, 4.0))
        other = TrackerClient(url, key=TOKEN, udp_timeouts=(2.0, 4.0))
        try:
            assert (await client.manifest(NAME)).root_hex == manifest.root_hex
            a = await client.announce(_announce(manifest, VICTIM, 7001))
            b = await other.announce(_announce(manifest, HONEST, 7002))
            assert client.udp_failures == other.udp_failures == 0
            assert len(a.assigned) == 4 and b.peers == [(VICTIM, "127.0.0.1", 7001)]
            status, data, _ = await client.get("/v1/swarms")
            assert status == 200
            assert json.loads(data)["swarms"][manifest.root_hex]["peers"] == 2
            assert tracker.status()["auth_failures"] == {}
        finally:
            await client.close()
            await other.close()

    run_tracker(tmp_path, TOKEN, body)


def test_replayed_stale_and_forged_announces_are_dropped_silently(tmp_path: Path) -> None:
    async def body(tracker: Tracker, manifest: Manifest, url: str) -> None:
        port = tracker.config.port
        first = _signed(_announce(manifest, VICTIM, 7001), TOKEN).encode()
        assert await udp(first, port, wait=5.0) is not None
        # A captured announce sent again (say, an old "leaving") changes nothing.
        leave = _signed(_announce(manifest, VICTIM, 7001, leaving=True), TOKEN)
        newer = _signed(_announce(manifest, VICTIM, 7001), TOKEN).encode()
        assert await udp(newer, port, wait=5.0) is not None
        assert await udp(leave.encode(), port) is None  # older than the last one accepted
        assert await udp(newer, port) is None
        # Five minutes off the tracker's clock, either way.
        for skew in (-400_000, 400_000):
            stale = _signed(
                _announce(manifest, HONEST, 7002), TOKEN, ts=int(time.time() * 1000) + skew
            )
            assert await udp(stale.encode(), port) is None
        # Changing any signed field breaks the MAC.
        tampered = _signed(_announce(manifest, HONEST, 7002), TOKEN)
        tampered.barred = [VICTIM]
        assert await udp(tampered.encode(), port) is None
        assert _peer_ids(tracker, manifest) == {VICTIM.hex()}
        assert tracker.status()["auth_failures"] == {"replay": 2, "stale": 2, "bad_mac": 1}
        # A client whose clock is far off is told why over HTTP.
        skewed = TrackerClient(url, key=TOKEN, udp_timeouts=(0.1,), clock=lambda: time.time() - 900)
        try:
            with pytest.raises(TrackerAuthError, match="120 s behind or 30 s ahead"):
                await skewed.announce(_announce(manifest, HONEST, 7002))
        finally:
            await skewed.close()

    run_tracker(tmp_path, TOKEN, body)


def test_client_refuses_a_tracker_without_our_token(tmp_path: Path) -> None:
    """An open tracker (or one with another token) answers; our client does not believe it."""

    async def body(tracker: Tracker, manifest: Manifest, url: str) -> None:
        client = TrackerClient(url, key=TOKEN, udp_timeouts=(1.0,))
        try:
            with pytest.raises(TrackerAuthError, match="does not know our cluster token"):
                await client.manifest(manifest.ref)
            with pytest.raises(TrackerAuthError, match="does not know our cluster token"):
                await client.announce(_announce(manifest, VICTIM, 7001))
            assert client.bad_replies >= 2  # the UDP replies were ignored, then HTTP's refused
        finally:
            await client.close()

    run_tracker(tmp_path, OPEN, body)


# --- amplification --------------------------------------------------------------------------


def test_no_reply_to_junk_and_error_replies_no_larger_than_the_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(tracker: Tracker, manifest: Manifest, url: str) -> None:
        port = tracker.config.port
        for junk in (b"\x00", b"\x81\xa1v\x01", b"x" * 200):
            assert await udp(junk, port, wait=0.3) is None
        # An announce the tracker can't serve gets an error no larger than itself.
        unknown = Announce(f"{NAME}@{'0' * 64}", HONEST, 7001, b"", host="")
        request = _signed(unknown, OPEN).encode()
        reply = await udp(request, port, wait=5.0)
        assert reply is not None and len(reply) <= len(request)
        assert Reply.decode(reply).error
        assert tracker.status()["auth_failures"]["malformed"] == 3

    with caplog.at_level(logging.INFO, logger="swarm.tracker"):
        run_tracker(tmp_path, OPEN, body)
    # An open tracker says so, once; the three junk datagrams from one host, once.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("this tracker is open" in w for w in warnings) == 1
    assert sum("not a valid announce" in w for w in warnings) == 1


# --- what a rogue tracker can answer ---------------------------------------------------------


def test_a_rogue_trackers_manifest_is_refused(tmp_path: Path) -> None:
    """Asked for one artifact, a rogue tracker answers another one's manifest."""

    async def main() -> None:
        wanted, _ = await _publish(tmp_path, NAME)
        other, _ = await _publish(tmp_path, "other-llm", pieces=2)

        async def serve(request: web.Request) -> web.Response:
            return web.Response(body=other.encode(), headers={"X-Swarm-Root": other.root_hex})

        app = web.Application()
        app.router.add_get("/v1/manifest/{ref:.+}", serve)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        client = TrackerClient(f"http://127.0.0.1:{port}")
        signed = TrackerClient(f"http://127.0.0.1:{port}", key=TOKEN)
        try:
            with pytest.raises(TrackerError, match=f"answered {other.ref} when asked for {NAME}"):
                await client.manifest(NAME)
            with pytest.raises(TrackerError, match="returned"):
                await client.manifest(f"other-llm@{wanted.root_hex[:12]}")
            assert (await client.manifest("other-llm")).root_hex == other.root_hex
            # With a token, even the right manifest must come signed.
            with pytest.raises(TrackerAuthError, match="not signed"):
                await signed.manifest("other-llm")
        finally:
            await client.close()
            await signed.close()
            await runner.cleanup()

    asyncio.run(main())


# --- TLS ------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[str, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "swarm test tracker")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tracker.crt", directory / "tracker.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def test_https_tracker_with_a_ca_bundle(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)

    async def body(tracker: Tracker, manifest: Manifest, url: str) -> None:
        assert url.startswith("https://")
        client = TrackerClient(url, key=TOKEN, ca_file=cert)
        stranger = TrackerClient(url, key=TOKEN)  # the system's CAs don't know this one
        try:
            assert (await client.manifest(NAME)).root_hex == manifest.root_hex
            reply = await client.announce(_announce(manifest, HONEST, 7001))
            assert len(reply.assigned) == 4
            assert client.udp_failures == 0 and tracker.announces == 1  # over HTTPS only
            with pytest.raises(TrackerError, match="unreachable"):
                await stranger.manifest(NAME)
        finally:
            await client.close()
            await stranger.close()
        # No UDP endpoint: a datagram to the port goes nowhere.
        assert (
            await udp(_signed(_announce(manifest, LIAR, 7002), TOKEN).encode(), tracker.config.port)
            is None
        )

    run_tracker(tmp_path, TOKEN, body, tls_cert=cert, tls_key=key)


# --- the pure parts -------------------------------------------------------------------------


def test_gate_binds_a_peer_id_to_its_first_host_until_it_expires() -> None:
    gate = AnnounceGate(OPEN, bind_ttl=10.0)
    wall = 1_000_000
    msg = Announce(f"{NAME}@{'0' * 64}", VICTIM, 7001, b"")
    msg.sign(OPEN, wall, new_nonce())
    assert gate.check(msg, "10.0.0.1", wall, now=0.0) is None
    msg.sign(OPEN, wall + 1, new_nonce())
    assert gate.check(msg, "10.0.0.2", wall + 1, now=5.0) == "foreign_host"
    msg.sign(OPEN, wall + 2, new_nonce())
    assert gate.check(msg, "10.0.0.1", wall + 2, now=5.0) is None  # refreshes until 15.0
    msg.sign(OPEN, wall + 3, new_nonce())
    assert gate.check(msg, "10.0.0.2", wall + 3, now=14.0) == "foreign_host"
    assert gate.check(msg, "10.0.0.2", wall + 3, now=15.5) is None  # expired: free again
    gate.release(VICTIM)
    msg.sign(OPEN, wall + 4, new_nonce())
    assert gate.check(msg, "10.0.0.3", wall + 4, now=16.0) is None


def test_gate_tables_stay_bounded() -> None:
    gate = AnnounceGate(TOKEN, bind_ttl=10.0, max_skew_ms=1000, max_entries=50)
    wall = 1_000_000
    for i in range(500):
        msg = Announce(f"{NAME}@{'0' * 64}", i.to_bytes(PEER_ID_SIZE, "big"), 7001, b"")
        msg.sign(TOKEN, wall + i, new_nonce())
        assert gate.check(msg, "10.0.0.1", wall + i, now=i) is None
        kind, _ = gate.check_http(
            "GET",
            "/v1/swarms",
            http_auth_header(TOKEN, "GET", "/v1/swarms", b"", wall + i)[0],
            b"",
            wall + i,
        )
        assert kind is None
    assert len(gate._last_ts) <= 50 and len(gate._nonces) <= 50
    # Entries older than the skew window go first: a replay of them is stale anyway.
    assert min(gate._last_ts.values()) >= wall + 499 - 1000


def test_refusals_are_logged_once_per_source_and_kind_per_interval() -> None:
    log = _RefusalLog(interval=60.0, max_entries=3)
    assert log.should_log("10.0.0.1", "bad_mac", 0.0)
    assert not log.should_log("10.0.0.1", "bad_mac", 30.0)
    assert log.should_log("10.0.0.1", "replay", 30.0)
    assert log.should_log("10.0.0.2", "bad_mac", 30.0)
    assert log.should_log("10.0.0.1", "bad_mac", 61.0)
    for i in range(100):
        log.should_log(f"10.1.0.{i}", "bad_mac", 62.0)
    assert len(log._last) <= 3


def test_warm_requests_and_agent_polls_need_the_token_and_prove_it(tmp_path: Path) -> None:
    async def body(tracker: Tracker, manifest: Manifest, url: str) -> None:
        client = TrackerClient(url, key=TOKEN)
        stranger = TrackerClient(url, key=ClusterKey(b"not the cluster's token, 32 bytes"))
        try:
            status = await client.warm(manifest.ref, 1)
            assert status["root"] == manifest.root_hex and status["wanted"] == 1
            assert await client.agent_poll("a" * 32, [], []) == [manifest.ref]
            assert await client.agent_poll("b" * 32, [], []) == []  # one copy wanted
            assert (await client.warm_status(manifest.root_hex))["holding"] == 0
            with pytest.raises(TrackerAuthError):
                await stranger.warm(manifest.ref, 5)
            with pytest.raises(TrackerAuthError):
                await stranger.agent_poll("c" * 32, [], [])
            assert tracker.warm.status(manifest.root_hex, time.monotonic())["wanted"] == 1  # type: ignore[index]
        finally:
            await client.close()
            await stranger.close()

    run_tracker(tmp_path, TOKEN, body)
