"""The stand-in LoRAs (renderfarm/loras/standins.py) through diffusers' own LoRA loading, on the stand-in
pipelines as the farm loads them (actors.loading.load_pipeline, fp32 and bf16 on CPU), rendered as the farm renders
(actors.pipelines.render_batch): real adapters, both key styles, every stand-in family.

Pinned here, read in the installed diffusers 0.42 / peft 0.21 source first:
- kohya keys are converted on load: SD's `_convert_non_diffusers_lora_to_diffusers` (after
  `_maybe_map_sgm_blocks_to_diffusers` maps SDXL's SGM block names with the UNet's layers_per_block), Flux's
  `_convert_kohya_flux_lora_to_diffusers` (BFL names; qkv split into to_q/to_k/to_v);
- that Flux converter splits a single block's `linear1` at Flux.1's widths (3072, 3072, 3072, 12288)
  whatever the model, which is why the stand-ins leave that layer out;
- the SD3 loader converts no kohya keys: it loads nothing from them and raises nothing (a warning only),
  which is why the library refuses kohya SD3 files and SD3's stand-in LoRA is in diffusers keys only;
- transformers 5 flattened CLIPTextModel (no `text_model` level) and diffusers strips `text_model.` from
  LoRA keys when loading into it, so published text-encoder LoRA keys still land;
- `set_adapters([...], adapter_weights=[0.0])` makes every LoRA layer's scaling 0 (peft's
  `set_scale`: weight x alpha / r), which adds exactly nothing: the image is the base image bit for bit;
- `unload_lora_weights()` and `delete_adapters(...)` remove the layers: the base image again.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from renderfarm.actors.loading import load_pipeline
from renderfarm.actors.pipelines import RenderRequest, render_batch
from renderfarm.actors.standins import ensure_standin
from renderfarm.cli import main
from renderfarm.loras import LoraLibrary, read_header
from renderfarm.loras.standins import (
    STANDIN_LORA_MARKER,
    build_standin_lora,
    ensure_standin_loras,
    standin_lora_names,
)
from renderfarm.planning.catalog import default_catalog

NAMES = sorted(standin_lora_names())
ATTENTION_BLOCK = re.compile(r"(?:down_blocks\.\d+\.|up_blocks\.\d+\.|mid_block\.)attentions\.\d+")
VISIBLE = 4.0  # grey levels (of 255) by which weight 1.0 must move the image on average, at the least


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def lora_dir(cache_dir):
    return ensure_standin_loras(cache_dir)


@pytest.fixture(scope="module")
def library(lora_dir, tmp_path_factory):
    return LoraLibrary(lora_dir, hash_cache=tmp_path_factory.mktemp("hashes") / "lora-hashes.json")


def render(pipe, entry) -> np.ndarray:
    request = RenderRequest(job_id="j", prompt="a red fox in the snow", negative_prompt="blurry", width=64,
                            height=64, steps=2, guidance=entry.default_guidance, seed=7, num_images=1)
    [result] = render_batch(pipe, entry, [request])
    return np.asarray(Image.open(io.BytesIO(result.images[0]))).astype(np.int16)


def lora_layers(pipe) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(module, BaseTunerLayer) for component in pipe.components.values()
               if isinstance(component, torch.nn.Module) for module in component.modules())


def prompt_embedding(pipe) -> torch.Tensor:
    ids = pipe.tokenizer(["a red fox"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_the_folder_is_a_library_of_every_standin_family_in_both_key_styles(lora_dir, library, cache_dir):
    assert ensure_standin_loras(cache_dir) == lora_dir  # built once; the second call finds it
    marker = json.loads((lora_dir / STANDIN_LORA_MARKER).read_text())
    assert sorted(marker["loras"]) == NAMES
    assert library.problems == []
    found = {(i.name, i.family, i.style) for i in library.scan()}
    assert found == {(name, family, style) for name, (_model, family, style) in standin_lora_names().items()}
    assert {model for model, _f, _s in standin_lora_names().values()} == {
        entry.name for entry in default_catalog().models.values() if entry.standin}
    assert {(family, style) for _m, family, style in standin_lora_names().values()} == {
        (family, style) for family in ("sd15", "sdxl", "flux") for style in ("diffusers", "kohya")} | {
        ("sd3", "diffusers")}
    assert {i.rank for i in library.scan() if i.style == "kohya"} == {8}
    assert {i.rank for i in library.scan() if i.style == "diffusers"} == {4}


def test_standin_loras_are_deterministic():
    first = build_standin_lora("sdxl", "kohya", seed=3)
    again = build_standin_lora("sdxl", "kohya", seed=3)
    other = build_standin_lora("sdxl", "kohya", seed=4)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    ups = [v for k, v in first.items() if k.endswith("lora_up.weight")]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # a zero up matrix would change nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_each_standin_lora_loads_through_diffusers_and_changes_the_image_only_when_weighted(
        name, dtype, lora_dir, library, cache_dir):
    model, family, style = standin_lora_names()[name]
    entry = default_catalog().get(model)
    info = library.get(name)
    ensure_standin(entry, cache_dir)
    pipe = load_pipeline(entry, cache_dir, dtype=dtype)  # the fp16 LoRA weights on an fp32 or bf16 base
    base = render(pipe, entry)
    base_text = prompt_embedding(pipe)

    pipe.load_lora_weights(info.path, adapter_name=name)
    # Every component the library says the file adapts received an adapter, and nothing else did.
    adapted = {component for component, adapters in pipe.get_list_adapters().items() if name in adapters}
    assert adapted == set(info.components)
    assert lora_layers(pipe) > 0

    pipe.set_adapters([name], adapter_weights=[0.0])
    assert np.array_equal(render(pipe, entry), base), "weight 0 must render the base image exactly"
    if "text_encoder" in info.components:
        assert torch.equal(prompt_embedding(pipe), base_text)

    pipe.set_adapters([name], adapter_weights=[1.0])
    weighted = render(pipe, entry)
    change = np.abs(weighted - base).mean()
    assert change > VISIBLE, f"{name} at weight 1.0 moved the image by {change:.2f} grey levels only"
    if "text_encoder" in info.components:
        assert not torch.allclose(prompt_embedding(pipe), base_text)

    # delete_adapters drops the adapter's weights but leaves peft's wrapper layers in place, empty;
    # unload_lora_weights removes the wrappers too. Both render the base image.
    pipe.delete_adapters(name)
    assert pipe.get_list_adapters() == {} and lora_layers(pipe) > 0
    assert np.array_equal(render(pipe, entry), base)
    assert torch.equal(prompt_embedding(pipe), base_text)

    pipe.load_lora_weights(info.path, adapter_name=name)
    assert not np.array_equal(render(pipe, entry), base)  # loaded adapters are active at weight 1.0
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {} and lora_layers(pipe) == 0
    assert np.array_equal(render(pipe, entry), base)
    assert torch.equal(prompt_embedding(pipe), base_text)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_converts_kohya_sd_keys_onto_the_unet_and_text_encoders(family, lora_dir, cache_dir):
    entry = default_catalog().get(f"tiny-{family}")
    pipe = load_pipeline(entry, cache_dir)
    path = lora_dir / f"tiny-{family}-character.safetensors"
    if family == "sdxl":  # kohya writes SDXL's UNet with the SGM block names
        assert any(k.startswith("lora_unet_input_blocks_") for k in read_header(path).tensors)
    state_dict, alphas = pipe.lora_state_dict(str(path), unet_config=pipe.unet.config)
    assert not any(k.startswith("lora_") for k in state_dict)
    assert {k.split(".")[0] for k in state_dict} == ({"unet", "text_encoder", "text_encoder_2"} if family == "sdxl"
                                                     else {"unet", "text_encoder"})
    assert set(alphas.values()) == {4.0}  # kohya's alphas come back for diffusers to scale by (alpha / rank)
    # Every attention block of the stand-in's UNet is addressed, by its diffusers name (SDXL: mapped from
    # the SGM block numbers with the UNet's layers_per_block).
    addressed = {m[0] for k in state_dict if k.startswith("unet.") and (m := ATTENTION_BLOCK.match(k[5:]))}
    assert addressed == {n for n, _ in pipe.unet.named_modules() if ATTENTION_BLOCK.fullmatch(n)}


def test_diffusers_converts_kohya_flux_keys_and_splits_qkv(lora_dir):
    from diffusers import FluxPipeline

    state_dict = FluxPipeline.lora_state_dict(str(lora_dir / "tiny-flux-character.safetensors"))
    assert not any(k.startswith("lora_") for k in state_dict)
    for part in ("to_q", "to_k", "to_v"):
        assert f"transformer.transformer_blocks.0.attn.{part}.lora_A.weight" in state_dict
    assert "transformer.single_transformer_blocks.1.proj_out.lora_B.weight" in state_dict
    assert any(k.startswith("text_encoder.") for k in state_dict)


def test_diffusers_splits_a_flux_single_block_linear1_at_flux1s_widths():
    """Why the stand-ins carry no `single_blocks_N_linear1`: the converter splits its up weight at
    (3072, 3072, 3072, 12288) whatever the model. When this stops failing, the stand-ins can carry it."""
    from diffusers import FluxPipeline

    tiny = {"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(4, 64),
            "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(3 * 64 + 256, 4),
            "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(4.0)}
    with pytest.raises(AssertionError):
        FluxPipeline.lora_state_dict(tiny)


def test_the_sd3_loader_takes_nothing_from_kohya_keys_and_says_so_only_in_a_warning(cache_dir):
    entry = default_catalog().get("tiny-sd3")
    ensure_standin(entry, cache_dir)
    pipe = load_pipeline(entry, cache_dir)
    kohya = {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.randn(4, 64),
             "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.randn(3 * 64, 4),
             "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(4.0)}
    assert set(pipe.lora_state_dict(dict(kohya))) == set(kohya)  # not converted
    pipe.load_lora_weights(dict(kohya), adapter_name="kohya")  # no error...
    assert pipe.get_list_adapters() == {} and lora_layers(pipe) == 0  # ...and no adapter


def test_clip_lost_its_text_model_level_and_diffusers_strips_it_from_lora_keys(lora_dir, cache_dir):
    entry = default_catalog().get("tiny-sd15")
    pipe = load_pipeline(entry, cache_dir)
    assert not hasattr(pipe.text_encoder, "text_model")
    keys = read_header(lora_dir / "tiny-sd15-style.safetensors").tensors
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys)  # as published LoRAs
    pipe.load_lora_weights(str(lora_dir / "tiny-sd15-style.safetensors"), adapter_name="style")
    assert "style" in pipe.get_list_adapters()["text_encoder"]


def test_cli_lists_the_standin_loras_when_no_folder_is_set(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RENDERFARM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RENDERFARM_LORA_DIR", raising=False)
    assert main(["loras", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["dir"] == str(tmp_path / "cache" / "tiny-loras")
    assert sorted(row["name"] for row in doc["loras"]) == NAMES and doc["problems"] == []
    assert (tmp_path / "cache" / "lora-hashes.json").is_file()
