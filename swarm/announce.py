"""Announce messages between a peer and the tracker, and the peer's tracker client.

An announce carries what the tracker's soft state is rebuilt from: the peer's id
and listening address, its full have-set, and how far it got with each piece it is
pulling from the origin. The reply hands back the pieces this peer must pull from
the origin (its whole current list: anything missing was taken away), a sample of
other peers, and whether every peer of the swarm has finished.

Both directions are msgpack maps with every field bounded. They travel in one UDP
datagram each (asyncio-dgram), retried with backoff; an announce too large for a
datagram, or one whose datagrams go unanswered, goes over HTTP instead.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncio_dgram
import msgpack

from swarm.errors import TrackerError
from swarm.manifest import Manifest, parse_ref

log = logging.getLogger("swarm.tracker")

ANNOUNCE_VERSION = 1
MAX_DATAGRAM = 60_000
MAX_HTTP_ANNOUNCE = 8 * 1024 * 1024
PEER_ID_SIZE = 20
MAX_PROGRESS_ENTRIES = 4096
MAX_PEERS_IN_REPLY = 1000
MAX_BARRED = 256


class BadAnnounce(TrackerError):
    """An announce or reply that does not follow the format."""


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
    """Peers this one caught sending data that failed verification."""

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "v": ANNOUNCE_VERSION,
                "ref": self.ref,
                "peer": self.peer_id,
                "port": self.port,
                "host": self.host,
                "have": self.have,
                "progress": [[p, n] for p, n in self.progress.items()],
                "done": self.done,
                "leaving": self.leaving,
                "txn": self.txn,
                "barred": self.barred[:MAX_BARRED],
            },
            use_bin_type=True,
        )

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
            if not isinstance(host, str) or len(host) > 255:
                raise BadAnnounce("bad advertised host")
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

    def encode(self) -> bytes:
        return msgpack.packb(
            {
                "txn": self.txn,
                "assign": self.assigned,
                "peers": [[p, h, port] for p, h, port in self.peers],
                "complete": self.complete,
                "npeers": self.num_peers,
                "interval": self.interval,
                "error": self.error,
            },
            use_bin_type=True,
        )

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
            return cls(
                assigned=assigned,
                peers=out,
                complete=bool(obj["complete"]),
                num_peers=int(obj["npeers"]),
                interval=float(interval),
                txn=int(obj["txn"]),
                error=str(obj.get("error", "")),
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


class TrackerClient:
    """A peer's link to its tracker: manifest look-ups over HTTP, announces over UDP or HTTP."""

    def __init__(
        self,
        url: str,
        *,
        udp_timeouts: tuple[float, ...] = (0.3, 0.6, 1.2),
        http_timeout: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        self.base = url.rstrip("/")
        if not self.base.startswith(("http://", "https://")):
            raise TrackerError(f"tracker URL must be http(s)://HOST:PORT, got {url!r}")
        host_port = self.base.split("://", 1)[1].split("/", 1)[0]
        host, _, port = host_port.rpartition(":")
        self._udp_addr = (host.strip("[]") or host_port, int(port) if port.isdigit() else 80)
        self.udp_timeouts = udp_timeouts
        self.http_timeout = http_timeout
        self._rng = rng or random.Random()
        self._session: aiohttp.ClientSession | None = None
        self._txn = self._rng.randrange(1 << 30)
        self.udp_failures = 0

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.http_timeout)
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def manifest(self, ref: str) -> Manifest:
        """The manifest ``ref`` names, from the tracker (which reads it from the catalog)."""
        url = f"{self.base}/v1/manifest/{ref}"
        try:
            async with self._http().get(url) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise TrackerError(
                        f"tracker {self.base}: {body.decode(errors='replace')[:300]} (HTTP {resp.status})"
                    )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TrackerError(
                f"tracker {self.base} unreachable: {exc or type(exc).__name__}"
            ) from exc
        manifest = Manifest.decode(body)
        _, root = parse_ref(ref)
        if root is not None and not manifest.root_hex.startswith(root):
            raise TrackerError(f"tracker returned {manifest.ref} for {ref}")
        return manifest

    async def announce(self, msg: Announce) -> Reply:
        """Send one announce and wait for its reply: UDP with retries, then HTTP."""
        self._txn += 1
        msg.txn = self._txn
        data = msg.encode()
        if len(data) <= MAX_DATAGRAM:
            reply = await self._announce_udp(data, msg.txn)
            if reply is not None:
                return reply
        return await self._announce_http(data)

    async def _announce_udp(self, data: bytes, txn: int) -> Reply | None:
        try:
            stream = await asyncio_dgram.connect(self._udp_addr)
        except OSError:
            return None
        try:
            for timeout in self.udp_timeouts:
                try:
                    await stream.send(data)
                except OSError:
                    # ICMP port unreachable from an earlier datagram (tracker down or
                    # restarting) surfaces here as ConnectionRefusedError: try HTTP.
                    self.udp_failures += 1
                    return None
                deadline = asyncio.get_running_loop().time() + timeout * (
                    0.75 + self._rng.random() / 2
                )
                while True:
                    left = deadline - asyncio.get_running_loop().time()
                    if left <= 0:
                        break
                    try:
                        raw, _ = await asyncio.wait_for(stream.recv(), left)
                    except (TimeoutError, OSError):
                        await asyncio.sleep(max(0.0, deadline - asyncio.get_running_loop().time()))
                        break
                    try:
                        reply = Reply.decode(raw)
                    except BadAnnounce:
                        continue
                    if reply.txn == txn:
                        return _checked(reply)
            self.udp_failures += 1
            return None
        finally:
            stream.close()

    async def _announce_http(self, data: bytes) -> Reply:
        url = f"{self.base}/v1/announce"
        try:
            async with self._http().post(
                url, data=data, headers={"Content-Type": "application/msgpack"}
            ) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise TrackerError(
                        f"tracker refused announce: {body.decode(errors='replace')[:300]} (HTTP {resp.status})"
                    )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TrackerError(
                f"tracker {self.base} unreachable: {exc or type(exc).__name__}"
            ) from exc
        return _checked(Reply.decode(body))


def _checked(reply: Reply) -> Reply:
    if reply.error:
        raise TrackerError(f"tracker refused announce: {reply.error}")
    return reply
