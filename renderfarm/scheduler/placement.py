"""Where each pending job goes: filter -> score -> pick, pure functions over plain data (no Ray, no Redis).

- `filter_nodes` keeps the nodes where planning's `choose_profile` finds a profile that fits (measured peaks
  from planning.measured raise the predictions: an estimate never goes below what a node measured);
- `score` estimates the finish on a node: its backlog, plus a model load when the model is not loaded there,
  plus steps x seconds per step (the node's measured figure when it has one, else the prediction);
- `best_of` takes the earliest finish, and among near ties the least VRAM left over (best fit), so big
  cards stay free for big jobs; `pick` does all three.

`plan_dispatch` is the live scheduler's round: it walks the queue in its fair order (scheduler/fairness.py),
picks a node for each job as above, coalesces the compatible jobs behind it up to the largest batch predicted
to fit that node, and commits the batch to the node's backlog. A batch whose node has a free slot is sent
now; the others wait for their node (a fast card finishing soon beats a slow idle one), and every job gets a
position and an ETA from the same estimates. A job is never sent where it is predicted not to fit.

What fits where (`fit_on`, `why_nothing_fits`, `largest_batch`) is planning's, in planning/fit.py; `NodeIndex`
makes `pick`'s choice in time that does not grow with the number of nodes of a kind, for large farms.
scheduler/simulate.py runs this code against a simulated cluster.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from renderfarm.planning.catalog import Catalog
from renderfarm.planning.devices import Device
from renderfarm.planning.fit import (  # noqa: F401 (JobShape, NodeView: the planner's vocabulary, re-exported)
    Fit,
    JobShape,
    NodeView,
    fit_for,
    fit_on,
    largest_batch,
    plannable,
    why_nothing_fits,
)
from renderfarm.planning.measured import EMPTY, Measurements

# Loading a model: weights read from a local disk (page cache cold) and copied over PCIe. Effective rate of
# the whole path, plus a fixed cost for building the pipeline.
LOAD_GBPS = 2.0
LOAD_OVERHEAD_S = 3.0
# A model without component data has no prediction: until its node measures one, a step counts this long.
UNKNOWN_S_PER_STEP = 1.0
# Finish times within this much of the best count as a tie, broken by the least VRAM left over (best fit):
# a little later on a small card beats taking a big card that a big job may need.
TIE_FRACTION = 0.05
TIE_SECONDS = 1.0
# From this many nodes on, plan_dispatch decides through a NodeIndex (kinds share a measured speed).
INDEX_FROM_NODES = 64


@dataclass(frozen=True)
class PendingJob:
    """A queued job as the live planner sees it; `batch_key` equal means it can share a pipeline call."""

    id: str
    model: str
    batch_key: tuple
    num_images: int = 1
    width: int = 0
    height: int = 0
    steps: int = 1

    @property
    def shape(self) -> JobShape:
        return JobShape(self.model, self.width, self.height, self.steps, self.num_images)


@dataclass(frozen=True)
class Decision:
    node: str
    profile: str
    finish_s: float  # backlog + load + run, seconds from now
    run_s: float
    load_s: float
    leftover_gib: float  # usable VRAM minus the predicted peak


def load_seconds(fit: Fit, device: Device) -> float:
    """Seconds to load a model whose weights are `fit.weights_gib`: disk and PCIe, plus pipeline setup."""
    return LOAD_OVERHEAD_S + fit.weights_gib * 2**30 / (LOAD_GBPS * 1e9)


def filter_nodes(
    job: JobShape, nodes: Sequence[NodeView], catalog: Catalog | None = None, measured: Measurements = EMPTY
) -> tuple[list[tuple[NodeView, Fit | None]], dict[str, str]]:
    """The nodes where some profile of `job` fits (or fit cannot be judged: None), with planning's verdict;
    and why each other was left out."""
    fitting: list[tuple[NodeView, Fit | None]] = []
    rejected: dict[str, str] = {}
    for node in nodes:
        if job.model in node.forbidden:
            rejected[node.name] = f"{job.model} is forbidden on {node.name} (its node override)"
            continue
        fit = fit_for(job, node, catalog, measured)
        if fit is None or fit.fits:
            fitting.append((node, fit))
        else:
            rejected[node.name] = fit.reason
    return fitting, rejected


def _seconds_per_step(job: JobShape, fit: Fit | None, measured_s: float | None, measured: Measurements) -> float:
    """What a step of `job` costs: measured on the node (or its kind), else the prediction, else (a model
    without component data) the farm's measured mean for the model, else UNKNOWN_S_PER_STEP."""
    if measured_s is not None:
        return measured_s
    if fit is not None:
        return fit.seconds_per_step
    farm = measured.farm_seconds_per_step(job.model, job.width, job.height, job.num_images)
    return farm if farm is not None else UNKNOWN_S_PER_STEP


def _load_estimate(node: str, model: str, fit: Fit | None, device: Device | None, measured: Measurements) -> float:
    """Seconds to load `model` on `node`: as it measured, else predicted from the weights, else the fixed cost."""
    if (seconds := measured.load_seconds(node, model)) is not None:
        return seconds
    return load_seconds(fit, device) if fit is not None and device is not None else LOAD_OVERHEAD_S


def score(job: JobShape, node: NodeView, fit: Fit | None, measured: Measurements = EMPTY) -> Decision:
    """Estimated finish: the node's backlog, then a load when the model is not there, then the run: steps x
    the node's measured seconds per step where it has them, else the prediction, else (a model without
    component data) the farm's measured mean for the model, else UNKNOWN_S_PER_STEP."""
    own = measured.seconds_per_step(node.name, job.model, job.width, job.height, job.num_images)
    per_step = _seconds_per_step(job, fit, own, measured)
    load = 0.0 if job.model in node.loaded_models else _load_estimate(node.name, job.model, fit, node.device, measured)
    run = job.steps * per_step
    leftover = fit.usable_gib - fit.peak_gib if fit is not None else (node.device.vram_gib if node.device else 0.0)
    return Decision(
        node=node.name, profile=(fit.profile or "") if fit is not None else "", finish_s=node.backlog_s + load + run,
        run_s=run, load_s=load, leftover_gib=leftover,
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


def pick(
    job: JobShape, nodes: Sequence[NodeView], catalog: Catalog | None = None, measured: Measurements = EMPTY
) -> Decision | None:
    """Filter, score, pick: the node where `job` fits and finishes soonest (best fit among near ties).
    None when it fits nowhere (see `why_nothing_fits`)."""
    fitting, _ = filter_nodes(job, nodes, catalog, measured)
    return best_of([score(job, node, fit, measured) for node, fit in fitting])


# --- the live scheduler's round ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Assignment:
    """A batch to send now: its node, its jobs (in queue order), and what the planner expects of it."""

    worker: str
    job_ids: tuple[str, ...]
    model: str
    profile: str = ""
    run_s: float = 0.0
    finish_s: float = 0.0


@dataclass(frozen=True)
class Eta:
    """Where a queued job stands: its place in the fair order, the node it waits for, and when its batch is
    expected to start and finish (seconds from the planning round)."""

    position: int
    node: str
    start_s: float
    finish_s: float


@dataclass
class Plan:
    assignments: list[Assignment] = field(default_factory=list)
    etas: dict[str, Eta] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)  # job id -> why it fits no node now


def plan_dispatch(
    pending: Sequence[PendingJob],
    nodes: Sequence[NodeView],
    max_batch_images: int,
    catalog: Catalog | None = None,
    measured: Measurements = EMPTY,
    full: bool = True,
) -> Plan:
    """One planning round over `pending` (already in fair order) and the live `nodes`.

    Each job, in order, goes to `pick`'s node with the compatible jobs behind it (same `batch_key`) coalesced
    up to the largest batch predicted to fit there (and `max_batch_images`); the batch is committed to that
    node's backlog, so later jobs see it. Batches for a node with a free slot are sent now (`assignments`);
    the rest wait for their node. With `full` every job gets an ETA; without it the round stops once no node
    has a free slot (the cheap round the scheduler runs on every event).
    """
    if max_batch_images < 1:
        raise ValueError(f"max_batch_images={max_batch_images} must be >= 1")
    views = {n.name: n for n in nodes}
    slots = {n.name: n.slots for n in nodes}
    # A large farm of carded nodes decides through the index (O(kinds x log nodes) per job, see NodeIndex).
    index = NodeIndex(nodes, catalog, measured) if len(nodes) >= INDEX_FROM_NODES and all(
        n.device is not None and not n.forbidden for n in nodes) else None
    followers: dict[tuple, deque[PendingJob]] = {}
    for job in pending:
        followers.setdefault(job.batch_key, deque()).append(job)
    taken: set[str] = set()
    plan = Plan()
    position = 0
    for head in pending:
        if not full and not any(slots.values()):
            break
        if head.id in taken:
            continue
        decision = index.pick(head.shape) if index else pick(head.shape, list(views.values()), catalog, measured)
        if decision is None:
            plan.unplaced[head.id] = why_nothing_fits(head.shape, list(views.values()), catalog, measured) or "no node"
            continue
        node = views[decision.node]
        fit = fit_for(head.shape, node, catalog, measured)
        limit = min(max_batch_images, node.max_batch or max_batch_images)
        if fit is not None:
            limit = min(limit, max(head.num_images, largest_batch(
                head.model, head.width, head.height, node.device, limit, catalog, measured)))
        batch, images = [head], head.num_images
        taken.add(head.id)
        queue = followers[head.batch_key]
        skipped: list[PendingJob] = []
        while queue and images < limit:
            other = queue.popleft()
            if other.id in taken:
                continue
            if images + other.num_images > limit:
                skipped.append(other)
                continue
            batch.append(other)
            images += other.num_images
            taken.add(other.id)
        queue.extendleft(reversed(skipped))
        if len(batch) > 1 or images != head.num_images:  # the whole batch's run, not the head's alone
            decision = score(replace(head.shape, num_images=images), node,
                             fit_for(replace(head.shape, num_images=images), node, catalog, measured), measured)
        start = node.backlog_s + decision.load_s
        for job in batch:
            plan.etas[job.id] = Eta(position, node.name, start, decision.finish_s)
            position += 1
        if slots[node.name] > 0:
            slots[node.name] -= 1
            plan.assignments.append(Assignment(
                node.name, tuple(j.id for j in batch), head.model, decision.profile, decision.run_s, decision.finish_s,
            ))
        views[node.name] = replace(node, backlog_s=decision.finish_s, loaded_models=node.loaded_models | {head.model})
        if index is not None:
            index.commit(head.shape, decision)
    return plan


class NodeIndex:
    """`pick` for large farms: nodes grouped by device, each group a heap of backlogs (all nodes, and the nodes
    holding each model), so a decision costs O(kinds x log nodes) whatever the farm's and the queue's size.
    Chooses as `pick` over the same views, with one difference: a node kind shares one speed (the mean of
    what its nodes measured for the job, else the prediction), where `pick` uses each node's own. Stale heap
    entries are dropped lazily when they reach the top. Nodes without a card are not indexed."""

    def __init__(
        self, nodes: Sequence[NodeView] = (), catalog: Catalog | None = None, measured: Measurements = EMPTY
    ):
        self.catalog, self.measured = catalog, measured
        self._state: dict[str, tuple[Device, float, frozenset[str]]] = {}
        self._all: dict[Device, list[tuple[float, str]]] = {}
        self._holding: dict[tuple[Device, str], list[tuple[float, str]]] = {}
        self._members: dict[Device, list[str]] = {}
        self._speeds: dict[tuple, float | None] = {}
        for node in nodes:
            if node.device is not None:
                self.update(node.name, node.device, node.backlog_s, node.loaded_models)

    def __len__(self) -> int:
        return len(self._state)

    def update(self, name: str, device: Device, backlog_s: float, loaded_models: frozenset[str]) -> None:
        if name not in self._state:
            self._members.setdefault(device, []).append(name)
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

    def _kind_speed(self, device: Device, model: str, width: int, height: int, batch: int) -> float | None:
        """The mean seconds per step the nodes of this kind measured for the job; None: none did."""
        if not self.measured:
            return None
        key = (device, model, width, height, batch)
        if key not in self._speeds:
            speeds = [
                v for name in self._members.get(device, ())
                if (v := self.measured.seconds_per_step(name, model, width, height, batch)) is not None
            ]
            self._speeds[key] = sum(speeds) / len(speeds) if speeds else None
        return self._speeds[key]

    def pick(self, job: JobShape) -> Decision | None:
        decisions = []
        judged = plannable(job.model, self.catalog)
        for device, heap in self._all.items():
            fit = fit_on(job.model, job.width, job.height, job.num_images, device, self.catalog, self.measured) \
                if judged else None
            if fit is not None and not fit.fits:
                continue
            kind = self._kind_speed(device, job.model, job.width, job.height, job.num_images)
            run = job.steps * _seconds_per_step(job, fit, kind, self.measured)
            options = []
            holding = self._top(self._holding.get((device, job.model)), job.model)
            if holding is not None:
                options.append((holding[0] + run, holding[1], 0.0))
            anyone = self._top(heap, None)
            if anyone is not None:
                load = 0.0 if job.model in self._state[anyone[1]][2] else _load_estimate(
                    anyone[1], job.model, fit, device, self.measured)
                options.append((anyone[0] + load + run, anyone[1], load))
            if options:
                finish, name, load = min(options)
                leftover = fit.usable_gib - fit.peak_gib if fit is not None else device.vram_gib
                decisions.append(Decision(name, (fit.profile or "") if fit else "", finish, run, load, leftover))
        return best_of(decisions)

    def commit(self, job: JobShape, decision: Decision) -> None:
        """Record `decision`: the node's backlog grows to the job's finish and it holds the job's model."""
        device, _, loaded = self._state[decision.node]
        self.update(decision.node, device, decision.finish_s, loaded | {job.model})
