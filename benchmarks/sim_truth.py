"""The simulator's prediction for a shaped-testbed run of swarm, beside what the run measured.

A shaped run (:mod:`benchmarks.shaped`) fixes the nodes, the link rates, the
artifact (size, files, piece size) and the flags the tracker and the peers ran
with. :func:`build_scenario` turns exactly those into a
:class:`simulations.scenario.Scenario`: block size and pipeline depths come from
the peer's and the tracker's config defaults (:class:`swarm.peer.PeerConfig`,
:class:`tracker.config.TrackerConfig`) with the run's flags applied on top, so
nothing is stated twice. :func:`predict` runs the simulator's ``swarm`` strategy
on it with a fixed seed and returns its p50 and max completion, its origin
bytes, and the ratios real ÷ simulated.

What the simulator cannot express is written into the prediction, not hidden:

- Start-up. Every simulated node runs from t = 0; a real fetch first starts an
  interpreter, imports, and asks the tracker for the manifest. A scenario has
  no per-node start delay, so the median start-up the peers report
  (``startup_seconds``: process start to peer engine start) is added to every
  simulated completion time (``startup_added_seconds``). The harness starts
  every process at once, so the spread of start-ups is small beside the median.
- Protocol overhead. Simulated links carry payload at the shaped rate; on the
  testbed TCP/IP and HTTP headers take a few percent of each link.
- The peer's per-connection request depth, where the scenario has only a
  node-wide limit (``max_downloads``): the node-wide limit is then the depth
  times the connections, the most the peer keeps in flight.

``python -m benchmarks.sim_truth RESULT.json`` prints the prediction for a
result file written before this module existed (``--write`` adds it to the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from core.units import parse_size
from simulations.runner import run_strategy
from simulations.scenario import NodeGroup, Scenario
from swarm.peer import PeerConfig
from swarm.session import requests_in_flight
from tracker.config import TrackerConfig

__all__ = [
    "SEED",
    "TOLERANCE",
    "RunRecord",
    "RunSettings",
    "add_prediction",
    "build_scenario",
    "format_prediction",
    "predict",
    "record_from_result",
    "run_settings",
    "scenario_settings",
    "startup_delay",
]

SEED: Final = 1
STRATEGY: Final = "swarm"
TOLERANCE: Final = 0.10
"""How far real ÷ simulated may stray from 1 for the prediction to count as holding."""


@dataclass(frozen=True)
class RunSettings:
    """What the run's peers and tracker ran with: their config defaults, then the run's flags."""

    block_size: int
    requests_per_peer: int
    upload_slots: int
    max_upload_rate: int | None  # bytes/s
    max_download_rate: int | None  # bytes/s
    origin_pieces_in_flight: int
    announce_interval: float
    stall_timeout: float
    per_peer_limit: int
    origin_budget: int | None
    origin_rate: int | None  # bytes/s, the whole cluster's origin reads
    max_peers_in_reply: int


# Flags of `swarm fetch` and `swarm tracker` that change what the simulator models:
# (flag, field of RunSettings, parser). Other flags are ignored.
_FETCH_FLAGS: Final[tuple[tuple[str, str, Callable[[str], Any]], ...]] = (
    ("--block-size", "block_size", parse_size),
    ("--requests-per-peer", "requests_per_peer", int),
    ("--upload-slots", "upload_slots", int),
    ("--max-upload-rate", "max_upload_rate", parse_size),
    ("--max-download-rate", "max_download_rate", parse_size),
)
_TRACKER_FLAGS: Final[tuple[tuple[str, str, Callable[[str], Any]], ...]] = (
    ("--announce-interval", "announce_interval", float),
    ("--stall-timeout", "stall_timeout", float),
    ("--per-peer-origin-pieces", "per_peer_limit", int),
    ("--origin-budget", "origin_budget", int),
    ("--origin-rate-limit", "origin_rate", parse_size),
)


def _parse_flags(
    args: Sequence[str],
    flags: Sequence[tuple[str, str, Callable[[str], Any]]],
    defaults: Mapping[str, Any],
) -> dict[str, Any]:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag, dest, parse in flags:
        parser.add_argument(flag, dest=dest, type=parse, default=defaults[dest])
    known, _ = parser.parse_known_args(list(args))
    return vars(known)


def run_settings(fetch_args: Sequence[str] = (), tracker_args: Sequence[str] = ()) -> RunSettings:
    """The settings of a run whose fetches and tracker got these extra flags."""
    peer = PeerConfig()
    tracker = TrackerConfig()
    peer_defaults = {
        "block_size": peer.block_size,
        "requests_per_peer": peer.requests_per_peer,
        "upload_slots": peer.upload_slots,
        "max_upload_rate": peer.max_upload_rate,
        "max_download_rate": peer.max_download_rate,
    }
    tracker_defaults = {
        "announce_interval": tracker.announce_interval,
        "stall_timeout": tracker.stall_timeout,
        "per_peer_limit": tracker.per_peer_limit,
        "origin_budget": tracker.origin_budget,
        "origin_rate": tracker.origin_rate,
    }
    return RunSettings(
        **_parse_flags(fetch_args, _FETCH_FLAGS, peer_defaults),
        **_parse_flags(tracker_args, _TRACKER_FLAGS, tracker_defaults),
        origin_pieces_in_flight=peer.origin_pieces_in_flight,
        max_peers_in_reply=tracker.max_peers_in_reply,
    )


@dataclass(frozen=True)
class RunRecord:
    """One finished shaped run of swarm: its set-up and what it measured."""

    name: str
    model_bytes: int
    files: int
    piece_size: int
    node_up_bps: tuple[int, ...]
    """Per node, bit/s as shaped."""
    node_down_bps: tuple[int, ...]
    origin_up_bps: int
    p50_seconds: float
    max_seconds: float
    origin_bytes: int
    """Origin bytes on the wire (the origin interface's transmit counter)."""
    origin_bytes_reported: int | None = None
    """Origin payload bytes the peers reported reading."""
    fetch_args: tuple[str, ...] = ()
    tracker_args: tuple[str, ...] = ()
    startup_seconds: tuple[float, ...] = ()
    """Per node, process start to peer engine start, as each peer reported it."""
    startup_max_seconds: float | None = None
    origin_first_byte_seconds: float | None = None
    """Launch of the peers to the origin link's first data."""
    block_size: int = 0
    """The manifest's block size (format 2: what peers request, whatever --block-size
    says); 0 when the result does not say (runs before 2026-12-06)."""

    @property
    def nodes(self) -> int:
        return len(self.node_up_bps)


def record_from_result(result: Mapping[str, Any], system: str = STRATEGY) -> RunRecord:
    """The record of ``system`` in a result object of :func:`benchmarks.shaped.scenario_result`."""
    entry = result["systems"][system]
    nodes = int(result["nodes"])
    links = (
        tuple(int(b) for b in result.get("node_links_bps", ()))
        or (int(result["node_link_bps"]),) * nodes
    )
    reported = entry.get("origin_bytes_reported")
    return RunRecord(
        name=str(result["scenario"]),
        model_bytes=int(result["model_bytes"]),
        files=int(result["files"]),
        piece_size=int(result["piece_size"]),
        node_up_bps=links,
        node_down_bps=links,
        origin_up_bps=int(result["origin_link_bps"]),
        p50_seconds=float(entry["p50_seconds"]),
        max_seconds=float(entry["max_seconds"]),
        origin_bytes=int(entry["origin_bytes"]),
        origin_bytes_reported=None if reported is None else int(reported),
        fetch_args=tuple(result.get("fetch_args", ())),
        tracker_args=tuple(result.get("tracker_args", ())),
        startup_seconds=tuple(float(s) for s in entry.get("startup_seconds", ())),
        startup_max_seconds=entry.get("startup_max_seconds"),
        origin_first_byte_seconds=(entry.get("origin_link") or {}).get("first_byte_seconds"),
        block_size=int(result.get("block_size") or 0),
    )


def startup_delay(record: RunRecord) -> tuple[float, str]:
    """Seconds to add to every simulated completion for start-up, and where they come from."""
    if record.startup_seconds:
        return float(
            statistics.median(record.startup_seconds)
        ), "median of the peers' startup_seconds"
    # Results written before the per-node figures were kept.
    if record.startup_max_seconds is not None:
        return float(record.startup_max_seconds), "max of the peers' startup_seconds"
    if record.origin_first_byte_seconds is not None:
        return float(record.origin_first_byte_seconds), "origin link's first data after launch"
    return 0.0, "not measured"


def _gbps(bits_per_second: float) -> float:
    return bits_per_second / 1e9


def _capped_bps(shaped_bps: int, cap_bytes_per_s: int | None) -> int:
    return shaped_bps if cap_bytes_per_s is None else min(shaped_bps, 8 * cap_bytes_per_s)


def scenario_settings(
    record: RunRecord, settings: RunSettings, *, seed: int = SEED
) -> dict[str, Any]:
    """The :class:`Scenario` fields of ``record``'s run; the rest keep the scenario's defaults."""
    nodes = record.nodes
    if len(record.node_down_bps) != nodes:
        raise ValueError("node_up_bps and node_down_bps must name the same nodes")
    ups = [_capped_bps(bps, settings.max_upload_rate) for bps in record.node_up_bps]
    downs = [_capped_bps(bps, settings.max_download_rate) for bps in record.node_down_bps]
    links: dict[str, Any]
    if len(set(ups)) == 1 and len(set(downs)) == 1:
        links = {
            "nic_gbps": _gbps(max(ups[0], downs[0])),
            "up_gbps": _gbps(ups[0]),
            "down_gbps": _gbps(downs[0]),
        }
    else:
        groups = tuple(NodeGroup(1, _gbps(u), _gbps(d)) for u, d in zip(ups, downs, strict=True))
        links = {"nic_gbps": _gbps(max(*ups, *downs)), "node_groups": groups}
    # The tracker's reply names every other peer up to its sample size, and the
    # peer dials every peer a reply names.
    connections = max(1, min(nodes - 1, settings.max_peers_in_reply))
    block_size = min(record.block_size or settings.block_size, record.piece_size)
    # 0: the peer's default for this block size.
    requests = settings.requests_per_peer or requests_in_flight(block_size)
    pipeline: dict[str, Any] = {"upload_slots": settings.upload_slots}
    if "requests_per_peer" in {f.name for f in dataclasses.fields(Scenario)}:
        pipeline["requests_per_peer"] = requests
    else:
        pipeline["max_downloads"] = requests * connections
    return {
        "name": f"shaped-{record.name}",
        "description": f"the shaped testbed's {record.name} run, as simulated",
        "seed": seed,
        "strategies": (STRATEGY,),
        "model_size": record.model_bytes,
        "files": record.files,
        "piece_size": record.piece_size,
        "block_size": block_size,
        "nodes": nodes,
        **links,
        "origin_gbps": _gbps(_capped_bps(record.origin_up_bps, settings.origin_rate)),
        "peer_connections": connections,
        # The tracker assigns at most per_peer_limit pieces; the peer pulls at most
        # origin_pieces_in_flight of them at once.
        "per_peer_limit": min(settings.per_peer_limit, settings.origin_pieces_in_flight),
        "origin_budget": settings.origin_budget,
        "announce_interval": settings.announce_interval,
        "stall_timeout": settings.stall_timeout,
        **pipeline,
    }


def build_scenario(record: RunRecord, settings: RunSettings, *, seed: int = SEED) -> Scenario:
    """The simulated burst of ``record``'s run (start-up aside: see :func:`predict`)."""
    return Scenario(**scenario_settings(record, settings, seed=seed))


def _as_json(settings: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key in ("name", "description"):
            continue
        if isinstance(value, tuple):
            value = [
                dataclasses.asdict(v)
                if dataclasses.is_dataclass(v) and not isinstance(v, type)
                else v
                for v in value
            ]
        out[key] = value
    return out


def _ratio(real: float | None, sim: float | None) -> float | None:
    if real is None or not sim:
        return None
    return round(real / sim, 3)


def predict(record: RunRecord, *, seed: int = SEED) -> dict[str, Any]:
    """The ``simulated`` object of a result: the prediction and real ÷ simulated."""
    fields = scenario_settings(
        record, run_settings(record.fetch_args, record.tracker_args), seed=seed
    )
    scenario = Scenario(**fields)
    result = run_strategy(scenario, STRATEGY)
    startup, source = startup_delay(record)
    done = result.completed()
    bound = result.lower_bound_seconds
    engine_p50 = float(statistics.median(done)) if done else None
    engine_max = done[-1] if len(done) == record.nodes else None
    p50 = None if engine_p50 is None else engine_p50 + startup
    worst = None if engine_max is None else engine_max + startup
    real_over_sim = {
        "p50": _ratio(record.p50_seconds, p50),
        "max": _ratio(record.max_seconds, worst),
    }
    not_modelled = ["start-up (added to every completion)", "TCP/IP and HTTP overhead"]
    if "max_downloads" in fields:
        not_modelled.append(
            "requests_per_peer per connection (max_downloads = requests_per_peer x connections)"
        )
    return {
        "strategy": STRATEGY,
        "seed": seed,
        "scenario": _as_json(fields),
        "startup_added_seconds": round(startup, 3),
        "startup_source": source,
        "engine_p50_seconds": None if engine_p50 is None else round(engine_p50, 3),
        "engine_max_seconds": None if engine_max is None else round(engine_max, 3),
        "p50_seconds": None if p50 is None else round(p50, 3),
        "max_seconds": None if worst is None else round(worst, 3),
        "p50_ratio_to_bound": None if p50 is None else round(p50 / bound, 3),
        "max_ratio_to_bound": None if worst is None else round(worst / bound, 3),
        "lower_bound_seconds": round(bound, 3),
        "completed": len(done),
        "origin_bytes": round(result.origin_bytes),
        "origin_ratio": round(result.origin_bytes / record.model_bytes, 4),
        "real_over_sim": real_over_sim,
        "origin_real_over_sim": {
            "wire": _ratio(record.origin_bytes, result.origin_bytes),
            "reported": _ratio(record.origin_bytes_reported, result.origin_bytes),
        },
        "within_tolerance": all(
            r is not None and abs(r - 1) <= TOLERANCE for r in real_over_sim.values()
        ),
        "tolerance": TOLERANCE,
        "not_modelled": not_modelled,
        "wall_seconds": round(result.wall_seconds, 3),
    }


def add_prediction(result: dict[str, Any], system: str = STRATEGY) -> dict[str, Any] | None:
    """Add ``simulated`` to ``system``'s entry of ``result``; None if that system has no result."""
    entry = result.get("systems", {}).get(system)
    if not entry or "error" in entry:
        return None
    simulated = predict(record_from_result(result, system))
    entry["simulated"] = simulated
    return simulated


def format_prediction(simulated: Mapping[str, Any]) -> str:
    """One line for the benchmark's table."""

    def num(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    ratios = simulated["real_over_sim"]
    return (
        f"simulated: p50 {num(simulated['p50_seconds'], '.1f')} s, "
        f"max {num(simulated['max_seconds'], '.1f')} s "
        f"({num(simulated['max_ratio_to_bound'], '.2f')} x T_min, start-up "
        f"+{simulated['startup_added_seconds']:.2f} s), origin "
        f"{simulated['origin_ratio']:.3f} x F; real/sim p50 {num(ratios['p50'], '.3f')}, "
        f"max {num(ratios['max'], '.3f')}"
        f" ({'within' if simulated['within_tolerance'] else 'outside'}"
        f" ±{simulated['tolerance']:.0%})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sim_truth",
        description="The simulator's prediction for a shaped-testbed result file.",
    )
    parser.add_argument("result", type=Path, help="a result JSON of benchmarks.shaped")
    parser.add_argument("--system", default=STRATEGY)
    parser.add_argument("--write", action="store_true", help="add the prediction to the file")
    args = parser.parse_args(argv)
    result = json.loads(args.result.read_text())
    if "files" not in result:
        # Files written before the count was recorded used the scenarios' default.
        from benchmarks.shaped import Scenario as ShapedScenario

        result["files"] = next(
            f.default for f in dataclasses.fields(ShapedScenario) if f.name == "files"
        )
    simulated = add_prediction(result, args.system)
    if simulated is None:
        print(f"{args.result}: no result of {args.system}", file=sys.stderr)
        return 1
    print(json.dumps(simulated, indent=2, sort_keys=True))
    print(f"{result['scenario']} {args.system} {format_prediction(simulated)}", file=sys.stderr)
    if args.write:
        from benchmarks.shaped import write_result

        write_result(args.result, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
