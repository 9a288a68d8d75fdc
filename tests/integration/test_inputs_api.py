"""Image inputs over HTTP (renderfarm/api), in-process (FastAPI's TestClient) against a real Redis: POST /v1/inputs,
specs with a reference or a data: URL in POST /v1/batches, and A1111's POST /sdapi/v1/img2img mapped onto the
job's input fields."""

from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from renderfarm.api.app import ApiContext, create_app
from tests.integration.test_inputs import encoded
from tests.unit.test_inputs import png_claiming

pytestmark = pytest.mark.integration


@pytest.fixture
def http(redis_url, store, tmp_path):
    store.publish_settings({"input_store_url": (tmp_path / "blobs").as_uri(), "input_max_bytes": 2**20})
    with TestClient(create_app(ApiContext(redis_url))) as client:
        yield client


def png(size=(64, 64), mode="RGB", color="red") -> bytes:
    return encoded(Image.new(mode, size, color))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


SPEC = {"model": "tiny-sd15", "prompt": "a fox", "width": 64, "height": 64}


def test_upload_answers_the_reference_and_the_same_image_twice_is_one(http, store):
    first = http.post("/v1/inputs", content=png(), headers={"Content-Type": "image/png"})
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["ref"].startswith("sha256:") and (body["width"], body["height"], body["mode"]) == (64, 64, "RGB")
    again = http.post("/v1/inputs", content=png(), headers={"Content-Type": "image/png"})
    assert again.json()["ref"] == body["ref"]
    mask = http.post("/v1/inputs?what=mask", content=png(mode="L"), headers={"Content-Type": "image/png"})
    assert mask.status_code == 201 and mask.json()["mode"] == "L"
    assert len(store.redis.keys("rf:input:*")) == 2


def test_upload_refusals(http, store):
    noise = encoded(Image.effect_noise((800, 800), 80).convert("RGB"))
    assert len(noise) > 2**20
    big = http.post("/v1/inputs", content=noise, headers={"Content-Type": "image/png"})
    assert big.status_code == 413 and "init_image" in big.json()["detail"] and "cap" in big.json()["detail"]
    gif = http.post("/v1/inputs", content=encoded(Image.new("RGB", (16, 16)), "GIF"),
                    headers={"Content-Type": "image/png"})
    assert gif.status_code == 422 and "GIF" in gif.json()["detail"] and gif.json()["field"] == "init_image"
    bomb = http.post("/v1/inputs?what=mask", content=png_claiming(100_000, 100_000),
                     headers={"Content-Type": "image/png"})
    assert bomb.status_code == 422 and bomb.json()["detail"].startswith("mask: ")
    assert http.post("/v1/inputs", content=png(), headers={"Content-Type": "text/plain"}).status_code == 415
    assert http.post("/v1/inputs?what=other", content=png(), headers={"Content-Type": "image/png"}).status_code == 422
    assert store.redis.keys("rf:input:*") == []


def test_a_batch_takes_a_reference_or_a_data_url(http, store):
    ref = http.post("/v1/inputs", content=png(), headers={"Content-Type": "image/png"}).json()["ref"]
    url = "data:image/png;base64," + b64(png(mode="L", color=255))
    answer = http.post("/v1/batches", json={"jobs": [{**SPEC, "init_image": ref, "mask": url, "strength": 0.3},
                                                      {**SPEC, "init_image": ref}]})
    assert answer.status_code == 201, answer.text
    jobs = store.get_many(answer.json()["job_ids"])
    assert jobs[0].spec.task == "inpaint" and jobs[1].spec.init_image == ref and jobs[0].spec.mask.startswith("sha256:")


def test_a_bad_data_url_or_reference_refuses_the_batch(http, store):
    before = store.redis.dbsize()
    for spec, message in (({**SPEC, "init_image": "data:image/png;base64,@@@"}, "jobs[0]: init_image: not valid base64"),
                          ({**SPEC, "init_image": "data:text/plain;base64,AAAA"}, "jobs[0]: init_image: a data URL"),
                          ({**SPEC, "init_image": "sha256:" + "c" * 64}, "expired or never uploaded"),
                          ({**SPEC, "init_image": "data:image/png;base64," + b64(png((32, 32))),
                            "mask": "data:image/png;base64," + b64(png())}, "resize_mode")):
        answer = http.post("/v1/batches", json={"jobs": [spec]})
        assert answer.status_code == 422 and message in answer.json()["detail"], answer.text
        assert answer.json()["enqueued"] == 0
    assert store.redis.dbsize() == before


def a1111(**fields):
    return {"prompt": "a fox", "width": 64, "height": 64, "steps": 2, "init_images": [b64(png())],
            "override_settings": {"sd_model_checkpoint": "tiny-sd15"}, **fields}


class Submitted(Exception):
    pass


def submitted_jobs(http, store, monkeypatch, body: dict) -> list:
    """POST an A1111 img2img request, stop it once its jobs are submitted (nothing renders here: only what was
    submitted matters), and read them back."""
    submitted = []

    def no_wait(who, ids, timeout):
        submitted.extend(ids)
        raise Submitted

    monkeypatch.setattr("renderfarm.api.a1111._wait", no_wait)
    with pytest.raises(Submitted):
        answer = http.post("/sdapi/v1/img2img", json=body)
        pytest.fail(answer.text)
    return store.get_many(submitted)


def test_img2img_maps_onto_the_jobs_input_fields(http, store, monkeypatch):
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    body = a1111(mask=b64(encoded(mask)), denoising_strength=0.4, mask_blur=6, resize_mode=1, inpainting_fill=1,
                 inpaint_full_res=False, inpainting_mask_invert=1, n_iter=2)
    jobs = submitted_jobs(http, store, monkeypatch, body)
    assert len(jobs) == 2 and jobs[0].spec.init_image == jobs[1].spec.init_image
    spec = jobs[0].spec
    assert (spec.task, spec.strength, spec.mask_blur, spec.resize_mode) == ("inpaint", 0.4, 6, "crop")
    from renderfarm.inputs import read_input

    stored = Image.open(io.BytesIO(read_input(store, spec.mask, {})))
    assert stored.mode == "L" and stored.getpixel((0, 0)) == 0 and stored.getpixel((63, 0)) == 255  # inverted


@pytest.mark.parametrize("fields,field,status", [
    ({"resize_mode": 3}, "resize_mode", 422),
    ({"resize_mode": 7}, "resize_mode", 422),
    ({"mask": b64(png(mode="L")), "inpainting_fill": 0}, "inpainting_fill", 422),
    ({"mask": b64(png(mode="L")), "inpaint_full_res": 2}, "inpaint_full_res", 422),
    ({"mask": b64(png(mode="L")), "inpaint_full_res": "yes"}, "inpaint_full_res", 422),
    ({"mask": b64(png(mode="L")), "inpaint_full_res": True, "inpaint_full_res_padding": 257},
     "inpaint_full_res_padding", 422),
    ({"mask": b64(png(mode="L")), "inpaint_full_res": 1, "inpaint_full_res_padding": -1},
     "inpaint_full_res_padding", 422),
    ({"mask": b64(png(mode="L")), "inpaint_full_res": True, "inpaint_full_res_padding": 1.5},
     "inpaint_full_res_padding", 422),
    ({"mask": b64(png(mode="L")), "inpaint_full_res": True, "inpaint_full_res_padding": "32"},
     "inpaint_full_res_padding", 422),
    ({"mask": b64(png(mode="L")), "inpainting_mask_invert": 2}, "inpainting_mask_invert", 422),
    ({"init_images": []}, "init_images", 422),
    ({"init_images": [b64(png()), b64(png())]}, "init_images", 422),
    ({"init_images": ["not base64!"]}, "init_images[0]", 422),
    ({"init_images": [b64(encoded(Image.new("RGB", (16, 16)), "GIF"))]}, "init_image", 422),  # the client says it
    ({"mask": b64(png((32, 32), mode="L"))}, "mask", 422),
    ({"denoising_strength": 1.5}, "denoising_strength", 422),
    ({"mask_blur_x": 2, "mask_blur_y": 3}, "mask_blur_y", 422),
    ({"latent_mask": "abc"}, "latent_mask", 422),
    ({"init_images": [b64(encoded(Image.effect_noise((800, 800), 80).convert("RGB")))]}, "init_images[0]", 413),
])
def test_img2img_refuses_what_the_farm_does_not_do(http, store, fields, field, status):
    before = store.redis.dbsize()
    answer = http.post("/sdapi/v1/img2img", json=a1111(**fields))
    assert answer.status_code == status, answer.text
    assert f"{field}: " in answer.json()["detail"]["detail"], answer.text
    assert store.redis.dbsize() == before


@pytest.mark.parametrize("fields,area,padding", [
    ({"inpaint_full_res": True, "inpaint_full_res_padding": 16}, "masked", 16),
    ({"inpaint_full_res": 1, "inpaint_full_res_padding": 256}, "masked", 256),
    ({"inpaint_full_res": True}, "masked", 0),  # A1111's API default padding
    ({"inpaint_full_res": True, "inpaint_full_res_padding": None}, "masked", 0),
    ({"inpaint_full_res": False, "inpaint_full_res_padding": 16}, "whole", 32),  # the padding unused, as in A1111
    ({"inpaint_full_res": 0}, "whole", 32),
    ({}, "masked", 0),  # absent: A1111's API defaults, only masked with no padding
    ({"inpaint_full_res": None}, "masked", 0),
])
def test_img2img_maps_inpaint_full_res_onto_the_inpaint_area(http, store, monkeypatch, fields, area, padding):
    [job] = submitted_jobs(http, store, monkeypatch, a1111(mask=b64(png(mode="L")), inpainting_fill=1, **fields))
    assert (job.spec.task, job.spec.inpaint_area, job.spec.mask_padding) == ("inpaint", area, padding)


def test_img2img_without_a_mask_ignores_inpaint_full_res_as_a1111_does(http, store, monkeypatch):
    [job] = submitted_jobs(http, store, monkeypatch, a1111(inpaint_full_res=True, inpaint_full_res_padding=999))
    assert (job.spec.task, job.spec.inpaint_area) == ("img2img", "whole")
