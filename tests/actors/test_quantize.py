"""Weights formats on the tiny stand-ins: each loaded through the library path a GPU node uses, rendered, and
checked to really be stored in the claimed format (fp8 storage dtype, bitsandbytes Params4bit, GGUF types)."""

from __future__ import annotations

import os

# No model hub is reachable: never wait on one (set before diffusers / huggingface_hub are imported).
os.environ["HF_HUB_OFFLINE"] = "1"

import types
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch

from renderfarm.actors import gguf_standins, quantize
from renderfarm.actors.loading import load_pipeline
from renderfarm.actors.pipelines import RenderRequest, render_batch
from renderfarm.actors.standins import ensure_standin
from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.profiles import ComputeDtype, Placement, Profile, WeightsFormat

W = WeightsFormat
NO_CUDA = not torch.cuda.is_available()


def entry(name: str):
    return default_catalog().get(name)


def profile(weights: WeightsFormat, compute: ComputeDtype = ComputeDtype.BF16, **fields) -> Profile:
    return Profile(f"test-{weights.value}-{compute.value}", weights, compute, Placement.GPU, **fields)


def render(pipe, model, **fields) -> list[bool]:
    """Render one 64x64 image in 2 steps; returns whether each VAE decoder output was finite."""
    finite: list[bool] = []
    handle = pipe.vae.decoder.register_forward_hook(
        lambda _m, _a, out: finite.append(bool(torch.isfinite(out).all()))
    )
    try:
        request = RenderRequest(
            job_id="job", prompt="a red fox", negative_prompt="blurry", width=64, height=64, steps=2,
            guidance=5.0, seed=3, num_images=1,
        )
        for name, value in fields.items():
            setattr(request, name, value)
        [result] = render_batch(pipe, model, [request])
    finally:
        handle.remove()
    assert len(result.images) == 1 and result.images[0].startswith(b"\x89PNG")
    return finite


# --- fp8 storage -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, weights", [("tiny-flux", W.FP8_E4M3FN), ("tiny-flux", W.FP8_E5M2), ("tiny-sdxl", W.FP8_E4M3FN)]
)
def test_fp8_layerwise_casting_stores_fp8_and_computes_in_bf16(name, weights):
    model = entry(name)
    pipe = load_pipeline(model, profile=profile(weights))
    storage = quantize.FP8_STORAGE[weights]
    if name == "tiny-flux":
        block = pipe.transformer.transformer_blocks[0]
        assert block.attn.to_q.weight.dtype == storage
        assert block.ff.net[2].weight.dtype == storage
        assert block.attn.norm_q.weight.dtype == torch.bfloat16  # norms skipped, as diffusers does
        # T5 follows the denoiser's format (Profile.text_encoder_weights None); its embedding and `wo` stay.
        t5 = pipe.text_encoder_2
        assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == storage
        assert t5.shared.weight.dtype == torch.bfloat16
        assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.bfloat16
        assert t5.dtype == torch.bfloat16  # what the pipeline casts the prompt embeddings to
        assert pipe.text_encoder.encoder.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    else:
        assert pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.dtype == storage
        assert pipe.unet.dtype == torch.bfloat16  # diffusers reports the compute dtype
    assert render(pipe, model) == [True]


# --- bitsandbytes 4-bit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [W.NF4, W.FP4])
def test_bnb_4bit_flux_denoiser_and_t5_are_quantized_and_render(weights):
    import bitsandbytes as bnb

    model = entry("tiny-flux")
    pipe = load_pipeline(model, profile=profile(weights))
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, bnb.nn.Linear4bit)
    assert isinstance(to_q.weight, bnb.nn.Params4bit) and to_q.weight.dtype == torch.uint8
    assert to_q.weight.quant_state.quant_type == weights.value
    assert quantize.bnb_linear_count(pipe.transformer) > 10
    # transformers' BitsAndBytesConfig for T5; the small CLIP encoder stays in the compute dtype.
    t5_q = pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(t5_q, bnb.nn.Linear4bit) and t5_q.weight.quant_state.quant_type == weights.value
    assert quantize.bnb_linear_count(pipe.text_encoder) == 0
    if NO_CUDA:
        assert any("No GPU found" in note for note in pipe.renderfarm_info.notes)
    assert render(pipe, model) == [True]


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_bnb_nf4_unet_renders(name):
    import bitsandbytes as bnb

    model = entry(name)
    pipe = load_pipeline(model, profile=profile(W.NF4))
    layer = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].ff.net[2]
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.quant_type == "nf4"
    assert render(pipe, model) == [True]


def test_t5_in_nf4_under_a_bf16_denoiser():
    import bitsandbytes as bnb

    model = entry("tiny-flux")
    pipe = load_pipeline(model, profile=profile(W.BF16, text_encoder_weights=W.NF4))
    assert quantize.bnb_linear_count(pipe.transformer) == 0
    assert isinstance(pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q, bnb.nn.Linear4bit)
    assert render(pipe, model) == [True]


@pytest.mark.skipif(not NO_CUDA, reason="diffusers only refuses bitsandbytes where no GPU exists")
def test_diffusers_refuses_bnb_on_cpu_without_the_bypass_and_the_bypass_is_undone():
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import (
        BnB4BitDiffusersQuantizer,
    )

    folder = ensure_standin(entry("tiny-flux"))
    config = quantize.diffusers_bnb_config(W.NF4, torch.bfloat16)
    original = BnB4BitDiffusersQuantizer.validate_environment
    with quantize.bnb_without_gpu_check():
        assert BnB4BitDiffusersQuantizer.validate_environment is not original
    assert BnB4BitDiffusersQuantizer.validate_environment is original
    with pytest.raises(RuntimeError, match="No GPU found"):
        diffusers.FluxTransformer2DModel.from_pretrained(
            folder, subfolder="transformer", quantization_config=config, device_map="cpu"
        )


def test_bnb_bypass_lets_other_validation_errors_through(monkeypatch):
    from diffusers.quantizers.bitsandbytes import bnb_quantizer

    def refuse(self, *args, **kwargs):
        raise ValueError("Some modules are dispatched on the CPU or the disk")

    monkeypatch.setattr(bnb_quantizer.BnB4BitDiffusersQuantizer, "validate_environment", refuse)
    quantizer = bnb_quantizer.BnB4BitDiffusersQuantizer(quantize.diffusers_bnb_config(W.NF4, torch.bfloat16))
    with quantize.bnb_without_gpu_check(), pytest.raises(ValueError, match="dispatched"):
        quantizer.validate_environment(device_map="cpu")


# --- GGUF ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [W.GGUF_Q8_0, W.GGUF_Q5_0, W.GGUF_Q5_1, W.GGUF_Q4_0, W.GGUF_Q4_1])
def test_gguf_flux_written_with_the_gguf_package_loads_and_renders(weights):
    from diffusers.quantizers.gguf.utils import GGUFLinear

    model = entry("tiny-flux")
    pipe = load_pipeline(model, profile=profile(weights))
    folder = ensure_standin(model)
    written = folder / "gguf" / f"{weights.gguf_type.lower()}.gguf"
    assert gguf_standins.standin_gguf_path(folder, weights) == written and written.is_file()
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, GGUFLinear) and to_q.compute_dtype == torch.bfloat16
    assert to_q.weight.quant_type.name == weights.gguf_type
    counts = quantize.gguf_quant_types(pipe.transformer)
    assert set(counts) == {weights.gguf_type} and counts[weights.gguf_type] >= 20
    # The embedders and the final layer stay precise, as community files keep them.
    assert not hasattr(pipe.transformer.x_embedder.weight, "quant_type")
    assert render(pipe, model) == [True]


def test_gguf_with_original_flux_key_names_converts_to_the_same_weights(tmp_path):
    import gguf
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    model = entry("tiny-flux")
    folder = ensure_standin(model)
    bfl_file = gguf_standins.ensure_standin_gguf(model, W.GGUF_Q4_0, folder, key_names="bfl")
    assert bfl_file.name == "q4_0-bfl.gguf"
    names = {tensor.name for tensor in gguf.GGUFReader(str(bfl_file)).tensors}
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight",
            "final_layer.adaLN_modulation.1.weight", "img_in.weight"} <= names
    assert not any(name.startswith("transformer_blocks.") for name in names)

    bfl = load_pipeline(model, profile=profile(W.GGUF_Q4_0), gguf_file=bfl_file)
    ours = load_pipeline(model, profile=profile(W.GGUF_Q4_0))  # diffusers key names
    assert quantize.gguf_quant_types(bfl.transformer) == quantize.gguf_quant_types(ours.transformer)
    loaded = dict(bfl.transformer.named_parameters())
    for name, expected in ours.transformer.named_parameters():
        got = loaded[name]
        assert getattr(got, "quant_type", None) == getattr(expected, "quant_type", None), name
        assert torch.equal(dequantize_gguf_tensor(got), dequantize_gguf_tensor(expected)), name
    assert render(bfl, model) == [True]


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_gguf_unets_load_through_diffusers_single_file_path(name):
    model = entry(name)
    pipe = load_pipeline(model, profile=profile(W.GGUF_Q8_0))
    assert quantize.gguf_quant_types(pipe.unet)["Q8_0"] > 10
    conv = pipe.unet.conv_in.weight
    assert not hasattr(conv, "quant_type") and conv.dtype == torch.bfloat16  # convolutions stay unquantized
    assert render(pipe, model) == [True]


def test_standin_gguf_is_written_once_atomically():
    model = entry("tiny-flux")
    folder = ensure_standin(model)
    path = gguf_standins.ensure_standin_gguf(model, W.GGUF_Q8_0, folder)
    stamp = path.stat().st_mtime_ns
    assert gguf_standins.ensure_standin_gguf(model, W.GGUF_Q8_0, folder) == path
    assert path.stat().st_mtime_ns == stamp
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_bfl_names_exist_only_for_flux(tmp_path):
    folder = ensure_standin(entry("tiny-sd15"))
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    with pytest.raises(ValueError, match="only for Flux"):
        gguf_standins.write_gguf(unet, tmp_path / "x.gguf", W.GGUF_Q8_0, "sd15", key_names="bfl")
    assert not list(tmp_path.iterdir())


def test_gguf_source_reads_the_catalog_mapping(tmp_path):
    local = tmp_path / "flux1-dev-Q8_0.gguf"
    local.write_bytes(b"")
    real = types.SimpleNamespace(
        name="flux-dev",
        gguf_sources={"q8_0": str(local), "Q4_1": "city96/FLUX.1-dev-gguf/flux1-dev-Q4_1.gguf"},
    )
    assert quantize.gguf_source(real, W.GGUF_Q8_0) == str(local)
    assert quantize.gguf_source(real, W.GGUF_Q4_1) == (
        "https://huggingface.co/city96/FLUX.1-dev-gguf/flux1-dev-Q4_1.gguf"
    )
    with pytest.raises(FileNotFoundError, match=r"flux-dev.*gguf-q5_0.*gguf_sources"):
        quantize.gguf_source(real, W.GGUF_Q5_0)


def test_real_model_gguf_comes_from_its_catalog_sources():
    from renderfarm.actors.loading import ModelSourceError

    flux_dev = entry("flux-dev")
    listed = getattr(flux_dev, "gguf_sources", None) or {}
    unlisted = next(w for w in (W.GGUF_Q5_0, W.GGUF_Q5_1, W.GGUF_Q4_1) if w.gguf_type.lower() not in listed)
    with pytest.raises(ModelSourceError, match=rf"flux-dev.*{unlisted.value}.*gguf_sources"):
        load_pipeline(flux_dev, profile=profile(unlisted))
    if "q8_0" in listed:  # offline, the listed hub file is not in the local cache: named in the error
        file_name = listed["q8_0"].rsplit("/", 1)[-1]
        with pytest.raises(ModelSourceError, match=rf"flux-dev.*{file_name}"):
            load_pipeline(flux_dev, profile=profile(W.GGUF_Q8_0))


def test_gguf_needs_a_single_file_loadable_denoiser():
    class NoSingleFile(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match=r"gguf-q8_0.*sd15 denoiser.*NoSingleFile"):
        quantize.load_gguf_denoiser(
            NoSingleFile, "x.gguf", "cfg", "unet", torch.bfloat16, torch.device("cpu"), "sd15", W.GGUF_Q8_0
        )


# --- compute dtypes and the Flux fp16 clamp -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sdxl", "tiny-sd15", "tiny-sd3"])
@pytest.mark.parametrize("compute", [ComputeDtype.FP16, ComputeDtype.BF16])
def test_half_precision_compute_renders_finite_images(name, compute):
    model = entry(name)
    clamp = name == "tiny-flux" and compute is ComputeDtype.FP16
    pipe = load_pipeline(model, profile=profile(W.BF16 if compute is ComputeDtype.BF16 else W.FP16, compute,
                                                fp16_clamp=clamp))
    denoiser = pipe.transformer if name in ("tiny-flux", "tiny-sd3") else pipe.unet
    assert denoiser.dtype == quantize.torch_dtype(compute)
    assert pipe.vae.dtype == quantize.torch_dtype(compute)
    assert render(pipe, model) == [True]
    if name == "tiny-sdxl" and compute is ComputeDtype.FP16:
        assert pipe.vae.dtype == torch.float16  # the SDXL fp32 upcast for decoding is undone afterwards


def _overflow_first_block(pipe):
    # A feed-forward output far past float16's range: what a real Flux does on some prompts in fp16.
    return pipe.transformer.transformer_blocks[0].ff.register_forward_hook(lambda _m, _a, out: out * 1e6)


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # the unguarded render's NaNs
def test_fp16_clamp_keeps_flux_activations_finite():
    model = entry("tiny-flux")
    clamped = load_pipeline(model, profile=profile(W.FP16, ComputeDtype.FP16, fp16_clamp=True))
    for block in [*clamped.transformer.transformer_blocks, *clamped.transformer.single_transformer_blocks]:
        assert quantize._clamp_block_output in block._forward_hooks.values()
    unguarded = load_pipeline(model, profile=profile(W.FP16, ComputeDtype.FP16))
    assert not unguarded.transformer.transformer_blocks[0]._forward_hooks

    _overflow_first_block(clamped)
    _overflow_first_block(unguarded)
    assert render(clamped, model) == [True]
    assert render(unguarded, model) == [False]  # the same overflow without the clamp ruins the image


def test_fp16_clamp_hooks_leave_bf16_untouched():
    hidden = torch.full((1, 2), float("inf"), dtype=torch.bfloat16)
    text = torch.tensor([[float("nan"), 70000.0]], dtype=torch.float16)
    out_text, out_hidden = quantize._clamp_block_output(None, (), (text, hidden))
    assert out_hidden is hidden
    assert out_text.tolist() == [[0.0, 65504.0]]


def test_fp16_clamp_is_a_flux_guard():
    with pytest.raises(ValueError, match="fp16_clamp guards Flux"):
        load_pipeline(entry("tiny-sd15"), profile=profile(W.FP16, ComputeDtype.FP16, fp16_clamp=True))


def test_quantized_formats_agree_with_full_precision_roughly():
    # Not a quality claim about random weights: a check that the formats compute the same function.
    model = entry("tiny-flux")
    folder = ensure_standin(model)
    reference = diffusers.FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    q8 = quantize.load_gguf_denoiser(
        diffusers.FluxTransformer2DModel, str(gguf_standins.ensure_standin_gguf(model, W.GGUF_Q8_0, folder)),
        str(folder), "transformer", torch.float32, torch.device("cpu"), "flux", W.GGUF_Q8_0,
    )
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, 64, generator=generator),
        "pooled_projections": torch.randn(1, 64, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
        "return_dict": False,
    }
    with torch.no_grad():
        expected = reference(**inputs)[0]
        got = q8(**inputs)[0]
    relative = (got - expected).norm() / expected.norm()
    assert float(relative) < 0.05
    assert np.isfinite(got.numpy()).all()


# --- SD3: the same formats on an MMDiT and its T5 (text_encoder_3) -----------------------------------------


def test_sd3_fp8_stores_the_transformer_and_t5_in_fp8_and_never_the_clips():
    model = entry("tiny-sd3")
    pipe = load_pipeline(model, profile=profile(W.FP8_E4M3FN))
    block = pipe.transformer.transformer_blocks[0]
    assert block.attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert block.attn2.to_q.weight.dtype == torch.float8_e4m3fn  # MMDiT-X's second attention too
    assert block.attn.norm_q.weight.dtype == torch.bfloat16  # SD 3.5's RMS norms are skipped
    assert pipe.transformer.pos_embed.proj.weight.dtype == torch.bfloat16  # so is the patch embedding
    t5 = pipe.text_encoder_3
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float8_e4m3fn
    assert t5.shared.weight.dtype == torch.bfloat16 and t5.dtype == torch.bfloat16
    for clip in (pipe.text_encoder, pipe.text_encoder_2):
        assert clip.text_model.encoder.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert render(pipe, model) == [True]


def test_sd3_nf4_quantizes_the_transformer_and_t5_and_never_the_clips():
    import bitsandbytes as bnb

    model = entry("tiny-sd3")
    pipe = load_pipeline(model, profile=profile(W.NF4))
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, bnb.nn.Linear4bit) and to_q.weight.quant_state.quant_type == "nf4"
    assert quantize.bnb_linear_count(pipe.transformer) > 10
    assert quantize.bnb_linear_count(pipe.text_encoder_3) > 0
    assert quantize.bnb_linear_count(pipe.text_encoder) == quantize.bnb_linear_count(pipe.text_encoder_2) == 0
    assert render(pipe, model) == [True]


def test_sd3_t5_in_nf4_under_a_bf16_transformer():
    """The SD3 ladder's `bf16+te-nf4` rung: T5 is most of SD3's memory, the transformer keeps 16 bits."""
    import bitsandbytes as bnb

    model = entry("tiny-sd3")
    pipe = load_pipeline(model, profile=profile(W.BF16, text_encoder_weights=W.NF4))
    assert quantize.bnb_linear_count(pipe.transformer) == 0 and pipe.transformer.dtype == torch.bfloat16
    assert isinstance(pipe.text_encoder_3.encoder.block[0].layer[0].SelfAttention.q, bnb.nn.Linear4bit)
    assert render(pipe, model) == [True]


@pytest.mark.parametrize("weights", [W.GGUF_Q8_0, W.GGUF_Q4_0])
def test_gguf_sd3_transformer_with_diffusers_key_names_loads_and_renders(weights):
    from diffusers.quantizers.gguf.utils import GGUFLinear

    model = entry("tiny-sd3")
    pipe = load_pipeline(model, profile=profile(weights))
    to_q = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(to_q, GGUFLinear) and to_q.weight.quant_type.name == weights.gguf_type
    assert quantize.gguf_quant_types(pipe.transformer)[weights.gguf_type] >= 20
    # The embedders and the final layer stay precise, as for Flux (gguf_standins._KEEP_PRECISE).
    assert not hasattr(pipe.transformer.context_embedder.weight, "quant_type")
    assert not hasattr(pipe.transformer.proj_out.weight, "quant_type")
    assert pipe.text_encoder_3.dtype == torch.bfloat16  # GGUF is for denoisers: T5 in the compute dtype
    assert render(pipe, model) == [True]


def test_formats_that_are_not_theirs_are_refused():
    with pytest.raises(ValueError, match="not an fp8"):
        quantize.enable_fp8_storage(torch.nn.Linear(64, 64), W.NF4, torch.bfloat16)
    with pytest.raises(ValueError, match="not a bitsandbytes"):
        quantize.bnb_quant_type(W.FP8_E4M3FN)
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf_standins.gguf_qtype(W.BF16)


def test_gguf_file_only_with_a_gguf_profile(tmp_path: Path):
    with pytest.raises(ValueError, match="gguf_file"):
        load_pipeline(entry("tiny-flux"), profile=profile(W.NF4), gguf_file=tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="gguf_file"):
        load_pipeline(entry("tiny-flux"), gguf_file=tmp_path / "x.gguf")


@pytest.mark.parametrize("compute, kept", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_transformers_keeps_t5_wo_unquantized_in_the_compute_dtype_except_fp16(compute, kept):
    """What planning/vram.component_bytes counts for T5 under nf4: transformers' `_keep_in_fp32_modules`
    (`wo`) upcasts to fp32 only when the model loads in fp16, and bitsandbytes leaves those modules
    unquantized. Under bf16 they are bf16 (2 bytes), not fp32: predicting 4 bytes made nf4 T5 1.9 GiB too
    big and pushed real 8 GB cards to leaf offload. If transformers changes this, the planner must too."""
    import bitsandbytes as bnb
    from transformers import T5EncoderModel

    source = ensure_standin(entry("tiny-flux"))
    t5 = quantize.load_bnb_text_encoder(
        T5EncoderModel, str(source), "text_encoder_2", WeightsFormat.NF4, compute, torch.device("cpu")
    )
    wo = [m for name, m in t5.named_modules() if name.endswith(".wo")]
    assert wo, "T5 has no `wo` projections any more"
    assert all(not isinstance(m, bnb.nn.Linear4bit) for m in wo)
    assert {m.weight.dtype for m in wo} == {kept}
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in t5.modules())  # the rest is 4-bit
