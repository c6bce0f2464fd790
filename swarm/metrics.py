"""Prometheus metrics of a peer (``swarm fetch --metrics-listen HOST:PORT``).

A lingering fetch (and later the node agent) is a long-lived process that moves
a lot of bytes: an operator wants its origin, peer and upload bytes, its
verification failures and its queue depths next to the rest of the node's
metrics. :class:`PeerCollector` reads them from a :class:`~swarm.peer.SwarmPeer`
at scrape time, so the data path keeps its plain integer counters and does no
metrics bookkeeping of its own; :func:`serve_metrics` serves a registry over HTTP
(``/metrics`` in the text exposition format, ``/healthz``).

Every metric carries ``artifact`` (the name) and ``root`` (the first 12 hex digits
of the manifest's root), like the tracker's per-swarm metrics, so one dashboard
joins the two. The counters are the figures of ``swarm fetch --json``:
``swarm_peer_origin_bytes_total`` is ``origin_bytes``,
``swarm_peer_downloaded_bytes_total`` is ``peer_bytes``,
``swarm_peer_uploaded_bytes_total`` is ``uploaded_bytes``, and so on.

Each process builds its own ``CollectorRegistry`` (:func:`peer_registry`), never
the library's global one, so several peers (in tests, or an agent serving many
artifacts) don't collide.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from core.errors import ConfigError

if TYPE_CHECKING:
    from core.buffers import BufferPool
    from swarm.peer import SwarmPeer

__all__ = ["MetricsServer", "PeerCollector", "metrics_response", "peer_registry", "serve_metrics"]

log = logging.getLogger("swarm.metrics")

ROOT_LABEL_DIGITS: Final = 12
"""Hex digits of the root in the ``root`` label: unique in practice, short on a dashboard."""


def swarm_labels(name: str, root_hex: str) -> tuple[str, str]:
    """The (``artifact``, ``root``) label values of one artifact version."""
    return name, root_hex[:ROOT_LABEL_DIGITS]


def _pool_in_use(pool: BufferPool) -> int:
    """Buffers of ``pool`` lent out now (allocated and not back in the free queue)."""
    allocated: int = getattr(pool, "_allocated", 0)
    free = getattr(pool, "_free", None)
    return max(0, allocated - (free.qsize() if free is not None else 0))


class PeerCollector(Collector):
    """The metrics of one :class:`~swarm.peer.SwarmPeer`, read from it at each scrape.

    Collected on the event loop's thread (the metrics server runs on the peer's
    loop), where every attribute read here is changed, so a scrape sees one
    consistent moment.
    """

    def __init__(self, peer: SwarmPeer) -> None:
        self.peer = peer

    def collect(self) -> Iterator[Metric]:
        peer = self.peer
        names = ("artifact", "root")
        labels = list(swarm_labels(peer.m.name, peer.m.root_hex))
        origin = peer.origin.counters

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(labels, value)
            return family

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(labels, value)
            return family

        yield gauge("swarm_peer_artifact_bytes", "Size of the artifact (F).", peer.m.total_size)
        session = peer.session
        stats = session.stats
        yield gauge("swarm_peer_pieces", "Pieces of the artifact.", peer.m.num_pieces)
        yield gauge(
            "swarm_peer_verified_pieces",
            "Pieces verified and on disk (reused from an earlier run included).",
            session.have.count(),
        )
        yield gauge(
            "swarm_peer_finished",
            "1 once every piece is verified (the peer then serves, lingering).",
            1.0 if peer.finished_at is not None else 0.0,
        )
        yield gauge(
            "swarm_peer_swarm_complete",
            "1 once the tracker says every peer of the swarm has finished.",
            1.0 if peer.swarm_complete else 0.0,
        )
        yield counter(
            "swarm_peer_origin_bytes",
            "Bytes read from the origin (fetch JSON: origin_bytes).",
            origin.bytes_read,
        )
        yield counter(
            "swarm_peer_origin_requests", "Ranged reads sent to the origin.", origin.requests
        )
        yield counter(
            "swarm_peer_origin_retries",
            "Origin reads retried after a failure or a throttle (fetch JSON: origin_retries).",
            origin.retries,
        )
        yield counter(
            "swarm_peer_origin_throttles",
            "Origin answers that asked to slow down (429, 503, SlowDown).",
            origin.throttled,
        )
        yield counter(
            "swarm_peer_origin_pieces",
            "Pieces pulled from the origin and verified (fetch JSON: origin_pieces).",
            stats.origin_pieces,
        )
        yield gauge(
            "swarm_peer_origin_pieces_in_flight",
            "Origin pieces being pulled now.",
            len(peer.origin_tasks),
        )
        yield counter(
            "swarm_peer_downloaded_bytes",
            "Block bytes received from other peers, duplicates included (fetch JSON: peer_bytes).",
            stats.peer_bytes,
        )
        yield counter(
            "swarm_peer_uploaded_bytes",
            "Block bytes sent to other peers (fetch JSON: uploaded_bytes).",
            stats.uploaded_bytes,
        )
        yield counter(
            "swarm_peer_cross_zone_bytes",
            "Block bytes received from peers of another zone (fetch JSON: cross_zone_bytes).",
            stats.cross_zone_bytes,
        )
        duplicates = CounterMetricFamily(
            "swarm_peer_duplicate_bytes",
            "Block bytes received that were not needed, by cause (fetch JSON: duplicate_causes).",
            labels=(*names, "cause"),
        )
        for cause, value in sorted(stats.duplicate_causes.items()):
            duplicates.add_metric([*labels, cause], value)
        yield duplicates
        yield gauge(
            "swarm_peer_reused_bytes",
            "Bytes found verified on disk at start-up (fetch JSON: reused_bytes).",
            peer.store.reused_bytes,
        )
        yield counter(
            "swarm_peer_cut_through_bytes",
            "Block bytes uploaded from pieces not yet whole here: relayed cut-through "
            "(fetch JSON: cut_through_bytes).",
            stats.cut_through_bytes,
        )
        yield counter(
            "swarm_peer_corrupt_pieces",
            "Pieces from peers that failed verification (fetch JSON: corrupt_pieces).",
            stats.corrupt_pieces,
        )
        yield counter(
            "swarm_peer_corrupt_blocks",
            "Blocks from peers refused before they were written: they did not match the "
            "manifest's block digest (fetch JSON: corrupt_blocks).",
            stats.corrupt_blocks,
        )
        yield gauge(
            "swarm_peer_barred_peers",
            "Peers barred for this swarm after sending corrupt data.",
            len(session.barred),
        )
        yield gauge(
            "swarm_peer_connections",
            "Connections to peers that proved the token.",
            len(session.peers),
        )
        yield gauge(
            "swarm_peer_pending_connections",
            "Accepted connections still in their handshake.",
            session.pending,
        )
        yield gauge("swarm_peer_known_peers", "Peers the tracker named.", len(session.known_peers))
        yield counter(
            "swarm_peer_auth_failures",
            "Connections dropped for failing the handshake (token, root or version).",
            stats.auth_failures,
        )
        yield counter(
            "swarm_peer_handshake_timeouts",
            "Connections closed for not finishing the handshake in time.",
            stats.handshake_timeouts,
        )
        yield counter(
            "swarm_peer_expired_requests",
            "Block requests given up on a peer that left them unanswered (fetch JSON: requests_expired).",
            stats.requests_expired,
        )
        yield counter(
            "swarm_peer_slow_closes",
            "Connections closed for a block payload or upload that took too long (fetch JSON: slow_closes).",
            stats.slow_closes,
        )
        yield counter(
            "swarm_peer_limit_refused_connections",
            "Accepted connections closed at once: the descriptor limit's share for peers was full (fetch JSON: conns_refused).",
            peer.conns_refused,
        )
        yield counter(
            "swarm_peer_refused_connections",
            "Accepted connections closed at once: too many were in their handshake.",
            stats.pending_refused,
        )
        yield gauge(
            "swarm_peer_upload_slots_active",
            "Block uploads being sent now.",
            session.uploads.active,
        )
        yield gauge(
            "swarm_peer_upload_queue_requests",
            "Block requests from peers waiting for an upload slot.",
            session.uploads.pending,
        )
        yield gauge(
            "swarm_peer_disk_queue_blocks",
            "Received blocks waiting for the disk thread (bounded by blocks_in_flight).",
            _pool_in_use(peer._block_pool),
        )
        yield gauge(
            "swarm_peer_verifying_pieces", "Pieces being hashed now.", len(session.verifying)
        )


def peer_registry(peer: SwarmPeer) -> CollectorRegistry:
    """A new registry with ``peer``'s metrics and the process's (CPU, memory, descriptors)."""
    registry = CollectorRegistry()
    registry.register(PeerCollector(peer))
    ProcessCollector(registry=registry)
    return registry


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """``registry`` in the text exposition format, as an aiohttp response."""
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


class MetricsServer:
    """An HTTP server of one registry; ``close()`` stops it."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self._runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def close(self) -> None:
        await self._runner.cleanup()


async def serve_metrics(host: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` on ``http://HOST:PORT/metrics`` (and ``/healthz``) until closed.

    Port 0 picks a free port (``MetricsServer.port`` says which). Open to anyone who
    can reach it, like the tracker's ``/metrics``: Prometheus scrapers don't sign
    requests; bind it to a node-local or cluster-internal address. Raises
    ConfigError when the address can't be bound.
    """

    async def metrics(request: web.Request) -> web.Response:
        return metrics_response(registry)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        why = "address in use" if exc.errno == errno.EADDRINUSE else str(exc)
        raise ConfigError(
            f"--metrics-listen {host}:{port}: can't listen for metrics ({why})"
        ) from exc
    bound = int(runner.addresses[0][1]) if runner.addresses else port  # port 0: the one bound
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(runner, host, bound)
