"""The scheduler's control loop in its own thread against a real redis-server (no Ray: every worker is full,
so a round never calls one): a manager that fails every round costs the others nothing."""

from __future__ import annotations

import pytest

from renderfarm.jobs import Job, JobSpec
from tests.helpers import rayless_scheduler, wait_until

pytestmark = pytest.mark.integration


def test_a_failing_manager_does_not_stop_the_others(store, redis_url, tmp_path, models_file):
    store.submit([Job(id="j", spec=JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64))], "b")
    sched = rayless_scheduler(redis_url, {"data_dir": str(tmp_path), "models_file": str(models_file),
                                          "heartbeat_seconds": 0.01, "eta_seconds": 0.05, "sample_seconds": 0.05,
                                          "poll_seconds": 0.02})

    def redis_refuses(*args, **kwargs):
        raise ConnectionError("reaping failed")

    sched.store.expired = redis_refuses  # the lease manager's reaping fails every round
    sched.start()
    try:
        wait_until(lambda: sched.stats()["update_failures"]["leases"] >= 3, 10, "three failed lease rounds")
        wait_until(lambda: sched.stats()["eta_rounds"] >= 3, 10, "three ETA rounds meanwhile")
        wait_until(lambda: len(store.samples()) >= 2, 10, "two samples meanwhile")
    finally:
        sched.stop()
        counters = sched.join(10)
    assert counters is not None, "the loop ended after stop()"
    stats = sched.stats()
    assert stats["update_failures"]["dispatch"] == stats["update_failures"]["sampling"] == 0
    assert store.etas(["j"])["j"]["node"] == "n1", "dispatch planned the job while leases kept failing"
    assert stats["workers"]["n1"]["inflight"] == sched.settings.worker_queue_depth
