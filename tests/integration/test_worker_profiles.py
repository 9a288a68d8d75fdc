"""The worker as a plain class (no Ray) on a real Redis and real diffusers pipelines: it renders with the
profile its declared card would choose, caches prompt embeddings, and walks down the ladder on an
out-of-memory error (injected on CPU) without dying."""

import time

import pytest
import torch

import renderfarm.actors.pipelines as pipelines
from renderfarm.actors.worker import DoesNotFit, RenderWorker
from renderfarm.config import Settings
from renderfarm.jobs import Job, JobSpec, JobState
from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.devices import device_from_spec

pytestmark = pytest.mark.integration

TURING = {"name": "quadro", "vram_gib": 24, "compute_capability": "7.5", "gpu": "Quadro RTX 6000", "simulated": True}


@pytest.fixture
def worker(redis_url, redis_client, tmp_path):
    w = RenderWorker("quadro", redis_url, Settings(data_dir=tmp_path, torch_threads=1).model_dump(mode="json"), TURING)
    try:
        yield w
    finally:
        w.shutdown()


def run(worker, store, *specs):
    jobs = [Job(id=f"j{time.monotonic_ns()}-{i}", spec=JobSpec(**spec)) for i, spec in enumerate(specs)]
    store.submit(jobs, "b")
    deadline = 60  # lease seconds
    for job in jobs:
        assert store.lease(job.id, worker.name, deadline)
    summary = worker.render([j.id for j in jobs])
    return summary, [store.get(j.id) for j in jobs]


def flux(prompt="a lighthouse", seed=1):
    return {"model": "tiny-flux", "prompt": prompt, "width": 64, "height": 64, "steps": 2, "seed": seed}


def test_renders_with_the_declared_cards_profile_and_caches_prompts(worker, store):
    summary, (job,) = run(worker, store, flux())
    assert summary["done"] == [job.id]
    # A Turing card has no native bf16: fp16 compute, with the Flux activation clamp.
    assert job.profile.startswith("fp16")
    pipe, _ = worker.cache.get(default_catalog().get("tiny-flux"), worker.profile_for(
        default_catalog().get("tiny-flux"), 64, 64, 1))
    assert pipe.renderfarm_info.profile.fp16_clamp is True
    run(worker, store, flux(seed=2), flux(seed=3))  # same prompt, new seeds: no new encode
    node = {n["name"]: n for n in store.nodes()}["quadro"]
    assert node["profiles"]["tiny-flux"] == job.profile
    assert node["embedding_cache"]["hits"] >= 1 and node["embedding_cache"]["hit_rate"] > 0
    assert node["card"]["compute_capability"] == "7.5" and node["card"]["bf16_native"] is False


def _oom_on_first(monkeypatch, times):
    real = pipelines.render_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= times:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipelines, "render_batch", flaky)
    return calls


def test_out_of_memory_walks_down_the_ladder_and_is_remembered(worker, store, monkeypatch):
    calls = _oom_on_first(monkeypatch, times=1)
    summary, (job,) = run(worker, store, flux())
    assert summary["done"] == [job.id] and calls["n"] == 2
    assert job.state is JobState.DONE
    assert len(job.escalations) == 1 and job.escalations[0].endswith("+vae-tiled")
    assert job.profile.endswith("+vae-tiled")
    node = {n["name"]: n for n in store.nodes()}["quadro"]
    assert node["oom_escalations"] == 1 and node["escalated"] == {"tiny-flux 64x64": job.profile}
    # The next job of that model and size starts on the rung that worked: no second escalation.
    _, (again,) = run(worker, store, flux(seed=9))
    assert again.profile == job.profile and again.escalations == [] and calls["n"] == 3


def test_out_of_memory_at_the_floor_fails_the_batch_but_not_the_worker(worker, store, monkeypatch):
    _oom_on_first(monkeypatch, times=10_000)
    summary, (job,) = run(worker, store, flux())
    assert list(summary["errors"]) == [job.id]
    assert "most frugal profile" in summary["errors"][job.id]
    assert job.state is JobState.RUNNING  # the scheduler decides: retry elsewhere or fail
    monkeypatch.undo()
    summary, (later,) = run(worker, store, flux(seed=5))
    assert summary["done"] == [later.id], "the worker keeps working after the failure"


def test_a_job_that_fits_no_profile_says_why(worker):
    worker.card = device_from_spec("2 GiB card", 2, "8.6")
    with pytest.raises(DoesNotFit, match="flux-dev at 2048x2048, batch 4 on quadro: nothing fits"):
        worker.profile_for(default_catalog().get("flux-dev"), 2048, 2048, 4)


def test_loaded_pipelines_are_evicted_beyond_the_memory_budget(redis_url, redis_client, tmp_path, store):
    # A budget smaller than two tiny pipelines: loading the second evicts the first.
    settings = Settings(data_dir=tmp_path, torch_threads=1, pipeline_cache_gib=0.004)
    w = RenderWorker("small-cache", redis_url, settings.model_dump(mode="json"), {**TURING, "name": "small-cache"})
    try:
        run(w, store, flux())
        run(w, store, {**flux(), "model": "tiny-sd15"})
        assert w.cache.loaded() == ["tiny-sd15"]
    finally:
        w.shutdown()
