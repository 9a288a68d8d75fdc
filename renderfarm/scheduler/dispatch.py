"""Dispatch: read pending -> order -> plan -> lease -> send, one of the scheduler's managers.

Each round reads the head of the queue (the first jobs by priority and submit time, and the oldest jobs of
every (team, priority) queue), orders them fairly (fairness.FairShare: priority, then weighted fair share
between teams, with aging), and plans them with placement.plan_dispatch: each job to the node where it is
predicted to fit and finish first, given every node's backlog, whether its model is loaded there, and the
speeds and peaks nodes measured (online calibration, read from Redis when a worker records something new).
Every `eta_seconds` the round plans the whole window and publishes each job's position and ETA.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from renderfarm.cluster.store import EventCursor, Fenced
from renderfarm.jobs import Job
from renderfarm.planning.catalog import Catalog
from renderfarm.planning.fit import NodeView
from renderfarm.planning.measured import EMPTY, Measurements, snapshot
from renderfarm.planning.vram import effective_steps
from renderfarm.scheduler.fairness import FairShare, Queued
from renderfarm.scheduler.managers import SchedulerState
from renderfarm.scheduler.placement import PendingJob, Plan, plan_dispatch
from renderfarm.scheduler.queue_view import QueueView

log = logging.getLogger(__name__)

MEASUREMENTS_EVERY_S = 1.0  # a busy farm re-reads the nodes' measurements at most this often
# The cheap round plans from the head of the fair order: this many jobs per free slot and image of a batch
# (room to coalesce full batches and to pass over jobs that wait for a busy node), and never fewer than this.
LIVE_WINDOW_PER_SLOT = 8
LIVE_WINDOW_MIN = 256


def cheap_round_depth(free_slots: int, max_batch: int) -> int:
    """How far down the fair order a cheap round plans, for this many free slots and this batch size."""
    return max(LIVE_WINDOW_MIN, LIVE_WINDOW_PER_SLOT * free_slots * max_batch)


def _version(raw: Any) -> int:
    try:
        return int(raw or 0)
    except ValueError:
        return 0


class DispatchManager:
    def __init__(self, state: SchedulerState, catalog: Catalog, fair: FairShare, events: EventCursor | None = None):
        self.state = state
        self.catalog = catalog
        self.fair = fair
        self.events = events  # the scheduler's cursor on the event stream: each lease round reads it too
        self.view = QueueView(state.store, full_every_s=state.settings.eta_seconds)
        self.measured: Measurements = EMPTY
        self._measured_version = -1
        self._seen_version: int | None = None  # the latest calibration version a round read
        self._next_measured = 0.0
        self._fair_unsaved, self._fair_saved_at = False, 0.0
        self._job_views: dict[str, tuple[Queued, PendingJob]] = {}
        self._futile: tuple[int, frozenset[str]] | None = None  # when the last wide round found nothing more
        self.next_eta = 0.0

    def update(self) -> None:
        state, settings = self.state, self.state.settings
        now = time.time()
        eta_due = now >= self.next_eta
        if not eta_due and not state.any_room():
            return
        self._refresh_measurements(time.monotonic())
        jobs = self.view.queued()
        if not jobs:
            self._save_fair_share(now)
            if eta_due:
                self._publish_etas(Plan(), now, {})
            return
        by_id = {job.id: job for job in jobs}
        views = self._views(jobs)
        nodes = [
            NodeView(w.name, w.device, w.loaded, w.backlog(now),
                     # a suspect gets one batch, as a probe (workers.Worker.has_room)
                     (1 if w.suspect else settings.worker_queue_depth - w.inflight) if state.has_room(w) else 0,
                     w.forbidden, w.max_batch, w.cache.view, w.loras, w.cache.applied, w.unloadable, w.fingerprints)
            for w in state.workers.values() if w.alive and not w.draining
        ]
        free = sum(n.slots for n in nodes)
        # The cheap round (a batch came back, a slot is free) plans from the head of the fair order only; when
        # that head leaves a slot unused (its jobs fit only nodes that are busy), the whole window is planned.
        limit = None if eta_due else cheap_round_depth(free, settings.max_batch)
        plan = self._plan(views, nodes, now, limit, full=eta_due)
        # A wide round that found nothing more is not repeated until jobs arrive or other nodes have room.
        situation = (self.view.added, frozenset(n.name for n in nodes if n.slots))
        if limit is not None and len(views) > limit and len(plan.assignments) < free and situation != self._futile:
            self.state.counters["wide_rounds"] = self.state.counters.get("wide_rounds", 0) + 1
            wide = self._plan(views, nodes, now, None, full=False)
            self._futile = situation if len(wide.assignments) == len(plan.assignments) else None
            plan = wide
        if plan.assignments:
            self._send(plan, by_id, now)
        if eta_due:
            self._publish_etas(plan, now, by_id)

    def _send(self, plan: Plan, by_id: dict[str, Job], now: float) -> None:
        """Lease every batch of the plan, save the fair-share usage and read what happened since the last look,
        all in one request to Redis (a round); then send each batch that got its leases to its worker, with
        the jobs' specs (the worker need not read them)."""
        state, settings, store = self.state, self.state.settings, self.state.store
        rnd = store.round()
        leasing = [(assignment, [store.queue_lease(rnd, j, assignment.worker, settings.lease_seconds,
                                                   fence=state.epoch) for j in assignment.job_ids])
                   for assignment in plan.assignments]
        if self._fair_unsaved:
            self._queue_fair_share(rnd, now)
        version = rnd.command(lambda pipe: pipe.get(store.keys.calib_version))
        events = self.events.queue_read(rnd) if self.events is not None else None
        rnd.run()
        if events is not None:
            self.view.apply(events())
        self._seen_version = _version(version())
        for assignment, outcomes in leasing:
            worker = state.workers[assignment.worker]
            self.view.left(assignment.job_ids)  # leased by this round, or by nobody (cancelled, gone)
            try:
                leased = tuple(j for j, outcome in zip(assignment.job_ids, outcomes) if outcome())
            except Fenced as exc:  # another scheduler leads now: this one writes no more leases
                log.error("dispatch stopped: %s", exc)
                state.counters["fenced"] = state.counters.get("fenced", 0) + 1
                self.view.stale()
                return
            if not leased:
                continue
            ref = worker.handle.render(list(leased), [by_id[j].spec.model_dump(mode="json") for j in leased])
            state.inflight[ref] = (worker, leased)
            estimate = assignment.finish_s - worker.backlog(now)  # its load and run
            worker.estimates[ref] = estimate
            worker.busy_until = max(worker.busy_until, now) + estimate
            worker.inflight += 1
            state.workers.add_loaded(worker, assignment.model, assignment.profile, assignment.weights_bytes, ref,
                                     assignment.loras)
            for job_id in leased:
                self.fair.charge(by_id[job_id].spec.team, queued_view(by_id[job_id], run_steps(by_id[job_id].spec,
                                                                                               self.catalog)).cost, now)
            self._fair_unsaved = True  # saved with the next round's leases (or within a heartbeat)
            state.counters["dispatched"] += len(leased)

    def _views(self, jobs: list[Job]) -> dict[str, tuple[Queued, PendingJob]]:
        """What fairness and placement need of each job, made once per job (a spec never changes) and kept
        while it is queued: a round does not rebuild them for the whole window."""
        known = self._job_views
        fresh = {}
        for job in jobs:
            view = known.get(job.id)
            if view is None:
                steps = run_steps(job.spec, self.catalog)
                view = (queued_view(job, steps), pending_job(job, steps))
            fresh[job.id] = view
        self._job_views = fresh
        return fresh

    def _plan(self, views: dict[str, tuple[Queued, PendingJob]], nodes: list[NodeView], now: float,
              limit: int | None, full: bool) -> Plan:
        order = self.fair.order([q for q, _ in views.values()], now, limit=limit)
        pending = [views[q.id][1] for q in order]
        return plan_dispatch(pending, nodes, self.state.settings.max_batch, self.catalog, self.measured, full=full)

    def queued(self) -> list[Job]:
        """The queued jobs the next round plans from (queue_view.QueueView)."""
        return self.view.queued()

    def _queue_fair_share(self, rnd: Any, now: float) -> None:
        usage = json.dumps(self.fair.to_json())
        rnd.command(lambda pipe: pipe.set(self.state.store.keys.fair_share, usage))
        self._fair_unsaved, self._fair_saved_at = False, now

    def _save_fair_share(self, now: float) -> None:
        """Charges not saved by a lease round (none followed them) are saved within a heartbeat."""
        if self._fair_unsaved and now - self._fair_saved_at >= self.state.settings.heartbeat_seconds:
            rnd = self.state.store.round()
            self._queue_fair_share(rnd, now)
            rnd.run()

    def _refresh_measurements(self, now: float) -> None:
        """Re-read what the nodes measured when a worker recorded something new: the version comes with each
        batch that returns and each lease round (one GET of its own only at the start), and a busy farm
        re-reads at most once a `MEASUREMENTS_EVERY_S`."""
        if self._seen_version is None:
            self._seen_version = self.state.store.measurements_version()
        self._seen_version = max(self._seen_version, self.state.measurements)  # what returned batches said
        if self._seen_version == self._measured_version or now < self._next_measured:
            return
        version = self._seen_version
        self.measured, bad = snapshot(self.state.store.calibration_records())
        for line in bad:
            log.error("calibration record skipped: %s", line)
        if bad:
            self.state.store.count("malformed_calibration", len(bad))
        self._measured_version, self._next_measured = version, now + MEASUREMENTS_EVERY_S

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


def queued_view(job: Job, steps: int | None = None) -> Queued:
    """What fairness needs of a job; its cost is its work in megapixel-steps (images x pixels x the steps it runs:
    `steps`, else all of its spec's), a measure that needs no node: the share is of work, wherever it runs."""
    s = job.spec
    steps = s.steps if steps is None else steps
    return Queued(job.id, s.team, s.priority, job.created_at, max(1e-6, s.num_images * s.width * s.height * steps / 1e6))


def pending_job(job: Job, steps: int) -> PendingJob:
    """What placement needs of a job: its shape, the `steps` it runs (`run_steps`), what it may batch with, and
    its task (an image task's fit and time count its VAE encode)."""
    s = job.spec
    return PendingJob(job.id, s.model, s.batch_key(), s.num_images, s.width, s.height, steps, s.lora_set(),
                      s.model_fingerprint, s.task)


def run_steps(spec: Any, catalog: Catalog) -> int:
    """The denoising steps a job's render runs: all of them for text-to-image; under an img2img or inpainting
    strength, as diffusers counts them (planning/vram.py effective_steps): what its finish time and its fair-share
    cost are made of."""
    if spec.effective_strength is None:  # text-to-image (an init image, given or from an earlier job, has one)
        return spec.steps
    flow = spec.model in catalog and catalog.get(spec.model).family.flow_matching
    return effective_steps(spec.steps, spec.effective_strength, flow)
