"""The scheduler's managers: plain classes the control loop calls `update()` on, one after another, each in its
own try (`update_each`), so one that fails does not cost the others their round.

They share one `SchedulerState` (settings, the Store, the worker table, the batches in flight, the counters)
and touch Ray only through `handle.RayCalls` (given to them), so all of this runs in tests without Ray.
The dispatcher, the largest, lives in dispatch.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from renderfarm.cluster.store import Store
from renderfarm.config import Settings
from renderfarm.errors import CorruptRecord
from renderfarm.faults import Fault, classify
from renderfarm.jobs import JobState
from renderfarm.loras.assets import model_fingerprints
from renderfarm.scheduler.workers import Worker, WorkerTable, unloadable_from_record, worker_from_info

if TYPE_CHECKING:
    from renderfarm.scheduler.handle import RayCalls

log = logging.getLogger(__name__)


def update_each(steps: dict[str, Callable[[], None]], failures: dict[str, int]) -> bool:
    """One round: every step (a manager's `update`) in order. One that raises is logged with its traceback
    and counted in `failures` (by name), and the next still runs; False when any failed."""
    ok = True
    for name, update in steps.items():
        try:
            update()
        except Exception:  # a bad update must cost neither the farm nor the other managers' round
            log.exception("scheduler: %s update failed", name)
            failures[name] = failures.get(name, 0) + 1
            ok = False
    return ok


@dataclass
class SchedulerState:
    """What the managers share. Only the loop thread changes it; `workers` takes readers from other threads."""

    settings: Settings
    store: Store
    workers: WorkerTable
    counters: dict[str, int]
    inflight: dict[Any, tuple[Worker, tuple[str, ...]]] = field(default_factory=dict)  # batch ref -> (worker, jobs)
    charged: set[Any] = field(default_factory=set)  # batches in flight already counted as a node fault
    epoch: int | None = None  # this scheduler's leadership (scheduler.py): the fence on every lease it writes
    measurements: int = 0  # the newest calibration version a returned batch made (dispatch re-reads them)

    def has_room(self, worker: Worker) -> bool:
        return worker.has_room(self.settings.worker_queue_depth)

    def any_room(self) -> bool:
        return any(self.has_room(w) for w in self.workers.values())

    def retry(self, job_ids: tuple[str, ...], node: str, error: str, expired_only: bool = False,
              outage: bool = False) -> int:
        """Requeue each job that still has attempts left, else fail it for good; how many moved. After an
        `outage` (renderfarm/faults.py) every job goes back: an unreachable Redis is not the job's fault."""
        moved = 0
        for job, job_id in zip(self.store.get_many(job_ids, quarantine=True), job_ids):
            if job is None or job.state.terminal or job.node != node:
                continue
            if outage or job.attempts < self.settings.max_attempts:
                if self.store.requeue(job_id, error, node=node, expired_only=expired_only):
                    self.counters["retried"] += 1
                    moved += 1
            elif self.store.fail(job_id, f"{error} (after {job.attempts} attempts)", node=node,
                                 expired_only=expired_only):
                self.counters["failed"] += 1
                moved += 1
        return moved

    def fail_now(self, job_ids: tuple[str, ...], node: str, error: str) -> int:
        """Fail each job at once, attempts left or not: a job fault (renderfarm/faults.py), which a retry on
        another node cannot mend. No node is charged. How many failed."""
        failed = 0
        for job_id in job_ids:
            if self.store.fail(job_id, f"{error} (not retried: the job's fault, not the node's)", node=node):
                self.counters["failed"] += 1
                self.counters["job_faults"] = self.counters.get("job_faults", 0) + 1
                failed += 1
        return failed

    def node_failed(self, worker: Worker, reason: str) -> None:
        """One more node fault (a failed batch, counted once however many jobs it held) in a row for
        `worker`; drain it at `drain_after_failures`, naming each of them."""
        worker.failures += 1
        worker.fault_reasons = [*worker.fault_reasons, reason][-max(1, self.settings.drain_after_failures):]
        limit = self.settings.drain_after_failures
        if not limit or worker.failures < limit or worker.draining:
            return
        listed = "; ".join(f"{i}) {r[:200]}" for i, r in enumerate(worker.fault_reasons, 1))
        why = f"drained automatically after {worker.failures} failed batches in a row (node faults): {listed}"
        log.error("node %s %s", worker.name, why)
        worker.draining = True
        self.store.set_draining(worker.name, True, reason=why[:1000])
        self.counters["auto_drained"] += 1
        # What it holds and has not started goes elsewhere now (it skips those jobs when it reaches them).
        for sent_to, job_ids in list(self.inflight.values()):
            if sent_to is worker:
                for job_id in job_ids:
                    self.store.requeue(job_id, f"node {worker.name} was drained", node=worker.name,
                                       allowed_from=[JobState.LEASED])


class LeaseManager:
    """Leases: a job leased to a node holds for `lease_seconds` past its last renewal. Every
    `heartbeat_seconds` this renews the leases of the batches sent (the node renews those it renders) and
    reaps jobs whose lease expired (their holder died or hung).

    An expired lease is a node fault counted once per batch, and only for a job the node had started (it
    renews those itself; leased ones the scheduler renews, so their expiry is never the node's doing). A lease
    that expired while this scheduler could not reach Redis (a round failed with an outage, or its Redis calls
    or the loop stalled) is nobody's fault for `lease_seconds` after contact came back: the job is requeued
    and no node is charged or made suspect."""

    def __init__(self, state: SchedulerState):
        self.state = state
        self.next_due = 0.0
        self.last_contact: float | None = None  # when a lease round last reached Redis
        self.outage_at = float("-inf")  # when this scheduler last found Redis unreachable or stalled

    def stall_seconds(self) -> float:
        """A gap between two lease rounds longer than `heartbeat_seconds` by this much is an outage."""
        return max(1.0, self.state.settings.lease_seconds / 4)

    def recover(self) -> None:
        """Rebuild the view of jobs in flight from Redis. Leased jobs that no node started are put back in the
        queue (their attempt was counted when leased; a node that still has them queued skips them); jobs
        running on a node of this farm stay with it under its lease (it renews them while rendering, else they
        expire and are reaped); those running on a node this farm does not know go back at once."""
        store, counters = self.state.store, self.state.counters
        for job_id in store.ids_in(JobState.LEASED, limit=100_000):
            if store.requeue(job_id, "scheduler restarted before the job started", allowed_from=[JobState.LEASED]):
                counters["recovered"] += 1
        running = store.ids_in(JobState.RUNNING, limit=100_000)
        for job_id, job in zip(running, store.get_many(running, quarantine=True)):
            if job is None or job.state is not JobState.RUNNING:
                continue
            worker = self.state.workers.get(job.node or "")
            if worker is not None:
                worker.recovered.add(job_id)
            elif store.requeue(job_id, f"node {job.node} is not part of this farm", node=job.node,
                               allowed_from=[JobState.RUNNING]):
                counters["recovered"] += 1

    def update(self) -> None:
        """Renew the leases of batches sent and not yet started or finished, reap jobs whose lease expired,
        and forget recovered jobs that have left their node."""
        now = time.time()
        if now < self.next_due:
            return
        state, settings, store = self.state, self.state.settings, self.state.store
        self.next_due = now + settings.heartbeat_seconds
        held: dict[str, list[str]] = {}
        for worker, job_ids in state.inflight.values():
            if worker.alive and not worker.suspect:
                held.setdefault(worker.name, []).extend(job_ids)
        try:
            for name, job_ids in held.items():
                store.renew(job_ids, name, settings.lease_seconds)
            expired = store.expired()
            jobs = store.get_many(expired, quarantine=True)
        except Exception as exc:
            if classify(exc) is Fault.OUTAGE:
                self.outage_at = time.time()
            raise
        contact = time.time()
        if self.last_contact is not None and contact - self.last_contact > settings.heartbeat_seconds + \
                self.stall_seconds():
            self.outage_at = contact  # nobody could renew meanwhile, as far as this scheduler can tell
        self.last_contact = contact
        in_outage = contact - self.outage_at < settings.lease_seconds
        state.charged &= set(state.inflight)
        for job_id, job in zip(expired, jobs):
            if job is None or job.state not in (JobState.LEASED, JobState.RUNNING):
                continue
            node = job.node or ""
            error = (f"lease expired on node {node}: nothing renewed it for {settings.lease_seconds:g} s"
                     " (the node died, hung or ran past its time limit)")
            if in_outage:
                error = f"lease expired on node {node} while Redis was unreachable (nobody's fault)"
            if not state.retry((job_id,), node, error, expired_only=True, outage=in_outage):
                continue
            state.counters["leases_expired"] += 1
            store.count("leases_expired")
            worker = state.workers.get(node)
            if in_outage:
                state.counters["leases_expired_in_outage"] = state.counters.get("leases_expired_in_outage", 0) + 1
                continue
            if worker is None:
                continue
            worker.suspect = True
            if job.state is not JobState.RUNNING:
                continue
            batch = next((ref for ref, (sent_to, ids) in state.inflight.items()
                          if sent_to is worker and job_id in ids), ("round", node))
            if batch not in state.charged:  # one hung batch is one node fault, however many jobs it held
                state.charged.add(batch)
                state.node_failed(worker, error)
        for worker in state.workers.values():
            if worker.recovered:
                jobs = store.get_many(sorted(worker.recovered), quarantine=True)
                worker.recovered = {j.id for j in jobs
                                    if j is not None and j.state is JobState.RUNNING and j.node == worker.name}


class MembershipManager:
    """Every `eta_seconds` (the cadence of full planning rounds), follow what the node records say: draining
    (set by an operator), the models loaded, and who is in the farm. A worker that joined (`renderfarm
    worker` on another machine, or one restarted under the same name) is adopted by its actor's name; one
    whose record says it stopped, or whose heartbeat is older than `dead_after_seconds`, takes no more work
    (its leases bring its jobs back)."""

    def __init__(self, state: SchedulerState, calls: RayCalls):
        self.state = state
        self.calls = calls
        self.next_due = 0.0

    def update(self) -> None:
        now = time.time()
        if now < self.next_due:
            return
        self.next_due = now + self.state.settings.eta_seconds
        assets_changed: dict[str, Any] = {}  # worker name -> its record's new assets_version
        for record in self.state.store.nodes():
            name = record["name"]
            if record.get("assets_version") is not None:
                assets_changed[name] = record.get("assets_version")
            heartbeat = record.get("heartbeat")
            fresh = (isinstance(heartbeat, (int, float)) and now - heartbeat < self.state.settings.dead_after_seconds
                     and record.get("state") != "stopped")
            worker = self.state.workers.get(name)
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
            worker.unloadable = unloadable_from_record(record)  # a restarted node may load more, or less
            worker.fingerprints = model_fingerprints(record)
            # Its pipeline cache as reported, with the batches it has not reported yet loaded on top.
            self.state.workers.report_cache(worker, record, self.state.inflight)
        self._read_assets(assets_changed)

    def _read_assets(self, versions: dict[str, Any]) -> None:
        """Read the LoRAs of the workers whose published assets changed (one request for all of them): the
        planner sends a job with LoRAs only to a node holding each at the job's hash (loras/assets.py)."""
        from renderfarm.loras.assets import held

        changed = {name: v for name, v in versions.items()
                   if (w := self.state.workers.get(name)) is not None and w.assets_version != v}
        if not changed:
            return
        docs = self.state.store.assets(sorted(changed))
        for name, version in changed.items():
            worker = self.state.workers.get(name)
            if worker is not None:
                worker.loras, worker.assets_version = held(docs.get(name)), version

    def _adopt(self, record: dict[str, Any]) -> None:
        """Take a worker that joined into the farm, by its named actor."""
        handle = self.calls.find(record["actor"])
        if handle is None:  # not (or no longer) alive in this Ray namespace
            return
        try:
            worker = worker_from_info(record["name"], handle, record)
        except CorruptRecord as exc:  # one bad record must not stop the others' adoption or the round
            log.error("node %s not adopted: %s", record["name"], exc)
            self.state.store.count("malformed_node")
            return
        self.state.workers.put(worker)
        self.state.counters["joined"] += 1
        log.info("node %s joined the farm", record["name"])


class SamplingManager:
    """Every `sample_seconds`, one sample of queue depth and node totals for the dashboard's charts."""

    FIELDS = ("images", "megapixels", "jobs_done", "jobs_failed", "render_seconds", "last_s_per_step",
              "vram_used_gib", "state")

    def __init__(self, state: SchedulerState):
        self.state = state
        self.next_due = 0.0

    def update(self) -> None:
        now = time.time()
        if now < self.next_due:
            return
        self.next_due = now + self.state.settings.sample_seconds
        store = self.state.store
        nodes = {n["name"]: {k: n.get(k) for k in self.FIELDS} for n in store.nodes()}
        store.record_sample({"t": round(now, 3), "counts": store.counts(), "nodes": nodes})


class BatchResults:
    """Batches that came back: their jobs that failed are retried (or failed for good), a worker whose
    process died is taken out, and a worker whose batches keep failing is drained."""

    def __init__(self, state: SchedulerState, calls: RayCalls):
        self.state = state
        self.calls = calls

    def collect(self, timeout: float) -> None:
        """Wait up to `timeout` for any batch to finish; the rest are picked up on the next rounds."""
        state = self.state
        if not state.inflight:
            return
        for ref in self.calls.wait_any(list(state.inflight), timeout):
            # The worker the batch went to: a worker that rejoined under the same name is another object.
            worker, job_ids = state.inflight.pop(ref)
            name = worker.name
            worker.inflight -= 1
            worker.estimates.pop(ref, None)
            # The next batch starts now: what is left is the estimate of the batches still sent.
            worker.busy_until = time.time() + sum(worker.estimates.values())
            outcome = self.calls.outcome(ref)
            charged = ref in state.charged  # its lease expired and was counted already
            state.charged.discard(ref)
            if outcome.died is not None:
                worker.alive = False
                state.counters["worker_deaths"] += 1
                log.error("node %s died: %s", name, outcome.died)
                state.retry(job_ids, name, f"node {name} died while rendering")
                continue
            summary = outcome.summary
            if summary is None:  # the call failed (its error says how)
                self._settle(worker, dict.fromkeys(job_ids, f"node {name}: {outcome.error}"), outcome.fault,
                             charged)
                continue
            worker.suspect = False  # it answers
            if isinstance(summary.get("measurements"), int):
                state.measurements = max(state.measurements, summary["measurements"])
            if summary["errors"]:
                self._settle(worker, summary["errors"], Fault.parse(summary.get("fault")), charged)
            elif summary["done"]:
                worker.failures, worker.fault_reasons = 0, []

    def _settle(self, worker: Worker, errors: dict[str, str], fault: Fault, charged: bool) -> None:
        """A batch that failed, by whose fault (renderfarm/faults.py): the job's fails its jobs at once; the
        node's retries them and counts one node fault (unless its expired lease was counted already); an
        outage requeues them and blames nobody; a result store that refused the images retries them while
        they have attempts left and blames nobody."""
        state = self.state
        for job_id, error in errors.items():
            if fault is Fault.JOB:
                state.fail_now((job_id,), worker.name, error)
            else:
                state.retry((job_id,), worker.name, error, outage=fault is Fault.OUTAGE)
        if fault is Fault.NODE and not charged:
            state.node_failed(worker, next(iter(errors.values())))
