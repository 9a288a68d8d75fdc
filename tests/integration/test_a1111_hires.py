"""A1111's hires fix (`enable_hr` on /sdapi/v1/txt2img) mapped onto JobSpec.hires, in-process (FastAPI's
TestClient) against a real Redis: what each hr_* field becomes, and the 422 naming each one the farm cannot
honour, with nothing enqueued. Rendered end to end through a real farm and the `webuiapi` client in
tests/integration/test_api.py."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from renderfarm.api.app import ApiContext, create_app
from renderfarm.planning.vram import effective_steps

pytestmark = pytest.mark.integration


@pytest.fixture
def http(redis_url, store):
    with TestClient(create_app(ApiContext(redis_url))) as client:
        yield client


def txt2img(**fields):
    return {"prompt": "a fox", "width": 64, "height": 64, "steps": 2, "cfg_scale": 7.0,
            "override_settings": {"sd_model_checkpoint": "tiny-sd15"}, "enable_hr": True, "hr_upscaler": "Lanczos",
            **fields}


class Submitted(Exception):
    pass


@pytest.fixture
def submitted(monkeypatch):
    """The ids txt2img waits for (nothing renders here: only what was submitted matters)."""
    ids: list[str] = []

    def no_wait(who, job_ids, timeout):
        ids.extend(job_ids)
        raise Submitted

    monkeypatch.setattr("renderfarm.api.a1111._wait", no_wait)
    return ids


def submit(http, body):
    with pytest.raises(Submitted):
        answer = http.post("/sdapi/v1/txt2img", json=body)
        pytest.fail(answer.text)


@pytest.mark.parametrize("fields,size,scale,strength,steps", [
    ({"hr_scale": 2, "hr_second_pass_steps": 2, "denoising_strength": 0.5}, (128, 128), 2.0, 0.5, 2),
    ({}, (128, 128), 2.0, 0.7, 2),  # A1111's defaults: hr_scale 2, the UI's 0.7, the first pass's steps
    ({"hr_scale": 1.5, "hr_upscaler": "None"}, (96, 96), 1.5, 0.7, 2),  # "None": A1111's plain Lanczos resize
    ({"hr_resize_x": 128, "hr_scale": 3}, (128, 128), 2.0, 0.7, 2),  # a target replaces hr_scale, as in A1111
    ({"hr_resize_y": 96}, (96, 96), 1.5, 0.7, 2),
    ({"hr_resize_x": 256, "hr_resize_y": 256}, (256, 256), 4.0, 0.7, 2),
    ({"width": 64, "height": 96, "hr_resize_x": 128}, (128, 192), 2.0, 0.7, 2),
    ({"width": 88, "height": 88, "hr_resize_x": 120}, (120, 120), None, 0.7, 2),  # 88 * (120/88) is a hair below 120
    ({"denoising_strength": 0.0, "hr_second_pass_steps": 0}, (128, 128), 2.0, 0.0, 2),
])
def test_enable_hr_maps_onto_the_jobs_hires(http, store, submitted, fields, size, scale, strength, steps):
    submit(http, txt2img(**fields))
    [second] = store.get_many(submitted)
    [first] = store.get_many([submitted[0] + "-base"])
    assert (first.spec.width, first.spec.height) == (fields.get("width", 64), fields.get("height", 64))
    assert first.spec.hires is None and first.spec.tags == ("a1111",)
    assert (second.spec.width, second.spec.height) == size
    assert second.spec.init_from == first.id and second.spec.seed == first.spec.seed
    # the steps the pass runs (A1111's hires pass runs its steps whatever the strength: chains.hires_steps)
    ran = effective_steps(second.spec.steps, strength, False) if strength else second.spec.steps
    assert (second.spec.strength, ran, second.spec.resize_mode) == (strength, steps, "resize")
    assert second.spec.hires.strength == strength
    if scale is not None:
        assert second.spec.hires.scale == scale


def test_the_other_hr_fields_are_accepted_as_the_first_passs(http, store, submitted):
    """What A1111's UI and webuiapi send for "as the first pass", or the first pass's own values."""
    submit(http, txt2img(sampler_name="DPM++ 2M", scheduler="karras", n_iter=2, batch_size=2,
                         hr_checkpoint_name="tiny-sd15 [abc123]", hr_sampler_name="DPM++ 2M Karras", hr_scheduler="Karras",
                         hr_prompt="a fox", hr_negative_prompt="", hr_cfg=7, hr_distilled_cfg=3.5,
                         hr_additional_modules=["Use same choices"], firstphase_width=0, firstphase_height=0))
    submit(http, txt2img(hr_checkpoint_name="Use same checkpoint", hr_sampler_name="Use same sampler",
                         hr_scheduler="Use same scheduler", hr_prompt="", hr_additional_modules=[]))
    submit(http, txt2img(hr_checkpoint_name=None, hr_sampler_name=None, hr_scheduler=None, hr_cfg=None))
    # Forge on Flux: the hires pass's distilled guidance the first pass's (its cfg_scale 1, as Forge sends it)
    submit(http, txt2img(override_settings={"sd_model_checkpoint": "tiny-flux"}, sampler_name="Euler", cfg_scale=1.0,
                         distilled_cfg_scale=3.5, hr_cfg=1.0, hr_distilled_cfg=3.5))
    jobs = store.get_many(submitted)
    assert len(jobs) == 5 and all(job.spec.hires is not None for job in jobs)
    assert (jobs[4].spec.model, jobs[4].spec.guidance, jobs[4].spec.width) == ("tiny-flux", 3.5, 128)
    assert (jobs[0].spec.sampler, jobs[0].spec.schedule, jobs[0].spec.num_images) == ("DPM++ 2M", "Karras", 2)


def test_without_enable_hr_the_hr_fields_are_ignored_as_a1111_does(http, store, submitted):
    submit(http, txt2img(enable_hr=False, hr_upscaler="Latent", hr_scale=9, hr_prompt="else", denoising_strength=0.3))
    [job] = store.get_many(submitted)
    assert job.spec.hires is None and (job.spec.width, job.spec.strength) == (64, None)
    assert store.get_many([submitted[0] + "-base"]) == [None]


@pytest.mark.parametrize("fields,field,reason", [
    ({"hr_upscaler": None}, "hr_upscaler", "latents"),  # absent: A1111's default latent mode
    ({"hr_upscaler": "Latent"}, "hr_upscaler", "latent upscale"),
    ({"hr_upscaler": "Latent (antialiased)"}, "hr_upscaler", "latent upscale"),
    ({"hr_upscaler": "Latent (nearest-exact)"}, "hr_upscaler", "latent upscale"),
    ({"hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler", "Lanczos"),
    ({"hr_upscaler": "ESRGAN_4x"}, "hr_upscaler", "Lanczos"),
    ({"hr_upscaler": "Nearest"}, "hr_upscaler", "Lanczos"),
    ({"hr_upscaler": ""}, "hr_upscaler", "Lanczos"),
    ({"hr_scale": 1}, "hr_scale", "more than 1"),
    ({"hr_scale": 4.5}, "hr_scale", "at most 4"),
    ({"hr_scale": "2"}, "hr_scale", "a number"),
    ({"hr_resize_x": 100, "hr_resize_y": 200}, "hr_resize_x", "scaled uniformly"),
    ({"hr_resize_x": 100}, "hr_resize_x", "96x96"),  # the farm renders multiples of 8 for tiny-sd15
    ({"hr_resize_x": 512}, "hr_resize_x", "at most 4"),
    ({"hr_resize_y": 32}, "hr_resize_y", "more than 1"),
    ({"hr_resize_x": -8}, "hr_resize_x", "outside"),
    ({"hr_second_pass_steps": -1}, "hr_second_pass_steps", "outside"),
    ({"hr_second_pass_steps": 1.5}, "hr_second_pass_steps", "an integer"),
    ({"denoising_strength": 1.5}, "denoising_strength", "outside"),
    ({"hr_checkpoint_name": "tiny-sdxl"}, "hr_checkpoint_name", "first pass's model"),
    ({"hr_sampler_name": "DPM++ 2M"}, "hr_sampler_name", "samples as the first pass"),
    ({"hr_scheduler": "karras"}, "hr_scheduler", "samples as the first pass"),
    ({"hr_prompt": "a wolf"}, "hr_prompt", "first pass's prompt"),
    ({"hr_negative_prompt": "blurry"}, "hr_negative_prompt", "negative prompt"),
    ({"hr_cfg": 1.0}, "hr_cfg", "guidance"),  # Forge's API default, with cfg_scale 7
    ({"hr_additional_modules": ["ae.safetensors"]}, "hr_additional_modules", "modules"),
    ({"override_settings": {"sd_model_checkpoint": "tiny-flux"}, "sampler_name": "Euler", "cfg_scale": 1.0,
      "distilled_cfg_scale": 3.5, "hr_distilled_cfg": 2.0}, "hr_distilled_cfg", "guidance"),
    ({"enable_hr": "yes"}, "enable_hr", "true or false"),
    ({"firstphase_width": 32}, "firstphase_width", "hr_scale"),
])
def test_hr_fields_the_farm_cannot_honour_are_refused(http, store, fields, field, reason):
    before = store.redis.dbsize()
    answer = http.post("/sdapi/v1/txt2img", json=txt2img(**fields))
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert detail["field"] == field and detail["detail"].startswith(f"{field}: "), detail
    assert reason in detail["detail"] and "nothing was enqueued" in detail["detail"], detail
    assert store.redis.dbsize() == before


def test_img2img_has_no_hires_fix(http, store):
    from tests.integration.test_inputs_api import a1111

    before = store.redis.dbsize()
    answer = http.post("/sdapi/v1/img2img", json=a1111(enable_hr=True))
    assert answer.status_code == 422 and answer.json()["detail"]["field"] == "enable_hr", answer.text
    assert "txt2img" in answer.json()["detail"]["detail"]
    assert store.redis.dbsize() == before


def test_a_second_pass_the_farm_refuses_names_the_hires_fields(http, store):
    """tiny-sd15 renders at most 1024 px: a first pass of 512 at hr_scale 4 fails the client's check of the second
    pass, and the 422 says which A1111 fields that came from."""
    before = store.redis.dbsize()
    answer = http.post("/sdapi/v1/txt2img", json=txt2img(width=512, height=512, hr_scale=4))
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]["detail"]
    assert "jobs[0] (hires pass): width" in detail and "2048" in detail and "hr_scale" in detail, detail
    assert store.redis.dbsize() == before


def test_a_timeout_cancels_the_first_passes_too(redis_url, store):
    """No node renders here: past the API's A1111 timeout the answer is 504 and nothing is left to render, the
    first passes (queued) cancelled with the hires passes (waiting for them)."""
    from renderfarm.jobs import JobState

    with TestClient(create_app(ApiContext(redis_url, a1111_timeout_s=0.5))) as http:
        answer = http.post("/sdapi/v1/txt2img", json=txt2img(n_iter=2))
    assert answer.status_code == 504 and "4 job(s) were cancelled" in answer.text, answer.text
    jobs = [job for job in (store.get(key.decode().rpartition(":")[2]) for key in store.redis.scan_iter(
        match=store.keys.job("*"))) if job is not None]
    assert len(jobs) == 4 and {job.state for job in jobs} == {JobState.CANCELLED}
    assert sorted(job.id.endswith("-base") for job in jobs) == [False, False, True, True]
