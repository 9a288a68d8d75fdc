"""Render on the profile ladder: load, render, and on an out-of-memory error step to a rung that needs less.

A plain function over a pipeline cache and a render function, so the worker stays thin and the rules are
tested without Ray, Redis or a GPU (tests/actors/test_escalation.py). Imports torch only when it runs.

- An out-of-memory error while LOADING escalates like one while rendering (bitsandbytes quantizes on the
  card while it loads; a rung's load peak can be its largest).
- The failed rung's weights leave the card BEFORE the next rung loads: the pipeline and the exception (whose
  traceback frames hold the pipeline) are dropped, the rung is evicted, memory collected and the CUDA cache
  emptied, and only then does the next load start. Going from bf16 to fp8 must not hold 22 GiB of bf16
  weights while the fp8 ones arrive.
- A HOST memory failure (a pinned allocation: CUDA reports it as "CUDA error: out of memory", like a card)
  is not a VRAM problem: walking down the VRAM ladder would reach leaf offload, which pins even more. It
  steps to the fastest rung that fits the card with a smaller predicted host-memory peak.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from renderfarm.errors import DoesNotFit

log = logging.getLogger(__name__)

_OOM_MESSAGES = ("out of memory", "cublas_status_alloc_failed", "can't allocate memory")
# Frames in which torch pins host memory for diffusers' group offloading (pinned copies at setup, or per
# block with low_cpu_mem_usage) and torch's own pinning entry points.
PINNING_FRAMES = frozenset({"pin_memory", "_to_cpu", "_init_cpu_param_dict", "_pinned_memory_tensors",
                            "_onload_from_disk"})


class HostMemoryError(MemoryError):
    """Host memory ran out (a pinned allocation failed, or the machine's RAM): not the card's memory."""


def _chain(exc: BaseException):
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is an out-of-memory error: torch.OutOfMemoryError,
    a RuntimeError saying "CUDA out of memory" / "CUDA error: out of memory" / CUBLAS_STATUS_ALLOC_FAILED,
    the CPU allocator's "can't allocate memory", or a HostMemoryError."""
    import torch

    for current in _chain(exc):
        if isinstance(current, (torch.OutOfMemoryError, HostMemoryError)):
            return True
        if isinstance(current, RuntimeError) and any(m in str(current).lower() for m in _OOM_MESSAGES):
            return True
    return False


def is_host_out_of_memory(exc: BaseException) -> bool:
    """An out-of-memory error of host memory: a HostMemoryError, or one raised inside a pinning frame (torch
    reports a failed `cudaHostAlloc` as "CUDA error: out of memory", which reads like a card's)."""
    if not is_out_of_memory(exc):
        return False
    for current in _chain(exc):
        if isinstance(current, HostMemoryError):
            return True
        tb = current.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name in PINNING_FRAMES:
                return True
            tb = tb.tb_next
    return False


@dataclass
class Outcome:
    results: list[Any]
    profile: Any
    load_s: float = 0.0  # reading weights
    move_s: float = 0.0  # placing them on the device
    escalations: list[str] = field(default_factory=list)
    resident_bytes: int = 0  # weight bytes on the device when the render began


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def render_escalating(
    cache: Any,
    entry: Any,
    profile: Any,
    render: Callable[[Any], list[Any]],
    lower_for_vram: Callable[[Any], Any],
    lower_for_host: Callable[[Any], Any],
    resident_bytes: Callable[[Any], int] = lambda pipe: 0,
    host_room: Callable[[Any], Callable[[int], bool] | None] = lambda profile: None,
    on_step: Callable[[str, Any, bool], None] = lambda step, lower, host: None,
    where: str = "this node",
) -> Outcome:
    """Load `entry` under `profile` from `cache` and `render(pipe)`; on an out-of-memory error (loading or
    rendering) step to `lower_for_vram(profile)`, or `lower_for_host(profile)` when host memory ran out,
    until one succeeds. Raises DoesNotFit when there is nowhere lower to go, any other error as it is.
    `host_room(profile)` gives the cache its test of whether a rung's host memory fits beside the pipelines
    it holds. `on_step(text, lower, host)` hears of every step ("a -> b")."""
    outcome = Outcome(results=[], profile=profile)
    while True:
        lower = None
        host = False
        failure = ""
        try:
            pipe, load_s = cache.get(entry, profile, host_room=host_room(profile))
            info = getattr(pipe, "renderfarm_info", None)
            if load_s:  # loaded now: placing the weights on the device is its own stage
                move_s = getattr(info, "move_s", 0.0)
                outcome.move_s += move_s
                outcome.load_s += load_s - move_s
            outcome.resident_bytes = resident_bytes(pipe)
            outcome.results = render(pipe)
            outcome.profile = profile
            return outcome
        except Exception as exc:
            if not is_out_of_memory(exc) or profile is None:
                raise
            host = is_host_out_of_memory(exc)
            lower = lower_for_host(profile) if host else lower_for_vram(profile)
            failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if lower is None:
                kind = "host memory ran out" if host else "out of memory"
                raise DoesNotFit(
                    f"{kind} with {profile.name}, the most frugal profile of {entry.name} in "
                    f"{'host RAM' if host else 'VRAM'} on {where}"
                ) from exc
        # Outside the handler: the exception and its traceback (whose frames hold the pipeline) are gone.
        pipe = None
        step = f"{profile.name} -> {lower.name}" + (" (host memory)" if host else "")
        log.warning("%s: %s rendering %s: %s", where, failure, entry.name, step)
        outcome.escalations.append(step)
        on_step(step, lower, host)
        if lower.base_name != profile.base_name:
            cache.evict(entry.name, profile)  # free the failed rung before the next one loads
        release_memory()
        profile = lower
