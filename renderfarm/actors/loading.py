"""Build a diffusers pipeline for a catalog model under a profile: find its weights, load each component in
the profile's format, and place the components (resident, model/group/leaf offload), VAE mode and dtype,
text-encoder policy.

`load_pipeline(entry, profile=...)` builds a pipeline the way a profile says (weights format, compute dtype,
placement, VAE mode and dtype, text-encoder policy; see planning/profiles.py), through the libraries' own
paths (format helpers in actors/quantize.py). Without a profile it loads everything at one dtype (float32
unless asked), as before. What was built is attached as `pipe.renderfarm_info` (`PipelineInfo`).

On a CPU device every placement is resident: there is no second memory to offload to. Group and leaf
offload still install diffusers' group-offloading hooks there (onload = offload = cpu, no CUDA streams) so
the hook code runs as it does on a GPU node; model offload installs nothing on CPU (accelerate's hooks need
an accelerator); `PipelineInfo.notes` says what was degraded.

Imported only inside worker processes: it imports torch and diffusers at module level.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch

from renderfarm.actors import quantize
from renderfarm.actors.embeddings import EmbeddingCache
from renderfarm.actors.families import Family, family_for, get_module_execution_device
from renderfarm.actors.gguf_standins import ensure_standin_gguf
from renderfarm.actors.quantize import torch_dtype
from renderfarm.actors.standins import ensure_standin
from renderfarm.errors import ModelSourceError, UnsupportedFamily
from renderfarm.planning.catalog import ModelEntry
from renderfarm.planning.profiles import (
    Placement,
    Profile,
    TextEncoderPolicy,
    VaeMode,
    WeightsFormat,
)
from renderfarm.planning.vram import VAE_TILE_PX

log = logging.getLogger(__name__)


def resolve_source(entry: ModelEntry, cache_dir: Path | None = None) -> str:
    """Where `entry` loads from: its stand-in folder (built on first use) or its catalog source."""
    if entry.standin:
        return str(ensure_standin(entry, cache_dir))
    if not entry.source:
        raise ModelSourceError(f"model {entry.name!r} has no source in the catalog")
    return entry.source


def why_unloadable(entry: ModelEntry, cache_dir: Path | None = None) -> str | None:
    """Why this node cannot load `entry`, None when it can as far as a look tells: no worker renders its
    family, or its weights are not here (a local folder missing, a hub id absent from the local cache while the
    hub is offline). Cheap: builds no stand-in, downloads nothing, loads nothing."""
    if entry.family.planning_only:
        return f"family not supported: {entry.family.name} is listed for planning only"
    try:
        family_for(entry)
    except UnsupportedFamily as exc:
        return f"family not supported: {exc}"
    if getattr(diffusers, entry.family.pipeline, None) is None:
        return f"family not supported: diffusers {diffusers.__version__} has no {entry.family.pipeline}"
    if entry.standin:
        return None
    if not entry.source:
        return f"weights not found on this node: model {entry.name!r} has no source in the catalog"
    if _is_local(entry.source):
        try:
            _checked_source(entry, cache_dir)
        except ModelSourceError as exc:
            return f"weights not found on this node: {exc}"
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(entry.source, "model_index.json"), str):
        return (f"weights not found on this node: {entry.source!r} is not in its Hugging Face cache and the hub "
                "is offline (HF_HUB_OFFLINE)")
    return None


def _dtype_kwarg() -> str:
    # Recent diffusers renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns); older
    # releases silently ignore `dtype` and would load in float32, so ask the release which it reads.
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


_DTYPE_KWARG = _dtype_kwarg()


def _is_local(source: str) -> bool:
    # A Hugging Face id is "org/name"; anything absolute, relative-looking or existing is a path.
    return os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source)


@dataclass
class PipelineInfo:
    """What `load_pipeline` built, attached to the pipeline as `pipe.renderfarm_info`."""

    model: str
    profile: Profile | None
    device: torch.device
    # What was applied: "resident", "model-offload", "group-offload (block_level, 2 blocks/group, streams)", ...
    placement: str
    weights_bytes: int = 0  # parameter and buffer bytes of every component, wherever they sit
    notes: list[str] = field(default_factory=list)  # what was degraded or bypassed, and why
    # Text encoders wait in host memory and come to the GPU for each encode (cache-and-offload on a GPU)
    text_encoders_offloaded: bool = False
    embedding_cache: EmbeddingCache | None = None  # set by the PipelineCache that holds the pipeline
    move_s: float = 0.0  # seconds spent placing the components on the device at load
    offload_dir: Path | None = None  # disk offload: where the denoiser's block files are (removed on eviction)
    encoder_moves_s: float = 0.0  # running total of cache-and-offload moves (encoders on and off per encode)

    @property
    def key(self) -> tuple[str, str | None]:
        return pipeline_key(self.model, self.profile)


def pipeline_key(model: str, profile: Profile | None) -> tuple[str, str | None]:
    """The identity of a loaded pipeline: the model and its profile's name without the VAE mode (a VAE mode
    is a switch on a loaded pipeline, see `set_vae_mode`, not a reason to load another one)."""
    return (model, profile.base_name if profile is not None else None)


def pipeline_info(pipe: Any) -> PipelineInfo | None:
    return getattr(pipe, "renderfarm_info", None)


def load_pipeline(
    entry: ModelEntry,
    cache_dir: Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    profile: Profile | None = None,
    gguf_file: str | Path | None = None,
) -> diffusers.DiffusionPipeline:
    """Load `entry` with the diffusers class its family names, on `device`.

    Without a profile, every component loads at `dtype`, default float32: models load at the highest
    precision unless the caller (a profile) asks for another, so every precision choice is visible at the
    call site. With a profile, the profile decides (and `dtype`, if given, must be its compute dtype).
    `gguf_file` overrides where a GGUF profile's denoiser file comes from (default: the catalog's
    `gguf_sources`, or a file written from the stand-in).
    """
    pipeline_cls = getattr(diffusers, entry.family.pipeline, None)
    if pipeline_cls is None:
        raise UnsupportedFamily(
            f"model {entry.name!r}: diffusers {diffusers.__version__} has no pipeline class "
            f"{entry.family.pipeline!r}"
        )
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # so device comparisons hold
    source = _checked_source(entry, cache_dir)
    if profile is None:
        if gguf_file is not None:
            raise ValueError("gguf_file needs a profile with a GGUF weights format")
        pipe = _from_pretrained(pipeline_cls, entry, source, torch.float32 if dtype is None else dtype)
        moving = time.perf_counter()
        pipe.to(device)
        info = PipelineInfo(model=entry.name, profile=None, device=device, placement="resident",
                            move_s=time.perf_counter() - moving)
    else:
        offload_dir = disk_offload_dir(entry, profile, cache_dir) if profile.placement is Placement.DISK_OFFLOAD \
            else None
        pipe, info = _load_with_profile(pipeline_cls, entry, source, device, dtype, profile, gguf_file, offload_dir)
    info.weights_bytes = pipeline_bytes(pipe)
    pipe.renderfarm_info = info
    # Workers log their own progress; tqdm bars in worker logs are noise.
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _checked_source(entry: ModelEntry, cache_dir: Path | None) -> str:
    source = resolve_source(entry, cache_dir)
    if not _is_local(source):
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model {entry.name!r}: local source {str(path)!r} does not exist")
    if path.is_file():
        raise ModelSourceError(
            f"model {entry.name!r}: {str(path)!r} is a single file; load_pipeline reads a diffusers "
            "folder (model_index.json) or a Hugging Face id"
        )
    if not (path / "model_index.json").is_file():
        raise ModelSourceError(
            f"model {entry.name!r}: {str(path)!r} is not a diffusers pipeline folder (no model_index.json)"
        )
    return str(path)


@dataclass(frozen=True)
class LoadTargets:
    """Where a profile's quantized components load, and which are parked in host memory right after."""

    denoiser_in_host: bool  # loads (and bitsandbytes quantizes) in host memory: it streams from there
    encoder_in_host: bool
    park_denoiser: bool  # loads on the card, then moves to host memory before the next component loads
    park_encoder: bool


def load_targets(profile: Profile, on_card: bool) -> LoadTargets:
    """The loading plan of `profile` on a card (`on_card`) or a CPU (everything in host memory already).
    planning/vram.py's load stage and host model mirror it (`host_homed`); tests hold the two together."""
    placement = profile.placement
    return LoadTargets(
        denoiser_in_host=on_card and placement.streams,
        encoder_in_host=on_card and placement is Placement.LEAF_OFFLOAD,
        park_denoiser=on_card and placement is Placement.MODEL_OFFLOAD,
        park_encoder=on_card and placement is not Placement.LEAF_OFFLOAD and (
            placement is Placement.MODEL_OFFLOAD or profile.text_encoders is TextEncoderPolicy.CACHE_AND_OFFLOAD
        ),
    )


def disk_offload_dir(entry: ModelEntry, profile: Profile, cache_dir: Path | None = None) -> Path:
    """Where disk offload writes a pipeline's denoiser blocks: under the worker's cache folder, one folder per
    model and profile, emptied before each load (diffusers reuses any block file it finds there, whoever
    wrote it)."""
    import shutil

    from renderfarm.actors.standins import default_cache_dir

    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / "offload" / f"{entry.name}-{profile.base_name}".replace("/", "_")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _park(module: torch.nn.Module, host: torch.device) -> None:
    """Move a just-loaded quantized component to host memory before the next one loads, and give its device
    memory back."""
    module.to(host)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _from_pretrained(pipeline_cls: type, entry: ModelEntry, source: str, dtype: torch.dtype, **components):
    try:
        return pipeline_cls.from_pretrained(source, **components, **{_DTYPE_KWARG: dtype})
    except OSError as exc:
        # Offline, a hub id that is not in the local cache ends here.
        raise ModelSourceError(f"cannot load model {entry.name!r} from {source!r}: {exc}") from exc


def _load_with_profile(
    pipeline_cls: type,
    entry: ModelEntry,
    source: str,
    device: torch.device,
    dtype: torch.dtype | None,
    profile: Profile,
    gguf_file: str | Path | None,
    offload_dir: Path | None = None,
) -> tuple[diffusers.DiffusionPipeline, PipelineInfo]:
    family = family_for(entry)
    compute = torch_dtype(profile.compute_dtype)
    if dtype is not None and dtype != compute:
        raise ValueError(f"dtype={dtype} contradicts profile {profile.name!r}, which computes in {compute}")
    if profile.fp16_clamp and not family.fp16_clamp:
        raise ValueError(
            f"profile {profile.name!r}: fp16_clamp guards Flux activations; {entry.name} is {family.name}"
        )
    weights = profile.weights
    if gguf_file is not None and not weights.is_gguf:
        raise ValueError(f"gguf_file given, but profile {profile.name!r} stores weights as {weights.value}")
    text_weights = text_encoder_weights(profile)
    large_encoder = family.large_text_encoder
    if profile.drop_large_text_encoder and not family.large_text_encoder_optional:
        raise ValueError(f"profile {profile.name!r} drops {large_encoder or 'a text encoder'}, which a "
                         f"{family.name} pipeline cannot render without")
    denoiser_name = family.denoiser
    denoiser_cls = getattr(diffusers, family.denoiser_class)
    notes: list[str] = []
    # bitsandbytes quantizes while loading, on the device it loads onto. Quantized weights load straight onto
    # the device, except what group/leaf offload streams from host memory: that loads into host memory, so
    # the GPU never holds the whole model (bitsandbytes then quantizes on the CPU). A quantized component
    # whose home is host memory (everything under model offload; T5 under cache-and-offload) is parked there
    # as soon as it has loaded, so two quantized models are never on the card at once: the load peak is the
    # largest component (planning/vram.py's load stage).
    host = torch.device("cpu")
    targets = load_targets(profile, on_card=device.type != "cpu")
    denoiser_device = host if targets.denoiser_in_host else device
    encoder_device = host if targets.encoder_in_host else device
    park_denoiser, park_encoder = targets.park_denoiser, targets.park_encoder

    components: dict[str, Any] = {}
    if profile.drop_large_text_encoder:
        # The pipeline's own way to go without it (SD3: `text_encoder_3=None`): never loaded, zeros in its place.
        components[large_encoder] = None
    try:
        if large_encoder and not profile.drop_large_text_encoder and text_weights is not None and text_weights.is_bnb:
            from transformers import T5EncoderModel

            components[large_encoder] = quantize.load_bnb_text_encoder(
                T5EncoderModel, source, large_encoder, text_weights, compute, encoder_device
            )
            if park_encoder:
                _park(components[large_encoder], host)
        if weights.is_bnb:
            components[denoiser_name] = quantize.load_bnb_denoiser(
                denoiser_cls, source, denoiser_name, weights, compute, denoiser_device,
                dtype_kwarg=_DTYPE_KWARG,
            )
            if park_denoiser:
                _park(components[denoiser_name], host)
            if device.type == "cpu" and not torch.cuda.is_available():
                notes.append("bitsandbytes on CPU: diffusers' 'No GPU found' check bypassed at load "
                             "(quantize.bnb_without_gpu_check)")
        elif weights.is_gguf:
            if gguf_file is not None:
                path = str(gguf_file)
            elif entry.standin:
                path = str(ensure_standin_gguf(entry, weights, Path(source)))
            else:
                path = quantize.gguf_source(entry, weights)
            components[denoiser_name] = quantize.load_gguf_denoiser(
                denoiser_cls, path, source, denoiser_name, compute, denoiser_device, family.name, weights
            )
        vae_dtype = torch_dtype(profile.vae_dtype or profile.compute_dtype)
        fp16_vae = getattr(entry, "fp16_vae_source", None)
        if vae_dtype == torch.float16 and fp16_vae:
            # A VAE fine-tuned to stay finite in fp16 (SDXL: madebyollin/sdxl-vae-fp16-fix); without one the
            # family's VAE decodes in fp32 where its config says it must (`force_upcast`, see
            # families.SDXL.decode).
            components["vae"] = diffusers.AutoencoderKL.from_pretrained(fp16_vae, **{_DTYPE_KWARG: vae_dtype})
        elif vae_dtype != compute:
            # Loaded at its own dtype, not cast from the compute dtype (an fp32 VAE from bf16 weights would
            # keep bf16's rounding).
            components["vae"] = diffusers.AutoencoderKL.from_pretrained(
                source, subfolder="vae", **{_DTYPE_KWARG: vae_dtype}
            )
    except OSError as exc:
        raise ModelSourceError(f"cannot load model {entry.name!r} as {weights.value}: {exc}") from exc
    pipe = _from_pretrained(pipeline_cls, entry, source, compute, **components)

    if weights.is_fp8:
        quantize.enable_fp8_storage(getattr(pipe, denoiser_name), weights, compute)
    if large_encoder and not profile.drop_large_text_encoder and text_weights is not None and text_weights.is_fp8:
        quantize.enable_fp8_storage(getattr(pipe, large_encoder), text_weights, compute)
    if profile.fp16_clamp:
        quantize.add_fp16_clamp(getattr(pipe, denoiser_name))
    set_vae_mode(pipe, profile.vae)
    moving = time.perf_counter()
    placement, offload_encoders = _apply_placement(pipe, family, profile, device, notes, offload_dir)
    info = PipelineInfo(
        model=entry.name, profile=profile, device=device, placement=placement, notes=notes,
        text_encoders_offloaded=offload_encoders, move_s=time.perf_counter() - moving, offload_dir=offload_dir,
    )
    for note in notes:
        log.info("%s [%s]: %s", entry.name, profile.name, note)
    return pipe, info


def text_encoder_weights(profile: Profile) -> WeightsFormat | None:
    """The weights format of the family's large text encoder (T5) under `profile`; None: the compute dtype.

    `Profile.text_encoder_weights` when set; otherwise the denoiser's format where it applies to a text
    encoder (fp8, bitsandbytes), and the compute dtype under GGUF (GGUF here is for denoisers only). The
    planner's mirror of this rule is `planning.profiles.text_encoder_format`.
    """
    chosen = profile.text_encoder_weights
    if chosen is not None and chosen.is_gguf:
        raise ValueError(f"profile {profile.name!r}: GGUF text encoders are not supported ({chosen.value})")
    if chosen is None and (profile.weights.is_fp8 or profile.weights.is_bnb):
        chosen = profile.weights
    if chosen is not None and chosen.is_float:
        return None  # plain floats are stored in the compute dtype, like everything else
    return chosen


def cap_tiles(vae: Any) -> None:
    """Tiles of at most VAE_TILE_PX pixels a side, as the plan counts them (planning/vram.py). diffusers'
    AutoencoderKL tiles at its config's `sample_size` and decodes whole a latent no larger than that: 1024 px for
    the SDXL, Flux and SD3 VAEs, so "tiled" would decode a 1024x1024 image in one piece (tests/actors/
    test_profiles_render.py pins both). A VAE whose tiles are smaller already (SD 1.5's, the stand-ins') keeps them."""
    size, latent = getattr(vae, "tile_sample_min_size", None), getattr(vae, "tile_latent_min_size", None)
    if isinstance(size, int) and isinstance(latent, int) and latent > 0 and size > VAE_TILE_PX:
        scale = size // latent  # pixels per latent cell (8)
        vae.tile_sample_min_size, vae.tile_latent_min_size = VAE_TILE_PX, VAE_TILE_PX // scale


def set_vae_mode(pipe: Any, mode: VaeMode) -> None:
    """Decode full, sliced (one image of the batch at a time) or tiled (and sliced: the most frugal).

    A switch on the loaded VAE, so the first retry after an out-of-memory error in decode costs no reload.
    """
    vae = pipe.vae
    if mode is VaeMode.TILED:
        vae.enable_tiling()
        cap_tiles(vae)
        vae.enable_slicing()
    elif mode is VaeMode.SLICED:
        vae.disable_tiling()
        vae.enable_slicing()
    else:
        vae.disable_tiling()
        vae.disable_slicing()


def _apply_placement(
    pipe: Any, family: Family, profile: Profile, device: torch.device, notes: list[str],
    offload_dir: Path | None = None,
) -> tuple[str, bool]:
    """Place the components as `profile.placement` says. Returns (what was applied, whether the text
    encoders wait off the GPU and must be moved on for each encode)."""
    placement = profile.placement
    denoiser_name = family.denoiser
    denoiser = getattr(pipe, denoiser_name)
    encoders = [name for name in family.text_encoders if getattr(pipe, name, None) is not None]
    offload_encoders = profile.text_encoders is TextEncoderPolicy.CACHE_AND_OFFLOAD

    if device.type == "cpu":
        # Everything is already in host memory, where it computes: there is nothing to offload to.
        if placement is Placement.MODEL_OFFLOAD:
            notes.append("cpu: model offload needs an accelerator; every component stays resident")
            return "resident", False
        if placement.streams or placement is Placement.DISK_OFFLOAD:
            applied = _group_offload(pipe, denoiser, encoders, profile, device, use_stream=False,
                                     offload_dir=offload_dir)
            notes.append("cpu: group-offload hooks run without CUDA streams; weights stay in host memory"
                         if offload_dir is None else "cpu: disk offload reads the blocks back into host memory")
            return applied, False
        return "resident", False

    if placement is Placement.MODEL_OFFLOAD:
        # Accelerate's hooks keep one component on the device at a time: the text encoders leave it as soon
        # as the denoiser runs, which is the cache-and-offload policy by construction.
        pipe.enable_model_cpu_offload(device=device)
        return "model-offload", False

    streamed = {denoiser_name} if placement is not Placement.GPU else set()  # (disk offload: read from files)
    if placement is Placement.LEAF_OFFLOAD:
        streamed.update(encoders)  # the floor: no component sits whole on the GPU
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module) or name in streamed:
            continue
        if name in encoders and offload_encoders:
            _move(component, torch.device("cpu"))
        else:
            _move(component, device)
    applied = "resident"
    if placement.streams:
        applied = _group_offload(pipe, denoiser, encoders, profile, device, use_stream=True)
    elif placement is Placement.DISK_OFFLOAD:
        # No CUDA streams: with them diffusers pins each block as it reads it, and torch's host cache keeps
        # ~3 blocks' pinned buffers (~3 GiB for Flux), which is what the machines this rung is for lack.
        applied = _group_offload(pipe, denoiser, encoders, profile, device, use_stream=False,
                                 offload_dir=offload_dir)
    return applied, offload_encoders and placement is not Placement.LEAF_OFFLOAD


def _move(module: torch.nn.Module, device: torch.device) -> None:
    if get_module_execution_device(module) != device:
        module.to(device)


@contextlib.contextmanager
def text_encoders_on(
    pipe: Any, family: Family, info: PipelineInfo | None, device: torch.device
) -> Iterator[None]:
    """Cache-and-offload: the text encoders wait in host memory and come to the device for one encode."""
    if info is None or not info.text_encoders_offloaded:
        yield
        return
    encoders = [getattr(pipe, n) for n in family.text_encoders if getattr(pipe, n, None) is not None]
    try:
        moving = time.perf_counter()
        for encoder in encoders:
            _move(encoder, device)
        info.encoder_moves_s += time.perf_counter() - moving
        yield
    finally:
        moving = time.perf_counter()
        for encoder in encoders:
            _move(encoder, torch.device("cpu"))
        info.encoder_moves_s += time.perf_counter() - moving


def _group_offload(
    pipe: Any,
    denoiser: torch.nn.Module,
    encoders: list[str],
    profile: Profile,
    device: torch.device,
    use_stream: bool,
    offload_dir: Path | None = None,
) -> str:
    """Install diffusers' group-offloading hooks. Block level runs ONE block per group: with CUDA streams
    diffusers resets any other `num_blocks_per_group` to 1 (hooks/group_offloading.py; tests/actors pin it),
    so asking for more would only describe something that never runs."""
    from diffusers.hooks import apply_group_offloading

    placement = profile.placement
    offload = torch.device("cpu")
    streams = "streams" if use_stream else "no streams"
    # Pinned copies of everything (diffusers' default) or blocks pinned as they go (`low_cpu_mem_usage`).
    lean = {"low_cpu_mem_usage": True} if use_stream and not profile.pin_streamed else {}
    if use_stream:
        streams += ", pinned copies" if profile.pin_streamed else ", pinned per step"
    streamed = [denoiser]
    if placement is Placement.LEAF_OFFLOAD:
        streamed += [getattr(pipe, name) for name in encoders]
    for module in streamed:
        _move(module, offload)  # group offloading starts from the offload device
    if placement is Placement.DISK_OFFLOAD:
        if offload_dir is None:
            raise ValueError(f"profile {profile.name!r}: disk offload needs a folder to write its blocks to")
        denoiser.enable_group_offload(
            onload_device=device, offload_device=offload, offload_type="block_level",
            num_blocks_per_group=1, use_stream=False, offload_to_disk_path=str(offload_dir),
        )
        applied = f"disk-offload (block_level, 1 block/group read from {offload_dir}, no streams)"
    elif placement is Placement.GROUP_OFFLOAD:
        denoiser.enable_group_offload(
            onload_device=device, offload_device=offload, offload_type="block_level",
            num_blocks_per_group=1, use_stream=use_stream, **lean,
        )
        applied = f"group-offload (block_level, 1 block/group, {streams}; 2 blocks in flight)"
    else:
        denoiser.enable_group_offload(
            onload_device=device, offload_device=offload, offload_type="leaf_level", use_stream=use_stream, **lean
        )
        for module in streamed[1:]:
            apply_group_offloading(
                module, onload_device=device, offload_device=offload, offload_type="leaf_level",
                use_stream=use_stream, **lean,
            )
        applied = f"leaf-offload (leaf_level, denoiser and text encoders, {streams})"
    for module in streamed:
        _bnb_scales_to(module, device)
    return applied


def _bnb_scales_to(module: torch.nn.Module, device: torch.device) -> None:
    """Group offloading moves each parameter's `.data` only; a bitsandbytes 4-bit weight also carries its
    quantization state (absmax scales, code book: ~3% of the 4-bit bytes), which must sit where the layer
    computes. The scales stay resident on the onload device; the packed weights stream."""
    for parameter in module.parameters():
        quant_state = getattr(parameter, "quant_state", None)
        if quant_state is not None and hasattr(quant_state, "to"):
            quant_state.to(device)


def module_bytes(module: torch.nn.Module, on: str | None = None) -> int:
    """Bytes of `module`'s parameters and buffers as stored (fp8 1 byte, GGUF blocks, bitsandbytes 4-bit
    data plus its absmax scales), each tensor counted once; with `on` (a device type), only those there."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "meta" or (on is not None and tensor.device.type != on):
            continue
        ident = (str(tensor.device), tensor.data_ptr())
        if ident in seen:
            continue
        seen.add(ident)
        total += tensor.numel() * tensor.element_size()
        quant_state = getattr(tensor, "quant_state", None)  # bitsandbytes Params4bit
        absmax = getattr(quant_state, "absmax", None)
        if isinstance(absmax, torch.Tensor):
            total += absmax.numel() * absmax.element_size()
    return total


def pipeline_bytes(pipe: Any, on: str | torch.device | None = None) -> int:
    """Weight bytes of every torch module of a pipeline (0 for anything that is not a pipeline); with `on`,
    only those on that device now (offloaded weights wait on the CPU: a render moves them in, and its peak
    growth counts them)."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        return 0
    device_type = torch.device(on).type if on is not None else None
    return sum(module_bytes(c, device_type) for c in components.values() if isinstance(c, torch.nn.Module))

