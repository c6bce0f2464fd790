"""The tracker service: one per cluster.

HTTP (aiohttp) on ``--listen HOST:PORT``, HTTPS with ``tls_cert``/``tls_key``:

    GET  /v1/manifest/{NAME[@ROOT]}   the encoded manifest, read from the catalog and cached;
                                      404 at once for an unknown name, with the known names
                                      close to it
    POST /v1/announce                 an announce (msgpack) when it can't go over UDP
    GET  /v1/swarms                   every swarm's status, as JSON
    GET  /v1/swarms/{root}            one swarm's status, as JSON
    GET  /healthz                     liveness and the catalog's reachability (503 if unreachable)
    GET  /readyz                      200 once listening and the catalog answered at least once
    GET  /metrics                     Prometheus metrics (``tracker.metrics``), text format
    GET  /                            the status page (``tracker.status_page``), polling
    GET  /status.json                 the page's data: bounded, names and counts only

and the announce endpoint over UDP on the same port number (not with TLS: the
peers of an https:// tracker announce over HTTPS only). All state is soft: a
``SwarmRegistry`` per artifact root, rebuilt after a restart from the peers' next
announces (they carry the whole have-set and the progress of in-flight origin
pulls), so a restarted tracker loses nothing. For the first announce rounds after
start-up it holds back new origin assignments, so that pulls already under way at
peers it has not heard from yet are not handed out twice.

Trust (see ``core.auth`` and ``swarm.announce``). With a cluster token, every
request but ``/healthz``, ``/readyz``, ``/metrics`` and the status page must prove it: an HTTP request without a
valid ``X-Swarm-Auth`` is answered 401, and an announce whose MAC fails, whose
timestamp is more than 5 minutes off, or which replays an earlier one is refused
(401 over HTTP, silence over UDP). Nothing unauthenticated reaches the catalog.
Over UDP the tracker never answers a datagram that is not an authenticated
announce, and never sends an error reply larger than the request, so it can't be
used to amplify a spoofed flood. Without a token the cluster is open (anyone who
can reach the tracker can join; it says so once at start-up); a peer id is then
bound to the host of its first announce until it expires, so no other host can
speak for it. Each refusal is counted (``auth_failures`` in the status JSON) and
logged at most once a minute per source and kind.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import random
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import asyncio_dgram
from aiohttp import web

from core.auth import ClusterKey
from core.bitfield import Bitfield
from core.errors import CatalogError, ConfigError, ManifestError, SwarmError
from core.manifest import Manifest, parse_ref
from seeder.catalog import Catalog
from seeder.errors import OriginNotFoundError, OriginPermissionError
from swarm.announce import (
    AUTH_HEADER,
    MAC_HEADER,
    MAX_CLOCK_SKEW_MS,
    MAX_FUTURE_SKEW_MS,
    MAX_HTTP_ANNOUNCE,
    Announce,
    BadAnnounce,
    Reply,
    http_auth_parts,
    parse_http_auth,
)
from swarm.metrics import metrics_response
from tracker.config import TrackerConfig
from tracker.errors import BadAnnounceError, UnauthenticatedError
from tracker.metrics import TrackerMetrics
from tracker.origin_budget import OriginBudget
from tracker.registry import SwarmRegistry
from tracker.status_page import OPEN_PATHS as STATUS_PAGE_PATHS
from tracker.status_page import StatusPage
from tracker.warm import ALL, WarmBook, WarmError

log = logging.getLogger("swarm.tracker")

MAX_REMEMBERED: Final = 100_000
"""Entries of each anti-replay and binding table: far more than a cluster's peers."""
REFUSAL_LOG_INTERVAL: Final = 60.0
MAX_NAME_SUGGESTIONS: Final = 5
MAX_KNOWN_NAMES: Final = 10_000
HEALTH_PROBE_KEY: Final = ".swarm-healthz"
# The status page is open like /healthz: a browser can't sign requests, operators
# reach it through their ingress's own auth, and it shows no manifest (see status_page).
# /metrics is open too: Prometheus scrapers can't sign requests. It shows artifact
# names, short roots and counts, never a manifest; keep the port cluster-internal.
_OPEN_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"}) | STATUS_PAGE_PATHS
_BODY_PATHS: Final = frozenset({"/v1/announce", "/v1/warm", "/v1/agents/poll"})
_REQUEST_NONCE: Final = web.RequestKey("swarm_request_nonce", bytes)


@dataclass
class _Swarm:
    manifest: Manifest
    registry: SwarmRegistry


class AnnounceGate:
    """Which announces to accept: MAC, freshness, no replay, and (open) host binding.

    Pure: the caller passes the time. ``wall_ms`` is unix milliseconds (compared with
    the announce's ``ts``), ``now`` a monotonic clock (for the bindings' expiry).
    """

    def __init__(
        self,
        key: ClusterKey,
        *,
        bind_ttl: float,
        max_skew_ms: int = MAX_CLOCK_SKEW_MS,
        max_entries: int = MAX_REMEMBERED,
    ) -> None:
        self.key = key
        self.bind_ttl = bind_ttl
        self.max_skew_ms = max_skew_ms
        self.max_future_ms = min(MAX_FUTURE_SKEW_MS, max_skew_ms)
        self.max_entries = max_entries
        # peer id -> last accepted ts, least recently accepted first. An entry older
        # than the skew window can go: a replay of it would be refused as stale.
        self._last_ts: OrderedDict[bytes, int] = OrderedDict()
        # Open cluster only: peer id -> (source host, expiry), least recent first.
        self._hosts: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        # HTTP request nonces seen within the skew window, with their ts.
        self._nonces: OrderedDict[bytes, int] = OrderedDict()

    def check(self, msg: Announce, source_host: str, wall_ms: int, now: float) -> str | None:
        """The refusal's kind (``bad_mac``, ``stale``, ``replay``, ``foreign_host``), or
        None, having recorded the announce as accepted."""
        if not msg.verify(self.key):
            return "bad_mac"
        if not self.fresh(msg.ts, wall_ms):
            return "stale"
        last = self._last_ts.get(msg.peer_id)
        if last is not None and msg.ts <= last:
            return "replay"
        if self.key.open:
            bound = self._hosts.get(msg.peer_id)
            if bound is not None and bound[0] != source_host and bound[1] > now:
                return "foreign_host"
            self._hosts[msg.peer_id] = (source_host, now + self.bind_ttl)
            self._hosts.move_to_end(msg.peer_id)
            while self._hosts and (
                len(self._hosts) > self.max_entries or next(iter(self._hosts.values()))[1] <= now
            ):
                self._hosts.popitem(last=False)
        self._last_ts[msg.peer_id] = msg.ts
        self._last_ts.move_to_end(msg.peer_id)
        self._prune(self._last_ts, wall_ms)
        return None

    def fresh(self, ts: int, wall_ms: int) -> bool:
        """Whether ``ts`` is within the window: not too old, and not far ahead."""
        return -self.max_skew_ms <= ts - wall_ms <= self.max_future_ms

    def release(self, peer_id: bytes) -> None:
        """``peer_id`` left: another host may use it (its last ts still stops replays)."""
        self._hosts.pop(peer_id, None)

    def check_http(
        self, method: str, path: str, header: str | None, body: bytes, wall_ms: int
    ) -> tuple[str | None, bytes]:
        """(refusal kind or None, the request's nonce) for one HTTP request."""
        if self.key.open:
            return None, b""
        parsed = parse_http_auth(header or "")
        if parsed is None:
            return "unauthenticated", b""
        ts, nonce, mac = parsed
        if not self.key.check(mac, b"http", *http_auth_parts(method, path, ts, nonce, body)):
            return "bad_mac", b""
        if not self.fresh(ts, wall_ms):
            return "stale", b""
        if nonce in self._nonces:
            return "replay", b""
        self._nonces[nonce] = ts
        self._prune(self._nonces, wall_ms)
        return None, nonce

    def _prune(self, table: OrderedDict[bytes, int], wall_ms: int) -> None:
        oldest = wall_ms - self.max_skew_ms
        while table and (len(table) > self.max_entries or next(iter(table.values())) < oldest):
            table.popitem(last=False)


class _RefusalLog:
    """Logs a refusal once per (source, kind) per interval; bounded in size."""

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL, max_entries: int = 4096) -> None:
        self.interval = interval
        self.max_entries = max_entries
        self._last: OrderedDict[tuple[str, str], float] = OrderedDict()

    def should_log(self, source: str, kind: str, now: float) -> bool:
        while self._last and (
            len(self._last) >= self.max_entries
            or next(iter(self._last.values())) <= now - self.interval
        ):
            self._last.popitem(last=False)
        if (source, kind) in self._last:
            return False
        self._last[(source, kind)] = now
        return True


_REFUSAL_TEXT: Final = {
    "malformed": "not a valid announce",
    "bad_mac": "its MAC does not prove the cluster token",
    "stale": (
        f"its timestamp is more than {MAX_CLOCK_SKEW_MS // 1000} s behind or "
        f"{MAX_FUTURE_SKEW_MS // 1000} s ahead of the tracker's clock"
    ),
    "replay": "it replays an earlier announce or request",
    "foreign_host": "its peer id is bound to another host",
    "unauthenticated": f"no valid {AUTH_HEADER} header (the cluster token is required)",
}


class Tracker:
    """Swarm registries, manifest cache and the two announce endpoints."""

    def __init__(
        self,
        config: TrackerConfig,
        *,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        config.validate()
        self.config = config
        self.key = config.key
        self._rng = rng or random.Random()
        self._wall = wall_clock
        self._catalog = Catalog(config.catalog, config.key)
        self._manifests: dict[str, Manifest] = {}
        self._latest: dict[str, tuple[float, str]] = {}  # name -> (expires, root)
        self._missing: OrderedDict[str, tuple[float, str]] = OrderedDict()  # ref -> (expires, why)
        self._names: set[str] = set()  # names seen in the catalog
        self._listed: tuple[float, list[str]] = (float("-inf"), [])
        self._loading: dict[str, asyncio.Future[Manifest]] = {}  # ref -> catalog read
        self._swarms: dict[str, _Swarm] = {}
        self._started = time.monotonic()
        self._gate = AnnounceGate(config.key, bind_ttl=config.peer_ttl)
        self._refusal_log = _RefusalLog()
        self.auth_failures: Counter[str] = Counter()
        self.catalog_reachable: bool | None = None  # None: not probed yet
        self.catalog_error = ""
        self._catalog_checked = float("-inf")
        self._catalog_ever_reachable = False
        self._listening = False
        self._runner: web.AppRunner | None = None
        self._udp: asyncio_dgram.DatagramServer | None = None
        self._udp_task: asyncio.Task[None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self.announces = 0
        self.warm = WarmBook(agent_ttl=max(30.0, 3 * config.announce_interval))
        self.metrics = TrackerMetrics(
            self, lambda: [(s.manifest, s.registry) for s in self._swarms.values()]
        )

    # --- state ---------------------------------------------------------------------

    async def manifest(self, ref: str) -> Manifest:
        """The manifest ``ref`` names: by root from memory, by name from a short-lived
        cache; concurrent look-ups of one ref share one catalog read, and a ref the
        catalog does not have is refused from memory for ``manifest_ttl``."""
        name, root = parse_ref(ref)
        if root is None:
            latest = self._latest.get(name)
            if latest is not None and latest[0] > time.monotonic():
                root = latest[1]
        if root is not None and len(root) == 64 and root in self._manifests:
            return self._manifests[root]
        missing = self._missing.get(ref)
        if missing is not None:
            if missing[0] > time.monotonic():
                raise CatalogError(missing[1])
            del self._missing[ref]
        loading = self._loading.get(ref)
        if loading is None:
            loading = self._loading[ref] = asyncio.ensure_future(self._load(ref))
            loading.add_done_callback(lambda _: self._loading.pop(ref, None))
        return await asyncio.shield(loading)

    async def _load(self, ref: str) -> Manifest:
        self.metrics.catalog_reads.inc()
        try:
            manifest = await self._catalog.get(ref)
        except CatalogError as exc:
            self.metrics.catalog_read_failures.labels("not_found").inc()
            # The catalog answered: it is reachable, and this ref is not in it. Only
            # the message is kept: an exception's traceback would keep its frames.
            self._catalog_answered()
            self._missing[ref] = (time.monotonic() + self.config.manifest_ttl, str(exc))
            while len(self._missing) > self.config.negative_cache_size:
                self._missing.popitem(last=False)
            raise
        except Exception:
            self.metrics.catalog_read_failures.labels("error").inc()
            raise
        self._catalog_answered()
        self._manifests[manifest.root_hex] = manifest
        if len(self._names) < MAX_KNOWN_NAMES:
            self._names.add(manifest.name)
        if parse_ref(ref)[1] is None:
            self._latest[manifest.name] = (
                time.monotonic() + self.config.manifest_ttl,
                manifest.root_hex,
            )
        return manifest

    async def close_names(self, name: str) -> list[str]:
        """Names the catalog holds that look like ``name`` (for a 404's message)."""
        return difflib.get_close_matches(
            name, await self._known_names(), n=MAX_NAME_SUGGESTIONS, cutoff=0.5
        )

    async def _known_names(self) -> list[str]:
        """Names seen in the catalog, plus its listing where the store can list
        (read at most once per ``max(manifest_ttl, 30 s)``)."""
        listed_at, listed = self._listed
        now = time.monotonic()
        if now - listed_at >= max(self.config.manifest_ttl, 30.0):
            listed = []
            origin = self._catalog.origin
            try:
                objects = await asyncio.wait_for(origin.list(), 5.0)
                for obj in objects:
                    head, _, tail = obj.key.rpartition("/")
                    if tail == "latest" and head:
                        listed.append(head)
                        if len(listed) >= MAX_KNOWN_NAMES:
                            break
            except (SwarmError, OSError, TimeoutError) as exc:
                log.debug(
                    "can't list catalog %s for name suggestions: %s", self.config.catalog, exc
                )
            self._listed = (now, listed)
        return sorted(self._names | set(listed))

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
                min_in_flight=self.config.min_origin_pieces,
                origin_budget=self.config.origin_budget,
                stall_timeout=self.config.stall_timeout,
                assign_after=self._started + grace,
                bar_reporters=self.config.bar_reporters,
                origin_rate=self.config.origin_rate,
                adaptive_budget=self._adaptive_budget(),
                origin_copies=self.config.origin_copies,
            )
            swarm = self._swarms.setdefault(root, _Swarm(manifest, registry))
            log.info("new swarm %s (%d pieces)", manifest.ref, manifest.num_pieces)
        return swarm

    def _adaptive_budget(self) -> OriginBudget | None:
        """A new swarm's origin budget controller (None: a fixed ``--origin-budget``)."""
        config = self.config
        if config.origin_budget is not None or not config.adaptive_origin:
            return None
        # A round is an announce interval: every seeder reports its progress in it.
        return OriginBudget(config.origin_max_pulls, round_seconds=config.announce_interval)

    def _refused(self, source: str, kind: str, detail: str = "") -> None:
        self.auth_failures[kind] += 1
        if self._refusal_log.should_log(source, kind, time.monotonic()):
            log.warning(
                "refused a request from %s: %s%s (more like it from there are counted, "
                "not logged, for %.0f s)",
                source,
                _REFUSAL_TEXT.get(kind, kind),
                f" ({detail})" if detail else "",
                REFUSAL_LOG_INTERVAL,
            )

    def authenticate(self, msg: Announce, source_host: str) -> None:
        """Accept ``msg`` from ``source_host`` or raise UnauthenticatedError (counted, logged)."""
        kind = self._gate.check(msg, source_host, int(self._wall() * 1000), time.monotonic())
        if kind is not None:
            self._refused(source_host, kind, f"peer {msg.peer_id.hex()[:8]}")
            raise UnauthenticatedError(f"announce refused: {_REFUSAL_TEXT[kind]}", kind=kind)

    async def handle(self, msg: Announce, source_host: str, *, transport: str = "http") -> Reply:
        """Authenticate one announce, apply it to its swarm's registry and build the reply.

        Counted and timed (``transport`` is ``udp`` or ``http``) in :attr:`metrics`;
        any exception is a refusal.
        """
        started = time.perf_counter()
        ok = False
        try:
            reply = await self._handle(msg, source_host)
            ok = True
            return reply
        finally:
            self.metrics.announce_handled(transport, ok, time.perf_counter() - started)

    async def _handle(self, msg: Announce, source_host: str) -> Reply:
        self.authenticate(msg, source_host)
        self.announces += 1
        swarm = await self._swarm(msg.ref)
        registry = swarm.registry
        now = time.monotonic()
        if msg.leaving or msg.peer_id in registry.barred:
            registry.leave(msg.peer_id, now)
            self._gate.release(msg.peer_id)
            reply = Reply(
                [],
                [],
                registry.swarm_complete,
                registry.num_peers,
                self.config.announce_interval,
                msg.txn,
            )
            reply.sign(self.key, msg.nonce)
            return reply
        try:
            have = Bitfield.from_bytes(msg.have, swarm.manifest.num_pieces)
        except ValueError as exc:
            raise BadAnnounce(
                f"have-set does not fit {swarm.manifest.num_pieces} pieces: {exc}"
            ) from exc
        host = msg.host or source_host
        try:
            answer = registry.announce(
                msg.peer_id,
                (host, msg.port),
                have,
                msg.progress,
                now,
                zone=msg.zone,
                seeder=msg.seeder,
                throttles=msg.throttles,
                retry_after=msg.retry_after or None,
                waiting=msg.waiting,
            )
        except BadAnnounceError as exc:
            raise BadAnnounce(str(exc)) from exc
        for culprit in msg.barred:
            if registry.report(msg.peer_id, culprit, now):
                log.warning(
                    "peer %s barred from %s: %d peers got corrupt data from it",
                    culprit.hex()[:8],
                    swarm.manifest.ref,
                    registry.bar_reporters,
                )
        barred = registry.barred  # this announce's reports may have barred a listed peer
        reply = Reply(
            assigned=list(answer.assigned),
            peers=[(p.peer_id, p.host, p.port) for p in answer.peers if p.peer_id not in barred],
            peer_zones={p.peer_id: p.zone for p in answer.peers if p.zone},
            complete=registry.swarm_complete,
            num_peers=registry.num_peers,
            interval=self.config.announce_interval,
            txn=msg.txn,
            origin_rate=answer.origin_rate,
        )
        reply.sign(self.key, msg.nonce)
        return reply

    def status(self) -> dict[str, Any]:
        return {
            "uptime_seconds": round(time.monotonic() - self._started, 3),
            "announces": self.announces,
            "open": self.key.open,
            "auth_failures": dict(sorted(self.auth_failures.items())),
            "catalog_reachable": self.catalog_reachable,
            "swarms": {
                root: {"ref": s.manifest.ref, **s.registry.status()}
                for root, s in self._swarms.items()
            },
        }

    # --- catalog health ------------------------------------------------------------

    def _catalog_answered(self) -> None:
        self.catalog_reachable, self.catalog_error = True, ""
        self._catalog_ever_reachable = True
        self._catalog_checked = time.monotonic()

    async def probe_catalog(self) -> bool:
        """Whether the catalog's store answers now.

        It stats the ``latest`` entry of a name it served, else a key that need not
        exist: "not found" is an answer, and so is "forbidden" for that key (S3
        says 403 for a missing key to whoever may not list the bucket).
        """
        origin = self._catalog.origin
        name = next(iter(self._names), None)
        key = HEALTH_PROBE_KEY if name is None else f"{name}/latest"
        try:
            await asyncio.wait_for(origin.stat(key), min(5.0, self.config.health_interval))
        except OriginNotFoundError:
            pass
        except OriginPermissionError as exc:
            if name is not None:
                self.catalog_reachable, self.catalog_error = False, str(exc)
                self._catalog_checked = time.monotonic()
                return False
        except (SwarmError, OSError, TimeoutError) as exc:
            self.catalog_reachable = False
            self.catalog_error = str(exc) or type(exc).__name__
            self._catalog_checked = time.monotonic()
            return False
        self._catalog_answered()
        return True

    async def _probe_loop(self) -> None:
        was: bool | None = None
        while True:
            ok = await self.probe_catalog()
            if not ok and was is not False:
                log.warning("catalog %s unreachable: %s", self.config.catalog, self.catalog_error)
            elif ok and was is False:
                log.warning("catalog %s reachable again", self.config.catalog)
            was = ok
            await asyncio.sleep(self.config.health_interval)

    # --- HTTP ----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_HTTP_ANNOUNCE, middlewares=[self._auth_middleware]
        )
        app.router.add_get("/v1/manifest/{ref:.+}", self._get_manifest)
        app.router.add_post("/v1/announce", self._post_announce)
        app.router.add_get("/v1/swarms", self._get_swarms)
        app.router.add_get("/v1/swarms/{root}", self._get_swarm)
        app.router.add_post("/v1/warm", self._post_warm)
        app.router.add_get("/v1/warm/{root}", self._get_warm)
        app.router.add_post("/v1/agents/poll", self._post_agent_poll)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        StatusPage(
            lambda: [(s.manifest, s.registry) for s in self._swarms.values()],
            lambda: {"announces": self.announces, "open": self.key.open},
        ).add_routes(app)
        return app

    @web.middleware
    async def _auth_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path in _OPEN_PATHS or self.key.open:
            return await handler(request)
        # Refuse before reading a byte of the body whatever can be refused without it: a
        # missing, malformed or stale header, and a body where none belongs.
        header = request.headers.get(AUTH_HEADER)
        parsed = parse_http_auth(header or "")
        early: str | None = None
        if parsed is None:
            early = "unauthenticated"
        elif not self._gate.fresh(parsed[0], int(self._wall() * 1000)):
            early = "stale"
        elif request.path not in _BODY_PATHS and (request.content_length or request.can_read_body):
            early = "unauthenticated"
        if early is not None:
            self._refused(request.remote or "?", early, f"{request.method} {request.path}")
            return web.Response(status=401, text=f"refused: {_REFUSAL_TEXT[early]}\n")
        body = await request.read()
        kind, nonce = self._gate.check_http(
            request.method,
            request.path,
            request.headers.get(AUTH_HEADER),
            body,
            int(self._wall() * 1000),
        )
        source = request.remote or "?"
        if kind is not None:
            self._refused(source, kind, f"{request.method} {request.path}")
            return web.Response(status=401, text=f"refused: {_REFUSAL_TEXT[kind]}\n")
        request[_REQUEST_NONCE] = nonce
        return await handler(request)

    async def _resolve(self, ref: str) -> Manifest | web.Response:
        """The manifest ``ref`` names, or the HTTP answer saying why not: 404 for a name
        or root the catalog lacks (with the published names close to it), 502 while the
        catalog is unreachable."""
        try:
            return await self.manifest(ref)
        except (CatalogError, ManifestError) as exc:
            text = str(exc)
            try:
                name, _ = parse_ref(ref)
            except ManifestError:
                name = ""
            if name and name not in self._names:
                close = await self.close_names(name)
                text += f"; known names close to it: {', '.join(close)}" if close else ""
            return web.Response(status=404, text=text)
        except SwarmError as exc:
            return web.Response(status=502, text=f"catalog unavailable: {exc}")

    async def _get_manifest(self, request: web.Request) -> web.Response:
        manifest = await self._resolve(request.match_info["ref"])
        if isinstance(manifest, web.Response):
            return manifest
        body = manifest.encode()
        headers = {"X-Swarm-Root": manifest.root_hex}
        if not self.key.open:
            headers[MAC_HEADER] = self.key.mac(b"manifest", request[_REQUEST_NONCE], body).hex()
        return web.Response(body=body, content_type="application/octet-stream", headers=headers)

    async def _post_announce(self, request: web.Request) -> web.Response:
        body = await request.read()
        msg: Announce | None = None
        try:
            msg = Announce.decode(body)
            reply = await self.handle(msg, request.remote or "127.0.0.1", transport="http")
        except UnauthenticatedError as exc:
            return web.Response(status=401, text=str(exc))
        except BadAnnounce as exc:
            if msg is None:  # not decoded, so not counted by handle()
                self.metrics.announce_handled("http", False, None)
            self._refused(request.remote or "?", "malformed", str(exc)[:200])
            return web.Response(status=400, text=str(exc))
        except SwarmError as exc:
            return web.Response(status=404, text=str(exc))
        return web.Response(body=reply.encode(), content_type="application/msgpack")

    def _signed_json(self, request: web.Request, obj: object, status: int = 200) -> web.Response:
        """A JSON answer that proves the cluster token (the client checks it)."""
        body = json.dumps(obj).encode()
        headers = {}
        if not self.key.open:
            headers[MAC_HEADER] = self.key.mac(b"json", request[_REQUEST_NONCE], body).hex()
        return web.Response(
            body=body, status=status, content_type="application/json", headers=headers
        )

    async def _json_body(self, request: web.Request) -> dict[str, Any] | None:
        try:
            obj = json.loads(await request.read())
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    async def _post_warm(self, request: web.Request) -> web.Response:
        """File a warm request: ``{"ref": REF, "copies": K}`` (K -1: every node agent)."""
        body = await self._json_body(request)
        ref, copies = (body or {}).get("ref"), (body or {}).get("copies")
        if not isinstance(ref, str) or type(copies) is not int:
            return web.Response(status=400, text='want {"ref": NAME[@ROOT], "copies": K}')
        manifest = await self._resolve(ref)
        if isinstance(manifest, web.Response):
            return manifest
        try:
            self.warm.request(manifest.root_hex, manifest.ref, copies, time.monotonic())
        except WarmError as exc:
            return web.Response(status=400, text=str(exc))
        log.info("warm %s: %s copies wanted", manifest.ref, "all" if copies == ALL else copies)
        return self._warm_answer(request, manifest.root_hex)

    async def _get_warm(self, request: web.Request) -> web.Response:
        return self._warm_answer(request, request.match_info["root"].lower())

    def _warm_answer(self, request: web.Request, root: str) -> web.Response:
        """The status of the warm request for ``root``, signed; 404 if there is none."""
        status = self.warm.status(root, time.monotonic())
        if status is None:
            return web.json_response({"error": "no warm request for that root"}, status=404)
        return self._signed_json(request, {"root": root, **status})

    async def _post_agent_poll(self, request: web.Request) -> web.Response:
        """A node agent reports ``{"agent": ID, "holds": [ROOT...], "complete": [ROOT...]}``
        and learns what to fetch: ``{"fetch": [REF...]}``."""
        body = await self._json_body(request) or {}
        agent, holds, complete = body.get("agent"), body.get("holds"), body.get("complete")
        if (
            not isinstance(agent, str)
            or not 0 < len(agent) <= 64
            or not isinstance(holds, list)
            or not isinstance(complete, list)
            or not all(isinstance(r, str) and len(r) <= 64 for r in [*holds, *complete])
        ):
            return web.Response(status=400, text="malformed agent poll")
        try:
            fetch = self.warm.poll(agent, set(holds), set(complete), time.monotonic())
        except WarmError as exc:
            return web.Response(status=400, text=str(exc))
        return self._signed_json(request, {"fetch": fetch})

    async def _metrics(self, request: web.Request) -> web.Response:
        return metrics_response(self.metrics.registry)

    async def _get_swarms(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    async def _get_swarm(self, request: web.Request) -> web.Response:
        swarm = self._swarms.get(request.match_info["root"].lower())
        if swarm is None:
            return web.json_response({"error": "no such swarm"}, status=404)
        return web.json_response({"ref": swarm.manifest.ref, **swarm.registry.status()})

    async def _healthz(self, request: web.Request) -> web.Response:
        if time.monotonic() - self._catalog_checked > 2 * self.config.health_interval:
            await self.probe_catalog()  # the probe loop is late or not running
        ok = bool(self.catalog_reachable)
        body = {
            "status": "ok" if ok else "catalog unreachable",
            "catalog": {
                "url": self.config.catalog,
                "reachable": ok,
                "checked_seconds_ago": round(time.monotonic() - self._catalog_checked, 3),
                "error": self.catalog_error,
            },
            "open": self.key.open,
        }
        return web.json_response(body, status=200 if ok else 503)

    async def _readyz(self, request: web.Request) -> web.Response:
        ready = self._listening and self._catalog_ever_reachable
        return web.json_response(
            {
                "ready": ready,
                "listening": self._listening,
                "catalog_seen": self._catalog_ever_reachable,
            },
            status=200 if ready else 503,
        )

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
            out = await self._udp_answer(data, addr[0])
            if out is None:
                continue
            try:
                await self._udp.send(out, addr)
            except OSError as exc:
                log.warning("UDP reply to %s failed: %s", addr, exc)

    async def _udp_answer(self, data: bytes, source: str) -> bytes | None:
        """The reply datagram to ``data``, or None to stay silent.

        Silent to anything that is not an authenticated announce (its source may be
        spoofed), and an error reply is cut to fit the request: no reply is ever
        larger than what asked for it.
        """
        try:
            msg = Announce.decode(data)
        except BadAnnounce as exc:
            self.metrics.announce_handled("udp", False, None)
            self._refused(source, "malformed", str(exc)[:200])
            return None
        try:
            return (await self.handle(msg, source, transport="udp")).encode()
        except UnauthenticatedError:
            return None
        except SwarmError as exc:
            log.info("refused announce from %s: %s", source, exc)
            error = str(exc)[:500]
        while True:
            reply = Reply([], [], False, 0, self.config.announce_interval, msg.txn, error)
            reply.sign(self.key, msg.nonce)
            out = reply.encode()
            if len(out) <= len(data):
                return out
            if not error:
                return None
            error = error[: max(0, len(error) - (len(out) - len(data)) - 3)] + "..."
            if len(error) <= 3:
                error = ""

    # --- lifecycle -----------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.config.tls_cert is None or self.config.tls_key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"can't load the TLS certificate {self.config.tls_cert} / key {self.config.tls_key}: {exc}"
            ) from exc
        return context

    async def start(self) -> None:
        context = self._ssl_context()
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.config.host,
            self.config.port,
            reuse_address=True,
            ssl_context=context,
        )
        await site.start()
        if context is None:
            self._udp = await asyncio_dgram.bind((self.config.host, self.config.port))
            self._udp_task = asyncio.create_task(self._serve_udp())
        self._probe_task = asyncio.create_task(self._probe_loop())
        self._listening = True
        log.info(
            "tracker listening on %s:%d (%s)",
            self.config.host,
            self.config.port,
            "HTTPS; no UDP announces" if context else "HTTP and UDP",
        )
        if self.key.open:
            log.warning(
                "no cluster token: this tracker is open, anyone who can reach %s:%d can join "
                "its swarms and read its manifests (set --token-file or SWARM_TOKEN)",
                self.config.host,
                self.config.port,
            )

    async def close(self) -> None:
        self._listening = False
        for task in (self._udp_task, self._probe_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
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
