"""What LoRAs cost a profile (issue 17): the mode a node applies them in, the memory they take and what they add
to a step and to a switch. Pure planning: `renderfarm plan --lora`, the worker (actors/lora_apply.py) and the
scheduler's switch estimate read it.

Two modes, chosen per node like every other profile decision (`choose_mode`):
- "fused": the set merged into the weights (diffusers' fuse_lora). Steps cost what the base model's cost; a
  switch costs an unfuse and a fuse of every adapted layer; the worker keeps a host copy of the adapted
  layers' originals to restore them exactly (actors/lora_apply.py). Only into plain float weights.
- "unmerged": PEFT adapters beside the weights (Forge's "fp16 LoRA"): works on every weights format (fp8,
  nf4, GGUF are never patched); each active adapter costs every step two thin matmuls per adapted layer and
  holds its weights on the device.

The cost model (`lora_cost`), per LoRA of rank r on a denoiser of width w (its hidden size, catalog.py): an
adapted w x w layer costs w^2 multiply-adds, its adapter 2rw, so an unmerged LoRA adds 2r/w of the adapted
layers' work, counted as 2r/w of the step (the layers LoRAs adapt, attention and MLP projections, are most
of it) plus a fixed UNMERGED_STEP_OVERHEAD for its extra kernel launches. Its weights sit on the device in the
compute dtype: the file's size when stored in 16 bits. A fused set holds nothing extra on the device but a host
backup of the layers it changed: a rank-r adapter of a w x w layer stores 2rw numbers against the layer's w^2,
so about the LoRA's size x w / (2r). These are first estimates; the worker measures every switch (lora_s in
the job's timings) and the stand-in bench (bench/lora_cost.py) shows the shapes on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from renderfarm.planning.catalog import ModelEntry, Role
from renderfarm.planning.profiles import Placement, Profile, component_formats

Mode = Literal["unmerged", "fused"]
MODES: tuple[str, ...] = ("unmerged", "fused")
UNMERGED_STEP_OVERHEAD = 0.02  # per active unmerged LoRA: its layers' extra launches, beyond the FLOPs
DISK_GBPS = 1.0  # reading a LoRA file (a local SSD or a fast share); the planner's guess until measured
FUSE_GBPS = 10.0  # bytes of adapted weights patched (or restored) per second by a fuse pass on the device


def fuse_refusal(profile: Profile | None, entry: ModelEntry | None = None,
                 lora_set: Sequence[tuple[Any, float]] = ()) -> str | None:
    """Why a LoRA set cannot be fused into `profile`'s weights, or None when it can.

    Fusing needs plain float weights (bf16, fp16, fp32) in every component the set adapts: 4-bit (nf4, fp4,
    GGUF) and fp8 storage would round the delta away. With `entry` the components' formats are exact
    (`component_formats`: a T5 in nf4 under a bf16 transformer refuses only a set that adapts T5); without it,
    the denoiser's format and `text_encoder_weights` both count. Streamed and disk placements refuse too:
    group offload streams each block from its own host copy (pinned, or files on disk), which a fuse on the
    device would not reach. Without a profile (a pipeline loaded at one float dtype) nothing refuses."""
    if profile is None:
        return None
    if profile.placement.streams or profile.placement is Placement.DISK_OFFLOAD:
        return (f"profile {profile.name!r} streams the denoiser from its own host copy ({profile.placement.value}): "
                "a fused LoRA would not reach it")
    if entry is not None:
        formats = component_formats(entry, profile)
        adapted = {c for info, _ in lora_set for c in info.components}
        if adapted:
            formats = {name: fmt for name, fmt in formats.items() if name in adapted}
        else:
            vae = {c.name for c in entry.components.values() if c.role is Role.VAE}
            formats = {name: fmt for name, fmt in formats.items() if name not in vae}
    else:
        formats = {"the denoiser": profile.weights}
        if profile.text_encoder_weights is not None:
            formats["a text encoder"] = profile.text_encoder_weights
    for component, fmt in formats.items():
        if not fmt.is_float:
            kind = "fp8 storage" if fmt.is_fp8 else "4-bit weights" if fmt.is_bnb else "GGUF weights"
            return (f"{component} is stored as {fmt.value} under profile {profile.name!r}: fusing into {kind} would "
                    "round the LoRA's delta into the quantization grid (most of it lost)")
    return None


def choose_mode(profile: Profile | None, prefer: str | None = None, *, entry: ModelEntry | None = None,
                lora_set: Sequence[tuple[Any, float]] = ()) -> Mode:
    """The mode for `profile`: "fused" where the weights are plain floats (the steps cost what the base
    model's cost), "unmerged" elsewhere (never fused into 4-bit, GGUF or fp8 weights, see `fuse_refusal`).
    `prefer="unmerged"` overrides the default (a node that switches sets often); `prefer="fused"` or None
    takes fused wherever it is allowed and never elsewhere."""
    if prefer not in (None, "auto", *MODES):
        raise ValueError(f"unknown LoRA mode {prefer!r}; known: auto, {', '.join(MODES)}")
    if prefer == "unmerged":
        return "unmerged"
    return "unmerged" if fuse_refusal(profile, entry, lora_set) else "fused"


@dataclass(frozen=True)
class LoraCost:
    """What a LoRA set costs `profile`: its mode, the device and host memory it adds, the step time factor
    and the seconds a switch to it costs (reading the files and, fused, patching the weights)."""

    mode: Mode
    device_gib: float  # adapters on the device (unmerged)
    host_gib: float  # the originals of the adapted layers kept to restore them (fused)
    step_factor: float  # a step's time with the set over the base model's
    switch_s: float  # loading the set from disk, plus the fuse when fused
    reason: str  # why this mode

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "device_gib": round(self.device_gib, 3), "host_gib": round(self.host_gib, 3),
                "step_factor": round(self.step_factor, 3), "switch_s": round(self.switch_s, 3), "reason": self.reason}


def lora_cost(entry: ModelEntry, profile: Profile | None, lora_set: Sequence[tuple[Any, float]],
              prefer: str | None = None) -> LoraCost:
    """The cost of applying `lora_set` ((LoraInfo-like with size_bytes, rank, components; weight) pairs) to
    `entry` under `profile`, in the mode `choose_mode` picks (see the module docstring for the model)."""
    mode = choose_mode(profile, prefer, entry=entry, lora_set=lora_set)
    refusal = fuse_refusal(profile, entry, lora_set)
    reason = (f"fused into {profile.weights.value if profile else 'the loaded'} weights: steps cost the base "
              "model's") if mode == "fused" else f"unmerged adapters: {refusal or 'asked for'}"
    active = [(info, w) for info, w in lora_set if w != 0]
    denoiser = next((c for c in entry.components.values() if c.role is Role.DENOISER), None)
    width = denoiser.width if denoiser is not None else 1024
    size = sum(int(info.size_bytes) for info, _ in active)
    read_s = size / (DISK_GBPS * 1e9)
    if mode == "fused":
        backup = sum(int(info.size_bytes) * width / (2 * max(1, int(info.rank))) for info, _ in active)
        return LoraCost(mode, 0.0, backup / 2**30, 1.0, read_s + 2 * backup / (FUSE_GBPS * 1e9), reason)
    factor = 1.0 + sum(2 * int(info.rank) / width + UNMERGED_STEP_OVERHEAD for info, _ in active)
    return LoraCost(mode, size / 2**30, 0.0, factor, read_s, reason)
