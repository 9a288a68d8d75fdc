"""The worker as a plain class (no Ray) on a real redis-server and real diffusers stand-ins reports with each
failed batch whose fault it was (renderfarm/faults.py): absent weights are the job's, and Redis going away
while it completes the batch is an outage, reported, not raised (a raised error reached the scheduler as a
failed call, a node fault)."""

from __future__ import annotations

import pytest

import renderfarm.actors.pipelines as pipelines
from renderfarm.actors.worker import RenderWorker
from renderfarm.cluster.keys import Keys
from renderfarm.cluster.redis_server import EmbeddedRedis
from renderfarm.cluster.redis_settings import RedisSettings
from renderfarm.cluster.store import Store
from renderfarm.config import Settings
from renderfarm.jobs import Job, JobSpec

pytestmark = pytest.mark.integration

NODE = {"name": "n1", "vram_gib": 8, "compute_capability": "8.6", "simulated": True}


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of this test alone: it is stopped mid-render."""
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    try:
        yield server, url
    finally:
        server.stop()


@pytest.fixture
def worker(private_redis, tmp_path, models_file):
    _, url = private_redis
    settings = Settings(data_dir=tmp_path / "data", models_file=models_file, torch_threads=1)
    w = RenderWorker("n1", url, settings.model_dump(mode="json"), NODE)
    # The farm's clients ride out 30 s without Redis; this one gives up after one retry, so the outage
    # surfaces within the test.
    w.store = Store(RedisSettings.from_url(url, retry_attempts=1, socket_timeout=1.0).client(), Keys())
    try:
        yield w
    finally:
        w._stop.set()


def leased(store: Store, model: str, job_id: str) -> str:
    store.submit([Job(id=job_id, spec=JobSpec(model=model, prompt="a fox", width=64, height=64, steps=2))], "b")
    assert store.lease(job_id, "n1", 60)
    return job_id


def test_absent_weights_are_reported_as_the_jobs_fault(worker, private_redis):
    store = Store.open(private_redis[1])
    job_id = leased(store, "broken", "broken-1")
    summary = worker.render([job_id])
    assert summary["fault"] == "job"
    assert "ModelSourceError" in summary["errors"][job_id] and "/nonexistent/model/folder" in summary["errors"][job_id]
    store.close()


def test_redis_lost_while_completing_a_batch_is_reported_as_an_outage(worker, private_redis, monkeypatch):
    server, url = private_redis
    store = Store.open(url)
    job_id = leased(store, "tiny-sd15", "j1")
    store.close()
    real = pipelines.render_batch

    def render_then_lose_redis(*args, **kwargs):
        results = real(*args, **kwargs)
        server.stop()  # the render is done; the results have nowhere to go
        return results

    monkeypatch.setattr(pipelines, "render_batch", render_then_lose_redis)
    summary = worker.render([job_id])
    assert summary["fault"] == "outage" and summary["done"] == []
    assert "ConnectionError" in summary["errors"][job_id]
    assert worker.state == "idle"
