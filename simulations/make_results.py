"""Regenerate ``simulations/RESULTS.md`` and ``simulations/plots/*.png``.

    .venv/bin/python -m simulations.make_results [--native] [SCENARIO[:VARIANT] ...]

Runs every strategy (:data:`STRATEGIES`) of every (scenario, variant) listed
in :data:`RUNS`, writes one
plot per scenario variant and the table. With arguments, only those entries
are run again; the table keeps the rows of the others as they are in
RESULTS.md. The 1000-replica fireworks runs dominate: each moves 4096
pieces to 1000 nodes (4.1 million piece transfers). Compiled, a swarm run
takes about half a minute (six interpreted) and a swarm-random run four to
five minutes (its random picks list the candidates far more often than the
rarest-first scan looks past a few), so the whole script takes about twenty
minutes with ``--native`` (the mypyc build of the same sources,
:mod:`simulations.native`) on a 2-core machine. The table says which engine
produced each row (see the speed section of RESULTS.md).

``direct`` and ``cache`` at 1000 replicas are simulated too (the origin link
is pooled, :mod:`simulations.network`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import simulations.native
from simulations.engine import Result
from simulations.runner import plot_results, run_strategy
from simulations.scenario import load_scenario

HERE = Path(__file__).parent

# Every strategy, for every (scenario, variant or "").
STRATEGIES = ("swarm", "swarm-random", "cache", "direct")
RUNS: list[tuple[str, str]] = [
    ("dragonfly-1200", ""),
    ("kraken-2600", ""),
    ("fireworks-kimi", "n100-o10"),
    ("fireworks-kimi", "n100-o25"),
    ("fireworks-kimi", "n100-o100"),
    ("fireworks-kimi", "n1000-o10"),
    ("fireworks-kimi", "n1000-o25"),
    ("fireworks-kimi", "n1000-o100"),
    ("fireworks-kimi", "n100-o100-cpu32"),
    ("fireworks-kimi", "n1000-o25-cpu32"),
    ("fireworks-kimi", "n1000-o100-cpu32"),
    ("faults", ""),
    ("faults", "no-faults"),
]
# Runs of fewer strategies: the CPU variants (a node's CPU caps it alike whatever
# fetches; the swarm is the one whose node also serves).
STRATEGIES_OF: dict[tuple[str, str], tuple[str, ...]] = {
    ("fireworks-kimi", variant): ("swarm",)
    for variant in ("n100-o100-cpu32", "n1000-o25-cpu32", "n1000-o100-cpu32")
}


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def _existing_rows(text: str) -> dict[tuple[str, str], list[str]]:
    """Rows of the current table, by (scenario, variant)."""
    rows: dict[tuple[str, str], list[str]] = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) > 3 and line.startswith("| ") and cells[1] not in ("scenario", "---"):
            variant = "" if cells[2] == "–" else cells[2]
            rows.setdefault((cells[1], variant), []).append(line)
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.make_results", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("runs", nargs="*", metavar="SCENARIO[:VARIANT]")
    parser.add_argument("--native", action="store_true", help="run the mypyc build")
    parser.add_argument("--out", type=Path, default=HERE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.native and not simulations.native.reexecuted():
        build = simulations.native.ensure_built(log=lambda line: print(line, file=sys.stderr))
        simulations.native.reexec(
            "simulations.make_results",
            ["--native", "--out", str(args.out.resolve()), *args.runs],
            build,
        )
    engine = "mypyc" if simulations.native.active() else "cpython"
    out: Path = args.out
    only = {tuple(arg.split(":", 1)) if ":" in arg else (arg, "") for arg in args.runs}
    existing = _existing_rows((out / "RESULTS.md").read_text())
    rows: list[str] = []
    for name, variant in RUNS:
        if only and (name, variant) not in only:
            rows.extend(existing.get((name, variant), []))
            continue
        scenario = load_scenario(name)
        if variant:
            scenario = scenario.select_variant(variant)
        results: list[Result] = []
        for strategy in STRATEGIES_OF.get((name, variant), STRATEGIES):
            print(f"{name} {variant} {strategy} …", file=sys.stderr, flush=True)
            result = run_strategy(scenario, strategy)
            results.append(result)
            s = result.summary()
            r, t = s["completion_ratio"], s["completion_seconds"]
            rows.append(
                f"| {name} | {variant or '–'} | {strategy} | {scenario.nodes} "
                f"| {_fmt(s['lower_bound_seconds'])} "
                f"| {_fmt(r['p50'])} | {_fmt(r['p99'])} | {_fmt(r['max'])} "
                f"| {_fmt(t['p50'])} / {_fmt(t['p99'])} / {_fmt(t['p999'])} "
                f"| {s['origin_ratio']:.3f} | {s['crashed']}/{s['incomplete']} "
                f"| {scenario.anchor or '–'} | {s['wall_seconds']:.1f} | {engine} |"
            )
            print(rows[-1], file=sys.stderr, flush=True)
        stem = f"{name}-{variant}" if variant else name
        plot_results(
            results, out / "plots" / f"{stem}.png", title=f"{stem}: {scenario.nodes} nodes"
        )
    table = "\n".join(
        [
            "| scenario | variant | strategy | N | T_min s | p50 ÷ T_min | p99 ÷ T_min | max ÷ T_min "
            "| ours p50 / p99 / p99.9 s | origin ÷ F | crashed/incomplete | anchor (published) "
            "| wall s | engine |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: "
            "| --- |",
            *rows,
        ]
    )
    template = (out / "RESULTS.md").read_text()
    start, end = "<!-- table:start -->", "<!-- table:end -->"
    head, _, rest = template.partition(start)
    _, _, tail = rest.partition(end)
    (out / "RESULTS.md").write_text(f"{head}{start}\n{table}\n{end}{tail}")


if __name__ == "__main__":
    main(sys.argv[1:])
