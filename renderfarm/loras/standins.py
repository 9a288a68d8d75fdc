"""Tiny stand-in LoRAs for the stand-in models, built offline with seeded random weights.

For each stand-in model of the catalog (tiny-sd15, tiny-sdxl, tiny-flux, tiny-sd3) a LoRA per key style
diffusers loads for its family, so that each of diffusers' loading paths runs on a CPU-only machine:
- `<model>-style.safetensors`: diffusers/PEFT keys (`unet.` / `transformer.` / `text_encoder.` ...
  `.lora_A.weight` / `.lora_B.weight`), rank 4, no alpha (diffusers then scales by 1), as diffusers'
  `save_lora_weights` writes them;
- `<model>-character.safetensors`: kohya keys (`lora_unet_...`, `lora_te_...` / `lora_te1_` / `lora_te2_`,
  `.lora_down.weight` / `.lora_up.weight` / `.alpha`), rank 8, alpha 4 (a scale of 0.5), as sd-scripts
  writes them: SD 1.5 with the diffusers UNet's block names, SDXL with the SGM UNet's
  (`input_blocks_4_1_...`), Flux with BFL names (`double_blocks_0_img_attn_qkv`, `single_blocks_0_linear2`).
  None for SD3: diffusers 0.42 converts no kohya SD3 keys (its SD3 loader would load nothing from them,
  and the library refuses such files).

They adapt what trainers adapt by default: the UNet's attention blocks (projections, attention, feed
forward) or the MMDiTs' attention and MLP layers, and the CLIP text encoders' attention and MLP layers. The
shapes are read from the stand-in pipeline itself (`actors.standins.build_standin`), so they match it.
One layer is left out on purpose: a Flux single block's `linear1` (q, k, v and the MLP in one matrix),
which diffusers' kohya converter splits at Flux.1's own widths (3072, 3072, 3072, 12288) whatever the
model is, so a tiny one cannot carry it.

The up (B) matrices are not zero (a freshly initialised LoRA's are, and change nothing): at weight 1.0
each changes its stand-in's image visibly. Noise on noise, like the stand-in models: honest plumbing.
Built once into `<cache>/tiny-loras`, atomically, like `ensure_standin`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from renderfarm.planning.catalog import default_catalog

if TYPE_CHECKING:
    import torch

STANDIN_LORA_FOLDER = "tiny-loras"
STANDIN_LORA_MARKER = "renderfarm_standin_loras.json"
# Bump when a recipe below changes, so an old folder is recognisably stale (see `ensure_standin_loras`).
STANDIN_LORA_RECIPE_VERSION = 2  # 2: tiny-sd3-style
STYLE_FILE = {"diffusers": "style", "kohya": "character"}  # the file's suffix by key style
RANK = {"diffusers": 4, "kohya": 8}
KOHYA_ALPHA = 4.0
# The up (B) matrices' spread, by family: enough that weight 1.0 changes a stand-in's 64x64, 2-step image
# visibly (measured: a mean change of 20-33 grey levels for SD 1.5, SDXL and SD3, 9-16 for Flux, whose
# 2-step image owes more to its starting noise).
UP_STD = {"sd15": 0.5, "sdxl": 0.5, "flux": 1.0, "sd3": 1.0}
# The key styles diffusers loads, by family: the stand-in LoRAs each family gets.
STYLES = {"sd15": ("diffusers", "kohya"), "sdxl": ("diffusers", "kohya"), "flux": ("diffusers", "kohya"),
          "sd3": ("diffusers",)}
FAMILIES = tuple(STYLES)

# The layers a trainer adapts by default, by the pipeline's own module names.
_UNET_TARGET = re.compile(
    r"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)"
    r"|ff\.net\.(0\.proj|2)))$"
)
_CLIP_TARGET = re.compile(r"layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
_FLUX_TARGET = re.compile(
    r"^(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out))$"
)
_SD3_TARGET = re.compile(
    r"^transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))$"
)
# kohya's Flux (BFL) names of a double block's layers, by the diffusers layers they become.
_BFL_DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_mod_lin": ("norm1_context.linear",),
}


def standin_lora_names() -> dict[str, tuple[str, str, str]]:
    """name -> (stand-in model, family, key style), for each stand-in model of the catalog."""
    names = {}
    for model in default_catalog().models.values():
        if model.standin and model.family.name in FAMILIES:
            for style in STYLES[model.family.name]:
                names[f"{model.name}-{STYLE_FILE[style]}"] = (model.name, model.family.name, style)
    return dict(sorted(names.items()))


def standin_lora_dir(cache_dir: Path | None = None) -> Path:
    """Where `ensure_standin_loras` puts them: `<cache_dir>/tiny-loras` (default: the models cache)."""
    from renderfarm.actors.standins import default_cache_dir

    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / STANDIN_LORA_FOLDER


def ensure_standin_loras(cache_dir: Path | None = None) -> Path:
    """The folder of the stand-in LoRAs (a LoRA library), building it first if needed.

    Safe when several processes call it at once: each builds into a private temporary folder beside the
    target and renames it into place; the first rename wins. A folder that exists is always complete.
    """
    target = standin_lora_dir(cache_dir)
    if target.exists():
        _check_complete(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        from renderfarm.actors.standins import build_standin

        files, pipes = {}, {}
        for name, (model, family, style) in standin_lora_names().items():
            if family not in pipes:  # one build per family: only its shapes are read
                pipes[family] = build_standin(family)
            tensors = build_standin_lora(family, style, seed=zlib.crc32(name.encode()), pipe=pipes[family])
            save_lora(tensors, staging / f"{name}.safetensors",
                      {"renderfarm.standin_for": model, "renderfarm.recipe_version": str(STANDIN_LORA_RECIPE_VERSION)})
            files[name] = {"model": model, "family": family, "style": style}
        marker = {"recipe_version": STANDIN_LORA_RECIPE_VERSION, "loras": files}
        (staging / STANDIN_LORA_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(staging, target)
        except OSError:
            if not target.exists():  # not another process's build that won the race
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _check_complete(target)
    return target


def _check_complete(folder: Path) -> None:
    try:
        recipe = json.loads((folder / STANDIN_LORA_MARKER).read_text()).get("recipe_version")
    except (OSError, ValueError):
        raise RuntimeError(f"stand-in LoRA folder {folder} has no readable {STANDIN_LORA_MARKER}: it was not "
                           "written by renderfarm; delete it and it will be rebuilt") from None
    if recipe != STANDIN_LORA_RECIPE_VERSION:
        # Other processes may be reading it: keep serving it, and say how to rebuild.
        import logging

        logging.getLogger(__name__).warning(
            "stand-in LoRAs in %s were built by recipe %s, this renderfarm builds recipe %s; delete the folder "
            "to rebuild them", folder, recipe, STANDIN_LORA_RECIPE_VERSION)


def save_lora(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt", **(metadata or {})})


def build_standin_lora(family: str, style: str, seed: int = 0, pipe: Any = None) -> dict[str, torch.Tensor]:
    """The tensors of a stand-in LoRA for `family`'s stand-in, in key `style` ("diffusers" or "kohya"),
    float16 like most published LoRAs. Same arguments, identical tensors; the caller's random state is
    left alone. `pipe`: the family's stand-in pipeline, if the caller has it (only its shapes are read)."""
    import torch

    from renderfarm.actors.standins import build_standin

    if family not in FAMILIES:
        raise ValueError(f"no stand-in LoRA recipe for family {family!r}; known: {', '.join(FAMILIES)}")
    if style not in STYLES[family]:
        raise ValueError(f"no {style!r} stand-in LoRA for {family}; its styles: {', '.join(STYLES[family])}")
    pipe = pipe if pipe is not None else build_standin(family)
    rank = RANK[style]
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}

    def pair(key: str, layer: Any, out_features: int | None = None, in_features: int | None = None) -> None:
        """Down and up weights (and a kohya alpha) for `layer`, under the module key `key`."""
        conv = isinstance(layer, torch.nn.Conv2d)
        fan_in = in_features or (layer.in_channels if conv else layer.in_features)
        fan_out = out_features or (layer.out_channels if conv else layer.out_features)
        tail = (1, 1) if conv else ()  # a 1x1 convolution (SD 1.5's attention projections)
        down = torch.randn(rank, fan_in, *tail, generator=generator) / fan_in**0.5
        up = torch.randn(fan_out, rank, *tail, generator=generator) * UP_STD[family]
        if style == "kohya":
            tensors[f"{key}.lora_down.weight"] = down.half()
            tensors[f"{key}.lora_up.weight"] = up.half()
            tensors[f"{key}.alpha"] = torch.tensor(KOHYA_ALPHA, dtype=torch.float16)
        else:
            tensors[f"{key}.lora_A.weight"] = down.half()
            tensors[f"{key}.lora_B.weight"] = up.half()

    denoiser = pipe.transformer if family in ("flux", "sd3") else pipe.unet
    if family == "flux":
        _flux_layers(denoiser, style, pair)
    elif family == "sd3":
        for name, layer in denoiser.named_modules():
            if _SD3_TARGET.search(name):
                pair(f"transformer.{name}", layer)
    else:
        for name, layer in denoiser.named_modules():
            if _UNET_TARGET.search(name):
                if style == "diffusers":
                    pair(f"unet.{name}", layer)
                elif family == "sdxl":
                    pair("lora_unet_" + _sgm_name(name, denoiser.config.layers_per_block).replace(".", "_"), layer)
                else:
                    pair("lora_unet_" + name.replace(".", "_"), layer)
    encoders = [("text_encoder", pipe.text_encoder)]
    if family in ("sdxl", "sd3"):
        encoders.append(("text_encoder_2", pipe.text_encoder_2))
    if family == "flux" and style == "diffusers":
        encoders = []  # as most Flux LoRAs (ai-toolkit): the transformer only; the kohya one adapts CLIP too
    for component, encoder in encoders:
        # kohya: `lora_te_` for SD 1.x's one encoder, `lora_te1_` / `lora_te2_` where there are two (Flux: te1).
        kohya_prefix = "lora_te2_" if component == "text_encoder_2" else "lora_te_" if family == "sd15" else "lora_te1_"
        for name, layer in encoder.named_modules():
            if _CLIP_TARGET.search(name):
                # Published LoRAs name CLIP's layers under `text_model.` (transformers 5 dropped that level
                # from CLIPTextModel; diffusers strips it when loading).
                full = name if name.startswith("text_model.") else f"text_model.{name}"
                pair(f"{component}.{full}" if style == "diffusers" else kohya_prefix + full.replace(".", "_"), layer)
    return tensors


def _flux_layers(transformer: Any, style: str, pair: Any) -> None:
    modules = dict(transformer.named_modules())
    if style == "diffusers":
        for name, layer in modules.items():
            if _FLUX_TARGET.search(name):
                pair(f"transformer.{name}", layer)
        return
    for i in range(len(transformer.transformer_blocks)):
        for bfl, targets in _BFL_DOUBLE.items():
            layers = [modules[f"transformer_blocks.{i}.{t}"] for t in targets]
            # q, k and v in one matrix: diffusers splits the up weight evenly into the three.
            pair(f"lora_unet_double_blocks_{i}_{bfl}", layers[0],
                 out_features=sum(layer.out_features for layer in layers))
    for i in range(len(transformer.single_transformer_blocks)):
        pair(f"lora_unet_single_blocks_{i}_linear2", modules[f"single_transformer_blocks.{i}.proj_out"])
        pair(f"lora_unet_single_blocks_{i}_modulation_lin", modules[f"single_transformer_blocks.{i}.norm.linear"])


def _sgm_name(name: str, layers_per_block: int) -> str:
    """A diffusers UNet attention layer's name in the SGM (original Stability) UNet, as kohya's SDXL
    trainer writes it, the inverse of diffusers' `_maybe_map_sgm_blocks_to_diffusers`: the i-th layer of
    down block b is `input_blocks.{1 + b*(layers_per_block+1) + i}`, of up block b
    `output_blocks.{b*(layers_per_block+1) + i}`; the attention is part 1 of that layer, the mid block's
    attention `middle_block.1`."""
    match = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)$", name)
    if match:
        kind, block, layer, rest = match[1], int(match[2]), int(match[3]), match[4]
        if kind == "down_blocks":
            return f"input_blocks.{1 + block * (layers_per_block + 1) + layer}.1.{rest}"
        return f"output_blocks.{block * (layers_per_block + 1) + layer}.1.{rest}"
    match = re.match(r"^mid_block\.attentions\.0\.(.+)$", name)
    if match:
        return f"middle_block.1.{match[1]}"
    raise ValueError(f"no SGM name for UNet layer {name!r}")
