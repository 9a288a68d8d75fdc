"""The real Flux.1-dev and SDXL architectures with random weights, for bench/gpu_profiles.py.

No weights can be downloaded here, so the GPU benchmark builds each pipeline from its published configs
(the config.json files of black-forest-labs/FLUX.1-dev and stabilityai/stable-diffusion-xl-base-1.0, with
their text encoders google/t5-v1_1-xxl, openai/clip-vit-large-patch14 and laion CLIP-ViT-bigG-14) with
random weights: the speed and memory are those of the real models, the pictures are noise.

The modules are created directly on the target device in the target dtype (`torch.device(...)` and the
default dtype set while they are built), so Flux's 11.9B-parameter transformer is initialised on the GPU
in seconds instead of minutes on a CPU. On the meta device nothing is allocated: that is how the tests
count the parameters against the catalog without a GPU.

Tokenizers and the schedulers come from the offline stand-ins (renderfarm/actors/standins.py: real
tokenizer classes over a small vocabulary, FLUX.1-dev's and SDXL's scheduler configs), with the T5
tokenizer's length raised to Flux-dev's 512 tokens: token ids stay below the real vocabulary sizes, so the
embedding tables have their real size.

`write_real_folder` saves the pipeline as a diffusers folder (what `load_pipeline` reads, so every profile
loads through the same code a node runs) and, when asked, the denoiser as a GGUF Q8_0 file.
`write_q8_0_gguf` writes the same file as `renderfarm.actors.gguf_standins.write_gguf` but quantizes with torch
on the weights' device, tensor by tensor: the `gguf` package's numpy quantizer needs ~6 minutes of one CPU
core for Flux's transformer.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("flux", "sdxl")
SEED = 0

# --- published configs --------------------------------------------------------------------------------

# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# black-forest-labs/FLUX.1-dev, vae/config.json
FLUX_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}
# google/t5-v1_1-xxl encoder (FLUX.1-dev text_encoder_2/config.json)
T5_XXL: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "tie_word_embeddings": False,
    "is_encoder_decoder": False,
    "use_cache": False,
}
T5_MAX_LENGTH = 512  # FLUX.1-dev's max_sequence_length
# openai/clip-vit-large-patch14 text model (FLUX.1-dev and SDXL text_encoder/config.json)
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
# laion/CLIP-ViT-bigG-14 text model (SDXL text_encoder_2/config.json)
CLIP_BIGG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
}
# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json
SDXL_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


# --- building -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def building_on(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules created inside are allocated on `device` in `dtype` (no CPU copy, no fp32 first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _clip_config(base: dict[str, Any], tokenizer: Any):
    from transformers import CLIPTextConfig

    # The pooled output is read at the end-of-text token: the ids must be the tokenizer's.
    return CLIPTextConfig(
        **base, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_real_pipeline(family: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.bfloat16,
                        seed: int = SEED):
    """The real architecture of `family` ("flux": FLUX.1-dev, "sdxl": SDXL base 1.0) with random weights,
    created on `device` in `dtype`. On "meta" nothing is allocated (parameter counts only)."""
    import diffusers
    import transformers

    from renderfarm.actors.standins import build_standin

    if family not in FAMILIES:
        raise ValueError(f"no real architecture for family {family!r}; known: {', '.join(FAMILIES)}")
    tiny = build_standin(family)  # tokenizers and scheduler only
    tokenizer = tiny.tokenizer
    tokenizer_2 = tiny.tokenizer_2
    if device != "meta" and torch.device(device).type != "meta":
        torch.manual_seed(seed)
    with building_on(device, dtype):
        text_encoder = transformers.CLIPTextModel(_clip_config(CLIP_L, tokenizer)).eval()
        if family == "flux":
            tokenizer_2.model_max_length = T5_MAX_LENGTH
            t5 = transformers.T5Config(
                **T5_XXL, pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
            )
            text_encoder_2 = transformers.T5EncoderModel(t5).eval()
            vae = diffusers.AutoencoderKL(**FLUX_VAE).eval()
            transformer = diffusers.FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER).eval()
            return diffusers.FluxPipeline(
                scheduler=tiny.scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
            )
        text_encoder_2 = transformers.CLIPTextModelWithProjection(_clip_config(CLIP_BIGG, tokenizer_2)).eval()
        vae = diffusers.AutoencoderKL(**SDXL_VAE).eval()
        unet = diffusers.UNet2DConditionModel(**SDXL_UNET).eval()
        return diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=tiny.scheduler, force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )


def parameter_counts(pipe: Any) -> dict[str, int]:
    """Parameters of each torch module of a pipeline, by attribute name."""
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


def write_real_folder(family: str, folder: Path, device: str | torch.device, gguf_q8_0: bool = False,
                      say: Any = None) -> dict[str, Any]:
    """Build `family`'s real architecture on `device` in bf16, save it to `folder` as a diffusers pipeline
    and, with `gguf_q8_0`, its denoiser as `folder/gguf/q8_0.gguf`. Returns what was written and how long
    each part took."""
    say = say or (lambda _msg: None)
    folder = Path(folder)
    start = time.perf_counter()
    pipe = build_real_pipeline(family, device, torch.bfloat16)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    built = time.perf_counter()
    counts = parameter_counts(pipe)
    say(f"built {family} ({sum(counts.values()) / 1e9:.2f}B parameters) on {device} in {built - start:.1f} s")
    pipe.save_pretrained(folder)
    (folder / "renderfarm_bench.json").write_text(json.dumps({"family": family, "weights": "random",
                                                             "params": counts}, indent=2) + "\n")
    saved = time.perf_counter()
    say(f"saved to {folder} in {saved - built:.1f} s")
    gguf_path = None
    if gguf_q8_0:
        from renderfarm.actors.families import DENOISERS

        gguf_path = write_q8_0_gguf(getattr(pipe, DENOISERS[family]), folder / "gguf" / "q8_0.gguf", family)
        say(f"wrote {gguf_path} in {time.perf_counter() - saved:.1f} s")
    del pipe
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return {
        "folder": str(folder),
        "gguf_q8_0": str(gguf_path) if gguf_path else None,
        "params": counts,
        "build_s": round(built - start, 2),
        "save_s": round(saved - built, 2),
        "gguf_s": round(time.perf_counter() - saved, 2) if gguf_path else None,
    }


# --- GGUF Q8_0, quantized with torch ------------------------------------------------------------------

Q8_0_BLOCK = 32


def _roundf(x: torch.Tensor) -> torch.Tensor:
    # ggml's roundf: half away from zero (the gguf package's `np_roundf`), not torch's half to even.
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def q8_0_bytes(tensor: torch.Tensor, rows_per_chunk: int = 4096) -> Any:
    """`tensor` as GGUF Q8_0 blocks (per 32 weights: an fp16 scale, then 32 int8), a uint8 numpy array of
    shape (*shape[:-1], shape[-1] // 32 * 34): what `gguf.quants.quantize(array, Q8_0)` returns, computed
    on the tensor's device in chunks of rows."""
    import numpy as np

    if tensor.shape[-1] % Q8_0_BLOCK:
        raise ValueError(f"Q8_0 needs rows that are a multiple of {Q8_0_BLOCK}, got shape {tuple(tensor.shape)}")
    rows = tensor.detach().reshape(-1, tensor.shape[-1])
    out = np.empty((rows.shape[0], tensor.shape[-1] // Q8_0_BLOCK * (Q8_0_BLOCK + 2)), dtype=np.uint8)
    for first in range(0, rows.shape[0], rows_per_chunk):
        chunk = rows[first : first + rows_per_chunk].float()
        blocks = chunk.reshape(-1, Q8_0_BLOCK)
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        inverse = torch.where(d == 0, torch.zeros_like(d), 1 / d)
        qs = _roundf(blocks * inverse).to(torch.int8).view(torch.uint8)
        scales = d.to(torch.float16).view(torch.uint8)  # 2 little-endian bytes per block
        packed = torch.cat([scales, qs], dim=1).reshape(chunk.shape[0], -1)
        out[first : first + chunk.shape[0]] = packed.cpu().numpy()
    return out.reshape(*tensor.shape[:-1], out.shape[-1])


def write_q8_0_gguf(model: torch.nn.Module, path: Path, family: str) -> Path:
    """The file `renderfarm.actors.gguf_standins.write_gguf(model, path, GGUF_Q8_0, family)` writes (diffusers
    key names; Linear weights in Q8_0, everything else F32, the same tensors kept precise), quantized with
    torch where the weights are. Atomic: temp file + rename."""
    import gguf

    from renderfarm.actors import gguf_standins
    from renderfarm.planning.profiles import WeightsFormat

    weights = WeightsFormat.GGUF_Q8_0
    qtype = gguf_standins.gguf_qtype(weights)
    quantizable = gguf_standins._quantizable(model)  # the rule write_gguf applies
    writer = gguf_standins.gguf_writer(family, "diffusers", weights)  # the metadata write_gguf writes
    f32 = gguf.GGMLQuantizationType.F32
    for name, tensor in model.state_dict().items():
        if name in quantizable and tensor.shape[-1] % Q8_0_BLOCK == 0:
            writer.add_tensor(name, q8_0_bytes(tensor), raw_dtype=qtype)
        else:
            writer.add_tensor(name, tensor.detach().float().cpu().numpy(), raw_dtype=f32)
    return gguf_standins.commit_gguf(writer, path)
