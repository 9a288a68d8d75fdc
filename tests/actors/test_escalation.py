"""Walking the profile ladder on out-of-memory errors (actors/escalation.py): pure logic over a fake cache
and fake renders, so no GPU is needed to show what happens when a card or the host runs out."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass

import pytest
import torch

from renderfarm.actors.escalation import (
    DoesNotFit,
    HostMemoryError,
    is_host_out_of_memory,
    is_out_of_memory,
    render_escalating,
)


@dataclass(frozen=True)
class Rung:
    name: str

    @property
    def base_name(self) -> str:
        return self.name


class Weights:
    """Stands in for a loaded pipeline: what must be gone before the next rung loads."""

    def __init__(self, rung: Rung):
        self.rung = rung


class Cache:
    def __init__(self, fail_load: set[str] = frozenset()):
        self.held: dict[str, Weights] = {}
        self.fail_load = fail_load
        self.loads: list[str] = []
        self.alive_at_load: list[list[str]] = []  # rungs whose weights were still alive when each load began
        self.refs: dict[str, weakref.ref] = {}

    def get(self, entry, rung, host_room=None):
        gc.collect()
        self.alive_at_load.append(sorted(n for n, ref in self.refs.items() if ref() is not None))
        self.loads.append(rung.name)
        if rung.name in self.fail_load:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (loading)")
        if rung.name not in self.held:
            weights = Weights(rung)
            self.held[rung.name] = weights
            self.refs[rung.name] = weakref.ref(weights)
            return weights, 1.0
        return self.held[rung.name], 0.0

    def evict(self, model, rung):
        self.held.pop(rung.name, None)


class Entry:
    name = "flux-dev"


LADDER = [Rung("bf16"), Rung("fp8"), Rung("nf4")]


def lower(rung):
    i = LADDER.index(rung)
    return LADDER[i + 1] if i + 1 < len(LADDER) else None


def test_an_out_of_memory_error_while_loading_steps_down_the_ladder():
    cache = Cache(fail_load={"bf16"})
    outcome = render_escalating(cache, Entry(), LADDER[0], render=lambda pipe: ["image"],
                                lower_for_vram=lower, lower_for_host=lambda r: None)
    assert outcome.profile.name == "fp8" and outcome.results == ["image"]
    assert outcome.escalations == ["bf16 -> fp8"]


def test_the_failed_rung_leaves_before_the_next_one_loads():
    cache = Cache()

    def render(pipe):
        if pipe.rung.name == "bf16":
            holder = pipe  # a frame of the traceback holds the pipeline, as render_batch's frames do
            raise torch.OutOfMemoryError(f"CUDA out of memory ({holder.rung.name})")
        return ["image"]

    steps = []
    outcome = render_escalating(cache, Entry(), LADDER[0], render=render, lower_for_vram=lower,
                                lower_for_host=lambda r: None, on_step=lambda s, low, host: steps.append(s))
    assert outcome.profile.name == "fp8"
    assert cache.loads == ["bf16", "fp8"]
    assert cache.alive_at_load == [[], []]  # bf16's weights were gone when fp8 began to load
    assert steps == ["bf16 -> fp8"]


def test_a_pinned_host_allocation_failure_takes_the_host_path_not_the_vram_ladder():
    cache = Cache()

    def _pinned_memory_tensors():  # named like diffusers' pinning frame: torch says "CUDA error"
        raise RuntimeError("CUDA error: out of memory")

    def render(pipe):
        if pipe.rung.name == "bf16":
            _pinned_memory_tensors()
        return ["image"]

    seen = []
    outcome = render_escalating(
        cache, Entry(), LADDER[0], render=render, lower_for_vram=lambda r: pytest.fail("took the VRAM ladder"),
        lower_for_host=lambda r: LADDER[2], on_step=lambda s, low, host: seen.append(host),
    )
    assert outcome.profile.name == "nf4" and seen == [True]
    assert outcome.escalations == ["bf16 -> nf4 (host memory)"]


def test_nowhere_lower_is_does_not_fit_and_other_errors_pass_through():
    cache = Cache(fail_load={"nf4"})
    with pytest.raises(DoesNotFit, match="out of memory with nf4, the most frugal profile"):
        render_escalating(cache, Entry(), LADDER[2], render=lambda p: [], lower_for_vram=lower,
                          lower_for_host=lambda r: None)
    with pytest.raises(ValueError, match="bad prompt"):
        render_escalating(Cache(), Entry(), LADDER[0], render=lambda p: (_ for _ in ()).throw(ValueError("bad prompt")),
                          lower_for_vram=lower, lower_for_host=lambda r: None)


def test_out_of_memory_is_told_apart_by_where_it_happened():
    def _to_cpu():
        raise RuntimeError("CUDA error: out of memory")

    try:
        _to_cpu()
    except RuntimeError as exc:
        pinned = exc
    card = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
    assert is_out_of_memory(pinned) and is_host_out_of_memory(pinned)
    assert is_out_of_memory(card) and not is_host_out_of_memory(card)
    assert is_host_out_of_memory(HostMemoryError("RAM"))
    assert not is_out_of_memory(ValueError("out of range"))


def test_the_cache_evicts_other_pipelines_until_the_new_rungs_host_memory_fits():
    """The pipeline cache's host footprint counts: a worker whose RAM holds one offloaded model at a time
    evicts the least recently used before loading the next (real stand-in pipelines on the CPU, where every
    weight is host memory)."""
    from renderfarm.actors.loading import pipeline_bytes
    from renderfarm.actors.pipelines import PipelineCache
    from renderfarm.planning.catalog import default_catalog

    catalog = default_catalog()
    cache = PipelineCache(max_pipelines=4)
    sd15, flux = catalog.get("tiny-sd15"), catalog.get("tiny-flux")
    first, _ = cache.get(sd15)
    held = pipeline_bytes(first, on="cpu")
    assert cache.host_bytes_loaded() == held > 0
    cache.get(flux, host_room=lambda others: others + held <= held * 1.5)  # room for about one
    assert cache.loaded() == ["tiny-flux"]
    cache.get(sd15, host_room=lambda others: True)
    assert cache.loaded() == ["tiny-flux", "tiny-sd15"]
