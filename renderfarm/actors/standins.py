"""Tiny random-weight models of each family, built offline and saved once to a cache directory.

A stand-in is a real diffusers pipeline (same pipeline class, real schedulers, real CLIP/T5 text encoders,
real VAE), only with tiny widths and random weights, so the farm's loading, quantization and rendering code
runs unchanged on a CPU-only machine. The images are noise: honest plumbing, never a picture of quality.

Size choices, and why:
- The VAE keeps 4 blocks (3 down-samplings, latents at 1/8 of the image) like the real ones, so the
  pipelines' own size rules hold: SD/SDXL render at multiples of 8, Flux and SD3 at multiples of 16 (1/8
  latents in 2x2 patches).
- Linear layer widths are multiples of 64 (CPU nf4 kernels in bitsandbytes need that).
- The denoisers have no attention at full latent resolution (like SDXL's first block), which keeps a
  1024x1024 render affordable on CPU.

torch, diffusers and transformers are imported only when a stand-in has to be built, so asking for an
existing one is cheap.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from renderfarm.planning.catalog import ModelEntry

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

log = logging.getLogger(__name__)

STANDIN_SEED = 0
# Bump when a recipe below changes, so an old cache folder is recognisably stale (see `ensure_standin`).
STANDIN_RECIPE_VERSION = 1
STANDIN_MARKER = "renderfarm_standin.json"

VOCAB_DIR = Path(__file__).resolve().parent / "vocab"
CLIP_MAX_LENGTH = 77  # the real CLIP context, so prompt truncation behaves as it does on real models
T5_MAX_LENGTH = 64  # Flux pads prompts to the T5 tokenizer's length: keep the joint attention short


def default_cache_dir() -> Path:
    """`$RENDERFARM_CACHE_DIR` if set, else `~/.cache/renderfarm/models`."""
    configured = os.environ.get("RENDERFARM_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "renderfarm" / "models"


def ensure_standin(entry: ModelEntry, cache_dir: Path | None = None) -> Path:
    """Return the folder of `entry`'s stand-in pipeline, building and saving it first if needed.

    Safe when several processes call it at once: each builds into a private temporary folder beside the
    target and renames it into place; the rename is atomic, the first one wins and the others discard
    their copy. A folder that exists is therefore always complete.
    """
    if not entry.standin:
        raise ValueError(f"{entry.name} is not a stand-in model (its source is {entry.source!r})")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / entry.name
    if target.exists():
        _check_complete(target, entry)
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    # Same filesystem as the target, so the final rename is atomic.
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.building-", dir=cache_dir))
    try:
        pipe = build_standin(entry.family.name)
        pipe.save_pretrained(staging)
        marker = {
            "model": entry.name,
            "family": entry.family.name,
            "pipeline": entry.family.pipeline,
            "seed": STANDIN_SEED,
            "recipe_version": STANDIN_RECIPE_VERSION,
        }
        (staging / STANDIN_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.rename(staging, target)
        except OSError:
            # Another process renamed its build into place first; theirs is as good as ours.
            if not target.exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _check_complete(target, entry)
    return target


def _check_complete(folder: Path, entry: ModelEntry) -> None:
    if not (folder / "model_index.json").is_file():
        raise RuntimeError(
            f"stand-in folder {folder} for {entry.name} exists but has no model_index.json; "
            "it was not written by renderfarm: delete it and it will be rebuilt"
        )
    try:
        recipe = json.loads((folder / STANDIN_MARKER).read_text()).get("recipe_version")
    except (OSError, ValueError):
        recipe = None
    if recipe != STANDIN_RECIPE_VERSION:
        # Still a loadable pipeline, so keep serving it: replacing a folder that other processes may be
        # reading is not worth the risk. Deleting it is the way to a rebuild.
        log.warning(
            "stand-in %s in %s was built by recipe %s, this renderfarm builds recipe %s; "
            "delete the folder to rebuild it",
            entry.name, folder, recipe, STANDIN_RECIPE_VERSION,
        )


def build_standin(family: str, seed: int = STANDIN_SEED) -> DiffusionPipeline:
    """Build (not save) the tiny random-weight pipeline of `family`. Same seed, identical weights."""
    import torch

    builders = {"sd15": _build_sd15, "sdxl": _build_sdxl, "flux": _build_flux, "sd3": _build_sd3}
    if family not in builders:
        raise ValueError(f"no stand-in recipe for family {family!r}; known: {', '.join(builders)}")
    # fork_rng: building a stand-in must not disturb the caller's random state.
    with torch.random.fork_rng(devices=[]):
        return builders[family](seed)


# --- components ------------------------------------------------------------------------------------
# Each component is created right after seeding with `seed + k`, so changing one component's recipe
# leaves the weights of the others unchanged.


def _seeded(seed: int, make: Any) -> Any:
    import torch

    torch.manual_seed(seed)
    return make()


def _padded(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = json.loads((VOCAB_DIR / "clip-vocab.json").read_text(encoding="utf-8"))
    lines = (VOCAB_DIR / "clip-merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer():
    from transformers import T5TokenizerFast

    pieces = json.loads((VOCAB_DIR / "t5-unigram.json").read_text(encoding="utf-8"))
    return T5TokenizerFast(
        vocab=[(piece, score) for piece, score in pieces], extra_ids=0, model_max_length=T5_MAX_LENGTH
    )


def _clip_config(tokenizer, projection_dim: int = 64, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=_padded(len(tokenizer)),
        hidden_size=64,
        intermediate_size=256,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=hidden_act,
        # The pooled output is read at the end-of-text token: the ids must match the tokenizer's.
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_config(tokenizer, d_model: int = 64, d_ff: int = 128):
    from transformers import T5Config

    return T5Config(
        vocab_size=_padded(len(tokenizer)),
        d_model=d_model,
        d_kv=32,
        d_ff=d_ff,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, the encoder Flux and SD3 use
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _flow_vae(scaling_factor: float, shift_factor: float):
    """The 16-channel VAE of Flux and SD3: a shift as well as a scale, and no quant convolutions."""
    return _vae(
        latent_channels=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _vae(latent_channels: int = 4, **config: Any):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # 4 blocks = 3 down-samplings: latents at 1/8 of the image, as in the real VAEs.
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        # Narrow convolutions at high resolution keep decode cheap; the mid-block attention (the VAE's
        # only linear layers) runs at the last width, 64.
        block_out_channels=(16, 16, 32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=64,
        **config,
    )


def _sd_scheduler():
    from diffusers import EulerDiscreteScheduler

    # The SD 1.5 / SDXL training schedule.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        timestep_spacing="leading",
        steps_offset=1,
    )


def _unet(**config: Any):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,  # 64 px / 8: the pipelines' default size is the catalog's default_size
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2,  # read as the number of heads by UNet2DConditionModel (legacy name)
        norm_num_groups=32,
        **config,
    )


# --- families --------------------------------------------------------------------------------------


def _build_sd15(seed: int):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer()
    text_encoder = _seeded(seed + 1, lambda: CLIPTextModel(_clip_config(tokenizer)))
    unet = _seeded(seed + 2, lambda: _unet(cross_attention_dim=64))
    vae = _seeded(seed + 3, lambda: _vae(scaling_factor=0.18215))
    return StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(seed: int):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    text_encoder = _seeded(seed + 1, lambda: CLIPTextModel(_clip_config(tokenizer)))
    text_encoder_2 = _seeded(
        seed + 2, lambda: CLIPTextModelWithProjection(_clip_config(tokenizer_2, hidden_act="gelu"))
    )
    projection_dim = text_encoder_2.config.projection_dim
    addition_time_embed_dim = 32
    unet = _seeded(
        seed + 3,
        lambda: _unet(
            # SDXL conditions on both encoders' penultimate hidden states, concatenated.
            cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=addition_time_embed_dim,
            # 6 time ids (original size, crop top-left, target size) + the pooled text embedding:
            # the sum the pipeline's _get_add_time_ids checks against.
            projection_class_embeddings_input_dim=6 * addition_time_embed_dim + projection_dim,
        ),
    )
    vae = _seeded(seed + 4, lambda: _vae(scaling_factor=0.13025, force_upcast=True))
    return StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=_sd_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_flux(seed: int):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, T5EncoderModel

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    text_encoder = _seeded(seed + 1, lambda: CLIPTextModel(_clip_config(tokenizer)))
    t5_config = _t5_config(tokenizer_2)
    text_encoder_2 = _seeded(seed + 2, lambda: T5EncoderModel(t5_config))
    vae = _seeded(seed + 3, lambda: _flow_vae(scaling_factor=0.3611, shift_factor=0.1159))
    transformer = _seeded(
        seed + 4,
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=vae.config.latent_channels * 4,  # 2x2 packed latent patches
            num_layers=1,
            num_single_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=t5_config.d_model,
            pooled_projection_dim=text_encoder.config.hidden_size,
            guidance_embeds=True,  # like FLUX.1-dev: guidance is an input, not a second pass
            axes_dims_rope=(8, 12, 12),  # sums to attention_head_dim
        ),
    )
    # FLUX.1-dev's scheduler config: resolution-dependent shift of the flow-matching sigmas.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        transformer=transformer.eval(),
    )


def _build_sd3(seed: int):
    """SD 3.5 in miniature: CLIP-L and CLIP-G (both with projections: their pooled outputs are concatenated),
    T5, an MMDiT with SD 3.5's RMS-normed q/k, and the 16-channel VAE.

    Widths follow the pipeline's rules: it pads the two CLIPs' hidden states, concatenated (64 + 64), to T5's
    width and joins them with T5's tokens along the sequence, so T5's d_model (128) is the transformer's
    `joint_attention_dim`, and the pooled projections (64 + 64) its `pooled_projection_dim`. Block 0 has
    MMDiT-X's second attention (SD 3.5 Medium), block 1 not (SD 3.5 Large), so both code paths run.
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    tokenizer_3 = _t5_tokenizer()
    text_encoder = _seeded(seed + 1, lambda: CLIPTextModelWithProjection(_clip_config(tokenizer)))
    text_encoder_2 = _seeded(
        seed + 2, lambda: CLIPTextModelWithProjection(_clip_config(tokenizer_2, hidden_act="gelu"))
    )
    clip_width = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    t5_config = _t5_config(tokenizer_3, d_model=_padded(clip_width), d_ff=256)
    text_encoder_3 = _seeded(seed + 3, lambda: T5EncoderModel(t5_config))
    # SD 3.5's VAE constants.
    vae = _seeded(seed + 4, lambda: _flow_vae(scaling_factor=1.5305, shift_factor=0.0609))
    transformer = _seeded(
        seed + 5,
        lambda: SD3Transformer2DModel(
            sample_size=8,  # 64 px / 8: the pipeline's default size is the catalog's default_size
            patch_size=2,
            in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels,
            num_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=t5_config.d_model,
            caption_projection_dim=64,  # = the inner width (heads x head dim), as in SD 3.5
            pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
            pos_embed_max_size=64,  # 64 patches of 16 px: renders up to the catalog's max_size, 1024
            dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ),
    )
    # SD 3.5's scheduler config: a fixed shift, no resolution-dependent one.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3.eval(),
        tokenizer_3=tokenizer_3,
    )
