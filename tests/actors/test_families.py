"""The per-family render classes agree with the catalog and with the stand-in pipelines they drive."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from renderfarm.actors.families import (
    DENOISERS,
    FAMILIES,
    LARGE_TEXT_ENCODER,
    TEXT_ENCODERS,
    family_for,
    family_named,
)
from renderfarm.actors.loading import load_pipeline
from renderfarm.actors.pipelines import RenderRequest, render_batch
from renderfarm.planning.catalog import default_catalog

STANDINS = ["tiny-sd15", "tiny-sdxl", "tiny-flux"]


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
    assert DENOISERS == {"sd15": "unet", "sdxl": "unet", "flux": "transformer"}
    assert TEXT_ENCODERS["sdxl"] == ("text_encoder", "text_encoder_2")
    assert LARGE_TEXT_ENCODER == {"flux": "text_encoder_2"}
    assert family_named("flux") is FAMILIES["flux"]


def test_a_family_the_workers_cannot_render_is_refused_by_name():
    sd3 = next(default_catalog().get(name) for name in default_catalog().names()
               if default_catalog().get(name).family.name == "sd3")
    with pytest.raises(ValueError, match=rf"{sd3.name}.*'sd3'.*sd15, sdxl, flux"):
        family_for(sd3)
    request = RenderRequest("job", "a red fox", "", 1024, 1024, 2, 5.0, 1, 1)
    with pytest.raises(ValueError, match="'sd3'"):
        render_batch(object(), sd3, [request])
    with pytest.raises(ValueError, match="no render family 'sd3'"):
        family_named("sd3")


def test_original_gguf_key_names_are_flux_only():
    with pytest.raises(ValueError, match="only for Flux"):
        family_named("sdxl").to_original_keys({}, {})
