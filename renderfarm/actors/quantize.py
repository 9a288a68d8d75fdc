"""How a denoiser's (and T5's) weights are stored and computed: one helper per weights format.

Every format goes through the library path a studio would use on a GPU node, unchanged:
- fp8 (e4m3fn / e5m2) storage: diffusers' layerwise casting (`enable_layerwise_casting`), which keeps each
  layer's weights in fp8 and upcasts them to the compute dtype for that layer's forward only.
- bitsandbytes nf4 / fp4: diffusers' `BitsAndBytesConfig` for the denoiser, transformers' for T5.
- GGUF Q8_0 / Q5_x / Q4_x: diffusers' `from_single_file(...,
  quantization_config=GGUFQuantizationConfig(...))`, which dequantizes each layer's blocks on the fly,
  straight to the compute dtype.

The one place this module steps around a library is `bnb_without_gpu_check` (read its docstring): diffusers
refuses bitsandbytes when no CUDA device exists, although bitsandbytes quantizes and runs 4-bit layers on
CPU. On a CUDA machine nothing is bypassed.

Stand-ins have no published GGUF files, so `ensure_standin_gguf` writes them with the `gguf` package, with
diffusers key names or with the original (Black Forest Labs) Flux key names that community Flux GGUFs use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from renderfarm.planning.catalog import ModelEntry
from renderfarm.planning.profiles import ComputeDtype, WeightsFormat

log = logging.getLogger(__name__)

TORCH_DTYPES: dict[ComputeDtype, torch.dtype] = {
    ComputeDtype.BF16: torch.bfloat16,
    ComputeDtype.FP16: torch.float16,
    ComputeDtype.FP32: torch.float32,
}

FP8_STORAGE: dict[WeightsFormat, torch.dtype] = {
    WeightsFormat.FP8_E4M3FN: torch.float8_e4m3fn,
    WeightsFormat.FP8_E5M2: torch.float8_e5m2,
}

# The finite range of float16: the Flux activation clamp maps +-inf onto it (and NaN onto 0).
FP16_MAX = 65504.0

# Which component is the denoiser, per family.
DENOISERS = {"flux": "transformer", "sdxl": "unet", "sd15": "unet"}


def torch_dtype(dtype: ComputeDtype) -> torch.dtype:
    return TORCH_DTYPES[dtype]


# --- fp8 storage: layerwise casting ------------------------------------------------------------------


def enable_fp8_storage(module: torch.nn.Module, weights: WeightsFormat, compute_dtype: torch.dtype) -> None:
    """Store `module`'s layer weights in fp8 and upcast each layer to `compute_dtype` for its forward.

    Norms, embeddings and the in/out projections stay in the compute dtype (diffusers' default skip list):
    they are small and the most sensitive to rounding. Works on diffusers models (`enable_layerwise_casting`)
    and on any other module such as transformers' T5 (`apply_layerwise_casting`, the same hook).
    """
    storage = FP8_STORAGE.get(weights)
    if storage is None:
        raise ValueError(f"{weights.value} is not an fp8 weights format")
    if hasattr(module, "enable_layerwise_casting"):
        module.enable_layerwise_casting(storage_dtype=storage, compute_dtype=compute_dtype)
        return
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    # transformers models report the dtype of their first floating parameter, and pipelines cast the prompt
    # embeddings to it: the token embedding (the first parameter) stays in the compute dtype.
    skip = (*DEFAULT_SKIP_MODULES_PATTERN, "embed", r"^shared$")
    if getattr(getattr(module, "config", None), "model_type", None) in ("t5", "umt5"):
        # T5's feed-forward casts its input to `wo.weight.dtype` before calling `wo` (its way of keeping `wo`
        # in fp32 under fp16), which would hand fp8 activations to the layer: `wo` stays in the compute
        # dtype, as transformers' `_keep_in_fp32_modules = ["wo"]` keeps it out of fp16.
        skip = (*skip, r"\.wo$")
    apply_layerwise_casting(
        module, storage_dtype=storage, compute_dtype=compute_dtype, skip_modules_pattern=skip
    )


# --- bitsandbytes 4-bit ------------------------------------------------------------------------------


def bnb_quant_type(weights: WeightsFormat) -> str:
    if not weights.is_bnb:
        raise ValueError(f"{weights.value} is not a bitsandbytes weights format")
    return weights.value  # "nf4" / "fp4": bitsandbytes' own names


def diffusers_bnb_config(weights: WeightsFormat, compute_dtype: torch.dtype):
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=bnb_quant_type(weights), bnb_4bit_compute_dtype=compute_dtype
    )


def transformers_bnb_config(weights: WeightsFormat, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=bnb_quant_type(weights), bnb_4bit_compute_dtype=compute_dtype
    )


_BNB_BYPASS_LOCK = threading.Lock()
_NO_GPU_MESSAGE = "No GPU found"


@contextlib.contextmanager
def bnb_without_gpu_check() -> Iterator[None]:
    """Let diffusers load a bitsandbytes 4-bit model onto the CPU when the machine has no CUDA device.

    THE BYPASS, exactly: `BnB4BitDiffusersQuantizer.validate_environment` begins with
    `if not (cuda or xpu or mps available): raise RuntimeError("No GPU found. ...")`. Inside this context
    that one RuntimeError is caught, and the checks the method would have run after it (accelerate >= 0.26,
    bitsandbytes >= 0.43.3) are run here instead; any other error still propagates. Nothing else in diffusers
    changes: the same quantizer replaces the Linear layers with bitsandbytes' `Linear4bit` and quantizes the
    weights (bitsandbytes' CPU backend), and the same `Linear4bit.forward` computes with them.

    Used only when the target device is the CPU and no CUDA device exists (see `load_bnb_denoiser`), with
    `device_map="cpu"`; the original method is restored on exit. A lock keeps two loads from interleaving
    the patch.
    """
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import (
        BnB4BitDiffusersQuantizer,
    )
    from diffusers.utils import is_accelerate_version, is_bitsandbytes_version

    original = BnB4BitDiffusersQuantizer.validate_environment

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        try:
            original(self, *args, **kwargs)
        except RuntimeError as exc:
            if not str(exc).startswith(_NO_GPU_MESSAGE):
                raise
            # What the original checks after its GPU check.
            if is_accelerate_version("<", "0.26.0"):
                raise ImportError("bitsandbytes 4-bit quantization needs accelerate >= 0.26.0") from None
            if is_bitsandbytes_version("<", "0.43.3"):
                raise ImportError("bitsandbytes 4-bit quantization needs bitsandbytes >= 0.43.3") from None

    with _BNB_BYPASS_LOCK:
        BnB4BitDiffusersQuantizer.validate_environment = validate_environment
        try:
            yield
        finally:
            BnB4BitDiffusersQuantizer.validate_environment = original


def load_bnb_denoiser(
    model_cls: type,
    source: str,
    subfolder: str,
    weights: WeightsFormat,
    compute_dtype: torch.dtype,
    device: torch.device,
    dtype_kwarg: str = "dtype",
) -> torch.nn.Module:
    """The denoiser of `source` in bitsandbytes nf4/fp4, loaded by diffusers straight onto `device`."""
    config = diffusers_bnb_config(weights, compute_dtype)
    kwargs = {dtype_kwarg: compute_dtype, "quantization_config": config, "subfolder": subfolder}
    if device.type == "cpu":
        kwargs["device_map"] = "cpu"
        bypass = bnb_without_gpu_check() if not torch.cuda.is_available() else contextlib.nullcontext()
    else:
        kwargs["device_map"] = {"": device}
        bypass = contextlib.nullcontext()
    with bypass:
        return model_cls.from_pretrained(source, **kwargs)


def load_bnb_text_encoder(
    model_cls: type,
    source: str,
    subfolder: str,
    weights: WeightsFormat,
    compute_dtype: torch.dtype,
    device: torch.device,
) -> torch.nn.Module:
    """A transformers text encoder (T5) in bitsandbytes nf4/fp4; transformers allows this on CPU as is."""
    return model_cls.from_pretrained(
        source,
        subfolder=subfolder,
        quantization_config=transformers_bnb_config(weights, compute_dtype),
        dtype=compute_dtype,
        device_map={"": device} if device.type != "cpu" else "cpu",
    )


def bnb_linear_count(module: torch.nn.Module) -> int:
    """How many of `module`'s layers are bitsandbytes 4-bit linears holding quantized weights."""
    import bitsandbytes as bnb

    return sum(
        1
        for layer in module.modules()
        if isinstance(layer, bnb.nn.Linear4bit) and isinstance(layer.weight, bnb.nn.Params4bit)
        and layer.weight.bnb_quantized
    )


# --- GGUF: writing ---------------------------------------------------------------------------------------

# Top-level modules kept in F32 in a GGUF file, as the community converters (city96's ComfyUI-GGUF) keep
# them: the embedders and the final layer are small and the most sensitive to rounding.
_KEEP_PRECISE = {
    "time_text_embed", "context_embedder", "x_embedder", "norm_out", "proj_out",  # Flux (diffusers names)
    "time_embedding", "add_embedding", "conv_in", "conv_out", "conv_norm_out",  # UNets
}
# `general.architecture` as ComfyUI-GGUF writes it.
_GGUF_ARCH = {"flux": "flux", "sdxl": "sdxl", "sd15": "sd1"}

KEY_NAMES = ("diffusers", "bfl")


def gguf_qtype(weights: WeightsFormat):
    """The `gguf.GGMLQuantizationType` of a GGUF weights format."""
    import gguf

    if not weights.is_gguf:
        raise ValueError(f"{weights.value} is not a GGUF weights format")
    return gguf.GGMLQuantizationType[weights.gguf_type]


def _quantizable(model: torch.nn.Module) -> set[str]:
    """Names of the weights a GGUF file quantizes: linear layers whose rows split into whole blocks."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[0] not in _KEEP_PRECISE:
            names.add(f"{name}.weight")
    return names


def write_gguf(
    model: torch.nn.Module,
    path: Path,
    weights: WeightsFormat,
    family: str,
    key_names: str = "diffusers",
) -> Path:
    """Write `model`'s weights to a GGUF file at `path`, atomically (temp file + rename).

    Linear weights get the format's quantization type; everything else (biases, norms, convolutions, the
    embedders and final layer) is stored F32, as community converters do. `key_names="bfl"` writes a Flux
    transformer under the original Black Forest Labs names (`double_blocks.N.img_attn.qkv.weight`, fused
    q/k/v, ...), the layout of community Flux GGUFs; diffusers converts them when loading.
    """
    import gguf

    if key_names not in KEY_NAMES:
        raise ValueError(f"key_names must be one of {KEY_NAMES}, got {key_names!r}")
    if key_names == "bfl" and family != "flux":
        raise ValueError(f"original (BFL) key names exist only for Flux transformers, not {family}")
    qtype = gguf_qtype(weights)
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    quantizable = _quantizable(model)
    arrays = {name: tensor.detach().float().cpu().numpy() for name, tensor in model.state_dict().items()}
    f32 = gguf.GGMLQuantizationType.F32
    types = {
        name: qtype if name in quantizable and array.shape[-1] % block_size == 0 else f32
        for name, array in arrays.items()
    }
    if key_names == "bfl":
        arrays, types = flux_diffusers_to_bfl(arrays, types)

    writer = gguf_writer(family, key_names, weights)
    for name, array in arrays.items():
        writer.add_tensor(name, gguf.quants.quantize(array, types[name]), raw_dtype=types[name])
    return commit_gguf(writer, path)


def gguf_writer(family: str, key_names: str, weights: WeightsFormat):
    """A GGUFWriter carrying the metadata our loader reads back (architecture, key names, weights format)."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=_GGUF_ARCH.get(family, family))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_string("renderfarm.key_names", key_names)
    writer.add_string("renderfarm.weights", weights.value)
    return writer


def commit_gguf(writer, path: str | Path) -> Path:
    """Write `writer`'s header, metadata and tensors to `path` atomically: a temp file beside it, renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def flux_diffusers_to_bfl(arrays: dict[str, np.ndarray], types: dict[str, Any]) -> tuple[dict, dict]:
    """Rename a diffusers Flux transformer state dict to the original BFL names (the inverse of diffusers'
    `convert_flux_transformer_checkpoint_to_diffusers`): fuses q/k/v (and the single blocks' MLP input) into
    one matrix and swaps the final norm's (scale, shift) halves back to BFL's (shift, scale)."""
    src = dict(arrays)
    out: dict[str, np.ndarray] = {}
    out_types: dict[str, Any] = {}

    def move(old: str, new: str) -> None:
        out[new] = src.pop(old)
        out_types[new] = types[old]

    def fuse(olds: list[str], new: str) -> None:
        kinds = {types[old] for old in olds}
        if len(kinds) != 1:
            raise ValueError(f"cannot fuse {olds} of different quantization types {kinds}")
        out[new] = np.concatenate([src.pop(old) for old in olds], axis=0)
        out_types[new] = kinds.pop()

    simple = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in",
        "x_embedder": "img_in",
        "proj_out": "final_layer.linear",
    }
    for old, new in simple.items():
        for kind in ("weight", "bias"):
            if f"{old}.{kind}" in src:
                move(f"{old}.{kind}", f"{new}.{kind}")
    for kind in ("weight", "bias"):
        shift_scale = np.concatenate(np.split(src.pop(f"norm_out.linear.{kind}"), 2, axis=0)[::-1], axis=0)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = shift_scale
        out_types[f"final_layer.adaLN_modulation.1.{kind}"] = types[f"norm_out.linear.{kind}"]

    blocks = sorted({int(key.split(".")[1]) for key in src if key.startswith("transformer_blocks.")})
    for i in blocks:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for kind in ("weight", "bias"):
            move(f"{d}norm1.linear.{kind}", f"{b}img_mod.lin.{kind}")
            move(f"{d}norm1_context.linear.{kind}", f"{b}txt_mod.lin.{kind}")
            fuse([f"{d}attn.to_{x}.{kind}" for x in "qkv"], f"{b}img_attn.qkv.{kind}")
            fuse([f"{d}attn.add_{x}_proj.{kind}" for x in "qkv"], f"{b}txt_attn.qkv.{kind}")
            move(f"{d}attn.to_out.0.{kind}", f"{b}img_attn.proj.{kind}")
            move(f"{d}attn.to_add_out.{kind}", f"{b}txt_attn.proj.{kind}")
            move(f"{d}ff.net.0.proj.{kind}", f"{b}img_mlp.0.{kind}")
            move(f"{d}ff.net.2.{kind}", f"{b}img_mlp.2.{kind}")
            move(f"{d}ff_context.net.0.proj.{kind}", f"{b}txt_mlp.0.{kind}")
            move(f"{d}ff_context.net.2.{kind}", f"{b}txt_mlp.2.{kind}")
        move(f"{d}attn.norm_q.weight", f"{b}img_attn.norm.query_norm.scale")
        move(f"{d}attn.norm_k.weight", f"{b}img_attn.norm.key_norm.scale")
        move(f"{d}attn.norm_added_q.weight", f"{b}txt_attn.norm.query_norm.scale")
        move(f"{d}attn.norm_added_k.weight", f"{b}txt_attn.norm.key_norm.scale")

    singles = sorted({int(key.split(".")[1]) for key in src if key.startswith("single_transformer_blocks.")})
    for i in singles:
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for kind in ("weight", "bias"):
            move(f"{d}norm.linear.{kind}", f"{b}modulation.lin.{kind}")
            fuse([f"{d}attn.to_{x}.{kind}" for x in "qkv"] + [f"{d}proj_mlp.{kind}"], f"{b}linear1.{kind}")
            move(f"{d}proj_out.{kind}", f"{b}linear2.{kind}")
        move(f"{d}attn.norm_q.weight", f"{b}norm.query_norm.scale")
        move(f"{d}attn.norm_k.weight", f"{b}norm.key_norm.scale")

    if src:
        raise ValueError(f"no BFL name for these Flux transformer weights: {sorted(src)}")
    return out, out_types


def standin_gguf_path(folder: Path, weights: WeightsFormat, key_names: str = "diffusers") -> Path:
    suffix = "" if key_names == "diffusers" else f"-{key_names}"
    return Path(folder) / "gguf" / f"{weights.gguf_type.lower()}{suffix}.gguf"


def ensure_standin_gguf(
    entry: ModelEntry, weights: WeightsFormat, folder: Path, key_names: str = "diffusers"
) -> Path:
    """The GGUF file of a stand-in's denoiser in `weights` format, written next to the stand-in on first use
    (`<stand-in folder>/gguf/q8_0.gguf`, or `q8_0-bfl.gguf` with BFL key names). Atomic, like the stand-in."""
    import diffusers

    path = standin_gguf_path(folder, weights, key_names)
    if path.is_file():
        return path
    family = entry.family.name
    subfolder = DENOISERS[family]
    model_cls = getattr(diffusers, denoiser_class(family))
    model = model_cls.from_pretrained(folder, subfolder=subfolder)
    return write_gguf(model, path, weights, family, key_names=key_names)


def denoiser_class(family: str) -> str:
    """The diffusers class name of a family's denoiser."""
    return "FluxTransformer2DModel" if family == "flux" else "UNet2DConditionModel"


# --- GGUF: loading ----------------------------------------------------------------------------------------

HF_URL = "https://huggingface.co/"


def gguf_source(entry: ModelEntry, weights: WeightsFormat) -> str:
    """Where a real model's GGUF file of `weights` format lives: its catalog `gguf_sources` entry.

    `gguf_sources` maps a quantization type ("q8_0", "Q4_1" or "gguf-q4_1") to a local file, a Hugging Face
    file URL, or "org/repo/file.gguf" (read as a file of the Hugging Face repo "org/repo").
    """
    sources = getattr(entry, "gguf_sources", None) or {}
    wanted = weights.gguf_type.lower()
    for key, value in dict(sources).items():
        if str(key).lower().removeprefix("gguf-") == wanted:
            return _as_single_file_location(str(value))
    raise FileNotFoundError(
        f"model {entry.name!r} has no GGUF file for {weights.value}: add gguf_sources: {{{wanted}: <file>}} "
        f"to its catalog entry (it has {sorted(sources) or 'none'})"
    )


def _as_single_file_location(value: str) -> str:
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded) or value.startswith((".", "~")) or os.path.exists(expanded):
        return expanded
    if value.startswith(("http://", "https://")):
        return value
    if re.fullmatch(r"[^/]+/[^/]+/.+\.gguf", value):
        return HF_URL + value
    return expanded


def is_bfl_flux(checkpoint: dict[str, Any]) -> bool:
    return any(key.removeprefix("model.diffusion_model.").startswith("double_blocks.") for key in checkpoint)


# The width diffusers' Flux converter assumes (diffusers 0.42: `inner_dim = 3072`, `mlp_ratio = 4.0`).
_FLUX1_INNER_DIM = 3072
_FLUX_MLP_RATIO = 4.0


def convert_bfl_flux(checkpoint: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Convert a Flux transformer checkpoint with original (BFL) names to diffusers names, with diffusers'
    own converter (`convert_flux_transformer_checkpoint_to_diffusers`).

    That converter hard-codes FLUX.1's width when it splits each single block's fused `linear1` into q, k, v
    and the MLP input (inner_dim 3072). For a checkpoint of another width (our stand-ins), the split is done
    here at the config's width first, and the converter gets zero-column placeholders of FLUX.1's shape for
    those two tensors; every other rename, fused-q/k/v split and scale/shift swap is diffusers' code. At
    FLUX.1's width nothing is pre-split. GGUF tensors keep their quantization type through the splits.
    """
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
    )

    checkpoint = {key.removeprefix("model.diffusion_model."): value for key, value in checkpoint.items()}
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    presplit: dict[str, Any] = {}
    if inner != _FLUX1_INNER_DIM:
        sizes = (inner, inner, inner, int(inner * _FLUX_MLP_RATIO))
        placeholder_rows = 3 * _FLUX1_INNER_DIM + int(_FLUX1_INNER_DIM * _FLUX_MLP_RATIO)
        for key in [k for k in checkpoint if re.fullmatch(r"single_blocks\.\d+\.linear1\.(weight|bias)", k)]:
            _, index, _, kind = key.split(".")
            tensor = checkpoint[key]
            if tensor.shape[0] != sum(sizes):
                raise ValueError(f"{key} has {tensor.shape[0]} rows; the config's width needs {sum(sizes)}")
            prefix = f"single_transformer_blocks.{index}."
            q, k, v, mlp = torch.split(tensor, sizes, dim=0)
            presplit.update({
                f"{prefix}attn.to_q.{kind}": q, f"{prefix}attn.to_k.{kind}": k,
                f"{prefix}attn.to_v.{kind}": v, f"{prefix}proj_mlp.{kind}": mlp,
            })
            checkpoint[key] = torch.empty((placeholder_rows, 0))
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    converted.update(presplit)
    return converted


def load_gguf_denoiser(
    model_cls: type,
    gguf_file: str,
    config_source: str,
    subfolder: str,
    compute_dtype: torch.dtype,
    device: torch.device,
    family: str,
    weights: WeightsFormat,
) -> torch.nn.Module:
    """A denoiser from a GGUF file through diffusers' single-file loader, dequantized per layer to
    `compute_dtype`. `config_source` (a local pipeline folder or a hub id) supplies the model config:
    offline, `from_single_file` cannot guess it."""
    from diffusers import GGUFQuantizationConfig
    from diffusers.loaders.single_file_model import (
        _get_single_file_loadable_mapping_class,
    )
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    loadable = hasattr(model_cls, "from_single_file") and _get_single_file_loadable_mapping_class(model_cls)
    if not loadable:
        raise ValueError(
            f"{weights.value}: the {family} denoiser ({model_cls.__name__}) cannot load a GGUF file through "
            "diffusers' single-file loader"
        )
    checkpoint = load_single_file_checkpoint(gguf_file)
    if family == "flux" and is_bfl_flux(checkpoint):
        config = model_cls.load_config(config_source, subfolder=subfolder)
        checkpoint = convert_bfl_flux(checkpoint, config)
    return model_cls.from_single_file(
        checkpoint,
        quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype),
        config=config_source,
        subfolder=subfolder,
        dtype=compute_dtype,
        device=device,
    )


def gguf_quant_types(module: torch.nn.Module) -> Counter:
    """How many of `module`'s parameters hold each GGUF quantization type (by type name, e.g. "Q8_0")."""
    counts: Counter = Counter()
    for parameter in module.parameters():
        quant_type = getattr(parameter, "quant_type", None)
        if quant_type is not None:
            counts[getattr(quant_type, "name", str(quant_type))] += 1
    return counts


# --- Flux in fp16: the activation clamp -------------------------------------------------------------------


def _finite_fp16(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype == torch.float16:
        return torch.nan_to_num(value, nan=0.0, posinf=FP16_MAX, neginf=-FP16_MAX)
    return value


def _clamp_block_output(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
    if isinstance(output, tuple):
        return tuple(_finite_fp16(value) for value in output)
    return _finite_fp16(output)


def add_fp16_clamp(transformer: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Keep a Flux transformer's fp16 activations finite: after every double and single block, both
    streams (image and text) go through `nan_to_num(nan=0, posinf=65504, neginf=-65504)`.

    The guard ComfyUI (comfy/ldm/flux/layers.py) and Forge apply inside their Flux blocks for cards without
    bf16; diffusers' own blocks only `clip` the text stream of a double block and the joint stream of a
    single block, which leaves NaN as NaN and the image stream of double blocks unguarded. Done with forward
    hooks, so no diffusers code changes; the hooks touch float16 tensors only, so they cost nothing in bf16.
    """
    handles = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(transformer, name, []):
            handles.append(block.register_forward_hook(_clamp_block_output))
    if not handles:
        raise ValueError(f"{type(transformer).__name__} has no Flux transformer blocks to clamp")
    return handles
