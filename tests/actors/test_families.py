"""The per-family render classes agree with the catalog and with the stand-in pipelines they drive."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from renderfarm.actors.families import (
    DENOISERS,
    FAMILIES,
    LARGE_TEXT_ENCODER,
    TEXT_ENCODERS,
    denoiser_class,
    family_for,
    family_named,
)
from renderfarm.actors.loading import load_pipeline, why_unloadable
from renderfarm.actors.pipelines import RenderRequest, render_batch
from renderfarm.actors.standins import build_standin
from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.profiles import ComputeDtype, Placement, Profile, WeightsFormat

STANDINS = ["tiny-sd15", "tiny-sdxl", "tiny-flux", "tiny-sd3"]
CPU = torch.device("cpu")


def rendered_models():
    catalog = default_catalog()
    return [name for name in catalog.names() if catalog.get(name).family.name in FAMILIES]


@pytest.mark.parametrize("name", rendered_models())
def test_each_family_names_the_components_the_catalog_plans_for(name):
    entry = default_catalog().get(name)
    family = family_for(entry)
    assert family.name == entry.family.name
    assert family.denoiser == entry.denoiser.name
    assert set(family.text_encoders) == {component.name for component in entry.text_encoders}
    # The large text encoder is the one the planner lets a profile quantize; the CLIP encoders never are.
    quantizable = {component.name for component in entry.text_encoders if component.quantize}
    assert quantizable == ({family.large_text_encoder} if family.large_text_encoder else set())
    # A profile may drop only what the pipeline renders without (SD3's T5).
    droppable = {component.name for component in entry.text_encoders if component.droppable}
    assert droppable == ({family.large_text_encoder} if family.large_text_encoder_optional else set())
    assert family.fp16_clamp == entry.family.fp16_clamp


@pytest.mark.parametrize("name", STANDINS)
def test_a_standin_pipeline_holds_what_its_family_names_and_guides_as_the_catalog_says(name):
    entry = default_catalog().get(name)
    family = family_for(entry)
    pipe = load_pipeline(entry)
    assert type(getattr(pipe, family.denoiser)).__name__ == family.denoiser_class
    assert all(getattr(pipe, encoder, None) is not None for encoder in family.text_encoders)
    assert family.does_cfg(pipe, 5.0) is entry.family.uses_cfg
    assert family.does_cfg(pipe, 1.0) is False  # guidance 1 is the unguided prediction: one pass


def test_the_plain_maps_are_the_classes_facts():
    assert DENOISERS == {"sd15": "unet", "sdxl": "unet", "flux": "transformer", "sd3": "transformer"}
    assert TEXT_ENCODERS["sdxl"] == ("text_encoder", "text_encoder_2")
    assert TEXT_ENCODERS["sd3"] == ("text_encoder", "text_encoder_2", "text_encoder_3")
    assert LARGE_TEXT_ENCODER == {"flux": "text_encoder_2", "sd3": "text_encoder_3"}
    assert family_named("flux") is FAMILIES["flux"]
    assert denoiser_class("sd3") == "SD3Transformer2DModel"


def _unknown_family_model():
    base = default_catalog().get("sd3.5-large")
    family = base.family.model_copy(update={"name": "hidream"})
    return base.model_copy(update={"name": "hidream-i1", "family": family})


def test_a_family_the_workers_cannot_render_is_refused_by_name():
    unknown = _unknown_family_model()
    with pytest.raises(ValueError, match=r"hidream-i1.*'hidream'.*sd15, sdxl, flux, sd3"):
        family_for(unknown)
    request = RenderRequest("job", "a red fox", "", 1024, 1024, 2, 5.0, 1, 1)
    with pytest.raises(ValueError, match="'hidream'"):
        render_batch(object(), unknown, [request])
    with pytest.raises(ValueError, match="no render family 'hidream'"):
        family_named("hidream")
    assert why_unloadable(unknown).startswith("family not supported")


def test_every_family_of_the_catalog_renders_or_is_refused_at_submit():
    """Issue 17: the catalog has no model a node would accept and then fail to build. Each family either
    renders (a render family, a diffusers pipeline class, a stand-in recipe of that class and a stand-in in the
    catalog, which the render tests run) or is listed for planning only (refused at submit, and every node
    reports it unloadable)."""
    catalog = default_catalog()
    entries = [catalog.get(name) for name in catalog.names()]
    standins = {e.family.name for e in entries if e.standin}
    for entry in entries:
        family = entry.family
        if family.planning_only:
            assert family.name not in FAMILIES and why_unloadable(entry).startswith("family not supported")
            continue
        assert family_for(entry).name == family.name, entry.name
        assert family.name in standins, entry.name
        assert getattr(diffusers, family.pipeline, None) is not None, entry.name
    for name in standins:
        family = next(e.family for e in entries if e.family.name == name)
        assert type(build_standin(name)).__name__ == family.pipeline
    # Nothing in today's catalog is planning-only: every family renders.
    assert not any(e.family.planning_only for e in entries)
    planning_only = _unknown_family_model()
    planning_only = planning_only.model_copy(
        update={"family": planning_only.family.model_copy(update={"name": "sd3", "planning_only": True})})
    assert why_unloadable(planning_only) == "family not supported: sd3 is listed for planning only"


# --- SD3: what diffusers' StableDiffusion3Pipeline does, which the SD3 family relies on ----------------------


def _sd3(drop_t5: bool = False):
    model = default_catalog().get("tiny-sd3")
    profile = Profile("fp32" + ("+no-t5" if drop_t5 else ""), WeightsFormat.FP32, ComputeDtype.FP32, Placement.GPU,
                      drop_large_text_encoder=drop_t5)
    return model, load_pipeline(model, profile=profile)


def _clip_ids(tokenizer, prompts):
    return tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_sd3_prompt_embeddings_are_both_clips_padded_to_t5_width_then_t5_along_the_sequence():
    model, pipe = _sd3()
    family = family_for(model)
    prompts = ["a red fox", "a whale in the fog"]
    t5_tokens = family.t5_max_length(pipe)
    assert t5_tokens == min(256, pipe.tokenizer_3.model_max_length) == 64  # the stand-in's T5 context
    got = family.encode(pipe, prompts, ["", "blurry"], do_cfg=True, device=CPU)
    assert set(got) == {"prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                        "negative_pooled_prompt_embeds"}
    embeds = got["prompt_embeds"]
    assert embeds.shape == (2, 77 + t5_tokens, pipe.transformer.config.joint_attention_dim)
    assert got["negative_prompt_embeds"].shape == embeds.shape

    with torch.no_grad():  # the same thing by hand, as pipeline_stable_diffusion_3.py builds it
        clip_l = pipe.text_encoder(_clip_ids(pipe.tokenizer, prompts), output_hidden_states=True)
        clip_g = pipe.text_encoder_2(_clip_ids(pipe.tokenizer_2, prompts), output_hidden_states=True)
        t5_ids = pipe.tokenizer_3(prompts, padding="max_length", max_length=t5_tokens, truncation=True,
                                  add_special_tokens=True, return_tensors="pt").input_ids
        t5 = pipe.text_encoder_3(t5_ids)[0]
    clip = torch.cat([clip_l.hidden_states[-2], clip_g.hidden_states[-2]], dim=-1)  # penultimate layers
    torch.testing.assert_close(embeds[:, :77, : clip.shape[-1]], clip)
    assert torch.count_nonzero(embeds[:, :77, clip.shape[-1]:]) == 0  # zero-padded to T5's width
    torch.testing.assert_close(embeds[:, 77:], t5)
    pooled = torch.cat([clip_l.text_embeds, clip_g.text_embeds], dim=-1)  # both pooled projections
    torch.testing.assert_close(got["pooled_prompt_embeds"], pooled)

    # Under CFG an empty negative prompt is encoded like any text: no zero embedding (unlike SDXL).
    empty = family.encode(pipe, [""], [""], do_cfg=False, device=CPU)
    assert set(empty) == {"prompt_embeds", "pooled_prompt_embeds"}  # no negative pass without CFG
    torch.testing.assert_close(got["negative_prompt_embeds"][:1], empty["prompt_embeds"])
    assert torch.count_nonzero(got["negative_prompt_embeds"][0, :77]) > 0
    # Each prompt's rows are its own: padded to fixed lengths, never to the longest prompt of the batch.
    alone = family.encode(pipe, prompts[1:], ["blurry"], do_cfg=True, device=CPU)
    torch.testing.assert_close(alone["prompt_embeds"][0], embeds[1])


def test_sd3_without_t5_puts_zeros_of_the_same_shape_in_its_place():
    """text_encoder_3=None, the published way to save T5's memory: the pipeline's `_get_t5_prompt_embeds`
    returns zeros (max_sequence_length x joint_attention_dim, in the CLIP encoder's dtype), so the sequence the
    transformer attends over keeps its length and the CLIP part is unchanged."""
    model, with_t5 = _sd3()
    _, without = _sd3(drop_t5=True)
    assert without.text_encoder_3 is None and without.tokenizer_3 is not None
    assert "text_encoder_3" not in {n for n, c in without.components.items() if isinstance(c, torch.nn.Module)}
    family = family_for(model)
    prompts = ["a red fox", "a lighthouse"]
    full = family.encode(with_t5, prompts, ["", "blurry"], do_cfg=True, device=CPU)
    clip_only = family.encode(without, prompts, ["", "blurry"], do_cfg=True, device=CPU)
    for name in full:
        assert clip_only[name].shape == full[name].shape and clip_only[name].dtype == without.text_encoder.dtype
    for name in ("prompt_embeds", "negative_prompt_embeds"):
        torch.testing.assert_close(clip_only[name][:, :77], full[name][:, :77])
        assert torch.count_nonzero(clip_only[name][:, 77:]) == 0
        assert torch.count_nonzero(full[name][:, 77:]) > 0
    torch.testing.assert_close(clip_only["pooled_prompt_embeds"], full["pooled_prompt_embeds"])


@pytest.mark.parametrize("drop_t5", [False, True], ids=["t5", "no-t5"])
def test_sd3_render_batch_gives_the_pipelines_own_image(drop_t5):
    """Our encode (embeddings passed in), call arguments and decode (latents / scaling_factor + shift_factor,
    then the VAE) against the pipeline's own `__call__` from the prompt, same seed: the same picture."""
    model, pipe = _sd3(drop_t5)
    family = family_for(model)
    assert family.does_cfg(pipe, 4.5) and not family.does_cfg(pipe, 1.0)  # guidance > 1: a negative pass
    [ours] = render_batch(pipe, model, [RenderRequest("job", "a red fox", "blurry", 48, 64, 3, 4.5, 7, 1)])
    theirs = pipe("a red fox", negative_prompt="blurry", width=48, height=64, num_inference_steps=3,
                  guidance_scale=4.5, generator=[torch.Generator().manual_seed(7)],
                  max_sequence_length=family.t5_max_length(pipe)).images[0]
    ours_pixels = np.asarray(Image.open(io.BytesIO(ours.images[0])).convert("RGB"), dtype=np.int16)
    assert np.abs(ours_pixels - np.asarray(theirs, dtype=np.int16)).max() <= 1


def test_original_gguf_key_names_are_flux_only():
    with pytest.raises(ValueError, match="only for Flux"):
        family_named("sdxl").to_original_keys({}, {})
