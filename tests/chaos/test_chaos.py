"""The chaos suite: 50 jobs through a real local farm (real redis-server, real Ray, real diffusers stand-ins)
while a worker process, the scheduler, or redis-server is killed mid-render. Every job must finish exactly
once: 50 done, 0 lost, 0 duplicated results; the batch's ten chains (a second pass from the job before it) run
in order, whatever lands between their passes. The figures are also printed by `renderfarm bench chaos`."""

from __future__ import annotations

import pytest

from renderfarm.chaos import run_scenario

pytestmark = pytest.mark.integration

JOBS = 50


def check(result) -> None:
    print(result.as_dict())
    assert result.in_flight_at_fault > 0, "the fault must land while jobs are in flight"
    assert (result.submitted, result.done, result.failed, result.lost, result.duplicates) == (JOBS, JOBS, 0, 0, 0)
    assert result.recovery_s is not None, "every job in flight at the fault was done again"
    assert result.detail["drained"] == [], "no scenario here is a reason to drain a node"
    chains = result.detail["chains"]  # every 5th job is the second pass of the one before it
    assert chains["pairs"] == JOBS // 5 and chains["second_passes_done"] == JOBS // 5 and chains["out_of_order"] == 0


def test_a_worker_killed_mid_render_loses_no_job(tmp_path):
    result = run_scenario("worker", JOBS, data_dir=tmp_path)
    check(result)
    assert result.retried >= 1, "the killed node's jobs ran again elsewhere"


def test_the_scheduler_killed_and_restarted_loses_no_job(tmp_path):
    check(run_scenario("scheduler", JOBS, data_dir=tmp_path))


def test_redis_killed_and_restarted_from_its_aof_loses_no_job(tmp_path):
    check(run_scenario("redis", JOBS, data_dir=tmp_path))


def test_a_batch_accepted_just_before_redis_is_killed_survives(tmp_path):
    """No Ray: the client's submit returns, redis-server gets SIGKILL at once, and comes back from its AOF.
    Redis writes the AOF before it answers (the fsync every second only matters if the machine itself
    crashes), so every accepted job is there, in the queue."""
    import os
    import signal

    from renderfarm.client import FarmClient
    from renderfarm.cluster.redis_server import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    try:
        client = FarmClient(url, key_prefix="aof")
        specs = [{"model": "tiny-sd15", "prompt": f"p{i}", "width": 64, "height": 64, "seed": i} for i in range(JOBS)]
        ids = client.submit_batch(specs)
        os.kill(server.pid, signal.SIGKILL)
        port = server.port
        server.stop()
        server = EmbeddedRedis(tmp_path / "redis", port=port)
        server.start()
        assert sorted(client.store.pending_ids()) == sorted(ids)  # the same client: retried across the restart
        assert [job.spec.prompt for job in client.jobs(ids)] == [s["prompt"] for s in specs]
    finally:
        server.stop()


def test_a_stalled_batch_is_one_node_fault_and_drains_nothing(tmp_path):
    result = run_scenario("stall", JOBS, data_dir=tmp_path)
    check(result)
    assert result.retried >= 1, "the frozen node's jobs ran again elsewhere"


def test_a_redis_outage_longer_than_a_lease_blames_nobody(tmp_path):
    check(run_scenario("outage", JOBS, data_dir=tmp_path))


def test_jobs_for_absent_weights_fail_once_and_drain_nothing(tmp_path):
    result = run_scenario("weights", JOBS, data_dir=tmp_path)
    check(result)
    absent = result.detail["absent_weights"]
    assert len(absent) == 3 and all(j["state"] == "failed" and j["attempts"] == 1 for j in absent), absent
    assert all("not retried: the job's fault" in j["error"] for j in absent), absent
