"""Where each pending job goes: filter -> score -> pick, pure functions over plain data (no Ray, no Redis).

- `filter_nodes` keeps the nodes where planning's `choose_profile` finds a profile that fits (measured peaks
  from planning.measured raise the predictions: an estimate never goes below what a node measured);
- `score` estimates the finish on a node: its backlog, plus a model load when its pipeline cache will not hold
  the model when the batch gets there, plus steps x seconds per step (the node's measured figure when it has
  one, else the prediction), plus an image task's VAE encode (JobShape.task: img2img and inpainting are fitted
  with their encode stage, planning/vram.py). A load costs what the node measured loading that model under that
  profile, else what the nodes of its kind measured, else the prediction from the weight bytes (`load_seconds`);
- `best_of` takes the earliest finish, and among near ties the least VRAM left over (best fit), so big
  cards stay free for big jobs; `pick` does all three.

`plan_dispatch` is the live scheduler's round: it walks the queue in its fair order (scheduler/fairness.py),
picks a node for each job as above, coalesces the compatible jobs behind it up to the largest batch predicted
to fit that node, and commits the batch to the node's backlog and to its pipeline cache (planning/fit.py
CacheView: a load may evict a model a later batch then pays to reload). A batch whose node has a free slot is sent
now; the others wait for their node (a fast card finishing soon beats a slow idle one), and every job gets a
position and an ETA from the same estimates. A job is never sent where it is predicted not to fit.

What fits where (`fit_on`, `why_nothing_fits`, `largest_batch`) is planning's, in planning/fit.py; `NodeIndex`
makes `pick`'s choice in time that does not grow with the number of nodes of a kind, for large farms.
scheduler/simulate.py runs this code against a simulated cluster.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from renderfarm.planning.catalog import Catalog
from renderfarm.planning.devices import Device
from renderfarm.planning.fit import (  # noqa: F401 (JobShape, NodeView: the planner's vocabulary, re-exported)
    ANY_PROFILE,
    Fit,
    JobShape,
    NodeView,
    base_profile,
    fit_for,
    fit_on,
    largest_batch,
    model_takers,
    plannable,
    why_nothing_fits,
)
from renderfarm.planning.measured import EMPTY, Measurements

# Predicting a load that no node of the kind has measured yet: the weights read from a local disk (page
# cache cold) and copied over PCIe at an effective LOAD_GBPS for the whole path, plus LOAD_OVERHEAD_S for
# building the pipeline object (configs, tokenizers, schedulers, modules created empty). The tiny stand-ins
# (3-5 MB of weights) reload through the worker's PipelineCache in 0.08-0.18 s on a 2-core CPU (median of 5
# loads each, a warm process), so the fixed part is a fraction of a second, not seconds: a larger one made
# every idle node look dearer than a busy one holding the model. Measured loads replace this at once.
LOAD_GBPS = 2.0
LOAD_OVERHEAD_S = 0.25
# A model without component data has no prediction: until its node measures one, a step counts this long.
UNKNOWN_S_PER_STEP = 1.0
# Finish times within this much of the best count as a tie, broken by the least VRAM left over (best fit):
# a little later on a small card beats taking a big card that a big job may need.
TIE_FRACTION = 0.05
TIE_SECONDS = 1.0
# The absolute second counts in full from finishes of this many seconds on, in proportion below: a second is
# no near tie for a job done in 0.3 s (two simulated cards whose estimates were all under a second: every
# batch went to the smaller card while the other sat idle).
TIE_SCALE_S = 10.0
# From this many nodes on, plan_dispatch decides through a NodeIndex (kinds share a measured speed).
INDEX_FROM_NODES = 64
LORA_SWITCH_BASE_S = 0.5  # see lora_switch_seconds
LORA_SWITCH_PER_LORA_S = 0.5


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
    loras: tuple[tuple[str, str | None, float], ...] = ()  # JobSpec.lora_set()
    fingerprint: str | None = None  # JobSpec.model_fingerprint
    task: str = "txt2img"  # JobSpec.task: img2img and inpainting add the VAE encode to the fit and the time

    @property
    def shape(self) -> JobShape:
        return JobShape(self.model, self.width, self.height, self.steps, self.num_images, self.loras,
                        self.fingerprint, self.task)


@dataclass(frozen=True)
class Decision:
    node: str
    profile: str
    finish_s: float  # backlog + load + run, seconds from now
    run_s: float
    load_s: float
    leftover_gib: float  # usable VRAM minus the predicted peak
    weights_bytes: int = 0  # the profile's predicted weights (what its pipeline adds to the node's cache)


def load_seconds(fit: Fit, device: Device) -> float:
    """Predicted seconds to load a model whose weights are `fit.weights_gib`: disk and PCIe, plus pipeline
    setup (used until a node of the kind measures it)."""
    return LOAD_OVERHEAD_S + fit.weights_gib * 2**30 / (LOAD_GBPS * 1e9)


def kinds_of(nodes: Sequence[NodeView]) -> dict[str, tuple[str, ...]]:
    """node name -> the names of the nodes with its card (itself included); a node without a card has none."""
    by_device: dict[Device, list[str]] = {}
    for node in nodes:
        if node.device is not None:
            by_device.setdefault(node.device, []).append(node.name)
    return {n.name: tuple(by_device[n.device]) if n.device is not None else () for n in nodes}


def filter_nodes(
    job: JobShape, nodes: Sequence[NodeView], catalog: Catalog | None = None, measured: Measurements = EMPTY
) -> tuple[list[tuple[NodeView, Fit | None]], dict[str, str]]:
    """The nodes where some profile of `job` fits (or fit cannot be judged: None), with planning's verdict;
    and why each other was left out."""
    fitting: list[tuple[NodeView, Fit | None]] = []
    takers, rejected = model_takers(job, nodes)
    for node in takers:
        if job.loras and (lacking := node.lacks(job.loras)):
            rejected[node.name] = f"{node.name} lacks {lacking}"
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


def _load_estimate(
    node: str | None, model: str, fit: Fit | None, device: Device | None, measured: Measurements,
    peers: Sequence[str] = (),
) -> float:
    """Seconds to load `model` (in `fit`'s profile) on `node`: as it measured (None: do not ask), else as the
    nodes of its kind (`peers`) measured, else predicted from the weights; a model the planner cannot predict
    takes the farm's measured figure for it, else LOAD_OVERHEAD_S."""
    profile = fit.profile if fit is not None else None
    if node is not None and (seconds := measured.load_seconds(node, model, profile)) is not None:
        return seconds
    if peers and (seconds := measured.kind_load_seconds(peers, model, profile)) is not None:
        return seconds
    if fit is not None and device is not None:
        return load_seconds(fit, device)
    farm = measured.farm_load_seconds(model)
    return farm if farm is not None else LOAD_OVERHEAD_S


def score(
    job: JobShape, node: NodeView, fit: Fit | None, measured: Measurements = EMPTY, peers: Sequence[str] = ()
) -> Decision:
    """Estimated finish: the node's backlog, then a load when its cache will not hold the model's pipeline
    (see `_load_estimate`; `peers`: the nodes of its kind), then the run: steps x the node's measured seconds
    per step where it has them, else the prediction, else (a model without component data) the farm's
    measured mean for the model, else UNKNOWN_S_PER_STEP; plus, for an image task, the predicted VAE encode."""
    own = measured.seconds_per_step(node.name, job.model, job.width, job.height, job.num_images)
    per_step = _seconds_per_step(job, fit, own, measured)
    profile = fit.profile if fit is not None else None
    held = node.holds(job.model, profile)
    load = 0.0 if held else _load_estimate(node.name, job.model, fit, node.device, measured, peers)
    # A pipeline with other LoRAs applied switches them first; a pipeline loaded for the job applies its own.
    load += lora_switch_seconds(node.applied_to(job.model) if held else (), job.loras)
    run = job.steps * per_step + _encode_seconds(fit)
    leftover = fit.usable_gib - fit.peak_gib if fit is not None else (node.device.vram_gib if node.device else 0.0)
    return Decision(
        node=node.name, profile=profile or "", finish_s=node.backlog_s + load + run, run_s=run, load_s=load,
        leftover_gib=leftover, weights_bytes=_weights_bytes(fit),
    )


def lora_switch_seconds(applied: tuple, wanted: tuple) -> float:
    """Predicted seconds to take a pipeline from the LoRA set `applied` to `wanted` (JobSpec.lora_set() form):
    nothing when they are the same; else a fixed cost (unfusing or disabling the old set) and one per LoRA
    that comes or goes or changes weight (read, loaded as an adapter or fused). Until nodes measure their
    switches, these are the planner's guess, set to a LoRA's order of size (tens to hundreds of MB) over a
    disk and a fuse pass; their point is that a node already holding the set wins near ties."""
    if applied == wanted:
        return 0.0
    changed = len(set(applied) ^ set(wanted))
    return LORA_SWITCH_BASE_S + LORA_SWITCH_PER_LORA_S * changed


def _encode_seconds(fit: Fit | None) -> float:
    """The predicted VAE encode of an image task's batch (0 for text-to-image, or a fit not judged)."""
    return fit.encode_s if fit is not None else 0.0


def _weights_bytes(fit: Fit | None) -> int:
    return int(fit.weights_gib * 2**30) if fit is not None and fit.fits else 0


def best_of(decisions: Sequence[Decision]) -> Decision | None:
    """The earliest finish; among finishes within TIE_FRACTION / TIE_SECONDS (scaled down below TIE_SCALE_S)
    of it, the least VRAM left over."""
    if not decisions:
        return None
    earliest = min(d.finish_s for d in decisions)
    limit = earliest * (1 + TIE_FRACTION) + TIE_SECONDS * min(1.0, earliest / TIE_SCALE_S)
    return min(
        (d for d in decisions if d.finish_s <= limit), key=lambda d: (d.leftover_gib, d.finish_s, d.node)
    )


def pick(
    job: JobShape, nodes: Sequence[NodeView], catalog: Catalog | None = None, measured: Measurements = EMPTY,
    kinds: Mapping[str, Sequence[str]] | None = None,
) -> Decision | None:
    """Filter, score, pick: the node where `job` fits and finishes soonest (best fit among near ties).
    None when it fits nowhere (see `why_nothing_fits`). `kinds`: `kinds_of(nodes)`, when the caller has it."""
    fitting, _ = filter_nodes(job, nodes, catalog, measured)
    if kinds is None and measured:
        kinds = kinds_of(nodes)
    return best_of([score(job, node, fit, measured, kinds.get(node.name, ()) if kinds else ())
                    for node, fit in fitting])


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
    weights_bytes: int = 0  # the profile's predicted weights (0: unknown): what its pipeline adds to the cache
    loras: tuple = ()  # the LoRA set the batch applies (JobSpec.lora_set())


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
    kinds = kinds_of(nodes) if measured else {}
    # A large farm of carded nodes decides through the index (O(kinds x log nodes) per job, see NodeIndex).
    index = NodeIndex(nodes, catalog, measured) if len(nodes) >= INDEX_FROM_NODES and all(
        n.device is not None and not n.forbidden and not n.unloadable for n in nodes) else None
    copies: dict[tuple[str, str], bool] = {}

    def uniform(job: PendingJob) -> bool:
        """Whether every node holding a known copy of the job's model holds the job's copy."""
        key = (job.model, job.fingerprint or "")
        if key not in copies:
            copies[key] = all((n.fingerprints or {}).get(job.model) in (None, job.fingerprint) for n in nodes)
        return copies[key]

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
        # The index knows nothing of LoRAs nor of model copies: a job with LoRAs, or pinned to a copy that some
        # node does not hold, is placed by `pick`, which checks who holds them.
        indexed = index is not None and not head.loras and (head.fingerprint is None or uniform(head))
        decision = index.pick(head.shape) if indexed else pick(
            head.shape, list(views.values()), catalog, measured, kinds)
        if decision is None:
            plan.unplaced[head.id] = why_nothing_fits(head.shape, list(views.values()), catalog, measured) or "no node"
            continue
        node = views[decision.node]
        fit = fit_for(head.shape, node, catalog, measured)
        limit = min(max_batch_images, node.max_batch or max_batch_images)
        if fit is not None:
            limit = min(limit, max(head.num_images, largest_batch(
                head.model, head.width, head.height, node.device, limit, catalog, measured, head.task)))
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
                             fit_for(replace(head.shape, num_images=images), node, catalog, measured), measured,
                             kinds.get(node.name, ()))
        start = node.backlog_s + decision.load_s
        for job in batch:
            plan.etas[job.id] = Eta(position, node.name, start, decision.finish_s)
            position += 1
        if slots[node.name] > 0:
            slots[node.name] -= 1
            plan.assignments.append(Assignment(
                node.name, tuple(j.id for j in batch), head.model, decision.profile, decision.run_s, decision.finish_s,
                decision.weights_bytes, head.loras,
            ))
        views[node.name] = node.after_batch(head.model, decision.profile or None, decision.weights_bytes,
                                            decision.finish_s, head.loras)
        if index is not None:
            index.update(views[node.name])
    return plan


@dataclass
class _Kind:
    """The nodes of one card in a NodeIndex: a heap of all their backlogs, one per pipeline they hold, and the
    figures they share (seconds per step, load times), cached per job shape."""

    device: Device
    heap: list[tuple[float, str]] = field(default_factory=list)
    holding: dict[tuple[str, str | None], list[tuple[float, str]]] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    speeds: dict[tuple, float | None] = field(default_factory=dict)
    loads: dict[tuple[str, str | None], float] = field(default_factory=dict)
    verdicts: dict[JobShape, tuple | None] = field(default_factory=dict)


class NodeIndex:
    """`pick` for large farms: nodes grouped by device, each group a heap of backlogs (all nodes, and the nodes
    holding each (model, profile) pipeline), so a decision costs O(kinds x log nodes) whatever the farm's and
    the queue's size. Chooses as `pick` over the same views, with one difference: a node kind shares one
    speed and one load time (what its nodes measured for the job, else the prediction), where `pick` uses
    each node's own. Stale heap entries are dropped lazily when they reach the top. Nodes without a card are
    not indexed."""

    def __init__(
        self, nodes: Sequence[NodeView] = (), catalog: Catalog | None = None, measured: Measurements = EMPTY
    ):
        self.catalog, self.measured = catalog, measured
        self._views: dict[str, NodeView] = {}
        self._kinds: dict[Device, _Kind] = {}
        for node in nodes:
            if node.device is not None:
                self.update(node)

    def __len__(self) -> int:
        return len(self._views)

    def update(self, node: NodeView) -> None:
        """Index `node` as it is now (its backlog and its cache), replacing what was known of it."""
        if node.device is None:
            raise ValueError(f"node {node.name} has no card: it cannot be indexed")
        kind = self._kinds.get(node.device)
        if kind is None:
            kind = self._kinds[node.device] = _Kind(node.device)
        if node.name not in self._views:
            kind.members.append(node.name)
        self._views[node.name] = node
        entry = (node.backlog_s, node.name)
        heapq.heappush(kind.heap, entry)
        for pipeline in _pipelines(node):
            heapq.heappush(kind.holding.setdefault(pipeline, []), entry)

    def _top(self, heap: list[tuple[float, str]] | None, pipeline: tuple[str, str | None] | None):
        while heap:
            backlog, name = heap[0]
            view = self._views[name]
            if view.backlog_s == backlog and (pipeline is None or _has(view, pipeline)):
                return heap[0]
            heapq.heappop(heap)
        return None

    def _kind_speed(self, kind: _Kind, model: str, width: int, height: int, batch: int) -> float | None:
        """The mean seconds per step the nodes of this kind measured for the job; None: none did."""
        if not self.measured:
            return None
        key = (model, width, height, batch)
        if key not in kind.speeds:
            speeds = [
                v for name in kind.members
                if (v := self.measured.seconds_per_step(name, model, width, height, batch)) is not None
            ]
            kind.speeds[key] = sum(speeds) / len(speeds) if speeds else None
        return kind.speeds[key]

    def _kind_load(self, kind: _Kind, model: str, fit: Fit | None) -> float:
        """What a load of `model` costs a node of this kind: what its nodes measured, else the prediction."""
        key = (model, fit.profile if fit is not None else None)
        if key not in kind.loads:
            kind.loads[key] = _load_estimate(
                None, model, fit, kind.device, self.measured, kind.members if self.measured else ())
        return kind.loads[key]

    def _verdict(self, kind: _Kind, job: JobShape) -> tuple | None:
        """What `job` costs a node of this kind, whatever its state: (run s, profile, its base name, VRAM left
        over, predicted weight bytes, a load's seconds); None when it does not fit. Cached per job shape."""
        if job in kind.verdicts:
            return kind.verdicts[job]
        fit = fit_on(job.model, job.width, job.height, job.num_images, kind.device, self.catalog, self.measured,
                     job.task) if plannable(job.model, self.catalog) else None
        verdict = None
        if fit is None or fit.fits:
            speed = self._kind_speed(kind, job.model, job.width, job.height, job.num_images)
            run = job.steps * _seconds_per_step(job, fit, speed, self.measured) + _encode_seconds(fit)
            leftover = fit.usable_gib - fit.peak_gib if fit is not None else kind.device.vram_gib
            verdict = (run, (fit.profile or "") if fit is not None else "",
                       base_profile(fit.profile) if fit is not None else None, leftover, _weights_bytes(fit),
                       self._kind_load(kind, job.model, fit))
        kind.verdicts[job] = verdict
        return verdict

    def pick(self, job: JobShape) -> Decision | None:
        decisions = []
        model = job.model
        for kind in self._kinds.values():
            verdict = self._verdict(kind, job)
            if verdict is None:
                continue
            run, profile, base, leftover, weights, load_s = verdict
            options = []
            # A node holding the job's pipeline: under its profile, or under one its record did not name.
            for pipeline in ((model, base), (model, ANY_PROFILE)):
                holding = self._top(kind.holding.get(pipeline), pipeline)
                if holding is not None:
                    options.append((holding[0] + run, holding[1], 0.0))
            anyone = self._top(kind.heap, None)
            if anyone is not None:
                load = 0.0 if self._views[anyone[1]].holds(model, base) else load_s
                options.append((anyone[0] + load + run, anyone[1], load))
            if options:
                finish, name, load = min(options)
                decisions.append(Decision(name, profile, finish, run, load, leftover, weights))
        return best_of(decisions)

    def commit(self, job: JobShape, decision: Decision) -> None:
        """Record `decision`: the node's backlog grows to the job's finish and its cache takes the job's model."""
        view = self._views[decision.node]
        self.update(view.after_batch(job.model, decision.profile or None, decision.weights_bytes, decision.finish_s,
                                     job.loras))


def _pipelines(node: NodeView) -> Iterator[tuple[str, str | None]]:
    """(model, profile) of each pipeline `node` holds; ANY_PROFILE: one its record did not name."""
    if node.cache is not None:
        return ((e.model, e.profile) for e in node.cache.entries)
    return ((model, ANY_PROFILE) for model in node.loaded_models)


def _has(node: NodeView, pipeline: tuple[str, str | None]) -> bool:
    """Whether `node` holds exactly this (model, profile) pipeline (ANY_PROFILE: one its record did not name)."""
    model, profile = pipeline
    if node.cache is not None:
        return any(e.model == model and e.profile == profile for e in node.cache.entries)
    return profile == ANY_PROFILE and model in node.loaded_models
