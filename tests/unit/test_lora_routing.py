"""Routing by LoRAs, pure logic: which copy a job's LoRA is pinned to (loras/assets.py FarmLoras), which nodes
may take it (planning/fit.py NodeView.lacks, scheduler/placement.py), the preference for a node whose pipeline
already has the set applied, and the scheduler's model of each node's applied sets (scheduler/workers.py)."""

from __future__ import annotations

import pytest

from renderfarm.loras.assets import FarmLoras, ModelCopies, held
from renderfarm.planning.fit import CacheView, NodeView
from renderfarm.scheduler.placement import PendingJob, lora_switch_seconds, plan_dispatch
from renderfarm.scheduler.workers import CacheModel, applied_from_record

A, B, C = "a" * 64, "b" * 64, "c" * 64


def assets(**loras) -> dict:
    return {"loras": {name: {"family": fam, "sha256": sha, "mtime": mtime}
                      for name, (fam, sha, mtime) in loras.items()}}


def test_a_lora_is_pinned_to_the_newest_copy_or_the_one_asked_for():
    farm = FarmLoras({"n1": assets(style=("sd15", A, 100.0)), "n2": assets(style=("sd15", B, 200.0)),
                      "n3": {"loras": "garbage"}})
    assert farm.resolve("style", None, "sd15") == B
    assert farm.resolve("style", A, "sd15") == A
    assert farm.holders("style", A) == ["n1"] and sorted(farm.holders("style", None)) == ["n1", "n2"]
    with pytest.raises(ValueError, match=r"no node holds LoRA 'style' with sha256 cccccccccccc"):
        farm.resolve("style", C, "sd15")
    with pytest.raises(ValueError, match=r"LoRA 'style' is made for sd15 models, not flux"):
        farm.resolve("style", None, "flux")
    with pytest.raises(ValueError, match=r"no node of this farm holds LoRA 'hero' \(nodes hold: style\)"):
        farm.resolve("hero", None, "sd15")


def test_before_any_node_reported_names_pass_unchecked():
    farm = FarmLoras({"n1": {"version": "x"}})
    assert not farm.reported and farm.resolve("anything", None, "sd15") is None


def test_held_reads_a_nodes_published_table_and_ignores_garbage():
    assert held(assets(style=("sd15", A, 1.0))) == frozenset({("style", A)})
    assert held(None) == held({"loras": [1, 2]}) == held({"loras": {"x": {"sha256": 3}}}) == frozenset()


def job(i, loras=(), model="m"):
    key = (model, 64, 64, 4, 5.0, loras)
    return PendingJob(id=f"j{i}", model=model, batch_key=key, width=64, height=64, steps=4, loras=loras)


def node(name, loras=frozenset(), applied=None, loaded=("m",), backlog=0.0):
    return NodeView(name, None, frozenset(loaded), backlog, 1, loras=loras, applied=applied)


STYLE = (("style", A, 0.8),)


def test_a_job_never_goes_to_a_node_lacking_its_lora_or_holding_another_copy():
    nodes = [node("none"), node("stale", loras=frozenset({("style", B)})), node("holder", frozenset({("style", A)}),
                                                                              backlog=100.0)]
    plan = plan_dispatch([job(0, STYLE)], nodes, max_batch_images=4)
    assert [a.worker for a in plan.assignments] == ["holder"]  # despite its backlog
    plan = plan_dispatch([job(0, STYLE)], nodes[:2], max_batch_images=4)
    assert not plan.assignments
    reason = plan.unplaced["j0"]
    assert "no node holds its LoRAs" in reason and "none lacks LoRA 'style'" in reason
    assert "stale lacks LoRA 'style' (sha256 aaaaaaaaaaaa)" in reason
    # unpinned (submitted before any node reported): any node holding the name
    plan = plan_dispatch([job(0, (("style", None, 0.8),))], nodes[1:2], max_batch_images=4)
    assert [a.worker for a in plan.assignments] == ["stale"]


def test_the_node_with_the_set_applied_wins_and_jobs_of_one_set_batch_together():
    have = frozenset({("style", A)})
    nodes = [node("fresh", have), node("applied", have, applied={"m": STYLE})]
    plan = plan_dispatch([job(0, STYLE), job(1, STYLE), job(2)], nodes, max_batch_images=4)
    by_node = {a.worker: a for a in plan.assignments}
    assert by_node["applied"].job_ids == ("j0", "j1") and by_node["applied"].loras == STYLE
    assert by_node["fresh"].job_ids == ("j2",)  # the plain job: no switch on the node with nothing applied


def test_switching_costs_nothing_for_the_same_set_and_grows_with_the_change():
    other = (("hero", B, 1.0),)
    assert lora_switch_seconds(STYLE, STYLE) == 0.0
    assert 0 < lora_switch_seconds((), STYLE) < lora_switch_seconds(STYLE, other)
    assert lora_switch_seconds(STYLE, (("style", A, 0.5),)) > 0  # another weight is another set


def test_the_schedulers_model_of_applied_sets_replays_batches_not_yet_reported():
    cache = CacheModel(CacheView(), {"m": STYLE})
    cache.sent("ref1", "m", None, 0, ())
    cache.sent("ref2", "n", None, 0, STYLE)
    assert cache.applied == {"m": (), "n": STYLE}
    # the record catches up with ref1 only: ref2 is replayed on top of what it says
    cache.report(CacheView(), in_flight={"ref2"}, applied=applied_from_record({"applied_loras": {"m": []}}))
    assert cache.applied == {"m": (), "n": STYLE}
    assert applied_from_record({"applied_loras": {"m": [["style", A, 0.8]], "bad": [["x"]], 3: []}}) == {"m": STYLE}


def test_a_job_is_pinned_to_the_model_copy_most_nodes_hold_and_never_sent_to_another_copy():
    records = [{"name": "n1", "model_fingerprints": {"m": "aaa"}}, {"name": "n2", "model_fingerprints": {"m": "aaa"}},
               {"name": "old", "model_fingerprints": {"m": "bbb", "x": 3}}, {"name": "none"}]
    farm = ModelCopies(records)
    assert farm.pin("m") == "aaa" and farm.pin("m", "bbb") == "bbb"
    assert farm.pin("unknown-model") is None
    with pytest.raises(ValueError, match=r"no node holds m at fingerprint ccc \(nodes hold aaa \(2 nodes\), bbb"):
        farm.pin("m", "ccc")
    pinned = PendingJob(id="j0", model="m", batch_key=("m",), width=64, height=64, steps=4, fingerprint="aaa")
    old = NodeView("old", None, frozenset({"m"}), 0.0, 1, fingerprints={"m": "bbb"})
    unknown = NodeView("unknown", None, frozenset(), 50.0, 1)  # publishes no fingerprint: not known to differ
    plan = plan_dispatch([pinned], [old, unknown], max_batch_images=4)
    assert [a.worker for a in plan.assignments] == ["unknown"]
    plan = plan_dispatch([pinned], [old], max_batch_images=4)
    assert not plan.assignments and "old holds another copy of m (bbb, the job's is aaa)" in plan.unplaced["j0"]
