"""Predict peak memory and seconds per step for (model, profile, size, batch) on a device. No torch.

    peak = reserve + max over stages (weights resident in that stage + activations of that stage)

Stages: load, text encode, VAE encode (img2img and inpainting only: see below), denoise, decode. Weights are each
component's parameters times the bytes per parameter of its format (profiles.component_formats), with the parts a
quantizer leaves alone counted at their own width (catalog: `unquantized_params`, `keep_fp32_params`). What is
resident per stage follows the placement, as actors/loading.py applies it:
- gpu: every component, all the time; text encoders only while encoding unless the policy keeps them.
- model offload (accelerate): one component at a time, so a stage holds only its own component.
- group offload: the denoiser streams block by block, two blocks in flight (with CUDA streams diffusers
  runs one block per group whatever is asked); VAE resident; text encoders moved on to encode.
- leaf offload: denoiser and encoders stream layer by layer, two layers in flight; VAE resident.
- disk offload: the denoiser's blocks are read from disk one at a time (counted as two); VAE resident.
- load: bitsandbytes quantizes on the GPU while loading (one 16-bit layer at a time beside what is already
  there); a component whose home is host memory is loaded onto the card, quantized and parked in host memory
  before the next one loads, so the load peak is the largest such component or the resident set.

Host memory is predicted beside VRAM (`Prediction.host_gib`, `host_peak_gib`): plain copies in host memory
for what waits there (model offload, encoders under cache-and-offload), pinned copies of everything streamed
with CUDA streams (diffusers pins a copy of every streamed tensor; torch's pinned allocator rounds each one
up to a power of two: `Component.pinned_factor`), and the setup transients: `from_pretrained` converts into
host memory every component it loads in a dtype other than its files' (`ModelEntry.checkpoint_dtype`; in
their own dtype they stay memory-mapped), and group offload pins its copies while the originals still exist.

Image tasks (`task`: "img2img", "inpaint"; "txt2img" by default). diffusers' img2img and inpaint pipelines run the
VAE's encoder over the init image, and the inpaint ones over the masked image too (SD, SDXL, Flux and SD 3.x alike),
one encode after the other, in the VAE's own dtype (actors/tasks.py `vae_as_loaded`; tests/actors/
test_vae_encode_pins.py pins all of it). That is the VAE-encode stage: the VAE's weights as the placement holds them
when it encodes (those of the decode stage) plus the encoder's working set at the job's size and batch, the pixel
batch on the device and the latents it returns. Under model offload the VAE, last in the pipelines'
`model_cpu_offload_seq`, stays on the card once it has encoded: accelerate's hook on the denoiser offloads only the
component before it in the chain, so an image task's denoise stage holds the VAE beside the denoiser. Inpainting
also holds latent-sized tensors through the denoise (the mask and the masked image's latents; with a 4-channel UNet
or a 16-channel transformer the init latents and noise it blends back each step; with a 9-channel inpainting UNet
the 9-channel input it concatenates). The encode's seconds (`Prediction.vae_encode_s`) count in the job's time.

What the prediction means: `peak_gib` is the memory the device must have: torch's peak *reserved* memory
(`torch.cuda.max_memory_reserved`, allocator fragmentation included) plus the CUDA context, which torch does
not count. Reserved is above what a job strictly needs (the allocator frees its cache and retries before it
raises out-of-memory), so the prediction errs on the safe side.

Calibration (tests/unit/test_vram.py holds it): the diffusers quantization benchmarks of Flux.1-dev at
1024x1024 on an H100 (quoted with sources in configs/published_figures.yaml): loaded sizes for the weights, peak reserved
minus loaded (4.5-4.8 GiB, the bf16 VAE decode) for the decode activations, bf16 model offload (23.27 GiB
with a 22.2 GiB transformer) for the denoiser's activations; the L40S leaf-offload step (1.9 s) for the
streaming efficiency. UNet and fp16/fp32 decode figures come from diffusers' published SD 1.5 and SDXL
benchmarks (peak allocated): rougher, and marked below.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from renderfarm.planning.catalog import Component, ModelEntry
from renderfarm.planning.devices import Device
from renderfarm.planning.profiles import (
    BYTES_PER_PARAM,
    ComputeDtype,
    Placement,
    Profile,
    TextEncoderPolicy,
    VaeMode,
    WeightsFormat,
    as_loaded,
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
# A full decode of a batch: each image after the first adds this fraction of the first's figure (which was
# fitted at batch 1 on reserved memory, workspace and upcast buffers included, that a batch does not
# repeat). Fitted on one published batch run (diffusers-torchao, Flux.1-dev bf16 batch 8 on an H100,
# `fitted: true` in configs/published_figures.yaml); the batch 4 and 16 runs and SDXL's batch-4 runs are
# held out (bench/vram_calibration.py).
DECODE_BATCH_SLOPE = 0.5
VAE_TILE_PX = 512  # tiled decode works on tiles of at most 512x512 pixels (actors/loading.py cap_tiles sets it)
# VAE encode per input pixel, as a fraction of the decode's figure above, under the same rules (batch slope, tiles,
# slices): the encoder's live-tensor peak over the decoder's on the AutoencoderKL of SD, SDXL, Flux and SD 3.x
# (channels 128-256-512-512; the encoder has two resnets per level, the decoder three, and it upsamples 256
# channels to full resolution): 2.5 vs 3.0 KiB per pixel in fp32, 1.25 vs 1.5 in bf16, at batch 1 and 2 (counted
# by tensor storage on the CPU, random weights; no card measured). Rounded up.
ENCODE_DECODE_RATIO = 0.85
# The encoder's FLOPs per pixel at 128 full-resolution channels (its convolutions, counted on the same
# architecture: 4.13 M; the decoder's 9.46 M), scaling with the square of the width. A VAE's convolutions at full
# resolution reach a smaller share of the tensor rate than a denoiser's matmuls: VAE_MFU is a guess, not fitted.
ENCODER_FLOPS_PER_PX = 4.13e6
VAE_MFU = 0.3
VAE_FP32_SLOWDOWN = 4.0  # an fp32 VAE on a card: TF32 or plain fp32 convolutions, not 16-bit tensor cores
TASKS = ("txt2img", "img2img", "inpaint")

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


# Pinning blocks as they stream (`Profile.pin_streamed` False): the host thread copies each block into a
# pinned buffer (memcpy, ~10 GB/s on a desktop), overlapped with the card's compute; torch's host cache keeps
# about three blocks' buffers (computing, prefetched, just freed).
HOST_PIN_GBPS = 10.0
PINNED_BLOCKS_IN_CACHE = 3
# Pageable host -> device copies (`module.to("cuda")` from plain host memory: model offload, encoders moving
# on to encode) reach about half the link's pinned rate.
PAGEABLE_EFFICIENCY = 0.5


def effective_steps(steps: int, strength: float | None, flow_matching: bool) -> int:
    """The denoising steps a pipeline call of `steps` runs at img2img/inpaint `strength` (None: text-to-image,
    all of them), as diffusers' `get_timesteps` counts them, float arithmetic included (tests/actors/test_tasks.py
    checks it against the pipelines): the SD and SDXL pipelines run int(steps * strength); the flow-matching ones
    (Flux, SD 3.x) run steps - int(steps - steps * strength), which rounds the other way (7 of 10 at 0.65, not 6).
    0: no step runs (the worker returns the init image's VAE round trip)."""
    if strength is None:
        return steps
    if flow_matching:
        return steps - int(max(steps - min(steps * strength, steps), 0))
    return steps - max(steps - min(int(steps * strength), steps), 0)


class Stage(str, Enum):
    LOAD = "load"
    TEXT_ENCODE = "text-encode"
    VAE_ENCODE = "vae-encode"  # img2img and inpainting only
    DENOISE = "denoise"
    DECODE = "decode"


def task_stages(task: str) -> tuple[Stage, ...]:
    """The stages a render of `task` goes through (the VAE encode only where there is an init image)."""
    check_task(task)
    return tuple(s for s in Stage if s is not Stage.VAE_ENCODE or task != "txt2img")


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


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
    # Host memory, GiB (0 on a CPU device, where everything is counted in `peak_gib`): what the pipeline holds
    # there while it renders (plain copies + pinned buffers), the pinned part alone, and the most at any moment,
    # loading included.
    host_gib: float = 0.0
    pinned_gib: float = 0.0
    host_peak_gib: float = 0.0
    # Seconds per job beside the denoising steps: moving offloaded components on and off the card.
    seconds_per_job_overhead: float = 0.0
    measured: bool = False  # peak_gib was raised to a node's measured peak (planning.measured)
    task: str = "txt2img"
    vae_encode_s: float = 0.0  # seconds the VAE encodes of an image task take, the whole batch (0: txt2img)

    def seconds_per_job(self, steps: int) -> float:
        """Predicted seconds for one pipeline call of `steps` denoising steps (loading not included)."""
        return steps * self.seconds_per_step + self.seconds_per_job_overhead + self.vae_encode_s

    @property
    def allocator_peak_gib(self) -> float:
        """The peak without the CUDA context: what torch.cuda.max_memory_reserved() would report."""
        return self.peak_gib - CONTEXT_GIB


def _bytes(fmt: WeightsFormat) -> float:
    return BYTES_PER_PARAM[fmt]


def component_bytes(component: Component, fmt: WeightsFormat, compute: ComputeDtype) -> float:
    """Bytes of `component` stored as `fmt` when computing in `compute`.

    `keep_fp32_params` (T5's `wo`): transformers upcasts them to fp32 only when the model loads in fp16
    (`_keep_in_fp32_modules`, modeling_utils), and bitsandbytes leaves them unquantized
    (`modules_to_not_convert`), so under nf4 they sit in the compute dtype: fp32 on an fp16 card, bf16 on a
    bf16 one. tests/actors/test_quantize.py pins both."""
    keep = component.keep_fp32_params if fmt is WeightsFormat.FP16 or fmt.is_bnb else 0.0
    keep_bytes = 4.0 if compute is ComputeDtype.FP16 or fmt is WeightsFormat.FP16 else _bytes(WeightsFormat(compute.value))
    if fmt.is_float:
        return (component.params - keep) * _bytes(fmt) + keep * keep_bytes
    left = component.unquantized_params.get(fmt.method or "", 0.0)
    quantized = component.params - keep - left
    return quantized * _bytes(fmt) + left * _bytes(WeightsFormat(compute.value)) + keep * keep_bytes


def denoiser_bytes(entry: ModelEntry, profile: Profile) -> float:
    return component_bytes(entry.denoiser, profile.weights, profile.compute_dtype)


def _stage_weights(
    entry: ModelEntry, profile: Profile, sizes: dict[str, float], task: str = "txt2img"
) -> tuple[dict[Stage, float], float]:
    """Weight bytes on the device in each render stage (load is `_load_weights`), and the denoiser's bytes in
    flight while denoising. The VAE encode holds what the decode holds; under model offload an image task's
    denoise holds the VAE too (it encoded just before, and the denoiser's hook offloads only the component before
    it in the offload chain, never the VAE after it)."""
    den = entry.denoiser
    vae_bytes = sizes[entry.vae.name] if entry.vae else 0.0
    per_param = {c.name: sizes[c.name] / c.params for c in entry.components.values()}

    def streamed(c: Component, params: float) -> float:  # two blocks or layers in flight
        return 2 * params * per_param[c.name]

    at = {stage: 0.0 for stage in Stage}
    placement = profile.placement
    if placement is Placement.GPU:
        in_flight = sizes[den.name]
        at = {stage: in_flight + vae_bytes for stage in Stage}
    elif placement is Placement.MODEL_OFFLOAD:
        in_flight = sizes[den.name]
        at[Stage.DENOISE] += in_flight + (vae_bytes if task != "txt2img" else 0.0)
        at[Stage.DECODE] += vae_bytes
        at[Stage.VAE_ENCODE] += vae_bytes
    else:
        if placement is Placement.LEAF_OFFLOAD:
            in_flight = streamed(den, den.layer_params)
        else:  # group offload: one block per group, two in flight
            in_flight = streamed(den, den.block_params)
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
    at[Stage.LOAD] = 0.0
    if task == "txt2img":
        del at[Stage.VAE_ENCODE]
    return at, in_flight


def host_homed(entry: ModelEntry, profile: Profile) -> set[str]:
    """Components whose home is host memory on a card (moved on only to compute). Mirrors actors/loading.py."""
    entry = as_loaded(entry, profile)
    placement = profile.placement
    names = {c.name for c in entry.components.values()}
    if placement is Placement.MODEL_OFFLOAD:
        return names
    encoders = {t.name for t in entry.text_encoders}
    home = set()
    if profile.text_encoders is TextEncoderPolicy.CACHE_AND_OFFLOAD or placement is Placement.LEAF_OFFLOAD:
        home |= encoders
    if placement.streams:
        home.add(entry.denoiser.name)
    return home  # disk offload: the denoiser's home is its files on disk


def _load_weights(
    entry: ModelEntry, profile: Profile, formats: dict[str, WeightsFormat], sizes: dict[str, float],
    resident_after: float,
) -> float:
    """Device bytes while loading. bitsandbytes components load straight onto the card and quantize there,
    one 16-bit layer at a time; those whose home is host memory are parked there before the next loads
    (group offload's 16-bit denoiser loads in host memory; a streamed bitsandbytes one quantizes there). The
    rest arrive by placement after `from_pretrained`: `resident_after`."""
    home = host_homed(entry, profile)
    compute_bytes = _bytes(WeightsFormat(profile.compute_dtype.value))
    parked = 0.0
    transient = 0.0
    for name, fmt in formats.items():
        if not fmt.is_bnb or (profile.placement.streams and name == entry.denoiser.name):
            continue  # a streamed denoiser loads (and quantizes) in host memory
        component = entry.components[name]
        transient = max(transient, component.layer_params * compute_bytes)
        if name in home:
            parked = max(parked, sizes[name])
    return max(parked, resident_after) + transient


def _host(
    entry: ModelEntry, profile: Profile, formats: dict[str, WeightsFormat], sizes: dict[str, float],
    compute: ComputeDtype,
) -> tuple[float, float, float]:
    """(host bytes while rendering, of which pinned, the most at any moment including loading)."""
    placement = profile.placement
    home = host_homed(entry, profile)
    den = entry.denoiser
    pinned = 0.0
    plain = 0.0
    for name in home:
        component = entry.components[name]
        if placement.streams and (name == den.name or placement is Placement.LEAF_OFFLOAD):
            if profile.pin_streamed:  # diffusers pins a copy of every streamed tensor
                pinned += sizes[name] * component.pinned_factor
            else:  # plain copy, a few blocks' pinned buffers
                plain += sizes[name]
                block = component.block_params * sizes[name] / component.params
                pinned += PINNED_BLOCKS_IN_CACHE * block * component.pinned_factor
        else:
            plain += sizes[name]
    steady = plain + pinned
    # Loading. `from_pretrained` reads safetensors through a private memory map: a tensor loaded in the dtype
    # its file stores stays file-backed (page cache, which the kernel evicts as it must) until something copies
    # it; one loaded in another dtype is converted into anonymous memory, all components at once before
    # placement moves them (tests/actors pin both). fp8 storage is cast on the host after loading (anonymous,
    # at fp8 size). GGUF files: counted as read into memory. bitsandbytes components go straight to the card,
    # except a streamed denoiser, which quantizes in host memory.
    loaded = 0.0
    for name, fmt in formats.items():
        component = entry.components[name]
        if fmt.is_bnb:
            if placement.streams and name == den.name:
                loaded += sizes[name]
            continue
        if fmt.is_gguf:
            loaded += sizes[name]
            continue
        as_loaded = WeightsFormat(compute.value) if fmt.is_fp8 else fmt  # VAE: its own dtype
        if entry.checkpoint_dtype != as_loaded.value:
            # converted into anonymous memory (fp8's cast then replaces it tensor by tensor: no more)
            loaded += component_bytes(component, as_loaded, compute)
        elif fmt.is_fp8:  # memory-mapped 16-bit weights, cast into anonymous fp8 copies
            loaded += sizes[name]
    parked_bnb = sum(sizes[n] for n, f in formats.items() if f.is_bnb and n in home and n != den.name)
    at_load = loaded + parked_bnb
    # Group and leaf offload pin every streamed tensor while its pageable copy still exists (all groups are
    # built before the first hook offloads one).
    at_pin = at_load + pinned if placement.streams and profile.pin_streamed else 0.0
    return steady, pinned, max(steady, at_load, at_pin)


def _activations(
    entry: ModelEntry, profile: Profile, width: int, height: int, batch: int, task: str = "txt2img"
) -> dict[Stage, float]:
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

    decode = vae_encode = 0.0
    pixels = width * height
    if entry.vae is not None:
        vae_dtype = profile.vae_dtype or profile.compute_dtype
        per_px = DECODE_KIB_PER_PX[vae_dtype] * 1024 * entry.vae.width / 128
        working = _vae_working(profile.vae, per_px, pixels, batch)
        # The decoded batch stays on the device (tiled decode also holds its tiles: ~3 images' worth).
        output = batch * pixels * 3 * _bytes(WeightsFormat(vae_dtype.value)) * 3
        decode = working + output
        if task != "txt2img":
            # The largest encoder pass: the whole batch unless the VAE slices or tiles (Flux's and SD3's inpaint
            # pipelines encode the masked batch at once; the worker's strength-0 round trip encodes its batch);
            # the pixel batch on the device in the compute dtype, one pass's copy in the VAE's dtype; the latents
            # it returns (the init image's, and the masked image's for inpainting).
            inputs = batch * pixels * 3 * compute_bytes + pixels * 3 * _bytes(WeightsFormat(vae_dtype.value))
            latents = (2 if task == "inpaint" else 1) * batch * _latent_bytes(entry, width, height, compute_bytes)
            vae_encode = _vae_working(profile.vae, per_px * ENCODE_DECODE_RATIO, pixels, batch) + inputs + latents
    if task == "inpaint":
        denoise += _inpaint_latents(entry, width, height, batch, compute_bytes)
    stages = {Stage.LOAD: 0.0, Stage.TEXT_ENCODE: encode, Stage.DENOISE: denoise, Stage.DECODE: decode}
    if task != "txt2img":
        stages[Stage.VAE_ENCODE] = vae_encode
    return stages


def _vae_working(mode: VaeMode, per_px: float, pixels: int, batch: int) -> float:
    """A VAE pass's working set over its input or output pixels: one tile when tiled, one image when sliced, else
    the whole batch (the first image's figure holds fixed workspace; each further one adds about half of it)."""
    if mode is VaeMode.TILED:
        return per_px * min(pixels, VAE_TILE_PX**2)
    if mode is VaeMode.SLICED:
        return per_px * pixels
    return per_px * pixels * (1 + DECODE_BATCH_SLOPE * (batch - 1))


def _latent_bytes(entry: ModelEntry, width: int, height: int, compute_bytes: float) -> float:
    """One image's latents (all the VAE's channels), in the compute dtype."""
    family = entry.family
    return family.latent_channels * (width // family.vae_scale_factor) * (height // family.vae_scale_factor) * (
        compute_bytes)


def _inpaint_latents(entry: ModelEntry, width: int, height: int, batch: int, compute_bytes: float) -> float:
    """What inpainting holds through the denoise beyond text-to-image, in latents of one image: per CFG pass the
    mask (one channel, but Flux packs it as one per latent channel: counted as a latent) and the masked image's
    latents; and the more of what either kind of denoiser needs: an ordinary one's init latents, noise and the
    blend's temporaries (~5), or an inpainting one's concatenated input (2 x channels + 1, per pass). Small beside
    the activations; counted all the same."""
    cfg = 2 if entry.family.uses_cfg else 1
    one = _latent_bytes(entry, width, height, compute_bytes)
    return batch * (cfg * 2 * one + max(5 * one, cfg * 3 * one))


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
    if not device.is_cuda:
        return compute
    if profile.placement is Placement.DISK_OFFLOAD:
        # No CUDA streams: every step reads each block from disk and copies it on, one after the other, then
        # computes (the page cache cannot hold the denoiser on the machines this rung is for).
        return compute + den_bytes / (device.disk_gbps * 1e9) + den_bytes / (
            device.pcie_gbps * 1e9 * PAGEABLE_EFFICIENCY)
    efficiency = STREAM_EFFICIENCY.get(profile.placement)
    if efficiency:
        # The whole denoiser crosses PCIe every step; CUDA streams overlap that with compute.
        streaming = den_bytes / (device.pcie_gbps * 1e9 * efficiency)
        if not profile.pin_streamed:
            streaming = max(streaming, den_bytes / (HOST_PIN_GBPS * 1e9))
        return max(compute, streaming)
    return compute


def _seconds_per_job_overhead(entry: ModelEntry, profile: Profile, device: Device, sizes: dict[str, float]) -> float:
    """Seconds each pipeline call spends moving components between host and card (pageable copies): model
    offload brings every component on and takes it off again; cache-and-offload brings the encoders on for
    a prompt it has not cached (counted: a studio batch rarely repeats a prompt)."""
    if not device.is_cuda:
        return 0.0
    rate = device.pcie_gbps * 1e9 * PAGEABLE_EFFICIENCY
    if profile.placement is Placement.MODEL_OFFLOAD:
        moved = sum(sizes.values())
    elif profile.placement is Placement.LEAF_OFFLOAD:
        moved = 0.0  # the encoders stream like the denoiser
    elif profile.text_encoders is TextEncoderPolicy.CACHE_AND_OFFLOAD:
        moved = sum(sizes[t.name] for t in entry.text_encoders)
    else:
        moved = 0.0
    return 2 * moved / rate  # on, then off again


def _vae_encode_seconds(
    entry: ModelEntry, profile: Profile, device: Device, width: int, height: int, batch: int, task: str
) -> float:
    """Seconds the VAE encodes of an image task take for the batch: the init images, and the masked images too
    for inpainting, each pass its convolutions' FLOPs at VAE_MFU of the device's rate plus a launch overhead."""
    if task == "txt2img" or entry.vae is None:
        return 0.0
    vae_dtype = profile.vae_dtype or profile.compute_dtype
    flops = ENCODER_FLOPS_PER_PX * (entry.vae.width / 128) ** 2 * width * height
    rate = device.fp16_tflops * 1e12 * VAE_MFU
    if device.is_cuda and vae_dtype is ComputeDtype.FP32:
        rate /= VAE_FP32_SLOWDOWN
    passes = 2 if task == "inpaint" else 1
    return passes * batch * (flops / rate + LAUNCH_OVERHEAD_S)


def predict(
    entry: ModelEntry, profile: Profile, device: Device, width: int, height: int, batch: int = 1,
    task: str = "txt2img",
) -> Prediction:
    """Peak memory and a rough seconds per step for `batch` images of `width` x `height`, rendered as `task`
    ("txt2img", "img2img" or "inpaint": the image tasks add the VAE-encode stage)."""
    if width <= 0 or height <= 0 or batch < 1:
        raise ValueError(f"predict needs a positive size and batch, got {width}x{height} x{batch}")
    stages = task_stages(task)
    # A dropped text encoder is neither loaded nor moved, but the transformer still attends over its tokens (SD3:
    # zeros in their place), so the family's text_tokens stand.
    entry = as_loaded(entry, profile)
    formats = component_formats(entry, profile)
    sizes = {
        name: component_bytes(entry.components[name], fmt, profile.compute_dtype) for name, fmt in formats.items()
    }
    weights, in_flight = _stage_weights(entry, profile, sizes, task)
    activations = _activations(entry, profile, width, height, batch, task)
    if device.is_cuda:
        resident_after = min(weights[s] for s in (Stage.TEXT_ENCODE, Stage.DENOISE, Stage.DECODE))
        if profile.placement is Placement.MODEL_OFFLOAD:  # accelerate's hooks start with everything in host
            resident_after = 0.0
        weights[Stage.LOAD] = _load_weights(entry, profile, formats, sizes, resident_after)
        host, pinned, host_peak = _host(entry, profile, formats, sizes, profile.compute_dtype)
    else:  # a CPU computes where its weights live: they are all counted in the peak already
        weights[Stage.LOAD] = max(weights.values())
        host = pinned = host_peak = 0.0
    reserve = CONTEXT_GIB + ALLOCATOR_SLACK_GIB
    stage_peaks = {stage: reserve + (weights[stage] + activations[stage]) / GIB for stage in stages}
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
        host_gib=host / GIB,
        pinned_gib=pinned / GIB,
        host_peak_gib=host_peak / GIB,
        seconds_per_job_overhead=_seconds_per_job_overhead(entry, profile, device, sizes),
        task=task,
        vae_encode_s=_vae_encode_seconds(entry, profile, device, width, height, batch, task),
    )
