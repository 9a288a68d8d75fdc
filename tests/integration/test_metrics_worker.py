"""A real RenderWorker (no Ray) feeding the metrics: its batches' wait and render times reach the histograms in
the request that completes them, at no extra round trip, and its record counts the pipelines it loads."""

from __future__ import annotations

import time

import pytest

from renderfarm.cluster.keys import JOB_RENDER_HISTOGRAM, JOB_WAIT_HISTOGRAM
from renderfarm.jobs import Job, JobSpec, JobState
from tests.integration.test_metrics import histogram, scrape, value

pytestmark = pytest.mark.integration

NODE = {"name": "mw", "vram_gib": 8, "compute_capability": "8.6", "gpu": "GeForce RTX 3070", "simulated": True}


def test_finishing_a_batch_counts_its_jobs_in_the_same_request(redis_url, store, tmp_path):
    from renderfarm.actors.worker import RenderWorker
    from renderfarm.config import Settings

    settings = Settings(data_dir=tmp_path, torch_threads=1, heartbeat_seconds=30)
    worker = RenderWorker("mw", redis_url, settings.model_dump(mode="json"), NODE)
    try:
        spec = JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64, steps=2, seed=1)
        now = time.time()
        jobs = [Job(id=f"mw{i}", spec=spec, created_at=now - 3.0) for i in range(5)]  # waited ~3 s
        store.submit(jobs, "b")
        assert worker.warm("tiny-sd15") > 0
        worker.warm("tiny-sd15")  # already loaded: not a load

        def render(batch: list[Job]) -> int:
            for job in batch:
                assert store.lease(job.id, "mw", 60)
            before = worker.store.round_trips
            out = worker.render([j.id for j in batch], [j.spec.model_dump(mode="json") for j in batch])
            assert out["done"] == [j.id for j in batch], out
            return worker.store.round_trips - before

        render(jobs[:1])  # the first finish teaches this server its scripts
        assert render(jobs[1:3]) == 2, "one request to start the batch, one to finish it: the histograms ride along"
        worker.store.redis.script_flush()  # a restarted Redis (the leases below teach it the transition script)
        assert render(jobs[3:]) == 1 + 3, "the finish: the round, both scripts it lacks in one request, the round"

        got = scrape(store)
        for name in (JOB_WAIT_HISTOGRAM, JOB_RENDER_HISTOGRAM):
            assert histogram(got, name)[1] == 5, f"{name}: each job counted once, the flushed round's too"
        waits = dict(histogram(got, JOB_WAIT_HISTOGRAM)[0])
        assert waits[2.5] == 0 and waits[60.0] == 5, waits
        assert all(store.get(j.id).state is JobState.DONE for j in jobs)

        record = {n["name"]: n for n in store.nodes()}["mw"]
        assert record["model_loads"] == 1, "one pipeline loaded; warming it again and rendering reuse it"
        assert value(got, "renderfarm_node_model_loads_total", node="mw") == 1
        assert value(got, "renderfarm_node_images_total", node="mw") == 5
        assert value(got, "renderfarm_node_megapixels_total", node="mw") == pytest.approx(5 * 64 * 64 / 1e6)
    finally:
        worker.shutdown()
