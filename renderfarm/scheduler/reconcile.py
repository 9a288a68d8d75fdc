"""Reconciling, one of the scheduler's managers: on a slow cadence, a bounded slice of every index and team
queue is checked against the job hashes (`Store.reconcile`), so an id the hashes disagree with (a finished job
still queued, a leased id whose hash is gone) is moved where its hash says or quarantined, counted, and never
left to block a queue forever. A full pass over a large farm takes several rounds; the cursor carries over.

It also keeps the result store's retention: every `result_sweep_seconds` it deletes blobs older than
`result_ttl_seconds` (cluster/blobs `sweep`), in a thread of its own, since listing a large store (a NAS
directory, a bucket) takes seconds the loop must not wait; one sweep at a time. Each sweep's count goes to the
farm's `blobs_swept` counter.

And it settles waiting jobs a slice at a time (`Store.settle_waiting`): a job whose parents finished without
anything settling it (a retry that raced its parent) is queued, or failed with its parent, within a pass."""

from __future__ import annotations

import logging
import threading
import time

from renderfarm.cluster.blobs import BlobStoreError, open_result_store
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
        self.settle_cursor = 0  # where the next slice of the waiting index starts (chains)
        self.next_due = 0.0
        self.next_sweep = 0.0  # the first sweep at the first round: a restarted scheduler catches up at once
        self.sweeping: threading.Thread | None = None

    def update(self) -> None:
        self._sweep_if_due()
        now = time.time()
        if now < self.next_due:
            return
        self.next_due = now + self.every_s
        report = self.state.store.reconcile(self.cursor, self.slice_size)
        self.cursor = report.cursor
        if report.moved or report.quarantined:
            log.error("reconcile: %d index entries moved where their job record says, %d quarantined",
                      report.moved, report.quarantined)
        settled, self.settle_cursor = self.state.store.settle_waiting(self.settle_cursor, self.slice_size)
        if settled:  # each finishing parent settles its children itself: this catches what nothing settled
            log.warning("reconcile: %d waiting jobs settled whose parents had finished", settled)

    def _sweep_if_due(self) -> None:
        now = time.time()
        if now < self.next_sweep or (self.sweeping is not None and self.sweeping.is_alive()):
            return
        self.next_sweep = now + self.state.settings.result_sweep_seconds
        self.sweeping = threading.Thread(target=self.sweep_blobs, name="blob-sweep", daemon=True)
        self.sweeping.start()

    def sweep_blobs(self) -> int:
        """Delete the result blobs older than `result_ttl_seconds`; how many (0, logged, when the store fails)."""
        settings = self.state.settings
        try:
            deleted = open_result_store(settings).sweep(settings.result_ttl_seconds)
        except BlobStoreError as exc:
            log.error("result store sweep failed (retried in %g s): %s", settings.result_sweep_seconds, exc)
            return 0
        except Exception:  # a thread of its own: nothing above would see it
            log.exception("result store sweep failed (retried in %g s)", settings.result_sweep_seconds)
            return 0
        if deleted:
            log.info("result store: %d blobs older than %d s deleted", deleted, settings.result_ttl_seconds)
            try:
                self.state.store.count("blobs_swept", deleted)
            except Exception as exc:  # Redis away: the blobs are gone all the same, only the count is lost
                log.warning("could not count %d swept blobs: %s", deleted, exc)
        return deleted
