"""Placement decisions per second on a large farm: 1,000 nodes, with 100,000 and with 1,000 jobs pending.

Two measurements per queue length:
- `index`: one decision is `NodeIndex.pick` (filter -> score -> best fit, as placement.pick) plus the commit
  that adds the job to the chosen node's backlog.
- `round`: the live scheduler's whole planning round over the queue: fair order (FairShare.order over 8
  teams and 3 priorities), then `plan_dispatch` with coalescing (up to 8 images) and an ETA for every job;
  its rate is jobs planned per second.

Planning's verdicts are cached per (model, size, batch, card), so the first pass over the job mix is timed
separately as the warm-up. The time per decision should not grow with the queue: a decision looks at the
node kinds, never at the other pending jobs.

    python bench/placement_speed.py [--json] [--nodes 1000]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from renderfarm.planning.devices import device_from_spec
from renderfarm.planning.fit import JobShape, NodeView
from renderfarm.scheduler.fairness import FairShare, Queued
from renderfarm.scheduler.placement import NodeIndex, PendingJob, plan_dispatch

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


def round_rate(nodes: int, pending: int, seed: int = 1) -> dict[str, float]:
    """The scheduler's full round (fair order + plan_dispatch) over `pending` jobs on `nodes` nodes."""
    rng = random.Random(seed)
    shapes = make_jobs(pending, rng)
    views = [
        NodeView(f"node-{i:04}", rng.choice(CARDS), frozenset({rng.choice(MODELS)[0]}), rng.uniform(0, 600),
                 rng.choice([0, 1, 2]))
        for i in range(nodes)
    ]
    now = time.time()
    queued = [Queued(f"j{i}", f"team-{i % 8}", rng.choice([0, 0, 5]), now - rng.uniform(0, 3600),
                     s.num_images * s.width * s.height * s.steps / 1e6) for i, s in enumerate(shapes)]
    by_id = {q.id: s for q, s in zip(queued, shapes)}

    def one_round():
        start = time.perf_counter()
        order = FairShare(aging_s=600).order(queued, now)
        ordered_s = time.perf_counter() - start
        pending_jobs = [
            PendingJob(q.id, s.model, (s.model, s.width, s.height, s.steps), s.num_images, s.width, s.height,
                       s.steps)
            for q in order if (s := by_id[q.id])
        ]
        plan = plan_dispatch(pending_jobs, views, 8)
        return plan, ordered_s, time.perf_counter() - start

    _, _, warmup = one_round()  # fills planning's cache, as the scheduler's earlier rounds do
    plan, ordered_s, elapsed = one_round()
    decisions = len({(e.node, e.finish_s) for e in plan.etas.values()})  # one per batch planned
    return {
        "nodes": nodes, "pending": pending, "assigned_batches": len(plan.assignments), "with_eta": len(plan.etas),
        "decisions": decisions, "decisions_per_s": round(decisions / elapsed),
        "seconds": round(elapsed, 3), "order_s": round(ordered_s, 3), "jobs_per_s": round(pending / elapsed),
        "us_per_job": round(elapsed / pending * 1e6, 1), "warmup_s": round(warmup, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--nodes", type=int, default=1000)
    args = parser.parse_args()
    runs = [decisions_per_second(args.nodes, pending) for pending in (100_000, 1_000)]
    rounds = [round_rate(args.nodes, pending) for pending in (100_000, 1_000)]
    if args.json:
        print(json.dumps({"runs": runs, "rounds": rounds, "target_decisions_per_s": 10_000}))
        return
    for r in runs:
        print(f"index  {r['nodes']} nodes, {r['pending']:>7} pending: {r['decisions_per_s']:>8} decisions/s "
              f"({r['us_per_decision']} us each; placed {r['placed']}; cache warm-up {r['warmup_s']} s)")
    for r in rounds:
        print(f"round  {r['nodes']} nodes, {r['pending']:>7} pending: {r['jobs_per_s']:>8} jobs/s, "
              f"{r['decisions_per_s']} decisions/s ({r['decisions']} batches planned, {r['assigned_batches']} sent, "
              f"{r['with_eta']} ETAs; "
              f"fair order {r['order_s']} s; cache warm-up round {r['warmup_s']} s)")


if __name__ == "__main__":
    main()
