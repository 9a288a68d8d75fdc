import random
import re

import pytest

from renderfarm.planning.devices import Device
from renderfarm.scheduler.placement import (
    Decision,
    JobShape,
    NodeIndex,
    NodeView,
    PendingJob,
    WorkerView,
    best_of,
    choose_worker,
    filter_nodes,
    fit_on,
    largest_batch,
    pick,
    plan_dispatch,
    why_nothing_fits,
)
from tests.unit.cards import QUADRO, RTX3070, RTX4090


def job(i, model="m", size=64, images=1):
    return PendingJob(id=f"j{i}", model=model, batch_key=(model, size, size, 4, 5.0), num_images=images)


def test_prefers_worker_with_model_loaded_then_largest_card():
    big, small = WorkerView("big", 24), WorkerView("small", 8, frozenset({"m"}))
    assert choose_worker(job(0), [big, small]).name == "small"
    assert choose_worker(job(0, model="other"), [big, small]).name == "big"
    assert choose_worker(job(0), []) is None


def test_coalesces_compatible_jobs_up_to_the_batch_limit_in_queue_order():
    pending = [job(0), job(1, size=128), job(2), job(3), job(4)]
    plan = plan_dispatch(pending, [WorkerView("w", 24)], max_batch_images=3)
    assert [a.job_ids for a in plan] == [("j0", "j2", "j3")]


def test_counts_images_not_jobs_and_skips_what_would_overflow():
    pending = [job(0, images=2), job(1, images=2), job(2, images=1)]
    plan = plan_dispatch(pending, [WorkerView("w", 24)], max_batch_images=3)
    assert plan[0].job_ids == ("j0", "j2")


def test_one_batch_per_idle_worker_and_no_job_twice():
    pending = [job(i, model="a" if i % 2 else "b") for i in range(10)]
    workers = [WorkerView("w1", 8, frozenset({"a"})), WorkerView("w2", 24)]
    plan = plan_dispatch(pending, workers, max_batch_images=2)
    assert len(plan) == 2
    ids = [j for a in plan for j in a.job_ids]
    assert len(ids) == len(set(ids)) == 4
    assert {a.worker: a.model for a in plan} == {"w2": "b", "w1": "a"}


def test_rejects_nonsense_batch_limit():
    with pytest.raises(ValueError, match="max_batch_images"):
        plan_dispatch([job(0)], [WorkerView("w", 8)], 0)


def test_least_queued_worker_first_then_loaded_model():
    busy_loaded = WorkerView("a", 24, frozenset({"m"}), queued_batches=1)
    free = WorkerView("b", 8, frozenset(), queued_batches=0)
    assert choose_worker(job(0), [busy_loaded, free]).name == "b"
    assert choose_worker(job(0), [busy_loaded]).name == "a"


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


def test_measured_seconds_per_step_win_over_the_prediction():
    measured = NodeView("m", RTX3070, measured_s_per_step={("sd15", 512, 512, 1): 2.0})
    assert pick(SMALL_SD, [measured]).run_s == 50.0


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
            views[got.node] = NodeView(old.name, old.device, frozenset({job.model}), got.finish_s)


def _flux(i, size=1024, images=1):
    return PendingJob(id=f"f{i}", model="flux-dev", batch_key=("flux-dev", size, size, 28, 3.5),
                      num_images=images, width=size, height=size)


def test_dispatch_never_sends_a_job_to_a_card_it_does_not_fit():
    from tests.unit.cards import QUADRO, RTX3070

    small = WorkerView("small", 8, device=RTX3070)
    big = WorkerView("big", 24, device=QUADRO)
    huge = _flux(0, size=2048, images=4)  # fits the 24 GiB card in a frugal profile, not the 8 GiB one
    assert fit_on("flux-dev", 2048, 2048, 4, QUADRO).fits and not fit_on("flux-dev", 2048, 2048, 4, RTX3070).fits
    assert plan_dispatch([huge], [small], max_batch_images=8) == []  # waits for the big card
    assert [a.worker for a in plan_dispatch([huge], [small, big], max_batch_images=8)] == ["big"]
    # A job behind it that fits the small card is not held up.
    plan = plan_dispatch([huge, _flux(1)], [small], max_batch_images=8)
    assert [(a.worker, a.job_ids) for a in plan] == [("small", ("f1",))]


def test_coalescing_stops_at_the_largest_batch_predicted_to_fit():
    from tests.unit.cards import RTX3070

    small = WorkerView("small", 8, device=RTX3070)
    most = largest_batch("flux-dev", 1024, 1024, RTX3070, limit=16)
    assert 1 <= most < 16
    plan = plan_dispatch([_flux(i) for i in range(16)], [small], max_batch_images=16)
    assert len(plan[0].job_ids) == most
