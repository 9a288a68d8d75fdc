"""Reconciling, one of the scheduler's managers: on a slow cadence, a bounded slice of every index and team
queue is checked against the job hashes (`Store.reconcile`), so an id the hashes disagree with (a finished job
still queued, a leased id whose hash is gone) is moved where its hash says or quarantined, counted, and never
left to block a queue forever. A full pass over a large farm takes several rounds; the cursor carries over."""

from __future__ import annotations

import logging
import time

from renderfarm.scheduler.managers import SchedulerState

log = logging.getLogger(__name__)

RECONCILE_SECONDS = 10.0  # between slices: reconciling repairs what should never happen, so it may be slow
RECONCILE_SLICE = 1000  # index entries checked per slice


class ReconcileManager:
    def __init__(self, state: SchedulerState, every_s: float = RECONCILE_SECONDS, slice_size: int = RECONCILE_SLICE):
        self.state = state
        self.every_s = every_s
        self.slice_size = slice_size
        self.cursor = (0, 0)
        self.next_due = 0.0

    def update(self) -> None:
        now = time.time()
        if now < self.next_due:
            return
        self.next_due = now + self.every_s
        report = self.state.store.reconcile(self.cursor, self.slice_size)
        self.cursor = report.cursor
        if report.moved or report.quarantined:
            log.error("reconcile: %d index entries moved where their job record says, %d quarantined",
                      report.moved, report.quarantined)
