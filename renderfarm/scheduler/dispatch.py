"""Dispatch: read pending -> order -> plan -> lease -> send, one of the scheduler's managers.

Each round reads the head of the queue (the first jobs by priority and submit time, and the oldest jobs of
every (team, priority) queue), orders them fairly (fairness.FairShare: priority, then weighted fair share
between teams, with aging), and plans them with placement.plan_dispatch: each job to the node where it is
predicted to fit and finish first, given every node's backlog, whether its model is loaded there, and the
speeds and peaks nodes measured (online calibration, read from Redis when a worker records something new).
Every `eta_seconds` the round plans the whole window and publishes each job's position and ETA.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from renderfarm.cluster.store import Fenced
from renderfarm.jobs import Job, JobState
from renderfarm.planning.catalog import Catalog
from renderfarm.planning.fit import NodeView
from renderfarm.planning.measured import EMPTY, Measurements, snapshot
from renderfarm.scheduler.fairness import FairShare, Queued
from renderfarm.scheduler.managers import SchedulerState
from renderfarm.scheduler.placement import PendingJob, Plan, plan_dispatch

log = logging.getLogger(__name__)

PENDING_WINDOW = 2000  # how far down the queue (priority, then submit time) one planning round looks
PER_QUEUE = 200  # and how many of the oldest jobs of each (team, priority) queue


class DispatchManager:
    def __init__(self, state: SchedulerState, catalog: Catalog, fair: FairShare):
        self.state = state
        self.catalog = catalog
        self.fair = fair
        self.measured: Measurements = EMPTY
        self._measured_version = -1
        self._jobs: dict[str, Job] = {}  # queued jobs already read (a spec never changes)
        self.next_eta = 0.0

    def update(self) -> None:
        state, settings, store = self.state, self.state.settings, self.state.store
        now = time.time()
        eta_due = now >= self.next_eta
        if not eta_due and not state.any_room():
            return
        self._refresh_measurements()
        jobs = self.queued()
        if not jobs:
            if eta_due:
                self._publish_etas(Plan(), now, {})
            return
        by_id = {job.id: job for job in jobs}
        order = self.fair.order([queued_view(job) for job in jobs], now)
        pending = [
            PendingJob(q.id, s.model, s.batch_key(), s.num_images, s.width, s.height, s.steps)
            for q in order if (s := by_id[q.id].spec)
        ]
        nodes = [
            NodeView(w.name, w.device, frozenset(w.loaded), w.backlog(now),
                     # a suspect gets one batch, as a probe (workers.Worker.has_room)
                     (1 if w.suspect else settings.worker_queue_depth - w.inflight) if state.has_room(w) else 0,
                     w.forbidden, w.max_batch)
            for w in state.workers.values() if w.alive and not w.draining
        ]
        plan = plan_dispatch(pending, nodes, settings.max_batch, self.catalog, self.measured, full=eta_due)
        for assignment in plan.assignments:
            worker = state.workers[assignment.worker]
            try:
                leased = tuple(j for j in assignment.job_ids
                               if store.lease(j, worker.name, settings.lease_seconds, fence=state.epoch))
            except Fenced as exc:  # another scheduler leads now: this one writes no more leases
                log.error("dispatch stopped: %s", exc)
                state.counters["fenced"] = state.counters.get("fenced", 0) + 1
                return
            if not leased:
                continue
            ref = worker.handle.render(list(leased))
            state.inflight[ref] = (worker, leased)
            estimate = assignment.finish_s - worker.backlog(now)  # its load and run
            worker.estimates[ref] = estimate
            worker.busy_until = max(worker.busy_until, now) + estimate
            worker.inflight += 1
            state.workers.add_loaded(worker, assignment.model)
            for job_id in leased:
                self.fair.charge(by_id[job_id].spec.team, queued_view(by_id[job_id]).cost, now)
            state.counters["dispatched"] += len(leased)
        if plan.assignments:
            store.write_fair_share(self.fair.to_json())
        if eta_due:
            self._publish_etas(plan, now, by_id)

    def queued(self) -> list[Job]:
        """The head of the queue, with the oldest jobs of every (team, priority) queue; specs never change,
        so only new arrivals are read, and what left the queue is forgotten."""
        store = self.state.store
        ids = list(dict.fromkeys(store.pending_ids(PENDING_WINDOW) + store.queue_heads(PER_QUEUE)))
        known = {i: self._jobs[i] for i in ids if i in self._jobs}
        missing = [i for i in ids if i not in known]
        if missing:
            for job_id, job in zip(missing, store.get_many(missing, quarantine=True)):
                # None: no record behind the id (an orphan still queued), or one just quarantined (gone from the queue).
                if job is None and store.position(job_id) is not None:
                    store.quarantine(job_id, "queue entry without a job record")
                elif job is not None and job.state is JobState.QUEUED:
                    known[job_id] = job
        self._jobs = known
        return [self._jobs[i] for i in ids if i in self._jobs]

    def _refresh_measurements(self) -> None:
        """Re-read what the nodes measured when a worker recorded something new (one GET otherwise)."""
        version = self.state.store.measurements_version()
        if version == self._measured_version:
            return
        self.measured, bad = snapshot(self.state.store.calibration_records())
        for line in bad:
            log.error("calibration record skipped: %s", line)
        if bad:
            self.state.store.count("malformed_calibration", len(bad))
        self._measured_version = version

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
        self.state.store.write_etas(etas)
        self.next_eta = now + self.state.settings.eta_seconds
        self.state.counters["eta_rounds"] += 1


def queued_view(job: Job) -> Queued:
    """What fairness needs of a job; its cost is its work in megapixel-steps (images x pixels x steps), a
    measure that needs no node: the share is of work, wherever it runs."""
    s = job.spec
    return Queued(job.id, s.team, s.priority, job.created_at, max(1e-6, s.num_images * s.width * s.height * s.steps / 1e6))
