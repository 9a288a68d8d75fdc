"""The controller: one per farm. It owns dispatch: read pending -> order -> plan -> lease -> call workers.

Each round reads the head of the queue (the first jobs by priority and submit time, and the oldest jobs of
every (team, priority) queue), orders them fairly (fairness.FairShare: priority, then weighted fair share
between teams, with aging), and plans them with placement.plan_dispatch: each job to the node where it is
predicted to fit and finish first, given every node's backlog, whether its model is loaded there, and the
speeds and peaks nodes measured (online calibration, read from Redis when a worker records something new).
Every `eta_seconds` the round plans the whole window and publishes each job's position and ETA.

Leases: a job leased to a node holds for `lease_seconds` past its last renewal. Every `heartbeat_seconds` the
scheduler renews the leases of the batches it has sent (the node renews those it renders), and reaps jobs
whose lease expired (their holder died or hung): each goes back to the queue, or fails once it has used
`max_attempts`. A node whose batches fail `drain_after_failures` times in a row is drained, with the reason.

A plain class, made a Ray actor by `farm.py` (with max_concurrency > 1 so `stop()` and `stats()` reach it
while its loop runs, and restarted by Ray if its process dies). Worker handles are given to it; it never
imports actor code. All hard state lives in Redis, so a restarted scheduler rebuilds its view from there:
jobs it had leased but not yet seen start go back to the queue (a node that still has them queued skips
them), jobs being rendered stay with their node under its lease.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from renderfarm.cluster.keys import Keys
from renderfarm.cluster.redis_server import connect
from renderfarm.cluster.store import Store
from renderfarm.config import Settings
from renderfarm.errors import CorruptRecord
from renderfarm.jobs import Job, JobState
from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.devices import Device, device_from_record
from renderfarm.planning.measured import EMPTY, Measurements
from renderfarm.scheduler.fairness import FairShare, Queued
from renderfarm.scheduler.placement import NodeView, PendingJob, Plan, plan_dispatch

log = logging.getLogger(__name__)

PENDING_WINDOW = 2000  # how far down the queue (priority, then submit time) one planning round looks
PER_QUEUE = 200  # and how many of the oldest jobs of each (team, priority) queue
IDLE_WAKE_SECONDS = 0.5  # longest sleep; bounds how late `stop()` is noticed


@dataclass
class _Worker:
    name: str
    handle: Any
    vram_gib: float
    loaded: set[str]
    device: Device | None = None  # its card, for fit checks
    alive: bool = True
    draining: bool = False  # finishes what it holds, takes nothing new (`renderfarm drain`, the dashboard)
    suspect: bool = False  # a lease of its expired (hung?): no new work, no renewals, until a batch returns
    failures: int = 0  # batches failed in a row
    inflight: int = 0  # batches sent and not yet returned
    recovered: set[str] = field(default_factory=set)  # jobs it was rendering when this scheduler started
    pid: int | None = None  # its process: a record with another pid is a new worker of the same name
    silent: bool = False  # taken out because its heartbeat went stale (not because Ray reported it dead)
    forbidden: frozenset[str] = frozenset()  # node overrides: models never sent here,
    max_batch: int | None = None  # and the most images per call
    busy_until: float = 0.0  # epoch seconds its sent batches are expected to be done
    estimates: dict[Any, float] = field(default_factory=dict)  # batch ref -> its estimated seconds

    def backlog(self, now: float) -> float:
        return max(0.0, self.busy_until - now)


class Scheduler:
    def __init__(
        self,
        redis_url: str,
        settings: dict[str, Any],
        workers: dict[str, tuple[Any, dict[str, Any]]],
        key_prefix: str = "rf",
        autostart: bool = False,
    ):
        self.settings = Settings.model_validate(settings)
        self.store = Store(connect(redis_url), Keys(key_prefix))
        self.catalog = default_catalog(self.settings.models_file)
        self.workers = {name: _worker(name, handle, info) for name, (handle, info) in workers.items()}
        self._inflight: dict[Any, tuple[_Worker, tuple[str, ...]]] = {}  # batch ref -> (its worker, its jobs)
        self._jobs: dict[str, Job] = {}  # queued jobs already read (a spec never changes)
        self.fair = FairShare(
            self.settings.team_weights, self.settings.fair_share_half_life_s, self.settings.aging_seconds
        )
        try:
            saved = self.store.read_fair_share()
            if saved:
                self.fair.load_json(saved)
        except (CorruptRecord, ValueError) as exc:  # the usage is advisory: start afresh, say why
            log.error("fair-share usage in Redis ignored: %s", exc)
        self.measured: Measurements = EMPTY
        self._measured_version = -1
        self._next_eta = 0.0
        self._next_sample = 0.0
        self._next_maintenance = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._result: dict[str, int] | None = None
        last = self.store.redis.xrevrange(self.store.keys.events, count=1)
        self._cursor = last[0][0] if last else b"0-0"
        self.counters = {"dispatched": 0, "retried": 0, "failed": 0, "worker_deaths": 0, "loops": 0, "eta_rounds": 0,
                         "leases_expired": 0, "recovered": 0, "auto_drained": 0, "joined": 0}
        self._recover()
        if autostart:  # as a Ray actor restarted after a crash: nobody calls run() again, so it runs itself
            self.start()

    # --- public ---------------------------------------------------------------------------------------

    def run(self) -> dict[str, int]:
        """Loop until `stop()`: one planning round, then sleep until something can change the plan."""
        while not self._stop.is_set():
            self.counters["loops"] += 1
            try:
                self._maintain()
                self._dispatch()
                self._sample()
                self._wait()
            except Exception:  # one bad round must not stop the farm
                log.exception("scheduler round failed")
                self._stop.wait(self.settings.poll_seconds)
        return dict(self.counters)

    def start(self) -> None:
        """Run the loop in a thread of this process (see `join`)."""
        def loop() -> None:
            self._result = self.run()

        self._thread = threading.Thread(target=loop, name="scheduler", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> dict[str, int] | None:
        """Wait for the loop started by `start` to end (after `stop`); its counters, None if still running."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._result

    def stop(self) -> None:
        self._stop.set()

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "inflight": len(self._inflight),
            "workers": {w.name: {"alive": w.alive, "draining": w.draining, "suspect": w.suspect,
                                 "failures": w.failures, "inflight": w.inflight,
                                 "loaded": sorted(w.loaded),
                                 "backlog_s": round(w.backlog(time.time()), 3)}
                        for w in self.workers.values()},
            "measurements": {"peaks": sum(len(p) for p in self.measured.peaks.values()),
                             "speeds": len(self.measured.speeds)},
        }

    # --- one round ------------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Rebuild the view of jobs in flight from Redis. Leased jobs that no node started are put back in the
        queue (their attempt was counted when leased; a node that still has them queued skips them); jobs
        running on a node of this farm stay with it under its lease (it renews them while rendering, else they
        expire and are reaped); those running on a node this farm does not know go back at once."""
        for job_id in self.store.ids_in(JobState.LEASED, limit=100_000):
            if self.store.requeue(job_id, "scheduler restarted before the job started", allowed_from=[JobState.LEASED]):
                self.counters["recovered"] += 1
        running = self.store.ids_in(JobState.RUNNING, limit=100_000)
        for job_id, job in zip(running, self.store.get_many(running, quarantine=True)):
            if job is None or job.state is not JobState.RUNNING:
                continue
            worker = self.workers.get(job.node or "")
            if worker is not None:
                worker.recovered.add(job_id)
            elif self.store.requeue(job_id, f"node {job.node} is not part of this farm", node=job.node,
                                    allowed_from=[JobState.RUNNING]):
                self.counters["recovered"] += 1

    def _has_room(self, worker: _Worker) -> bool:
        """Alive, not draining, not suspect, with fewer batches queued than a worker may hold."""
        held = worker.inflight + (1 if worker.recovered else 0)
        return (worker.alive and not worker.draining and not worker.suspect
                and held < self.settings.worker_queue_depth)

    def _maintain(self) -> None:
        """Every `heartbeat_seconds`: renew the leases of batches sent and not yet started or finished, reap
        jobs whose lease expired, and forget recovered jobs that have left their node."""
        now = time.time()
        if now < self._next_maintenance:
            return
        self._next_maintenance = now + self.settings.heartbeat_seconds
        held: dict[str, list[str]] = {}
        for worker, job_ids in self._inflight.values():
            if worker.alive and not worker.suspect:
                held.setdefault(worker.name, []).extend(job_ids)
        for name, job_ids in held.items():
            self.store.renew(job_ids, name, self.settings.lease_seconds)
        expired = self.store.expired()
        for job_id, job in zip(expired, self.store.get_many(expired, quarantine=True)):
            if job is None or job.state not in (JobState.LEASED, JobState.RUNNING):
                continue
            node = job.node or ""
            error = (f"lease expired on node {node}: nothing renewed it for {self.settings.lease_seconds:g} s"
                     " (the node died, hung or ran past its time limit)")
            if self._retry((job_id,), node, error, expired_only=True):
                self.counters["leases_expired"] += 1
                self.store.count("leases_expired")
                worker = self.workers.get(node)
                if worker is not None:
                    worker.suspect = True
                    self._node_failed(worker, error)
        for worker in self.workers.values():
            if worker.recovered:
                jobs = self.store.get_many(sorted(worker.recovered), quarantine=True)
                worker.recovered = {j.id for j in jobs
                                    if j is not None and j.state is JobState.RUNNING and j.node == worker.name}

    def _node_failed(self, worker: _Worker, reason: str) -> None:
        """One more failed batch in a row for `worker`; drain it at `drain_after_failures`."""
        worker.failures += 1
        limit = self.settings.drain_after_failures
        if not limit or worker.failures < limit or worker.draining:
            return
        why = f"drained automatically after {worker.failures} failed batches in a row; last: {reason}"
        log.error("node %s %s", worker.name, why)
        worker.draining = True
        self.store.set_draining(worker.name, True, reason=why[:500])
        self.counters["auto_drained"] += 1
        # What it holds and has not started goes elsewhere now (it skips those jobs when it reaches them).
        for sent_to, job_ids in list(self._inflight.values()):
            if sent_to is worker:
                for job_id in job_ids:
                    self.store.requeue(job_id, f"node {worker.name} was drained", node=worker.name,
                                       allowed_from=[JobState.LEASED])

    def _refresh_nodes(self) -> None:
        """Follow what the node records say: draining (set by an operator), the models loaded, and who is in the
        farm. A worker that joined (`renderfarm worker` on another machine, or one restarted under the same
        name) is adopted by its actor's name; one whose record says it stopped, or whose heartbeat is older
        than `dead_after_seconds`, takes no more work (its leases bring its jobs back)."""
        now = time.time()
        for record in self.store.nodes():
            name = record["name"]
            heartbeat = record.get("heartbeat")
            fresh = (isinstance(heartbeat, (int, float)) and now - heartbeat < self.settings.dead_after_seconds
                     and record.get("state") != "stopped")
            worker = self.workers.get(name)
            if worker is None or (not worker.alive and fresh and record.get("pid") != worker.pid):
                if fresh and isinstance(record.get("actor"), str):
                    self._adopt(record)
                continue
            if worker.alive and not fresh:
                worker.alive, worker.silent = False, True
                log.error("node %s left the farm (%s)", name,
                          "stopped" if record.get("state") == "stopped" else "no heartbeat")
                continue
            if worker.silent and fresh:  # its heartbeat is back (the same process): it takes work again
                worker.alive, worker.silent = True, False
            worker.draining = record.get("draining") is True
            if isinstance(record.get("loaded"), list):
                worker.loaded = {m for m in record["loaded"] if isinstance(m, str)}

    def _adopt(self, record: dict[str, Any]) -> None:
        """Take a worker that joined into the farm, by its named actor."""
        try:
            handle = ray.get_actor(record["actor"])
        except ValueError:  # not (or no longer) alive in this Ray namespace
            return
        self.workers[record["name"]] = _worker(record["name"], handle, record)
        self.counters["joined"] += 1
        log.info("node %s joined the farm", record["name"])

    def _sample(self) -> None:
        """Every `sample_seconds`, one sample of queue depth and node totals for the dashboard's charts."""
        now = time.time()
        if now < self._next_sample:
            return
        self._next_sample = now + self.settings.sample_seconds
        fields = ("images", "megapixels", "jobs_done", "jobs_failed", "render_seconds", "last_s_per_step",
                  "vram_used_gib", "state")
        nodes = {n["name"]: {k: n.get(k) for k in fields} for n in self.store.nodes()}
        self.store.record_sample({"t": round(now, 3), "counts": self.store.counts(), "nodes": nodes})

    def _refresh_measurements(self) -> None:
        """Re-read what the nodes measured when a worker recorded something new (one GET otherwise)."""
        version = self.store.measurements_version()
        if version == self._measured_version:
            return
        self.measured, bad = self.store.measurements()
        for line in bad:
            log.error("calibration record skipped: %s", line)
        self._measured_version = version

    def _queued(self) -> list[Job]:
        """The head of the queue, with the oldest jobs of every (team, priority) queue; specs never change,
        so only new arrivals are read, and what left the queue is forgotten."""
        ids = list(dict.fromkeys(self.store.pending_ids(PENDING_WINDOW) + self.store.queue_heads(PER_QUEUE)))
        known = {i: self._jobs[i] for i in ids if i in self._jobs}
        missing = [i for i in ids if i not in known]
        if missing:
            for job_id, job in zip(missing, self.store.get_many(missing, quarantine=True)):
                # None: no record behind the id (an orphan still queued), or one just quarantined (gone from the queue).
                if job is None and self.store.position(job_id) is not None:
                    self.store.quarantine(job_id, "queue entry without a job record")
                elif job is not None and job.state is JobState.QUEUED:
                    known[job_id] = job
        self._jobs = known
        return [self._jobs[i] for i in ids if i in self._jobs]

    def _dispatch(self) -> None:
        now = time.time()
        eta_due = now >= self._next_eta
        if eta_due:
            self._refresh_nodes()
        if not eta_due and not any(self._has_room(w) for w in self.workers.values()):
            return
        self._refresh_measurements()
        jobs = self._queued()
        if not jobs:
            if eta_due:
                self._publish_etas(Plan(), now, {})
            return
        by_id = {job.id: job for job in jobs}
        order = self.fair.order([_queued_view(job) for job in jobs], now)
        pending = [
            PendingJob(q.id, s.model, s.batch_key(), s.num_images, s.width, s.height, s.steps)
            for q in order if (s := by_id[q.id].spec)
        ]
        nodes = [
            NodeView(w.name, w.device, frozenset(w.loaded), w.backlog(now),
                     self.settings.worker_queue_depth - w.inflight if self._has_room(w) else 0,
                     w.forbidden, w.max_batch)
            for w in self.workers.values() if w.alive and not w.draining
        ]
        plan = plan_dispatch(pending, nodes, self.settings.max_batch, self.catalog, self.measured, full=eta_due)
        for assignment in plan.assignments:
            worker = self.workers[assignment.worker]
            leased = tuple(j for j in assignment.job_ids if self.store.lease(j, worker.name, self.settings.lease_seconds))
            if not leased:
                continue
            ref = worker.handle.render.remote(list(leased))
            self._inflight[ref] = (worker, leased)
            estimate = assignment.finish_s - worker.backlog(now)  # its load and run
            worker.estimates[ref] = estimate
            worker.busy_until = max(worker.busy_until, now) + estimate
            worker.inflight += 1
            worker.loaded.add(assignment.model)
            for job_id in leased:
                self.fair.charge(by_id[job_id].spec.team, _queued_view(by_id[job_id]).cost, now)
            self.counters["dispatched"] += len(leased)
        if plan.assignments:
            self.store.write_fair_share(self.fair.to_json())
        if eta_due:
            self._publish_etas(plan, now, by_id)

    def _publish_etas(self, plan: Plan, now: float, jobs: dict[str, Job]) -> None:
        """Each queued job's place in the fair order and its expected start and finish (epoch seconds), or
        why no node can take it now; read by the client and `renderfarm status`."""
        sent = {j for a in plan.assignments for j in a.job_ids}
        waiting = sorted((eta.position, job_id) for job_id, eta in plan.etas.items() if job_id not in sent)
        etas: dict[str, dict[str, Any]] = {}
        for position, (_, job_id) in enumerate(waiting):  # 0: the next job to leave the queue
            eta = plan.etas[job_id]
            etas[job_id] = {"position": position, "node": eta.node, "start": round(now + eta.start_s, 3),
                            "finish": round(now + eta.finish_s, 3), "as_of": round(now, 3)}
        for job_id, reason in plan.unplaced.items():
            etas[job_id] = {"position": None, "node": None, "waiting": reason, "as_of": round(now, 3)}
        self.store.write_etas(etas)
        self._next_eta = now + self.settings.eta_seconds
        self.counters["eta_rounds"] += 1

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
            # The worker the batch went to: a worker that rejoined under the same name is another object.
            worker, job_ids = self._inflight.pop(ref)
            name = worker.name
            worker.inflight -= 1
            worker.estimates.pop(ref, None)
            # The next batch starts now: what is left is the estimate of the batches still sent.
            worker.busy_until = time.time() + sum(worker.estimates.values())
            try:
                summary = ray.get(ref, timeout=5)
            except RayActorError as exc:
                worker.alive = False
                self.counters["worker_deaths"] += 1
                log.error("node %s died: %s", name, exc)
                self._retry(job_ids, name, f"node {name} died while rendering")
                continue
            except (RayError, GetTimeoutError) as exc:
                error = f"node {name}: {type(exc).__name__}: {exc}"
                self._retry(job_ids, name, error)
                self._node_failed(worker, error)
                continue
            worker.suspect = False  # it answers
            for job_id, error in summary["errors"].items():
                self._retry((job_id,), name, error)
            if summary["errors"]:
                self._node_failed(worker, next(iter(summary["errors"].values())))
            elif summary["done"]:
                worker.failures = 0

    def _retry(self, job_ids: tuple[str, ...], node: str, error: str, expired_only: bool = False) -> int:
        """Requeue each job that still has attempts left, else fail it for good; how many moved."""
        moved = 0
        for job, job_id in zip(self.store.get_many(job_ids, quarantine=True), job_ids):
            if job is None or job.state.terminal or job.node != node:
                continue
            if job.attempts < self.settings.max_attempts:
                if self.store.requeue(job_id, error, node=node, expired_only=expired_only):
                    self.counters["retried"] += 1
                    moved += 1
            elif self.store.fail(job_id, f"{error} (after {job.attempts} attempts)", node=node,
                                 expired_only=expired_only):
                self.counters["failed"] += 1
                moved += 1
        return moved



def _worker(name: str, handle: Any, info: dict[str, Any]) -> _Worker:
    """A worker as its ready() info or its node record describes it (card, loaded models, overrides)."""
    forbid = info.get("forbid_models")
    max_batch = info.get("max_batch")
    return _Worker(
        name, handle, float(info.get("vram_gib") or 0), set(info.get("loaded") or []), device_from_record(info),
        pid=info.get("pid") if isinstance(info.get("pid"), int) else None,
        forbidden=frozenset(m for m in forbid if isinstance(m, str)) if isinstance(forbid, list) else frozenset(),
        max_batch=max_batch if isinstance(max_batch, int) and max_batch >= 1 else None,
    )


def _queued_view(job: Job) -> Queued:
    """What fairness needs of a job; its cost is its work in megapixel-steps (images x pixels x steps), a
    measure that needs no node: the share is of work, wherever it runs."""
    s = job.spec
    return Queued(job.id, s.team, s.priority, job.created_at, max(1e-6, s.num_images * s.width * s.height * s.steps / 1e6))
