"""Whose fault an expired lease is, on a real redis-server (no Ray: the scheduler is driven by hand, the batch
it "sent" is a plain object): a hung batch is one node fault however many jobs it held, auto-drain needs
node faults in a row and names them, and a lease that expired while Redis was unreachable blames nobody."""

from __future__ import annotations

import time

import pytest

from renderfarm.cluster.redis_server import connect
from renderfarm.jobs import Job, JobSpec, JobState

pytestmark = pytest.mark.integration


def hung_batch(store, sched, node: str, prefix: str, jobs: int = 4) -> tuple[str, ...]:
    """`jobs` jobs leased and started by `node` as one batch the scheduler sent, whose run deadline has
    passed (the node hangs inside a step: its heartbeat renews, but never past that deadline)."""
    ids = tuple(f"{prefix}-{i}" for i in range(jobs))
    store.submit([Job(id=j, spec=JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64)) for j in ids],
                 prefix)
    for j in ids:
        assert store.lease(j, node, 30) and store.start(j, node, 30)
    assert store.renew(list(ids), node, 30, timeout_seconds=-1) == [True] * jobs  # run deadline: a second ago
    sched.state.inflight[object()] = (sched.workers[node], ids)  # the batch ref, as Ray would give it
    return ids


def maintain(sched) -> None:
    sched._next_maintenance = 0
    sched._maintain()


def make_scheduler(redis_url, tmp_path, models_file, **settings):
    from tests.integration.test_leases import make_scheduler as make

    return make(redis_url, tmp_path, models_file, workers=["n1"], **settings)


def test_a_hung_batch_of_four_jobs_is_one_node_fault(store, redis_url, tmp_path, models_file):
    store.register_node("n1", {"vram_gib": 8})
    sched = make_scheduler(redis_url, tmp_path, models_file, drain_after_failures=3)
    ids = hung_batch(store, sched, "n1", "hung")
    maintain(sched)
    maintain(sched)  # a later round does not count the same batch again
    assert [store.get(j).state for j in ids] == [JobState.QUEUED] * 4
    assert sched.counters["leases_expired"] == 4
    worker = sched.workers["n1"]
    assert worker.failures == 1, "one hung batch is one node fault, not one per job"
    assert not worker.draining and sched.counters["auto_drained"] == 0
    assert store.nodes()[0].get("draining") is not True


def test_auto_drain_needs_node_faults_in_a_row_and_names_them(store, redis_url, tmp_path, models_file):
    store.register_node("n1", {"vram_gib": 8})
    sched = make_scheduler(redis_url, tmp_path, models_file, drain_after_failures=2)
    worker = sched.workers["n1"]
    hung_batch(store, sched, "n1", "first")
    maintain(sched)
    assert worker.failures == 1 and not worker.draining
    sched.state.inflight.clear()  # the first batch came back (its jobs already requeued)
    hung_batch(store, sched, "n1", "second")
    maintain(sched)
    assert worker.draining and sched.counters["auto_drained"] == 1
    reason = store.nodes()[0]["drain_reason"]
    assert "after 2 failed batches in a row (node faults)" in reason
    assert "1) lease expired on node n1" in reason and "2) lease expired on node n1" in reason


def test_a_lease_that_expired_while_redis_was_paused_blames_no_node(store, redis_url, tmp_path, models_file):
    store.register_node("n1", {"vram_gib": 8})
    # One node fault would drain: the most sensitive setting.
    sched = make_scheduler(redis_url, tmp_path, models_file, drain_after_failures=1, lease_seconds=1.0)
    store.submit([Job(id="j", spec=JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64))], "b")
    assert store.lease("j", "n1", 1.0) and store.start("j", "n1", 1.0)  # n1 renders it, lease 1 s
    maintain(sched)  # Redis answers: nothing expired yet
    assert store.get("j").state is JobState.RUNNING
    # Redis stops answering every client for 2.5 s: nobody can renew, the lease runs out meanwhile.
    pauser = connect(redis_url)
    try:
        pauser.execute_command("CLIENT", "PAUSE", 2500, "ALL")
        paused = time.monotonic()
        maintain(sched)  # its calls wait for the pause to end, then find the lease expired
        assert time.monotonic() - paused > 2.0
    finally:
        pauser.close()
    job = store.get("j")
    assert job.state is JobState.QUEUED and "while Redis was unreachable" in job.error
    worker = sched.workers["n1"]
    assert worker.failures == 0 and not worker.suspect and not worker.draining
    assert sched.counters["auto_drained"] == 0 and sched.counters["leases_expired_in_outage"] == 1
    assert store.nodes()[0].get("draining") is not True


def test_outside_an_outage_the_same_expiry_is_the_nodes_fault(store, redis_url, tmp_path, models_file):
    """The control for the test above: no pause, the lease simply runs out."""
    store.register_node("n1", {"vram_gib": 8})
    sched = make_scheduler(redis_url, tmp_path, models_file, drain_after_failures=1, lease_seconds=1.0)
    store.submit([Job(id="j", spec=JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64))], "b")
    assert store.lease("j", "n1", -1) and store.start("j", "n1", -1)
    maintain(sched)
    assert sched.workers["n1"].draining and "lease expired on node n1" in store.nodes()[0]["drain_reason"]

