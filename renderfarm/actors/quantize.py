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

Stand-ins have no published GGUF files: actors/gguf_standins.py writes them. What differs per family (the
denoiser's name and class, a GGUF file's key names) is its `Family` (actors/families.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch

from renderfarm.actors.families import family_named
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
    checkpoint = family_named(family).from_gguf_checkpoint(
        load_single_file_checkpoint(gguf_file), model_cls, config_source, subfolder
    )
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
