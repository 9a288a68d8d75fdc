"""Placement decisions per second on a large farm: 1,000 nodes, with 100,000 and with 1,000 jobs pending.

Each decision is `NodeIndex.pick` (filter -> score -> best fit, as placement.pick) plus the commit that adds
the job to the chosen node's backlog. Planning's verdicts are cached per (model, size, batch, card), so the
first pass over the job mix is timed separately as the warm-up. The time per decision should not grow with
the queue: a decision looks at the node kinds, never at the other pending jobs.

    python bench/placement_speed.py [--json] [--nodes 1000]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from renderfarm.planning.devices import device_from_spec
from renderfarm.scheduler.placement import JobShape, NodeIndex, NodeView

CARDS = [
    device_from_spec("Quadro RTX 6000", 24, "7.5"),
    device_from_spec("GeForce RTX 3090", 24, "8.6"),
    device_from_spec("GeForce RTX 3070", 8, "8.6"),
    device_from_spec("GeForce RTX 4060", 8, "8.9"),
    device_from_spec("GeForce RTX 4090", 24, "8.9"),
    device_from_spec("NVIDIA L40S", 48, "8.9"),
]
MODELS = [("flux-dev", 28), ("flux-schnell", 4), ("sdxl", 30), ("sd15", 25)]
SIZES = [512, 768, 1024, 1536, 2048]


def make_jobs(count: int, rng: random.Random) -> list[JobShape]:
    jobs = []
    for _ in range(count):
        model, steps = rng.choice(MODELS)
        jobs.append(JobShape(model, rng.choice(SIZES), rng.choice(SIZES), steps, rng.choice([1, 2, 4])))
    return jobs


def make_index(nodes: int, rng: random.Random) -> NodeIndex:
    return NodeIndex([
        NodeView(f"node-{i:04}", rng.choice(CARDS), frozenset({rng.choice(MODELS)[0]}), rng.uniform(0, 600))
        for i in range(nodes)
    ])


def decisions_per_second(nodes: int, pending: int, seed: int = 1) -> dict[str, float]:
    rng = random.Random(seed)
    jobs = make_jobs(pending, rng)
    index = make_index(nodes, rng)
    start = time.perf_counter()
    warm = NodeIndex([NodeView(f"warm-{i}", card) for i, card in enumerate(CARDS)])
    for job in set(jobs):  # fill planning's cache: one verdict per (model, size, batch, card)
        warm.pick(job)
    warmup = time.perf_counter() - start
    start = time.perf_counter()
    placed = 0
    for job in jobs:
        decision = index.pick(job)
        if decision is not None:
            index.commit(job, decision)
            placed += 1
    elapsed = time.perf_counter() - start
    return {
        "nodes": nodes, "pending": pending, "placed": placed, "seconds": round(elapsed, 3),
        "decisions_per_s": round(pending / elapsed), "us_per_decision": round(elapsed / pending * 1e6, 1),
        "warmup_s": round(warmup, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--nodes", type=int, default=1000)
    args = parser.parse_args()
    runs = [decisions_per_second(args.nodes, pending) for pending in (100_000, 1_000)]
    if args.json:
        print(json.dumps({"runs": runs, "target_decisions_per_s": 10_000}))
        return
    for r in runs:
        print(f"{r['nodes']} nodes, {r['pending']:>7} pending: {r['decisions_per_s']:>8} decisions/s "
              f"({r['us_per_decision']} us each; placed {r['placed']}; cache warm-up {r['warmup_s']} s)")


if __name__ == "__main__":
    main()
