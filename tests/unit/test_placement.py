import random
import re

import pytest

from renderfarm.planning.devices import Device
from renderfarm.planning.fit import JobShape, NodeView, fit_on, largest_batch, why_nothing_fits
from renderfarm.planning.measured import Measurements
from renderfarm.scheduler.placement import Decision, NodeIndex, PendingJob, best_of, filter_nodes, pick, plan_dispatch
from tests.unit.cards import QUADRO, RTX3070, RTX4090


def job(i, model="m", size=64, images=1, steps=4):
    """A job of a model without component data (the test catalog's "m"): fit cannot be judged, so only the
    backlog, loads and measurements decide."""
    return PendingJob(id=f"j{i}", model=model, batch_key=(model, size, size, steps, 5.0), num_images=images,
                      width=size, height=size, steps=steps)


def free(name, device=None, slots=1, loaded=(), backlog=0.0):
    return NodeView(name, device, frozenset(loaded), backlog, slots)


def test_coalesces_compatible_jobs_up_to_the_batch_limit_in_queue_order():
    pending = [job(0), job(1, size=128), job(2), job(3), job(4)]
    plan = plan_dispatch(pending, [free("w", slots=1)], max_batch_images=3)
    assert [a.job_ids for a in plan.assignments] == [("j0", "j2", "j3")]


def test_counts_images_not_jobs_and_skips_what_would_overflow():
    pending = [job(0, images=2), job(1, images=2), job(2, images=1)]
    plan = plan_dispatch(pending, [free("w")], max_batch_images=3)
    assert plan.assignments[0].job_ids == ("j0", "j2")


def test_one_batch_per_free_slot_and_no_job_twice():
    pending = [job(i, model="a" if i % 2 else "b") for i in range(10)]
    nodes = [free("w1", loaded={"a"}), free("w2")]
    plan = plan_dispatch(pending, nodes, max_batch_images=2)
    assert len(plan.assignments) == 2
    ids = [j for a in plan.assignments for j in a.job_ids]
    assert len(ids) == len(set(ids)) == 4
    assert {a.model for a in plan.assignments} == {"a", "b"}  # "b" took w1, so "a" finishes first on w2


def test_rejects_nonsense_batch_limit():
    with pytest.raises(ValueError, match="max_batch_images"):
        plan_dispatch([job(0)], [free("w")], 0)


def test_every_queued_job_gets_a_position_and_an_eta_that_grows_down_the_queue():
    pending = [job(i, size=64 * (1 + i % 3)) for i in range(9)]
    plan = plan_dispatch(pending, [free("w", slots=1)], max_batch_images=2)
    assert set(plan.etas) == {p.id for p in pending}
    order = sorted(plan.etas.values(), key=lambda e: e.position)
    assert [e.position for e in order] == list(range(9))
    assert all(a.finish_s <= b.finish_s for a, b in zip(order, order[1:]))
    assert all(e.start_s <= e.finish_s for e in order)
    # A round that only dispatches stops once no slot is left.
    assert len(plan_dispatch(pending, [free("w", slots=1)], 2, full=False).etas) < 9


def test_a_job_waits_for_a_much_faster_busy_node_rather_than_take_a_slow_idle_one():
    speeds = Measurements.from_records(speeds=[
        ("fast|m|64x64|1", {"s_per_step": 0.1}), ("slow|m|64x64|1", {"s_per_step": 10.0}),
    ])[0]
    fast, slow = free("fast", slots=0, loaded={"m"}, backlog=5.0), free("slow", slots=1, loaded={"m"})
    plan = plan_dispatch([job(0)], [fast, slow], 1, measured=speeds)
    assert plan.assignments == [] and plan.etas["j0"].node == "fast"
    assert plan.etas["j0"].finish_s == pytest.approx(5.0 + 4 * 0.1)
    # Once the fast node's queue is long enough, the slow one is the earlier finish.
    plan = plan_dispatch([job(0)], [free("fast", slots=0, loaded={"m"}, backlog=500.0), slow], 1, measured=speeds)
    assert [a.worker for a in plan.assignments] == ["slow"]


def test_a_node_that_never_measured_a_model_is_tried_at_the_farm_mean_not_shunned():
    speeds = Measurements.from_records(speeds=[("a|m|64x64|1", {"s_per_step": 0.05})])[0]
    a, b = free("a", loaded={"m"}, backlog=1.0), free("b", loaded={"m"})
    assert pick(job(0).shape, [a, b], measured=speeds).node == "b"  # same guessed speed, b is free now


# --- v1: filter -> score -> pick -------------------------------------------------------------------------

BIG_FLUX = JobShape("flux-dev", 2048, 2048, 28, 4)
SMALL_SD = JobShape("sd15", 512, 512, 25, 1)
# Two cards alike in every way but memory: speed cannot decide between them.
SMALL_CARD = Device("small", 8, (8, 6), fp16_tflops=40.0, memory_gbps=500.0)
BIG_CARD = Device("big", 24, (8, 6), fp16_tflops=40.0, memory_gbps=500.0)


def test_filter_never_keeps_a_node_where_the_job_does_not_fit():
    nodes = [NodeView("a", RTX3070), NodeView("b", RTX4090, backlog_s=10_000.0), NodeView("c", RTX3070)]
    fitting, rejected = filter_nodes(BIG_FLUX, nodes)
    assert [n.name for n, _ in fitting] == ["b"]
    assert set(rejected) == {"a", "c"} and all("nothing fits" in r for r in rejected.values())
    assert pick(BIG_FLUX, nodes).node == "b"  # however busy the one node where it fits


def test_pick_only_chooses_nodes_where_planning_predicts_a_fit():
    rng = random.Random(3)
    devices = [RTX3070, RTX4090, QUADRO]
    for _ in range(60):
        job = JobShape(rng.choice(["flux-dev", "sdxl", "sd15"]), rng.choice([512, 1024, 2048]),
                       rng.choice([512, 1024, 2048]), 20, rng.choice([1, 2, 4, 8]))
        nodes = [NodeView(f"n{i}", rng.choice(devices), backlog_s=rng.uniform(0, 500)) for i in range(5)]
        decision = pick(job, nodes)
        by_name = {n.name: n for n in nodes}
        if decision is None:
            assert why_nothing_fits(job, nodes) is not None
        else:
            device = by_name[decision.node].device
            assert fit_on(job.model, job.width, job.height, job.num_images, device).fits


def test_why_nothing_fits_names_model_size_batch_need_and_largest_node():
    nodes = [NodeView("n1", RTX3070), NodeView("n2", RTX3070)]
    reason = why_nothing_fits(BIG_FLUX, nodes)
    assert pick(BIG_FLUX, nodes) is None
    assert "flux-dev at 2048x2048, batch 4" in reason
    needed = float(re.search(r"needs at least ([\d.]+) GiB in its most frugal profile", reason)[1])
    assert needed > 8
    assert "the largest node (n1) has 8 GiB" in reason
    assert why_nothing_fits(BIG_FLUX, nodes + [NodeView("big", RTX4090)]) is None


def test_prefers_the_node_with_the_model_loaded_when_otherwise_equal():
    nodes = [NodeView("a", RTX3070), NodeView("b", RTX3070, frozenset({"sd15"}))]
    decision = pick(SMALL_SD, nodes)
    assert decision.node == "b" and decision.load_s == 0.0
    assert pick(SMALL_SD, nodes[:1]).load_s > 0


def test_bigger_card_only_when_the_small_one_cannot_fit_or_is_much_busier():
    small, big = NodeView("small", SMALL_CARD), NodeView("big", BIG_CARD)
    assert pick(SMALL_SD, [big, small]).node == "small"  # same finish: keep the big card free
    busy_small = NodeView("small", SMALL_CARD, backlog_s=0.5)
    assert pick(SMALL_SD, [big, busy_small]).node == "small"  # a near tie is still a tie
    very_busy_small = NodeView("small", SMALL_CARD, backlog_s=600.0)
    assert pick(SMALL_SD, [big, very_busy_small]).node == "big"
    assert pick(JobShape("sdxl", 1536, 1536, 30, 4), [big, small]).node == "big"  # does not fit 8 GiB


def test_best_fit_breaks_ties_then_earliest_then_name():
    def d(node, finish, leftover):
        return Decision(node, "p", finish, finish, 0.0, leftover)

    assert best_of([d("roomy", 10.0, 20.0), d("snug", 10.0, 1.0)]).node == "snug"
    assert best_of([d("roomy", 10.0, 20.0), d("snug", 10.2, 1.0)]).node == "snug"  # within the tie window
    assert best_of([d("roomy", 10.0, 20.0), d("snug", 100.0, 1.0)]).node == "roomy"
    assert best_of([d("b", 10.0, 1.0), d("a", 10.0, 1.0)]).node == "a"
    assert best_of([]) is None


def test_a_second_is_no_near_tie_for_a_job_done_in_a_fraction_of_one():
    def d(node, finish, leftover):
        return Decision(node, "p", finish, finish, 0.0, leftover)

    # Sub-second estimates (stand-ins, tiny jobs): the snug card busy 0.3 s more does not tie with an idle one.
    assert best_of([d("roomy", 0.30, 20.0), d("snug", 0.60, 1.0)]).node == "roomy"
    # From TIE_SCALE_S on, the whole second counts as before.
    assert best_of([d("roomy", 10.0, 20.0), d("snug", 11.4, 1.0)]).node == "snug"
    assert best_of([d("roomy", 5.0, 20.0), d("snug", 5.6, 1.0)]).node == "snug"  # 5% + half a second


def test_measured_seconds_per_step_win_over_the_prediction():
    measured = Measurements.from_records(speeds=[("m|sd15|512x512|1", {"s_per_step": 2.0})])[0]
    assert pick(SMALL_SD, [NodeView("m", RTX3070)], measured=measured).run_s == 50.0
    assert pick(SMALL_SD, [NodeView("other", RTX3070)], measured=measured).run_s < 50.0  # not its figure


def test_a_measured_peak_is_a_floor_under_the_estimate():
    shape = JobShape("sdxl", 1024, 1024, 30, 1)
    fit = fit_on("sdxl", 1024, 1024, 1, RTX3070)
    assert fit.fits
    # A node measured this profile at 7.9 GiB: with the margin it no longer fits 8 GiB, so the planner moves
    # down the ladder (or to the big card), never sends it where the measurement says it will not fit.
    peaks = Measurements.from_records(peaks=[(f"sdxl|{fit.profile}|1024x1024|1", {"peak_gib": 7.9})])[0]
    floored = fit_on("sdxl", 1024, 1024, 1, RTX3070, None, peaks)
    assert floored.profile != fit.profile
    # Measured at a smaller batch, it floors a larger batch too; not a smaller one.
    assert peaks.floors("sdxl", 1024, 1024, 2) == {fit.profile: pytest.approx(7.9 + 0.25)}
    assert peaks.floors("sdxl", 1024, 1024, 1) and not peaks.floors("sdxl", 1024, 1024, 0)
    assert peaks.floors("sdxl", 1000, 1000, 1)  # same size bucket
    assert not peaks.floors("sdxl", 1100, 1024, 1)
    decision = pick(shape, [NodeView("small", RTX3070), NodeView("big", QUADRO, backlog_s=1e6)], measured=peaks)
    assert decision.node == "small" and decision.profile == floored.profile


def test_largest_batch_is_the_edge_of_what_fits():
    for model, size in [("sdxl", 1024), ("flux-dev", 1024), ("sd15", 2048)]:
        n = largest_batch(model, size, size, NodeView("n", RTX3070))
        assert n >= 1
        assert fit_on(model, size, size, n, RTX3070).fits
        assert not fit_on(model, size, size, n + 1, RTX3070).fits
        assert largest_batch(model, size, size, RTX4090) >= n
    assert largest_batch("flux-dev", 2048, 2048, RTX3070, limit=64) >= 1
    assert largest_batch("sd15", 512, 512, RTX4090, limit=8) == 8
    assert largest_batch("no-such-model", 512, 512, RTX4090) == 0


def test_node_index_chooses_as_pick_does():
    rng = random.Random(11)
    devices = [RTX3070, RTX4090, QUADRO]
    models = ["flux-dev", "sdxl", "sd15"]
    views = {
        f"n{i:02}": NodeView(f"n{i:02}", rng.choice(devices), frozenset({rng.choice(models)}), rng.uniform(0, 300))
        for i in range(30)
    }
    index = NodeIndex(list(views.values()))
    for _ in range(200):
        job = JobShape(rng.choice(models), rng.choice([512, 1024, 2048]), 1024, 20, rng.choice([1, 2, 4]))
        expected, got = pick(job, list(views.values())), index.pick(job)
        assert got == expected
        if got is not None:
            index.commit(job, got)
            old = views[got.node]
            views[got.node] = NodeView(old.name, old.device, old.loaded_models | {job.model}, got.finish_s)


def _flux(i, size=1024, images=1):
    return PendingJob(id=f"f{i}", model="flux-dev", batch_key=("flux-dev", size, size, 28, 3.5),
                      num_images=images, width=size, height=size)


def test_dispatch_never_sends_a_job_to_a_card_it_does_not_fit():
    small = free("small", RTX3070)
    big = free("big", QUADRO, slots=0, backlog=100.0)
    huge = _flux(0, size=2048, images=4)  # fits the 24 GiB card in a frugal profile, not the 8 GiB one
    assert fit_on("flux-dev", 2048, 2048, 4, QUADRO).fits and not fit_on("flux-dev", 2048, 2048, 4, RTX3070).fits
    plan = plan_dispatch([huge], [small], max_batch_images=8)
    assert plan.assignments == [] and "the largest node (small) has 8 GiB" in plan.unplaced["f0"]
    plan = plan_dispatch([huge], [small, big], max_batch_images=8)
    assert plan.assignments == [] and plan.etas["f0"].node == "big"  # waits for the big card
    assert [a.worker for a in plan_dispatch([huge], [small, free("big", QUADRO)], 8).assignments] == ["big"]
    # A job behind it that fits the small card is not held up.
    plan = plan_dispatch([huge, _flux(1)], [small, big], max_batch_images=8)
    assert [(a.worker, a.job_ids) for a in plan.assignments] == [("small", ("f1",))]


def test_coalescing_stops_at_the_largest_batch_predicted_to_fit():
    most = largest_batch("flux-dev", 1024, 1024, RTX3070, limit=16)
    assert 1 <= most < 16
    plan = plan_dispatch([_flux(i) for i in range(16)], [free("small", RTX3070)], max_batch_images=16)
    assert len(plan.assignments[0].job_ids) == most


def test_a_large_farm_plans_through_the_index_and_chooses_the_same(monkeypatch):
    import renderfarm.scheduler.placement as placement

    rng = random.Random(5)
    devices = [RTX3070, RTX4090, QUADRO]
    models = [("flux-dev", 28), ("sdxl", 30), ("sd15", 25)]
    nodes = [free(f"n{i:03}", rng.choice(devices), slots=rng.choice([0, 1, 2]), loaded={rng.choice(models)[0]},
                  backlog=rng.uniform(0, 300)) for i in range(80)]
    pending = []
    for i in range(300):
        model, steps = rng.choice(models)
        size = rng.choice([512, 1024, 1536])
        pending.append(PendingJob(f"p{i}", model, (model, size, size, steps, 3.5), rng.choice([1, 2]), size, size, steps))
    assert len(nodes) >= placement.INDEX_FROM_NODES
    indexed = plan_dispatch(pending, nodes, 8)
    monkeypatch.setattr(placement, "INDEX_FROM_NODES", 10_000)
    scanned = plan_dispatch(pending, nodes, 8)
    assert indexed.assignments == scanned.assignments and indexed.etas == scanned.etas
    assert indexed.assignments and len(indexed.etas) + len(indexed.unplaced) == len(pending)
