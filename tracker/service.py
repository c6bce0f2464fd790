"""The tracker service: one per cluster.

HTTP (aiohttp) on ``--listen HOST:PORT``:

    GET  /v1/manifest/{NAME[@ROOT]}   the encoded manifest, read from the catalog and cached
    POST /v1/announce                 an announce (msgpack) when it can't go over UDP
    GET  /v1/swarms                   every swarm's status, as JSON
    GET  /v1/swarms/{root}            one swarm's status, as JSON
    GET  /healthz                     liveness

and the announce endpoint over UDP on the same port number. All state is soft: a
``SwarmRegistry`` per artifact root, rebuilt after a restart from the peers' next
announces (they carry the whole have-set and the progress of in-flight origin
pulls), so a restarted tracker loses nothing. For the first announce rounds after
start-up it holds back new origin assignments, so that pulls already under way at
peers it has not heard from yet are not handed out twice.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import asyncio_dgram
from aiohttp import web

from seeder.catalog import Catalog
from swarm.announce import MAX_HTTP_ANNOUNCE, Announce, BadAnnounce, Reply
from swarm.bitfield import Bitfield
from swarm.errors import CatalogError, ManifestError, SwarmError
from swarm.manifest import Manifest, parse_ref
from tracker.errors import BadAnnounceError
from tracker.registry import SwarmRegistry

log = logging.getLogger("swarm.tracker")


@dataclass
class TrackerConfig:
    """Settings of one tracker; every one is reachable from ``swarm tracker`` flags."""

    host: str = "0.0.0.0"
    port: int = 7070
    catalog: str = ""
    announce_interval: float = 2.0
    peer_ttl: float = 10.0
    per_peer_limit: int = 2
    origin_budget: int | None = None
    stall_timeout: float = 30.0
    max_peers_in_reply: int = 50
    restart_grace: float | None = None  # default: 1.5 announce intervals
    manifest_ttl: float = 5.0
    """Seconds a name's latest version is remembered: a burst of N fetches by name
    costs one catalog read, and a republished version is served within this time."""

    def validate(self) -> None:
        if self.stall_timeout <= self.announce_interval:
            raise SwarmError("--stall-timeout must be longer than --announce-interval")
        if self.peer_ttl <= self.announce_interval:
            raise SwarmError("--peer-ttl must be longer than --announce-interval")


@dataclass
class _Swarm:
    manifest: Manifest
    registry: SwarmRegistry
    barred: set[bytes] = field(default_factory=set)
    """Peers some peer caught serving corrupt data: out of the swarm for good."""


class Tracker:
    """Swarm registries, manifest cache and the two announce endpoints."""

    def __init__(self, config: TrackerConfig, *, rng: random.Random | None = None) -> None:
        config.validate()
        self.config = config
        self._rng = rng or random.Random()
        self._catalog = Catalog(config.catalog)
        self._manifests: dict[str, Manifest] = {}
        self._latest: dict[str, tuple[float, str]] = {}  # name -> (expires, root)
        self._loading: dict[str, asyncio.Future[Manifest]] = {}  # ref -> catalog read
        self._swarms: dict[str, _Swarm] = {}
        self._started = time.monotonic()
        self._runner: web.AppRunner | None = None
        self._udp: asyncio_dgram.DatagramServer | None = None
        self._udp_task: asyncio.Task[None] | None = None
        self.announces = 0

    # --- state ---------------------------------------------------------------------

    async def manifest(self, ref: str) -> Manifest:
        """The manifest ``ref`` names: by root from memory, by name from a short-lived
        cache; concurrent look-ups of one ref share one catalog read."""
        name, root = parse_ref(ref)
        if root is None:
            latest = self._latest.get(name)
            if latest is not None and latest[0] > time.monotonic():
                root = latest[1]
        if root is not None and len(root) == 64 and root in self._manifests:
            return self._manifests[root]
        loading = self._loading.get(ref)
        if loading is None:
            loading = self._loading[ref] = asyncio.ensure_future(self._load(ref))
            loading.add_done_callback(lambda _: self._loading.pop(ref, None))
        return await asyncio.shield(loading)

    async def _load(self, ref: str) -> Manifest:
        manifest = await self._catalog.get(ref)
        self._manifests[manifest.root_hex] = manifest
        if parse_ref(ref)[1] is None:
            self._latest[manifest.name] = (
                time.monotonic() + self.config.manifest_ttl,
                manifest.root_hex,
            )
        return manifest

    async def _swarm(self, ref: str) -> _Swarm:
        _, root = parse_ref(ref)
        if root is None or len(root) != 64:
            raise BadAnnounce("announce must name the exact version NAME@ROOT (64 hex digits)")
        swarm = self._swarms.get(root)
        if swarm is None:
            manifest = await self.manifest(ref)
            grace = self.config.restart_grace
            if grace is None:
                grace = 1.5 * self.config.announce_interval
            registry = SwarmRegistry(
                manifest.piece_lengths,
                peer_ttl=self.config.peer_ttl,
                rng=random.Random(self._rng.random()),
                max_peers_in_reply=self.config.max_peers_in_reply,
                per_peer_limit=self.config.per_peer_limit,
                origin_budget=self.config.origin_budget,
                stall_timeout=self.config.stall_timeout,
                assign_after=self._started + grace,
            )
            swarm = self._swarms.setdefault(root, _Swarm(manifest, registry))
            log.info("new swarm %s (%d pieces)", manifest.ref, manifest.num_pieces)
        return swarm

    async def handle(self, msg: Announce, source_host: str) -> Reply:
        """Apply one announce to its swarm's registry and build the reply."""
        self.announces += 1
        swarm = await self._swarm(msg.ref)
        registry = swarm.registry
        now = time.monotonic()
        for culprit in msg.barred:
            # Without this, a piece held only by a peer everyone else barred would
            # count as present, never be assigned to a seeder again, and the swarm
            # would wait for it forever. Leaving puts such pieces back in the pool.
            if culprit != msg.peer_id and culprit not in swarm.barred:
                swarm.barred.add(culprit)
                registry.leave(culprit, now)
                log.warning(
                    "peer %s barred: %s got corrupt data from it",
                    culprit.hex()[:8],
                    msg.peer_id.hex()[:8],
                )
        if msg.leaving or msg.peer_id in swarm.barred:
            registry.leave(msg.peer_id, now)
            return Reply(
                [],
                [],
                registry.swarm_complete,
                registry.num_peers,
                self.config.announce_interval,
                msg.txn,
            )
        try:
            have = Bitfield.from_bytes(msg.have, swarm.manifest.num_pieces)
        except ValueError as exc:
            raise BadAnnounce(
                f"have-set does not fit {swarm.manifest.num_pieces} pieces: {exc}"
            ) from exc
        host = msg.host or source_host
        try:
            answer = registry.announce(msg.peer_id, (host, msg.port), have, msg.progress, now)
        except BadAnnounceError as exc:
            raise BadAnnounce(str(exc)) from exc
        return Reply(
            assigned=list(answer.assigned),
            peers=[(p.peer_id, p.host, p.port) for p in answer.peers],
            complete=answer.swarm_complete,
            num_peers=answer.num_peers,
            interval=self.config.announce_interval,
            txn=msg.txn,
        )

    def status(self) -> dict[str, Any]:
        return {
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "announces": self.announces,
            "swarms": {
                root: {
                    "ref": s.manifest.ref,
                    "barred": sorted(p.hex() for p in s.barred),
                    **s.registry.status(),
                }
                for root, s in self._swarms.items()
            },
        }

    # --- HTTP ----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_HTTP_ANNOUNCE)
        app.router.add_get("/v1/manifest/{ref:.+}", self._get_manifest)
        app.router.add_post("/v1/announce", self._post_announce)
        app.router.add_get("/v1/swarms", self._get_swarms)
        app.router.add_get("/v1/swarms/{root}", self._get_swarm)
        app.router.add_get("/healthz", self._healthz)
        return app

    async def _get_manifest(self, request: web.Request) -> web.Response:
        ref = request.match_info["ref"]
        try:
            manifest = await self.manifest(ref)
        except (CatalogError, ManifestError) as exc:
            return web.Response(status=404, text=str(exc))
        except SwarmError as exc:
            return web.Response(status=502, text=f"catalog unavailable: {exc}")
        return web.Response(
            body=manifest.encode(),
            content_type="application/octet-stream",
            headers={"X-Swarm-Root": manifest.root_hex},
        )

    async def _post_announce(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            msg = Announce.decode(body)
            reply = await self.handle(msg, request.remote or "127.0.0.1")
        except BadAnnounce as exc:
            return web.Response(status=400, text=str(exc))
        except SwarmError as exc:
            return web.Response(status=404, text=str(exc))
        return web.Response(body=reply.encode(), content_type="application/msgpack")

    async def _get_swarms(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _get_swarm(self, request: web.Request) -> web.Response:
        swarm = self._swarms.get(request.match_info["root"].lower())
        if swarm is None:
            return web.json_response({"error": "no such swarm"}, status=404)
        return web.json_response({"ref": swarm.manifest.ref, **swarm.registry.status()})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    # --- UDP -----------------------------------------------------------------------

    async def _serve_udp(self) -> None:
        assert self._udp is not None
        while True:
            try:
                data, raw_addr = await self._udp.recv()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a socket error must not end the endpoint
                log.warning("UDP receive failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            addr: tuple[str, int] = (str(raw_addr[0]), int(raw_addr[1]))  # type: ignore[index]
            try:
                msg = Announce.decode(data)
                reply = await self.handle(msg, addr[0])
            except SwarmError as exc:
                reply = Reply([], [], False, 0, self.config.announce_interval, error=str(exc)[:500])
                log.info("refused announce from %s: %s", addr[0], exc)
            try:
                await self._udp.send(reply.encode(), addr)
            except OSError as exc:
                log.warning("UDP reply to %s failed: %s", addr, exc)

    # --- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        await site.start()
        self._udp = await asyncio_dgram.bind((self.config.host, self.config.port))
        self._udp_task = asyncio.create_task(self._serve_udp())
        log.info("tracker listening on %s:%d (HTTP and UDP)", self.config.host, self.config.port)

    async def close(self) -> None:
        if self._udp_task is not None:
            self._udp_task.cancel()
            await asyncio.gather(self._udp_task, return_exceptions=True)
        if self._udp is not None:
            self._udp.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self._catalog.close()

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()
