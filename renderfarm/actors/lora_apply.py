"""Apply a LoRA set to a loaded pipeline, in one of two modes, on the worker.

A LoRA set is an ordered tuple of (LoraInfo, weight) (`LoraSet`). `apply(pipe, entry, profile, lora_set, mode)`
switches a pipeline to exactly that set and returns what it cost (`AppliedTimings`); the empty set is the base
model. Two modes, the choice Forge offers as "Automatic (fp16 LoRA)" against patching the weights:

- "unmerged" (Forge's fp16 LoRA): each LoRA is a diffusers/PEFT adapter, `set_adapters(names,
  adapter_weights=...)` activates the set. The base weights are never touched, so it works on top of every
  weights format: bf16, fp8 layerwise storage, bitsandbytes nf4/fp4, GGUF. Each active adapter costs every
  step (two thin matmuls per adapted layer); switching sets costs nothing once the adapters are loaded.
- "fused": the set is merged into the weights (`fuse_lora`): a step costs the base model's step plus the call
  overhead of the PEFT wrappers, which stay (a merged wrapper calls its base layer only; bench/lora_cost.py
  measures ~5% on the stand-ins, whose steps are mostly such overhead). Switching costs an unfuse and a fuse of
  every adapted layer; keeping the wrappers keeps the adapters, so a switch back needs no load. Only into
  16-bit (or fp32) weights: merging into 4-bit (nf4, fp4, GGUF) or fp8 storage would round the LoRA's delta
  into the quantization grid, which loses most of it.
  `choose_mode(profile)` says which a node uses: fused on plain float weights, unmerged elsewhere.

Adapters. Each LoRA loads once, as an adapter named by its content hash (`adapter_name`: "lora_" and 16 hex
digits of its sha256), so a file changed under the same name is another adapter, and two names for the same
bytes are one. Both modes keep loaded adapters that a set stops using (inactive: `set_adapters` leaves them
out, and peft skips an inactive adapter in the forward), so switching back costs no load; at most
`max_adapters` (and, when given, `max_adapter_bytes`) stay loaded, the least recently used deleted first
(`delete_adapters`). Only the empty set unloads everything (`unload_lora_weights`: the PEFT wrappers go too).

What diffusers does to get the base weights back, and what we do (read in diffusers 0.42
loaders/lora_base.py and peft 0.21 tuners/lora/layer.py): `fuse_lora` calls each wrapped layer's `merge`,
`base.weight.data += get_delta_weight(adapter)` (B @ A x scaling, on CPU in fp32 then cast back to the
weight's dtype); `unfuse_lora` calls `unmerge`, `weight.data -= get_delta_weight(adapter)` recomputed. No
copy of the original weights is kept, so in 16 bits the round trip is two roundings away from the original
(up to a unit in the last place of w + delta, per weight); the same set again lands on the same weights, but
each switch to another set or weight adds its roundings: a worker switching sets all day would walk its
weights away from the model (tests/actors/test_lora_apply.py pins both). So a fused set keeps a host copy of
the original weights (and biases) of every layer it changed (`LoraState.backups`; Forge and ComfyUI keep the
same backup); unfusing calls `unfuse_lora` (peft's own bookkeeping) and then copies the originals back: bit for
bit the base model again. The copy costs host memory, as much as the adapted layers' weights
(`AppliedTimings.backup_bytes`); it is kept while a fused set needs it and dropped when a set no longer adapts
that layer.

Library behaviours met on the way (the first and the last pinned in the tests):
- peft moves a new adapter to its base layer's device AND dtype whenever that dtype is a float
  (`_move_adapter_to_device_of_base_layer`); under fp8 layerwise storage that makes the LoRA itself fp8
  (its precision gone, and on CPU its forward fails: "mul_cpu_reduced_float" not implemented for fp8). Loaded
  adapters whose weights came out fp8 are cast to the profile's compute dtype (`_unfp8_adapter`).
- `unfuse_lora` warns "Already unmerged" from every wrapped layer the set did not merge, and each load logs
  two warnings that say nothing about the LoRA (see `_expected_noise`); silenced around our calls only.
- diffusers' `load_lora_adapter` reads the model's whole `state_dict()` (to build the LoraConfig; Flux's loader
  once more in `_maybe_expand_lora_state_dict`), which on a CPU with AVX512-BF16 un-packs bitsandbytes' 4-bit
  weights lossily, so each LoRA load moves an nf4 model's outputs by a rounding. CPU only (bitsandbytes packs
  for its CPU kernel only; a CPU node never runs bitsandbytes: planning/profiles.py), so nothing is done.

Where the state lives: on the pipeline, as `pipe.renderfarm_lora` (`LoraState`), beside `renderfarm_info`
(actors/loading.py). It describes the pipeline's own modules (which adapters are injected, which weights are
fused and their backups), so it must live and die with exactly that object: an attribute does that without a
registry (a WeakKeyDictionary would too, but is one more global shared between threads and would keep the
pipeline alive the moment a value referenced it), follows the pipeline through a deepcopy, and lets
`render_batch` read the set applied (`text_encoder_key`) without importing this module's torch-side code.

Prompt embeddings. A LoRA that adapts a text encoder changes the embeddings: `text_encoder_key(pipe)` (the
mode and the (sha256, weight) of every applied LoRA that adapts a text encoder, () when none) is part of
each embedding-cache key (actors/pipelines.py `_embeddings`), so a render never reuses embeddings encoded
under another set, and sets that leave the text encoders alone share the base model's.

One apply or render at a time per pipeline (the worker runs every torch call on one thread). A failed apply
puts the pipeline back to the base model (everything unloaded, fused weights restored) and re-raises.

Imported only inside worker processes: it imports torch (and peft and diffusers when it applies a set).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from renderfarm.errors import ModelSourceError, SpecError
from renderfarm.loras.library import LoraInfo
from renderfarm.planning.catalog import ModelEntry
from renderfarm.planning.loras import MODES, Mode, choose_mode, fuse_refusal
from renderfarm.planning.profiles import Profile

__all__ = [
    "DEFAULT_MAX_ADAPTERS", "MODES", "AppliedTimings", "LoraFamilyMismatch", "LoraSet", "LoraState", "Mode",
    "adapter_name", "apply", "choose_mode", "fuse_refusal", "lora_state", "text_encoder_key",
]

LoraSet = tuple[tuple[LoraInfo, float], ...]
# Loaded adapters kept per pipeline (active or not). A studio LoRA is 20-400 MB in 16 bits; eight of them on a
# 24 GB card are at most a few GB, and a job carries at most jobs.MAX_LORAS = 8, which must fit together.
DEFAULT_MAX_ADAPTERS = 8
STATE_ATTRIBUTE = "renderfarm_lora"
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# The attributes of a peft LoRA layer that hold one entry per adapter (weights of the adapter itself).
_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


class LoraFamilyMismatch(SpecError):
    """A LoRA made for another family than the model's (an SDXL LoRA on Flux): the job's fault on every node.

    A SpecError, so faults.classify() fails the job at once and blames no node (and a ValueError, as SpecError
    is). Submit refuses these already (jobs.py); a node meeting one anyway (a library changed under a queued
    job) says the same."""

    def __init__(self, lora: LoraInfo, entry: ModelEntry):
        self.lora, self.model = lora.name, entry.name
        self.lora_family, self.model_family = lora.family, entry.family.name
        super().__init__(f"LoRA {lora.name!r} is made for {lora.family}, but model {entry.name!r} is "
                         f"{entry.family.name}: a LoRA only applies to the family it was trained on")


@dataclass
class AppliedTimings:
    """What one `apply` did and cost. JSON-ready with `as_dict()`."""

    mode: str | None  # the mode the pipeline is in now (None: no LoRA applied, the base model)
    changed: bool = False  # False: the set was already applied in that mode, nothing was done
    load_s: float = 0.0  # reading LoRA files and injecting their adapters
    fuse_s: float = 0.0  # unfusing the previous set (with the exact restore) and fusing this one
    set_s: float = 0.0  # set_adapters, deleting evicted adapters, unloading
    total_s: float = 0.0
    # Weights of every adapter now loaded (active or kept), which sit with their components on the device:
    # what the VRAM model adds. By component ("unet", "transformer", "text_encoder", ...) for the stage peaks.
    adapter_bytes: int = 0
    adapter_bytes_by_component: dict[str, int] = field(default_factory=dict)
    active_adapter_bytes: int = 0  # of those, the applied set's (the rest are kept for a switch back)
    backup_bytes: int = 0  # host memory: originals of the layers a fused set changed
    loaded: tuple[str, ...] = ()  # LoRA names loaded now
    deleted: tuple[str, ...] = ()  # adapters deleted now (least recently used, or all for the empty set)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["loaded"], data["deleted"] = list(self.loaded), list(self.deleted)
        return data


@dataclass
class _Adapter:
    name: str  # the adapter's name in peft: adapter_name(info)
    lora: str  # the library name it was loaded under
    sha256: str
    components: tuple[str, ...]  # the pipeline components it adapts, as loaded
    bytes_by_component: dict[str, int]
    text_encoder: bool  # adapts a text encoder

    @property
    def bytes(self) -> int:
        return sum(self.bytes_by_component.values())


@dataclass
class LoraState:
    """The LoRA state of one loaded pipeline (`pipe.renderfarm_lora`, see the module docstring)."""

    mode: str | None = None  # None: the base model
    applied: tuple[tuple[str, float], ...] = ()  # (adapter name, weight), in the set's order
    adapters: OrderedDict[str, _Adapter] = field(default_factory=OrderedDict)  # loaded; least recently used first
    # (component, module name) -> host copies of (weight, bias) as they were before any fuse
    backups: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    text_encoder_key: tuple[Any, ...] = ()

    @property
    def adapter_bytes(self) -> int:
        return sum(a.bytes for a in self.adapters.values())

    @property
    def backup_bytes(self) -> int:
        return sum(_tensor_bytes(w) + (_tensor_bytes(b) if b is not None else 0) for w, b in self.backups.values())

    def applied_loras(self) -> list[tuple[str, float]]:
        """(library name, weight) of the applied set, in order."""
        return [(self.adapters[name].lora, weight) for name, weight in self.applied]


def lora_state(pipe: Any) -> LoraState:
    """The pipeline's LoRA state, created empty (the base model) on first use."""
    state = getattr(pipe, STATE_ATTRIBUTE, None)
    if state is None:
        state = LoraState()
        setattr(pipe, STATE_ATTRIBUTE, state)
    return state


def text_encoder_key(pipe: Any) -> tuple[Any, ...]:
    """What the applied LoRA set does to the text encoders, for the prompt-embedding cache's key: () when no
    applied LoRA adapts one (the base model's embeddings hold), else (mode, ((sha256, weight), ...))."""
    state = getattr(pipe, STATE_ATTRIBUTE, None)
    return state.text_encoder_key if state is not None else ()


def adapter_name(info: LoraInfo) -> str:
    """The adapter's name in peft: by content, so that a changed file is a different adapter."""
    return f"lora_{info.sha256[:16]}"


# --- which mode ----------------------------------------------------------------------------------------


# --- apply ---------------------------------------------------------------------------------------------


def apply(
    pipe: Any,
    entry: ModelEntry,
    profile: Profile | None,
    lora_set: LoraSet,
    mode: str | None = None,
    *,
    max_adapters: int = DEFAULT_MAX_ADAPTERS,
    max_adapter_bytes: int | None = None,
) -> AppliedTimings:
    """Switch `pipe` (a pipeline of `entry` loaded under `profile`) to exactly `lora_set` in `mode` (default:
    `choose_mode`). An empty set is the base model: every adapter unloaded, fused weights restored exactly.

    The set: LoRAs at weight 0 are left out (they add nothing); one file given twice (by content) is one
    adapter at the sum of its weights. A LoRA of another family raises LoraFamilyMismatch (the job's fault);
    a LoRA file absent on this node raises ModelSourceError; a weight that is not finite raises ValueError;
    `mode="fused"` where `fuse_refusal` refuses raises ValueError. Applying the set already applied, in the
    same mode, does nothing (`changed` False)."""
    start = time.perf_counter()
    if max_adapters < 1:
        raise ValueError(f"max_adapters must be at least 1, got {max_adapters}")
    wanted = _effective_set(entry, lora_set)
    if mode is None:
        mode = choose_mode(profile, entry=entry, lora_set=wanted)
    if mode not in MODES:
        raise ValueError(f"unknown LoRA mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "fused":
        reason = fuse_refusal(profile, entry, wanted)
        if reason:
            raise ValueError(f"cannot fuse LoRAs into {entry.name}: {reason}")
    for info, _ in wanted:
        if not Path(info.path).is_file():
            raise ModelSourceError(f"LoRA {info.name!r}: {info.path} is not on this node")

    state = lora_state(pipe)
    target = tuple((adapter_name(info), weight) for info, weight in wanted)
    timings = AppliedTimings(mode=mode if target else None)
    if state.applied == target and state.mode == timings.mode:
        for name, _ in target:
            state.adapters.move_to_end(name)
        return _finish(timings, state, start)
    try:
        if state.mode == "fused":
            _unfuse(pipe, state, timings)
        if not target:
            _unload_all(pipe, state, timings)
        else:
            compute = _compute_dtype(profile)
            for info, _ in wanted:
                _load(pipe, state, info, compute, timings)
            moment = time.perf_counter()
            names = [name for name, _ in target]
            pipe.set_adapters(names, adapter_weights=[weight for _, weight in target])
            timings.set_s += time.perf_counter() - moment
            if mode == "fused":
                _fuse(pipe, state, names, timings)
            else:
                state.backups.clear()  # the weights are the originals again: nothing to restore
            _evict(pipe, state, set(names), max_adapters, max_adapter_bytes, timings)
        state.mode, state.applied = timings.mode, target
        state.text_encoder_key = _text_encoder_key(state, mode, target)
    except BaseException:
        _reset(pipe, state)
        raise
    timings.changed = True
    return _finish(timings, state, start)


def _effective_set(entry: ModelEntry, lora_set: LoraSet) -> tuple[tuple[LoraInfo, float], ...]:
    combined: dict[str, list[Any]] = {}
    for item in lora_set:
        info, weight = item
        if info.family != entry.family.name:
            raise LoraFamilyMismatch(info, entry)
        weight = float(weight)
        if not math.isfinite(weight):
            raise ValueError(f"LoRA {info.name!r}: weight {weight!r} is not a finite number")
        if info.sha256 in combined:
            combined[info.sha256][1] += weight
        else:
            combined[info.sha256] = [info, weight]
    return tuple((info, weight) for info, weight in combined.values() if weight != 0.0)


def _finish(timings: AppliedTimings, state: LoraState, start: float) -> AppliedTimings:
    timings.adapter_bytes = state.adapter_bytes
    by_component: dict[str, int] = {}
    for adapter in state.adapters.values():
        for component, size in adapter.bytes_by_component.items():
            by_component[component] = by_component.get(component, 0) + size
    timings.adapter_bytes_by_component = by_component
    timings.active_adapter_bytes = sum(state.adapters[name].bytes for name, _ in state.applied)
    timings.backup_bytes = state.backup_bytes
    timings.total_s = time.perf_counter() - start
    return timings


def _text_encoder_key(state: LoraState, mode: str, target: tuple[tuple[str, float], ...]) -> tuple[Any, ...]:
    touching = tuple((state.adapters[name].sha256, weight) for name, weight in target
                     if state.adapters[name].text_encoder)
    return (mode, touching) if touching else ()


def _compute_dtype(profile: Profile | None) -> torch.dtype | None:
    if profile is None:
        return None
    from renderfarm.actors.quantize import torch_dtype

    return torch_dtype(profile.compute_dtype)


def _loadable(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    """The pipeline's LoRA-loadable components that are there (SD3 without T5 has a None)."""
    return [(name, module) for name in getattr(pipe, "_lora_loadable_modules", ())
            if isinstance(module := getattr(pipe, name, None), torch.nn.Module)]


def _tuner_layers(module: torch.nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(name, layer) for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)]


def _adapter_parts(layer: Any, name: str) -> list[tuple[Any, str, Any]]:
    """(container, key, module or parameter) of adapter `name`'s own weights in one LoRA layer."""
    parts = []
    for attribute in _ADAPTER_PARTS:
        container = getattr(layer, attribute, None)
        if container is not None and hasattr(container, "keys") and name in container.keys():
            parts.append((container, name, container[name]))
    return parts


def _tensors_of(item: Any) -> list[torch.Tensor]:
    return list(item.parameters()) if isinstance(item, torch.nn.Module) else [item]


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _load(pipe: Any, state: LoraState, info: LoraInfo, compute: torch.dtype | None,
          timings: AppliedTimings) -> None:
    name = adapter_name(info)
    if name in state.adapters:
        state.adapters.move_to_end(name)
        return
    moment = time.perf_counter()
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    for logger in loggers:
        logger.addFilter(_expected_noise)
    try:
        with warnings.catch_warnings():
            # peft, from the second adapter of a model on: "Already found a `peft_config` attribute ...": we do.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.load_lora_weights(info.path, adapter_name=name)
    finally:
        for logger in loggers:
            logger.removeFilter(_expected_noise)
    bytes_by_component: dict[str, int] = {}
    for component, module in _loadable(pipe):
        size = 0
        for _, layer in _tuner_layers(module):
            if compute is not None:
                _unfp8_adapter(layer, name, compute)
            size += sum(_tensor_bytes(t) for _, _, item in _adapter_parts(layer, name) for t in _tensors_of(item))
        if size:
            bytes_by_component[component] = size
    state.adapters[name] = _Adapter(
        name=name, lora=info.name, sha256=info.sha256, components=tuple(bytes_by_component),
        bytes_by_component=bytes_by_component,
        text_encoder=any(c.startswith("text_encoder") for c in bytes_by_component),
    )
    timings.load_s += time.perf_counter() - moment
    timings.loaded += (info.name,)


_CHATTY_LOGGERS = ("transformers.integrations.peft", "diffusers.loaders.lora_base", "diffusers.loaders.peft")


def _expected_noise(record: logging.LogRecord) -> bool:
    """False (drop it) for two warnings every LoRA load logs that say nothing about the LoRA:
    - transformers' "LOAD REPORT" of a text-encoder adapter that lists MISSING keys only: transformers 5.23 lists
      every base weight and norm of the encoder as missing from the adapter (its `is_adapter_key` takes
      `base_layer` names for adapter keys), 40 lines per load. UNEXPECTED, MISMATCH or CONVERSION rows (LoRA
      weights that did not land) still show;
    - diffusers' "No LoRA keys associated to <component>" for a component the LoRA does not adapt (most Flux
      LoRAs leave CLIP alone): the library lists what each file adapts (LoraInfo.components)."""
    message = record.getMessage()
    if "LOAD REPORT" in message:
        return any(kind in message for kind in ("UNEXPECTED", "MISMATCH", "CONVERSION"))
    return "No LoRA keys associated to" not in message


def _unfp8_adapter(layer: Any, name: str, compute: torch.dtype) -> None:
    """An adapter peft cast to its base layer's fp8 storage dtype goes back to the compute dtype (see the module
    docstring): the layerwise-casting hook upcasts the base layer only, never the LoRA beside it."""
    for container, key, item in _adapter_parts(layer, name):
        if any(t.dtype in _FP8 for t in _tensors_of(item)):
            if isinstance(item, torch.nn.Module):
                item.to(dtype=compute)
            else:
                container[key] = torch.nn.Parameter(item.detach().to(compute), requires_grad=item.requires_grad)


def _fuse(pipe: Any, state: LoraState, names: list[str], timings: AppliedTimings) -> None:
    """Merge the active set into the weights, after a host copy of each layer it changes (kept across sets)."""
    moment = time.perf_counter()
    wanted = set(names)
    touched: set[tuple[str, str]] = set()
    components = []
    for component, module in _loadable(pipe):
        for layer_name, layer in _tuner_layers(module):
            if not any(_adapter_parts(layer, n) for n in wanted):
                continue
            key = (component, layer_name)
            touched.add(key)
            if key not in state.backups:
                base = layer.get_base_layer()
                bias = getattr(base, "bias", None)
                state.backups[key] = (base.weight.detach().to("cpu", copy=True),
                                      bias.detach().to("cpu", copy=True) if bias is not None else None)
            if component not in components:
                components.append(component)
    for key in set(state.backups) - touched:  # layers this set leaves alone are already the originals
        del state.backups[key]
    pipe.fuse_lora(components=components, lora_scale=1.0, adapter_names=names)
    timings.fuse_s += time.perf_counter() - moment


def _unfuse(pipe: Any, state: LoraState, timings: AppliedTimings) -> None:
    """Unmerge (peft's bookkeeping), then copy the originals back over what subtraction left."""
    moment = time.perf_counter()
    components = [name for name, _ in _loadable(pipe)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already unmerged")
        if components:
            pipe.unfuse_lora(components=components)
    _restore(pipe, state)
    timings.fuse_s += time.perf_counter() - moment


def _restore(pipe: Any, state: LoraState) -> None:
    modules = dict(_loadable(pipe))
    with torch.no_grad():
        for (component, layer_name), (weight, bias) in state.backups.items():
            layer = modules[component].get_submodule(layer_name)
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            base.weight.data.copy_(weight)
            if bias is not None:
                base.bias.data.copy_(bias)


def _unload_all(pipe: Any, state: LoraState, timings: AppliedTimings) -> None:
    moment = time.perf_counter()
    if state.adapters or any(_tuner_layers(module) for _, module in _loadable(pipe)):
        pipe.unload_lora_weights()
    timings.deleted += tuple(a.lora for a in state.adapters.values())
    state.adapters.clear()
    state.backups.clear()
    timings.set_s += time.perf_counter() - moment


def _evict(pipe: Any, state: LoraState, keep: set[str], max_adapters: int, max_bytes: int | None,
           timings: AppliedTimings) -> None:
    moment = time.perf_counter()
    victims = []
    count, size = len(state.adapters), state.adapter_bytes
    for name, adapter in state.adapters.items():  # least recently used first
        if count <= max_adapters and (max_bytes is None or size <= max_bytes):
            break
        if name in keep:
            continue
        victims.append(name)
        count, size = count - 1, size - adapter.bytes
    if victims:
        pipe.delete_adapters(victims)
        for name in victims:
            timings.deleted += (state.adapters.pop(name).lora,)
    timings.set_s += time.perf_counter() - moment


def _reset(pipe: Any, state: LoraState) -> None:
    """Back to the base model after a failure, as far as can be: restore fused weights, unload everything."""
    import contextlib

    if state.backups:
        with contextlib.suppress(Exception):
            _restore(pipe, state)
    with contextlib.suppress(Exception):
        pipe.unload_lora_weights()
        pipe._merged_adapters = set()  # diffusers' count of fused adapters (unfuse_lora keeps it otherwise)
    # Restored weights are the originals; unload_lora_weights merged nothing (peft unloads without merging).
    setattr(pipe, STATE_ATTRIBUTE, LoraState())
