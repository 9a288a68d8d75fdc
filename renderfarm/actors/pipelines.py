"""Load diffusers pipelines for catalog models, keep a few loaded, and render batches of jobs.

Imported only inside worker processes: it imports torch and diffusers at module level.

Loading: `load_pipeline(entry, profile=...)` builds a pipeline the way a profile says (weights format,
compute dtype, placement, VAE mode and dtype, text-encoder policy; see planning/profiles.py), through the
libraries' own paths (format helpers in actors/quantize.py). Without a profile it loads everything at one
dtype (float32 unless asked), as before.

On a CPU device every placement is resident: there is no second memory to offload to. Group and leaf
offload still install diffusers' group-offloading hooks there (onload = offload = cpu, no CUDA streams) so
the hook code runs as it does on a GPU node; model offload installs nothing on CPU (accelerate's hooks need
an accelerator); `PipelineInfo.notes` says what was degraded.

A batch is rendered in ONE pipeline call, with its stages measured separately: text encoding (we call
the pipeline's `encode_prompt` ourselves and pass the embeddings in; an `EmbeddingCache` keeps each
prompt's embeddings, so a prompt is encoded once per model and profile), denoising (`output_type="latent"`,
per-step times from `callback_on_step_end`), and VAE decoding (done here, per family, as the pipelines
do it). Image i of a job is drawn from its own generator seeded with `seed + i` (the AUTOMATIC1111
convention), so a job renders the same image alone or inside any batch.

Out-of-memory errors propagate to the caller, recognisable with `is_out_of_memory`; a failed render leaves
the pipeline as it was (VAE dtype, text-encoder placement, offload hooks), so the caller may retry with a
cheaper VAE mode (`set_vae_mode`) or another profile.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from PIL.PngImagePlugin import PngInfo

from renderfarm.actors import quantize
from renderfarm.actors.quantize import DENOISERS, torch_dtype
from renderfarm.actors.standins import ensure_standin
from renderfarm.planning.catalog import ModelEntry
from renderfarm.planning.profiles import (
    Placement,
    Profile,
    TextEncoderPolicy,
    VaeMode,
    WeightsFormat,
)

try:
    from diffusers.utils.torch_utils import get_module_execution_device
except ImportError:  # older diffusers: no offload-aware lookup, the weights' device is the answer

    def get_module_execution_device(module: torch.nn.Module) -> torch.device:
        return next(module.parameters()).device


log = logging.getLogger(__name__)

DEFAULT_MAX_PIPELINES = 2

# The text encoders of each family, and the one whose weights format a profile sets (T5: 4.8B parameters
# in FLUX.1; the CLIP encoders are small and always run in the compute dtype).
TEXT_ENCODERS = {"sd15": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2"),
                 "flux": ("text_encoder", "text_encoder_2")}
LARGE_TEXT_ENCODER = {"flux": "text_encoder_2"}


class ModelSourceError(OSError):
    """A model's weights could not be found or read at its source."""


# --- loading ---------------------------------------------------------------------------------------


def resolve_source(entry: ModelEntry, cache_dir: Path | None = None) -> str:
    """Where `entry` loads from: its stand-in folder (built on first use) or its catalog source."""
    if entry.standin:
        return str(ensure_standin(entry, cache_dir))
    if not entry.source:
        raise ModelSourceError(f"model {entry.name!r} has no source in the catalog")
    return entry.source


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

    @property
    def key(self) -> tuple[str, str | None]:
        return pipeline_key(self.model, self.profile)


def pipeline_key(model: str, profile: Profile | None) -> tuple[str, str | None]:
    """The identity of a loaded pipeline: the model and its profile's name without the VAE mode (a VAE mode
    is a switch on a loaded pipeline, see `set_vae_mode`, not a reason to load another one)."""
    return (model, profile.with_vae(VaeMode.FULL).name if profile is not None else None)


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
        raise ValueError(
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
        pipe.to(device)
        info = PipelineInfo(model=entry.name, profile=None, device=device, placement="resident")
    else:
        pipe, info = _load_with_profile(pipeline_cls, entry, source, device, dtype, profile, gguf_file)
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
) -> tuple[diffusers.DiffusionPipeline, PipelineInfo]:
    family = entry.family.name
    if family not in DENOISERS:
        raise ValueError(f"load_pipeline does not know the components of family {family!r} ({entry.name})")
    compute = torch_dtype(profile.compute_dtype)
    if dtype is not None and dtype != compute:
        raise ValueError(f"dtype={dtype} contradicts profile {profile.name!r}, which computes in {compute}")
    if profile.fp16_clamp and family != "flux":
        raise ValueError(
            f"profile {profile.name!r}: fp16_clamp guards Flux activations; {entry.name} is {family}"
        )
    weights = profile.weights
    if gguf_file is not None and not weights.is_gguf:
        raise ValueError(f"gguf_file given, but profile {profile.name!r} stores weights as {weights.value}")
    text_weights = text_encoder_weights(profile)
    large_encoder = LARGE_TEXT_ENCODER.get(family)
    denoiser_name = DENOISERS[family]
    denoiser_cls = getattr(diffusers, quantize.denoiser_class(family))
    notes: list[str] = []
    # Quantized weights load straight onto the device, except what group/leaf offload streams: that loads
    # into host memory, so the GPU never holds the whole model (bitsandbytes then quantizes on the CPU).
    host = torch.device("cpu")
    streamed = device.type != "cpu" and profile.placement in (Placement.GROUP_OFFLOAD, Placement.LEAF_OFFLOAD)
    denoiser_device = host if streamed else device
    encoder_device = host if device.type != "cpu" and profile.placement is Placement.LEAF_OFFLOAD else device

    components: dict[str, Any] = {}
    try:
        if weights.is_bnb:
            components[denoiser_name] = quantize.load_bnb_denoiser(
                denoiser_cls, source, denoiser_name, weights, compute, denoiser_device,
                dtype_kwarg=_DTYPE_KWARG,
            )
            if device.type == "cpu" and not torch.cuda.is_available():
                notes.append("bitsandbytes on CPU: diffusers' 'No GPU found' check bypassed at load "
                             "(quantize.bnb_without_gpu_check)")
        elif weights.is_gguf:
            if gguf_file is not None:
                path = str(gguf_file)
            elif entry.standin:
                path = str(quantize.ensure_standin_gguf(entry, weights, Path(source)))
            else:
                path = quantize.gguf_source(entry, weights)
            components[denoiser_name] = quantize.load_gguf_denoiser(
                denoiser_cls, path, source, denoiser_name, compute, denoiser_device, family, weights
            )
        vae_dtype = torch_dtype(profile.vae_dtype or profile.compute_dtype)
        fp16_vae = getattr(entry, "fp16_vae_source", None)
        if vae_dtype == torch.float16 and fp16_vae:
            # A VAE fine-tuned to stay finite in fp16 (SDXL: madebyollin/sdxl-vae-fp16-fix); without one the
            # family's VAE decodes in fp32 where its config says it must (`force_upcast`, see _decode).
            components["vae"] = diffusers.AutoencoderKL.from_pretrained(fp16_vae, **{_DTYPE_KWARG: vae_dtype})
        elif vae_dtype != compute:
            # Loaded at its own dtype, not cast from the compute dtype (an fp32 VAE from bf16 weights would
            # keep bf16's rounding).
            components["vae"] = diffusers.AutoencoderKL.from_pretrained(
                source, subfolder="vae", **{_DTYPE_KWARG: vae_dtype}
            )
        if large_encoder and text_weights is not None and text_weights.is_bnb:
            from transformers import T5EncoderModel

            components[large_encoder] = quantize.load_bnb_text_encoder(
                T5EncoderModel, source, large_encoder, text_weights, compute, encoder_device
            )
    except OSError as exc:
        raise ModelSourceError(f"cannot load model {entry.name!r} as {weights.value}: {exc}") from exc
    pipe = _from_pretrained(pipeline_cls, entry, source, compute, **components)

    if weights.is_fp8:
        quantize.enable_fp8_storage(getattr(pipe, denoiser_name), weights, compute)
    if large_encoder and text_weights is not None and text_weights.is_fp8:
        quantize.enable_fp8_storage(getattr(pipe, large_encoder), text_weights, compute)
    if profile.fp16_clamp:
        quantize.add_fp16_clamp(pipe.transformer)
    set_vae_mode(pipe, profile.vae)
    placement, offload_encoders = _apply_placement(pipe, family, profile, device, notes)
    info = PipelineInfo(
        model=entry.name, profile=profile, device=device, placement=placement, notes=notes,
        text_encoders_offloaded=offload_encoders,
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


def set_vae_mode(pipe: Any, mode: VaeMode) -> None:
    """Decode full, sliced (one image of the batch at a time) or tiled (and sliced: the most frugal).

    A switch on the loaded VAE, so the first retry after an out-of-memory error in decode costs no reload.
    """
    vae = pipe.vae
    if mode is VaeMode.TILED:
        vae.enable_tiling()
        vae.enable_slicing()
    elif mode is VaeMode.SLICED:
        vae.disable_tiling()
        vae.enable_slicing()
    else:
        vae.disable_tiling()
        vae.disable_slicing()


def _apply_placement(
    pipe: Any, family: str, profile: Profile, device: torch.device, notes: list[str]
) -> tuple[str, bool]:
    """Place the components as `profile.placement` says. Returns (what was applied, whether the text
    encoders wait off the GPU and must be moved on for each encode)."""
    placement = profile.placement
    denoiser_name = DENOISERS[family]
    denoiser = getattr(pipe, denoiser_name)
    encoders = [name for name in TEXT_ENCODERS[family] if getattr(pipe, name, None) is not None]
    offload_encoders = profile.text_encoders is TextEncoderPolicy.CACHE_AND_OFFLOAD

    if device.type == "cpu":
        # Everything is already in host memory, where it computes: there is nothing to offload to.
        if placement is Placement.MODEL_OFFLOAD:
            notes.append("cpu: model offload needs an accelerator; every component stays resident")
            return "resident", False
        if placement in (Placement.GROUP_OFFLOAD, Placement.LEAF_OFFLOAD):
            applied = _group_offload(pipe, denoiser, encoders, placement, profile, device, use_stream=False)
            notes.append("cpu: group-offload hooks run without CUDA streams; weights stay in host memory")
            return applied, False
        return "resident", False

    if placement is Placement.MODEL_OFFLOAD:
        # Accelerate's hooks keep one component on the device at a time: the text encoders leave it as soon
        # as the denoiser runs, which is the cache-and-offload policy by construction.
        pipe.enable_model_cpu_offload(device=device)
        return "model-offload", False

    streamed = {denoiser_name} if placement is not Placement.GPU else set()
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
    if placement in (Placement.GROUP_OFFLOAD, Placement.LEAF_OFFLOAD):
        applied = _group_offload(pipe, denoiser, encoders, placement, profile, device, use_stream=True)
    return applied, offload_encoders and placement is not Placement.LEAF_OFFLOAD


def _move(module: torch.nn.Module, device: torch.device) -> None:
    if get_module_execution_device(module) != device:
        module.to(device)


def _group_offload(
    pipe: Any,
    denoiser: torch.nn.Module,
    encoders: list[str],
    placement: Placement,
    profile: Profile,
    device: torch.device,
    use_stream: bool,
) -> str:
    from diffusers.hooks import apply_group_offloading

    offload = torch.device("cpu")
    streams = "streams" if use_stream else "no streams"
    streamed = [denoiser]
    if placement is Placement.LEAF_OFFLOAD:
        streamed += [getattr(pipe, name) for name in encoders]
    for module in streamed:
        _move(module, offload)  # group offloading starts from the offload device
    if placement is Placement.GROUP_OFFLOAD:
        per_group = blocks_per_group(denoiser, profile.gpu_weights_gib)
        denoiser.enable_group_offload(
            onload_device=device, offload_device=offload, offload_type="block_level",
            num_blocks_per_group=per_group, use_stream=use_stream,
        )
        applied = f"group-offload (block_level, {per_group} blocks/group, {streams})"
    else:
        denoiser.enable_group_offload(
            onload_device=device, offload_device=offload, offload_type="leaf_level", use_stream=use_stream
        )
        for module in streamed[1:]:
            apply_group_offloading(
                module, onload_device=device, offload_device=offload, offload_type="leaf_level",
                use_stream=use_stream,
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


def blocks_per_group(denoiser: torch.nn.Module, gpu_weights_gib: float | None) -> int:
    """How many denoiser blocks one offload group holds so that `gpu_weights_gib` of weights stay resident.

    With CUDA streams the next group is copied while the current one computes, so two groups are on the
    GPU at once: a group gets half the budget. No budget: one block per group (the most frugal).
    """
    blocks = [
        block for child in denoiser.children() if isinstance(child, torch.nn.ModuleList) for block in child
    ]
    if not blocks or not gpu_weights_gib:
        return 1
    largest = max(module_bytes(block) for block in blocks) or 1
    return max(1, min(len(blocks), int(gpu_weights_gib * 2**30 // (2 * largest))))


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers as stored (fp8 1 byte, GGUF blocks, bitsandbytes 4-bit
    data plus its absmax scales), each tensor counted once."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device.type == "meta":
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


def pipeline_bytes(pipe: Any) -> int:
    """Weight bytes of every torch module of a pipeline (0 for anything that is not a pipeline)."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        return 0
    return sum(module_bytes(c) for c in components.values() if isinstance(c, torch.nn.Module))


# --- prompt embeddings, cached -----------------------------------------------------------------------------

# (pipeline key, prompt, negative prompt (empty when CFG is off), classifier-free guidance on)
EmbeddingKey = tuple[tuple[str, str | None], str, str, bool]


class EmbeddingCache:
    """Prompt embeddings by (model and profile, prompt, negative prompt, CFG on), least recently used
    evicted first, bounded by entries and by bytes. Embeddings are kept in host memory (a FLUX.1 prompt is
    4 MiB of T5 states) so the cache never competes with the denoiser for VRAM."""

    def __init__(self, max_entries: int = 512, max_bytes: int = 512 * 2**20):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("an EmbeddingCache needs room for at least one entry and one byte")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.bytes = 0
        self._entries: OrderedDict[EmbeddingKey, tuple[dict[str, torch.Tensor], int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: EmbeddingKey) -> dict[str, torch.Tensor] | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found[0]

    def put(self, key: EmbeddingKey, tensors: dict[str, torch.Tensor]) -> None:
        stored = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
        size = sum(t.numel() * t.element_size() for t in stored.values())
        with self._lock:
            if key in self._entries:
                self.bytes -= self._entries.pop(key)[1]
            if size > self.max_bytes:
                return  # larger than the whole cache: not worth evicting everything for
            self._entries[key] = (stored, size)
            self.bytes += size
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self.bytes -= dropped

    def drop(self, pipeline: tuple[str, str | None]) -> int:
        """Forget the embeddings of one loaded pipeline (its model and profile); returns how many."""
        with self._lock:
            keys = [key for key in self._entries if key[0] == pipeline]
            for key in keys:
                self.bytes -= self._entries.pop(key)[1]
            return len(keys)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses}


# --- the per-worker pipeline cache --------------------------------------------------------------------------


class PipelineCache:
    """The pipelines one worker keeps loaded, by (model, profile), least recently used evicted first.

    Bounded by count (`max_pipelines`) and, when `max_bytes` is set, by the weight bytes of the loaded
    pipelines (measured after each load; a size seen before is freed room for ahead of the next load). One
    pipeline larger than `max_bytes` alone is still kept: refusing it would refuse the job.

    Holds the worker's `EmbeddingCache` and attaches it to each pipeline it loads, so `render_batch` reuses
    prompt embeddings across batches without the caller passing it.

    A lock serialises loads and evictions, which is enough for one worker (one render at a time plus a
    control thread); it does not make two renders on one pipeline safe.
    """

    def __init__(
        self,
        max_pipelines: int = DEFAULT_MAX_PIPELINES,
        cache_dir: Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        loader: Callable[..., Any] | None = None,
        max_bytes: int | None = None,
        embedding_cache: EmbeddingCache | None = None,
    ):
        if max_pipelines < 1:
            raise ValueError(f"max_pipelines must be at least 1, got {max_pipelines}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_pipelines = max_pipelines
        self.max_bytes = max_bytes
        self.cache_dir = cache_dir
        self.device = torch.device(device)
        self.dtype = dtype
        # loader(entry) without a profile, loader(entry, profile) with one.
        self._loader = loader or self._load
        self.embedding_cache = embedding_cache if embedding_cache is not None else EmbeddingCache()
        self._pipelines: OrderedDict[tuple[str, str | None], Any] = OrderedDict()
        self._bytes: dict[tuple[str, str | None], int] = {}
        self._seen_bytes: dict[tuple[str, str | None], int] = {}
        self._lock = threading.RLock()

    def _load(self, entry: ModelEntry, profile: Profile | None = None) -> Any:
        return load_pipeline(
            entry, self.cache_dir, device=self.device, dtype=self.dtype if profile is None else None,
            profile=profile,
        )

    def get(self, entry: ModelEntry, profile: Profile | None = None) -> tuple[Any, float]:
        """The pipeline of `entry` under `profile` and the seconds spent loading it now (0.0 when already
        loaded). A profile that differs only in its VAE mode reuses the loaded pipeline and switches the
        mode."""
        key = pipeline_key(entry.name, profile)
        with self._lock:
            if key in self._pipelines:
                self._pipelines.move_to_end(key)
                pipe = self._pipelines[key]
                if profile is not None and hasattr(pipe, "vae"):
                    set_vae_mode(pipe, profile.vae)
                return pipe, 0.0
            # Evict before loading: the memory must be free before the next model arrives.
            while len(self._pipelines) >= self.max_pipelines:
                self._evict_key(next(iter(self._pipelines)))
            expected = self._seen_bytes.get(key, 0)
            if self.max_bytes is not None and expected:
                while self._pipelines and self.bytes_loaded() + expected > self.max_bytes:
                    self._evict_key(next(iter(self._pipelines)))
            start = time.perf_counter()
            pipe = self._loader(entry) if profile is None else self._loader(entry, profile)
            load_s = time.perf_counter() - start
            self._pipelines[key] = pipe
            self._bytes[key] = self._seen_bytes[key] = pipeline_bytes(pipe)
            info = pipeline_info(pipe)
            if info is not None:
                info.embedding_cache = self.embedding_cache
            if self.max_bytes is not None:
                while len(self._pipelines) > 1 and self.bytes_loaded() > self.max_bytes:
                    self._evict_key(next(iter(self._pipelines)))
            return pipe, load_s

    def loaded(self) -> list[str]:
        """Names of the loaded models, least recently used first (a model under two profiles: twice)."""
        with self._lock:
            return [model for model, _ in self._pipelines]

    def loaded_keys(self) -> list[tuple[str, str | None]]:
        """(model, profile name) of each loaded pipeline, least recently used first."""
        with self._lock:
            return list(self._pipelines)

    def bytes_loaded(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def evict(self, name: str, profile: Profile | None = None) -> bool:
        """Drop the pipelines of model `name` (only the one under `profile` when given); False if none was
        loaded."""
        with self._lock:
            if profile is not None:
                keys = [pipeline_key(name, profile)] if pipeline_key(name, profile) in self._pipelines else []
            else:
                keys = [key for key in self._pipelines if key[0] == name]
            for key in keys:
                self._evict_key(key)
            return bool(keys)

    def _evict_key(self, key: tuple[str, str | None]) -> None:
        pipe = self._pipelines.pop(key)
        self._bytes.pop(key, None)
        self.embedding_cache.drop(key)
        del pipe
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def clear(self) -> None:
        with self._lock:
            for key in list(self._pipelines):
                self._evict_key(key)


# --- out of memory ------------------------------------------------------------------------------------------

_OOM_MESSAGES = ("out of memory", "cublas_status_alloc_failed", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is an out-of-memory error: torch.OutOfMemoryError,
    a RuntimeError saying "CUDA out of memory" / "CUDA error: out of memory" / CUBLAS_STATUS_ALLOC_FAILED,
    or the CPU allocator's "can't allocate memory"."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, torch.OutOfMemoryError):
            return True
        if isinstance(current, RuntimeError) and any(m in str(current).lower() for m in _OOM_MESSAGES):
            return True
        current = current.__cause__ or current.__context__
    return False


def _recover_after_failure(pipe: Any, device: torch.device) -> None:
    # Model offload: put every component back where its hooks expect it, as the pipeline does on success.
    free_hooks = getattr(pipe, "maybe_free_model_hooks", None)
    if callable(free_hooks):
        with contextlib.suppress(Exception):
            free_hooks()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- requests and results ----------------------------------------------------------------------------


@dataclass
class RenderRequest:
    job_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    num_images: int


@dataclass
class RenderResult:
    job_id: str
    images: list[bytes]  # PNG files
    seeds: list[int]
    parameters: list[str]  # the A1111 infotext written into each PNG
    # load_s (filled by the caller), encode_s, denoise_s, denoise_s_per_step, decode_s, total_s:
    # the stage times of the whole batch, shared by every job in it.
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    # Distinct prompts of the whole batch encoded now / taken from the embedding cache.
    encoded_prompts: int = 0
    cached_prompts: int = 0


# Fields every request of one batch must share: they shape the single pipeline call.
BATCH_SHARED_FIELDS = ("width", "height", "steps", "guidance")


def render_batch(
    pipe: Any,
    entry: ModelEntry,
    requests: list[RenderRequest],
    embedding_cache: EmbeddingCache | None = None,
) -> list[RenderResult]:
    """Render `requests` (same size, steps and guidance) in one pipeline call; one result per request.

    Prompt embeddings come from `embedding_cache`, or when it is None from the cache of the PipelineCache
    that loaded `pipe` (if any): a prompt already encoded for this model and profile is not encoded again.
    Any exception (out-of-memory included, see `is_out_of_memory`) propagates after the pipeline has been put
    back in a usable state.
    """
    _check_batch(entry, requests)
    info = pipeline_info(pipe)
    if embedding_cache is None and info is not None:
        embedding_cache = info.embedding_cache
    family = entry.family.name
    if family not in _ENCODERS:
        raise ValueError(f"render_batch does not know how to render family {family!r} ({entry.name})")
    first = requests[0]
    width, height, steps, guidance = first.width, first.height, first.steps, first.guidance
    device = pipe._execution_device
    counts = [request.num_images for request in requests]
    seeds = [[request.seed + i for i in range(request.num_images)] for request in requests]
    # One generator per image: the image depends on its own seed only, never on its batch neighbours.
    generators = [torch.Generator(device).manual_seed(seed) for job_seeds in seeds for seed in job_seeds]
    do_cfg = _does_cfg(pipe, family, guidance)

    step_ends: list[float] = []

    def on_step_end(_pipe, _step, _timestep, _callback_kwargs):
        _synchronize(device)
        step_ends.append(time.perf_counter())
        return {}

    total_start = time.perf_counter()
    try:
        with _PeakMemory(device) as peak, torch.no_grad():
            embeddings, encoded, cached = _embeddings(
                pipe, entry, requests, do_cfg, device, info, embedding_cache
            )
            # Each job's prompt is encoded once; every image of the job gets its own copy.
            repeats = torch.tensor(counts, device=device)
            embeddings = {name: rows.repeat_interleave(repeats, dim=0) for name, rows in embeddings.items()}
            _synchronize(device)
            denoise_start = time.perf_counter()

            extra = {"max_sequence_length": _t5_max_length(pipe)} if family == "flux" else {}
            latents = pipe(
                **embeddings,
                **extra,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                num_images_per_prompt=1,
                generator=generators,
                output_type="latent",
                callback_on_step_end=on_step_end,
            ).images
            _synchronize(device)
            decode_start = time.perf_counter()

            images = _decode(pipe, family, latents, height=height, width=width, device=device)
            _synchronize(device)
            decode_end = time.perf_counter()
    except BaseException:
        _recover_after_failure(pipe, device)
        raise

    denoise_s = decode_start - denoise_start
    if len(step_ends) >= 2:
        # Steady state: leaves out the pipeline's set-up before the first step.
        per_step = (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1)
    else:
        per_step = denoise_s / steps
    timings = {
        "load_s": 0.0,
        "encode_s": denoise_start - total_start,
        "denoise_s": denoise_s,
        "denoise_s_per_step": per_step,
        "decode_s": decode_end - decode_start,
    }

    info = _sampler_info(pipe, family, guidance)
    results: list[RenderResult] = []
    offset = 0
    for request, job_seeds in zip(requests, seeds):
        pngs, texts = [], []
        for seed, image in zip(job_seeds, images[offset : offset + request.num_images]):
            text = a1111_parameters(
                prompt=request.prompt,
                # A negative prompt acts only through classifier-free guidance: Flux (guidance-distilled)
                # and CFG scale <= 1 never see it, so the infotext does not claim it.
                negative_prompt=request.negative_prompt if do_cfg else "",
                steps=steps,
                seed=seed,
                width=width,
                height=height,
                model=entry.name,
                **info,
            )
            pngs.append(_png_bytes(image, text))
            texts.append(text)
        offset += request.num_images
        results.append(
            RenderResult(
                job_id=request.job_id,
                images=pngs,
                seeds=job_seeds,
                parameters=texts,
                timings=dict(timings),
                peak_memory_mb=peak.mb,
                encoded_prompts=encoded,
                cached_prompts=cached,
            )
        )
    total_s = time.perf_counter() - total_start
    for result in results:
        result.timings["total_s"] = total_s
    return results


def _check_batch(entry: ModelEntry, requests: list[RenderRequest]) -> None:
    if not requests:
        raise ValueError("render_batch needs at least one request")
    first = requests[0]
    for request in requests[1:]:
        for name in BATCH_SHARED_FIELDS:
            if getattr(request, name) != getattr(first, name):
                raise ValueError(
                    f"all requests of a batch must share {name}: job {request.job_id} has "
                    f"{name}={getattr(request, name)!r}, job {first.job_id} has {getattr(first, name)!r}"
                )
    for request in requests:
        if request.num_images < 1:
            raise ValueError(f"job {request.job_id}: num_images must be at least 1, got {request.num_images}")
    if first.steps < 1:
        raise ValueError(f"steps must be at least 1, got {first.steps}")
    entry.check_size("width", first.width)
    entry.check_size("height", first.height)


def _embeddings(
    pipe: Any,
    entry: ModelEntry,
    requests: list[RenderRequest],
    do_cfg: bool,
    device: torch.device,
    info: PipelineInfo | None,
    cache: EmbeddingCache | None,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """The prompt embeddings of `requests`, one row per request, on `device`; also how many distinct prompts
    were encoded now and how many came from `cache`. Missing prompts are encoded together in one call."""
    family = entry.family.name
    owner = info.key if info is not None else (entry.name, None)
    # Without CFG the negative prompt plays no part: it must not split the cache.
    keys = [(owner, r.prompt, r.negative_prompt if do_cfg else "", do_cfg) for r in requests]
    rows: dict[EmbeddingKey, dict[str, torch.Tensor]] = {}
    for key in dict.fromkeys(keys):
        found = cache.get(key) if cache is not None else None
        if found is not None:
            rows[key] = found
    missing = [key for key in dict.fromkeys(keys) if key not in rows]
    if missing:
        with _text_encoders_on(pipe, family, info, device):
            encoded = _ENCODERS[family](
                pipe,
                prompts=[key[1] for key in missing],
                negative_prompts=[key[2] for key in missing],
                do_cfg=do_cfg,
                device=device,
            )
        for index, key in enumerate(missing):
            rows[key] = {name: tensor[index : index + 1] for name, tensor in encoded.items()}
            if cache is not None:
                cache.put(key, rows[key])
    names = rows[keys[0]].keys()
    embeddings = {name: torch.cat([rows[key][name].to(device) for key in keys]) for name in names}
    return embeddings, len(missing), len(rows) - len(missing)


@contextlib.contextmanager
def _text_encoders_on(
    pipe: Any, family: str, info: PipelineInfo | None, device: torch.device
) -> Iterator[None]:
    """Cache-and-offload: the text encoders wait in host memory and come to the device for one encode."""
    if info is None or not info.text_encoders_offloaded:
        yield
        return
    encoders = [getattr(pipe, n) for n in TEXT_ENCODERS[family] if getattr(pipe, n, None) is not None]
    try:
        for encoder in encoders:
            _move(encoder, device)
        yield
    finally:
        for encoder in encoders:
            _move(encoder, torch.device("cpu"))


def _does_cfg(pipe: Any, family: str, guidance: float) -> bool:
    # The SD pipelines' own rule: guidance <= 1, or a guidance-embedding UNet (LCM), means one pass.
    if family == "flux":
        return False
    return guidance > 1 and pipe.unet.config.time_cond_proj_dim is None


def _t5_max_length(pipe: Any) -> int:
    # Flux pads prompts to this many T5 tokens; 512 is the pipeline's ceiling (FLUX.1-dev's length).
    return min(512, int(pipe.tokenizer_2.model_max_length))


def _synchronize(device: torch.device) -> None:
    # Stage times on CUDA are only true once the queued kernels have run.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- text encoding, per family ------------------------------------------------------------------------


def _encode_sd15(pipe, prompts, negative_prompts, do_cfg, device) -> dict[str, torch.Tensor]:
    prompt_embeds, negative_embeds = pipe.encode_prompt(
        prompts, device, 1, do_cfg, negative_prompt=negative_prompts if do_cfg else None
    )
    embeddings = {"prompt_embeds": prompt_embeds}
    if do_cfg:
        embeddings["negative_prompt_embeds"] = negative_embeds
    return embeddings


def _encode_sdxl(pipe, prompts, negative_prompts, do_cfg, device) -> dict[str, torch.Tensor]:
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


def _encode_flux(pipe, prompts, negative_prompts, do_cfg, device) -> dict[str, torch.Tensor]:
    prompt_embeds, pooled, _text_ids = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        device=device,
        num_images_per_prompt=1,
        max_sequence_length=_t5_max_length(pipe),
    )
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}


_ENCODERS = {"sd15": _encode_sd15, "sdxl": _encode_sdxl, "flux": _encode_flux}


# --- VAE decoding, per family (as each pipeline does it after its denoising loop) -----------------------


def _decode(pipe: Any, family: str, latents: torch.Tensor, height: int, width: int, device: torch.device):
    vae = pipe.vae
    # With offloading the VAE's weights may sit elsewhere than where it computes.
    vae_device = get_module_execution_device(vae)
    do_denormalize = None
    if family == "flux":
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae_device, vae.dtype), return_dict=False)[0]
    elif family == "sdxl":
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
            image = vae.decode(latents.to(vae_device, vae.dtype), return_dict=False)[0]
        finally:  # also after an out-of-memory error: the next render expects the VAE as it was
            if needs_upcasting:
                vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
    else:
        latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(vae_device, vae.dtype), return_dict=False)[0]
        # A real SD 1.5 folder ships a safety checker; the pipeline runs it, so we do too.
        image, has_nsfw = pipe.run_safety_checker(image, device, latents.dtype)
        if has_nsfw is not None:
            do_denormalize = [not flagged for flagged in has_nsfw]
    return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=do_denormalize)


# --- PNG metadata in the AUTOMATIC1111 / Forge format --------------------------------------------------

A1111_SAMPLER_NAMES = {
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "FlowMatchEulerDiscreteScheduler": "Euler",
    "FlowMatchHeunDiscreteScheduler": "Heun",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
    "DEISMultistepScheduler": "DEIS",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "LCMScheduler": "LCM",
}


def sampler_name(scheduler: Any) -> str:
    """The A1111 sampler name of a diffusers scheduler (its class name, shortened, when A1111 has none)."""
    name = type(scheduler).__name__
    if name == "DPMSolverMultistepScheduler":
        sde = scheduler.config.get("algorithm_type", "") in ("sde-dpmsolver", "sde-dpmsolver++")
        return "DPM++ 2M SDE" if sde else "DPM++ 2M"
    return A1111_SAMPLER_NAMES.get(name, name.removesuffix("Scheduler"))


def schedule_type(scheduler: Any) -> str:
    """The A1111 "Schedule type" of a diffusers scheduler's sigma spacing."""
    config = scheduler.config
    if config.get("use_karras_sigmas"):
        return "Karras"
    if config.get("use_exponential_sigmas"):
        return "Exponential"
    if config.get("use_beta_sigmas"):
        return "Beta"
    if type(scheduler).__name__.startswith("FlowMatch"):
        return "Simple"  # what Forge writes for Flux's flow-matching sigmas
    return "Normal"


def _sampler_info(pipe: Any, family: str, guidance: float) -> dict[str, Any]:
    info: dict[str, Any] = {
        "sampler": sampler_name(pipe.scheduler),
        "schedule_type": schedule_type(pipe.scheduler),
        "cfg_scale": guidance,
    }
    if family == "flux":
        # Forge's convention for guidance-distilled Flux: no CFG pass (scale 1), guidance as an input.
        info["cfg_scale"] = 1.0
        if pipe.transformer.config.guidance_embeds:
            info["distilled_cfg_scale"] = guidance
    return info


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("renderfarm")
    except PackageNotFoundError:
        # Running from a source tree that is not installed: read the version from pyproject.toml.
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        match = pyproject.is_file() and re.search(
            r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), flags=re.MULTILINE
        )
        return match.group(1) if match else "unknown"


RENDERFARM_VERSION = _version()


def _quote(value: Any) -> str:
    # A1111's rule: a value holding a separator is written as a JSON string.
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_parameters(
    *,
    prompt: str,
    negative_prompt: str = "",
    steps: int,
    sampler: str,
    schedule_type: str | None,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    distilled_cfg_scale: float | None = None,
    version: str | None = None,
) -> str:
    """The infotext AUTOMATIC1111 / Forge write into a PNG's `parameters` chunk."""
    fields: dict[str, Any] = {"Steps": steps, "Sampler": sampler}
    if schedule_type:
        fields["Schedule type"] = schedule_type
    fields["CFG scale"] = float(cfg_scale)
    if distilled_cfg_scale is not None:
        fields["Distilled CFG Scale"] = float(distilled_cfg_scale)
    fields["Seed"] = seed
    fields["Size"] = f"{width}x{height}"
    fields["Model"] = model
    fields["Version"] = version or f"renderfarm {RENDERFARM_VERSION}"
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


# A1111's own pattern for one "Key: value" pair of the last infotext line.
_PARAMETER_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """Split an A1111 infotext into `prompt`, `negative_prompt` and its "Key: value" pairs (as strings)."""
    *lines, last = text.strip().split("\n")
    # As in A1111: the last line holds the parameters only if it has at least 3 of them.
    if len(_PARAMETER_RE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if not negative and line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    parsed = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in _PARAMETER_RE.findall(last):
        if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        parsed[key] = value
    return parsed


def _png_bytes(image: Any, parameters: str) -> bytes:
    info = PngInfo()
    # A tEXt chunk; PIL writes iTXt instead when the text is not Latin-1, as A1111 does.
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


# --- peak memory ------------------------------------------------------------------------------------------


class _PeakMemory:
    """Peak memory of a render, in MiB.

    CUDA: `max_memory_allocated` after resetting the peak. CPU: the growth of the resident set's high-water
    mark over the resident set at the start. Linux resets the mark when "5" is written to
    /proc/self/clear_refs, so no sampling is needed; a sampling thread is only the fallback (a thread
    waking every few milliseconds measurably slows small renders on a 2-core machine). 0.0 without /proc.
    """

    INTERVAL_S = 0.01

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = 0.0
        self._start_rss = 0
        self._peak_rss = 0
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self._start_rss = self._peak_rss = _status_kib("VmRSS") * 1024
        if not self._hwm_reset and self._start_rss:
            self._thread = threading.Thread(target=self._sample, name="renderfarm-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.device.type == "cuda":
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self._hwm_reset:
            self._peak_rss = max(self._peak_rss, _status_kib("VmHWM") * 1024)
        self._peak_rss = max(self._peak_rss, _status_kib("VmRSS") * 1024)
        self.mb = max(0, self._peak_rss - self._start_rss) / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._peak_rss = max(self._peak_rss, _status_kib("VmRSS") * 1024)


def _status_kib(field: str) -> int:
    """A `VmRSS`/`VmHWM` line of /proc/self/status in KiB; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
