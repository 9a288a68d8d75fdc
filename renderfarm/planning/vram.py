"""Predict peak memory and seconds per step for (model, profile, size, batch) on a device. No torch.

    peak = reserve + max over stages (weights resident in that stage + activations of that stage)

Stages: text encode, denoise, decode. Weights are each component's parameters times the bytes per parameter
of its format (profiles.component_formats), with the parts a quantizer leaves alone counted at their own
width (catalog: `unquantized_params`, `keep_fp32_params`). What is resident per stage follows the placement,
as actors/loading.py applies it:
- gpu: every component, all the time; text encoders only while encoding unless the policy keeps them.
- model offload (accelerate): one component at a time, so a stage holds only its own component.
- group offload: the denoiser streams in groups, two in flight (`gpu_weights_gib`, or two blocks); VAE
  resident; text encoders moved on to encode.
- leaf offload: denoiser and encoders stream layer by layer, two layers in flight; VAE resident.

What the prediction means: `peak_gib` is the memory the device must have: torch's peak *reserved* memory
(`torch.cuda.max_memory_reserved`, allocator fragmentation included) plus the CUDA context, which torch does
not count. Reserved is above what a job strictly needs (the allocator frees its cache and retries before it
raises out-of-memory), so the prediction errs on the safe side.

Calibration (tests/unit/test_vram.py holds it): the diffusers quantization benchmarks of Flux.1-dev at
1024x1024 on an H100 (published in /work/shared/NOTES.md): loaded sizes for the weights, peak reserved
minus loaded (4.5-4.8 GiB, the bf16 VAE decode) for the decode activations, bf16 model offload (23.27 GiB
with a 22.2 GiB transformer) for the denoiser's activations; the L40S leaf-offload step (1.9 s) for the
streaming efficiency. UNet and fp16/fp32 decode figures come from diffusers' published SD 1.5 and SDXL
benchmarks (peak allocated): rougher, and marked below.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from renderfarm.planning.catalog import Component, ModelEntry
from renderfarm.planning.devices import Device
from renderfarm.planning.profiles import (
    BYTES_PER_PARAM,
    DEFAULT_MARGIN_GIB,
    ComputeDtype,
    Placement,
    Profile,
    TextEncoderPolicy,
    VaeMode,
    WeightsFormat,
    choose_profile,
    component_formats,
)

GIB = 2**30

# --- memory constants --------------------------------------------------------------------------------
CONTEXT_GIB = 0.5  # CUDA context and library workspaces, outside torch's allocator (a CPU: the runtime)
ALLOCATOR_SLACK_GIB = 0.5  # fragmentation at the peak, beyond what the activation figures below include
# Denoiser activations, in hidden vectors held per token per forward pass (reserved, with fragmentation).
# Transformer: Flux bf16 model offload peaks 1.10 GiB above its weights at 4608 tokens = slack + 0.6 GiB.
# UNet: from SD 1.5's published fp16 peaks (~0.3 GiB at 512x512 with CFG): rough.
DENOISER_ACTIVATION_VECTORS = {"transformer": 22.0, "unet": 60.0}
TEXT_ENCODER_ACTIVATION_VECTORS = 16.0  # small either way: T5-XXL, 512 tokens ~64 MiB per prompt
# VAE decode per output pixel at 128 full-resolution channels, by VAE dtype. bf16: Flux's published peaks
# (decode ~4.0 GiB + slack at 1 Mpx; diffusers' Upsample2D upcasts bf16 to fp32 around its interpolation).
# fp16 and fp32: scaled from SD 1.5 / SDXL published peak-allocated figures (~1.6 and ~3.9 KiB/px) by the
# reserved/allocated ratio seen on Flux: rough.
DECODE_KIB_PER_PX = {ComputeDtype.FP16: 2.75, ComputeDtype.BF16: 4.0, ComputeDtype.FP32: 6.5}
VAE_TILE_PX = 512  # tiled decode works on 512x512-pixel tiles (pipelines set the VAE's tile size to this)

# --- speed constants ---------------------------------------------------------------------------------
MFU = 0.6  # achieved fraction of dense tensor TFLOPS (Flux on an H100: 0.22 s/step predicted, ~0.24 seen)
UNET_FLOP_FACTOR = 0.2  # a UNet spends most parameters at low resolution: FLOPs ~ 0.2 x 2 x params x positions
LAUNCH_OVERHEAD_S = 0.01  # per denoiser forward: kernel launches, Python
# Dequantization cost per step, seconds per billion parameters at an H100's 3.35 TB/s (scaled by bandwidth):
# from the published H100 times, 12 s bf16 / 12 nf4 / 13 fp8 / 15 Q8_0 / 23 Q4_1 for 50 steps of Flux.
DEQUANT_S_PER_GPARAM = {
    WeightsFormat.NF4: 0.0, WeightsFormat.FP4: 0.0,
    WeightsFormat.FP8_E4M3FN: 0.0017, WeightsFormat.FP8_E5M2: 0.0017,
    WeightsFormat.GGUF_Q8_0: 0.005,
    WeightsFormat.GGUF_Q5_0: 0.0185, WeightsFormat.GGUF_Q5_1: 0.0185,
    WeightsFormat.GGUF_Q4_0: 0.0185, WeightsFormat.GGUF_Q4_1: 0.0185,
}
DEQUANT_REFERENCE_GBPS = 3350.0
# Achieved fraction of the PCIe link when streaming: block groups move in large copies; leaf offload in
# many small ones (the L40S moves Flux's 23.8 GB per step in ~1.9 s: 40% of PCIe 4.0 x16).
STREAM_EFFICIENCY = {Placement.GROUP_OFFLOAD: 0.7, Placement.LEAF_OFFLOAD: 0.4}


class Stage(str, Enum):
    TEXT_ENCODE = "text-encode"
    DENOISE = "denoise"
    DECODE = "decode"


@dataclass(frozen=True)
class Prediction:
    peak_gib: float  # what the device must have (see the module docstring)
    peak_stage: Stage
    stage_peaks_gib: dict[Stage, float]
    resident_weights_gib: float  # the most weight bytes on the device at once
    weights_gib: dict[str, float]  # each component as stored
    reserve_gib: float  # context + allocator slack, included in every stage
    denoiser_in_flight_gib: float  # denoiser weights on the device during a denoise step
    seconds_per_step: float  # rough: one denoising step of the whole batch
    measured: bool = False  # peak_gib was raised to a node's measured peak (planning.measured)

    @property
    def allocator_peak_gib(self) -> float:
        """The peak without the CUDA context: what torch.cuda.max_memory_reserved() would report."""
        return self.peak_gib - CONTEXT_GIB


def _bytes(fmt: WeightsFormat) -> float:
    return BYTES_PER_PARAM[fmt]


def component_bytes(component: Component, fmt: WeightsFormat, compute: ComputeDtype) -> float:
    """Bytes of `component` stored as `fmt` when computing in `compute`."""
    keep_fp32 = component.keep_fp32_params if fmt is WeightsFormat.FP16 or fmt.is_bnb else 0.0
    if fmt.is_float:
        return (component.params - keep_fp32) * _bytes(fmt) + keep_fp32 * 4
    left = component.unquantized_params.get(fmt.method or "", 0.0)
    quantized = component.params - keep_fp32 - left
    return quantized * _bytes(fmt) + left * _bytes(WeightsFormat(compute.value)) + keep_fp32 * 4


def denoiser_bytes(entry: ModelEntry, profile: Profile) -> float:
    return component_bytes(entry.denoiser, profile.weights, profile.compute_dtype)


def _stage_weights(entry: ModelEntry, profile: Profile, sizes: dict[str, float]) -> tuple[dict[Stage, float], float]:
    """Weight bytes on the device in each stage, and the denoiser's bytes in flight while denoising."""
    den = entry.denoiser
    vae_bytes = sizes[entry.vae.name] if entry.vae else 0.0
    per_param = {c.name: sizes[c.name] / c.params for c in entry.components.values()}

    def streamed(c: Component, params: float) -> float:  # two groups or layers in flight
        return 2 * params * per_param[c.name]

    at = {stage: 0.0 for stage in Stage}
    placement = profile.placement
    if placement is Placement.GPU:
        in_flight = sizes[den.name]
        at = {stage: in_flight + vae_bytes for stage in Stage}
    elif placement is Placement.MODEL_OFFLOAD:
        in_flight = sizes[den.name]
        at[Stage.DENOISE] += in_flight
        at[Stage.DECODE] += vae_bytes
    else:
        if placement is Placement.GROUP_OFFLOAD:
            in_flight = max((profile.gpu_weights_gib or 0.0) * GIB, streamed(den, den.block_params))
        else:
            in_flight = streamed(den, den.layer_params)
        at = {stage: vae_bytes for stage in Stage}
        at[Stage.DENOISE] += in_flight

    encoders = entry.text_encoders
    if encoders:
        if profile.text_encoders is TextEncoderPolicy.RESIDENT:
            total = sum(sizes[t.name] for t in encoders)
            at = {stage: b + total for stage, b in at.items()}
        elif placement is Placement.MODEL_OFFLOAD:  # one encoder at a time
            at[Stage.TEXT_ENCODE] += max(sizes[t.name] for t in encoders)
        elif placement is Placement.LEAF_OFFLOAD:
            at[Stage.TEXT_ENCODE] += max(streamed(t, t.layer_params) for t in encoders)
        else:  # moved on together to encode, off again after
            at[Stage.TEXT_ENCODE] += sum(sizes[t.name] for t in encoders)
    return at, in_flight


def _activations(entry: ModelEntry, profile: Profile, width: int, height: int, batch: int) -> dict[Stage, float]:
    family = entry.family
    compute_bytes = _bytes(WeightsFormat(profile.compute_dtype.value))
    cfg = 2 if family.uses_cfg else 1
    den = entry.denoiser
    joint = den.name == "transformer"  # a transformer attends over the prompt tokens too
    tokens = family.latent_tokens(width, height) + (family.text_tokens if joint else 0)
    kind = "transformer" if joint else "unet"
    denoise = tokens * batch * cfg * den.width * compute_bytes * DENOISER_ACTIVATION_VECTORS[kind]

    encode = max(
        (batch * cfg * family.text_tokens * t.width * compute_bytes * TEXT_ENCODER_ACTIVATION_VECTORS
         for t in entry.text_encoders),
        default=0.0,
    )

    decode = 0.0
    if entry.vae is not None:
        vae_dtype = profile.vae_dtype or profile.compute_dtype
        per_px = DECODE_KIB_PER_PX[vae_dtype] * 1024 * entry.vae.width / 128
        pixels = width * height
        if profile.vae is VaeMode.TILED:
            working = per_px * min(pixels, VAE_TILE_PX**2)
        elif profile.vae is VaeMode.SLICED:
            working = per_px * pixels
        else:
            working = per_px * pixels * batch
        # The decoded batch stays on the device (tiled decode also holds its tiles: ~3 images' worth).
        output = batch * pixels * 3 * _bytes(WeightsFormat(vae_dtype.value)) * 3
        decode = working + output
    return {Stage.TEXT_ENCODE: encode, Stage.DENOISE: denoise, Stage.DECODE: decode}


def _seconds_per_step(
    entry: ModelEntry, profile: Profile, device: Device, den_bytes: float, width: int, height: int, batch: int
) -> float:
    family, den = entry.family, entry.denoiser
    passes = batch * (2 if family.uses_cfg else 1)
    latent = family.latent_tokens(width, height)
    if den.name == "transformer":
        tokens = latent + family.text_tokens
        # Linear layers, plus attention (QK^T and AV: 4 x tokens^2 x width per block).
        flops = passes * (2 * den.params * tokens + 4 * tokens**2 * den.width * den.blocks)
    else:
        flops = passes * UNET_FLOP_FACTOR * 2 * den.params * latent
    compute = flops / (device.fp16_tflops * 1e12 * MFU) + LAUNCH_OVERHEAD_S * passes
    compute = max(compute, den_bytes / (device.memory_gbps * 1e9))  # every weight is read once per step
    compute += (
        den.params / 1e9 * DEQUANT_S_PER_GPARAM.get(profile.weights, 0.0)
        * DEQUANT_REFERENCE_GBPS / device.memory_gbps
    )
    efficiency = STREAM_EFFICIENCY.get(profile.placement)
    if efficiency and device.is_cuda:
        # The whole denoiser crosses PCIe every step; CUDA streams overlap that with compute.
        return max(compute, den_bytes / (device.pcie_gbps * 1e9 * efficiency))
    return compute


def predict(
    entry: ModelEntry, profile: Profile, device: Device, width: int, height: int, batch: int = 1
) -> Prediction:
    """Peak memory and a rough seconds per step for `batch` images of `width` x `height`."""
    if width <= 0 or height <= 0 or batch < 1:
        raise ValueError(f"predict needs a positive size and batch, got {width}x{height} x{batch}")
    formats = component_formats(entry, profile)
    sizes = {
        name: component_bytes(entry.components[name], fmt, profile.compute_dtype) for name, fmt in formats.items()
    }
    weights, in_flight = _stage_weights(entry, profile, sizes)
    activations = _activations(entry, profile, width, height, batch)
    reserve = CONTEXT_GIB + ALLOCATOR_SLACK_GIB
    stage_peaks = {stage: reserve + (weights[stage] + activations[stage]) / GIB for stage in Stage}
    peak_stage = max(stage_peaks, key=stage_peaks.__getitem__)
    return Prediction(
        peak_gib=stage_peaks[peak_stage],
        peak_stage=peak_stage,
        stage_peaks_gib=stage_peaks,
        resident_weights_gib=max(weights.values()) / GIB,
        weights_gib={name: b / GIB for name, b in sizes.items()},
        reserve_gib=reserve,
        denoiser_in_flight_gib=in_flight / GIB,
        seconds_per_step=_seconds_per_step(
            entry, profile, device, sizes[entry.denoiser.name], width, height, batch
        ),
    )


def plan_report(
    entry: ModelEntry, device: Device, width: int, height: int, batch: int = 1,
    margin_gib: float = DEFAULT_MARGIN_GIB,
) -> dict[str, Any]:
    """What `renderfarm plan` prints as JSON: the device, the chosen profile and every candidate."""
    choice = choose_profile(entry, device, width, height, batch, margin_gib)
    return {
        "model": entry.name,
        "device": device.as_dict(),
        "size": [width, height],
        "batch": batch,
        "margin_gib": margin_gib,
        "chosen": choice.chosen.name if choice.chosen else None,
        "reason": choice.reason,
        "candidates": [
            {
                "name": c.profile.name,
                "weights": c.profile.weights.value,
                "text_encoder_weights": (c.profile.text_encoder_weights or c.profile.weights).value,
                "compute_dtype": c.profile.compute_dtype.value,
                "placement": c.profile.placement.value,
                "gpu_weights_gib": c.profile.gpu_weights_gib,
                "vae": c.profile.vae.value,
                "vae_dtype": (c.profile.vae_dtype or c.profile.compute_dtype).value,
                "predicted_peak_gib": round(c.prediction.peak_gib, 2),
                "peak_stage": c.prediction.peak_stage.value,
                "seconds_per_step": round(c.prediction.seconds_per_step, 3),
                "fits": c.fits,
                "reason": c.reason,
            }
            for c in choice.candidates
        ],
    }
