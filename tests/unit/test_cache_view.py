"""The scheduler's model of a worker's pipeline cache (planning/fit.py CacheView, scheduler/workers.py
CacheModel) against the real PipelineCache (actors/pipelines.py), and what the planner does with it.

The comparison drives the real cache with a fake loader (pipelines of known sizes: the LRU logic is what is
compared, not diffusers) and the model with the same loads, and asserts the same contents after each one."""

from __future__ import annotations

import random
import time
from types import SimpleNamespace

import pytest
import torch

from renderfarm.actors import pipelines
from renderfarm.actors.pipelines import DEFAULT_MAX_PIPELINES, PipelineCache
from renderfarm.config import Settings
from renderfarm.planning import fit as planning_fit
from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.fit import ANY_PROFILE, CachedPipeline, CacheView, NodeView, base_profile
from renderfarm.planning.profiles import VaeMode, ladder
from renderfarm.scheduler.managers import MembershipManager, SchedulerState
from renderfarm.scheduler.placement import PendingJob, plan_dispatch
from renderfarm.scheduler.workers import WorkerTable, cache_from_record, worker_from_info
from tests.unit.cards import QUADRO

MODELS = ["tiny-sd15", "tiny-sdxl", "tiny-flux"]


class _FakePipe:
    def __init__(self, parameters: int):
        self.components = {"unet": torch.nn.Linear(parameters, 1, bias=False)}  # 4 bytes a parameter


def _contents(view: CacheView) -> list[tuple[str, str | None, int]]:
    return [(e.model, e.profile, e.bytes) for e in view.entries]


def _described(cache: PipelineCache) -> list[tuple[str, str | None, int]]:
    return [(e["model"], e["profile"], e["bytes"]) for e in cache.describe()["entries"]]


def _loads():
    """(entry, profile or None, parameters of its fake pipeline) for each model under a few of its profiles."""
    catalog = default_catalog()
    rng = random.Random(0)
    out = []
    for name in MODELS:
        entry = catalog.get(name)
        for profile in [None, *ladder(entry, QUADRO)[:2]]:
            out.append((entry, profile, rng.randrange(200, 3000)))
    return out


@pytest.mark.parametrize("max_pipelines,max_bytes", [(2, None), (3, None), (4, 12_000), (2, 9_000), (5, 2_000)])
def test_the_model_evicts_as_the_pipeline_cache_does(max_pipelines, max_bytes, monkeypatch):
    """Count cap, byte cap (sizes known from an earlier load or predicted), a pipeline larger than the whole
    budget kept alone, a VAE mode that reuses the loaded pipeline: the model agrees with the real cache
    after every load, and says beforehand whether the load happens."""
    # Each eviction runs a full garbage collection (freeing a real pipeline's memory); fake pipelines need
    # none, and 300 of them in a process that imported torch and diffusers take minutes.
    monkeypatch.setattr(pipelines, "gc", SimpleNamespace(collect=lambda: 0))
    options = _loads()
    sizes = {(e.name, p.base_name if p else None): n * 4 for e, p, n in options}
    real = PipelineCache(max_pipelines=max_pipelines, max_bytes=max_bytes,
                         loader=lambda entry, chosen=None: _FakePipe(sizes[(entry.name, chosen.base_name
                                                                                 if chosen else None)] // 4))
    model = CacheView(max_pipelines, max_bytes)
    rng = random.Random(max_pipelines * 7 + (max_bytes or 0))
    evictions = reloads = 0
    for step in range(300):
        entry, profile, _ = rng.choice(options)
        if profile is not None and rng.random() < 0.3:
            profile = profile.with_vae(VaeMode.TILED)  # a switch on the loaded pipeline, not another one
        key = (entry.name, profile.base_name if profile else None)
        # The scheduler predicts the size of a pipeline the worker never loaded; one it loaded before is
        # known from the record, and a wrong prediction (1 byte) must not matter then.
        known = model.size_of(*key) is not None
        predicted = 1 if known else sizes[key]
        expect_load = not model.holds(entry.name, profile.name if profile else None)
        before = len(real.loaded())
        _, load_s = real.get(entry, profile)
        assert (load_s > 0) == expect_load, f"step {step}: the model said load={expect_load}"
        model = model.load(entry.name, profile.name if profile else None, predicted)
        assert _contents(model) == _described(real), f"step {step}: after loading {key}"
        evictions += before + expect_load > len(real.loaded())
        reloads += expect_load and known
        if step % 25 == 0:  # a node record arrives: the model restarts from what the worker published
            model = cache_from_record({"cache": real.describe(), "loaded": real.loaded()})
            assert _contents(model) == _described(real) and model.max_pipelines == max_pipelines
            assert model.max_bytes == max_bytes
    assert evictions > 20 and reloads > 20  # the sequences did exercise eviction and reloading


def test_defaults_and_profile_names_agree_with_the_worker_side():
    assert planning_fit.DEFAULT_MAX_PIPELINES == DEFAULT_MAX_PIPELINES
    assert CacheView().max_pipelines == PipelineCache().max_pipelines
    for name in ["sdxl", "flux-dev", "tiny-sd15"]:
        entry = default_catalog().get(name)
        for profile in ladder(entry, QUADRO):
            for mode in VaeMode:
                assert base_profile(profile.with_vae(mode).name) == profile.base_name
    assert base_profile("") is None and base_profile(None) is None


def test_a_record_without_a_cache_field_or_with_a_broken_one_falls_back_to_its_model_names():
    legacy = cache_from_record({"loaded": ["a", "b", 3]})
    assert _contents(legacy) == [("a", ANY_PROFILE, 0), ("b", ANY_PROFILE, 0)]
    assert legacy.max_pipelines == DEFAULT_MAX_PIPELINES
    assert legacy.holds("a", "bf16-anything") and legacy.holds("a")  # unknown profile: the model under any
    assert not CacheView(entries=(CachedPipeline("a", None),)).holds("a", "bf16")  # none is not any
    broken = cache_from_record({"name": "n1", "loaded": ["a"], "cache": {"max_pipelines": "two", "entries": []}})
    assert _contents(broken) == [("a", ANY_PROFILE, 0)]
    bad_entry = {"max_pipelines": 2, "max_bytes": None, "entries": [{"model": "a", "bytes": -1}], "sizes": []}
    assert _contents(cache_from_record({"loaded": ["a"], "cache": bad_entry})) == [("a", ANY_PROFILE, 0)]
    with pytest.raises(ValueError, match="max_pipelines=0"):
        CacheView(0)
    with pytest.raises(ValueError, match="max_bytes=0"):
        CacheView(2, 0)


def test_the_scheduler_replays_the_batches_a_record_does_not_show_yet():
    """Sent x then y to a worker whose cache holds [a, b] (count cap 2): both a and b are evicted. A record
    written before either batch ran must not bring them back while the batches are in flight; one written
    after the first ran still holds the second's eviction; once both returned, the record is the truth."""
    reported = {"cache": {"max_pipelines": 2, "max_bytes": None, "sizes": [],
                          "entries": [{"model": "a", "profile": None, "bytes": 10},
                                      {"model": "b", "profile": None, "bytes": 10}]}}
    table = WorkerTable({"n1": worker_from_info("n1", None, {"vram_gib": 8, **reported})})
    worker = table["n1"]
    assert worker.loaded == {"a", "b"}
    table.add_loaded(worker, "x", None, 10, ref="r1")
    table.add_loaded(worker, "y", None, 10, ref="r2")
    assert worker.loaded == {"x", "y"}
    table.report_cache(worker, reported, in_flight={"r1", "r2"})  # written before either ran
    assert worker.loaded == {"x", "y"}
    after_x = {"cache": {**reported["cache"], "entries": [{"model": "b", "profile": None, "bytes": 10},
                                                          {"model": "x", "profile": None, "bytes": 10}]}}
    table.report_cache(worker, after_x, in_flight={"r1", "r2"})  # x ran (it replays as a hit), y has not
    assert [e.model for e in worker.cache.view.entries] == ["x", "y"]
    table.report_cache(worker, after_x, in_flight=set())  # both returned: what the worker says is the truth
    assert [e.model for e in worker.cache.view.entries] == ["b", "x"]
    assert table.stats(time.time())["n1"]["loaded"] == ["b", "x"]


def test_membership_reads_the_cache_from_each_node_record(tmp_path):
    cache = {"max_pipelines": 3, "max_bytes": 2**30, "sizes": [],
             "entries": [{"model": "tiny-sd15", "profile": "bf16", "bytes": 5_000_000}]}

    class Records:
        def nodes(self):
            return [{"name": "n1", "heartbeat": time.time(), "state": "idle", "vram_gib": 8, "loaded": ["tiny-sd15"],
                     "cache": cache}]

    table = WorkerTable({"n1": worker_from_info("n1", None, {"vram_gib": 8})})
    state = SchedulerState(Settings(data_dir=tmp_path), Records(), table, {})  # type: ignore[arg-type]
    MembershipManager(state, None).update()  # type: ignore[arg-type]
    view = table["n1"].cache.view
    assert view.max_pipelines == 3 and view.max_bytes == 2**30
    assert _contents(view) == [("tiny-sd15", "bf16", 5_000_000)]


def _job(i, model, steps=4):
    return PendingJob(f"{model}-{i}", model, (model, 64, 64, steps), 1, 64, 64, steps)


def test_a_batch_that_an_earlier_batch_evicts_is_charged_its_reload():
    """A node holding [x, y] with room for two: z is planned first and evicts x, so the x batch behind it pays
    a load; when the planner does not model the cache (no CacheView) it would not."""
    cache = CacheView(2, None, (CachedPipeline("x"), CachedPipeline("y")))
    modelled = NodeView("n", None, cache.models, 0.0, 2, cache=cache)
    unmodelled = NodeView("n", None, frozenset({"x", "y"}), 0.0, 2)
    pending = [_job(0, "z"), _job(1, "x")]
    with_cache = plan_dispatch(pending, [modelled], 1)
    without = plan_dispatch(pending, [unmodelled], 1)
    z_finish = with_cache.etas["z-0"].finish_s
    assert with_cache.etas["z-0"].start_s > 0  # z itself is a load
    assert with_cache.etas["x-1"].start_s > z_finish  # x reloads after z evicted it
    assert without.etas["x-1"].start_s == pytest.approx(without.etas["z-0"].finish_s)
    # A cache with room for three evicts nothing: x is still there.
    roomy = NodeView("n", None, cache.models, 0.0, 2, cache=CacheView(3, None, cache.entries))
    roomy_plan = plan_dispatch(pending, [roomy], 1)
    assert roomy_plan.etas["x-1"].start_s == pytest.approx(roomy_plan.etas["z-0"].finish_s)
