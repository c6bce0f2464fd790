"""What ``make bench`` runs: the shaped scenarios, the data-plane run, then the README table.

``python -m benchmarks.run_all`` runs every scenario of :mod:`benchmarks.shaped`
(skipped, with the reason, when this machine can't build the testbed, e.g. not
root), the byte-rate caps (:mod:`benchmarks.rate_cap`) and the zones scenario
(flat, and with 4:1 between the zones) on the same testbed, then :mod:`benchmarks.dataplane`, writing their JSON to
``benchmarks/results/``. It then renders a table from the newest result of each
scenario and of the data plane, and writes it into ``README.md`` between the
lines ``<!-- bench:start -->`` and ``<!-- bench:end -->``; if the README has no
such markers, it prints the table instead and leaves the README alone.

``--table-only`` skips the runs and only refreshes the table from the results
already there; ``--print-only`` prints the table and leaves the README alone.
Reduced development runs (``"reduced": true``) never reach the table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import dataplane, rate_cap, shaped
from benchmarks.errors import BenchmarkError, TestbedUnavailableError
from benchmarks.testbed import require_root
from core.units import format_size

START_MARKER = "<!-- bench:start -->"
END_MARKER = "<!-- bench:end -->"
SYSTEM_ORDER = ("swarm", "libtorrent", "direct")
_DATED = re.compile(r"^(?P<name>.+)-(?P<date>\d{4}-\d{2}-\d{2})\.json$")


def latest_results(results_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The newest result of each scenario (in ``shaped.SCENARIOS`` order, then by name)
    and the newest data-plane result, read from ``results_dir``."""
    newest: dict[str, tuple[str, Path]] = {}
    for path in results_dir.glob("*.json") if results_dir.is_dir() else []:
        m = _DATED.match(path.name)
        if m is None or json.loads(path.read_text()).get("reduced"):
            continue  # not a dated result, or a reduced development run
        name, date = m["name"], m["date"]
        if name not in newest or date > newest[name][0]:
            newest[name] = (date, path)
    order = {name: i for i, name in enumerate(shaped.SCENARIOS)}
    names = sorted((n for n in newest if n in order), key=lambda n: (order.get(n, len(order)), n))
    scenarios = [json.loads(newest[n][1].read_text()) for n in names]
    plane = json.loads(newest["dataplane"][1].read_text()) if "dataplane" in newest else None
    return scenarios, plane


def newest_result(results_dir: Path, name: str) -> dict[str, Any] | None:
    """The newest ``<name>-<date>.json`` in ``results_dir`` (reduced runs skipped), or None."""
    best: tuple[str, Path] | None = None
    for path in results_dir.glob(f"{name}-*.json") if results_dir.is_dir() else []:
        m = _DATED.match(path.name)
        if m is None or m["name"] != name or json.loads(path.read_text()).get("reduced"):
            continue
        if best is None or m["date"] > best[0]:
            best = (m["date"], path)
    return None if best is None else dict(json.loads(best[1].read_text()))


def render_cluster(tracker: dict[str, Any] | None, rollout: dict[str, Any] | None) -> str:
    """Markdown for the tracker's announce rate and the staged rollout (not run by
    ``make bench``)."""
    out = ""
    if tracker is not None:
        out += (
            f"\nTracker at cluster scale ({tracker['date']}, `python -m benchmarks.tracker_load`): "
            f"a `swarm tracker` process, UDP announces of a {tracker['pieces']}-piece artifact "
            f"({tracker['window']} in flight, the generator on the same cores):\n\n"
            "| peers | announces/s | p50 | p99 | tracker CPU per announce | tracker RSS |\n"
            "| ---: | ---: | ---: | ---: | ---: | ---: |\n"
        )
        for run in tracker["runs"]:
            out += (
                f"| {run['peers']} | {run['announces_per_s']:,.0f} | {run['p50_ms']:.1f} ms "
                f"| {run['p99_ms']:.1f} ms | {run['tracker_cpu_us_per_announce']:.0f} µs "
                f"| {run['tracker_rss_mib']:.0f} MiB |\n"
            )
        before = {r["peers"]: r for r in tracker.get("before", [])}
        if before:
            out += (
                "\nBefore the announce path was made flat (same machine, minutes earlier): "
                + "; ".join(
                    f"{p} peers {r['announces_per_s']:,.0f}/s, p99 {r['p99_ms']:.0f} ms"
                    for p, r in sorted(before.items())
                )
                + ".\n"
            )
    if rollout is not None:
        modes = {r["mode"]: r for r in rollout["runs"]}
        out += (
            f"\nStaged rollout ({rollout['date']}, `python -m benchmarks.staged_rollout`): "
            f"{format_size(rollout['model_bytes'])}, a burst of {rollout['burst']} replicas, "
            f"then {rollout['late']} more one at a time {rollout['gap_seconds']:g} s apart; "
            "origin bytes ÷ F, in all and for the late replicas: plain `swarm fetch` "
            f"{modes['plain']['origin_over_model']:.2f} ({modes['plain']['late_origin_over_model']:.2f}), "
            f"node agents {modes['agents']['origin_over_model']:.2f} "
            f"({modes['agents']['late_origin_over_model']:.2f}).\n"
        )
    return out


def render_other(
    origin_read: dict[str, Any] | None,
    loopback: dict[str, Any] | None,
    sim_speed: dict[str, Any] | None = None,
) -> str:
    """Markdown for the origin-read, loopback-swarm and simulator-speed benchmarks
    (not run by ``make bench``)."""
    out = ""
    if origin_read is not None:
        r = origin_read
        out += (
            f"\nOrigin read ({r['date']}, `python -m benchmarks.origin_read`): one "
            f"{format_size(r['object_bytes'])} object from `rclone serve s3` on loopback. "
            f"`RangedReader` {r['reader']['best_mb_s']:.0f} MB/s (median "
            f"{r['reader']['median_mb_s']:.0f}), boto3 `download_file` "
            f"{r['boto3_download_file']['best_mb_s']:.0f} MB/s (median "
            f"{r['boto3_download_file']['median_mb_s']:.0f}); ratio {r['ratio_best']:.2f} "
            f"(median {r['ratio_median']:.2f}).\n"
        )
    if loopback is not None:
        r = loopback
        out += (
            f"\nLoopback swarm ({r['date']}, `python -m benchmarks.swarm_loopback`): `swarm demo` "
            f"with a {format_size(r['model_bytes'])} model in {format_size(r['piece_size'])} "
            "pieces, every peer on this 2-core machine (so the aggregate rate is the data "
            "path's CPU cost, not a network's):\n\n"
            "| peers | seconds | origin bytes ÷ F | aggregate MB/s | verified |\n"
            "| ---: | ---: | ---: | ---: | --- |\n"
        )
        for run in r["runs"]:
            out += (
                f"| {run['peers']} | {run['seconds']:.1f} | {run['origin_ratio']:.3f} "
                f"| {run['aggregate_mb_per_s']:.0f} | {'yes' if run['verified'] else 'NO'} |\n"
            )
    if sim_speed is not None:
        # Since 2026-12-03 the figures of this checkout are under "after" (and an
        # earlier revision's, with --before, under "before").
        r = {**sim_speed, **sim_speed.get("after", {})}
        compiled = r["compiled"]
        out += (
            f"\nSimulator speed ({r['date']}, `python -m benchmarks.sim_speed`): "
            f"`{r['scenario']}` `{r['variant']}`, {r['strategy']}, {r['nodes']} nodes × "
            f"{format_size(r['model_bytes'])} in {format_size(r['piece_bytes'])} pieces "
            f"({compiled['events']:,} events): compiled (`--native`) "
            f"{compiled['wall_seconds']:.0f} s"
        )
        walls = r.get("compiled_walls") or []
        if len(walls) > 1:
            out += f" (median of {len(walls)}: {', '.join(f'{w:.0f}' for w in walls)} s)"
        interpreted = r.get("interpreted")
        if interpreted is not None:
            out += (
                f", interpreted {interpreted['wall_seconds']:.0f} s (ratio "
                f"{r['speedup']:.2f}, same result: {'yes' if r['same_result'] else 'NO'})"
            )
        before = r.get("before")
        if before is not None:
            out += (
                f"; {r['before_revision']} in the same run: compiled "
                f"{before['compiled']['wall_seconds']:.0f} s (after ÷ before "
                f"{r['after_over_before']['compiled']:.2f})"
            )
        out += f"; target {r.get('target_wall_seconds', 60)} s.\n"
    return out


def _mbit(bps: float) -> str:
    return f"{bps / 1e9:g} Gbit/s" if bps >= 1e9 else f"{bps / 1e6:g} Mbit/s"


def render_table(scenarios: Sequence[dict[str, Any]], plane: dict[str, Any] | None) -> str:
    """Markdown for the README: one row per scenario and system, then the data plane."""
    lines = [
        "| scenario | nodes | artifact (piece) | node link / origin | T_min | system "
        "| p50 | max | max ÷ T_min | origin bytes ÷ F |",
        "| --- | ---: | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for result in scenarios:
        systems = result["systems"]
        order = [s for s in SYSTEM_ORDER if s in systems] + sorted(
            s for s in systems if s not in SYSTEM_ORDER
        )
        first = True
        for system in order:
            entry = systems[system]
            if first:
                piece = f" ({format_size(result['piece_size'])})" if "piece_size" in result else ""
                links = (
                    f"{_mbit(result['node_link_bps'])} / {_mbit(result['origin_link_bps'])}"
                    if "node_link_bps" in result and "origin_link_bps" in result
                    else ""
                )
                slow = [b for b in result.get("node_links_bps", ()) if b != result["node_link_bps"]]
                if slow:
                    links = links.replace(" / ", f" ({len(slow)} at {_mbit(min(slow))}) / ", 1)
                head = (
                    f"| {result['scenario']} ({result.get('date', '?')}) | {result['nodes']} "
                    f"| {format_size(result['model_bytes'])}{piece} | {links} "
                    f"| {result['lower_bound_seconds']:.1f} s "
                )
                first = False
            else:
                head = "| | | | | "
            if "error" in entry:
                lines.append(f"{head}| {system} | failed: {entry['error'][:80]} | | | |")
                continue
            origin_ratio = entry["origin_bytes"] / result["model_bytes"]
            # Unequal links: T_min is the slow nodes' bound; each node's own bound
            # is what tells whether the fast ones were held back.
            own = (
                f" (each node ÷ own bound: max {entry['own_bound_ratio_max']:.2f})"
                if "own_bound_ratio_max" in entry
                else ""
            )
            lines.append(
                f"{head}| {system} | {entry['p50_seconds']:.1f} s | {entry['max_seconds']:.1f} s "
                f"| {entry['ratio_to_bound']:.2f}{own} | {origin_ratio:.2f} |"
            )
    out = "\n".join(lines) + "\n"
    if len(lines) == 2:
        out = "No shaped scenario results yet (`make bench` as root).\n"
    if plane is not None and isinstance(plane.get("swarm"), list) and "floor" in plane:
        out += render_dataplane(plane)
    elif plane is not None:
        out += (
            f"\nData plane ({plane.get('date', '?')}): one peer serves "
            f"{format_size(plane['model_bytes'])} to another over loopback, verified and written "
            f"to disk, at {plane['swarm_mbps']:.0f} MB/s; raw-socket baseline "
            f"{plane['raw_socket_mbps']:.0f} MB/s; ratio {plane['ratio']:.2f}."
        )
        if "disk_write_mbps" in plane:
            out += (
                f" Writing the same bytes to a new file on this disk, alone: "
                f"{plane['disk_write_mbps']:.0f} MB/s (ratio {plane['ratio_to_disk_write']:.2f})."
            )
        out += "\n"
    out += (
        "\nTimes run from the launch of every node's process to its verified copy; origin bytes "
        "are the origin interface's transmit counter. Raw figures: `benchmarks/results/`.\n"
    )
    return out


def _maybe(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def render_dataplane(plane: dict[str, Any]) -> str:
    """The data-plane result of ``benchmarks.dataplane`` (floor, swarm runs) as a table."""
    floor = plane["floor"]
    lines = [
        f"\nData plane ({plane.get('date', '?')}, `python -m benchmarks.dataplane`, "
        f"{plane.get('rounds', 1)} round(s), medians): one peer serves "
        f"{format_size(plane['model_bytes'])} to another over loopback through a real tracker, "
        "each block checked and written to disk. The floor: a receiver doing recv_into a "
        "reused 4 MiB buffer, blake3, O_DIRECT pwrite, at "
        f"{floor['mbps']:.0f} MB/s and {floor['cpu_s_per_gib_received']:.2f} CPU-s per GiB "
        "received, same run.",
        "",
        "| piece size | workers | MB/s | ÷ floor | CPU-s/GiB received | ÷ floor | "
        "of it, the event loop | CPU-s/GiB served | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in plane["swarm"]:
        ratios = run.get("ratios", {})
        lines.append(
            f"| {format_size(run['piece_size'])} | {run.get('workers') or 1} "
            f"| {run['mbps']:.0f} | {ratios.get('throughput', 0):.2f} "
            f"| {run['cpu_s_per_gib_received']:.2f} | {ratios.get('cpu', 0):.2f} "
            f"| {_maybe(run.get('loop_cpu_s_per_gib_received'))} "
            f"| {run['cpu_s_per_gib_served']:.2f} | {run['peak_rss_mib']:.0f} MiB |"
        )
    return "\n".join(lines) + "\n"


def replace_marked(text: str, block: str) -> str | None:
    """``text`` with everything between the bench markers replaced by ``block``;
    None if the markers are missing or out of order."""
    start = text.find(START_MARKER)
    end = text.find(END_MARKER, start + len(START_MARKER)) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    body = block if block.endswith("\n") else block + "\n"
    return text[: start + len(START_MARKER)] + "\n" + body + text[end:]


def update_readme(readme: Path, table: str) -> bool:
    """Write ``table`` between the markers of ``readme``; False (untouched) if it has none."""
    try:
        text = readme.read_text()
    except FileNotFoundError:
        return False
    new = replace_marked(text, table)
    if new is None:
        return False
    if new != text:
        readme.write_text(new)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all")
    parser.add_argument("--scenarios", default=",".join(shaped.SCENARIOS), help="comma-separated")
    parser.add_argument("--systems", default=",".join(shaped.SYSTEMS), help="comma-separated")
    parser.add_argument("--skip-shaped", action="store_true")
    parser.add_argument("--skip-dataplane", action="store_true")
    parser.add_argument(
        "--skip-operable", action="store_true", help="skip the rate-cap and zones runs"
    )
    parser.add_argument("--table-only", action="store_true", help="only refresh the table")
    parser.add_argument("--results-dir", type=Path, default=shaped.RESULTS_DIR)
    parser.add_argument("--readme", type=Path, default=shaped.REPO_ROOT / "README.md")
    parser.add_argument(
        "--print-only", action="store_true", help="print the table, don't edit README"
    )
    parser.add_argument(
        "--idle-wait", type=float, default=300.0, help="seconds to wait for an idle host per system"
    )
    args = parser.parse_args(argv)
    shaped.exit_on_sigterm()

    failures = 0
    if not args.table_only and not args.skip_shaped:
        try:
            require_root()
        except TestbedUnavailableError as exc:
            print(f"skipping the shaped scenarios: {exc}", file=sys.stderr)
        else:
            options = shaped.RunOptions(
                systems=tuple(s for s in args.systems.split(",") if s), idle_wait=args.idle_wait
            )
            for name in (s for s in args.scenarios.split(",") if s):
                try:
                    _, path = shaped.run_scenario(
                        name, options=options, results_dir=args.results_dir
                    )
                    print(f"wrote {path}", file=sys.stderr)
                except BenchmarkError as exc:
                    failures += 1
                    print(f"scenario {name} failed: {exc}", file=sys.stderr)
            if not args.skip_operable:
                # Issue 17's byte-rate caps and zone preference, on the same testbed.
                try:
                    _, path = rate_cap.run_rate_cap(options=options, results_dir=args.results_dir)
                    print(f"wrote {path}", file=sys.stderr)
                except BenchmarkError as exc:
                    failures += 1
                    print(f"rate-cap failed: {exc}", file=sys.stderr)
                for oversubscription in (None, 4):
                    try:
                        _, path = shaped.run_zones(
                            options=options,
                            oversubscription=oversubscription,
                            results_dir=args.results_dir,
                        )
                        print(f"wrote {path}", file=sys.stderr)
                    except BenchmarkError as exc:
                        failures += 1
                        print(f"zones failed: {exc}", file=sys.stderr)
    if not args.table_only and not args.skip_dataplane:
        try:
            result = dataplane.run()
            path = args.results_dir / f"dataplane-{result['date']}.json"
            shaped.write_result(path, result)
            print(f"wrote {path}", file=sys.stderr)
        except BenchmarkError as exc:
            failures += 1
            print(f"data-plane benchmark failed: {exc}", file=sys.stderr)

    table = (
        render_table(*latest_results(args.results_dir))
        + render_other(
            newest_result(args.results_dir, "origin-read"),
            newest_result(args.results_dir, "swarm-loopback"),
            newest_result(args.results_dir, "sim-speed"),
        )
        + render_cluster(
            newest_result(args.results_dir, "tracker-load"),
            newest_result(args.results_dir, "staged-rollout"),
        )
    )
    if not args.print_only and update_readme(args.readme, table):
        print(f"updated the benchmark table in {args.readme}", file=sys.stderr)
    else:
        if not args.print_only:
            print(f"{args.readme} has no {START_MARKER} / {END_MARKER} markers", file=sys.stderr)
        print(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
