"""The tracker's settings, apart from the service: the command line reads their defaults
without loading the HTTP server (a ``swarm fetch`` imports this, not
:mod:`tracker.service`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.auth import ClusterKey
from core.errors import ConfigError, SwarmError
from tracker.assignment import DEFAULT_MAX_BUDGET, MIN_IN_FLIGHT, origin_copies_problem

__all__ = ["TrackerConfig"]


@dataclass
class TrackerConfig:
    """Settings of one tracker; every one is reachable from ``swarm tracker`` flags."""

    host: str = "0.0.0.0"
    port: int = 7070
    catalog: str = ""
    announce_interval: float = 2.0
    peer_ttl: float = 10.0
    per_peer_limit: int = 2
    min_origin_pieces: int = MIN_IN_FLIGHT
    """Origin pieces a small swarm keeps in flight at least: a lone peer pulls this many."""
    origin_budget: int | None = None
    """A fixed cap on origin pieces in flight (None: the default, adapted to throttling)."""
    origin_max_pulls: int = DEFAULT_MAX_BUDGET
    """The most origin pieces in flight the adaptive budget may reach."""
    adaptive_origin: bool = True
    """Adapt the origin budget to throttling and throughput (``tracker.origin_budget``)."""
    origin_rate: int | None = None
    """Cluster-wide cap on origin reads in bytes/s, shared by the peers pulling (None: uncapped)."""
    origin_copies: float = 1.0
    """Origin bytes allowed, in copies of the artifact (``tracker.assignment``): above 1,
    the origin serves extra copies while it would otherwise idle."""
    stall_timeout: float = 30.0
    max_peers_in_reply: int = 50
    restart_grace: float | None = None  # default: 1.5 announce intervals
    manifest_ttl: float = 5.0
    """Seconds a name's latest version is remembered: a burst of N fetches by name
    costs one catalog read, and a republished version is served within this time.
    A name or version the catalog does not have is remembered as missing as long."""
    key: ClusterKey = field(default_factory=lambda: ClusterKey(None))
    """The cluster token (``--token-file`` / ``SWARM_TOKEN``); default: open."""
    bar_reporters: int = 2
    """Distinct live peers that must report a peer for corrupt data before it is barred."""
    tls_cert: str | None = None
    """PEM certificate chain for HTTPS (with ``tls_key``); UDP announces are then off."""
    tls_key: str | None = None
    health_interval: float = 10.0
    """Seconds between probes of the catalog's reachability (for /healthz and /readyz)."""
    negative_cache_size: int = 10_000
    """Refs remembered as missing from the catalog at most (oldest forgotten first)."""

    def validate(self) -> None:
        if self.stall_timeout <= self.announce_interval:
            raise SwarmError("--stall-timeout must be longer than --announce-interval")
        if self.peer_ttl <= self.announce_interval:
            raise SwarmError("--peer-ttl must be longer than --announce-interval")
        if self.bar_reporters < 2:
            raise ConfigError(
                f"--bar-reporters must be at least 2 (one report never bars a peer), got {self.bar_reporters}"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together: give both or neither")
        if self.origin_max_pulls < 1:
            raise ConfigError(f"--origin-max-pulls must be >= 1, got {self.origin_max_pulls}")
        if problem := origin_copies_problem(self.origin_copies):
            raise ConfigError(f"--origin-copies {problem}")
        if self.health_interval <= 0:
            raise ConfigError(f"--health-interval must be > 0, got {self.health_interval}")
