"""Node overrides (a nodes file): VRAM kept free, models forbidden on a node, a cap on its batch; and how
a node plan merges them into the local GPUs."""

from __future__ import annotations

import pytest

import renderfarm.cluster.gpus as gpus
from renderfarm.config import ConfigError, NodeDeclaration, Settings, load_nodes
from renderfarm.farm import FarmError, card_labels, node_plan
from renderfarm.planning.fit import JobShape, NodeView, why_nothing_fits
from renderfarm.scheduler.placement import PendingJob, pick, plan_dispatch


def job(i, model="m", images=1):
    return PendingJob(id=f"j{i}", model=model, batch_key=(model, 64, 64, 4, 5.0), num_images=images,
                      width=64, height=64, steps=4)


def test_a_forbidden_model_never_goes_to_that_node():
    nodes = [NodeView("a", None, slots=2, forbidden=frozenset({"m"})), NodeView("b", None, slots=2, backlog_s=500)]
    plan = plan_dispatch([job(i) for i in range(4)] + [job(9, model="other")], nodes, max_batch_images=8)
    sent = {j: a.worker for a in plan.assignments for j in a.job_ids}
    assert {sent[f"j{i}"] for i in range(4)} == {"b"}, "even though b is far busier"
    assert sent["j9"] == "a"
    shape = JobShape("m", 64, 64, 4, 1)
    assert pick(shape, nodes[:1]) is None
    assert why_nothing_fits(shape, nodes[:1]) == \
        f"{shape.describe()}: no node takes m (m is forbidden on a (its node override))"


def test_a_model_a_node_cannot_load_never_goes_there_and_the_reason_says_why():
    """A node's record says which models it cannot load (its weights are not there): the scheduler sends
    them elsewhere, whatever the backlogs, and says why when no node can."""
    lacking = NodeView("a", None, slots=2, unloadable={"m": "weights not found on this node: /models/m"})
    nodes = [lacking, NodeView("b", None, slots=2, backlog_s=500)]
    plan = plan_dispatch([job(i) for i in range(3)] + [job(9, model="other")], nodes, max_batch_images=8)
    sent = {j: a.worker for a in plan.assignments for j in a.job_ids}
    assert {sent[f"j{i}"] for i in range(3)} == {"b"} and sent["j9"] == "a"
    # When no node can load it, it goes where it may run anyway: that node's load fails it as the job's fault
    # (a queued job for weights nobody has fails once, and no node is charged: tests/chaos).
    plan = plan_dispatch([job(0)], [lacking, NodeView("c", None, slots=1, forbidden=frozenset({"m"}))],
                         max_batch_images=8)
    assert [a.worker for a in plan.assignments] == ["a"]
    shape = JobShape("m", 64, 64, 4, 1)
    assert why_nothing_fits(shape, [lacking]) is None
    assert why_nothing_fits(shape, [NodeView("c", None, forbidden=frozenset({"m"}))]) == \
        f"{shape.describe()}: no node takes m (m is forbidden on c (its node override))"


def test_a_node_batch_cap_limits_coalescing_there_only():
    pending = [job(i) for i in range(6)]
    capped = plan_dispatch(pending, [NodeView("a", None, slots=1, max_batch=2)], max_batch_images=8)
    assert [len(a.job_ids) for a in capped.assignments] == [2]
    free = plan_dispatch(pending, [NodeView("a", None, slots=1)], max_batch_images=8)
    assert [len(a.job_ids) for a in free.assignments] == [6]


def test_declarations_validate_overrides(tmp_path):
    assert NodeDeclaration(name="n", vram_gib=8, reserve_gib=1.5).reserve_gib == 1.5
    with pytest.raises(ValueError, match="reserve_gib=8 leaves nothing of vram_gib=8"):
        NodeDeclaration(name="n", vram_gib=8, reserve_gib=8)
    with pytest.raises(ValueError, match="max_batch"):
        NodeDeclaration(name="n", vram_gib=8, max_batch=0)
    path = tmp_path / "nodes.yaml"
    path.write_text("nodes:\n  - {name: n, vram_gib: 8, forbid_models: [flux-dev], colour: red}\n")
    with pytest.raises(ConfigError, match=r"nodes\[0\]: colour: Extra inputs are not permitted"):
        load_nodes(path)


def test_node_plan_gives_local_gpus_the_overrides_of_their_entry(monkeypatch):
    monkeypatch.setattr(gpus, "gpu_count", lambda: 2)
    monkeypatch.setattr("socket.gethostname", lambda: "render07.studio")
    overrides = [NodeDeclaration(name="render07-gpu1", reserve_gib=2, forbid_models=("flux-dev",), max_batch=2)]
    plan = node_plan(overrides, Settings())
    assert [n["name"] for n in plan] == ["render07-gpu0", "render07-gpu1"]
    assert plan[0] == {"name": "render07-gpu0", "simulated": False, "gpu_index": 0}
    assert plan[1]["reserve_gib"] == 2 and plan[1]["forbid_models"] == ["flux-dev"] and plan[1]["max_batch"] == 2


def test_node_plan_on_a_cpu_machine_needs_declared_cards(monkeypatch):
    monkeypatch.setattr(gpus, "gpu_count", lambda: 0)
    with pytest.raises(FarmError, match="node x: a simulated node needs vram_gib"):
        node_plan([NodeDeclaration(name="x")], Settings())
    plan = node_plan([NodeDeclaration(name="x", vram_gib=8, gpu="GeForce RTX 3070")], Settings())
    assert plan[0]["simulated"] is True and plan[0]["vram_gib"] == 8
    assert card_labels(plan) == {"renderfarm.io/workers": "1", "renderfarm.io/gpu": "GeForce-RTX-3070",
                                 "renderfarm.io/vram-gib": "8", "renderfarm.io/cc": "8.6"}


def test_no_gpu_and_no_nodes_file_says_it_simulates(monkeypatch, caplog):
    """`up` on a machine without a GPU and without --nodes simulates the example nodes: it says so."""
    monkeypatch.setattr(gpus, "gpu_count", lambda: 0)
    with caplog.at_level("WARNING", logger="renderfarm.farm"):
        plan = node_plan(None, Settings())
    assert plan and all(n["simulated"] for n in plan)
    [record] = [r for r in caplog.records if "no GPU found" in r.getMessage()]
    assert "--nodes" in record.getMessage() and all(n["name"] in record.getMessage() for n in plan)
    caplog.clear()
    with caplog.at_level("WARNING", logger="renderfarm.farm"):
        node_plan([NodeDeclaration(name="x", vram_gib=8)], Settings())  # declared: nothing to say
    assert not [r for r in caplog.records if "no GPU found" in r.getMessage()]
