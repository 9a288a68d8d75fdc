"""Where each pending job goes: pure functions over plain data, testable without Ray or Redis.

v0 policy: walk the queue in order (priority, then submit time); give the head job to the worker with a
free slot and the fewest batches queued, preferring one that already has its model loaded (no reload),
then the one with the most VRAM; coalesce
the compatible jobs behind it (same model, size, steps, guidance) into one pipeline call, up to the batch
limit in images. The routing issue replaces the choice of worker with filter -> score -> pick.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PendingJob:
    id: str
    model: str
    batch_key: tuple
    num_images: int = 1


@dataclass(frozen=True)
class WorkerView:
    name: str
    vram_gib: float
    loaded_models: frozenset[str] = frozenset()
    queued_batches: int = 0  # batches sent and not yet finished (a worker may hold a second in its queue)


@dataclass(frozen=True)
class Assignment:
    worker: str
    job_ids: tuple[str, ...]
    model: str


def choose_worker(job: PendingJob, idle: Sequence[WorkerView]) -> WorkerView | None:
    """The worker for `job` among those with a free slot: the least queued, then one with the model
    loaded, then the largest card, then by name."""
    if not idle:
        return None
    return min(idle, key=lambda w: (w.queued_batches, job.model not in w.loaded_models, -w.vram_gib, w.name))


def plan_dispatch(
    pending: Sequence[PendingJob], idle: Sequence[WorkerView], max_batch_images: int
) -> list[Assignment]:
    """Assign queue-ordered `pending` jobs to `idle` workers, one batch per worker."""
    if max_batch_images < 1:
        raise ValueError(f"max_batch_images={max_batch_images} must be >= 1")
    free = list(idle)
    taken: set[str] = set()
    plan: list[Assignment] = []
    for head in pending:
        if not free:
            break
        if head.id in taken:
            continue
        worker = choose_worker(head, free)
        assert worker is not None
        free.remove(worker)
        batch, images = [head.id], head.num_images
        taken.add(head.id)
        for other in pending:
            if images >= max_batch_images:
                break
            if other.id in taken or other.batch_key != head.batch_key:
                continue
            if images + other.num_images > max_batch_images:
                continue
            batch.append(other.id)
            images += other.num_images
            taken.add(other.id)
        plan.append(Assignment(worker=worker.name, job_ids=tuple(batch), model=head.model))
    return plan
