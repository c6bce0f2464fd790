"""What a simulated burst is: the artifact, the nodes, the network, the origin, the faults.

A scenario is a TOML file under ``simulations/scenarios/`` (or anywhere, by
path). Every key is optional and has the default written in :class:`Scenario`.
Rates are in Gbit/s (10^9 bit/s), sizes as elsewhere in the CLI (``256MiB``,
``1TB``), times in seconds from the start of the burst. A file may list
``[[variant]]`` tables: each has a ``name`` and overrides any top-level key, so
one file holds e.g. the 100- and 1000-replica runs of the same model.

Heterogeneous or measured nodes are given as ``[[node_group]]`` tables
(``count``, ``up_gbps``, ``down_gbps``, ``disk_gbps``) that apply, in order, to
the first nodes; the rest get ``nic_gbps``. A testbed's measured per-node link
rates are a list of groups of one.

A node's CPU is left out unless ``cpu_cores`` is set: then its download and
upload are each capped at ``cpu_cores / (cpu_receive_s_per_gib +
cpu_serve_s_per_gib)`` GiB/s (in a swarm a node serves about as much as it
receives, at the same time, on the same cores) and at ``1 / loop_s_per_gib``
GiB/s (the peer's one event-loop thread reads every socket: one core, whatever
the node has). The defaults are the data-plane benchmark's measured costs
(``benchmarks/results/dataplane-2026-12-04.json``, 256 MiB pieces, 2 workers,
after start-up, on this project's 2-core test VM).

Faults are ``[[crash]]`` (``node``, ``at``), ``[[throttle]]`` (``start``,
``end``, and ``request_rate``: the origin's request budget in that window, 0 =
every request is throttled, and/or ``max_requests``: the concurrent GETs it serves
then, more are answered 503 SlowDown), ``[[stall]]`` (``node``, ``at``, ``duration``: the
node's origin reads stop moving) and one ``[join]`` table (``count``,
``start``, ``interval``: the last ``count`` nodes join one by one, a rolling
scale-up).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import ConfigError
from core.units import parse_size
from seeder.reader import DEFAULT_RANGE_SIZE
from seeder.role import WINDOW_RANGES
from tracker.assignment import origin_copies_problem

__all__ = [
    "SCENARIO_DIR",
    "STRATEGIES",
    "Crash",
    "Join",
    "NodeGroup",
    "NodeRates",
    "Scenario",
    "Stall",
    "Throttle",
    "list_scenarios",
    "load_scenario",
]

SCENARIO_DIR = Path(__file__).parent / "scenarios"
STRATEGIES = ("direct", "cache", "swarm", "swarm-random", "swarm-session", "swarm-session-random")


GIB = 1024**3
# Measured by ``python -m benchmarks.dataplane`` (dataplane-2026-12-04.json: 256 MiB
# pieces, 2 workers): CPU-seconds per GiB, the receiving process after start-up, the
# serving process, and the receiver's event-loop thread alone.
CPU_RECEIVE_S_PER_GIB = 0.782
CPU_SERVE_S_PER_GIB = 0.40
LOOP_S_PER_GIB = 0.192


def gbps(value: float) -> float:
    """Gbit/s (10^9 bit/s) to bytes per second."""
    return value * 1e9 / 8


@dataclass(frozen=True, slots=True)
class NodeGroup:
    """Link rates of ``count`` nodes (None: the scenario's ``nic_gbps`` / no disk limit)."""

    count: int
    up_gbps: float | None = None
    down_gbps: float | None = None
    disk_gbps: float | None = None


@dataclass(frozen=True, slots=True)
class NodeRates:
    """One node's rates in bytes per second (``down`` already folds in the disk)."""

    up: float
    down: float


@dataclass(frozen=True, slots=True)
class Crash:
    node: int
    at: float


@dataclass(frozen=True, slots=True)
class Throttle:
    start: float
    end: float
    request_rate: float | None = None
    """Requests per second the origin accepts in the window (None: unchanged)."""
    max_requests: int | None = None
    """Concurrent GETs the origin serves in the window (None: unchanged)."""


@dataclass(frozen=True, slots=True)
class Stall:
    node: int
    at: float
    duration: float


@dataclass(frozen=True, slots=True)
class Join:
    count: int
    start: float
    interval: float


@dataclass(frozen=True, slots=True)
class Scenario:
    """Every parameter of one simulated burst (see the module docstring)."""

    name: str = "custom"
    description: str = ""
    seed: int = 1
    strategies: tuple[str, ...] = ("direct", "cache", "swarm")
    anchor: str = ""
    """A published figure to put beside ours, as text."""

    # artifact
    model_size: int = 10 * 1024**3
    files: int = 1
    piece_size: int = 256 * 1024**2
    block_size: int = 0
    """Unit of a peer request; 0 means one request per piece."""

    # nodes and network
    nodes: int = 100
    nic_gbps: float = 100.0
    up_gbps: float | None = None
    down_gbps: float | None = None
    disk_gbps: float | None = None
    node_groups: tuple[NodeGroup, ...] = ()
    rack_size: int = 0
    """Nodes per rack; 0 means no rack layer."""
    oversubscription: float = 1.0
    """Rack downlink capacity over ToR uplink capacity."""
    zone_preference: bool = False
    """Racks are zones: ``swarm`` samples neighbours mostly from the own rack
    (:class:`tracker.zones.ZoneIndex`) and asks other racks only for pieces its
    own rack lacks (the picker's remote peers). Needs ``rack_size``."""

    # CPU (see the module docstring; 0 cores: not modeled)
    cpu_cores: float = 0.0
    cpu_receive_s_per_gib: float = CPU_RECEIVE_S_PER_GIB
    cpu_serve_s_per_gib: float = CPU_SERVE_S_PER_GIB
    loop_s_per_gib: float = LOOP_S_PER_GIB
    """CPU-s per GiB on the peer's one event-loop thread; 0: no single-thread cap."""

    # origin
    origin_gbps: float = 10.0
    origin_connection_gbps: float | None = None
    origin_request_rate: float = 0.0
    """Requests per second the origin accepts (token bucket); 0 means unlimited."""
    origin_request_burst: float = 0.0
    """Token bucket depth; 0 means one second's worth."""
    origin_max_requests: int = 0
    """Concurrent GETs the origin serves; more are throttled (503 SlowDown). 0: no limit."""
    origin_streams: int = 0
    """Ranged GETs one origin pull keeps open at once, each capped at
    ``origin_connection_gbps``. 0: as the peer reads a piece, ``WINDOW_RANGES``
    ranges of ``DEFAULT_RANGE_SIZE`` at a time (4 for a 256 MiB piece, 1 for a
    4 MiB one); 1: one GET per piece, the model before 2026-12-05."""
    first_byte_latency: float = 0.0
    retry_after: float | None = None
    """What a throttled response asks the client to wait, if anything."""
    origin_connections: int = 8
    """Concurrent origin requests per node for ``direct`` and ``cache``."""

    # swarm
    peer_connections: int = 10
    """``swarm`` without ``zone_preference`` (which samples by rack): each node
    dials random others until it has this many, and one
    that has them takes no more (the peer's ``max_peers``): every degree about
    equal. Dialing half and taking every caller left degrees from 4 to 18 at 10,
    and the nodes with the fewest were the tail (dragonfly-1200 with
    cut-through: max 1.29 -> 1.25 x T_min, fireworks n100-o100 1.050 -> 1.034)."""
    max_downloads: int = 16
    """``swarm``: requests a node keeps in flight over all its connections."""
    upload_slots: int = 16
    """Concurrent sends per node (``SessionConfig.upload_slots``, the peer's default).
    Until 2026-12-06 every scenario ran 4 and 4, a weaker peer than the real one:
    fireworks n100-o100 finished at 1.20 x T_min with 4 / 4, 1.05 with 16 / 16
    (the fabric idled at 86% of its capacity with four sends per uplink)."""
    per_peer_limit: int = 2
    origin_budget: int | None = None
    adaptive_budget: bool = True
    """The tracker's origin budget adapts to throttling (``tracker.origin_budget``);
    off (or ``origin_budget`` set), it stays at the default or that fixed value."""
    origin_copies: float = 1.0
    """Origin bytes allowed, in copies of the artifact (``swarm tracker
    --origin-copies``): above 1 the origin serves extra copies of the rarest
    pieces while it would otherwise idle (``tracker.assignment``)."""
    cut_through: bool = True
    """Blocks that arrive are offered to neighbours before their piece is whole
    (``SessionConfig.cut_through``), and origin pulls are read and offered a
    window at a time. The glue ``swarm`` does it only with ``block_size`` below
    the piece size (one block per piece leaves nothing to relay early)."""
    stall_timeout: float = 30.0
    announce_interval: float = 5.0
    endgame_duplicates: int = 2
    cache_vnodes: int = 64

    # faults and dynamics
    crashes: tuple[Crash, ...] = ()
    throttles: tuple[Throttle, ...] = ()
    stalls: tuple[Stall, ...] = ()
    join: Join | None = None

    time_limit: float = 1e7
    variant: str = ""
    variants: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        where = f"scenario {self.name!r}"
        if self.nodes < 1:
            raise ConfigError(f"{where}: nodes must be >= 1, got {self.nodes}")
        if self.model_size < 1 or self.piece_size < 1:
            raise ConfigError(f"{where}: model_size and piece_size must be >= 1 byte")
        if problem := origin_copies_problem(self.origin_copies):
            raise ConfigError(f"{where}: origin_copies {problem}")
        if self.files < 1 or self.files > self.model_size:
            raise ConfigError(f"{where}: files must be in 1..model_size, got {self.files}")
        if self.block_size < 0:
            raise ConfigError(f"{where}: block_size must be >= 0, got {self.block_size}")
        for key in ("nic_gbps", "origin_gbps"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"{where}: {key} must be > 0, got {getattr(self, key)}")
        for key in ("up_gbps", "down_gbps", "disk_gbps", "origin_connection_gbps"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"{where}: {key} must be > 0, got {value}")
        for key in ("cpu_cores", "cpu_receive_s_per_gib", "cpu_serve_s_per_gib", "loop_s_per_gib"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"{where}: {key} must be >= 0, got {getattr(self, key)}")
        if self.cpu_cores and not self.cpu_receive_s_per_gib + self.cpu_serve_s_per_gib > 0:
            raise ConfigError(f"{where}: cpu_cores needs a CPU cost per GiB > 0")
        if self.rack_size < 0 or not self.oversubscription >= 1.0:
            raise ConfigError(f"{where}: rack_size must be >= 0 and oversubscription >= 1")
        if self.zone_preference and not self.rack_size:
            raise ConfigError(f"{where}: zone_preference needs rack_size > 0 (racks are the zones)")
        for key in ("origin_connections", "peer_connections", "max_downloads", "upload_slots"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}: {key} must be >= 1, got {getattr(self, key)}")
        if self.origin_request_rate < 0 or self.first_byte_latency < 0:
            raise ConfigError(f"{where}: request rate and latency must be >= 0")
        for strategy in self.strategies:
            if strategy not in STRATEGIES:
                raise ConfigError(
                    f"{where}: unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})"
                )
        if sum(group.count for group in self.node_groups) > self.nodes:
            raise ConfigError(f"{where}: node_group counts add up to more than {self.nodes} nodes")
        for crash in self.crashes:
            self._check_node(crash.node, "crash")
        for stall in self.stalls:
            self._check_node(stall.node, "stall")
            if stall.duration <= 0:
                raise ConfigError(f"{where}: stall of node {stall.node} needs a duration > 0")
        if self.origin_streams < 0:
            raise ConfigError(f"{where}: origin_streams must be >= 0")
        if self.origin_max_requests < 0:
            raise ConfigError(f"{where}: origin_max_requests must be >= 0")
        for throttle in self.throttles:
            if (
                not 0 <= throttle.start < throttle.end
                or (throttle.request_rate is not None and throttle.request_rate < 0)
                or (throttle.max_requests is not None and throttle.max_requests < 1)
                or (throttle.request_rate is None and throttle.max_requests is None)
            ):
                raise ConfigError(
                    f"{where}: throttle needs 0 <= start < end and request_rate >= 0 "
                    "or max_requests >= 1"
                )
        if self.join is not None and not 0 <= self.join.count < self.nodes:
            raise ConfigError(f"{where}: join.count must be in 0..nodes-1, got {self.join.count}")

    def _check_node(self, node: int, what: str) -> None:
        if not 0 <= node < self.nodes:
            raise ConfigError(
                f"scenario {self.name!r}: {what} names node {node}, but nodes are 0..{self.nodes - 1}"
            )

    # -- derived values -----------------------------------------------------

    def file_sizes(self) -> list[int]:
        """Sizes of the artifact's files (as equal as whole bytes allow)."""
        base, extra = divmod(self.model_size, self.files)
        return [base + (1 if i < extra else 0) for i in range(self.files)]

    def piece_lengths(self) -> list[int]:
        """Length of every piece; pieces never span two files."""
        lengths: list[int] = []
        for size in self.file_sizes():
            full, tail = divmod(size, self.piece_size)
            lengths.extend([self.piece_size] * full)
            if tail:
                lengths.append(tail)
        return lengths

    def cpu_rate(self) -> float | None:
        """The most a node's CPU moves each way, in B/s (None: CPU not modeled)."""
        if not self.cpu_cores:
            return None
        rate = self.cpu_cores / (self.cpu_receive_s_per_gib + self.cpu_serve_s_per_gib)
        if self.loop_s_per_gib:
            rate = min(rate, 1.0 / self.loop_s_per_gib)
        return rate * GIB

    def cpu_limit(self) -> str:
        """What caps a node's CPU rate: 'cores', 'event loop' or '' (not modeled)."""
        if not self.cpu_cores:
            return ""
        cores = self.cpu_cores / (self.cpu_receive_s_per_gib + self.cpu_serve_s_per_gib)
        if self.loop_s_per_gib and 1.0 / self.loop_s_per_gib < cores:
            return "event loop"
        return "cores"

    def node_rates(self) -> list[NodeRates]:
        """Uplink and effective downlink (min of NIC, disk and CPU) of every node, in B/s."""
        cpu = self.cpu_rate()
        rates: list[NodeRates] = []
        groups = list(self.node_groups)
        default = NodeGroup(self.nodes, self.up_gbps, self.down_gbps, self.disk_gbps)
        for group in [*groups, default]:
            for _ in range(group.count):
                if len(rates) == self.nodes:
                    break
                up = gbps(group.up_gbps or self.up_gbps or self.nic_gbps)
                down = gbps(group.down_gbps or self.down_gbps or self.nic_gbps)
                disk = group.disk_gbps or self.disk_gbps
                if disk is not None:
                    down = min(down, gbps(disk))
                if cpu is not None:
                    up, down = min(up, cpu), min(down, cpu)
                rates.append(NodeRates(up, down))
        return rates

    @property
    def origin_rate(self) -> float:
        """Origin aggregate egress in B/s."""
        return gbps(self.origin_gbps)

    def lower_bound(self) -> float:
        """T_min = max(F/u_s, F/d_min, N·F/(u_s + Σu)) in seconds (Kumar & Ross 2006)."""
        rates = self.node_rates()
        size = float(self.model_size)
        u_s = self.origin_rate
        d_min = min(rate.down for rate in rates)
        total_up = math.fsum(rate.up for rate in rates)
        return max(size / u_s, size / d_min, self.nodes * size / (u_s + total_up))

    def node_bounds(self) -> list[float]:
        """Each node's own bound, max(F/u_s, F/d_i, N·F/(u_s + Σu)) in seconds: no
        schedule delivers the artifact to node i sooner (T_min is the slowest of them)."""
        rates = self.node_rates()
        size = float(self.model_size)
        u_s = self.origin_rate
        shared = max(size / u_s, self.nodes * size / (u_s + math.fsum(r.up for r in rates)))
        return [max(shared, size / rate.down) for rate in rates]

    def pull_streams(self, size: int) -> int:
        """Ranged GETs an origin pull of ``size`` bytes keeps open at once."""
        if self.origin_streams:
            return self.origin_streams
        return max(1, min(WINDOW_RANGES, -(-size // DEFAULT_RANGE_SIZE)))

    def with_overrides(self, **overrides: Any) -> Scenario:
        """A copy with the given fields replaced (None values are ignored)."""
        changes = {key: value for key, value in overrides.items() if value is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"scenario {self.name!r}: unknown settings {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def variant_names(self) -> list[str]:
        return [str(v["name"]) for v in self.variants]

    def select_variant(self, name: str) -> Scenario:
        """The scenario with variant ``name``'s overrides applied."""
        for raw in self.variants:
            if raw["name"] == name:
                values = _convert({k: v for k, v in raw.items() if k != "name"}, self.name)
                return self.with_overrides(**values, variant=name)
        raise ConfigError(
            f"scenario {self.name!r} has no variant {name!r} "
            f"(variants: {', '.join(self.variant_names()) or 'none'})"
        )


_SIZE_KEYS = {"model_size", "piece_size", "block_size"}
_TABLE_KEYS = {"node_group", "crash", "throttle", "stall", "join", "variant"}


def _convert(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """TOML values to :class:`Scenario` fields, with errors that name the file's key."""
    values: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(Scenario)}
    for key, value in raw.items():
        if key in _TABLE_KEYS:
            continue
        if key not in known:
            raise ConfigError(f"scenario {name!r}: unknown key {key!r}")
        if key in _SIZE_KEYS:
            value = parse_size(value)
        elif key == "strategies":
            value = tuple(value)
        values[key] = value
    try:
        if "node_group" in raw:
            values["node_groups"] = tuple(NodeGroup(**g) for g in raw["node_group"])
        if "crash" in raw:
            values["crashes"] = tuple(Crash(**c) for c in raw["crash"])
        if "throttle" in raw:
            values["throttles"] = tuple(Throttle(**t) for t in raw["throttle"])
        if "stall" in raw:
            values["stalls"] = tuple(Stall(**s) for s in raw["stall"])
        if "join" in raw:
            values["join"] = Join(**raw["join"])
    except TypeError as exc:
        raise ConfigError(f"scenario {name!r}: bad fault or node_group table: {exc}") from exc
    if "variant" in raw:
        for variant in raw["variant"]:
            if "name" not in variant:
                raise ConfigError(f"scenario {name!r}: every [[variant]] needs a name")
        values["variants"] = tuple(raw["variant"])
    return values


def list_scenarios() -> list[str]:
    """Names of the scenarios shipped under ``simulations/scenarios/``."""
    return sorted(path.stem for path in SCENARIO_DIR.glob("*.toml"))


def load_scenario(name_or_path: str) -> Scenario:
    """Load a shipped scenario by name, or any TOML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(
            f"no scenario {name_or_path!r} (shipped: {', '.join(list_scenarios())}; or give a path)"
        )
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"can't read scenario {path}: {exc}") from exc
    values = _convert(raw, path.stem)
    values.setdefault("name", path.stem)
    try:
        return Scenario(**values)
    except TypeError as exc:
        raise ConfigError(f"scenario {path}: {exc}") from exc
