"""bench/placement_speed.py's live rounds read the dispatch window as dispatch.py does, and
bench/sim/error_sweep.py's overtake share counts inversions of the start order (pure parts, no timing)."""

from __future__ import annotations

import random
import sys
import time

from renderfarm.planning.fit import JobShape
from renderfarm.scheduler.simulate import TraceJob
from tests.bench import BENCH, bench_module

placement_speed = bench_module("placement_speed")
PENDING_WINDOW, PER_QUEUE = placement_speed.PENDING_WINDOW, placement_speed.PER_QUEUE  # the scheduler's
sys.path.insert(0, str(BENCH / "sim"))
try:
    error_sweep = __import__("error_sweep")
finally:
    sys.path.remove(str(BENCH / "sim"))


def test_live_window_is_the_queue_head_plus_every_queue_oldest():
    window, by_id = placement_speed.live_window(20_000, random.Random(3), time.time())
    ids = [q.id for q in window]
    assert len(ids) == len(set(ids)) == len(by_id)
    head = window[:PENDING_WINDOW]
    assert [(-q.priority, q.created_at) for q in head] == sorted((-q.priority, q.created_at) for q in head)
    queues = {}
    for q in window:
        queues.setdefault((q.team, q.priority), []).append(q)
    assert len(queues) == placement_speed.TEAMS * len(placement_speed.PRIORITIES)
    assert all(len(members) >= PER_QUEUE for members in queues.values())
    assert PENDING_WINDOW < len(window) <= PENDING_WINDOW + PER_QUEUE * len(queues)


def test_live_rounds_report_each_round_beside_the_goal():
    rows = placement_speed.live_rounds([8], repeats=1)
    assert [r["round"] for r in rows] == ["event", "event-whole", "startup", "eta"]
    event, whole, startup, eta = rows
    assert event["sent"] == whole["sent"] == 1 and startup["sent"] == 16 and eta["sent"] == 0  # the free slots
    assert event["fair_order_ms"] > 0 and whole["fair_order_ms"] > 0
    assert eta["jobs_with_eta"] == eta["window"]
    for r in rows:
        assert r["decisions"] >= r["sent"] and r["round_ms"] > 0
        assert r["goal_decisions_per_s"] == 10_000 and r["meets_goal"] == (r["decisions_per_s"] >= 10_000)


def test_overtakes_counts_pairs_started_against_submit_order():
    jobs = [TraceJob(i, float(i), JobShape("sd15", 512, 512, 20)) for i in range(5)]
    in_order = {j.index: (10.0 + j.index, "n") for j in jobs}
    reversed_ = {j.index: (10.0 - j.index, "n") for j in jobs}
    assert error_sweep.overtakes(jobs, in_order) == 0.0
    assert error_sweep.overtakes(jobs, reversed_) == 1.0
    one_swap = {**in_order, 3: (14.5, "n"), 4: (14.0, "n")}
    assert error_sweep.overtakes(jobs, one_swap) == 1 / 10
