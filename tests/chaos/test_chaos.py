"""The chaos suite: 50 jobs through a real local farm (real redis-server, real Ray, real diffusers stand-ins)
while a worker process, the scheduler, or redis-server is killed mid-render. Every job must finish exactly
once: 50 done, 0 lost, 0 duplicated results. The figures are also printed by `renderfarm bench chaos`."""

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


def test_a_worker_killed_mid_render_loses_no_job(tmp_path):
    result = run_scenario("worker", JOBS, data_dir=tmp_path)
    check(result)
    assert result.retried >= 1, "the killed node's jobs ran again elsewhere"


def test_the_scheduler_killed_and_restarted_loses_no_job(tmp_path):
    check(run_scenario("scheduler", JOBS, data_dir=tmp_path))


def test_redis_killed_and_restarted_from_its_aof_loses_no_job(tmp_path):
    check(run_scenario("redis", JOBS, data_dir=tmp_path))
