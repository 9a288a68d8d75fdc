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

Neither is what a live round costs: the scheduler never plans 100,000 jobs at once. `live` measures what
one of its rounds plans (scheduler/dispatch.py, its window read by scheduler/queue_view.py): the window (the first PENDING_WINDOW jobs by priority and
submit time, plus the PER_QUEUE oldest of every (team, priority) queue, deduplicated) read from a 100,000-job
backlog of 8 teams x 3 priorities, fair-ordered, then `plan_dispatch` over 8 to 1,000 nodes (max batch 8),
in the three rounds the scheduler runs:
- `event`: a batch finished, so one node has one free slot and the shortest backlog (every other node is
  full): the cheap round (full=False), which walks the window until no slot is left (the jobs it meets
  first may prefer full nodes: each is a decision committed to that node's backlog);
- `startup`: every node has its whole queue depth free (2 batches): the cheap round fills them all;
- `eta`: the full round every eta_seconds: every job of the window gets a node and an ETA.
A decision is one batch planned (a node chosen for a head job and its coalesced followers), sent now or
committed to a full node's backlog; `sent` counts the batches sent. Each round is
timed whole (fair order included, Redis reads not), repeated, median and min-max shown. The goal is
>= 10,000 decisions/s. The event round makes one decision after ordering the whole window: its rate is the
honest cost of a round where little changes.

    python bench/placement_speed.py [--json] [--nodes 1000] [--live-nodes 8,64,256,1000] [--repeats 5]
    python bench/placement_speed.py --live-only      # just the live rounds (seconds)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from renderfarm.planning.devices import device_from_spec
from renderfarm.planning.fit import JobShape, NodeView
from renderfarm.scheduler.dispatch import cheap_round_depth
from renderfarm.scheduler.fairness import FairShare, Queued
from renderfarm.scheduler.placement import NodeIndex, PendingJob, plan_dispatch
from renderfarm.scheduler.queue_view import PENDING_WINDOW, PER_QUEUE

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


GOAL_DECISIONS_PER_S = 10_000
TEAMS, PRIORITIES, BACKLOG, QUEUE_DEPTH, MAX_BATCH = 8, (0, 5, 10), 100_000, 2, 8


def live_window(backlog: int, rng: random.Random, now: float) -> tuple[list[Queued], dict[str, JobShape]]:
    """The jobs one live round reads: the head of the queue (priority, then submit time) and the oldest
    jobs of every (team, priority) queue, as DispatchManager.queued() reads them from Redis."""
    shapes = make_jobs(backlog, rng)
    queued = [Queued(f"j{i}", f"team-{rng.randrange(TEAMS)}", rng.choice(PRIORITIES), now - rng.uniform(0, 3600),
                     s.num_images * s.width * s.height * s.steps / 1e6) for i, s in enumerate(shapes)]
    by_order = sorted(queued, key=lambda q: (-q.priority, q.created_at))  # rf:pending's order
    queues: dict[tuple[str, int], list[Queued]] = {}
    for q in by_order:
        queues.setdefault((q.team, q.priority), []).append(q)
    heads = [q for queue in queues.values() for q in queue[:PER_QUEUE]]
    window = list({q.id: q for q in by_order[:PENDING_WINDOW] + heads}.values())
    by_id = {q.id: shapes[int(q.id[1:])] for q in window}
    return window, by_id


def live_rounds(node_counts: list[int], repeats: int, seed: int = 1) -> list[dict]:
    """What each of the scheduler's rounds costs over the real window, per node count (see the docstring)."""
    rng = random.Random(seed)
    now = time.time()
    window, by_id = live_window(BACKLOG, rng, now)
    out = []
    for count in node_counts:
        cards = [rng.choice(CARDS) for _ in range(count)]
        loaded = [frozenset({rng.choice(MODELS)[0]}) for _ in range(count)]
        backlogs = sorted((rng.uniform(0, 600) for _ in range(count)))  # node-0: the one whose batch just ended
        # The dispatcher's views of each job are made once per job and kept while it is queued.
        pending_of = {q.id: PendingJob(q.id, s.model, (s.model, s.width, s.height, s.steps), s.num_images, s.width,
                                       s.height, s.steps) for q in window if (s := by_id[q.id])}
        # "event-whole": the cheap round as it was before it planned from the head of the fair order only.
        for kind in ("event", "event-whole", "startup", "eta"):
            free = {"event": [1] + [0] * (count - 1), "event-whole": [1] + [0] * (count - 1),
                    "startup": [QUEUE_DEPTH] * count, "eta": [0] * count}[kind]
            views = [NodeView(f"node-{i:04}", cards[i], loaded[i], backlogs[i], free[i]) for i in range(count)]
            # What dispatch.DispatchManager.update asks of the fair order: the head in a cheap round.
            limit = None if kind in ("eta", "event-whole") else cheap_round_depth(sum(free), MAX_BATCH)

            def one_round(views=views, kind=kind, limit=limit):
                start = time.perf_counter()
                order = FairShare(aging_s=600).order(window, now, limit=limit)
                ordered = time.perf_counter()
                pending = [pending_of[q.id] for q in order]
                plan = plan_dispatch(pending, views, MAX_BATCH, full=kind == "eta")
                return plan, time.perf_counter() - start, ordered - start

            one_round()  # fills planning's cache, as the scheduler's earlier rounds do
            timings, order_times, plan = [], [], None
            for _ in range(repeats):
                plan, elapsed, ordering = one_round()
                timings.append(elapsed)
                order_times.append(ordering)
            # every batch the round planned, sent now or committed to a full node's backlog
            decisions = len({(e.node, e.start_s, e.finish_s) for e in plan.etas.values()})
            median = statistics.median(timings)
            out.append({
                "round": kind, "nodes": count, "window": len(window), "decisions": decisions,
                "sent": len(plan.assignments), "jobs_with_eta": len(plan.etas),
                "round_ms": round(median * 1e3, 2),
                "round_ms_range": [round(min(timings) * 1e3, 2), round(max(timings) * 1e3, 2)],
                "fair_order_ms": round(statistics.median(order_times) * 1e3, 2),
                "decisions_per_s": round(decisions / median), "goal_decisions_per_s": GOAL_DECISIONS_PER_S,
                "meets_goal": decisions / median >= GOAL_DECISIONS_PER_S,
            })
    return out


def print_live(rows: list[dict]) -> None:
    print(f"live rounds over the dispatch window ({rows[0]['window']} jobs: the first {PENDING_WINDOW} + "
          f"{PER_QUEUE} of each of {TEAMS}x{len(PRIORITIES)} queues, from a {BACKLOG:,}-job backlog); "
          f"median [min-max] of the rounds")
    print(f"  {'round':<8} {'nodes':>5} {'decisions':>9} {'sent':>5} {'round ms':>22} {'of it fair order':>16} {'decisions/s':>12}  goal")
    for r in rows:
        low, high = r["round_ms_range"]
        verdict = "ok" if r["meets_goal"] else "MISSED"
        print(f"  {r['round']:<8} {r['nodes']:>5} {r['decisions']:>9} {r['sent']:>5} {r['round_ms']:>9.2f} [{low:.2f}-{high:.2f}] "
              f"{r['fair_order_ms']:>16.2f} {r['decisions_per_s']:>12,}  >= {r['goal_decisions_per_s']:,}/s {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--live-nodes", default="8,64,256,1000", help="node counts of the live rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each live round")
    parser.add_argument("--live-only", action="store_true", help="only the live rounds")
    args = parser.parse_args()
    try:
        live_nodes = [int(n) for n in args.live_nodes.split(",")]
    except ValueError:
        parser.error(f"--live-nodes {args.live_nodes!r}: expected node counts separated by commas")
    if args.repeats < 1 or any(n < 1 for n in live_nodes):
        parser.error("--repeats and every --live-nodes count must be at least 1")
    live = live_rounds(live_nodes, args.repeats)
    runs = [] if args.live_only else [decisions_per_second(args.nodes, pending) for pending in (100_000, 1_000)]
    rounds = [] if args.live_only else [round_rate(args.nodes, pending) for pending in (100_000, 1_000)]
    if args.json:
        print(json.dumps({"live": live, "runs": runs, "rounds": rounds, "target_decisions_per_s": GOAL_DECISIONS_PER_S}))
        return
    print_live(live)
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
