"""Leases, reaping, late results, quarantine and scheduler recovery, in a real redis-server (no Ray: the
scheduler is driven by hand with no worker to call)."""

from __future__ import annotations

import json

import pytest

from renderfarm.errors import CorruptRecord
from renderfarm.jobs import Job, JobSpec, JobState
from tests.helpers import pngs_of, put_pngs

pytestmark = pytest.mark.integration


def put(store, job_id: str, **spec) -> str:
    store.submit([Job(id=job_id, spec=JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64, **spec))], "b")
    return job_id


def deadline(store, job_id: str, state: JobState) -> float:
    return store.redis.zscore(store.keys.index(state), job_id)


def server_now(store) -> float:
    sec, usec = store.redis.time()
    return sec + usec / 1e6


def test_a_lease_is_a_deadline_on_redis_clock_that_renewals_move(store):
    put(store, "j")
    assert store.lease("j", "n1", 30)
    assert abs(deadline(store, "j", JobState.LEASED) - (server_now(store) + 30)) < 1
    assert store.expired() == []
    assert store.renew(["j"], "n1", -1) == [True]  # a deadline one second ago, on Redis's clock: no sleeping
    assert store.expired() == ["j"]
    assert store.renew(["j"], "n1", 30) == [True]
    assert store.expired() == []
    assert store.renew(["j"], "n2", 30) == [False], "only the holder renews"
    # A live lease is not reaped even if a reaper read it as expired a moment earlier.
    assert not store.requeue("j", "reaped", node="n1", expired_only=True)
    assert store.state("j") is JobState.LEASED


def test_a_running_lease_never_outlives_the_time_limit(store):
    put(store, "j")
    assert store.lease("j", "n1", 30) and store.start("j", "n1", 30)
    assert store.renew(["j"], "n1", 30, timeout_seconds=-1) == [True]  # fixes the run deadline (already past)
    assert store.renew(["j"], "n1", 30, timeout_seconds=30) == [True]  # still its holder ...
    assert store.expired() == ["j"], "... but a renewal cannot push the lease past the run deadline"
    assert store.requeue("j", "reaped", node="n1", expired_only=True)
    assert store.get("j").state is JobState.QUEUED
    # The next attempt gets a fresh run deadline.
    assert store.lease("j", "n2", 30) and store.start("j", "n2", 30)
    assert store.renew(["j"], "n2", 30, timeout_seconds=60) == [True]
    assert deadline(store, "j", JobState.RUNNING) > server_now(store) + 20


def test_renew_reports_jobs_cancelled_under_the_holder(store):
    for j in ("a", "b"):
        put(store, j)
        assert store.lease(j, "n1", 30) and store.start(j, "n1", 30)
    store.cancel("a")
    assert store.renew(["a", "b"], "n1", 30) == [False, True]


def test_a_late_result_is_discarded_and_counted(store, tmp_path):
    put(store, "late")
    put(store, "gone")
    for j in ("late", "gone"):
        assert store.lease(j, "n1", 30) and store.start(j, "n1", 30)
    assert store.requeue("late", "lease expired", node="n1")  # reaped: n1 no longer holds it
    assert store.lease("late", "n2", 30) and store.start("late", "n2", 30)
    store.cancel("gone")
    assert not store.complete("late", "n1", put_pngs(tmp_path, "late", [b"png-from-n1"]), {}, None)
    assert not store.complete("gone", "n1", put_pngs(tmp_path, "gone", [b"png"]), {}, None)
    assert store.complete("late", "n2", put_pngs(tmp_path, "late", [b"png-from-n2"]), {}, None)
    assert not store.complete("late", "n2", put_pngs(tmp_path, "late", [b"again"]), {}, None), "completion happens once"
    assert pngs_of(store, "late") == [b"png-from-n2"]
    assert store.result_blobs("gone") is None
    counters = store.counters()
    assert counters["late_results"] == 2 and counters["results_after_cancel"] == 1


def make_scheduler(redis_url, tmp_path, models_file, workers=(), **settings):
    from renderfarm.scheduler.scheduler import Scheduler

    record = {"vram_gib": 8, "card": None, "state": "idle", "loaded": []}
    sched = Scheduler(
        redis_url,
        {"data_dir": str(tmp_path), "models_file": str(models_file), "heartbeat_seconds": 0.01, **settings},
        workers={name: (None, record) for name in workers},
    )
    for worker in sched.workers.values():  # no free slot: a round never calls a worker (there is no Ray)
        worker.inflight = sched.settings.worker_queue_depth
    return sched


def test_the_scheduler_reaps_expired_leases_and_fails_jobs_out_of_attempts(store, redis_url, tmp_path, models_file):
    put(store, "once")
    put(store, "last")
    store.register_node("n1", {"vram_gib": 8})
    sched = make_scheduler(redis_url, tmp_path, models_file, workers=["n1"], max_attempts=2, drain_after_failures=2)
    assert store.lease("once", "n1", -1) and store.start("once", "n1", -1)  # deadlines already past
    for _ in range(2):  # "last" uses both of its attempts (n1 started it: its lease was n1's to renew)
        assert store.lease("last", "n1", -1) and store.start("last", "n1", -1)
        sched._next_maintenance = 0
        sched._maintain()
    once, last = store.get("once"), store.get("last")
    assert once.state is JobState.QUEUED and "lease expired on node n1" in once.error
    assert last.state is JobState.FAILED and "(after 2 attempts)" in last.error
    assert sched.counters["leases_expired"] == 3 and store.counters()["leases_expired"] == 3
    # Its leases expired in a row: the node is suspect (no new work) and, at the limit, drained with why.
    worker = sched.workers["n1"]
    assert worker.suspect and worker.draining and sched.counters["auto_drained"] == 1
    node = store.nodes()[0]
    assert node["draining"] is True and "drained automatically after 2 failed batches" in node["drain_reason"]


def test_a_restarted_scheduler_recovers_from_redis(store, redis_url, tmp_path, models_file):
    for j in ("leased", "mine", "stranger"):
        put(store, j)
    assert store.lease("leased", "n1", 30)
    assert store.lease("mine", "n1", 30) and store.start("mine", "n1", 30)
    assert store.lease("stranger", "old-node", 30) and store.start("stranger", "old-node", 30)
    sched = make_scheduler(redis_url, tmp_path, models_file, workers=["n1"])
    # Leased and not started: back in the queue; the node will skip it when its queued call arrives.
    assert store.get("leased").state is JobState.QUEUED and not store.start("leased", "n1", 30)
    # Running on a node of this farm: left to it (it renews the lease), and that node counts as busy.
    assert store.get("mine").state is JobState.RUNNING and sched.workers["n1"].recovered == {"mine"}
    # Running on a node this farm does not know: back at once.
    assert store.get("stranger").state is JobState.QUEUED
    assert sched.counters["recovered"] == 2
    assert store.complete("mine", "n1", ["file:///results/mine-0.png"], {}, None)
    sched._next_maintenance = 0
    sched._maintain()
    assert sched.workers["n1"].recovered == set()


def test_malformed_records_are_quarantined_not_fatal(store, redis_url, tmp_path, models_file):
    put(store, "good")
    put(store, "bad")
    store.redis.hset(store.keys.job("bad"), "spec", "{not json")
    store.redis.zadd(store.keys.pending, {"orphan": 0})  # an index entry without a job record
    sched = make_scheduler(redis_url, tmp_path, models_file, workers=["n1"])
    jobs = sched._queued()
    assert [j.id for j in jobs] == ["good"]
    assert store.pending_ids() == ["good"]
    quarantined = store.quarantined()
    assert set(quarantined) == {"bad", "orphan"} and "does not parse" in quarantined["bad"]
    assert store.counters()["quarantined"] == 2
    with pytest.raises(CorruptRecord, match="quarantined"):
        store.get("bad")
    # The record is kept aside for a human, untouched.
    assert store.redis.hget(store.keys.quarantined("bad"), "spec") == b"{not json"
    assert json.loads(store.redis.hget(store.keys.quarantine, "bad"))["at"] > 0
    from renderfarm.client import FarmClient

    status = FarmClient(redis_url).status()
    assert set(status["quarantined"]) == {"bad", "orphan"} and status["counters"]["quarantined"] == 2
