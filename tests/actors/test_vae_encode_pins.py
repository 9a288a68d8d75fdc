"""What the VAE-encode stage of the planner (planning/vram.py) relies on, read from the installed diffusers and
accelerate: which images the img2img and inpaint pipelines encode, in how many passes and in which dtype when the
worker renders them (actors/pipelines.py render_batch), how an inpainting checkpoint's UNet differs from an
ordinary one, and that under model CPU offload the VAE stays on the card once it has encoded. If a diffusers or
accelerate upgrade changes one of these, this fails and the planner's encode stage needs a look."""

from __future__ import annotations

import os

# No model hub is reachable: never wait on one (set before diffusers / huggingface_hub are imported).
os.environ["HF_HUB_OFFLINE"] = "1"

import inspect

import diffusers
import numpy as np
import pytest
import torch

from renderfarm.actors.families import FAMILIES
from renderfarm.actors.loading import load_pipeline, set_vae_mode
from renderfarm.actors.pipelines import RenderRequest, render_batch
from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.profiles import VaeMode
from tests.actors.images import SIZE, png

STANDINS = ["tiny-sd15", "tiny-sdxl", "tiny-flux", "tiny-sd3"]
UNETS = {"tiny-sd15", "tiny-sdxl"}




INIT = png(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
_mask = np.zeros((SIZE, SIZE), np.uint8)
_mask[16:48, 16:48] = 255
MASK = png(_mask, "L")


def request(job_id: str, **overrides) -> RenderRequest:
    fields = {"width": SIZE, "height": SIZE, "steps": 2, "guidance": 5.0, "init_image": INIT, "strength": 0.5,
              **overrides}
    return RenderRequest(job_id=job_id, prompt="a red fox", negative_prompt="", seed=3, num_images=1, **fields)


def encoder_passes(pipe, name: str, requests) -> list[tuple[int, torch.dtype]]:
    """(batch, input dtype) of every pass of the VAE's encoder while `render_batch` renders `requests`."""
    passes: list[tuple[int, torch.dtype]] = []
    handle = pipe.vae.encoder.register_forward_pre_hook(
        lambda _module, args: passes.append((args[0].shape[0], args[0].dtype)))
    try:
        render_batch(pipe, default_catalog().get(name), requests)
    finally:
        handle.remove()
    return passes


@pytest.fixture(scope="module", params=STANDINS)
def loaded(request):
    """A stand-in with bf16 weights and its VAE deliberately in float32 (as SDXL's VAE on an fp16 card)."""
    pipe = load_pipeline(default_catalog().get(request.param), dtype=torch.bfloat16)
    pipe.vae.to(dtype=torch.float32)
    return request.param, pipe


def two_jobs(name: str, **overrides) -> list[RenderRequest]:
    return [request(f"{name}/a", **overrides), request(f"{name}/b", **overrides)]


def test_img2img_encodes_each_init_image_alone_in_the_vaes_own_dtype(loaded):
    """The worker passes one generator per image, so every pipeline's `_encode_vae_image` takes the per-image
    path; the worker's `vae_as_loaded` feeds the encoder in the VAE's dtype (here float32 beside bf16)."""
    name, pipe = loaded
    assert encoder_passes(pipe, name, two_jobs(name)) == [(1, torch.float32), (1, torch.float32)]


def test_inpainting_also_encodes_the_masked_image_whole_batch_in_flux_and_sd3(loaded):
    """Inpainting encodes the init images (an ordinary denoiser blends their latents back each step) and the
    masked images. SD and SDXL go through `_encode_vae_image` for both (one image per pass); Flux's and SD3's
    `prepare_mask_latents` call `vae.encode` on the whole masked batch: the encode stage's largest pass is the
    batch (planning/vram.py counts the whole batch unless the VAE slices or tiles)."""
    name, pipe = loaded
    passes = encoder_passes(pipe, name, two_jobs(name, mask=MASK))
    assert {dtype for _, dtype in passes} == {torch.float32}
    if name in UNETS:
        assert [b for b, _ in passes] == [1, 1, 1, 1]
    else:
        assert [b for b, _ in passes] == [1, 1, 2]


def test_a_sliced_vae_encodes_one_image_at_a_time(loaded):
    """AutoencoderKL.encode honours slicing (and tiling): the sliced and tiled modes' encode is one image's."""
    name, pipe = loaded
    set_vae_mode(pipe, VaeMode.SLICED)
    try:
        passes = encoder_passes(pipe, name, two_jobs(name, mask=MASK))
    finally:
        set_vae_mode(pipe, VaeMode.FULL)
    assert passes and {b for b, _ in passes} == {1}


def test_strength_zero_round_trips_the_whole_batch_through_the_encoder(loaded):
    """No step runs at strength 0: the worker encodes the batch at once (families.Family.encode_image) and
    decodes it, so a full VAE's encode holds the batch there too."""
    name, pipe = loaded
    assert encoder_passes(pipe, name, two_jobs(name, strength=0.0)) == [(2, torch.float32)]


@pytest.mark.parametrize("name", STANDINS)
def test_the_stand_ins_are_ordinary_denoisers_which_blend_the_init_latents(name):
    """The stand-ins (like the catalog's models) are ordinary checkpoints, not inpainting ones: 4 latent channels
    into a UNet, 16 into SD3's transformer (Flux packs 16 into 64). Inpainting then keeps the init latents and
    noise to blend back each step; an inpainting checkpoint (9-channel UNet, 33-channel SD3 transformer) instead
    concatenates the mask and the masked latents to its input: planning counts the larger of the two."""
    pipe = load_pipeline(default_catalog().get(name), dtype=torch.float32)
    denoiser = getattr(pipe, FAMILIES[default_catalog().get(name).family.name].denoiser)
    latent = pipe.vae.config.latent_channels
    assert denoiser.config.in_channels == (latent * 4 if name == "tiny-flux" else latent)


@pytest.mark.parametrize(("cls", "channels"), [
    (diffusers.StableDiffusionInpaintPipeline, "num_channels_unet == 9"),
    (diffusers.StableDiffusionXLInpaintPipeline, "num_channels_unet == 9"),
    (diffusers.StableDiffusion3InpaintPipeline, "num_channels_transformer == 33"),
])
def test_inpainting_checkpoints_concatenate_and_ordinary_ones_blend(cls, channels):
    source = inspect.getsource(cls.__call__)
    assert channels in source
    assert "torch.cat([latent_model_input, mask, masked_image_latents], dim=1)" in source
    assert "latents = (1 - init_mask) * init_latents_proper + init_mask * latents" in source


@pytest.mark.parametrize("name", STANDINS)
@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_the_vae_is_last_in_every_task_pipelines_offload_chain(name, task):
    """Model CPU offload chains the components in `model_cpu_offload_seq`; each hook offloads only the component
    before it. The VAE comes after the denoiser, so the denoiser's hook never offloads it: once it has encoded,
    it stays on the card through the denoise (planning/vram.py adds it to an image task's denoise stage)."""
    family = FAMILIES[default_catalog().get(name).family.name]
    chain = getattr(diffusers, family.task_pipelines[task]).model_cpu_offload_seq.split("->")
    assert chain[-1] == "vae"
    assert chain.index(family.denoiser) < chain.index("vae")


def test_accelerate_offloads_only_the_previous_module_of_the_chain(monkeypatch):
    """cpu_offload_with_hook: calling a module offloads its `prev_module_hook`'s module and nothing else, so a
    module later in the chain that ran first (the VAE encoding) stays where it went. Checked on the meta device
    (no accelerator here): 'on the card' is 'on meta'."""
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import UserCpuOffloadHook

    offloaded = []

    def offload(self):  # the real one moves the weights back to the CPU; from meta that needs to_empty
        offloaded.append(self.model)
        self.model.to_empty(device="cpu")

    monkeypatch.setattr(UserCpuOffloadHook, "offload", offload)
    encoder, denoiser, vae = (torch.nn.Linear(4, 4) for _ in range(3))
    meta = torch.device("meta")
    _, first = cpu_offload_with_hook(encoder, meta)
    _, second = cpu_offload_with_hook(denoiser, meta, prev_module_hook=first)
    cpu_offload_with_hook(vae, meta, prev_module_hook=second)
    x = torch.zeros(1, 4)
    encoder(x)  # the text encoder runs
    vae(x)  # the VAE encodes the init image: it offloads the denoiser (not on the card), not the encoder
    denoiser(x)  # the denoise: offloads the text encoder only
    assert offloaded == [encoder]
    assert next(vae.parameters()).device == meta and next(denoiser.parameters()).device == meta
