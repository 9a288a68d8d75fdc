"""Inpaint area "masked" (A1111's "Only masked") on the stand-ins: the crop of each job's mask region rendered at
the job's size and pasted back; outside the mask the original, byte for byte; an all-black mask gives the init
image back; a batch of jobs with different masks renders each as alone."""

from __future__ import annotations

import os

# No model hub is reachable: never wait on one (set before diffusers / huggingface_hub are imported).
os.environ["HF_HUB_OFFLINE"] = "1"

import io

import numpy as np
import pytest
import torch
from PIL import Image

from renderfarm.actors.families import family_for
from renderfarm.actors.pipelines import PipelineCache, RenderRequest, render_batch
from renderfarm.actors.tasks import (
    PasteBack,
    apply_overlay,
    blur_mask,
    crop_region,
    fit_image,
    prepare_inputs,
)
from tests.actors.images import SIZE, entry, noise_image, pixels, png

STANDINS = ["tiny-sd15", "tiny-sdxl", "tiny-flux", "tiny-sd3"]
BLUR = 2




@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> PipelineCache:
    return PipelineCache(max_pipelines=len(STANDINS), cache_dir=tmp_path_factory.mktemp("models"))








def mask_png(*boxes: tuple[int, int, int, int], width: int = SIZE, height: int = SIZE) -> bytes:
    array = np.zeros((height, width), np.uint8)
    for x1, y1, x2, y2 in boxes:
        array[y1:y2, x1:x2] = 255
    return png(array, "L")


INIT_A = png(noise_image(1))
INIT_B = png(noise_image(2))
MASK_TOP_LEFT = mask_png((10, 10, 22, 22))  # a small square: its region is ~a third of the image
MASK_BOTTOM_RIGHT = mask_png((36, 48, 60, 56))  # a wide stroke: its region is heightened to a square
BLACK = mask_png()


def request(job_id="job", seed=5, num_images=1, **overrides) -> RenderRequest:
    fields = {"width": SIZE, "height": SIZE, "steps": 4, "guidance": 5.0, "init_image": INIT_A, "strength": 0.75,
              "mask": MASK_TOP_LEFT, "mask_blur": BLUR, "inpaint_area": "masked", "mask_padding": 4, **overrides}
    return RenderRequest(job_id=job_id, prompt="a red fox", negative_prompt="blurry", seed=seed,
                         num_images=num_images, **fields)


def blurred(mask: bytes, blur: int = BLUR) -> np.ndarray:
    """The overlay mask of "Only masked": the blurred mask itself (A1111 does not double it in that mode)."""
    return np.asarray(blur_mask(Image.open(io.BytesIO(mask)), blur))


def region(mask: bytes, padding: int = 4, blur: int = BLUR) -> tuple[int, int, int, int]:
    return crop_region(Image.fromarray(blurred(mask, blur), "L"), padding, SIZE, SIZE)


# --- the inputs: each job's crop at the job's size ---------------------------------------------------------


def test_the_pipeline_gets_each_jobs_crop_at_the_jobs_size():
    first, second = request("a", num_images=2), request("b", init_image=INIT_B, mask=MASK_BOTTOM_RIGHT)
    whole = request("c", inpaint_area="whole")
    inputs = prepare_inputs([first, second, whole], SIZE, SIZE)
    assert len(inputs.images) == len(inputs.masks) == len(inputs.overlays) == 4
    for index, (init, mask) in enumerate([(INIT_A, MASK_TOP_LEFT), (INIT_A, MASK_TOP_LEFT),
                                          (INIT_B, MASK_BOTTOM_RIGHT)]):
        box = region(mask)
        assert 0 < (box[2] - box[0]) * (box[3] - box[1]) < SIZE * SIZE / 2  # a real crop, smaller than the image
        crop = fit_image(Image.open(io.BytesIO(init)).convert("RGB").crop(box), SIZE, SIZE, "fill")
        mask_crop = fit_image(Image.fromarray(blurred(mask), "L").crop(box), SIZE, SIZE, "fill")
        assert inputs.images[index].size == (SIZE, SIZE)
        assert np.array_equal(np.asarray(inputs.images[index]), np.asarray(crop))
        assert np.array_equal(np.asarray(inputs.masks[index]), np.asarray(mask_crop))
        overlay = inputs.overlays[index]
        assert isinstance(overlay, PasteBack) and overlay.box == box and overlay.padding == 4
        assert np.array_equal(np.asarray(overlay.mask), blurred(mask))  # not doubled, as A1111's mask_for_overlay
        assert np.array_equal(np.asarray(overlay.original), pixels(init))
        assert inputs.masked_area_padding(index) == 4
    # The whole picture beside them: the fitted image and A1111's doubled overlay mask, no padding to report.
    assert np.array_equal(np.asarray(inputs.images[3]), pixels(INIT_A))
    assert isinstance(inputs.overlays[3], Image.Image) and inputs.masked_area_padding(3) is None


def test_an_all_black_mask_falls_back_to_the_whole_picture():
    inputs = prepare_inputs([request(mask=BLACK)], SIZE, SIZE)
    assert np.array_equal(np.asarray(inputs.images[0]), pixels(INIT_A))
    assert not np.asarray(inputs.overlays[0]).any() and inputs.masked_area_padding(0) is None


def test_the_paste_back_resizes_the_render_into_its_box_and_keeps_the_original_outside():
    original = Image.fromarray(noise_image(3))
    mask = Image.fromarray(blurred(MASK_TOP_LEFT), "L")
    box = region(MASK_TOP_LEFT)
    generated = Image.new("RGB", (SIZE, SIZE), (10, 200, 30))  # the render of the crop, at the job's size
    crop = original.crop(box)  # what pipelines.py passes as the original: the image the render started from
    out = np.asarray(apply_overlay(generated, crop, PasteBack(original, mask, box, 4))).astype(int)
    off, on = np.asarray(mask) == 0, np.asarray(mask) == 255
    assert off.any() and on.any()
    assert out.shape == (SIZE, SIZE, 3)
    assert np.array_equal(out[off], np.asarray(original)[off])
    assert np.abs(out[on] - np.array([10, 200, 30])).max() <= 1
    band = ~off & ~on
    assert (np.abs(out[band] - np.array([10, 200, 30])).max(axis=1) > 0).all()  # blended in the band


# --- rendered -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STANDINS)
def test_only_masked_changes_only_the_inside_of_the_mask(cache, name):
    model = entry(name)
    pipe, _ = cache.get(model)
    [masked] = render_batch(pipe, model, [request()])
    [whole] = render_batch(pipe, model, [request(inpaint_area="whole")])
    got, original = pixels(masked.images[0]), pixels(INIT_A)
    assert got.shape == (SIZE, SIZE, 3)
    overlay = blurred(MASK_TOP_LEFT)
    outside, inside = overlay == 0, overlay == 255
    assert outside.sum() > SIZE * SIZE / 2 and inside.sum() > 0
    assert np.array_equal(got[outside], original[outside])  # the original, byte for byte, beyond the blur band
    assert np.abs(got[inside] - original[inside]).mean() > 20  # repainted inside
    # Rendered from the crop, not from the whole picture: the inside differs from the whole-picture render.
    assert np.abs(got[inside] - pixels(whole.images[0])[inside]).mean() > 5


def test_the_padding_changes_the_crop_and_so_the_render(cache):
    model = entry("tiny-sd15")
    pipe, _ = cache.get(model)
    assert region(MASK_TOP_LEFT, padding=0) != region(MASK_TOP_LEFT, padding=16)
    [tight] = render_batch(pipe, model, [request(mask_padding=0)])
    [loose] = render_batch(pipe, model, [request(mask_padding=16)])
    overlay = blurred(MASK_TOP_LEFT)
    inside, outside = overlay == 255, overlay == 0
    assert np.abs(pixels(tight.images[0])[inside] - pixels(loose.images[0])[inside]).mean() > 5
    assert np.array_equal(pixels(tight.images[0])[outside], pixels(loose.images[0])[outside])


def test_strength_zero_pastes_the_crops_vae_round_trip_back(cache):
    """No step runs: the render is the crop's VAE round trip, resized back into its box (crop and resize)."""
    model = entry("tiny-sd15")
    pipe, _ = cache.get(model)
    family = family_for(model)
    [result] = render_batch(pipe, model, [request(strength=0.0)])
    inputs = prepare_inputs([request(strength=0.0)], SIZE, SIZE)
    with torch.no_grad():
        tensor = pipe.image_processor.preprocess(inputs.images)
        latents = pipe.vae.encode(tensor.to(pipe.vae.dtype)).latent_dist.mode()
        decoded = family.decode(pipe, family.scale_latents(pipe, latents), SIZE, SIZE, torch.device("cpu"))[0]
    overlay = inputs.overlays[0]
    expected = np.asarray(overlay.paste(decoded), dtype=np.int16)
    got, mask = pixels(result.images[0]), np.asarray(overlay.mask)
    assert np.array_equal(got[mask == 0], pixels(INIT_A)[mask == 0])
    assert np.abs(got[mask == 255] - expected[mask == 255]).max() <= 1


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-flux"])
def test_an_all_black_mask_gives_the_init_image_back(cache, name):
    """A1111 renders plain img2img then (the whole picture repainted, no overlay); the farm renders the whole
    picture through the all-black mask: nothing repainted."""
    model = entry(name)
    pipe, _ = cache.get(model)
    [result] = render_batch(pipe, model, [request(mask=BLACK)])
    assert np.array_equal(pixels(result.images[0]), pixels(INIT_A))


def test_an_init_image_of_another_size_is_fitted_then_cropped(cache):
    model = entry("tiny-sd15")
    pipe, _ = cache.get(model)
    wide, wide_mask = png(noise_image(4, width=96, height=48)), mask_png((40, 10, 56, 20), width=96, height=48)
    [result] = render_batch(pipe, model, [request(init_image=wide, mask=wide_mask, resize_mode="crop")])
    got = pixels(result.images[0])
    assert got.shape == (SIZE, SIZE, 3)
    fitted = np.asarray(fit_image(Image.open(io.BytesIO(wide)), SIZE, SIZE, "crop"), dtype=np.int16)
    fitted_mask = np.asarray(fit_image(blur_mask(Image.open(io.BytesIO(wide_mask)), BLUR), SIZE, SIZE, "crop"))
    assert np.array_equal(got[fitted_mask == 0], fitted[fitted_mask == 0])


# --- batches --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STANDINS)
def test_a_batch_of_different_masks_renders_each_as_alone(cache, name):
    """Each job has its own crop region (and an all-black mask its whole picture) in the one pipeline call."""
    model = entry(name)
    pipe, _ = cache.get(model)
    jobs = [request("a", seed=3, num_images=2),
            request("b", seed=8, init_image=INIT_B, mask=MASK_BOTTOM_RIGHT),
            request("c", seed=1, mask=BLACK)]
    alone = [render_batch(pipe, model, [job])[0] for job in jobs]
    together = render_batch(pipe, model, [jobs[1], jobs[0], jobs[2]])
    assert [result.job_id for result in together] == ["b", "a", "c"]
    for got, expected in zip(together, [alone[1], alone[0], alone[2]]):
        assert got.seeds == expected.seeds
        for got_png, expected_png in zip(got.images, expected.images):
            # A batch may pick other CPU kernels than a single image: a rounding step, nothing more.
            assert np.abs(pixels(got_png) - pixels(expected_png)).max() <= 2
    # Each kept its own outside: b's is INIT_B's beyond its own mask, a's INIT_A's beyond its own.
    for result, init, mask in ((together[0], INIT_B, MASK_BOTTOM_RIGHT), (together[1], INIT_A, MASK_TOP_LEFT)):
        outside = blurred(mask) == 0
        assert np.array_equal(pixels(result.images[0])[outside], pixels(init)[outside])
