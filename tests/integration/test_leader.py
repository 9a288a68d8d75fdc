"""One scheduler per farm: a leader lock in Redis. A second scheduler against the same Redis dispatches
nothing, touches no lease, and takes over when the leader stops (at once) or dies (when the lock lapses).
Real redis-server, no Ray: every worker is full, so a round never calls one."""

from __future__ import annotations

import pytest

from renderfarm.jobs import Job, JobSpec
from tests.helpers import rayless_scheduler, wait_until

pytestmark = pytest.mark.integration


def _scheduler(redis_url, tmp_path, models_file):
    return rayless_scheduler(redis_url, {"data_dir": str(tmp_path), "models_file": str(models_file),
                                         "heartbeat_seconds": 0.2, "eta_seconds": 0.05, "sample_seconds": 0.05,
                                         "poll_seconds": 0.02})


def test_a_second_scheduler_waits_and_takes_over_when_the_leader_stops(store, redis_url, tmp_path, models_file):
    store.submit([Job(id="j", spec=JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64))], "b")
    first = _scheduler(redis_url, tmp_path, models_file)
    second = _scheduler(redis_url, tmp_path, models_file)
    assert first.epoch is not None and second.epoch is None
    assert store.leader() == first.owner
    first.start()
    second.start()
    try:
        wait_until(lambda: first.stats()["eta_rounds"] >= 2, 10, "the leader's planning rounds")
        assert second.stats()["eta_rounds"] == 0, "the follower plans nothing"
        assert second.stats()["follower_rounds"] >= 1
        first.stop()
        first.join(10)
        wait_until(lambda: second.epoch is not None, 5, "the follower to take over after a clean stop")
        assert second.epoch > 0 and store.leader() == second.owner
        wait_until(lambda: second.stats()["eta_rounds"] >= 1, 10, "the new leader's planning rounds")
    finally:
        for sched in (first, second):
            sched.stop()
            sched.join(10)


def test_a_dead_leaders_lock_lapses(store, redis_url, tmp_path, models_file):
    first = _scheduler(redis_url, tmp_path, models_file)  # leads, then never renews: as if its process died
    second = _scheduler(redis_url, tmp_path, models_file)
    assert first.epoch is not None and second.epoch is None
    second.start()
    try:
        wait_until(lambda: second.epoch is not None, first.lead_ttl_s + 5, "the lock to lapse")
        assert second.epoch == first.epoch + 1  # a new epoch: the fencing number of the new leader
    finally:
        second.stop()
        second.join(10)


def test_a_lease_written_under_an_old_leadership_is_fenced(store):
    """A scheduler that lost the lock without noticing (stalled past its TTL) leases nothing: each lease
    carries its epoch, and the script refuses one that is no longer the farm's."""
    from renderfarm.cluster.store import Fenced

    store.submit([Job(id=f"j{i}", spec=JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64))
                  for i in range(2)], "b")
    old = store.lead("old", 5)
    assert store.lease("j0", "n1", 30, fence=old)
    store.resign("old")
    new = store.lead("new", 5)
    assert new == old + 1
    with pytest.raises(Fenced, match="another scheduler leads"):
        store.lease("j1", "n1", 30, fence=old)
    assert store.state("j1").value == "queued", "a fenced lease writes nothing"
    assert store.lease("j1", "n1", 30, fence=new)
