"""Run strategies over a scenario, and draw what happened."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from simulations.engine import Result, Simulation
from simulations.scenario import Scenario
from simulations.strategies import make_strategy

__all__ = ["plot_results", "run_strategy"]


def run_strategy(scenario: Scenario, strategy: str) -> Result:
    """Simulate one strategy over ``scenario`` (same scenario and seed, same result)."""
    sim = Simulation(scenario, strategy)
    return sim.run(make_strategy(strategy, sim))


def plot_results(results: Sequence[Result], path: Path, title: str = "") -> None:
    """PNG: completion CDF per strategy; aggregate and origin throughput over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, rate) = plt.subplots(1, 2, figsize=(12, 4.5))
    if results:
        bound = results[0].lower_bound_seconds
        cdf.axvline(bound, color="grey", linestyle=":", label=f"T_min {bound:.3g} s")
    for result in results:
        done = result.completed()
        if not done:
            continue
        fractions = [(i + 1) / result.nodes for i in range(len(done))]
        (line,) = cdf.step(done, fractions, where="post", label=result.strategy)
        until = max(result.sim_seconds, 1e-9)
        times, total = result.total_series.rates(until)
        origin_times, origin = result.origin_series.rates(until)
        color = line.get_color()
        rate.plot(times, [8 * r / 1e9 for r in total], color=color, label=f"{result.strategy} all")
        rate.plot(
            origin_times,
            [8 * r / 1e9 for r in origin],
            color=color,
            linestyle="--",
            label=f"{result.strategy} origin",
        )
    cdf.set_xlabel("completion time (s)")
    cdf.set_ylabel("fraction of nodes done")
    cdf.set_xscale("log")
    cdf.grid(True, alpha=0.3)
    cdf.legend(fontsize="small")
    rate.set_xlabel("time (s)")
    rate.set_ylabel("throughput (Gbit/s)")
    rate.set_xscale("symlog", linthresh=max(1e-3, results[0].lower_bound_seconds) if results else 1)
    rate.set_yscale("symlog", linthresh=1.0)
    rate.grid(True, alpha=0.3)
    rate.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
