"""Adapter switches per policy on the LoRA trace, why they happen, and how the count moves with a switch's cost.

Every policy runs renderfarm/configs/sim/trace_loras.jsonl (the shipped 500 jobs, a third of them carrying
one of ten LoRAs) on the shipped cluster (scheduler/simulate.py). Beside the switches it shows:
- `on load`: the switches on a pipeline loaded for the job (a node here holds one model: the load brought
  the switch, and only avoiding the load avoids it);
- `chances`: the LoRA jobs for which, when they were sent, some node that fits them would have their model
  with their set applied once its queue drains, and how many of them went to such a node (push policies).
`--switch-costs` reruns everything with placement's LORA_SWITCH_BASE_S / LORA_SWITCH_PER_LORA_S set to each
value (a what-if: the planner's guess and the simulated truth move together, since both are
placement.lora_switch_seconds).

    python bench/sim/lora_switches.py [--json] [--error 0.3] [--seed 0] [--switch-costs 0.5,5,15,50]

Deterministic (seeded), no clocks.
"""

from __future__ import annotations

import argparse
import json

from renderfarm.scheduler import placement
from renderfarm.scheduler.simulate import (
    DEFAULT_LORA_TRACE,
    POLICIES,
    PredictionError,
    _fit,
    _percentile,
    _Sim,
    load_cluster,
    load_trace,
)


class _Counting(_Sim):
    """The simulation, counting the chances to send a LoRA job where its set is applied."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.chances = self.taken = 0

    def _send(self, node, job):
        if job.shape.loras:
            ready = [n for n in self.nodes if n.tail_model == job.shape.model and n.tail_loras == job.shape.loras
                     and _fit(job, n.device).fits]
            self.chances += bool(ready)
            self.taken += node in ready
        super()._send(node, job)


def run(error: PredictionError, switch_cost: float | None) -> dict:
    saved = placement.LORA_SWITCH_BASE_S, placement.LORA_SWITCH_PER_LORA_S
    if switch_cost is not None:
        placement.LORA_SWITCH_BASE_S = placement.LORA_SWITCH_PER_LORA_S = switch_cost
    try:
        nodes, jobs = load_cluster(), load_trace(DEFAULT_LORA_TRACE)
        truth = error.factors(jobs)
        start = min(j.submit_s for j in jobs)
        out = {}
        for policy in POLICIES:
            sim = _Counting(nodes, jobs, policy, truth)
            stats = sim.run()
            out[policy] = {
                "lora_switches": stats.lora_switches, "on_load": stats.lora_switches_on_load,
                "chances": sim.chances, "taken": sim.taken, "model_loads": stats.model_loads,
                "makespan_s": round(stats.makespan_s - start, 1),
                "p50_wait_s": round(_percentile(stats.waits, 50), 1),
                "p95_wait_s": round(_percentile(stats.waits, 95), 1),
            }
        return out
    finally:
        placement.LORA_SWITCH_BASE_S, placement.LORA_SWITCH_PER_LORA_S = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--error", type=float, default=0.3)
    parser.add_argument("--error-dist", choices=("uniform", "lognormal"), default="uniform")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--switch-costs", default="",
                        help="comma-separated seconds for both the fixed and the per-LoRA part (default: as is)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    error = PredictionError(args.error, args.error_dist, args.seed)
    costs = [None] + [float(c) for c in args.switch_costs.split(",") if c]
    results = {("as is" if c is None else f"{c:g}+{c:g}/LoRA"): run(error, c) for c in costs}
    if args.json:
        print(json.dumps(results))
        return
    print(f"{DEFAULT_LORA_TRACE.name}; error {error.spread:g} {error.distribution}, seed {error.seed}; switch cost "
          f"as is: {placement.LORA_SWITCH_BASE_S:g} s + {placement.LORA_SWITCH_PER_LORA_S:g} s per LoRA changed")
    print(f"{'switch cost':<14} {'policy':<16} {'switches':>8} {'on load':>7} {'chances taken':>13} {'loads':>5} "
          f"{'makespan s':>10} {'p50 wait':>8} {'p95 wait':>8}")
    for cost, policies in results.items():
        for policy, r in policies.items():
            chances = f"{r['taken']}/{r['chances']}" if policy != "max-pixels-fifo" else "-"
            print(f"{cost:<14} {policy:<16} {r['lora_switches']:8d} {r['on_load']:7d} {chances:>13} "
                  f"{r['model_loads']:5d} {r['makespan_s']:10.0f} {r['p50_wait_s']:8.0f} {r['p95_wait_s']:8.0f}")


if __name__ == "__main__":
    main()
