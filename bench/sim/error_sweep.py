"""The simulator's policies as the prediction error grows: makespan, median and p95 wait side by side.

For each error spread (the truth drawn around the prediction: scheduler/simulate.py) and each seed, every
policy runs the same trace on the same cluster with the same true durations; the table shows the median
over seeds of each figure, and its range. Beside the waits it shows why they differ:
- `overtakes`: the share of job pairs that started in the opposite order to their submits (0: strict FIFO);
- `wait big / small`: the median wait of the jobs that fit only the big cards, and of the rest.

    python bench/sim/error_sweep.py [--json] [--errors 0,0.1,0.3,0.5] [--seeds 5] [--dist uniform]
        [--trace renderfarm/configs/sim/trace.jsonl] [--cluster renderfarm/configs/sim/cluster.yaml]

Deterministic (seeded), no clocks: the figures are the same on every machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
from bisect import bisect_right, insort

from renderfarm.planning.fit import NodeView, why_nothing_fits
from renderfarm.scheduler.simulate import (
    POLICIES,
    PredictionError,
    _fit,
    _percentile,
    load_cluster,
    load_trace,
    lower_bound,
    run_policy,
)


def overtakes(jobs, starts) -> float:
    """The share of job pairs (a submitted before b) where b started first."""
    ordered = sorted(jobs, key=lambda j: (j.submit_s, j.index))
    seen: list[float] = []
    inverted = pairs = 0
    for job in ordered:  # count earlier-submitted jobs that started after this one
        start = starts[job.index][0]
        inverted += len(seen) - bisect_right(seen, start)
        pairs += len(seen)
        insort(seen, start)
    return inverted / pairs if pairs else 0.0


def sweep(errors: list[float], seeds: int, dist: str, trace: str | None, cluster: str | None) -> dict:
    nodes, jobs = load_cluster(cluster), load_trace(trace)
    views = [NodeView(n.name, n.device) for n in nodes]
    jobs = [j for j in jobs if why_nothing_fits(j.shape, views) is None]
    small_cards = [n for n in nodes if n.device.vram_gib < max(m.device.vram_gib for m in nodes)]
    big_only = {j.index for j in jobs if not any(_fit(j, n.device).fits for n in small_cards)}
    start = min(j.submit_s for j in jobs)
    rows = []
    for spread in errors:
        per_policy: dict[str, list[dict]] = {p: [] for p in POLICIES}
        bounds = []
        for seed in range(seeds):
            error = PredictionError(spread, dist, seed)
            bounds.append(max(v - start if k == "last_arrival_s" else v
                              for k, v in lower_bound(nodes, jobs, error.factors(jobs)).items()))
            for policy in POLICIES:
                stats = run_policy(nodes, jobs, policy, error)
                waits = {j.index: stats.starts[j.index][0] - j.submit_s for j in jobs}
                per_policy[policy].append({
                    "makespan_s": stats.makespan_s - start,
                    "p50_wait_s": _percentile(list(waits.values()), 50),
                    "p95_wait_s": _percentile(list(waits.values()), 95),
                    "overtakes": overtakes(jobs, stats.starts),
                    "p50_wait_big_only_s": _percentile([w for i, w in waits.items() if i in big_only], 50),
                    "p50_wait_rest_s": _percentile([w for i, w in waits.items() if i not in big_only], 50),
                })
            if spread == 0:
                break  # no randomness: one seed says it all
        for policy, runs in per_policy.items():
            row = {"error": spread, "policy": policy, "seeds": len(runs),
                   "lower_bound_s": round(statistics.median(bounds), 1)}
            for key in runs[0]:
                values = [r[key] for r in runs]
                digits = 3 if key == "overtakes" else 1
                row[key] = round(statistics.median(values), digits)
                row[key + "_range"] = [round(min(values), digits), round(max(values), digits)]
            rows.append(row)
    return {"jobs": len(jobs), "nodes": len(nodes), "big_only_jobs": len(big_only), "distribution": dist,
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--errors", default="0,0.1,0.3,0.5", help="error spreads, comma-separated")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per spread (median and range over them)")
    parser.add_argument("--dist", choices=("uniform", "lognormal"), default="uniform")
    parser.add_argument("--trace")
    parser.add_argument("--cluster")
    args = parser.parse_args()
    try:
        errors = [float(e) for e in args.errors.split(",")]
    except ValueError:
        parser.error(f"--errors {args.errors!r}: expected numbers separated by commas")
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: must be at least 1")
    report = sweep(errors, args.seeds, args.dist, args.trace, args.cluster)
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['jobs']} jobs on {report['nodes']} nodes ({report['big_only_jobs']} fit only the big cards); "
          f"error {args.dist}; median over seeds [min-max]")
    print(f"{'error':>5} {'policy':<16} {'makespan s':>18} {'x bound':>7} {'p50 wait s':>18} {'p95 wait s':>18} "
          f"{'overtakes':>9} {'p50 wait big/rest s':>20}")
    for r in report["rows"]:
        def cell(key):
            low, high = r[key + "_range"]
            return f"{r[key]:.0f} [{low:.0f}-{high:.0f}]" if r["seeds"] > 1 else f"{r[key]:.0f}"
        print(f"{r['error']:5.2f} {r['policy']:<16} {cell('makespan_s'):>18} "
              f"{r['makespan_s'] / r['lower_bound_s']:7.2f} {cell('p50_wait_s'):>18} {cell('p95_wait_s'):>18} "
              f"{r['overtakes']:9.1%} {r['p50_wait_big_only_s']:>9.0f}/{r['p50_wait_rest_s']:<9.0f}")


if __name__ == "__main__":
    main()
