"""The controller: one per farm. It owns dispatch: read pending -> plan -> lease -> call workers.

A plain class, made a Ray actor by `farm.py` (with max_concurrency > 1 so `stop()` and `stats()` reach it
while `run()` loops). Worker handles are given to it; it never imports actor code. All hard state lives in
Redis, so a restarted scheduler rebuilds its view from there.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from renderfarm.cluster.keys import Keys
from renderfarm.cluster.redis_server import connect
from renderfarm.cluster.store import Store
from renderfarm.config import Settings
from renderfarm.jobs import JobSpec, JobState
from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.devices import Device, device_from_record
from renderfarm.scheduler.placement import PendingJob, WorkerView, plan_dispatch

log = logging.getLogger(__name__)

PENDING_WINDOW = 2000  # how far down the queue one planning round looks
IDLE_WAKE_SECONDS = 0.5  # longest sleep; bounds how late `stop()` is noticed


@dataclass
class _Worker:
    name: str
    handle: Any
    vram_gib: float
    loaded: set[str]
    device: Device | None = None  # its card, for fit checks
    alive: bool = True
    inflight: int = 0  # batches sent and not yet returned


class Scheduler:
    def __init__(
        self,
        redis_url: str,
        settings: dict[str, Any],
        workers: dict[str, tuple[Any, dict[str, Any]]],
        key_prefix: str = "rf",
    ):
        self.settings = Settings.model_validate(settings)
        self.store = Store(connect(redis_url), Keys(key_prefix))
        self.catalog = default_catalog(self.settings.models_file)
        self.workers = {
            name: _Worker(name, handle, float(info.get("vram_gib", 0)), set(info.get("loaded", [])), device_from_record(info))
            for name, (handle, info) in workers.items()
        }
        self._inflight: dict[Any, tuple[str, tuple[str, ...]]] = {}
        self._specs: dict[str, JobSpec] = {}
        self._stop = threading.Event()
        last = self.store.redis.xrevrange(self.store.keys.events, count=1)
        self._cursor = last[0][0] if last else b"0-0"
        self.counters = {"dispatched": 0, "retried": 0, "failed": 0, "worker_deaths": 0, "loops": 0}
        self._recover()

    # --- public ---------------------------------------------------------------------------------------

    def run(self) -> dict[str, int]:
        """Loop until `stop()`: one planning round, then sleep until something can change the plan."""
        while not self._stop.is_set():
            self.counters["loops"] += 1
            try:
                self._dispatch()
                self._wait()
            except Exception:  # one bad round must not stop the farm
                log.exception("scheduler round failed")
                self._stop.wait(self.settings.poll_seconds)
        return dict(self.counters)

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "inflight": len(self._inflight),
            "workers": {w.name: {"alive": w.alive, "inflight": w.inflight, "loaded": sorted(w.loaded)}
                        for w in self.workers.values()},
        }

    # --- one round ------------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Jobs leased or running when a previous scheduler stopped are not owned by anything we know:
        put them back in the queue (their attempt was counted when they were leased)."""
        for state in (JobState.LEASED, JobState.RUNNING):
            for job_id in self.store.ids_in(state, limit=100_000):
                self.store.requeue(job_id, "scheduler restarted while the job was in flight")

    def _has_room(self, worker: _Worker) -> bool:
        """Alive, with fewer batches queued than a worker may hold."""
        return worker.alive and worker.inflight < self.settings.worker_queue_depth

    def _dispatch(self) -> None:
        idle = [
            WorkerView(w.name, w.vram_gib, frozenset(w.loaded), w.inflight, w.device)
            for w in self.workers.values() if self._has_room(w)
        ]
        if not idle:
            return
        pending_ids = self.store.pending_ids(PENDING_WINDOW)
        if not pending_ids:
            return
        # Specs never change, so only new arrivals are read; what left the queue is forgotten.
        known = {i: self._specs[i] for i in pending_ids if i in self._specs}
        missing = [i for i in pending_ids if i not in known]
        if missing:
            for job_id, job in zip(missing, self.store.get_many(missing)):
                if job is not None:
                    known[job_id] = job.spec
        self._specs = known
        pending = [
            PendingJob(i, spec.model, spec.batch_key(), spec.num_images, spec.width, spec.height)
            for i in pending_ids if (spec := self._specs.get(i)) is not None
        ]
        for assignment in plan_dispatch(pending, idle, self.settings.max_batch, self.catalog):
            worker = self.workers[assignment.worker]
            deadline = time.time() + self.settings.lease_seconds
            leased = tuple(j for j in assignment.job_ids if self.store.lease(j, worker.name, deadline))
            if not leased:
                continue
            ref = worker.handle.render.remote(list(leased), deadline)
            self._inflight[ref] = (worker.name, leased)
            worker.inflight += 1
            worker.loaded.add(assignment.model)
            self.counters["dispatched"] += len(leased)

    def _wait(self) -> None:
        """Block (without spinning: a polling loop steals CPU from renders on small machines) until a
        batch finishes or, when some worker is idle, until the farm's event stream shows a change
        (a submit, a cancel, a job finishing)."""
        if not any(self._has_room(w) for w in self.workers.values()):
            self._collect(timeout=IDLE_WAKE_SECONDS)  # every worker busy: only a finished batch matters
            return
        # Workers write their jobs' "done" to the same stream, so a finishing batch wakes this too.
        entries = self.store.redis.xread({self.store.keys.events: self._cursor}, count=1000,
                                         block=int(IDLE_WAKE_SECONDS * 1000))
        for _, messages in entries or []:
            self._cursor = messages[-1][0]
        self._collect(timeout=self.settings.poll_seconds if entries else 0.0)

    def _collect(self, timeout: float) -> None:
        if not self._inflight:
            return
        # Wake as soon as any batch finishes; the rest are picked up on the next rounds.
        ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=timeout, fetch_local=False)
        for ref in ready:
            name, job_ids = self._inflight.pop(ref)
            worker = self.workers[name]
            worker.inflight -= 1
            try:
                summary = ray.get(ref, timeout=5)
            except RayActorError as exc:
                worker.alive = False
                self.counters["worker_deaths"] += 1
                log.error("node %s died: %s", name, exc)
                self._retry(job_ids, name, f"node {name} died while rendering")
                continue
            except (RayError, GetTimeoutError) as exc:
                self._retry(job_ids, name, f"node {name}: {type(exc).__name__}: {exc}")
                continue
            for job_id, error in summary["errors"].items():
                self._retry((job_id,), name, error)

    def _retry(self, job_ids: tuple[str, ...], node: str, error: str) -> None:
        """Requeue a job that still has attempts left, else fail it for good."""
        for job, job_id in zip(self.store.get_many(job_ids), job_ids):
            if job is None or job.state.terminal or job.node != node:
                continue
            if job.attempts < self.settings.max_attempts:
                if self.store.requeue(job_id, error, node=node):
                    self.counters["retried"] += 1
            elif self.store.fail(job_id, f"{error} (after {job.attempts} attempts)", node=node):
                self.counters["failed"] += 1

