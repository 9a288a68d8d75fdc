"""What differs between the pipeline families a worker renders: one class per family, one object each.

A family names its components (the denoiser, the text encoders, the large text encoder whose weights a
profile may quantize), says whether a render runs classifier-free guidance, encodes prompts the way its
pipeline does, adds its own arguments to the pipeline call, decodes latents as its pipeline does after the
denoising loop, writes its guidance into the infotext, and maps its GGUF checkpoints to and from diffusers'
key names. Loading (actors/loading.py), GGUF files (actors/quantize.py, actors/gguf_standins.py) and
rendering (actors/pipelines.py) are written once against this interface and never branch on a family name.

Adding a family: subclass `Family`, set its class attributes, implement `encode` and `decode`, override what
else differs, and list it in `FAMILIES`. A new task (img2img, inpainting) or LoRA is a method here, written
for each family whose pipeline does it differently.

The catalog's family (planning/catalog.py) is what the planner knows (sizes, widths, whether it uses CFG);
this is what a worker does. They meet by name: `family_for(entry)`.

Imported only inside worker processes: it imports torch at module level.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import numpy as np
import torch

from renderfarm.errors import UnsupportedFamily
from renderfarm.infotext import sampler_name, schedule_type
from renderfarm.planning.catalog import ModelEntry

try:
    from diffusers.utils.torch_utils import get_module_execution_device
except ImportError:  # older diffusers: no offload-aware lookup, the weights' device is the answer

    def get_module_execution_device(module: torch.nn.Module) -> torch.device:
        return next(module.parameters()).device


class Family:
    """The render behaviour of one pipeline family. Stateless: one shared object per family."""

    name: ClassVar[str]
    denoiser: ClassVar[str]  # the pipeline attribute
    denoiser_class: ClassVar[str]  # its diffusers class
    text_encoders: ClassVar[tuple[str, ...]]
    # The text encoder whose weights format a profile sets (T5: 4.8B parameters in FLUX.1); the CLIP encoders
    # are small and always run in the compute dtype. None: the family has no such encoder.
    large_text_encoder: ClassVar[str | None] = None
    # The pipeline also renders without it (SD3: `text_encoder_3=None`, zeros in place of its embeddings), so a
    # profile may drop it (the catalog marks the component `droppable`).
    large_text_encoder_optional: ClassVar[bool] = False
    gguf_arch: ClassVar[str]  # `general.architecture` as ComfyUI-GGUF writes it
    # The original authors' key names its GGUF files may use ("bfl": Black Forest Labs'); None: diffusers' only.
    original_key_names: ClassVar[str | None] = None
    # Its activations overflow float16, so a profile may clamp them (quantize.add_fp16_clamp).
    fp16_clamp: ClassVar[bool] = False
    # The diffusers classes that render this family's img2img and inpainting from the loaded text-to-image
    # pipeline's components (actors/tasks.py); None: diffusers has none.
    task_pipelines: ClassVar[dict[str, str]] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} family {self.name!r}>"

    # --- guidance and text encoding -------------------------------------------------------------------

    def does_cfg(self, pipe: Any, guidance: float) -> bool:
        """Whether a render at `guidance` runs classifier-free guidance (a second, negative pass).

        The SD pipelines' own rule: guidance <= 1, or a guidance-embedding UNet (LCM), means one pass."""
        return guidance > 1 and getattr(pipe, self.denoiser).config.time_cond_proj_dim is None

    def encode(
        self, pipe: Any, prompts: list[str], negative_prompts: list[str], do_cfg: bool, device: torch.device
    ) -> dict[str, torch.Tensor]:
        """The prompt embeddings of `prompts`, one row each, named as the pipeline call takes them."""
        raise NotImplementedError

    # --- denoising --------------------------------------------------------------------------------------

    def call_arguments(self, pipe: Any) -> dict[str, Any]:
        """Arguments of the pipeline call that only this family takes."""
        return {}

    # --- decoding ---------------------------------------------------------------------------------------

    def decode(self, pipe: Any, latents: torch.Tensor, height: int, width: int, device: torch.device) -> list:
        """The PIL images of `latents`, decoded as the family's pipeline does after its denoising loop."""
        raise NotImplementedError

    def encode_image(self, pipe: Any, pixels: torch.Tensor) -> torch.Tensor:
        """`pixels` (a batch in [-1, 1]) as the latents `decode` takes: the mode of the VAE's posterior, scaled
        as the family's img2img pipeline scales its init latents. Used where no denoising step runs (strength 0),
        so the image is the VAE round trip of the init image."""
        vae = pipe.vae
        latents = vae.encode(pixels.to(get_module_execution_device(vae), vae.dtype)).latent_dist.mode()
        return self.scale_latents(pipe, latents)

    def scale_latents(self, pipe: Any, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents into the denoiser's space (the inverse of what `decode` undoes)."""
        return latents * pipe.vae.config.scaling_factor

    # --- infotext ---------------------------------------------------------------------------------------

    def infotext_fields(self, pipe: Any, guidance: float) -> dict[str, Any]:
        """The sampler and guidance fields of `infotext.a1111_parameters` for a render at `guidance`."""
        return {
            "sampler": sampler_name(pipe.scheduler),
            "schedule_type": schedule_type(pipe.scheduler),
            "cfg_scale": guidance,
        }

    # --- GGUF key names -----------------------------------------------------------------------------------

    def to_original_keys(
        self, arrays: dict[str, np.ndarray], types: dict[str, Any]
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """A diffusers state dict (and each tensor's GGUF type) renamed to the original authors' key names,
        the layout community GGUF files use."""
        raise ValueError(f"original key names exist only for Flux transformers, not {self.name}")

    def from_gguf_checkpoint(
        self, checkpoint: dict[str, Any], model_cls: type, config_source: str, subfolder: str
    ) -> dict[str, Any]:
        """A GGUF checkpoint in the key names diffusers' single-file loader reads for this family."""
        return checkpoint


def _vae_decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    # With offloading the VAE's weights may sit elsewhere than where it computes.
    return vae.decode(latents.to(get_module_execution_device(vae), vae.dtype), return_dict=False)[0]


class SD15(Family):
    name = "sd15"
    denoiser = "unet"
    denoiser_class = "UNet2DConditionModel"
    text_encoders = ("text_encoder",)
    gguf_arch = "sd1"
    task_pipelines = {"img2img": "StableDiffusionImg2ImgPipeline", "inpaint": "StableDiffusionInpaintPipeline"}

    def encode(self, pipe, prompts, negative_prompts, do_cfg, device):
        prompt_embeds, negative_embeds = pipe.encode_prompt(
            prompts, device, 1, do_cfg, negative_prompt=negative_prompts if do_cfg else None
        )
        embeddings = {"prompt_embeds": prompt_embeds}
        if do_cfg:
            embeddings["negative_prompt_embeds"] = negative_embeds
        return embeddings

    def decode(self, pipe, latents, height, width, device):
        latents = latents / pipe.vae.config.scaling_factor
        image = _vae_decode(pipe.vae, latents)
        # A real SD 1.5 folder ships a safety checker; the pipeline runs it, so we do too.
        image, has_nsfw = pipe.run_safety_checker(image, device, latents.dtype)
        do_denormalize = [not flagged for flagged in has_nsfw] if has_nsfw is not None else None
        return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=do_denormalize)


class SDXL(Family):
    name = "sdxl"
    denoiser = "unet"
    denoiser_class = "UNet2DConditionModel"
    text_encoders = ("text_encoder", "text_encoder_2")
    gguf_arch = "sdxl"
    task_pipelines = {"img2img": "StableDiffusionXLImg2ImgPipeline", "inpaint": "StableDiffusionXLInpaintPipeline"}

    def scale_latents(self, pipe, latents):
        config = pipe.vae.config
        mean, std = config.get("latents_mean"), config.get("latents_std")
        if mean is None or std is None:
            return latents * config.scaling_factor
        channels = latents.shape[1]
        mean = torch.tensor(mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
        return (latents - mean) * config.scaling_factor / std

    def encode(self, pipe, prompts, negative_prompts, do_cfg, device):
        prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompts if do_cfg else None,
        )
        embeddings = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
        if do_cfg:
            if pipe.config.force_zeros_for_empty_prompt:
                # SDXL's convention for "no negative prompt" is a zero embedding, not the encoded "";
                # decided per job so a job renders the same alone and in a batch.
                empty = torch.tensor([not text for text in negative_prompts], device=negative_embeds.device)
                negative_embeds = torch.where(empty[:, None, None], 0.0, negative_embeds)
                negative_pooled = torch.where(empty[:, None], 0.0, negative_pooled)
            embeddings["negative_prompt_embeds"] = negative_embeds
            embeddings["negative_pooled_prompt_embeds"] = negative_pooled
        return embeddings

    def decode(self, pipe, latents, height, width, device):
        vae = pipe.vae
        # The SDXL VAE overflows in float16: the pipeline decodes in float32 when the config says so.
        needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
        if needs_upcasting:
            vae.to(dtype=torch.float32)
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is not None and std is not None:
            channels = latents.shape[1]
            mean = torch.tensor(mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        try:
            image = _vae_decode(vae, latents)
        finally:  # also after an out-of-memory error: the next render expects the VAE as it was
            if needs_upcasting:
                vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
        return pipe.image_processor.postprocess(image, output_type="pil")


class Flux(Family):
    name = "flux"
    denoiser = "transformer"
    denoiser_class = "FluxTransformer2DModel"
    text_encoders = ("text_encoder", "text_encoder_2")
    large_text_encoder = "text_encoder_2"
    gguf_arch = "flux"
    original_key_names = "bfl"
    fp16_clamp = True
    task_pipelines = {"img2img": "FluxImg2ImgPipeline", "inpaint": "FluxInpaintPipeline"}

    def scale_latents(self, pipe, latents):
        config = pipe.vae.config
        latents = (latents - config.shift_factor) * config.scaling_factor
        batch, channels, height, width = latents.shape
        return pipe._pack_latents(latents, batch, channels, height, width)  # the packed form `decode` unpacks

    def does_cfg(self, pipe, guidance):
        # Guidance-distilled: guidance is an input of the transformer, never a second pass.
        return False

    def encode(self, pipe, prompts, negative_prompts, do_cfg, device):
        prompt_embeds, pooled, _text_ids = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=self.t5_max_length(pipe),
        )
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    @staticmethod
    def t5_max_length(pipe: Any) -> int:
        # Flux pads prompts to this many T5 tokens; 512 is the pipeline's ceiling (FLUX.1-dev's length).
        return min(512, int(pipe.tokenizer_2.model_max_length))

    def call_arguments(self, pipe):
        return {"max_sequence_length": self.t5_max_length(pipe)}

    def decode(self, pipe, latents, height, width, device):
        vae = pipe.vae
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = _vae_decode(vae, latents)
        return pipe.image_processor.postprocess(image, output_type="pil")

    def infotext_fields(self, pipe, guidance):
        fields = super().infotext_fields(pipe, guidance)
        # Forge's convention for guidance-distilled Flux: no CFG pass (scale 1), guidance as an input.
        fields["cfg_scale"] = 1.0
        if pipe.transformer.config.guidance_embeds:
            fields["distilled_cfg_scale"] = guidance
        return fields

    def to_original_keys(self, arrays, types):
        return flux_diffusers_to_bfl(arrays, types)

    def from_gguf_checkpoint(self, checkpoint, model_cls, config_source, subfolder):
        if not is_bfl_flux(checkpoint):
            return checkpoint
        return convert_bfl_flux(checkpoint, model_cls.load_config(config_source, subfolder=subfolder))


class SD3(Family):
    """Stable Diffusion 3.x (StableDiffusion3Pipeline): CLIP-L, CLIP-G and T5, an MMDiT, the 16-channel VAE.

    What its `encode_prompt` does, which `encode` keeps by calling it (tests/actors/test_families.py pins it):
    each CLIP's penultimate hidden states, concatenated on the feature axis (77 tokens), are zero-padded to
    T5's width and put before T5's tokens on the sequence axis (77 + `max_sequence_length` tokens); the pooled
    embedding is both CLIPs' pooled projections, concatenated. Without T5 (`text_encoder_3=None`, the published
    way to save its ~9.5 GB) its tokens are zeros of the same shape, so the sequence keeps its length. Under
    CFG the negative prompt is encoded, an empty one too (no zero embedding, unlike SDXL).
    """

    name = "sd3"
    denoiser = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    large_text_encoder = "text_encoder_3"
    large_text_encoder_optional = True
    gguf_arch = "sd3"
    task_pipelines = {"img2img": "StableDiffusion3Img2ImgPipeline", "inpaint": "StableDiffusion3InpaintPipeline"}

    def scale_latents(self, pipe, latents):
        config = pipe.vae.config
        return (latents - config.shift_factor) * config.scaling_factor

    def does_cfg(self, pipe, guidance):
        # The pipeline's own rule (`do_classifier_free_guidance`): guidance above 1 runs a second pass.
        return guidance > 1

    @staticmethod
    def t5_max_length(pipe: Any) -> int:
        # The pipeline pads T5 prompts to `max_sequence_length`, 256 by default (the catalog's 77 + 256 tokens);
        # a tokenizer with a shorter context (the stand-ins') sets it lower. Without a tokenizer: the default.
        tokenizer = getattr(pipe, "tokenizer_3", None)
        return min(256, int(tokenizer.model_max_length)) if tokenizer is not None else 256

    def encode(self, pipe, prompts, negative_prompts, do_cfg, device):
        prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompts if do_cfg else None,
            max_sequence_length=self.t5_max_length(pipe),
        )
        embeddings = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
        if do_cfg:
            embeddings["negative_prompt_embeds"] = negative_embeds
            embeddings["negative_pooled_prompt_embeds"] = negative_pooled
        return embeddings

    def call_arguments(self, pipe):
        return {"max_sequence_length": self.t5_max_length(pipe)}

    def decode(self, pipe, latents, height, width, device):
        vae = pipe.vae
        # As the pipeline does after its loop (no fp32 upcast: SD3's pipeline decodes in the VAE's dtype).
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = _vae_decode(vae, latents)
        return pipe.image_processor.postprocess(image, output_type="pil")


# --- the registry ---------------------------------------------------------------------------------------

FAMILIES: dict[str, Family] = {family.name: family for family in (SD15(), SDXL(), Flux(), SD3())}

# The same facts as plain maps, for callers that want one fact of every family (bench/, planning checks).
DENOISERS = {name: family.denoiser for name, family in FAMILIES.items()}
TEXT_ENCODERS = {name: family.text_encoders for name, family in FAMILIES.items()}
LARGE_TEXT_ENCODER = {name: family.large_text_encoder for name, family in FAMILIES.items()
                      if family.large_text_encoder}


def family_named(name: str) -> Family:
    """The family called `name`; ValueError naming the known ones when there is none."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"no render family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_for(entry: ModelEntry) -> Family:
    """The family a catalog model renders with."""
    family = FAMILIES.get(entry.family.name)
    if family is None:  # a job fault (renderfarm/faults.py): no node renders it
        raise UnsupportedFamily(
            f"model {entry.name!r}: the workers do not know how to render family {entry.family.name!r} "
            f"(known: {', '.join(FAMILIES)})"
        )
    return family


def denoiser_class(family: str) -> str:
    """The diffusers class name of a family's denoiser."""
    return family_named(family).denoiser_class


# --- Flux GGUF key names: diffusers' and the original (Black Forest Labs) ones ---------------------------


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
