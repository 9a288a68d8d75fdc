"""Finished images go to the result store (cluster/blobs), Redis keeps their URLs (issue 16): a real worker
(a plain class, no Ray) rendering real stand-ins against a real redis-server, and a store that refuses the
images failing the jobs as the store's fault, never losing them and never blaming the node."""

from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from renderfarm.cluster.blobs import read_blob
from renderfarm.cluster.blobs.local import LocalBlobStore, path_of
from renderfarm.config import Settings
from renderfarm.faults import Fault
from renderfarm.jobs import Job, JobSpec, JobState

pytestmark = pytest.mark.integration

NODE = {"name": "rs", "vram_gib": 8, "compute_capability": "8.6", "gpu": "GeForce RTX 3070", "simulated": True}
SPEC = JobSpec(model="tiny-sd15", prompt="a fox in the snow", width=64, height=64, steps=2, seed=3, num_images=2)


@pytest.fixture
def worker(redis_url, tmp_path):
    from renderfarm.actors.worker import RenderWorker

    settings = Settings(data_dir=tmp_path, torch_threads=1, heartbeat_seconds=30)
    node = RenderWorker("rs", redis_url, settings.model_dump(mode="json"), NODE)
    node.warm("tiny-sd15")
    yield node
    node.shutdown()


def started(store, ids):
    for job_id in ids:
        assert store.lease(job_id, "rs", 60)
    return [SPEC.model_dump(mode="json")] * len(ids)


def test_a_node_writes_its_images_to_the_store_and_redis_keeps_their_urls(store, worker, tmp_path):
    ids = ["rs-0", "rs-1"]
    store.submit([Job(id=j, spec=SPEC) for j in ids], "b")
    assert worker.render(ids, started(store, ids))["done"] == ids
    for job_id in ids:
        urls = store.result_blobs(job_id)
        assert len(urls) == 2 and all(path_of(u).is_relative_to(tmp_path / "results") for u in urls)
        images = [Image.open(io.BytesIO(read_blob(u))) for u in urls]
        assert [im.size for im in images] == [(64, 64)] * 2
        assert "a fox in the snow" in images[0].text["parameters"]
        assert not store.redis.exists(store.keys.result(job_id)), "no image bytes in Redis"
        assert store.get(job_id).images == 2
    # What a finished job costs Redis is its record: no more than a few kilobytes, whatever the images weigh.
    png_bytes = sum(len(read_blob(u)) for u in store.result_blobs("rs-0"))
    record_bytes = store.redis.memory_usage(store.keys.job("rs-0"))
    assert record_bytes < 4096 and record_bytes < png_bytes


class _FullStore(LocalBlobStore):
    """A directory store whose writes go to /dev/full: the kernel's real ENOSPC, through the real put path."""

    def _fdopen(self, fd):
        os.close(fd)
        return open("/dev/full", "wb")


def test_a_full_store_fails_the_batch_as_the_stores_fault_and_loses_nothing(store, worker, redis_url, tmp_path,
                                                                          models_file):
    from tests.integration.test_leases import make_scheduler

    worker.results.blobs = _FullStore(tmp_path / "full", {})
    ids = ["full-0", "full-1"]
    store.submit([Job(id=j, spec=SPEC) for j in ids], "b")
    out = worker.render(ids, started(store, ids))
    assert out["done"] == [] and out["fault"] == Fault.STORE.value
    assert all("blob store full" in error and "No space left" in error for error in out["errors"].values())
    assert list((tmp_path / "full").rglob("*.png")) == [], "what the batch wrote before the failure is deleted"

    # The scheduler retries the jobs while they have attempts, charging no node; then fails them with the reason.
    store.register_node("rs", {"vram_gib": 8})
    sched = make_scheduler(redis_url, tmp_path, models_file, workers=["rs"], max_attempts=2)
    node = sched.workers["rs"]
    sched.results._settle(node, out["errors"], Fault.parse(out["fault"]), charged=False)
    assert [store.get(j).state for j in ids] == [JobState.QUEUED] * 2 and node.failures == 0
    out = worker.render(ids, started(store, ids))  # the second attempt: the store is still full
    sched.results._settle(node, out["errors"], Fault.parse(out["fault"]), charged=False)
    jobs = [store.get(j) for j in ids]
    assert [j.state for j in jobs] == [JobState.FAILED] * 2 and node.failures == 0 and not node.draining
    assert all("blob store full" in j.error and "after 2 attempts" in j.error for j in jobs)
    # Kept: once the store has room, an operator retries them and they render.
    worker.results.blobs = LocalBlobStore(tmp_path / "results", {})
    for job_id in ids:
        assert store.retry(job_id) is JobState.FAILED
    assert worker.render(ids, started(store, ids))["done"] == ids
    assert all(read_blob(u).startswith(b"\x89PNG") for j in ids for u in store.result_blobs(j))
