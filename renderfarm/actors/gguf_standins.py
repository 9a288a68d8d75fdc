"""GGUF files for the stand-ins: written with the `gguf` package, since no one publishes GGUF files of tiny
random-weight models.

`ensure_standin_gguf` writes a stand-in's denoiser next to its folder on first use, with diffusers key names
or with the original (Black Forest Labs) Flux key names that community Flux GGUFs use, so the loader's
conversion path (actors/quantize.py, `Family.from_gguf_checkpoint`) runs on CPU as it does on a real file.
`write_gguf` writes any denoiser the same way (bench/real_models.py reuses its rules for real-size models).

`gguf`, numpy and diffusers are imported when a file is written, not before.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from renderfarm.actors.families import family_for, family_named
from renderfarm.planning.catalog import ModelEntry
from renderfarm.planning.profiles import WeightsFormat

# Top-level modules kept in F32 in a GGUF file, as the community converters (city96's ComfyUI-GGUF) keep
# them: the embedders and the final layer are small and the most sensitive to rounding.
_KEEP_PRECISE = {
    "time_text_embed", "context_embedder", "x_embedder", "norm_out", "proj_out",  # Flux (diffusers names)
    "time_embedding", "add_embedding", "conv_in", "conv_out", "conv_norm_out",  # UNets
}

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
    renamer = family_named(family)
    if key_names != "diffusers" and key_names != renamer.original_key_names:
        raise ValueError(f"original ({key_names.upper()}) key names exist only for Flux transformers, not {family}")
    qtype = gguf_qtype(weights)
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    quantizable = _quantizable(model)
    arrays = {name: tensor.detach().float().cpu().numpy() for name, tensor in model.state_dict().items()}
    f32 = gguf.GGMLQuantizationType.F32
    types = {
        name: qtype if name in quantizable and array.shape[-1] % block_size == 0 else f32
        for name, array in arrays.items()
    }
    if key_names != "diffusers":
        arrays, types = renamer.to_original_keys(arrays, types)

    writer = gguf_writer(family, key_names, weights)
    for name, array in arrays.items():
        writer.add_tensor(name, gguf.quants.quantize(array, types[name]), raw_dtype=types[name])
    return commit_gguf(writer, path)


def gguf_writer(family: str, key_names: str, weights: WeightsFormat):
    """A GGUFWriter carrying the metadata our loader reads back (architecture, key names, weights format)."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch=family_named(family).gguf_arch)
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
    family = family_for(entry)
    model = getattr(diffusers, family.denoiser_class).from_pretrained(folder, subfolder=family.denoiser)
    return write_gguf(model, path, weights, family.name, key_names=key_names)
