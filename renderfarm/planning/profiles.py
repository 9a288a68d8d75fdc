"""Profiles: how one node runs one model. Pure data; no torch at import time.

A profile is (weights format, compute dtype, placement, VAE mode, text-encoder policy). The ladder of a
family runs from the fastest profile to the most frugal; a node picks the fastest that its VRAM holds
(`choose_profile` in planning/choose.py) and walks down the ladder on an out-of-memory error (`next_rung`).

Precision rules (each a function below, so every choice is visible and tested):
- compute dtype: bf16 where the card computes it natively (compute capability >= 8.0), else fp16; a CPU
  computes in fp32. Flux computing in fp16 clamps its activations (`fp16_clamp`), which overflow fp16.
- 16-bit weights are stored in the compute dtype: "bf16" weights on a Turing card become fp16, on a CPU fp32.
- fp8 formats are storage only, upcast to the compute dtype layer by layer; allowed on every card (fp8
  tensor cores, cc >= 8.9, are not needed for that).
- GGUF dequantizes straight to the compute dtype; bitsandbytes computes in it. Both need their own files
  or libraries: GGUF a file per type (`gguf_sources`), bitsandbytes a CUDA device.
- the VAE decodes in the compute dtype, except where that overflows: a family flagged `vae_force_upcast`
  (SDXL's original VAE produces NaNs in fp16) decodes in fp32 on fp16 cards unless the model names a VAE
  fixed for fp16 (`fp16_vae_source`). bf16 has fp32's range, so bf16 cards need no such exception.
- only components marked `quantize` take a quantized text-encoder format (T5; never the small CLIPs).
- a profile may drop a text encoder the catalog marks `droppable` (SD3's T5: the pipeline puts zeros in place
  of its embeddings). That changes the picture, not just its rounding, so those rungs come last and
  choose_profile takes one only where no rung that keeps the encoder fits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import NamedTuple

from renderfarm.planning.catalog import ModelEntry, Role
from renderfarm.planning.devices import Device


class WeightsFormat(str, Enum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"  # CPU only: what "16-bit" weights become where the compute dtype is fp32
    FP8_E4M3FN = "fp8-e4m3fn"  # fp8 storage, upcast to the compute dtype layer by layer
    FP8_E5M2 = "fp8-e5m2"
    NF4 = "nf4"  # bitsandbytes 4-bit NormalFloat
    FP4 = "fp4"  # bitsandbytes 4-bit float
    GGUF_Q8_0 = "gguf-q8_0"
    GGUF_Q5_0 = "gguf-q5_0"
    GGUF_Q5_1 = "gguf-q5_1"
    GGUF_Q4_0 = "gguf-q4_0"
    GGUF_Q4_1 = "gguf-q4_1"

    @property
    def is_gguf(self) -> bool:
        return self.value.startswith("gguf-")

    @property
    def is_bnb(self) -> bool:
        return self in (WeightsFormat.NF4, WeightsFormat.FP4)

    @property
    def is_fp8(self) -> bool:
        return self in (WeightsFormat.FP8_E4M3FN, WeightsFormat.FP8_E5M2)

    @property
    def is_float(self) -> bool:
        """Plain floating-point weights (bf16, fp16, fp32): stored in the compute dtype."""
        return self in (WeightsFormat.BF16, WeightsFormat.FP16, WeightsFormat.FP32)

    @property
    def method(self) -> str | None:
        """The quantization method ("bnb", "fp8", "gguf"), as the catalog's `unquantized_params` names it."""
        return "bnb" if self.is_bnb else "fp8" if self.is_fp8 else "gguf" if self.is_gguf else None

    @property
    def gguf_type(self) -> str | None:
        """The GGUF quantization type name ("Q8_0", "Q4_1", ...), None for other formats."""
        return self.value.removeprefix("gguf-").upper() if self.is_gguf else None


# Bytes per parameter as stored (GGUF block formats carry their scales: Q8_0 is 34 bytes per 32 weights).
BYTES_PER_PARAM: dict[WeightsFormat, float] = {
    WeightsFormat.BF16: 2.0,
    WeightsFormat.FP16: 2.0,
    WeightsFormat.FP32: 4.0,
    WeightsFormat.FP8_E4M3FN: 1.0,
    WeightsFormat.FP8_E5M2: 1.0,
    WeightsFormat.NF4: 0.5625,  # 4 bits + one fp32 absmax per 64 weights (+ double quantization)
    WeightsFormat.FP4: 0.5625,
    WeightsFormat.GGUF_Q8_0: 34 / 32,
    WeightsFormat.GGUF_Q5_0: 22 / 32,
    WeightsFormat.GGUF_Q5_1: 24 / 32,
    WeightsFormat.GGUF_Q4_0: 18 / 32,
    WeightsFormat.GGUF_Q4_1: 20 / 32,
}


class ComputeDtype(str, Enum):
    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"  # a CPU; on a card only a VAE that overflows fp16 (see vae_dtype_for)


class Placement(str, Enum):
    GPU = "gpu"  # every component resident on the GPU
    MODEL_OFFLOAD = "model-offload"  # one component on the GPU at a time (Forge "Queue")
    GROUP_OFFLOAD = "group-offload"  # denoiser blocks streamed with CUDA streams (Forge "Async")
    LEAF_OFFLOAD = "leaf-offload"  # every leaf module streamed: the never-OOM floor
    # Denoiser blocks read from files on disk one at a time (diffusers' offload_to_disk_path, no CUDA streams):
    # host RAM holds none of its weights. For a machine whose RAM holds neither the weights nor pinned copies.
    DISK_OFFLOAD = "disk-offload"

    @property
    def streams(self) -> bool:
        """Whether the denoiser is streamed from host memory, block by block or layer by layer, while it
        computes (disk offload reads from files instead)."""
        return self in (Placement.GROUP_OFFLOAD, Placement.LEAF_OFFLOAD)


class VaeMode(str, Enum):
    FULL = "full"
    SLICED = "sliced"  # one image of the batch at a time
    TILED = "tiled"  # overlapping tiles, one image at a time: memory no longer grows with pixels or batch


class TextEncoderPolicy(str, Enum):
    # Encode once per prompt, cache the embeddings, then move the encoders off the GPU.
    CACHE_AND_OFFLOAD = "cache-and-offload"
    RESIDENT = "resident"  # keep encoders on the GPU (only where VRAM is plentiful)


@dataclass(frozen=True)
class Profile:
    """How a node runs a model. `name` is stable and shown in `renderfarm plan` and node stats."""

    name: str
    weights: WeightsFormat
    compute_dtype: ComputeDtype
    placement: Placement
    vae: VaeMode = VaeMode.FULL
    text_encoders: TextEncoderPolicy = TextEncoderPolicy.CACHE_AND_OFFLOAD
    text_encoder_weights: WeightsFormat | None = None  # e.g. nf4 T5 on small cards; None: as `weights`
    # Group offload has no "GPU weights" budget: with CUDA streams diffusers runs one block per group whatever
    # is asked (hooks/group_offloading.py resets num_blocks_per_group to 1, tests/actors pin it), so two
    # blocks are in flight: the one computing and the one being copied.
    fp16_clamp: bool = False  # Flux in fp16 (Turing): clamp activations against fp16 overflow
    # Streamed placements: keep a pinned copy of every streamed tensor (diffusers' default: fastest copies, but
    # ~1.5x the weights in locked host RAM) or pin each block as it goes (`low_cpu_mem_usage`: the weights stay
    # in plain host memory once, a few blocks' pinned buffers are reused; the host thread copies every step).
    pin_streamed: bool = True
    vae_dtype: ComputeDtype | None = None  # None: the compute dtype
    # Load the pipeline without its droppable text encoder (SD3: `text_encoder_3=None`, the published way to
    # save T5's memory; its embeddings become zeros, so prompts condition through the CLIPs only).
    drop_large_text_encoder: bool = False

    @property
    def base_name(self) -> str:
        """The name without its VAE mode: profiles that differ only in VAE mode share loaded weights."""
        return self.name.rsplit("+vae-", 1)[0]

    def with_vae(self, mode: VaeMode) -> Profile:
        name = self.base_name if mode is VaeMode.FULL else f"{self.base_name}+vae-{mode.value}"
        return replace(self, vae=mode, name=name)

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "weights": self.weights.value,
            "compute_dtype": self.compute_dtype.value,
            "placement": self.placement.value,
            "vae": self.vae.value,
            "text_encoders": self.text_encoders.value,
            "text_encoder_weights": self.text_encoder_weights.value if self.text_encoder_weights else None,
            "fp16_clamp": self.fp16_clamp,
            "pin_streamed": self.pin_streamed,
            "vae_dtype": (self.vae_dtype or self.compute_dtype).value,
            "drop_large_text_encoder": self.drop_large_text_encoder,
        }


# --- precision rules --------------------------------------------------------------------------------


def compute_dtype_for(device: Device) -> ComputeDtype:
    if not device.is_cuda:
        return ComputeDtype.FP32
    return ComputeDtype.BF16 if device.bf16_native else ComputeDtype.FP16


def stored_format(weights: WeightsFormat, compute: ComputeDtype) -> WeightsFormat:
    """How `weights` are stored when computing in `compute`: plain floats take the compute dtype (bf16 on a
    card without bf16 becomes fp16); fp8, bitsandbytes and GGUF keep their format."""
    return WeightsFormat(compute.value) if weights.is_float else weights


def vae_dtype_for(entry: ModelEntry, compute: ComputeDtype) -> ComputeDtype:
    """The compute dtype, except fp32 for a VAE that overflows fp16 and has no fp16-safe replacement."""
    if compute is ComputeDtype.FP16 and entry.family.vae_force_upcast and not entry.fp16_vae_source:
        return ComputeDtype.FP32
    return compute


def fp16_clamp_for(entry: ModelEntry, compute: ComputeDtype) -> bool:
    return compute is ComputeDtype.FP16 and entry.family.fp16_clamp


def text_encoder_format(profile: Profile, quantize: bool) -> WeightsFormat:
    """The format of a text encoder under `profile`. Only encoders marked `quantize` (T5) take a quantized
    format; `text_encoder_weights` None means the denoiser's format where it applies to an encoder (fp8,
    bitsandbytes), else the compute dtype (GGUF is for denoisers only). Mirrors actors/loading.py."""
    compute = WeightsFormat(profile.compute_dtype.value)
    chosen = profile.text_encoder_weights
    if chosen is None and (profile.weights.is_fp8 or profile.weights.is_bnb):
        chosen = profile.weights
    if not quantize or chosen is None or chosen.is_float or chosen.is_gguf:
        return compute
    return chosen


def dropped_components(entry: ModelEntry, profile: Profile) -> set[str]:
    """The components `profile` loads the pipeline without (the droppable text encoders, or none)."""
    if not profile.drop_large_text_encoder:
        return set()
    return {c.name for c in entry.text_encoders if c.droppable}


def as_loaded(entry: ModelEntry, profile: Profile) -> ModelEntry:
    """`entry` as `profile` loads it: without the components it drops (the planner sizes what is there)."""
    dropped = dropped_components(entry, profile)
    if not dropped:
        return entry
    kept = {name: c for name, c in entry.components.items() if name not in dropped}
    return entry.model_copy(update={"components": kept})


def component_formats(entry: ModelEntry, profile: Profile) -> dict[str, WeightsFormat]:
    """Every component's weights format under `profile`, by pipeline attribute name; a component the profile
    drops has none."""
    formats: dict[str, WeightsFormat] = {}
    for component in as_loaded(entry, profile).components.values():
        if component.role is Role.DENOISER:
            formats[component.name] = profile.weights
        elif component.role is Role.TEXT_ENCODER:
            formats[component.name] = text_encoder_format(profile, component.quantize)
        else:
            formats[component.name] = WeightsFormat((profile.vae_dtype or profile.compute_dtype).value)
    return formats


# --- ladders ----------------------------------------------------------------------------------------

_16 = WeightsFormat.BF16  # "16-bit floats": resolved per device by `stored_format`
_GPU, _MODEL, _GROUP, _LEAF = Placement.GPU, Placement.MODEL_OFFLOAD, Placement.GROUP_OFFLOAD, Placement.LEAF_OFFLOAD
_RESIDENT, _CACHE = TextEncoderPolicy.RESIDENT, TextEncoderPolicy.CACHE_AND_OFFLOAD

# (denoiser weights, placement, text-encoder weights, text-encoder policy), fastest first: each rung trades
# a little speed or fidelity for memory. Full-precision weights come before lossy formats of similar memory
# (bf16 with model offload before GGUF Q8_0, 8-bit before 4-bit); streaming offload, slow on fast cards, is
# last. Each rung predicts no more memory than the one above it at the family's default size on a bf16
# card (tests/unit/test_vram.py holds that), so walking down always saves memory. On fp16 cards T5 keeps
# its `wo` in fp32 (transformers does, against fp16 overflow), which makes the rungs that hold a 16-bit T5
# next to the denoiser ~1.9 GiB larger, and SD3's group-offload rung moves its three encoders on together
# (model offload moves one at a time); choose_profile and next_rung do not rely on the order's peaks.
# GGUF Q4_x is deliberately absent: the community Flux files keep ~0.47B parameters in 16 bits, so they are
# larger than nf4 and slower to dequantize: nf4 with model offload beats them on every CUDA card. They
# stay usable as explicit profiles (the catalog lists their files).
# A quantized T5 is nf4 (bitsandbytes keeps its fp32 `wo`; fp8 storage would run it in fp16 on Turing).
class _Rung(NamedTuple):
    weights: WeightsFormat
    placement: Placement
    text_encoder_weights: WeightsFormat
    text_encoders: TextEncoderPolicy
    pin_streamed: bool = True
    drop_large_text_encoder: bool = False


_TRANSFORMER_LADDER: tuple[_Rung, ...] = tuple(_Rung(*row) for row in (
    (_16, _GPU, _16, _RESIDENT),
    (_16, _GPU, _16, _CACHE),
    (WeightsFormat.FP8_E4M3FN, _GPU, _16, _CACHE),
    (_16, _MODEL, _16, _CACHE),
    (WeightsFormat.GGUF_Q8_0, _GPU, _16, _CACHE),
    (WeightsFormat.FP8_E4M3FN, _MODEL, _16, _CACHE),
    (WeightsFormat.GGUF_Q8_0, _MODEL, _16, _CACHE),
    (WeightsFormat.NF4, _GPU, WeightsFormat.NF4, _CACHE),
    (WeightsFormat.NF4, _MODEL, WeightsFormat.NF4, _CACHE),
    (_16, _GROUP, WeightsFormat.NF4, _CACHE),  # blocks streamed, overlapped with compute
    # For an 8 GB card in a PC whose RAM holds neither 16-bit weights nor pinned copies: nf4 blocks streamed
    # from plain host memory, pinned as they go (the 8 GB card + 16 GB PC rung).
    (WeightsFormat.NF4, _GROUP, WeightsFormat.NF4, _CACHE, False),
    # For a PC whose RAM cannot hold the denoiser at all (an 8 GB card in an 8 GB PC): its 16-bit blocks are
    # read from disk for every step. Slow (the whole denoiser crosses the disk each step), but it runs.
    (_16, Placement.DISK_OFFLOAD, WeightsFormat.NF4, _CACHE),
    (_16, _LEAF, _16, _CACHE),  # the VRAM floor: denoiser and encoders streamed layer by layer
))
# A transformer whose T5 the pipeline can do without (SD3). T5-XXL is most of SD3's memory (the diffusers SD3
# blog, configs/published_figures.yaml: SD3 Medium in fp16 peaks at 18.8 GB, 10.6 with an 8-bit T5 at ~4% more
# time, 12.1 with model offload, 4.3 with model offload and no T5), so beside the transformer ladder's rungs:
# - T5 quantized under a 16-bit denoiser, resident and with model offload (under model offload T5 is the
#   largest component of SD 3.5 Medium: it sets the peak);
# - then, after the ladder's floor, the rungs that drop T5, fastest first and leaf offload last again. Dropping
#   T5 changes the picture (the prompt conditions through the CLIPs only; Stability AI's SD3 paper reports
#   weaker typography and adherence to complex prompts without it), so choose_profile takes one of them only
#   where no rung that keeps T5 fits (the host RAM or disk of a small machine).
# With T5 this large, SD3's peaks do not fall rung by rung as Flux's do; choose_profile and next_rung do not
# rely on that.
_NO_T5 = tuple(_Rung(*row, drop_large_text_encoder=True) for row in (
    (_16, _GPU, _16, _CACHE),
    (WeightsFormat.FP8_E4M3FN, _GPU, _16, _CACHE),
    (_16, _MODEL, _16, _CACHE),  # the published "Offloading + no T5"
    (WeightsFormat.NF4, _GPU, _16, _CACHE),
    (WeightsFormat.NF4, _MODEL, _16, _CACHE),
    (_16, Placement.DISK_OFFLOAD, _16, _CACHE),
    (_16, _LEAF, _16, _CACHE),
))


def _with_quantized_t5(rungs: tuple[_Rung, ...]) -> tuple[_Rung, ...]:
    out = []
    for rung in rungs:
        out.append(rung)
        if rung.weights is _16 and rung.placement in (_GPU, _MODEL) and rung.text_encoders is _CACHE:
            out.append(rung._replace(text_encoder_weights=WeightsFormat.NF4))
    return tuple(out)


_DROPPABLE_T5_LADDER: tuple[_Rung, ...] = _with_quantized_t5(_TRANSFORMER_LADDER) + _NO_T5

# UNets are small: 16-bit everywhere but the last offloaded rung. Block-level group offload moves a third
# of an SDXL UNet at a time, so leaf offload is the floor.
_UNET_LADDER: tuple[_Rung, ...] = tuple(_Rung(*row) for row in (
    (_16, _GPU, _16, _RESIDENT),
    (_16, _GPU, _16, _CACHE),
    (_16, _MODEL, _16, _CACHE),
    (WeightsFormat.FP8_E4M3FN, _MODEL, _16, _CACHE),
    (_16, _LEAF, _16, _CACHE),
))


def profile_name(
    weights: WeightsFormat,
    placement: Placement,
    text_encoder_weights: WeightsFormat | None,
    text_encoders: TextEncoderPolicy,
    vae: VaeMode = VaeMode.FULL,
    pin_streamed: bool = True,
    drop_large_text_encoder: bool = False,
) -> str:
    """"nf4", "bf16+model-offload", "gguf-q4_1+te-nf4+model-offload", "bf16+no-t5+model-offload",
    "fp16+te-resident+vae-tiled", ..."""
    parts = [weights.value]
    if drop_large_text_encoder:
        parts.append("no-t5")  # the droppable text encoder of every catalog family is T5
    if text_encoder_weights is not None and not text_encoder_weights.is_float and text_encoder_weights != weights:
        parts.append(f"te-{text_encoder_weights.value}")
    if placement is not Placement.GPU:
        parts.append(placement.value)
    if placement.streams and not pin_streamed:
        parts.append("pin-per-step")
    if text_encoders is TextEncoderPolicy.RESIDENT:
        parts.append("te-resident")
    if vae is not VaeMode.FULL:
        parts.append(f"vae-{vae.value}")
    return "+".join(parts)


def ladder(entry: ModelEntry, device: Device) -> list[Profile]:
    """The ladder of `entry` on `device`, fastest first, with the precision rules applied. Rungs the
    device or the catalog cannot run are included; `unavailable_reason` says which and why."""
    compute = compute_dtype_for(device)
    if entry.denoiser.name != "transformer":
        rungs = _UNET_LADDER
    elif any(t.droppable for t in entry.text_encoders):
        rungs = _DROPPABLE_T5_LADDER
    else:
        rungs = _TRANSFORMER_LADDER
    profiles = []
    for weights, placement, te_weights, te_policy, pin_streamed, drop in rungs:
        weights, te_weights = stored_format(weights, compute), stored_format(te_weights, compute)
        profiles.append(
            Profile(
                name=profile_name(weights, placement, te_weights, te_policy, pin_streamed=pin_streamed,
                                  drop_large_text_encoder=drop),
                pin_streamed=pin_streamed,
                drop_large_text_encoder=drop,
                weights=weights,
                compute_dtype=compute,
                placement=placement,
                text_encoders=te_policy,
                text_encoder_weights=te_weights,
                fp16_clamp=fp16_clamp_for(entry, compute),
                vae_dtype=vae_dtype_for(entry, compute),
            )
        )
    return profiles


def unavailable_reason(entry: ModelEntry, profile: Profile, device: Device) -> str | None:
    """Why `device` cannot run `profile` of `entry` at all (whatever its memory), or None."""
    if profile.drop_large_text_encoder and not dropped_components(entry, profile):
        return f"{entry.name}'s pipeline needs every one of its text encoders (none is droppable)"
    if not device.is_cuda:
        if profile.placement is not Placement.GPU:
            return "offload needs a CUDA device; a CPU computes where the weights live"
        if profile.text_encoders is TextEncoderPolicy.CACHE_AND_OFFLOAD:
            return "a CPU has no second memory to offload the text encoders to"
    if any(f.is_bnb for f in component_formats(entry, profile).values()) and not device.is_cuda:
        return "bitsandbytes 4-bit needs a CUDA device"
    gguf_type = profile.weights.gguf_type
    if gguf_type and not entry.standin and gguf_type.lower() not in entry.gguf_sources:
        return f"no GGUF {gguf_type} file for {entry.name} in the catalog (gguf_sources)"
    return None
