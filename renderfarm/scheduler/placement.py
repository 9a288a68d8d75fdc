"""Where each pending job goes: pure functions over plain data, testable without Ray or Redis.

v0 policy: walk the queue in order (priority, then submit time); give the head job to the worker with a
free slot and the fewest batches queued, preferring one that already has its model loaded (no reload),
then the one with the most VRAM; coalesce
the compatible jobs behind it (same model, size, steps, guidance) into one pipeline call, up to the batch
limit in images.

v1 (below `plan_dispatch`): filter -> score -> pick over `NodeView`s that carry each node's `Device`:
`filter_nodes` keeps the nodes where planning's `choose_profile` finds a profile that fits, `score` estimates
the finish (backlog + model load when needed + steps x seconds per step), `best_of` takes the earliest finish
with best fit (least VRAM left over) among near ties, `pick` does all three; `why_nothing_fits` says why a job
fits nowhere and `largest_batch` how many images fit one call. `NodeIndex` makes the same choice in time that
does not grow with the number of nodes of a kind, for large farms. scheduler/simulate.py runs this code
against a simulated cluster.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from renderfarm.planning.catalog import Catalog, default_catalog
from renderfarm.planning.devices import Device


@dataclass(frozen=True)
class PendingJob:
    id: str
    model: str
    batch_key: tuple
    num_images: int = 1
    width: int = 0  # 0: unknown, no fit check (callers that plan pass the size)
    height: int = 0


@dataclass(frozen=True)
class WorkerView:
    name: str
    vram_gib: float
    loaded_models: frozenset[str] = frozenset()
    queued_batches: int = 0  # batches sent and not yet finished (a worker may hold a second in its queue)
    device: Device | None = None  # the card, for fit checks; None: no check


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


def _plannable(job: PendingJob, worker: WorkerView, catalog: Catalog | None) -> bool:
    """Whether fit can be judged: the worker's card and the job's size are known and the model carries
    component data (a catalog entry without it cannot be planned; its node just tries)."""
    if worker.device is None or not job.width or not job.height:
        return False
    try:
        return bool((catalog or default_catalog()).get(job.model).components)
    except ValueError:
        return False


def plan_dispatch(
    pending: Sequence[PendingJob],
    idle: Sequence[WorkerView],
    max_batch_images: int,
    catalog: Catalog | None = None,
) -> list[Assignment]:
    """Assign queue-ordered `pending` jobs to `idle` workers, one batch per worker. A job goes only to a
    worker whose card it is predicted to fit (it waits while only smaller cards are free), and a batch
    grows only up to the largest batch predicted to fit that card."""
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
        fitting = [
            w for w in free
            if not _plannable(head, w, catalog)
            or fit_on(head.model, head.width, head.height, head.num_images, w.device, catalog).fits
        ]
        worker = choose_worker(head, fitting)
        if worker is None:
            continue  # fits none of the free workers now: it waits for a bigger one
        free.remove(worker)
        limit = max_batch_images
        if _plannable(head, worker, catalog):
            limit = min(limit, max(head.num_images, largest_batch(
                head.model, head.width, head.height, worker.device, limit, catalog)))
        batch, images = [head.id], head.num_images
        taken.add(head.id)
        for other in pending:
            if images >= limit:
                break
            if other.id in taken or other.batch_key != head.batch_key:
                continue
            if images + other.num_images > limit:
                continue
            batch.append(other.id)
            images += other.num_images
            taken.add(other.id)
        plan.append(Assignment(worker=worker.name, job_ids=tuple(batch), model=head.model))
    return plan


# --- v1: filter -> score -> pick over node views -----------------------------------------------------
#
# A node view carries its `Device` (planning.devices), the models it holds (or will hold once its queue
# drains) and its backlog in seconds. Whether a job fits is planning's `choose_profile` on that device,
# cached per (model, size, batch, device) because the scheduler asks many times a second. A job is never
# placed where its predicted peak does not fit.

# Loading a model: weights read from a local disk (page cache cold) and copied over PCIe. Effective rate of
# the whole path, plus a fixed cost for building the pipeline.
LOAD_GBPS = 2.0
LOAD_OVERHEAD_S = 3.0
# Finish times within this much of the best count as a tie, broken by the least VRAM left over (best fit):
# a little later on a small card beats taking a big card that a big job may need.
TIE_FRACTION = 0.05
TIE_SECONDS = 1.0


@dataclass(frozen=True)
class JobShape:
    """What placement needs of a job: the model, the size, the steps and the images in one call."""

    model: str
    width: int
    height: int
    steps: int
    num_images: int = 1

    def describe(self) -> str:
        return f"{self.model} at {self.width}x{self.height}, batch {self.num_images}"


@dataclass(frozen=True)
class NodeView:
    name: str
    device: Device
    loaded_models: frozenset[str] = frozenset()
    backlog_s: float = 0.0  # estimated seconds of work already sent to the node and not finished
    # Measured seconds per step by (model, width, height, batch): wins over the prediction where present.
    measured_s_per_step: Mapping[tuple[str, int, int, int], float] = field(
        default_factory=dict, compare=False, hash=False
    )


@dataclass(frozen=True)
class Fit:
    """What planning predicts for one (model, size, batch) on one kind of device."""

    fits: bool
    profile: str | None  # the chosen profile; None when nothing fits
    peak_gib: float  # the chosen profile's peak; when nothing fits, the most frugal profile's
    needed_gib: float  # VRAM the most frugal runnable profile needs, margin included (inf: none runnable)
    seconds_per_step: float  # the chosen profile's (when nothing fits: the most frugal one's)
    weights_gib: float  # the chosen profile's weights as stored: what a load moves
    usable_gib: float
    reason: str


@dataclass(frozen=True)
class Decision:
    node: str
    profile: str
    finish_s: float  # backlog + load + run, seconds from now
    run_s: float
    load_s: float
    leftover_gib: float  # usable VRAM minus the predicted peak


@lru_cache(maxsize=65536)
def fit_on(
    model: str, width: int, height: int, batch: int, device: Device, catalog: Catalog | None = None
) -> Fit:
    """Planning's verdict for `batch` images of `model` at `width` x `height` on `device` (cached), with the
    models of `catalog` (default: the packaged one)."""
    from renderfarm.planning.profiles import choose_profile

    try:
        entry = (catalog or default_catalog()).get(model)
        choice = choose_profile(entry, device, width, height, batch)
    except ValueError as exc:  # unknown model, size not allowed for the model
        return Fit(False, None, math.inf, math.inf, math.inf, 0.0, 0.0, str(exc))
    runnable = [c for c in choice.candidates if not c.reason.startswith("unavailable")]
    frugal = min(runnable, key=lambda c: c.prediction.peak_gib) if runnable else None
    needed = frugal.prediction.peak_gib + choice.margin_gib if frugal else math.inf
    chosen = choice.chosen_candidate
    used = chosen or frugal
    return Fit(
        fits=chosen is not None,
        profile=chosen.profile.name if chosen else None,
        peak_gib=used.prediction.peak_gib if used else math.inf,
        needed_gib=needed,
        seconds_per_step=used.prediction.seconds_per_step if used else math.inf,
        weights_gib=sum(used.prediction.weights_gib.values()) if used else 0.0,
        usable_gib=choice.usable_gib,
        reason=choice.reason,
    )


def load_seconds(fit: Fit, device: Device) -> float:
    """Seconds to load a model whose weights are `fit.weights_gib`: disk and PCIe, plus pipeline setup."""
    return LOAD_OVERHEAD_S + fit.weights_gib * 2**30 / (LOAD_GBPS * 1e9)


def run_seconds(job: JobShape, node: NodeView, fit: Fit) -> float:
    """Seconds to render `job` on `node`: steps x seconds per step, measured where the node reports it."""
    key = (job.model, job.width, job.height, job.num_images)
    per_step = node.measured_s_per_step.get(key, fit.seconds_per_step)
    return job.steps * per_step


def filter_nodes(job: JobShape, nodes: Sequence[NodeView]) -> tuple[list[tuple[NodeView, Fit]], dict[str, str]]:
    """The nodes where some profile of `job` fits, with planning's verdict; and why each other was left out."""
    fitting: list[tuple[NodeView, Fit]] = []
    rejected: dict[str, str] = {}
    for node in nodes:
        fit = fit_on(job.model, job.width, job.height, job.num_images, node.device)
        if fit.fits:
            fitting.append((node, fit))
        else:
            rejected[node.name] = fit.reason
    return fitting, rejected


def score(job: JobShape, node: NodeView, fit: Fit) -> Decision:
    """Estimated finish: the node's backlog, then a load when the model is not there, then the run."""
    run = run_seconds(job, node, fit)
    load = 0.0 if job.model in node.loaded_models else load_seconds(fit, node.device)
    return Decision(
        node=node.name, profile=fit.profile or "", finish_s=node.backlog_s + load + run, run_s=run, load_s=load,
        leftover_gib=fit.usable_gib - fit.peak_gib,
    )


def best_of(decisions: Sequence[Decision]) -> Decision | None:
    """The earliest finish; among finishes within TIE_FRACTION / TIE_SECONDS of it, the least VRAM left over."""
    if not decisions:
        return None
    earliest = min(d.finish_s for d in decisions)
    limit = earliest * (1 + TIE_FRACTION) + TIE_SECONDS
    return min(
        (d for d in decisions if d.finish_s <= limit), key=lambda d: (d.leftover_gib, d.finish_s, d.node)
    )


def pick(job: JobShape, nodes: Sequence[NodeView]) -> Decision | None:
    """Filter, score, pick: the node where `job` fits and finishes soonest (best fit among near ties).
    None when it fits nowhere (see `why_nothing_fits`)."""
    fitting, _ = filter_nodes(job, nodes)
    return best_of([score(job, node, fit) for node, fit in fitting])


def why_nothing_fits(
    job: JobShape, nodes: Sequence[NodeView], catalog: Catalog | None = None
) -> str | None:
    """None when `job` fits some node; else one line naming what it needs and the largest node."""
    if not nodes:
        return f"{job.describe()}: there are no nodes"
    fits = [fit_on(job.model, job.width, job.height, job.num_images, n.device, catalog) for n in nodes]
    if any(f.fits for f in fits):
        return None
    largest = max(nodes, key=lambda n: n.device.vram_gib)
    needed = min(f.needed_gib for f in fits)
    if math.isinf(needed):
        return f"{job.describe()}: {fits[0].reason}"
    return (
        f"{job.describe()} needs at least {needed:.1f} GiB in its most frugal profile; "
        f"the largest node ({largest.name}) has {largest.device.vram_gib:g} GiB"
    )


def largest_batch(
    model: str, width: int, height: int, node: NodeView | Device, limit: int = 64, catalog: Catalog | None = None
) -> int:
    """The most images of `model` at `width` x `height` predicted to fit in one call on `node` (0: not
    even one), at most `limit`. Peaks grow with the batch, so a binary search suffices."""
    device = node.device if isinstance(node, NodeView) else node
    if not fit_on(model, width, height, 1, device, catalog).fits:
        return 0
    low, high = 1, limit  # low fits; find the largest that does
    while low < high:
        mid = (low + high + 1) // 2
        if fit_on(model, width, height, mid, device, catalog).fits:
            low = mid
        else:
            high = mid - 1
    return low


class NodeIndex:
    """`pick` for large farms: nodes grouped by device, each group a heap of backlogs (all nodes, and the nodes
    holding each model), so a decision costs O(kinds x log nodes) whatever the farm's and the queue's size.
    Chooses exactly as `pick` over the same views (measured seconds per step aside: a kind shares its
    prediction). Stale heap entries are dropped lazily when they reach the top."""

    def __init__(self, nodes: Sequence[NodeView] = ()):
        self._state: dict[str, tuple[Device, float, frozenset[str]]] = {}
        self._all: dict[Device, list[tuple[float, str]]] = {}
        self._holding: dict[tuple[Device, str], list[tuple[float, str]]] = {}
        for node in nodes:
            self.update(node.name, node.device, node.backlog_s, node.loaded_models)

    def __len__(self) -> int:
        return len(self._state)

    def update(self, name: str, device: Device, backlog_s: float, loaded_models: frozenset[str]) -> None:
        self._state[name] = (device, backlog_s, loaded_models)
        heapq.heappush(self._all.setdefault(device, []), (backlog_s, name))
        for model in loaded_models:
            heapq.heappush(self._holding.setdefault((device, model), []), (backlog_s, name))

    def _top(self, heap: list[tuple[float, str]] | None, model: str | None) -> tuple[float, str] | None:
        while heap:
            backlog, name = heap[0]
            _, current, loaded = self._state[name]
            if current == backlog and (model is None or model in loaded):
                return heap[0]
            heapq.heappop(heap)
        return None

    def pick(self, job: JobShape) -> Decision | None:
        decisions = []
        for device, heap in self._all.items():
            fit = fit_on(job.model, job.width, job.height, job.num_images, device)
            if not fit.fits:
                continue
            run = job.steps * fit.seconds_per_step
            options = []
            holding = self._top(self._holding.get((device, job.model)), job.model)
            if holding is not None:
                options.append((holding[0] + run, holding[1], 0.0))
            anyone = self._top(heap, None)
            if anyone is not None:
                load = 0.0 if job.model in self._state[anyone[1]][2] else load_seconds(fit, device)
                options.append((anyone[0] + load + run, anyone[1], load))
            if options:
                finish, name, load = min(options)
                decisions.append(Decision(name, fit.profile or "", finish, run, load, fit.usable_gib - fit.peak_gib))
        return best_of(decisions)

    def commit(self, job: JobShape, decision: Decision) -> None:
        """Record `decision`: the node's backlog grows to the job's finish and it holds the job's model."""
        device, _, _ = self._state[decision.node]
        self.update(decision.node, device, decision.finish_s, frozenset({job.model}))
