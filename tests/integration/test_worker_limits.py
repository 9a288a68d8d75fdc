"""The worker as a plain class (no Ray) on a real Redis and real diffusers stand-ins: a render stops at its
time limit and reports why; a cancel reaches a render in progress and stops it between two steps; its lease
is renewed while it renders."""

from __future__ import annotations

import threading
import time

import pytest

from renderfarm.actors.worker import RenderWorker
from renderfarm.config import Settings
from renderfarm.jobs import Job, JobSpec, JobState
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

NODE = {"name": "n8", "vram_gib": 8, "compute_capability": "8.6", "gpu": "GeForce RTX 3070", "simulated": True}
LONG = {"model": "tiny-sd15", "prompt": "a long render", "width": 256, "height": 256, "steps": 200, "seed": 1}


def make_worker(redis_url, tmp_path, **settings) -> RenderWorker:
    base = {"data_dir": tmp_path, "torch_threads": 1, "heartbeat_seconds": 0.1, "lease_seconds": 1.0}
    return RenderWorker("n8", redis_url, Settings(**{**base, **settings}).model_dump(mode="json"), NODE)


def lease(store, job_id: str, spec: dict) -> str:
    store.submit([Job(id=job_id, spec=JobSpec(**spec))], "b")
    assert store.lease(job_id, "n8", 60)
    return job_id


def test_a_render_past_its_time_limit_is_stopped_and_reported(redis_url, store, tmp_path):
    worker = make_worker(redis_url, tmp_path, job_timeout_base_s=0.5, job_timeout_s_per_megapixel_step=0)
    try:
        job_id = lease(store, "slow", LONG)
        summary = worker.render([job_id])
    finally:
        worker.shutdown()
    assert summary["errors"][job_id] == "timed out: the render took longer than its limit of 0.5 s"
    assert worker.stats["stopped_timeout"] == 1 and worker.stats["jobs_done"] == 0
    assert store.counters()["timeouts"] == 1
    job = store.get(job_id)
    assert job.state is JobState.RUNNING, "the scheduler, not the node, decides between retry and failure"
    assert store.result_blobs(job_id) is None


def test_a_cancel_stops_a_render_in_progress_and_the_lease_is_renewed_meanwhile(redis_url, store, tmp_path):
    worker = make_worker(redis_url, tmp_path)
    out: dict = {}
    try:
        job_id = lease(store, "cancel-me", LONG)
        thread = threading.Thread(target=lambda: out.update(worker.render([job_id])))
        thread.start()
        deadline = time.monotonic() + 60
        while store.state(job_id) is not JobState.RUNNING and time.monotonic() < deadline:
            time.sleep(0.01)
        first = store.redis.zscore(store.keys.index(JobState.RUNNING), job_id)
        # A heartbeat moves the running lease (1 s) forward, and it does not expire mid-render.
        wait_until(lambda: (store.redis.zscore(store.keys.index(JobState.RUNNING), job_id) or 0) > first, 10,
                   "a lease renewal")
        assert store.state(job_id) is JobState.RUNNING, "a renewed lease does not expire mid-render"
        store.cancel(job_id)
        thread.join(timeout=60)
    finally:
        worker.shutdown()
    assert not thread.is_alive()
    assert out == {"done": [], "lost": [job_id], "errors": {}}
    assert worker.stats["stopped_cancelled"] == 1 and worker.stats["jobs_failed"] == 0
    assert store.get(job_id).state is JobState.CANCELLED and store.result_blobs(job_id) is None
