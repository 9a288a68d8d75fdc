"""LoRA sets applied to loaded pipelines (renderfarm/actors/lora_apply.py), unmerged and fused, through diffusers
and peft on CPU: the tiny stand-ins (sd15, sdxl, flux) with the stand-in LoRAs of both key styles, loaded as the
farm loads them (load_pipeline under a profile), rendered as it renders (render_batch), 64x64 in 2 steps.

Pinned here, read in the installed diffusers 0.42 / peft 0.21 / bitsandbytes 0.50 source first:
- diffusers' `fuse_lora` adds peft's recomputed delta to the weights and `unfuse_lora` subtracts it again; no
  copy of the originals is kept, so a 16-bit round trip is near the originals but not on them, and repeated
  round trips drift further (`test_diffusers_fuse_unfuse_only_approximates_the_originals_and_drifts`); apply()
  restores them bit for bit from its own backup.
- peft casts a new adapter to its base layer's dtype when that is a float, fp8 storage included: the LoRA
  becomes fp8 and its forward fails on CPU (`test_peft_makes_an_adapter_on_fp8_storage_fp8`); apply() casts
  such adapters back to the compute dtype.
- diffusers' `load_lora_adapter` reads the model's `state_dict()`, which, on a CPU with AVX512-BF16, un-packs
  bitsandbytes' CPU-packed 4-bit weights lossily (`test_bitsandbytes_cpu_state_dict_moves_4bit_outputs`):
  after a LoRA has been loaded and unloaded an nf4 stand-in renders its base image within a rounding, not
  exactly. A CUDA node never packs (bitsandbytes packs on CPU only).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io
import itertools
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from renderfarm.actors import lora_apply
from renderfarm.actors.embeddings import EmbeddingCache
from renderfarm.actors.loading import load_pipeline
from renderfarm.actors.lora_apply import LoraFamilyMismatch, adapter_name, apply, choose_mode, fuse_refusal
from renderfarm.actors.pipelines import RenderRequest, render_batch
from renderfarm.errors import ModelSourceError
from renderfarm.faults import Fault, classify
from renderfarm.loras import LoraLibrary
from renderfarm.loras.standins import build_standin_lora, ensure_standin_loras, save_lora
from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.devices import KNOWN_CARDS, device_from_spec
from renderfarm.planning.profiles import (
    ComputeDtype,
    Placement,
    Profile,
    VaeMode,
    WeightsFormat,
    component_formats,
    ladder,
)

W, C, P = WeightsFormat, ComputeDtype, Placement
FAMILIES = ("sd15", "sdxl", "flux")
STYLES = ("style", "character")  # the stand-in LoRA files: diffusers keys, kohya keys
VISIBLE = 4.0  # grey levels (of 255) by which a LoRA at weight 1 must move the image on average, at the least


def profile(weights=W.BF16, compute=C.BF16, placement=P.GPU, **fields) -> Profile:
    return Profile(f"{weights.value}-{compute.value}-{placement.value}", weights, compute, placement, **fields)


BF16 = profile()
FP32 = profile(W.FP32, C.FP32)  # what a CPU node chooses


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    folder = ensure_standin_loras(tmp_path_factory.mktemp("models"))
    return LoraLibrary(folder, hash_cache=tmp_path_factory.mktemp("hashes") / "lora-hashes.json")


def entry(family: str):
    return default_catalog().get(f"tiny-{family}")


def lora(library, family: str, style: str):
    return library.get(f"tiny-{family}-{style}")


def render(pipe, model, cache: EmbeddingCache | None = None, prompt: str = "a red fox in the snow"):
    request = RenderRequest(job_id="j", prompt=prompt, negative_prompt="blurry", width=64, height=64, steps=2,
                            guidance=model.default_guidance, seed=7, num_images=1)
    [result] = render_batch(pipe, model, [request], embedding_cache=cache if cache is not None else EmbeddingCache())
    return np.asarray(Image.open(io.BytesIO(result.images[0]))).astype(np.int16), result


def image(pipe, model) -> np.ndarray:
    return render(pipe, model)[0]


def tuner_layers(pipe) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(module, BaseTunerLayer) for component in pipe.components.values()
               if isinstance(component, torch.nn.Module) for module in component.modules())


def weights_of(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": value.detach().clone() for name, component in pipe.components.items()
            if isinstance(component, torch.nn.Module) for key, value in component.state_dict().items()}


def assert_no_adapter_left(pipe) -> None:
    assert pipe.get_list_adapters() == {}
    assert tuner_layers(pipe) == 0  # the PEFT wrappers are gone too, not only the adapters' weights
    assert not any(hasattr(c, "peft_config") for c in pipe.components.values() if isinstance(c, torch.nn.Module))
    assert pipe.num_fused_loras == 0
    state = lora_apply.lora_state(pipe)
    assert state.mode is None and state.applied == () and not state.adapters and not state.backups
    assert lora_apply.text_encoder_key(pipe) == ()


# --- which mode ----------------------------------------------------------------------------------------


def _every_profile():
    """Every rung of every catalog model's ladder on every known card and a CPU, each VAE mode, plus every
    combination of weights format, placement and text-encoder format the Profile type allows."""
    devices = [device_from_spec(card.name, card.vram_gib, card.compute_capability) for card in KNOWN_CARDS]
    devices.append(device_from_spec("cpu", 16.0, None))
    for model in default_catalog().models.values():
        for device in devices:
            for rung in ladder(model, device):
                for vae in VaeMode:
                    yield model, rung.with_vae(vae)
    te_formats = [None, *WeightsFormat]
    for weights, placement, te in itertools.product(WeightsFormat, Placement, te_formats):
        yield None, Profile("synthetic", weights, C.BF16, placement, text_encoder_weights=te)


def test_choose_mode_never_fuses_into_4bit_gguf_or_fp8_weights():
    seen = {"fused": 0, "unmerged": 0}
    for model, chosen in _every_profile():
        for prefer in (None, "auto", "fused"):
            mode = choose_mode(chosen, prefer)
            seen[mode] += 1
            quantized = not chosen.weights.is_float or (
                chosen.text_encoder_weights is not None and not chosen.text_encoder_weights.is_float)
            streamed = chosen.placement.streams or chosen.placement is P.DISK_OFFLOAD
            assert (mode == "fused") == (not quantized and not streamed), (chosen, prefer, mode)
            if model is not None:
                exact = choose_mode(chosen, prefer, entry=model)
                formats = component_formats(model, chosen)
                denoiser_and_encoders = [f for name, f in formats.items() if name != "vae"]
                if exact == "fused":
                    assert all(f.is_float for f in denoiser_and_encoders) and not streamed, (model.name, chosen)
        assert choose_mode(chosen, "unmerged") == "unmerged"
    assert seen["fused"] and seen["unmerged"]  # both modes occur on the real ladders


def test_choose_mode_fuses_around_a_quantized_t5_only_when_the_set_leaves_it_alone(library):
    """SD3's `bf16+te-nf4` rung: a set adapting the transformer fuses, one adapting T5 would not; without the
    model, the T5 format alone keeps it unmerged."""
    model = default_catalog().get("tiny-sd3")
    chosen = profile(text_encoder_weights=W.NF4)
    style = lora(library, "flux", "style")
    on_transformer = ((style.model_copy(update={"family": "sd3", "components": ("transformer",)}), 1.0),)
    on_t5 = ((style.model_copy(update={"family": "sd3", "components": ("transformer", "text_encoder_3")}), 1.0),)
    assert choose_mode(chosen, entry=model, lora_set=on_transformer) == "fused"
    assert choose_mode(chosen, entry=model, lora_set=on_t5) == "unmerged"
    assert "text_encoder_3 is stored as nf4" in fuse_refusal(chosen, model, on_t5)
    assert choose_mode(chosen) == "unmerged"
    with pytest.raises(ValueError, match="unknown LoRA mode"):
        choose_mode(chosen, "merged")


# --- the wrong family -------------------------------------------------------------------------------


def test_a_lora_of_another_family_is_refused_as_the_jobs_fault(library):
    model = entry("sdxl")
    pipe = load_pipeline(model, profile=BF16)
    flux_lora = lora(library, "flux", "character")
    with pytest.raises(LoraFamilyMismatch) as caught:
        apply(pipe, model, BF16, ((lora(library, "sdxl", "style"), 1.0), (flux_lora, 0.7)), "unmerged")
    error = caught.value
    assert isinstance(error, ValueError)
    message = str(error)
    assert "tiny-flux-character" in message and "flux" in message and "sdxl" in message and "tiny-sdxl" in message
    assert classify(error) is Fault.JOB
    try:  # as the worker meets it: raised while handling something else, wrapped
        raise RuntimeError("batch failed") from error
    except RuntimeError as wrapped:
        assert classify(wrapped) is Fault.JOB
    assert_no_adapter_left(pipe)  # refused before anything was loaded


def test_a_lora_file_missing_on_the_node_is_a_model_source_error_and_a_broken_one_leaves_the_base(library, tmp_path):
    model = entry("sd15")
    pipe = load_pipeline(model, profile=BF16)
    base = image(pipe, model)
    style = lora(library, "sd15", "style")
    apply(pipe, model, BF16, ((style, 1.0),), "fused")
    gone = style.model_copy(update={"name": "gone", "path": str(tmp_path / "gone.safetensors"), "sha256": "0" * 64})
    with pytest.raises(ModelSourceError, match="gone"):
        apply(pipe, model, BF16, ((gone, 1.0),), "fused")
    assert lora_apply.lora_state(pipe).mode == "fused"  # refused before touching the pipeline
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(Exception):
        apply(pipe, model, BF16, ((style, 0.5), (style.model_copy(update={"name": "broken", "path": str(broken),
                                                                          "sha256": "1" * 64}), 1.0)), "fused")
    assert_no_adapter_left(pipe)
    assert np.array_equal(image(pipe, model), base)  # the fused weights were restored on the way out


# --- each family and key style, both modes ---------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("family", FAMILIES)
def test_weight_zero_is_the_base_image_and_weight_one_changes_it(family, style, library):
    model = entry(family)
    pipe = load_pipeline(model, profile=BF16)
    base = image(pipe, model)
    chosen = lora(library, family, style)
    timings = apply(pipe, model, BF16, ((chosen, 0.0),), "unmerged")
    assert timings.loaded == () and timings.mode is None  # weight 0 adds nothing: not even loaded
    assert np.array_equal(image(pipe, model), base)
    for mode in ("unmerged", "fused"):
        timings = apply(pipe, model, BF16, ((chosen, 1.0),), mode)
        assert timings.changed and timings.mode == mode
        change = np.abs(image(pipe, model) - base).mean()
        assert change > VISIBLE, f"{chosen.name} ({mode}) moved the image by {change:.2f} grey levels only"
        apply(pipe, model, BF16, ((chosen, 0.0),), mode)
        assert np.array_equal(image(pipe, model), base)
        assert_no_adapter_left(pipe)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_and_unmerged_render_the_same_image(family, style, library):
    """In fp32 the two are the same arithmetic up to the order of additions: within one grey level. In bf16 a
    fused weight is w + delta rounded to 8 significant bits, where unmerged adds the LoRA's output to the base
    layer's: the images differ by a rounding of the dtype, so the bar is what bf16 itself does to that image:
    no more than twice the difference between the unmerged LoRA rendered in bf16 and in fp32 (measured: 0.65 to
    2.1 grey levels on average between the modes, 1.7 to 5.2 between the dtypes)."""
    model = entry(family)
    chosen = ((lora(library, family, style), 0.8),)
    images = {}
    for precision in (FP32, BF16):
        pipe = load_pipeline(model, profile=precision)
        for mode in ("unmerged", "fused"):
            apply(pipe, model, precision, chosen, mode)
            images[precision.compute_dtype, mode] = image(pipe, model)
    fp32 = np.abs(images[C.FP32, "fused"] - images[C.FP32, "unmerged"])
    assert fp32.max() <= 1, fp32.max()
    modes = np.abs(images[C.BF16, "fused"] - images[C.BF16, "unmerged"]).mean()
    dtype = np.abs(images[C.BF16, "unmerged"] - images[C.FP32, "unmerged"]).mean()
    assert modes <= 2 * dtype, (modes, dtype)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["unmerged", "fused"])
def test_switching_a_to_b_to_the_empty_set_leaves_nothing_behind(family, mode, library):
    model = entry(family)
    pipe = load_pipeline(model, profile=BF16)
    original = weights_of(pipe)
    base = image(pipe, model)
    set_a = ((lora(library, family, "style"), 1.0),)
    set_b = ((lora(library, family, "character"), 0.8), (lora(library, family, "style"), -0.5))

    first = apply(pipe, model, BF16, set_a, mode)
    image_a = image(pipe, model)
    assert first.loaded == (f"tiny-{family}-style",) and first.adapter_bytes > 0
    assert (first.backup_bytes > 0) is (mode == "fused") and (first.fuse_s > 0) is (mode == "fused")
    assert not apply(pipe, model, BF16, set_a, mode).changed  # the same set again: nothing to do

    second = apply(pipe, model, BF16, set_b, mode)
    assert second.loaded == (f"tiny-{family}-character",)  # style stays loaded from set A
    assert sorted(pipe.get_active_adapters()) == sorted(adapter_name(info) for info, _ in set_b)
    assert lora_apply.lora_state(pipe).applied_loras() == [(info.name, w) for info, w in set_b]
    assert pipe.num_fused_loras == (2 if mode == "fused" else 0)
    image_b = image(pipe, model)
    assert np.abs(image_b - image_a).mean() > VISIBLE

    back = apply(pipe, model, BF16, set_a, mode)
    assert back.loaded == ()  # both adapters were kept: switching back loads nothing
    assert np.array_equal(image(pipe, model), image_a)

    empty = apply(pipe, model, BF16, (), mode)
    assert empty.mode is None and sorted(empty.deleted) == sorted({info.name for info, _ in set_b})
    assert empty.adapter_bytes == 0 and empty.backup_bytes == 0
    assert_no_adapter_left(pipe)
    now = weights_of(pipe)
    assert now.keys() == original.keys()
    assert all(torch.equal(now[key], original[key]) for key in original)  # bit for bit, fused or not
    assert np.array_equal(image(pipe, model), base)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_fused_and_unmerged_switch_into_each_other(family, library):
    model = entry(family)
    pipe = load_pipeline(model, profile=FP32)
    set_a = ((lora(library, family, "character"), 1.0),)
    apply(pipe, model, FP32, set_a, "unmerged")
    unmerged = image(pipe, model)
    timings = apply(pipe, model, FP32, set_a, "fused")
    assert timings.changed and timings.loaded == () and pipe.num_fused_loras == 1
    assert np.abs(image(pipe, model) - unmerged).max() <= 1
    timings = apply(pipe, model, FP32, set_a, "unmerged")
    assert timings.backup_bytes == 0 and pipe.num_fused_loras == 0
    assert np.array_equal(image(pipe, model), unmerged)


def test_a_weight_change_refuses_and_the_same_bytes_under_two_names_are_one_adapter(library, tmp_path):
    model = entry("sdxl")
    pipe = load_pipeline(model, profile=FP32)
    style = lora(library, "sdxl", "style")
    twin = style.model_copy(update={"name": "twin", "path": str(tmp_path / "twin.safetensors")})
    (tmp_path / "twin.safetensors").write_bytes(open(style.path, "rb").read())
    apply(pipe, model, FP32, ((style, 1.0),), "fused")
    whole = image(pipe, model)
    timings = apply(pipe, model, FP32, ((style, 0.5),), "fused")
    assert timings.changed and timings.loaded == () and timings.fuse_s > 0  # re-fused at the new weight
    half = image(pipe, model)
    assert np.abs(half - whole).mean() > 1
    timings = apply(pipe, model, FP32, ((style, 0.5), (twin, 0.5)), "fused")
    assert timings.loaded == () and len(pipe.get_list_adapters()["unet"]) == 1
    assert np.abs(image(pipe, model) - whole).max() <= 1
    with pytest.raises(ValueError, match="not a finite number"):
        apply(pipe, model, FP32, ((style, float("nan")),), "fused")


def test_least_recently_used_adapters_are_deleted_beyond_the_cap(library, tmp_path):
    model = entry("flux")
    pipe = load_pipeline(model, profile=BF16)
    extra = []
    for index in range(3):  # more stand-in LoRAs: same recipe, other seeds
        path = tmp_path / f"tiny-flux-extra{index}.safetensors"
        save_lora(build_standin_lora("flux", "diffusers", seed=zlib.crc32(path.name.encode())), path)
        extra.append(path)
    extras = LoraLibrary(tmp_path, hash_cache=tmp_path / "hashes.json")
    first, second, third = (extras.get(p.stem) for p in extra)
    sizes = []
    for info in (first, second, third):
        sizes.append(apply(pipe, model, BF16, ((info, 1.0),), "unmerged", max_adapters=2).adapter_bytes)
    assert sizes[0] < sizes[1] == sizes[2]  # two adapters at most
    assert set(pipe.get_list_adapters()["transformer"]) == {adapter_name(second), adapter_name(third)}
    timings = apply(pipe, model, BF16, ((first, 1.0), (second, 1.0)), "unmerged", max_adapters=2)
    assert timings.loaded == (first.name,) and timings.deleted == (third.name,)
    one = timings.adapter_bytes // 2
    timings = apply(pipe, model, BF16, ((third, 1.0),), "unmerged", max_adapter_bytes=one)
    assert timings.deleted == (first.name, second.name) and timings.adapter_bytes == one
    # A set larger than the cap is applied whole: its own adapters are never evicted.
    timings = apply(pipe, model, BF16, ((first, 1.0), (second, 1.0), (third, 1.0)), "unmerged", max_adapters=1)
    assert timings.deleted == () and len(pipe.get_list_adapters()["transformer"]) == 3


def test_adapter_bytes_are_the_adapters_weights_by_component(library):
    model = entry("sdxl")
    pipe = load_pipeline(model, profile=BF16)
    character = lora(library, "sdxl", "character")
    timings = apply(pipe, model, BF16, ((character, 1.0),), "unmerged")
    counted = {}
    for component, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            size = sum(p.numel() * p.element_size() for name, p in module.named_parameters() if ".lora_" in name)
            if size:
                counted[component] = size
    assert timings.adapter_bytes_by_component == counted
    assert set(counted) == set(character.components) == {"unet", "text_encoder", "text_encoder_2"}
    assert timings.adapter_bytes == timings.active_adapter_bytes == sum(counted.values())
    assert timings.as_dict()["loaded"] == [character.name]
    timings = apply(pipe, model, BF16, ((lora(library, "sdxl", "style"), 1.0),), "unmerged")
    assert timings.adapter_bytes == sum(counted.values()) + timings.active_adapter_bytes  # character kept


# --- prompt embeddings ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["unmerged", "fused"])
def test_a_text_encoder_lora_never_reuses_embeddings_of_another_set(mode, library):
    model = entry("flux")
    pipe = load_pipeline(model, profile=BF16)
    cache = EmbeddingCache()
    character = lora(library, "flux", "character")  # kohya keys: adapts CLIP too
    style = lora(library, "flux", "style")  # the transformer only
    assert "text_encoder" in character.components and "text_encoder" not in style.components

    base, result = render(pipe, model, cache)
    assert result.encoded_prompts == 1
    apply(pipe, model, BF16, ((style, 1.0),), mode)
    _, result = render(pipe, model, cache)
    assert result.cached_prompts == 1 and lora_apply.text_encoder_key(pipe) == ()  # the base's embeddings hold

    apply(pipe, model, BF16, ((character, 1.0),), mode)
    assert lora_apply.text_encoder_key(pipe) == (mode, ((character.sha256, 1.0),))
    with_character, result = render(pipe, model, cache)
    assert result.encoded_prompts == 1  # encoded again, under the LoRA
    assert np.array_equal(with_character, image(pipe, model))  # what a fresh cache renders
    apply(pipe, model, BF16, ((character, 0.5),), mode)
    _, result = render(pipe, model, cache)
    assert result.encoded_prompts == 1  # another weight, other embeddings

    apply(pipe, model, BF16, (), mode)
    again, result = render(pipe, model, cache)
    assert result.cached_prompts == 1 and np.array_equal(again, base)


# --- unmerged on quantized bases -----------------------------------------------------------------------

QUANTIZED = [
    ("flux", profile(W.FP8_E4M3FN)),
    ("sdxl", profile(W.FP8_E4M3FN)),
    ("sd15", profile(W.FP8_E5M2, C.FP16)),
    ("flux", profile(W.NF4, text_encoder_weights=W.NF4)),
    ("sdxl", profile(W.NF4)),
    ("flux", profile(W.GGUF_Q4_0)),
    ("flux", profile(W.GGUF_Q8_0)),
    ("sd15", profile(W.GGUF_Q8_0)),
]


@pytest.mark.parametrize("family, chosen", QUANTIZED, ids=[f"{f}-{p.name}" for f, p in QUANTIZED])
def test_unmerged_works_on_quantized_bases_and_fused_is_refused(family, chosen, library):
    model = entry(family)
    pipe = load_pipeline(model, profile=chosen)
    base = image(pipe, model)
    set_a = ((lora(library, family, "character"), 1.0), (lora(library, family, "style"), 0.5))
    assert choose_mode(chosen, entry=model, lora_set=set_a) == "unmerged"
    with pytest.raises(ValueError, match="round the LoRA's delta"):
        apply(pipe, model, chosen, set_a, "fused")
    assert lora_apply.lora_state(pipe).mode is None
    timings = apply(pipe, model, chosen, set_a)
    assert timings.mode == "unmerged" and timings.backup_bytes == 0
    compute = {C.BF16: torch.bfloat16, C.FP16: torch.float16}[chosen.compute_dtype]
    adapter_dtypes = {p.dtype for c in pipe.components.values() if isinstance(c, torch.nn.Module)
                      for name, p in c.named_parameters() if ".lora_" in name}
    assert adapter_dtypes == {compute}  # never fp8, never the 4-bit storage
    change = np.abs(image(pipe, model) - base).mean()
    assert change > VISIBLE, change
    apply(pipe, model, chosen, ())
    assert_no_adapter_left(pipe)
    after = image(pipe, model)
    if chosen.weights.is_bnb:
        # bitsandbytes' CPU packing (see test_bitsandbytes_cpu_state_dict_moves_4bit_outputs): a rounding.
        assert np.abs(after - base).mean() < 0.25 * change
    else:
        assert np.array_equal(after, base)


def test_unmerged_works_under_group_offload_hooks_and_fused_is_refused(library):
    """CPU group offload runs diffusers' hooks without streams; diffusers re-applies them around a LoRA load."""
    from diffusers.hooks import group_offloading

    model = entry("flux")
    chosen = profile(placement=P.GROUP_OFFLOAD)
    pipe = load_pipeline(model, profile=chosen)
    resident = load_pipeline(model, profile=BF16)
    set_a = ((lora(library, "flux", "style"), 1.0),)
    assert choose_mode(chosen) == "unmerged"
    with pytest.raises(ValueError, match="streams the denoiser"):
        apply(pipe, model, chosen, set_a, "fused")
    apply(pipe, model, chosen, set_a)
    apply(resident, model, BF16, set_a, "unmerged")
    assert group_offloading._is_group_offload_enabled(pipe.transformer)
    assert np.array_equal(image(pipe, model), image(resident, model))


# --- the library behaviours pinned ----------------------------------------------------------------------


def test_diffusers_fuse_unfuse_only_approximates_the_originals_and_drifts(library):
    """`unfuse_lora` subtracts the recomputed delta: in bf16 each weight comes back within a unit or two in the
    last place of the fused weight w + delta (two roundings), not exactly; the same set again lands on the same
    weights, but a worker alternating sets and weights walks further away with each switch (what apply()'s
    backup avoids)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = entry("sdxl")
    pipe = load_pipeline(model, profile=BF16)
    pipe.load_lora_weights(lora(library, "sdxl", "style").path, adapter_name="a")
    layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    original = [m.get_base_layer().weight.detach().float().clone() for m in layers]
    eps = torch.finfo(torch.bfloat16).eps  # one unit in the last place, relative
    units, drift = [], []
    for weight in (1.0, 1.0, 0.7, -0.4, 1.3, 0.9, -1.1, 0.6, 1.2, -0.8):
        pipe.set_adapters(["a"], adapter_weights=[weight])
        pipe.fuse_lora(components=["unet"], adapter_names=["a"])
        fused = [m.get_base_layer().weight.detach().float().clone() for m in layers]
        pipe.unfuse_lora(components=["unet"])
        back = [m.get_base_layer().weight.detach().float() for m in layers]
        units.append(max(((b - o).abs() / (eps * torch.maximum(f.abs(), o.abs()))).max().item()
                         for o, f, b in zip(original, fused, back)))
        drift.append(sum((b - o).abs().sum().item() for o, b in zip(original, back)))
    assert drift[0] > 0, "the originals came back exactly: diffusers keeps them now, apply() could use it"
    assert units[0] <= 2, units  # one round trip: within two roundings of the fused weight
    assert max(units) > 2, units  # several: the roundings add up
    assert drift[1] == drift[0], drift  # the same set again: the same two roundings
    assert drift[-1] > 1.5 * drift[0], drift  # other weights: further away


def test_peft_makes_an_adapter_on_fp8_storage_fp8(library):
    """Why apply() casts adapters back: peft gives a new adapter its base layer's float dtype, fp8 included, and
    a fp8 LoRA's forward fails on CPU (and would round the LoRA to 3 mantissa bits on a GPU)."""
    model = entry("sdxl")
    chosen = profile(W.FP8_E4M3FN)
    pipe = load_pipeline(model, profile=chosen)
    pipe.load_lora_weights(lora(library, "sdxl", "style").path, adapter_name="a")
    dtypes = {p.dtype for name, p in pipe.unet.named_parameters() if ".lora_" in name}
    assert torch.float8_e4m3fn in dtypes
    with pytest.raises(NotImplementedError, match="Float8_e4m3fn"):
        image(pipe, model)


def test_bitsandbytes_cpu_state_dict_moves_4bit_outputs():
    from bitsandbytes.functional import has_avx512bf16
    from bitsandbytes.nn import Linear4bit

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not pack 4-bit weights here")
    pipe = load_pipeline(entry("flux"), profile=profile(W.NF4))
    layer = next(m for m in pipe.transformer.modules() if isinstance(m, Linear4bit))
    x = torch.randn(2, layer.in_features, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = layer(x)  # packs the weight for the CPU kernel
        assert torch.equal(layer(x), first)
        pipe.transformer.state_dict()  # un-packs it, keeping the rounded scales
        assert not torch.equal(layer(x), first)


@pytest.mark.parametrize("mode", ["unmerged", "fused"])
def test_an_sd3_lora_changes_the_image_and_comes_off_again(mode, library):
    """SD 3.x renders like the other families (issue 17, point 7), its LoRAs too: the stand-in's diffusers-style
    LoRA (kohya SD3 files are refused by the library: diffusers' SD3 loader converts none) on the transformer and
    the text encoders, in either mode, then the empty set gives the base image back bit for bit."""
    model = entry("sd3")
    pipe = load_pipeline(model, profile=BF16)
    base = image(pipe, model)
    chosen = lora(library, "sd3", "style")
    apply(pipe, model, BF16, ((chosen, 1.0),), mode)
    change = np.abs(image(pipe, model) - base).mean()
    assert change > VISIBLE, f"{chosen.name} ({mode}) moved the image by {change:.2f} grey levels only"
    apply(pipe, model, BF16, (), mode)
    assert np.array_equal(image(pipe, model), base)
    assert_no_adapter_left(pipe)
