import pytest

from renderfarm.scheduler.placement import (
    PendingJob,
    WorkerView,
    choose_worker,
    plan_dispatch,
)


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
