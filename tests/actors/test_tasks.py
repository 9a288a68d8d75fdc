"""Img2img and inpainting on the stand-ins: the task pipeline shares the loaded weights (never from_pipe's cast),
strength 0 and 1, the mask kept outside its blur band, batches, resize modes, the effective steps."""

from __future__ import annotations

import os

# No model hub is reachable: never wait on one (set before diffusers / huggingface_hub are imported).
os.environ["HF_HUB_OFFLINE"] = "1"

import io

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from renderfarm.actors.families import FAMILIES, family_for
from renderfarm.actors.loading import load_pipeline
from renderfarm.actors.pipelines import PipelineCache, RenderRequest, render_batch
from renderfarm.actors.tasks import (
    apply_overlay,
    blur_mask,
    fit_image,
    overlay_mask,
    task_pipeline,
)
from renderfarm.errors import SpecError
from renderfarm.infotext import parse_a1111_parameters
from renderfarm.planning.profiles import ComputeDtype, Placement, Profile, WeightsFormat
from renderfarm.planning.vram import effective_steps
from tests.actors.images import SIZE, entry, noise_image, pixels, png

STANDINS = ["tiny-sd15", "tiny-sdxl", "tiny-flux", "tiny-sd3"]
FLOW_MATCHING = {"tiny-flux", "tiny-sd3"}




@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> PipelineCache:
    return PipelineCache(max_pipelines=len(STANDINS), cache_dir=tmp_path_factory.mktemp("models"))








def square_mask(size: int = SIZE, start: int = 16, stop: int = 48) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[start:stop, start:stop] = 255
    return mask


INIT_A = png(noise_image(1))
INIT_B = png(np.where(np.arange(SIZE)[:, None, None] < SIZE // 2, 30, 200).repeat(SIZE, 1).repeat(3, 2)
             .astype(np.uint8))
MASK = png(square_mask(), "L")


def request(job_id="job", seed=5, num_images=1, **overrides) -> RenderRequest:
    fields = {"width": SIZE, "height": SIZE, "steps": 4, "guidance": 5.0, "init_image": INIT_A, "strength": 0.5,
              **overrides}
    return RenderRequest(job_id=job_id, prompt="a red fox", negative_prompt="blurry", seed=seed,
                         num_images=num_images, **fields)


def module_tensors(pipe) -> dict[str, tuple[int, torch.dtype]]:
    """(data_ptr, dtype) of every parameter and buffer of every module of `pipe`, by name."""
    found = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            for key, tensor in [*component.named_parameters(), *component.named_buffers()]:
                found[f"{name}.{key}"] = (tensor.data_ptr(), tensor.dtype)
    return found


# --- sharing the loaded weights ---------------------------------------------------------------------


def test_from_pipe_without_a_dtype_casts_the_shared_modules_to_float32():
    """Why tasks.py does not call from_pipe: it ends with `new_pipeline.to(dtype=torch.float32)` when no dtype is
    given, which casts the modules it shares with the loaded pipeline in place. If a diffusers upgrade stops
    doing that, this fails, and from_pipe may be worth using again."""
    pipe = load_pipeline(entry("tiny-sd15"), dtype=torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    derived = diffusers.StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    assert derived.unet is pipe.unet  # shared ...
    assert pipe.unet.dtype == torch.float32  # ... and upcast in place: the loaded pipeline's weights changed
    assert pipe.text_encoder.dtype == torch.float32 and pipe.vae.dtype == torch.float32


@pytest.mark.parametrize("name", STANDINS)
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_task_pipeline_shares_every_module_unchanged(name, task):
    """bf16 weights with the VAE deliberately in float32: the task pipeline holds the same modules, the same
    tensors (no copy) and dtypes, before and after a render (SDXL's task pipelines cast the VAE; it is put back)."""
    model = entry(name)
    pipe = load_pipeline(model, dtype=torch.bfloat16)
    pipe.vae.to(dtype=torch.float32)
    before = module_tensors(pipe)
    task_pipe = task_pipeline(pipe, family_for(model), task)
    assert type(task_pipe).__name__ == FAMILIES[model.family.name].task_pipelines[task]
    for component_name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            assert getattr(task_pipe, component_name) is component, component_name
    assert task_pipeline(pipe, family_for(model), task) is task_pipe  # built once per loaded pipeline
    assert task_pipe.scheduler is not pipe.scheduler  # its own, so img2img's begin index stays off the loaded one
    assert module_tensors(pipe) == before
    mask = MASK if task == "inpaint" else None
    render_batch(pipe, model, [request(steps=2, strength=1.0, mask=mask)])
    assert module_tensors(pipe) == before
    assert pipe.vae.dtype == torch.float32
    assert getattr(pipe, family_for(model).denoiser).dtype == torch.bfloat16


@pytest.mark.parametrize("name", STANDINS)
def test_the_loaded_pipeline_renders_the_same_after_an_img2img_and_an_inpaint(cache, name):
    model = entry(name)
    pipe, _ = cache.get(model)
    text_only = RenderRequest("t", "a red fox", "blurry", SIZE, SIZE, 2, 5.0, seed=9, num_images=1)
    [before] = render_batch(pipe, model, [text_only])
    scheduler = pipe.scheduler
    render_batch(pipe, model, [request()])
    render_batch(pipe, model, [request(mask=MASK, sampler="Euler")])
    [after] = render_batch(pipe, model, [text_only])
    assert pipe.scheduler is scheduler
    assert np.array_equal(pixels(after.images[0]), pixels(before.images[0]))


# --- strength -----------------------------------------------------------------------------------------


def vae_round_trip(pipe, family, image: bytes) -> np.ndarray:
    """The init image through the VAE alone (posterior mode, no denoiser), as the renderer decodes it."""
    tensor = pipe.image_processor.preprocess([Image.open(io.BytesIO(image)).convert("RGB")])
    with torch.no_grad():
        latents = pipe.vae.encode(tensor.to(pipe.vae.dtype)).latent_dist.mode()
        decoded = family.decode(pipe, family.scale_latents(pipe, latents), SIZE, SIZE, torch.device("cpu"))[0]
    return np.asarray(decoded, dtype=np.int16)


@pytest.mark.parametrize("name", STANDINS)
@pytest.mark.parametrize("mask", [None, MASK], ids=["img2img", "inpaint"])
def test_strength_zero_returns_the_init_image_through_the_vae(cache, name, mask):
    """No step runs at strength 0 (diffusers' pipelines refuse it): the image is the init image's VAE round trip.
    The stand-ins' VAEs have random weights, so that round trip is far from the init image (~70 levels on
    average: noise in, noise out); what is pinned is that the render IS the round trip, to the pixel (the same
    decode; PNG holds the same 8-bit values). With a mask, outside the blur band it is the original itself."""
    model = entry(name)
    pipe, _ = cache.get(model)
    [result] = render_batch(pipe, model, [request(strength=0.0, mask=mask)])
    got = pixels(result.images[0])
    round_trip = vae_round_trip(pipe, family_for(model), INIT_A)
    if mask is None:
        assert np.abs(got - round_trip).max() <= 1
    else:
        outside = np.asarray(overlay_mask(blur_mask(Image.open(io.BytesIO(mask)), 4))) == 0
        inside = np.asarray(overlay_mask(blur_mask(Image.open(io.BytesIO(mask)), 4))) == 255
        assert np.array_equal(got[outside], pixels(INIT_A)[outside])
        assert np.abs(got[inside] - round_trip[inside]).max() <= 1
    assert parse_a1111_parameters(result.parameters[0])["Denoising strength"] == "0.0"


@pytest.mark.parametrize("name", STANDINS)
def test_strength_one_ignores_the_init_image(cache, name):
    """At strength 1 the flow-matching families (Flux, SD 3) start from pure noise (sigma 1: the init image's
    weight is 1 - sigma = 0), so two init images give the same image. SD 1.5 and SDXL start from
    init + sigma_max * noise (sigma_max ~ 14.6: diffusers' and A1111's img2img alike), so the init image keeps a
    1/15 share of the first latents and a trace in the result: a few levels, against the ~70 of a different seed."""
    model = entry(name)
    pipe, _ = cache.get(model)
    [a] = render_batch(pipe, model, [request(strength=1.0, init_image=INIT_A)])
    [b] = render_batch(pipe, model, [request(strength=1.0, init_image=INIT_B)])
    [other_seed] = render_batch(pipe, model, [request(strength=1.0, init_image=INIT_A, seed=6)])
    difference = np.abs(pixels(a.images[0]) - pixels(b.images[0]))
    if name in FLOW_MATCHING:
        assert difference.max() == 0
    else:
        assert difference.mean() < 1 and difference.max() <= 8
    assert np.abs(pixels(a.images[0]) - pixels(other_seed.images[0])).mean() > 10 * max(difference.mean(), 0.1)


@pytest.mark.parametrize("name", STANDINS)
def test_img2img_follows_the_init_image_at_half_strength(cache, name):
    model = entry(name)
    pipe, _ = cache.get(model)
    [a] = render_batch(pipe, model, [request(strength=0.5, init_image=INIT_A)])
    [b] = render_batch(pipe, model, [request(strength=0.5, init_image=INIT_B)])
    # The init image shows through (SD 1.5's random stand-in: ~4 levels on average, against < 0.4 at strength 1).
    assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).mean() > 2
    parsed = parse_a1111_parameters(a.parameters[0])
    assert parsed["Denoising strength"] == "0.5" and "Mask blur" not in parsed


# --- inpainting -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STANDINS)
def test_inpainting_changes_only_the_inside_of_the_mask(cache, name):
    model = entry(name)
    pipe, _ = cache.get(model)
    [result] = render_batch(pipe, model, [request(mask=MASK, strength=0.75, mask_blur=4)])
    got, original = pixels(result.images[0]), pixels(INIT_A)
    overlay = np.asarray(overlay_mask(blur_mask(Image.open(io.BytesIO(MASK)), 4)))
    outside, inside = overlay == 0, overlay == 255
    assert outside.sum() > 0 and inside.sum() > 0
    assert np.array_equal(got[outside], original[outside])  # exactly the original beyond the blur band
    assert np.abs(got[inside] - original[inside]).mean() > 20  # repainted inside
    band = ~outside & ~inside
    assert band.any()  # the blur band blends the two
    parsed = parse_a1111_parameters(result.parameters[0])
    assert parsed["Denoising strength"] == "0.75" and parsed["Mask blur"] == "4"


def test_mask_blur_zero_keeps_the_mask_sharp(cache):
    model = entry("tiny-sd15")
    pipe, _ = cache.get(model)
    [result] = render_batch(pipe, model, [request(mask=MASK, mask_blur=0)])
    got, original = pixels(result.images[0]), pixels(INIT_A)
    outside = square_mask() == 0
    assert np.array_equal(got[outside], original[outside])
    assert parse_a1111_parameters(result.parameters[0])["Mask blur"] == "0"


# --- batches --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STANDINS)
@pytest.mark.parametrize("mask", [None, MASK], ids=["img2img", "inpaint"])
def test_batch_of_two_init_images_renders_each_as_alone(cache, name, mask):
    model = entry(name)
    pipe, _ = cache.get(model)
    first = request("a", seed=3, init_image=INIT_A, mask=mask, num_images=2)
    second = request("b", seed=8, init_image=INIT_B, mask=mask)
    [alone_first] = render_batch(pipe, model, [first])
    [alone_second] = render_batch(pipe, model, [second])
    together = render_batch(pipe, model, [second, first])
    assert [result.job_id for result in together] == ["b", "a"]
    for got, expected in [(together[0], alone_second), (together[1], alone_first)]:
        assert got.seeds == expected.seeds
        for got_png, expected_png in zip(got.images, expected.images):
            # A batch may pick other CPU kernels than a single image: a rounding step, nothing more.
            assert np.abs(pixels(got_png) - pixels(expected_png)).max() <= 2


def test_a_batch_mixes_no_tasks_or_strengths(cache):
    model = entry("tiny-sd15")
    pipe, _ = cache.get(model)
    text_only = RenderRequest("t", "a fox", "", SIZE, SIZE, 4, 5.0, seed=1, num_images=1)
    with pytest.raises(ValueError, match="task"):
        render_batch(pipe, model, [request(), text_only])
    with pytest.raises(ValueError, match="effective_strength"):
        render_batch(pipe, model, [request(strength=0.5), request(strength=0.6)])
    # No strength given: A1111's 0.75, the same batch as an explicit 0.75.
    assert request(strength=None).effective_strength == 0.75


# --- resize modes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
def test_every_resize_mode_renders_the_jobs_size(cache, mode):
    model = entry("tiny-sd15")
    pipe, _ = cache.get(model)
    wide = png(noise_image(2, width=96, height=48))
    wide_mask = png(square_mask(96)[:48], "L")
    [result] = render_batch(pipe, model, [request(init_image=wide, mask=wide_mask, resize_mode=mode, width=64,
                                                  height=SIZE)])
    assert Image.open(io.BytesIO(result.images[0])).size == (64, SIZE)


def test_an_image_of_another_size_needs_a_resize_mode(cache):
    model = entry("tiny-sd15")
    pipe, _ = cache.get(model)
    with pytest.raises(SpecError, match="init_image is 96x48.*resize_mode"):
        render_batch(pipe, model, [request(init_image=png(noise_image(2, width=96, height=48)))])
    with pytest.raises(SpecError, match="not a readable image"):
        render_batch(pipe, model, [request(init_image=b"\x89PNG truncated")])


def test_fit_image_follows_a1111():
    # A 4x2 image with distinct columns, fitted to 4x4.
    columns = np.array([[[0, 0, 0], [80, 80, 80], [160, 160, 160], [240, 240, 240]]] * 2, dtype=np.uint8)
    image = Image.fromarray(columns)
    assert fit_image(image, 4, 2, "none") is image
    assert fit_image(image, 8, 8, "resize").size == (8, 8)
    # crop: resized to cover (8x4 -> scaled to height 4: 8 wide) and centre-cropped: the middle columns.
    cropped = np.asarray(fit_image(image, 4, 4, "crop"))
    assert cropped.shape == (4, 4, 3)
    assert cropped[:, 0, 0].min() > 0 and cropped[:, -1, 0].max() < 240  # the outer columns are cut off
    # fill: resized to fit (4x2), centred, the rows above and below stretched from the edge rows.
    filled = np.asarray(fit_image(image, 4, 4, "fill"))
    middle = np.asarray(image.resize((4, 2), Image.Resampling.LANCZOS))
    assert np.array_equal(filled[1:3], middle)
    assert np.abs(filled[0].astype(int) - middle[0]).max() <= 1 and np.abs(filled[3].astype(int) - middle[1]).max() <= 1
    with pytest.raises(SpecError):
        fit_image(image, 4, 4, "none")


def test_blur_mask_is_a1111s_separable_gaussian():
    mask = Image.fromarray(square_mask(), "L")
    assert blur_mask(mask, 0) is mask
    blurred = np.asarray(blur_mask(mask, 4)).astype(int)
    radius = int(2.5 * 4 + 0.5)  # A1111's kernel: 2 * radius + 1 taps
    assert blurred[32, 32] == 255 and blurred[32, 16 - radius - 1] == 0  # untouched beyond the kernel
    assert 0 < blurred[32, 15] < 255 and 0 < blurred[32, 16] < 255  # the edge is smoothed both ways
    assert np.abs(blurred - blurred.T).max() <= 1  # x and y alike (rounded after each pass, as OpenCV on uint8)
    assert np.abs(blurred[32, 16] + blurred[32, 15] - 255) <= 2  # symmetric about the edge
    # Wider than the image: reflected again and again, as OpenCV's border does; no error.
    assert blur_mask(Image.fromarray(square_mask(8, 2, 6), "L"), 64).size == (8, 8)


def test_overlay_keeps_the_original_where_the_mask_is_off():
    original = Image.fromarray(noise_image(3))
    generated = Image.fromarray(noise_image(4))
    overlay = overlay_mask(blur_mask(Image.fromarray(square_mask(), "L"), 4))
    out = np.asarray(apply_overlay(generated, original, overlay)).astype(int)
    off, on = np.asarray(overlay) == 0, np.asarray(overlay) == 255
    assert np.array_equal(out[off], np.asarray(original)[off])
    assert np.array_equal(out[on], np.asarray(generated)[on])


# --- effective steps: what diffusers runs ---------------------------------------------------------------


@pytest.mark.parametrize("name", STANDINS)
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_effective_steps_are_what_the_task_pipelines_run(cache, name, task):
    model = entry(name)
    pipe, _ = cache.get(model)
    task_pipe = task_pipeline(pipe, family_for(model), task)
    scheduler = task_pipe.scheduler
    for steps in (1, 2, 3, 4, 7, 10, 20, 25, 30, 50):
        for strength in (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.33, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7,
                         0.75, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0):
            if scheduler.config.get("use_dynamic_shifting"):
                scheduler.set_timesteps(steps, mu=1.0)
            else:
                scheduler.set_timesteps(steps)
            _, runs = task_pipe.get_timesteps(steps, strength, "cpu")
            assert effective_steps(steps, strength, model.family.flow_matching) == runs, (steps, strength)
    assert effective_steps(10, None, True) == 10


# --- GPU only: model offload -----------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-flux"])
def test_gpu_model_offload_renders_img2img_and_restores_the_loaded_pipelines_hooks(name):
    model = entry(name)
    chosen = Profile("bf16-model-offload", WeightsFormat.BF16, ComputeDtype.BF16, Placement.MODEL_OFFLOAD)
    pipe = load_pipeline(model, device="cuda", profile=chosen)
    assert pipe._all_hooks
    resident = load_pipeline(model, device="cuda", profile=Profile("bf16", WeightsFormat.BF16, ComputeDtype.BF16,
                                                                   Placement.GPU))
    text_only = RenderRequest("t", "a red fox", "blurry", SIZE, SIZE, 2, 5.0, seed=9, num_images=1)
    [before] = render_batch(pipe, model, [text_only])
    [offloaded] = render_batch(pipe, model, [request(mask=MASK)])
    [on_card] = render_batch(resident, model, [request(mask=MASK)])
    [after] = render_batch(pipe, model, [text_only])
    assert np.abs(pixels(offloaded.images[0]) - pixels(on_card.images[0])).max() <= 2
    assert np.array_equal(pixels(after.images[0]), pixels(before.images[0]))
    assert [hook.model for hook in pipe._all_hooks] and pipe.vae.device.type == "cpu"  # all offloaded again
