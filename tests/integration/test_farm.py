"""End to end on a real farm: client -> Redis -> scheduler actor -> Ray workers -> diffusers -> PNGs."""

import io

import pytest
from PIL import Image

from renderfarm.client import FarmClient, SpecError
from renderfarm.infotext import parse_a1111_parameters
from renderfarm.jobs import JobState
from renderfarm.planning.catalog import Catalog
from renderfarm.planning.measured import snapshot
from tests.helpers import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def client(farm, models_file):
    return FarmClient(farm.redis_url, catalog=Catalog.load(models_file))


def specs(n, **kw):
    models = ["tiny-sd15", "tiny-flux"]
    return [
        {"model": models[i % 2], "prompt": f"test prompt {i}", "negative_prompt": "blurry" if i % 3 else "",
         "width": 64 if i % 4 else 96, "height": 64, "steps": 2, "seed": 100 + i, **kw}
        for i in range(n)
    ]


def test_batch_of_20_finishes_with_png_metadata(client, farm):
    batch = specs(20)
    ids = client.submit_batch(batch, batch_id="twenty")
    finished = client.wait(ids, timeout=300)
    assert [job.state for job in finished] == [JobState.DONE] * 20
    assert {job.node for job in finished} <= {"big", "small"}
    for spec, job in zip(batch, finished):
        result = client.result(job.id)
        assert len(result.png) == 1
        image = Image.open(io.BytesIO(result.png[0]))
        assert image.size == (spec["width"], spec["height"])
        params = parse_a1111_parameters(image.info["parameters"])
        assert params["prompt"] == spec["prompt"]
        # Flux is guidance-distilled: a negative prompt has no effect, so the metadata does not claim one
        applied_negative = "" if spec["model"] == "tiny-flux" else spec["negative_prompt"]
        assert params["negative_prompt"] == applied_negative
        assert params["Seed"] == str(spec["seed"])
        assert params["Size"] == f"{spec['width']}x{spec['height']}"
        assert params["Model"] == spec["model"]
        assert job.timings["denoise_s_per_step"] > 0 and job.timings["decode_s"] >= 0
        assert {"load_s", "move_s", "encode_s"} <= set(job.timings)
        assert job.peak_memory_mb is not None
    nodes = {n["name"]: n for n in client.status()["nodes"]}
    assert nodes["big"]["simulated"] is True and nodes["big"]["vram_gib"] == 24
    assert nodes["big"]["jobs_done"] + nodes["small"]["jobs_done"] >= 20


def test_several_images_per_job_use_consecutive_seeds(client):
    (job_id,) = client.submit_batch([{**specs(1)[0], "num_images": 3, "seed": 7}])
    (job,) = client.wait([job_id], timeout=120)
    result = client.result(job.id)
    seeds = [parse_a1111_parameters(p)["Seed"] for p in result.parameters]
    assert seeds == ["7", "8", "9"]
    assert len({img.tobytes() for img in result.images}) == 3


def test_submit_is_idempotent_with_client_ids(client):
    ids = client.submit_batch(specs(2), job_ids=["idem-a", "idem-b"])
    again = client.submit_batch(specs(2), job_ids=["idem-a", "idem-b"])
    assert ids == again == ["idem-a", "idem-b"]
    client.wait(ids, timeout=120)
    assert client.store.redis.xlen(client.store.keys.events) > 0
    queued_events = [
        f for _, f in client.store.redis.xrange(client.store.keys.events)
        if f[b"job"] == b"idem-a" and f[b"state"] == b"queued"
    ]
    assert len(queued_events) == 1


def test_a_rejected_batch_enqueues_nothing(client):
    before = client.store.counts()
    bad = specs(3)
    bad[2]["width"] = 72  # tiny-sd15 is fine with 72, so break a flux one instead
    bad[1]["width"] = 72
    with pytest.raises(SpecError, match=r"jobs\[1\]: width: width=72 must be a multiple of 16.*nothing was enqueued"):
        client.submit_batch(bad)
    with pytest.raises(SpecError, match=r"model: unknown model 'sd9'; known models"):
        client.submit({"model": "sd9", "prompt": "x"})
    assert client.store.counts() == before


def test_cancel_queued_jobs_and_finished_ones_stay_finished(client, farm):
    # Occupy both workers with long jobs so the next ones wait in the queue.
    blockers = client.submit_batch([{**s, "steps": 40, "width": 256, "height": 256} for s in specs(2)])
    waiting = client.submit_batch(specs(3, steps=2))
    outcome = client.cancel(waiting + ["no-such-job"])
    assert all(v.startswith("cancelled (was") for k, v in outcome.items() if k != "no-such-job")
    assert outcome["no-such-job"] == "not cancelled: no such job"
    finished = client.wait(blockers + waiting, timeout=300)
    assert [j.state for j in finished[2:]] == [JobState.CANCELLED] * 3
    assert all(j.state in (JobState.DONE, JobState.CANCELLED) for j in finished[:2])
    assert client.cancel(blockers[:1])[blockers[0]].startswith("not cancelled: already")


def test_a_model_whose_weights_no_node_has_is_refused_at_submit(client, farm):
    """Absent weights are the job's fault, not a node's: once the nodes have said what they can load, such a
    job is refused with each node's reason (tests/integration/test_job_faults.py has the rest)."""
    before = client.store.counts()["queued"]
    with pytest.raises(SpecError, match=r"no node of this farm can load 'broken' \(big: weights not found"):
        client.submit_batch([{"model": "broken", "prompt": "x", "width": 64, "height": 64, "steps": 2}])
    assert client.store.counts()["queued"] == before


def test_as_completed_yields_each_job_once(client):
    ids = client.submit_batch(specs(6))
    seen = [job.id for job in client.as_completed(ids, timeout=120)]
    assert sorted(seen) == sorted(ids)
    with pytest.raises(TimeoutError, match="did not finish"):
        long = client.submit_batch([{**specs(1)[0], "steps": 60, "width": 512, "height": 512}])
        list(client.as_completed(long, timeout=0.2))
    client.cancel(long)


def test_omitted_settings_take_the_models_defaults(client):
    entry = client.catalog.get("tiny-flux")
    spec = client.validate({"model": "tiny-flux", "prompt": "x"})
    assert (spec.width, spec.height, spec.steps, spec.guidance) == (
        entry.default_size, entry.default_size, entry.default_steps, entry.default_guidance)
    assert spec.seed is not None
    assert client.validate({"model": "tiny-flux", "prompt": "x", "steps": 3, "seed": 9}).steps == 3


def test_a_job_that_fits_no_node_is_rejected_at_submit_with_the_reason(farm):
    client = FarmClient(farm.redis_url)  # the packaged catalog: flux-dev with its real components
    before = client.store.counts()
    ok = {"model": "tiny-sd15", "prompt": "fine", "width": 64, "height": 64, "steps": 2}
    huge = {"model": "flux-dev", "prompt": "a poster", "width": 4096, "height": 4096, "num_images": 4}
    with pytest.raises(SpecError) as info:
        client.submit_batch([ok, huge])
    message = str(info.value)
    assert message.startswith("jobs[1]: flux-dev at 4096x4096, batch 4 needs at least")
    assert "in its most frugal profile; the largest node (big) has 24 GiB" in message
    assert message.endswith("nothing was enqueued")
    assert client.store.counts() == before
    # The rest of the batch, alone, is accepted.
    (job_id,) = client.submit_batch([ok])
    client.wait([job_id], timeout=120)


def test_nodes_record_what_they_measure_and_the_scheduler_learns_it(client, farm):
    """Online calibration from real renders: every batch leaves a measured peak (per model, profile, size
    bucket, batch) and a measured speed (per node) in Redis, and the scheduler reads them back."""
    ids = client.submit_batch(specs(6, width=64))
    finished = client.wait(ids, timeout=300)
    measured, bad = snapshot(client.store.calibration_records())
    assert bad == []
    for job in finished:
        batch = int(job.timings["batch_size"])  # jobs of one image each here
        per_step = measured.speeds.get((job.node, job.spec.model, "64x64", batch))
        assert per_step is not None and per_step > 0
        floors = measured.floors(job.spec.model, 64, 64, batch)
        # The floor is the measured peak plus the margin: at least the weights the render kept resident.
        assert floors.get(job.profile, 0) > 0.25
    # The scheduler has read the same snapshot (it re-reads when a worker records something new).
    stats = farm.scheduler_stats()
    assert stats["measurements"]["speeds"] >= 1 and stats["measurements"]["peaks"] >= 1


def test_a_draining_node_takes_nothing_new_until_undrained(client, farm):
    from renderfarm.cli import main

    assert main(["drain", "small", "--redis", farm.redis_url, "--json"]) == 0
    try:
        # The scheduler re-reads node records every eta_seconds.
        wait_until(lambda: farm.scheduler_stats()["workers"]["small"]["draining"] is True, 30, "the drain")
        finished = client.wait(client.submit_batch(specs(6)), timeout=300)
        assert {job.node for job in finished} == {"big"}
    finally:
        assert main(["drain", "small", "--undo", "--redis", farm.redis_url, "--json"]) == 0
    wait_until(lambda: farm.scheduler_stats()["workers"]["small"]["draining"] is False, 30, "the undrain")
    assert main(["drain", "nobody", "--redis", farm.redis_url, "--json"]) == 1


def test_the_scheduler_samples_queue_depth_and_node_totals_for_the_dashboard(client, farm):
    import time

    deadline = time.monotonic() + farm.settings.sample_seconds * 3 + 5
    while len(client.store.samples()) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    samples = client.store.samples()
    assert len(samples) >= 2 and samples[0]["t"] < samples[-1]["t"]
    last = samples[-1]
    assert set(last["counts"]) == {s.value for s in JobState}
    assert set(last["nodes"]) == {"big", "small"}
    assert all(isinstance(n["images"], int) and "megapixels" in n for n in last["nodes"].values())
