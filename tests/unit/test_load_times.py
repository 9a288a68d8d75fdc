"""Learned load times (issue 16, item 3): the load each node measured per (model, profile) feeds the finish
estimate as its measured speeds do; a node that never loaded the model borrows its kind's figure; only then
is the load predicted from the weight bytes. And a burst spreads across identical nodes when loading is cheap,
and stays on the node holding the model while that is faster. All pure: plan_dispatch over plain views."""

from __future__ import annotations

from collections import Counter

import pytest

from renderfarm.planning.fit import CachedPipeline, CacheView, NodeView, fit_on
from renderfarm.planning.measured import LOAD_RECORDS, Measurements
from renderfarm.scheduler.placement import LOAD_OVERHEAD_S, PendingJob, load_seconds, pick, plan_dispatch
from tests.unit.cards import RTX3070, RTX4090

MODEL = "tiny-sd15"  # a stand-in with component data: the planner predicts its profile and weights
SIZE, STEPS, BATCH = 64, 4, 8
PROFILE = fit_on(MODEL, SIZE, SIZE, 1, RTX3070).profile


def speed(node, load_s=None, profile=PROFILE, batch=1, s_per_step=0.02, updated=0.0, size=SIZE):
    record = {"s_per_step": s_per_step, "profile": profile, "updated": updated}
    if load_s is not None:
        record["load_s"] = load_s
    return (f"{node}|{MODEL}|{size}x{size}|{batch}", record)


def measured(*records):
    snapshot, bad = Measurements.from_records(speeds=records)
    assert bad == []
    return snapshot


def test_a_nodes_load_figure_is_the_median_of_its_recent_records_per_profile():
    records = [speed("a", load_s, batch=b, updated=b) for b, load_s in [(1, 0.2), (2, 0.3), (3, 9.0)]]
    m = measured(*records)
    assert m.load_seconds("a", MODEL, PROFILE) == pytest.approx(0.3)  # one slow (cold) load does not decide
    # The VAE mode is a switch on the loaded pipeline, not another load: it shares the figure.
    assert m.load_seconds("a", MODEL, f"{PROFILE}+vae-tiled") == pytest.approx(0.3)
    # Only the LOAD_RECORDS most recently updated records count: old figures age out.
    old = [speed("a", 50.0, batch=b, updated=b) for b in range(1, LOAD_RECORDS + 1)]
    new = [speed("a", 0.1, batch=b, updated=100 + b, size=128) for b in range(1, LOAD_RECORDS + 1)]
    assert measured(*old, *new).load_seconds("a", MODEL, PROFILE) == pytest.approx(0.1)
    # A record that measured no load (the model was loaded already) is no figure.
    assert measured(speed("b")).load_seconds("b", MODEL, PROFILE) is None


def test_loads_are_kept_per_profile_with_the_node_any_profile_figure_behind():
    m = measured(speed("a", 0.2, profile="fp8-offload", batch=1), speed("a", 4.0, profile="nf4-offload", batch=2))
    assert m.load_seconds("a", MODEL, "fp8-offload") == pytest.approx(0.2)
    assert m.load_seconds("a", MODEL, "nf4-offload") == pytest.approx(4.0)
    assert m.load_seconds("a", MODEL, "bf16") == pytest.approx(2.1)  # never under bf16: the node's median
    assert m.load_seconds("a", "other") is None


def test_the_estimate_falls_back_from_the_node_to_its_kind_to_the_weights():
    """a and b are the same card; c is another. a measured a load; b borrows a's figure; c has none of its kind,
    so its load is predicted from the profile's weights, which for a tiny model is well under a second."""
    job = PendingJob("j", MODEL, (MODEL,), 1, SIZE, SIZE, STEPS).shape
    m = measured(speed("a", 0.05), speed("b"), speed("c"))
    a, b, c = NodeView("a", RTX3070), NodeView("b", RTX3070), NodeView("c", RTX4090)
    nodes = [a, b, c]
    assert pick(job, [a], measured=m).load_s == pytest.approx(0.05)
    assert pick(job, nodes, measured=m).node in {"a", "b"}
    by_node = {n.name: pick(job, [n], measured=m, kinds={"a": ("a", "b"), "b": ("a", "b"), "c": ("c",)})
               for n in nodes}
    assert by_node["b"].load_s == pytest.approx(0.05)  # its kind's figure
    fit = fit_on(MODEL, SIZE, SIZE, 1, RTX4090)
    assert by_node["c"].load_s == pytest.approx(load_seconds(fit, RTX4090))  # predicted from the bytes
    assert load_seconds(fit, RTX4090) < LOAD_OVERHEAD_S + 0.01  # a few MB of weights: the fixed part is all
    # pick works the kinds out itself from the nodes it is given (a busy a still lends b its figure).
    busy_a = NodeView("a", RTX3070, backlog_s=1000.0)
    assert pick(job, [busy_a, b], measured=m).node == "b"
    assert pick(job, [busy_a, b], measured=m).load_s == pytest.approx(0.05)


def _burst(n=64):
    return [PendingJob(f"j{i:02}", MODEL, (MODEL, SIZE, SIZE, STEPS), 1, SIZE, SIZE, STEPS) for i in range(n)]


def _two_identical_nodes():
    """Two idle nodes with the same card, two free slots each; only `warm` holds the model."""
    warm_cache = CacheView(entries=(CachedPipeline(MODEL, PROFILE, 5_000_000),))
    warm = NodeView("warm", RTX3070, warm_cache.models, 0.0, 2, cache=warm_cache)
    cold = NodeView("cold", RTX3070, frozenset(), 0.0, 2, cache=CacheView())
    return [warm, cold]


def _batch_speed(node, **kw):
    return speed(node, batch=BATCH, s_per_step=0.03, **kw)  # a batch of 8 runs in 4 x 0.03 s


def test_a_burst_spreads_across_identical_nodes_when_loading_is_cheap():
    """The issue's case: the warm node measured its load of the model small (cold never loaded it). With the
    old fixed 3 s load, all 8 batches (0.12 s each) went to the warm node and the cold one sat idle."""
    m = measured(_batch_speed("warm", load_s=0.15), _batch_speed("cold"))
    plan = plan_dispatch(_burst(), _two_identical_nodes(), BATCH, measured=m)
    sent = Counter(a.worker for a in plan.assignments)
    assert sent == {"warm": 2, "cold": 2}  # both nodes' slots filled in this very round
    alone = plan_dispatch(_burst(), _two_identical_nodes()[:1], BATCH, measured=m)
    run = min(e.finish_s for e in alone.etas.values())  # one batch on the warm node
    ends = {node: max(e.finish_s for e in plan.etas.values() if e.node == node) for node in ("warm", "cold")}
    assert max(ends.values()) < max(e.finish_s for e in alone.etas.values()) - 2 * run  # sooner than alone
    assert abs(ends["warm"] - ends["cold"]) <= run  # both nodes end within a batch of each other
    # The cold node's first batch pays the load once; its later ones find the model in its cache.
    cold = sorted((e.start_s, e.finish_s) for e in plan.etas.values() if e.node == "cold")
    assert cold[0][0] == pytest.approx(0.15)
    assert all(later[0] == pytest.approx(earlier[1]) for earlier, later in zip(cold[::BATCH], cold[BATCH::BATCH]))


def test_a_long_measured_load_keeps_a_burst_on_the_node_holding_the_model_while_that_is_faster():
    m = measured(_batch_speed("warm", load_s=30.0), _batch_speed("cold"))
    nodes = _two_identical_nodes()
    plan = plan_dispatch(_burst(), nodes, BATCH, measured=m)
    assert {a.worker for a in plan.assignments} == {"warm"}
    assert {eta.node for eta in plan.etas.values()} == {"warm"}  # 8 batches of 0.12 s beat a 30 s load
    # A queue long enough that waiting for the warm node costs more than the load: then the cold node loads.
    long = plan_dispatch(_burst(4000), nodes, BATCH, measured=m)
    on_cold = [e for e in long.etas.values() if e.node == "cold"]
    assert on_cold and min(e.start_s for e in on_cold) == pytest.approx(30.0)
    backlog_when_cold_started = max(e.finish_s for e in long.etas.values()
                                    if e.node == "warm" and e.position < min(c.position for c in on_cold))
    assert backlog_when_cold_started >= 30.0 - 1.0  # the warm node was no faster by then (within a tie)
