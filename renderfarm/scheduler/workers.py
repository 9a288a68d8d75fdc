"""The scheduler's table of workers: what it knows of each node, shared by its managers.

The loop thread is the only writer; `stats()` reads the table from other threads (the scheduler actor runs
with max_concurrency > 1), so whatever changes the table's size or a set that `stats` iterates does so under
`lock`, and readers take it too.

Each worker's pipeline cache is modelled (`CacheModel`): what its node record last said the cache held, with
the batches sent since then loaded on top by the cache's own rules (planning/fit.py CacheView), so the
planner knows what each node will hold when the next batch reaches it, and what a batch sent there evicts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Container, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from renderfarm.loras.assets import model_fingerprints
from renderfarm.planning.devices import Device, device_from_record
from renderfarm.planning.fit import ANY_PROFILE, CachedPipeline, CacheView

log = logging.getLogger(__name__)

SENT_REMEMBERED = 64  # batches sent to one worker kept for replay until its record catches up (a backstop)


def cache_from_record(info: Mapping[str, Any]) -> CacheView:
    """A worker's pipeline cache as its node record describes it: the `cache` field (actors/pipelines.py
    PipelineCache.describe: caps, pipelines least recently used first with their bytes, the bytes of every
    pipeline loaded before); without a readable one, the `loaded` model names under the default caps, each
    matching the model under any profile (ANY_PROFILE). Malformed parts are skipped: a record never stops the
    scheduler."""
    loaded = info.get("loaded")
    names = tuple(CachedPipeline(m, ANY_PROFILE) for m in loaded if isinstance(m, str)) \
        if isinstance(loaded, list) else ()
    cache = info.get("cache")
    if not isinstance(cache, Mapping):
        return CacheView(entries=names)
    try:
        count, budget = cache.get("max_pipelines"), cache.get("max_bytes")
        if isinstance(count, bool) or not isinstance(count, int):
            raise ValueError(f"max_pipelines={count!r} is not an integer")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)):
            raise ValueError(f"max_bytes={budget!r} is not an integer")
        return CacheView(count, budget, _pipelines(cache.get("entries")), _pipelines(cache.get("sizes")))
    except ValueError as exc:
        log.warning("node %s: pipeline cache record not understood (%s); modelled from its loaded models",
                    info.get("name"), exc)
        return CacheView(entries=names)


def applied_from_record(info: Mapping[str, Any]) -> dict[str, tuple]:
    """model -> the LoRA set its pipeline has applied, from a node record's `applied_loras` (the worker writes
    {model: [[name, sha256, weight], ...]}); malformed parts are skipped."""
    raw = info.get("applied_loras")
    out: dict[str, tuple] = {}
    if not isinstance(raw, Mapping):
        return out
    for model, loras in raw.items():
        if isinstance(model, str) and isinstance(loras, list) and all(
                isinstance(x, list) and len(x) == 3 and isinstance(x[0], str) and isinstance(x[2], (int, float))
                for x in loras):
            out[model] = tuple(sorted((x[0], x[1] if isinstance(x[1], str) else None, float(x[2])) for x in loras))
    return out


def _pipelines(raw: Any) -> tuple[CachedPipeline, ...]:
    if not isinstance(raw, list):
        raise ValueError(f"expected a list of pipelines, got {type(raw).__name__}")
    out = []
    for item in raw:
        model = item.get("model") if isinstance(item, Mapping) else None
        profile, size = (item.get("profile"), item.get("bytes")) if isinstance(item, Mapping) else (None, None)
        if not isinstance(model, str) or (profile is not None and not isinstance(profile, str)) or \
                isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"pipeline {item!r} needs model, profile (or null) and bytes >= 0")
        out.append(CachedPipeline(model, profile or None, size))
    return tuple(out)


class CacheModel:
    """The scheduler's model of one worker's pipeline cache. `view` is what the cache will hold once the
    batches sent to the worker have run: the last reported contents (`reported`) with the load of each batch
    sent since replayed on top, in the order sent (the order the worker runs them). A batch the worker ran
    before its record was written replays harmlessly: a load of a pipeline the cache holds only refreshes
    it, and whatever came after it replays after it."""

    def __init__(self, reported: CacheView | None = None, applied: Mapping[str, tuple] | None = None):
        self.reported = reported if reported is not None else CacheView()
        self.view = self.reported  # immutable: readers on other threads take it whole
        # model -> the LoRA set (JobSpec.lora_set() form) its pipeline has applied, with the sent batches' on top
        self.applied: Mapping[str, tuple] = dict(applied or {})
        self._sent: list[tuple[Any, str, str | None, int, tuple]] = []  # (ref, model, profile, bytes, LoRA set)

    def sent(self, ref: Any, model: str, profile: str | None = None, predicted_bytes: int = 0,
             loras: tuple = ()) -> None:
        """A batch of `model` under `profile` with `loras` applied was sent (`ref`: its handle, for `report`)."""
        self._sent = [*self._sent, (ref, model, profile or None, predicted_bytes, loras)][-SENT_REMEMBERED:]
        self.view = self.view.load(model, profile or None, predicted_bytes)
        self.applied = {**self.applied, model: loras}

    def report(self, reported: CacheView, in_flight: Container[Any],
               applied: Mapping[str, tuple] | None = None) -> None:
        """The worker's record says its cache holds `reported` (with the LoRA sets `applied`); the batches sent
        that are still `in_flight` are loaded on top of it (the others are in the record already)."""
        self._sent = [s for s in self._sent if s[0] in in_flight]
        view, sets = reported, dict(applied or {})
        for _, model, profile, predicted, loras in self._sent:
            view = view.load(model, profile, predicted)
            sets[model] = loras
        self.reported, self.view, self.applied = reported, view, sets


@dataclass
class Worker:
    name: str
    handle: Any  # handle.WorkerHandle (None in tests that never call a worker)
    cache: CacheModel = field(default_factory=CacheModel)  # its pipeline cache, as the planner models it
    device: Device | None = None  # its card, for fit checks
    alive: bool = True
    draining: bool = False  # finishes what it holds, takes nothing new (`renderfarm drain`, the dashboard)
    suspect: bool = False  # a lease of its expired (hung?): no new work, no renewals, until a batch returns
    failures: int = 0  # batches failed in a row by the node's fault (renderfarm/faults.py)
    fault_reasons: list[str] = field(default_factory=list)  # why each of those failed, oldest first
    inflight: int = 0  # batches sent and not yet returned
    recovered: set[str] = field(default_factory=set)  # jobs it was rendering when this scheduler started
    pid: int | None = None  # its process: a record with another pid is a new worker of the same name
    silent: bool = False  # taken out because its heartbeat went stale (not because Ray reported it dead)
    forbidden: frozenset[str] = frozenset()  # node overrides: models never sent here,
    max_batch: int | None = None  # and the most images per call
    unloadable: dict[str, str] = field(default_factory=dict)  # model -> why it cannot load it (its record)
    fingerprints: dict[str, str] = field(default_factory=dict)  # model -> which copy it holds (its record)
    loras: frozenset[tuple[str, str]] = frozenset()  # (name, sha256) of the LoRAs it holds (loras/assets.py)
    assets_version: str | None = None  # the digest of what it published last (node record `assets_version`)
    busy_until: float = 0.0  # epoch seconds its sent batches are expected to be done
    estimates: dict[Any, float] = field(default_factory=dict)  # batch ref -> its estimated seconds

    def backlog(self, now: float) -> float:
        return max(0.0, self.busy_until - now)

    @property
    def loaded(self) -> frozenset[str]:
        """The models its cache will hold once the batches sent to it have run."""
        return self.cache.view.models

    def has_room(self, queue_depth: int) -> bool:
        """Alive, not draining, with fewer batches queued than a worker may hold. A suspect (a lease of its
        expired) holding nothing gets one batch as a probe: its answer clears the suspicion, and a node that
        rejoined after a restart is not left idle forever waiting for a batch nobody sends."""
        held = self.inflight + (1 if self.recovered else 0)
        probe = self.suspect and held == 0
        return self.alive and not self.draining and (not self.suspect or probe) and held < queue_depth


def worker_from_info(name: str, handle: Any, info: dict[str, Any]) -> Worker:
    """A worker as its ready() info or its node record describes it (card, loaded models, overrides). A card
    that does not describe a device raises CorruptRecord (see `device_from_record`)."""
    forbid = info.get("forbid_models")
    max_batch = info.get("max_batch")
    return Worker(
        name, handle, CacheModel(cache_from_record(info), applied_from_record(info)), device_from_record(info),
        pid=info.get("pid") if isinstance(info.get("pid"), int) else None,
        forbidden=frozenset(m for m in forbid if isinstance(m, str)) if isinstance(forbid, list) else frozenset(),
        max_batch=max_batch if isinstance(max_batch, int) and max_batch >= 1 else None,
        unloadable=unloadable_from_record(info),
        fingerprints=model_fingerprints(info),
    )


def unloadable_from_record(info: Mapping[str, Any]) -> dict[str, str]:
    """model -> why the node cannot load it, from its record's `unloadable` (actors/loading.py why_unloadable,
    written at start); malformed entries are skipped."""
    raw = info.get("unloadable")
    if not isinstance(raw, Mapping):
        return {}
    return {str(model): str(why) for model, why in raw.items() if isinstance(model, str) and isinstance(why, str)}


class WorkerTable:
    """Workers by name. Reads of one entry need no lock (a dict lookup is atomic); iteration returns a
    snapshot taken under the lock, so a worker adopted meanwhile never breaks an iteration in progress."""

    def __init__(self, workers: dict[str, Worker] | None = None):
        self.lock = threading.RLock()
        self._workers: dict[str, Worker] = dict(workers or {})

    def __getitem__(self, name: str) -> Worker:
        return self._workers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._workers

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> Worker | None:
        return self._workers.get(name)

    def names(self) -> list[str]:
        with self.lock:
            return list(self._workers)

    def values(self) -> list[Worker]:
        with self.lock:
            return list(self._workers.values())

    def put(self, worker: Worker) -> None:
        """Add a worker, or replace the one of the same name (a worker that rejoined is a new object)."""
        with self.lock:
            self._workers[worker.name] = worker

    def add_loaded(
        self, worker: Worker, model: str, profile: str | None = None, predicted_bytes: int = 0, ref: Any = None,
        loras: tuple = (),
    ) -> None:
        """A batch of `model` under `profile` (with `loras`) was sent to `worker` (`ref`: its handle): its cache
        loads the pipeline (predicted at `predicted_bytes` unless the worker measured it) and evicts what that
        pushes out; the pipeline will have those LoRAs applied."""
        with self.lock:
            worker.cache.sent(ref, model, profile, predicted_bytes, loras)

    def report_cache(self, worker: Worker, record: Mapping[str, Any], in_flight: Container[Any]) -> None:
        """`worker`'s node record arrived: model its cache from it, with the batches still `in_flight` on top."""
        with self.lock:
            worker.cache.report(cache_from_record(record), in_flight, applied_from_record(record))

    def stats(self, now: float) -> dict[str, dict[str, Any]]:
        """Each worker's state for `Scheduler.stats`, safe to call from any thread."""
        with self.lock:
            return {w.name: {"alive": w.alive, "draining": w.draining, "suspect": w.suspect,
                             "failures": w.failures, "inflight": w.inflight,
                             "loaded": sorted(w.loaded),
                             "backlog_s": round(w.backlog(now), 3)}
                    for w in self._workers.values()}
