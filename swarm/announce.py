"""Announce messages between a peer and the tracker, and the peer's tracker client.

An announce carries what the tracker's soft state is rebuilt from: the peer's id
and listening address, its full have-set, and how far it got with each piece it is
pulling from the origin. The reply hands back the pieces this peer must pull from
the origin (its whole current list: anything missing was taken away), a sample of
other peers, and whether every peer of the swarm has finished.

Both directions are msgpack maps with every field bounded. They travel in one UDP
datagram each (asyncio-dgram), retried with backoff; an announce too large for a
datagram, or one whose datagrams go unanswered, goes over HTTP instead. With an
``https://`` tracker URL every announce goes over HTTPS and none over UDP.

Authentication (see ``core.auth``): an announce carries ``ts`` (unix ms, strictly
increasing per client), a fresh 16-byte ``nonce`` and ``mac``, the cluster key's
``announce`` MAC over the announce's canonical bytes (its encoding with an empty
``mac``), so it names its peer id, time and nonce. The tracker refuses a bad MAC, a
``ts`` more than ``MAX_CLOCK_SKEW_MS`` behind its clock or ``MAX_FUTURE_SKEW_MS``
ahead of it, and a ``ts`` not above the last
one it accepted for that peer id (a replay). A reply carries the ``reply`` MAC over
the request's nonce and the reply's canonical bytes, so a reply can't be forged or
moved to another request. Every HTTP request carries ``AUTH_HEADER`` (``ts``,
``nonce`` and the ``http`` MAC over method, path, ts, nonce and the body's digest);
a manifest response carries ``MAC_HEADER``, the ``manifest`` MAC over the request's
nonce and the body. In an open cluster (no token) MACs are not checked, and the
tracker leaves its replies unsigned.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import asyncio_dgram
import msgpack

from core.auth import MAC_SIZE, NONCE_SIZE, ClusterKey, new_nonce
from core.digest import PEER_ID_LENGTH
from core.errors import TrackerError, UnknownArtifactError
from core.manifest import MAX_ENCODED_SIZE, Manifest, parse_ref
from swarm.hosts import valid_host
from swarm.http import HTTPClientError, split_url
from swarm.http import request as http_request

log = logging.getLogger("swarm.tracker")

ANNOUNCE_VERSION = 1
MAX_DATAGRAM = 60_000
# The largest announce is a bitfield of MAX_PIECES (512 KiB) plus bounded lists; the
# tracker reads no more than this of any request body.
MAX_HTTP_ANNOUNCE = 1024 * 1024
PEER_ID_SIZE: Final = PEER_ID_LENGTH
MAX_PROGRESS_ENTRIES = 4096
MAX_PEERS_IN_REPLY = 1000
MAX_BARRED = 256
MAX_ZONE_LENGTH: Final = 64
MAX_THROTTLES: Final = 1 << 32
"""Throttled origin answers one announce may report: far above any real count."""
MAX_RETRY_AFTER: Final = 86_400.0
"""The longest Retry-After an announce may report, in seconds."""
MAX_ORIGIN_RATE: Final = 1 << 50
"""Bytes per second, far above any link: a larger origin rate in a reply is malformed."""
_ZONE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")
MAX_CLOCK_SKEW_MS: Final = 120_000
"""How far an announce's or request's ``ts`` may lag the tracker's clock."""
MAX_FUTURE_SKEW_MS: Final = 30_000
"""How far it may run ahead. Short, because the tracker remembers the highest ``ts``
per peer id and refuses anything not above it: a ``ts`` far in the future would
shut that peer id out until the clock caught up."""
AUTH_HEADER: Final = "X-Swarm-Auth"
MAC_HEADER: Final = "X-Swarm-Mac"


class BadAnnounce(TrackerError):
    """An announce or reply that does not follow the format."""


def check_zone(zone: object) -> str:
    """``zone`` if it is a valid zone or rack name ("" for none), else BadAnnounce.

    Up to 64 characters: letters, digits and ``. _ : / -``, starting with a letter
    or digit (a Kubernetes topology label's value fits).
    """
    if not isinstance(zone, str):
        raise BadAnnounce(f"zone must be a string, got {type(zone).__name__}")
    if zone and (len(zone) > MAX_ZONE_LENGTH or not _ZONE_RE.fullmatch(zone)):
        raise BadAnnounce(
            f"bad zone {zone[:80]!r}: at most {MAX_ZONE_LENGTH} letters, digits and . _ : / -"
        )
    return zone


class TrackerAuthError(TrackerError):
    """The tracker refused our credentials, or answered something we can't trust: a reply
    not signed with the cluster token, or a manifest other than the one asked for.
    Asking again would not help, so callers give up at once."""


@dataclass
class Announce:
    """What a peer tells the tracker."""

    ref: str
    peer_id: bytes
    port: int
    have: bytes
    host: str = ""
    progress: dict[int, int] = field(default_factory=dict)
    done: bool = False
    leaving: bool = False
    txn: int = 0
    barred: list[bytes] = field(default_factory=list)
    """Peers this one caught sending data that failed verification (a report: the
    tracker bars a peer only on reports from several peers)."""
    ts: int = 0
    """Unix time in milliseconds, strictly increasing per peer id."""
    nonce: bytes = b""
    mac: bytes = b""
    zone: str = ""
    """The peer's zone or rack ("" for none); sent only when set (see ``check_zone``)."""
    seeder: bool = True
    """Whether the peer may read the origin (has the object store's credentials); a
    peer that may not is never assigned origin pieces. Sent only when False."""
    throttles: int = 0
    """Origin answers that asked to slow down (429, 503, SlowDown) since the last
    announce: the tracker's origin budget backs off on them. Sent only when non-zero."""
    retry_after: float = 0.0
    """The longest Retry-After among those answers, in seconds (0: none)."""
    waiting: list[int] = field(default_factory=list)
    """Origin pulls with nothing on the wire, only waiting out a throttled answer:
    the tracker may take them back when it lowers its origin budget. Sent only
    when there are any."""

    def encode(self) -> bytes:
        return self._pack(self.mac)

    def canonical(self) -> bytes:
        """The bytes the MAC covers: the encoding with an empty ``mac``."""
        return self._pack(b"")

    def _pack(self, mac: bytes) -> bytes:
        fields: dict[str, Any] = {
            "v": ANNOUNCE_VERSION,
            "ref": self.ref,
            "peer": self.peer_id,
            "port": self.port,
            "host": self.host,
            "have": self.have,
            "progress": [[p, n] for p, n in self.progress.items()],
            "done": bool(self.done),
            "leaving": bool(self.leaving),
            "txn": self.txn,
            "barred": self.barred[:MAX_BARRED],
            "ts": self.ts,
            "nonce": self.nonce,
            "mac": mac,
        }
        if self.zone:
            fields["zone"] = self.zone
        if not self.seeder:
            fields["noseed"] = True
        if self.waiting:
            fields["owait"] = [int(p) for p in self.waiting]
        if self.throttles:
            fields["othr"] = int(self.throttles)
            if self.retry_after:
                fields["ora"] = float(self.retry_after)
        return msgpack.packb(fields, use_bin_type=True)

    def sign(self, key: ClusterKey, ts: int, nonce: bytes) -> None:
        """Stamp ``ts`` and ``nonce`` and set the MAC that proves the cluster token."""
        self.ts, self.nonce = ts, nonce
        self.mac = key.mac(b"announce", self.canonical())

    def verify(self, key: ClusterKey) -> bool:
        """Whether the MAC proves the cluster token (always true in an open cluster)."""
        return key.check(self.mac, b"announce", self.canonical())

    @classmethod
    def decode(cls, data: bytes) -> Announce:
        obj = _unpack(data)
        try:
            if obj["v"] != ANNOUNCE_VERSION:
                raise BadAnnounce(
                    f"announce version {obj['v']!r} not supported (want {ANNOUNCE_VERSION})"
                )
            ref, peer, port, host, have = (
                obj["ref"],
                obj["peer"],
                obj["port"],
                obj["host"],
                obj["have"],
            )
            progress = obj["progress"]
            if not isinstance(ref, str):
                raise BadAnnounce("announce ref must be a string")
            parse_ref(ref)
            if not isinstance(peer, bytes) or len(peer) != PEER_ID_SIZE:
                raise BadAnnounce(f"peer id must be {PEER_ID_SIZE} bytes")
            if type(port) is not int or not 0 < port < 65536:
                raise BadAnnounce(f"bad listening port {port!r}")
            if not isinstance(host, str) or (host and not valid_host(host)):
                raise BadAnnounce(
                    f"bad advertised host {str(host)[:80]!r}: not an IP address or DNS name"
                )
            if not isinstance(have, bytes):
                raise BadAnnounce("have must be a bitfield")
            if not isinstance(progress, list) or len(progress) > MAX_PROGRESS_ENTRIES:
                raise BadAnnounce("progress must be a short list of [piece, bytes]")
            table: dict[int, int] = {}
            for item in progress:
                if (
                    not isinstance(item, list)
                    or len(item) != 2
                    or type(item[0]) is not int
                    or type(item[1]) is not int
                    or item[0] < 0
                    or item[1] < 0
                ):
                    raise BadAnnounce("progress entries must be [piece, bytes]")
                table[item[0]] = item[1]
            barred = obj.get("barred", [])
            if (
                not isinstance(barred, list)
                or len(barred) > MAX_BARRED
                or not all(isinstance(b, bytes) and len(b) == PEER_ID_SIZE for b in barred)
            ):
                raise BadAnnounce(f"barred must be a list of at most {MAX_BARRED} peer ids")
            ts, nonce, mac = obj.get("ts", 0), obj.get("nonce", b""), obj.get("mac", b"")
            if type(ts) is not int or not 0 <= ts < 1 << 63:
                raise BadAnnounce(f"bad announce timestamp {ts!r}")
            if not isinstance(nonce, bytes) or len(nonce) > 4 * NONCE_SIZE:
                raise BadAnnounce("announce nonce must be a few bytes")
            if not isinstance(mac, bytes) or len(mac) > 2 * MAC_SIZE:
                raise BadAnnounce("announce mac must be a few bytes")
            zone = check_zone(obj.get("zone", ""))
            noseed = obj.get("noseed", False)
            if type(noseed) is not bool:
                raise BadAnnounce("noseed must be true or false")
            throttles, retry_after = obj.get("othr", 0), obj.get("ora", 0.0)
            if type(throttles) is not int or not 0 <= throttles <= MAX_THROTTLES:
                raise BadAnnounce(f"othr must be a count of throttled answers, got {throttles!r}")
            if type(retry_after) not in (int, float) or not 0 <= retry_after <= MAX_RETRY_AFTER:
                raise BadAnnounce(f"ora must be a Retry-After in seconds, got {retry_after!r}")
            waiting = obj.get("owait", [])
            if (
                not isinstance(waiting, list)
                or len(waiting) > MAX_PROGRESS_ENTRIES
                or not all(type(p) is int and p >= 0 for p in waiting)
            ):
                raise BadAnnounce(f"owait must be a list of at most {MAX_PROGRESS_ENTRIES} pieces")
            return cls(
                ref=ref,
                peer_id=peer,
                port=port,
                have=have,
                host=host,
                progress=table,
                done=bool(obj["done"]),
                leaving=bool(obj["leaving"]),
                txn=int(obj["txn"]) if type(obj["txn"]) is int else 0,
                barred=barred,
                ts=ts,
                nonce=nonce,
                mac=mac,
                zone=zone,
                seeder=not noseed,
                throttles=throttles,
                retry_after=float(retry_after),
                waiting=waiting,
            )
        except KeyError as exc:
            raise BadAnnounce(f"announce lacks field {exc}") from exc
        except Exception as exc:
            if isinstance(exc, TrackerError):
                raise
            raise BadAnnounce(f"bad announce: {exc}") from exc


@dataclass
class Reply:
    """What the tracker answers."""

    assigned: list[int]
    peers: list[tuple[bytes, str, int]]
    complete: bool
    num_peers: int
    interval: float
    txn: int = 0
    error: str = ""
    mac: bytes = b""
    """The ``reply`` MAC over the request's nonce and :meth:`canonical`."""
    origin_rate: int = 0
    """Bytes per second this peer may read from the origin, its share of the tracker's
    cluster-wide origin cap; 0 means uncapped. Sent only when non-zero."""
    peer_zones: dict[bytes, str] = field(default_factory=dict)
    """The zone of each listed peer that declared one (sent only when there are any)."""

    def encode(self) -> bytes:
        return self._pack(self.mac)

    def canonical(self) -> bytes:
        """The bytes the MAC covers: the encoding with an empty ``mac``. Every field is
        normalised to the type ``decode`` yields, so a decoded reply re-encodes alike."""
        return self._pack(b"")

    def _pack(self, mac: bytes) -> bytes:
        fields: dict[str, Any] = {
            "txn": int(self.txn),
            "assign": [int(p) for p in self.assigned],
            "peers": [[p, h, int(port)] for p, h, port in self.peers],
            "complete": bool(self.complete),
            "npeers": int(self.num_peers),
            "interval": float(self.interval),
            "error": str(self.error),
            "mac": mac,
        }
        if self.origin_rate:
            fields["orate"] = int(self.origin_rate)
        if self.peer_zones:
            fields["pzones"] = [[p, z] for p, z in sorted(self.peer_zones.items()) if z]
        return msgpack.packb(fields, use_bin_type=True)

    def sign(self, key: ClusterKey, request_nonce: bytes) -> None:
        """Bind this reply to the request it answers; left unsigned in an open cluster."""
        self.mac = b"" if key.open else key.mac(b"reply", request_nonce, self.canonical())

    def verify(self, key: ClusterKey, request_nonce: bytes) -> bool:
        return key.check(self.mac, b"reply", request_nonce, self.canonical())

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        obj = _unpack(data)
        try:
            peers = obj["peers"]
            assigned = obj["assign"]
            if not isinstance(peers, list) or len(peers) > MAX_PEERS_IN_REPLY:
                raise BadAnnounce("reply peers must be a bounded list")
            if not isinstance(assigned, list) or not all(
                type(p) is int and p >= 0 for p in assigned
            ):
                raise BadAnnounce("reply assignments must be piece indices")
            out: list[tuple[bytes, str, int]] = []
            for item in peers:
                if not isinstance(item, list) or len(item) != 3:
                    raise BadAnnounce("reply peer entries must be [id, host, port]")
                pid, host, port = item
                if isinstance(pid, bytes) and isinstance(host, str) and type(port) is int:
                    out.append((pid, host, port))
            interval = obj["interval"]
            if not isinstance(interval, int | float) or not 0.05 <= interval <= 3600:
                raise BadAnnounce(f"bad announce interval {interval!r}")
            mac = obj.get("mac", b"")
            if not isinstance(mac, bytes):
                raise BadAnnounce("reply mac must be bytes")
            origin_rate = obj.get("orate", 0)
            if type(origin_rate) is not int or not 0 <= origin_rate <= MAX_ORIGIN_RATE:
                raise BadAnnounce(f"bad origin rate {origin_rate!r} in reply")
            zones_in = obj.get("pzones", [])
            if not isinstance(zones_in, list) or len(zones_in) > MAX_PEERS_IN_REPLY:
                raise BadAnnounce("reply peer zones must be a bounded list")
            peer_zones: dict[bytes, str] = {}
            for item in zones_in:
                if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], bytes):
                    raise BadAnnounce("reply peer zone entries must be [id, zone]")
                peer_zones[item[0]] = check_zone(item[1])
            return cls(
                assigned=assigned,
                peers=out,
                complete=bool(obj["complete"]),
                num_peers=int(obj["npeers"]),
                interval=float(interval),
                txn=int(obj["txn"]),
                error=str(obj.get("error", "")),
                mac=mac,
                origin_rate=origin_rate,
                peer_zones=peer_zones,
            )
        except KeyError as exc:
            raise BadAnnounce(f"reply lacks field {exc}") from exc
        except (TypeError, ValueError, OverflowError) as exc:  # int(inf) overflows
            raise BadAnnounce(f"bad reply: {exc}") from exc


def _unpack(data: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            max_bin_len=MAX_HTTP_ANNOUNCE,
            max_str_len=4096,
            max_array_len=1 << 16,
            max_map_len=32,
        )
    except (ValueError, msgpack.UnpackException, TypeError, UnicodeDecodeError) as exc:
        raise BadAnnounce(f"not a msgpack message: {exc}") from exc
    if not isinstance(obj, dict):
        raise BadAnnounce("message must be a msgpack map")
    return obj


def http_auth_header(
    key: ClusterKey, method: str, path: str, body: bytes, ts: int
) -> tuple[str, bytes]:
    """The ``AUTH_HEADER`` value for one HTTP request to the tracker, and its nonce.

    ``path`` is the URL's decoded path without the query; ``ts`` is unix ms.
    """
    nonce = new_nonce()
    mac = key.mac(b"http", *http_auth_parts(method, path, ts, nonce, body))
    return f"{ts}.{nonce.hex()}.{mac.hex()}", nonce


def http_auth_parts(
    method: str, path: str, ts: int, nonce: bytes, body: bytes
) -> tuple[bytes, ...]:
    """What an HTTP request's MAC covers (the tracker checks the same parts)."""
    return (
        method.upper().encode(),
        path.encode(),
        str(ts).encode(),
        nonce,
        hashlib.sha256(body).digest(),
    )


def parse_http_auth(value: str) -> tuple[int, bytes, bytes] | None:
    """``(ts, nonce, mac)`` from an ``AUTH_HEADER`` value, or None if malformed."""
    parts = value.split(".")
    # isascii: str.isdigit() also accepts digits int() refuses, such as "²".
    if len(parts) != 3 or not (parts[0].isascii() and parts[0].isdigit()) or len(parts[0]) > 19:
        return None
    try:
        nonce, mac = bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    except ValueError:
        return None
    if len(nonce) != NONCE_SIZE or len(mac) != MAC_SIZE:
        return None
    return int(parts[0]), nonce, mac


class TrackerClient:
    """A peer's link to its tracker: manifest look-ups over HTTP, announces over UDP or HTTP.

    ``key`` is the cluster token (default: open). ``ca_file`` is the CA bundle that
    an ``https://`` tracker's certificate is checked against (default: the system's).
    ``clock`` gives unix seconds; the announce and request timestamps taken from it
    are kept strictly increasing.
    """

    def __init__(
        self,
        url: str,
        *,
        key: ClusterKey | None = None,
        ca_file: str | None = None,
        udp_timeouts: tuple[float, ...] = (0.3, 0.6, 1.2),
        http_timeout: float = 5.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base = url.rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            raise TrackerError(f"tracker URL must be http(s)://HOST:PORT, got {url!r}")
        self.tls = self.base.startswith("https://")
        host_port = self.base.split("://", 1)[1].split("/", 1)[0]
        host, _, port = host_port.rpartition(":")
        self._udp_addr = (host.strip("[]") or host_port, int(port) if port.isdigit() else 80)
        self.key = key or ClusterKey(None)
        self._ssl: ssl.SSLContext | None = None  # None: the system's CA store
        if ca_file is not None:
            if not self.tls:
                raise TrackerError(
                    f"a CA bundle ({ca_file}) needs an https:// tracker URL, got {url!r}"
                )
            try:
                self._ssl = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise TrackerError(f"can't load the CA bundle {ca_file}: {exc}") from exc
        self.udp_timeouts = udp_timeouts
        self.http_timeout = http_timeout
        self._rng = rng or random.Random()
        self._clock = clock
        self._last_ts = 0
        self._txn = self._rng.randrange(1 << 30)
        self.udp_failures = 0
        self.bad_replies = 0
        """Replies to our announces whose MAC failed (forged, or the tracker lacks our token)."""

    async def close(self) -> None:
        """Nothing to release: each HTTP request has a connection of its own (a peer
        makes few: the manifest, and announces UDP can't carry)."""

    def _next_ts(self) -> int:
        # Strictly increasing, even if the wall clock steps back or two calls share a
        # millisecond: the tracker refuses a ts not above the last one it accepted.
        self._last_ts = max(int(self._clock() * 1000), self._last_ts + 1)
        return self._last_ts

    def _auth(self, method: str, url: str, body: bytes) -> tuple[dict[str, str], bytes]:
        value, nonce = http_auth_header(
            self.key, method, split_url(url).path, body, self._next_ts()
        )
        return {AUTH_HEADER: value}, nonce

    async def _request(
        self, method: str, path: str, body: bytes = b"", content_type: str = ""
    ) -> tuple[int, bytes, Mapping[str, str], bytes]:
        """One signed HTTP request: status, body, headers (case-insensitive) and the
        request's nonce.

        The one place where HTTP errors become TrackerError. The body is bounded by the
        largest manifest there can be.
        """
        url = f"{self.base}{path}"
        try:
            headers, nonce = self._auth(method, url, body)
            if content_type:
                headers["Content-Type"] = content_type
            resp = await http_request(
                method,
                url,
                body=body,
                headers=headers,
                timeout=self.http_timeout,
                max_body=MAX_ENCODED_SIZE,
                tls=self._ssl,
            )
        except HTTPClientError as exc:
            raise TrackerError(f"tracker {self.base} unreachable: {exc}") from exc
        return resp.status, resp.body, resp.headers, nonce

    async def get(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        """An authenticated GET of ``path`` (e.g. ``/v1/swarms``): status, body, headers."""
        status, body, headers, _ = await self._request("GET", path)
        return status, body, dict(headers)

    async def manifest(self, ref: str) -> Manifest:
        """The manifest ``ref`` names, from the tracker (which reads it from the catalog).

        Raises UnknownArtifactError if the tracker does not know the name (retrying
        will not help), TrackerAuthError if it refuses our token or its answer does
        not prove the token, and TrackerError if it is unreachable or failing.
        """
        body = self._proven(
            *await self._request("GET", f"/v1/manifest/{ref}"), b"manifest", f"for {ref}"
        )
        manifest = Manifest.decode(body)
        name, root = parse_ref(ref)
        if manifest.name != name:
            raise TrackerAuthError(
                f"tracker {self.base} answered {manifest.ref} when asked for {ref}"
            )
        if root is not None and not manifest.root_hex.startswith(root.lower()):
            raise TrackerAuthError(f"tracker {self.base} returned {manifest.ref} for {ref}")
        return manifest

    async def _json(self, method: str, path: str, obj: object | None = None) -> Any:
        """A signed JSON request and its answer, which must prove the cluster token."""
        body = json.dumps(obj).encode() if obj is not None else b""
        raw = self._proven(
            *await self._request(method, path, body, "application/json" if body else ""),
            b"json",
            f"to {method} {path}",
        )
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise TrackerError(f"tracker {self.base} answered {raw[:300]!r}: not JSON") from exc

    def _proven(
        self,
        status: int,
        body: bytes,
        headers: Mapping[str, str],
        nonce: bytes,
        label: bytes,
        what: str,
    ) -> bytes:
        """The body of a 200 answer whose MAC (``label``) proves the cluster token.

        Raises UnknownArtifactError on 404 (asking again will not help),
        TrackerAuthError on 401 or an answer not signed with our token, TrackerError
        for any other status.
        """
        text = body.decode(errors="replace")[:500]
        if status == 404:
            raise UnknownArtifactError(f"tracker {self.base}: {text} (HTTP 404)")
        if status == 401:
            raise TrackerAuthError(
                f"tracker {self.base} refused our request: {text} (HTTP 401; "
                "does this node have the cluster's token?)"
            )
        if status != 200:
            raise TrackerError(f"tracker {self.base}: {text} (HTTP {status})")
        try:
            mac = bytes.fromhex(headers.get(MAC_HEADER, ""))
        except ValueError:
            mac = b""
        if not self.key.check(mac, label, nonce, body):
            raise TrackerAuthError(
                f"tracker {self.base} does not know our cluster token "
                f"(its answer {what} is not signed with it)"
            )
        return body

    async def warm(self, ref: str, copies: int) -> dict[str, Any]:
        """Ask for ``copies`` verified copies of ``ref`` on node agents (-1: every one);
        the request's status (``root``, ``wanted``, ``holding``, ``verified``)."""
        answer = await self._json("POST", "/v1/warm", {"ref": ref, "copies": copies})
        if not isinstance(answer, dict):
            raise TrackerError(f"tracker {self.base} answered a warm request with {answer!r:.200}")
        return answer

    async def warm_status(self, root: str) -> dict[str, Any]:
        answer = await self._json("GET", f"/v1/warm/{root}")
        if not isinstance(answer, dict):
            raise TrackerError(f"tracker {self.base} answered {answer!r:.200}")
        return answer

    async def agent_poll(self, agent: str, holds: list[str], complete: list[str]) -> list[str]:
        """A node agent's report of what it holds; the refs it should fetch now."""
        answer = await self._json(
            "POST", "/v1/agents/poll", {"agent": agent, "holds": holds, "complete": complete}
        )
        refs = answer.get("fetch") if isinstance(answer, dict) else None
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            raise TrackerError(f"tracker {self.base} answered a poll with {answer!r:.200}")
        return refs

    async def announce(self, msg: Announce) -> Reply:
        """Send one announce and wait for its reply: UDP with retries, then HTTP
        (HTTPS only, for an https:// tracker)."""
        self._txn += 1
        msg.txn = self._txn
        if not self.tls and len(msg.encode()) <= MAX_DATAGRAM:
            reply = await self._announce_udp(msg)
            if reply is not None:
                return reply
        return await self._announce_http(msg)

    async def _announce_udp(self, msg: Announce) -> Reply | None:
        try:
            stream = await asyncio_dgram.connect(self._udp_addr)
        except OSError:
            return None
        loop = asyncio.get_running_loop()
        nonces: list[bytes] = []
        try:
            for timeout in self.udp_timeouts:
                # Each try is signed afresh: the tracker takes a resent datagram it
                # already accepted for a replay and drops it silently.
                msg.sign(self.key, self._next_ts(), new_nonce())
                nonces.append(msg.nonce)
                try:
                    await stream.send(msg.encode())
                except OSError:
                    # ICMP port unreachable from an earlier datagram (tracker down or
                    # restarting) surfaces here as ConnectionRefusedError: try HTTP.
                    self.udp_failures += 1
                    return None
                deadline = loop.time() + timeout * (0.75 + self._rng.random() / 2)
                while True:
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    try:
                        raw, _ = await asyncio.wait_for(stream.recv(), left)
                    except (TimeoutError, OSError):
                        await asyncio.sleep(max(0.0, deadline - loop.time()))
                        break
                    try:
                        reply = Reply.decode(raw)
                    except BadAnnounce:
                        continue
                    if reply.txn != msg.txn:
                        continue
                    if not any(reply.verify(self.key, n) for n in nonces):
                        # Forged, or the tracker lacks our token: HTTP will tell.
                        self.bad_replies += 1
                        continue
                    return _checked(reply)
            self.udp_failures += 1
            return None
        finally:
            stream.close()

    async def _announce_http(self, msg: Announce) -> Reply:
        msg.sign(self.key, self._next_ts(), new_nonce())
        status, body, _, _ = await self._request(
            "POST", "/v1/announce", msg.encode(), "application/msgpack"
        )
        text = body.decode(errors="replace")[:300]
        if status == 401:
            raise TrackerAuthError(
                f"tracker {self.base} refused our announce: {text} (HTTP 401; "
                "does this node have the cluster's token?)"
            )
        if status != 200:
            raise TrackerError(f"tracker refused announce: {text} (HTTP {status})")
        reply = Reply.decode(body)
        if not reply.verify(self.key, msg.nonce):
            self.bad_replies += 1
            raise TrackerAuthError(
                f"tracker {self.base} does not know our cluster token "
                "(its announce reply is not signed with it)"
            )
        return _checked(reply)


def _checked(reply: Reply) -> Reply:
    if reply.error:
        raise TrackerError(f"tracker refused announce: {reply.error}")
    return reply
