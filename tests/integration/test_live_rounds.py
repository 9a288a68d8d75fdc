"""The scheduler's cheap round plans from the head of the fair order only (dispatch.LIVE_WINDOW_*), and plans
the whole window when that head leaves a free slot unused: a real Scheduler on a real redis-server, its
workers actor handles with no Ray behind them."""

from __future__ import annotations

import pytest

from renderfarm.jobs import Job, JobSpec, JobState
from renderfarm.scheduler.dispatch import LIVE_WINDOW_MIN
from tests.integration.test_round_trips import _Handle

pytestmark = pytest.mark.integration


def test_a_head_that_only_busy_nodes_can_take_does_not_leave_a_free_node_idle(redis_url, store, tmp_path,
                                                                             models_file):
    from renderfarm.scheduler.scheduler import Scheduler

    small, big = _Handle(), _Handle()
    settings = {"data_dir": str(tmp_path), "models_file": str(models_file), "max_batch": 1, "eta_seconds": 3600,
                "heartbeat_seconds": 3600, "sample_seconds": 3600}
    sched = Scheduler(redis_url, settings, workers={
        "small": (small, {"vram_gib": 8, "card": None, "loaded": [], "forbid_models": ["tiny-sdxl"]}),
        "big": (big, {"vram_gib": 24, "card": None, "loaded": []}),
    })
    sdxl = JobSpec(model="tiny-sdxl", prompt="a castle", width=64, height=64, steps=2)
    sd15 = JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64, steps=2)
    n = LIVE_WINDOW_MIN + 40
    store.submit([Job(id=f"x{i:04d}", spec=sdxl, created_at=1000.0 + i) for i in range(n)], "big")
    store.submit([Job(id="fox", spec=sd15, created_at=5000.0)], "small")
    try:
        sched._dispatch()  # the first round plans the whole window (its ETAs are due): both nodes get work
        assert sched.workers["small"].inflight >= 1 and sched.workers["big"].inflight == 2
        assert store.state("fox") is JobState.LEASED and store.get("fox").node == "small"
        # Later rounds are cheap: the big node's slot frees, it takes the next of the head.
        sched.workers["big"].inflight -= 1
        before = big.sent[-1][0]
        sched._dispatch()
        assert big.sent[-1][0] != before
        # The small node's free slot made that round look at the whole window once, finding nothing for it...
        assert sched.counters["wide_rounds"] == 1
        sched.workers["big"].inflight -= 1
        sched._dispatch()  # ...and, with nothing new queued, the next cheap round does not look again
        assert sched.counters["wide_rounds"] == 1

        # Only the small node is free and the head holds nothing it may take: the round looks further.
        store.submit([Job(id="owl", spec=sd15, created_at=6000.0)], "small-2")
        sched.dispatcher.view.apply(sched.events.read(1))  # what the loop's wait does: reads the submit's event
        sched._dispatch()
        assert store.state("owl") is JobState.LEASED and store.get("owl").node == "small"
        assert sched.counters["wide_rounds"] == 2
    finally:
        sched.store.close()


def test_a_flood_of_arrivals_is_read_as_the_window_not_whole(store):
    from renderfarm.scheduler.queue_view import QueueView

    spec = JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64, steps=2)
    view = QueueView(store, full_every_s=3600, window=10, per_queue=5)
    cursor = store.events()
    assert view.queued(now=0.0) == [] and view.counters["full_reads"] == 1
    store.submit([Job(id=f"a{i:03d}", spec=spec, created_at=1000.0 + i) for i in range(5)], "few")
    view.apply(cursor.read())
    assert [j.id for j in view.queued(now=1.0)] == [f"a{i:03d}" for i in range(5)]
    assert view.counters == {"full_reads": 1, "arrivals_read": 5}, "a few arrivals: their records, no full read"
    store.submit([Job(id=f"b{i:03d}", spec=spec, created_at=2000.0 + i) for i in range(100)], "flood")
    view.apply(cursor.drain())
    jobs = view.queued(now=2.0)
    assert view.counters["full_reads"] == 2 and view.counters["arrivals_read"] == 5
    assert len(jobs) == 10 and [j.id for j in jobs][:5] == [f"a{i:03d}" for i in range(5)]
