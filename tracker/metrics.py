"""Prometheus metrics of the tracker, served on ``GET /metrics`` of its HTTP port.

Two kinds. Per-swarm state (peers, pieces, availability, origin assignment) is
read from the tracker's registries at scrape time by :class:`TrackerCollector`,
from the same ``SwarmRegistry.status()`` that ``GET /v1/swarms`` returns, so the
two never disagree and announces pay nothing for it. What only an event can tell
(announces by transport and outcome with their handling time, catalog reads) is
counted as it happens in the few :class:`TrackerMetrics` instruments.

Per-swarm metrics carry ``artifact`` (the name) and ``root`` (the first 12 hex
digits of the manifest's root). Each tracker has its own ``CollectorRegistry``,
never the library's global one, so several trackers in one process (tests) don't
collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from swarm.metrics import swarm_labels

if TYPE_CHECKING:
    from core.manifest import Manifest
    from tracker.registry import SwarmRegistry
    from tracker.service import Tracker

SwarmStates = Callable[[], "list[tuple[Manifest, SwarmRegistry]]"]
"""Every swarm the tracker knows, with its manifest, read at scrape time."""

__all__ = ["ANNOUNCE_BUCKETS", "TrackerCollector", "TrackerMetrics"]

ANNOUNCE_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Seconds. An announce is handled in well under a millisecond; the first of a new
swarm waits for a catalog read, which is what the upper buckets are for."""

_SWARM_LABELS: Final = ("artifact", "root")


class TrackerMetrics:
    """The tracker's registry: its event instruments and a :class:`TrackerCollector`."""

    def __init__(self, tracker: Tracker, swarms: SwarmStates) -> None:
        self.registry = CollectorRegistry()
        self.announces = Counter(
            "swarm_tracker_announces",
            "Announces received, by transport (udp, http) and outcome (ok, refused).",
            ("transport", "outcome"),
            registry=self.registry,
        )
        self.announce_seconds = Histogram(
            "swarm_tracker_announce_duration_seconds",
            "Time to handle one decoded announce, from authentication to the signed reply.",
            ("transport",),
            buckets=ANNOUNCE_BUCKETS,
            registry=self.registry,
        )
        self.catalog_reads = Counter(
            "swarm_tracker_catalog_reads",
            "Manifests read from the catalog (a cached manifest is not read again).",
            registry=self.registry,
        )
        self.catalog_read_failures = Counter(
            "swarm_tracker_catalog_read_failures",
            "Catalog reads that failed, by reason (not_found, error).",
            ("reason",),
            registry=self.registry,
        )
        for transport in ("udp", "http"):
            self.announce_seconds.labels(transport)
            for outcome in ("ok", "refused"):
                self.announces.labels(transport, outcome)
        for reason in ("not_found", "error"):
            self.catalog_read_failures.labels(reason)
        self.registry.register(TrackerCollector(tracker, swarms))
        ProcessCollector(registry=self.registry)

    def announce_handled(self, transport: str, ok: bool, seconds: float | None) -> None:
        """Count one announce; ``seconds`` is None for one that could not be decoded."""
        self.announces.labels(transport, "ok" if ok else "refused").inc()
        if seconds is not None:
            self.announce_seconds.labels(transport).observe(seconds)


class TrackerCollector(Collector):
    """The tracker's state, read at each scrape (on the event loop, which owns it)."""

    def __init__(self, tracker: Tracker, swarms: SwarmStates) -> None:
        self.tracker = tracker
        self.swarms = swarms

    def collect(self) -> Iterator[Metric]:
        tracker = self.tracker
        failures = CounterMetricFamily(
            "swarm_tracker_auth_failures",
            "Requests and announces refused, by kind (bad_mac, stale, replay, foreign_host, "
            "unauthenticated, malformed).",
            labels=("kind",),
        )
        for kind, count in sorted(tracker.auth_failures.items()):
            failures.add_metric([kind], count)
        yield failures
        yield GaugeMetricFamily(
            "swarm_tracker_catalog_reachable",
            "1 if the catalog's store answered the last probe or read, else 0 (0 until probed).",
            value=1.0 if tracker.catalog_reachable else 0.0,
        )
        yield GaugeMetricFamily(
            "swarm_tracker_open",
            "1 if the tracker runs without a cluster token (anyone who reaches it can join).",
            value=1.0 if tracker.key.open else 0.0,
        )

        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

        def add(kind: str, name: str, doc: str, labels: list[str], value: float) -> None:
            family = families.get(name)
            if family is None:
                family = families[name] = (
                    GaugeMetricFamily(name, doc, labels=_SWARM_LABELS)
                    if kind == "gauge"
                    else CounterMetricFamily(name, doc, labels=_SWARM_LABELS)
                )
            family.add_metric(labels, value)

        swarms = self.swarms()
        yield GaugeMetricFamily(
            "swarm_tracker_swarms", "Swarms the tracker knows.", value=len(swarms)
        )
        for manifest, registry in swarms:
            labels = list(swarm_labels(manifest.name, manifest.root_hex))
            status = registry.status()
            avail, origin = status["availability"], status["origin"]
            peers, finished = status["peers"], status["finished_peers"]
            stats = registry.assignment.stats
            pulled = sum(stats.pulled.values())
            pieces = status["pieces"]
            for kind, name, doc, value in (
                ("gauge", "swarm_tracker_swarm_peers", "Live peers of the swarm.", peers),
                (
                    "gauge",
                    "swarm_tracker_swarm_finished_peers",
                    "Live peers that have every piece.",
                    finished,
                ),
                (
                    "gauge",
                    "swarm_tracker_swarm_completion_ratio",
                    "Finished peers ÷ live peers (0 with no peers).",
                    finished / peers if peers else 0.0,
                ),
                (
                    "gauge",
                    "swarm_tracker_swarm_complete",
                    "1 if there is a peer and every peer has finished.",
                    1.0 if status["swarm_complete"] else 0.0,
                ),
                (
                    "gauge",
                    "swarm_tracker_swarm_size_bytes",
                    "Size of the artifact (F).",
                    manifest.total_size,
                ),
                ("gauge", "swarm_tracker_swarm_pieces", "Pieces of the artifact.", pieces),
                (
                    "gauge",
                    "swarm_tracker_swarm_present_pieces",
                    "Pieces some trusted live peer has verified.",
                    status["present_pieces"],
                ),
                (
                    "gauge",
                    "swarm_tracker_swarm_missing_pieces",
                    "Pieces no live peer has (availability 0).",
                    avail["missing"],
                ),
                (
                    "gauge",
                    "swarm_tracker_swarm_piece_availability_min",
                    "Live peers holding the rarest piece.",
                    avail["min"],
                ),
                (
                    "gauge",
                    "swarm_tracker_swarm_piece_availability_mean",
                    "Live peers holding a piece, averaged over the pieces.",
                    avail["mean"],
                ),
                (
                    "gauge",
                    "swarm_tracker_swarm_piece_availability_max",
                    "Live peers holding the most common piece.",
                    avail["max"],
                ),
                (
                    "gauge",
                    "swarm_tracker_swarm_origin_budget_pieces",
                    "Origin pieces the swarm may pull at once.",
                    origin["budget"],
                ),
                (
                    "gauge",
                    "swarm_tracker_swarm_origin_pieces_in_flight",
                    "Origin pieces assigned to a seeder and not yet present.",
                    origin["in_flight"],
                ),
                (
                    "gauge",
                    "swarm_tracker_swarm_origin_unassigned_pieces",
                    "Pieces neither present nor assigned (waiting for an origin slot).",
                    origin["unassigned"],
                ),
                (
                    "counter",
                    "swarm_tracker_swarm_origin_assignments",
                    "Origin pieces assigned to seeders, re-assignments included.",
                    origin["assigned_total"],
                ),
                (
                    "counter",
                    "swarm_tracker_swarm_origin_reassignments",
                    "Origin pieces taken back from a seeder that left or stalled.",
                    origin["reassigned"],
                ),
                (
                    "counter",
                    "swarm_tracker_swarm_origin_stalls",
                    "Origin pieces taken back because their progress stopped.",
                    origin["stalled"],
                ),
                (
                    "counter",
                    "swarm_tracker_swarm_lost_pieces",
                    "Pieces lost with every peer that held them (pulled from the origin again).",
                    origin["lost"],
                ),
                (
                    "counter",
                    "swarm_tracker_swarm_origin_pulled_pieces",
                    "Pieces pulled from the origin by their seeders and then present.",
                    pulled,
                ),
                (
                    "counter",
                    "swarm_tracker_swarm_origin_pulled_bytes",
                    "Bytes of the pieces pulled from the origin and then present.",
                    stats.pulled_bytes,
                ),
                (
                    "counter",
                    "swarm_tracker_swarm_origin_copy_bytes",
                    "Bytes of extra origin copies peers pulled for themselves (--origin-copies > 1).",
                    stats.copy_bytes,
                ),
                (
                    "gauge",
                    "swarm_tracker_swarm_origin_copies_ratio",
                    "Origin bytes pulled ÷ F, extra copies included: 1.0 is one origin copy "
                    "(design invariant 1), at most --origin-copies.",
                    (stats.pulled_bytes + stats.copy_bytes) / manifest.total_size
                    if manifest.total_size
                    else 0.0,
                ),
                (
                    "gauge",
                    "swarm_tracker_swarm_barred_peers",
                    "Peers barred from the swarm for corrupt data.",
                    len(status["barred"]),
                ),
                (
                    "gauge",
                    "swarm_tracker_swarm_suspect_peers",
                    "Live peers reported for corrupt data and not (yet) barred.",
                    len(status["reports"]),
                ),
            ):
                add(kind, name, doc, labels, value)
        yield from families.values()
