"""What fits where: planning's verdict for a job shape on a device or a set of nodes, with no Ray and no Redis.

The client asks `why_nothing_fits` at submit (a job no node can run is refused with the reason); the
scheduler's placement (scheduler/placement.py) filters and scores nodes with `fit_for`; `largest_batch` says
how many images fit one pipeline call. Every verdict comes from `choose_profile` over the VRAM and host
model, with the peaks that nodes measured (planning/measured.py) as floors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

from renderfarm.planning.catalog import Catalog, default_catalog
from renderfarm.planning.choose import choose_profile
from renderfarm.planning.devices import Device
from renderfarm.planning.measured import EMPTY, Measurements

__all__ = [
    "ANY_PROFILE", "CacheView", "CachedPipeline", "Fit", "JobShape", "NodeView", "base_profile", "fit_for", "fit_on",
    "largest_batch", "plannable", "why_nothing_fits",
]

# What a worker's pipeline cache holds unless told otherwise: actors/pipelines.py DEFAULT_MAX_PIPELINES
# (planning cannot import actors; tests/unit/test_cache_view.py pins the two equal).
DEFAULT_MAX_PIPELINES = 2
# The profile of a cached pipeline known only by its model (a record that lists model names): it matches a
# job of that model under any profile. No profile is named so (names are formats and placements).
ANY_PROFILE = "*"


@dataclass(frozen=True)
class JobShape:
    """What placement needs of a job: the model, the size, the steps and the images in one call, and its task
    (JobSpec.task: "txt2img", or "img2img" and "inpaint", which the VAE-encode stage makes larger and longer)."""

    model: str
    width: int
    height: int
    steps: int
    num_images: int = 1
    # Its LoRAs as JobSpec.lora_set() gives them: (name, sha256 or None when not pinned, weight), name order.
    loras: tuple[tuple[str, str | None, float], ...] = ()
    fingerprint: str | None = None  # the copy of the model it is pinned to (JobSpec.model_fingerprint)
    task: str = "txt2img"

    def describe(self) -> str:
        task = f" {self.task}" if self.task != "txt2img" else ""
        return f"{self.model}{task} at {self.width}x{self.height}, batch {self.num_images}"


def base_profile(profile: str | None) -> str | None:
    """A profile's name without its VAE mode (as planning.profiles.Profile.base_name): what identifies a
    loaded pipeline, since a VAE mode is a switch on it. None for "" or None: no profile (a pipeline loaded as
    the model's files are) or one the planner cannot name."""
    return profile.rsplit("+vae-", 1)[0] if profile else None


@dataclass(frozen=True)
class CachedPipeline:
    """One pipeline in a worker's cache: its model, its profile (base name; None: loaded without one;
    ANY_PROFILE: not known) and the bytes of its weights (0: unknown)."""

    model: str
    profile: str | None = None
    bytes: int = 0


@dataclass(frozen=True)
class CacheView:
    """A worker's pipeline cache as the planner models it, with the rules of actors/pipelines.PipelineCache:
    keyed by (model, profile); a hit makes the pipeline the most recently used; a miss first evicts least
    recently used ones until fewer than `max_pipelines` remain, then loads, then (with `max_bytes`) evicts
    least recently used ones while the weights together exceed `max_bytes`, though never the one just loaded
    (one pipeline larger than the budget is still kept). The bytes of a load are what the worker measured
    for that pipeline before (`sizes`), else the planner's prediction. The cache's host-memory evictions
    (a profile whose pinned copies do not fit the machine's RAM beside the others) are not modelled: the
    worker's next record says what they did.

    An entry whose profile is ANY_PROFILE matches a job of that model under any profile: a record that listed
    only model names says no more than that."""

    max_pipelines: int = DEFAULT_MAX_PIPELINES
    max_bytes: int | None = None
    entries: tuple[CachedPipeline, ...] = ()  # least recently used first
    sizes: tuple[CachedPipeline, ...] = ()  # bytes of each pipeline loaded before (loaded or not now)

    def __post_init__(self) -> None:
        if self.max_pipelines < 1:
            raise ValueError(f"max_pipelines={self.max_pipelines} must be >= 1")
        if self.max_bytes is not None and self.max_bytes < 1:
            raise ValueError(f"max_bytes={self.max_bytes} must be positive (or None: no byte budget)")

    @property
    def models(self) -> frozenset[str]:
        return frozenset(e.model for e in self.entries)

    @property
    def bytes_loaded(self) -> int:
        return sum(e.bytes for e in self.entries)

    def _find(self, model: str, profile: str | None) -> int | None:
        """Index of the entry a job of `model` under `profile` would use; None: a load."""
        wanted = base_profile(profile)
        for i in range(len(self.entries) - 1, -1, -1):
            entry = self.entries[i]
            if entry.model == model and (entry.profile == wanted or entry.profile == ANY_PROFILE):
                return i
        return None

    def holds(self, model: str, profile: str | None = None) -> bool:
        """Whether a batch of `model` under `profile` (None: none, or unknown) finds its pipeline loaded."""
        return self._find(model, profile) is not None

    def size_of(self, model: str, profile: str | None) -> int | None:
        """Bytes the worker measured for this pipeline when it last held it; None: never measured."""
        key = (model, base_profile(profile))
        for entry in (*reversed(self.entries), *reversed(self.sizes)):
            if (entry.model, entry.profile) == key and entry.bytes:
                return entry.bytes
        return None

    def load(self, model: str, profile: str | None = None, predicted_bytes: int = 0) -> CacheView:
        """The cache after a batch of `model` under `profile` took its pipeline (see the class's rules);
        `predicted_bytes` counts for a pipeline whose size the worker never measured."""
        found = self._find(model, profile)
        entries = list(self.entries)
        if found is not None:
            entries.append(entries.pop(found))
            return replace(self, entries=tuple(entries))
        del entries[:max(0, len(entries) - self.max_pipelines + 1)]
        loaded = CachedPipeline(model, base_profile(profile), self.size_of(model, profile) or max(0, predicted_bytes))
        entries.append(loaded)
        if self.max_bytes is not None:
            while len(entries) > 1 and sum(e.bytes for e in entries) > self.max_bytes:
                entries.pop(0)
        sizes = self.sizes
        if loaded.bytes and not any((s.model, s.profile) == (loaded.model, loaded.profile) for s in sizes):
            sizes = (*sizes, loaded)
        return replace(self, entries=tuple(entries), sizes=sizes)


@dataclass(frozen=True)
class NodeView:
    name: str
    device: Device | None  # None: a node that reported no card (nothing can be planned on it)
    loaded_models: frozenset[str] = frozenset()  # without `cache`: what it holds (never evicted)
    backlog_s: float = 0.0  # estimated seconds of work already sent to the node and not finished
    slots: int = 0  # batches it can take now (live planning); 0: it takes work only when one frees up
    forbidden: frozenset[str] = frozenset()  # models never sent here (a node override)
    max_batch: int | None = None  # most images in one pipeline call here (a node override)
    cache: CacheView | None = None  # its pipeline cache once the work sent to it is done (None: not modelled)
    loras: frozenset[tuple[str, str]] = frozenset()  # (name, sha256) of each LoRA it holds (loras/assets.py)
    # model -> the LoRA set its pipeline will have applied once the work sent to it is done (absent: none)
    applied: Mapping[str, tuple] | None = None
    # model -> why this node cannot load it (its record's `unloadable`: weights not on it, family unsupported)
    unloadable: Mapping[str, str] | None = None
    # model -> the fingerprint of the copy it holds (its record's `model_fingerprints`; absent: not known)
    fingerprints: Mapping[str, str] | None = None

    def refuses(self, model: str, loadable_only: bool = True, fingerprint: str | None = None) -> str | None:
        """Why `model` is not sent here (a node override; with `loadable_only`, the node saying it cannot load
        it; another copy than the job's `fingerprint`, which counts as lacking it), or None."""
        if model in self.forbidden:
            return f"{model} is forbidden on {self.name} (its node override)"
        held = (self.fingerprints or {}).get(model)
        if fingerprint is not None and held is not None and held != fingerprint:
            return f"{self.name} holds another copy of {model} ({held}, the job's is {fingerprint})"
        why = (self.unloadable or {}).get(model) if loadable_only else None
        return f"{self.name} cannot load {model}: {why}" if why else None

    def lacks(self, loras: tuple[tuple[str, str | None, float], ...]) -> str | None:
        """Which LoRA of a job's set this node does not hold (at the job's pinned hash), or None."""
        names = {name for name, _ in self.loras}
        for name, sha, _ in loras:
            if (name, sha) not in self.loras if sha is not None else name not in names:
                return f"LoRA {name!r}" + (f" (sha256 {sha[:12]})" if sha and name in names else "")
        return None

    def applied_to(self, model: str) -> tuple:
        return (self.applied or {}).get(model, ())

    def holds(self, model: str, profile: str | None = None) -> bool:
        """Whether a batch of `model` under `profile` reaching this node finds its pipeline loaded."""
        return self.cache.holds(model, profile) if self.cache is not None else model in self.loaded_models

    def after_batch(self, model: str, profile: str | None, predicted_bytes: int, backlog_s: float,
                    loras: tuple = ()) -> NodeView:
        """The node once a batch of `model` under `profile` (with `loras` applied) is committed to it: its backlog
        is `backlog_s`, its cache holds the model (and has evicted what the load pushes out) with those LoRAs."""
        cache = self.cache.load(model, profile, predicted_bytes) if self.cache is not None else None
        loaded = cache.models if cache is not None else (
            self.loaded_models if model in self.loaded_models else self.loaded_models | {model})
        applied = self.applied
        if loras != self.applied_to(model):
            applied = {**(applied or {}), model: loras}
        # The constructor, not dataclasses.replace: this runs once per planned batch, and replace is 5x slower.
        return NodeView(self.name, self.device, loaded, backlog_s, self.slots, self.forbidden, self.max_batch, cache,
                        self.loras, applied, self.unloadable, self.fingerprints)


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
    encode_s: float = 0.0  # the chosen profile's VAE encode of the batch (an image task; 0 for txt2img)


@lru_cache(maxsize=65536)
def fit_on(
    model: str, width: int, height: int, batch: int, device: Device, catalog: Catalog | None = None,
    measured: Measurements = EMPTY, task: str = "txt2img",
) -> Fit:
    """Planning's verdict for `batch` images of `model` at `width` x `height` rendered as `task` on `device`
    (cached), with the models of `catalog` (default: the packaged one) and the peaks nodes measured (`measured`,
    a snapshot; they are keyed without the task, so a measured peak is a floor for every task)."""
    try:
        entry = (catalog or default_catalog()).get(model)
        floors = measured.floors(model, width, height, batch) if measured else None
        choice = choose_profile(entry, device, width, height, batch, floors=floors, task=task)
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
        encode_s=used.prediction.vae_encode_s if used else 0.0,
    )


def plannable(model: str, catalog: Catalog | None = None) -> bool:
    """Whether the catalog carries component data for `model` (without it nothing can be predicted: its
    nodes just try, and only measurements inform the estimates)."""
    try:
        return bool((catalog or default_catalog()).get(model).components)
    except ValueError:
        return False


def fit_for(
    job: JobShape, node: NodeView, catalog: Catalog | None = None, measured: Measurements = EMPTY
) -> Fit | None:
    """Planning's verdict for `job` on `node`; None when it cannot be judged (no card, or no component data):
    such a job is assumed to fit."""
    if node.device is None or not plannable(job.model, catalog):
        return None
    return fit_on(job.model, job.width, job.height, job.num_images, node.device, catalog, measured, job.task)


def model_takers(job: JobShape, nodes: Sequence[NodeView]) -> tuple[list[NodeView], dict[str, str]]:
    """The nodes `job`'s model may go to, and why each other may not: never where it is forbidden or where another
    copy of it is held; not where the node says it cannot load it, unless every node says so: then it goes where
    it may run, the node's load fails it as the job's fault (faults.py) and no node is charged, while a job that
    some node can load never fails on one that cannot."""
    loadable_only = any(not n.refuses(job.model, True, job.fingerprint) for n in nodes)
    takers: list[NodeView] = []
    refused: dict[str, str] = {}
    for node in nodes:
        if why := node.refuses(job.model, loadable_only, job.fingerprint):
            refused[node.name] = why
        else:
            takers.append(node)
    return takers, refused


def why_nothing_fits(
    job: JobShape, nodes: Sequence[NodeView], catalog: Catalog | None = None, measured: Measurements = EMPTY
) -> str | None:
    """None when `job` fits some node (or fit cannot be judged on one); else one line naming what it needs
    and the largest node."""
    allowed, refused = model_takers(job, nodes)
    if not allowed:
        if not nodes:
            return f"{job.describe()}: there are no nodes"
        return f"{job.describe()}: no node takes {job.model} (" + "; ".join(
            why for _, why in sorted(refused.items())) + ")"
    if job.loras:
        lacking = {n.name: n.lacks(job.loras) for n in allowed}
        allowed = [n for n in allowed if lacking[n.name] is None]
        if not allowed:
            reasons = "; ".join(f"{name} lacks {why}" for name, why in sorted(lacking.items()))
            return f"{job.describe()}: no node holds its LoRAs ({reasons})"
    nodes = allowed
    fits = [fit_for(job, n, catalog, measured) for n in nodes]
    if any(f is None or f.fits for f in fits):
        return None
    largest = max(nodes, key=lambda n: n.device.vram_gib if n.device else 0.0)
    needed = min(f.needed_gib for f in fits if f is not None)
    if math.isinf(needed):
        return f"{job.describe()}: {fits[0].reason}"
    # Some card could hold a profile, but not its machine's RAM: say so, not "needs more VRAM".
    for node, fit in zip(nodes, fits):
        if fit is not None and node.device is not None and fit.needed_gib <= node.device.vram_gib:
            return f"{job.describe()} on {node.name}: {fit.reason}"
    return (
        f"{job.describe()} needs at least {needed:.1f} GiB in its most frugal profile; "
        f"the largest node ({largest.name}) has {largest.device.vram_gib:g} GiB"
    )


def largest_batch(
    model: str, width: int, height: int, node: NodeView | Device, limit: int = 64, catalog: Catalog | None = None,
    measured: Measurements = EMPTY, task: str = "txt2img",
) -> int:
    """The most images of `model` at `width` x `height` (rendered as `task`) predicted to fit in one call on
    `node` (0: not even one), at most `limit`. Peaks (predicted and measured floors alike) grow with the batch, so
    a binary search suffices."""
    device = node.device if isinstance(node, NodeView) else node
    if not fit_on(model, width, height, 1, device, catalog, measured, task).fits:
        return 0
    low, high = 1, limit  # low fits; find the largest that does
    while low < high:
        mid = (low + high + 1) // 2
        if fit_on(model, width, height, mid, device, catalog, measured, task).fits:
            low = mid
        else:
            high = mid - 1
    return low
