"""The controller: one per farm. A control loop calls `update()` on its managers, then sleeps until
something can change the plan:

- leases (managers.LeaseManager): a job leased to a node holds for `lease_seconds` past its last renewal.
  Every `heartbeat_seconds` the scheduler renews the leases of the batches it has sent (the node renews
  those it renders), and reaps jobs whose lease expired (their holder died or hung): each goes back to the
  queue, or fails once it has used `max_attempts`. A node whose batches fail `drain_after_failures` times in
  a row is drained, with the reason.
- membership (managers.MembershipManager): node records -> who is in the farm, draining, models loaded.
- dispatch (dispatch.DispatchManager): read pending -> order fairly -> plan -> lease -> send; ETAs.
- sampling (managers.SamplingManager): the dashboard's samples.
- wait: until a batch finishes or the event stream shows a change; finished batches are collected
  (managers.BatchResults).

Each step runs in its own try (managers.update_each): one that fails is logged and counted, the others still
run, and a round with a failure pauses `poll_seconds`. Every Ray call is in handle.py.

A plain class, made a Ray actor by `farm.py` (with max_concurrency > 1 so `stop()` and `stats()` reach it
while its loop runs, and restarted by Ray if its process dies). Worker handles are given to it; it never
imports actor code. All hard state lives in Redis, so a restarted scheduler rebuilds its view from there:
jobs it had leased but not yet seen start go back to the queue (a node that still has them queued skips
them), jobs being rendered stay with their node under its lease.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from renderfarm.cluster.keys import Keys
from renderfarm.cluster.store import Store
from renderfarm.config import Settings
from renderfarm.errors import CorruptRecord
from renderfarm.jobs import Job
from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.measured import Measurements
from renderfarm.scheduler.dispatch import DispatchManager
from renderfarm.scheduler.fairness import FairShare
from renderfarm.scheduler.handle import RayCalls, WorkerHandle
from renderfarm.scheduler.managers import (
    BatchResults,
    LeaseManager,
    MembershipManager,
    SamplingManager,
    SchedulerState,
    update_each,
)
from renderfarm.scheduler.reconcile import ReconcileManager
from renderfarm.scheduler.workers import WorkerTable, worker_from_info

log = logging.getLogger(__name__)

IDLE_WAKE_SECONDS = 0.5  # longest sleep; bounds how late `stop()` is noticed


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
        self.store = Store.open(redis_url, Keys(key_prefix))
        self.catalog = default_catalog(self.settings.models_file)
        self.workers = WorkerTable({name: worker_from_info(name, _handle(handle, info), info)
                                    for name, (handle, info) in workers.items()})
        self.fair = FairShare(
            self.settings.team_weights, self.settings.fair_share_half_life_s, self.settings.aging_seconds
        )
        try:
            saved = self.store.read_fair_share()
            if saved:
                self.fair.load_json(saved)
        except (CorruptRecord, ValueError) as exc:  # the usage is advisory: start afresh, say why
            log.error("fair-share usage in Redis ignored: %s", exc)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._result: dict[str, int] | None = None
        # Read only to wake up when something changed (a submit, a cancel, a job finishing).
        self.events = self.store.events()
        self.counters = {"dispatched": 0, "retried": 0, "failed": 0, "worker_deaths": 0, "loops": 0, "eta_rounds": 0,
                         "leases_expired": 0, "recovered": 0, "auto_drained": 0, "joined": 0}
        self.state = SchedulerState(self.settings, self.store, self.workers, self.counters)
        calls = RayCalls()
        self.leases = LeaseManager(self.state)
        self.membership = MembershipManager(self.state, calls)
        self.dispatcher = DispatchManager(self.state, self.catalog, self.fair, self.events)
        self.sampling = SamplingManager(self.state)
        self.reconciler = ReconcileManager(self.state)
        self.results = BatchResults(self.state, calls)
        # In this order: membership before dispatch, so a worker that joined can take work in the same round.
        # Only the leader (one scheduler per farm, a lock in Redis) touches leases, workers and the queue; a
        # second one started against the same Redis waits, and takes over when the lock lapses.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.epoch: int | None = None
        self._next_lead = 0.0
        led = self._if_leader
        self.steps = {"lead": self._lead, "leases": led(self.leases.update), "membership": led(self.membership.update),
                      "dispatch": led(self.dispatcher.update), "sampling": led(self.sampling.update),
                      "reconcile": led(self.reconciler.update), "wait": self._wait}
        self.update_failures = dict.fromkeys(self.steps, 0)
        self._lead()  # the leader rebuilds its view of jobs in flight from Redis (leases.recover)
        if autostart:  # as a Ray actor restarted after a crash: nobody calls run() again, so it runs itself
            self.start()

    # --- public ---------------------------------------------------------------------------------------

    def run(self) -> dict[str, int]:
        """Loop until `stop()`: one round of updates, then sleep until something can change the plan."""
        while not self._stop.is_set():
            self.counters["loops"] += 1
            if not update_each(self.steps, self.update_failures):
                self._stop.wait(self.settings.poll_seconds)  # a failing Redis must not make the loop spin
        if self.epoch is not None:
            try:
                self.store.resign(self.owner)  # a clean stop: the next scheduler need not wait for the TTL
            except Exception as exc:  # Redis gone: the lock lapses by itself
                log.warning("could not resign the leadership: %s", exc)
            self.epoch = self.state.epoch = None
        return dict(self.counters)

    @property
    def lead_ttl_s(self) -> float:
        """How long the leadership lasts without renewal: a crashed leader's successor waits this long."""
        return max(5.0, 3 * self.settings.heartbeat_seconds)

    def _lead(self) -> None:
        """Take or keep the leadership (renewed twice per heartbeat); on taking it, rebuild the view of jobs
        in flight from Redis."""
        now = time.monotonic()
        if now < self._next_lead:
            return
        self._next_lead = now + self.settings.heartbeat_seconds / 2
        epoch = self.store.lead(self.owner, self.lead_ttl_s)
        if epoch is not None and self.epoch is None:
            log.info("scheduler %s leads the farm (epoch %d)", self.owner, epoch)
            self.leases.recover()
        elif epoch is None and self.epoch is not None:
            log.error("scheduler %s lost the leadership to %s: it stops dispatching", self.owner, self.store.leader())
        elif epoch is None and self.counters.get("follower_rounds", 0) == 0:
            log.warning("another scheduler (%s) leads this farm: this one waits", self.store.leader())
        if epoch is None:
            self.counters["follower_rounds"] = self.counters.get("follower_rounds", 0) + 1
        self.epoch = self.state.epoch = epoch

    def _if_leader(self, update):
        def step() -> None:
            if self.epoch is not None:
                update()

        step.__name__ = getattr(update, "__name__", "step")
        return step

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
        """Counters and each worker's state; called from other threads while the loop runs."""
        measured = self.measured
        return {
            **self.counters,
            "inflight": len(self.state.inflight),
            "workers": self.workers.stats(time.time()),
            "measurements": {"peaks": sum(len(p) for p in measured.peaks.values()),
                             "speeds": len(measured.speeds)},
            "update_failures": dict(self.update_failures),
            "redis_round_trips": self.store.round_trips,
            "queue_view": dict(self.dispatcher.view.counters),
        }

    @property
    def measured(self) -> Measurements:
        return self.dispatcher.measured

    # --- the wait at the end of a round ----------------------------------------------------------------

    def _wait(self) -> None:
        """Block (without spinning: a polling loop steals CPU from renders on small machines) until a
        batch finishes or, when some worker is idle, until the farm's event stream shows a change
        (a submit, a cancel, a job finishing)."""
        if not self.state.any_room():
            if self.state.inflight:  # every worker busy: only a finished batch matters
                self.results.collect(timeout=IDLE_WAKE_SECONDS)
            else:  # no worker can take work and none is rendering (all drained, dead or gone; or a follower):
                # sleep until something changes, not spin (issue 16)
                self.dispatcher.view.apply(self.events.read(IDLE_WAKE_SECONDS))
            return
        # Workers write their jobs' "done" to the same stream, so a finishing batch wakes this too. What the
        # events say changed keeps the dispatcher's view of the queue current (scheduler/queue_view.py).
        events = self.events.read(IDLE_WAKE_SECONDS)
        self.dispatcher.view.apply(events)
        changed = bool(events)
        self.results.collect(timeout=self.settings.poll_seconds if changed else 0.0)

    # --- single steps, for tests that drive a round by hand ---------------------------------------------

    def _maintain(self) -> None:
        self.leases.update()

    @property
    def _next_maintenance(self) -> float:
        return self.leases.next_due

    @_next_maintenance.setter
    def _next_maintenance(self, when: float) -> None:
        self.leases.next_due = when

    def _dispatch(self) -> None:
        self.dispatcher.update()

    def _queued(self) -> list[Job]:
        return self.dispatcher.queued()


def _handle(handle: Any, info: dict[str, Any]) -> WorkerHandle:
    """A worker given by its record names its actor, and is found by that name: the scheduler actor's
    constructor arguments carry no actor handles, because Ray keeps such arguments in its object store and
    a restart after they are gone fails (ray-project/ray#53727; Ray logs an error when it is asked to)."""
    if handle is None and info.get("actor"):
        found = RayCalls().find(info["actor"])
        if found is not None:
            return found
    return WorkerHandle(handle)
