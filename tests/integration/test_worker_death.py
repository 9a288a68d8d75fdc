"""A worker process killed mid-batch loses no job: the scheduler requeues what it held."""

import os
import signal
import time

import pytest

from renderfarm.client import FarmClient
from renderfarm.jobs import JobState

pytestmark = pytest.mark.integration


def test_killed_worker_jobs_finish_on_the_other_node(farm):
    client = FarmClient(farm.redis_url)
    pids = {n["name"]: n["pid"] for n in farm.nodes}
    ids = client.submit_batch(
        [{"model": "tiny-sd15", "prompt": f"p{i}", "width": 128, "height": 128, "steps": 30, "seed": i}
         for i in range(8)]
    )
    # Wait until "small" holds a running job, then kill its process outright.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        running = [j for j in client.jobs(ids) if j.state is JobState.RUNNING and j.node == "small"]
        if running:
            break
        time.sleep(0.02)
    assert running, "the small node never started a job"
    os.kill(pids["small"], signal.SIGKILL)
    finished = client.wait(ids, timeout=300)
    assert [j.state for j in finished] == [JobState.DONE] * 8
    victims = [j for j in finished if j.id in {r.id for r in running}]
    assert all(j.node == "big" and j.attempts == 2 for j in victims)
    assert all(len(client.result(j.id).png) == 1 for j in finished)
    stats = farm.scheduler_stats()
    assert stats["worker_deaths"] == 1 and stats["workers"]["small"]["alive"] is False
