"""The dispatcher's view of the queue: the jobs it plans from, kept up to date from the event stream rather
than read whole every round (issue 16: a job at batch 1 costs the farm at most three requests to Redis).

A full read (`refresh`) takes the head of the queue (the first `window` jobs by priority and submit time) and
the oldest `per_queue` jobs of every (team, priority) queue, as the planner has always seen it. Between full
reads, the events the scheduler reads anyway (it sleeps on the stream, and every lease round reads what
happened since) say what changed: a job that entered the queue (submitted, retried, requeued) is read once,
in one request for all that arrived together (its spec never changes); one that left it (leased, cancelled,
quarantined) is forgotten. The stream is written by the same script as each state change, in order, so a view
built from a full read and then every event after the last one read before it is the queue as it stands.

A full read is still made every `full_every_s` (what an event cannot tell: a job whose record was mended by
hand, a stream trimmed past this reader), as soon as the view runs low while the last full read was cut at
its window (there is more queue behind it than the view holds), and instead of reading a flood of arrivals
(more than twice what a full read holds): the view stays the size of the window.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from renderfarm.cluster.store import Event, Store
from renderfarm.jobs import Job, JobState

PENDING_WINDOW = 2000  # how far down the queue (priority, then submit time) one full read looks
PER_QUEUE = 200  # and how many of the oldest jobs of each (team, priority) queue


class QueueView:
    def __init__(self, store: Store, full_every_s: float, window: int = PENDING_WINDOW, per_queue: int = PER_QUEUE):
        self.store, self.full_every_s, self.window, self.per_queue = store, full_every_s, window, per_queue
        self.jobs: dict[str, Job] = {}  # queued jobs, by id, in the order the last full read gave (then arrivals)
        self._arrived: dict[str, None] = {}  # ids an event says entered the queue, whose records are not read yet
        self._next_full = 0.0
        self._cut = False  # the last full read filled its window: the queue goes on behind it
        self._cut_size = 0
        self.counters = {"full_reads": 0, "arrivals_read": 0}
        self.added = 0  # jobs that entered the view so far: a round can tell whether anything new came

    def queued(self, now: float | None = None) -> list[Job]:
        """The queued jobs to plan from (a full read when one is due; the records of new arrivals read)."""
        now = time.monotonic() if now is None else now
        running_low = self._cut and len(self.jobs) < self._cut_size // 2
        # A flood of arrivals (a huge submit while every node was busy) is read as the window, not whole.
        flooded = len(self._arrived) + len(self.jobs) > 2 * max(self.window, self._cut_size)
        if now >= self._next_full or running_low or flooded:
            self._refresh(now)
        elif self._arrived:
            ids = list(self._arrived)
            self._arrived = {}
            self.counters["arrivals_read"] += len(ids)
            for job_id, job in zip(ids, self.store.get_many(ids, quarantine=True)):
                if job is not None and job.state is JobState.QUEUED:
                    self.jobs[job_id] = job
                    self.added += 1
        return list(self.jobs.values())

    def apply(self, events: Iterable[Event]) -> None:
        """What the event stream says changed since the last look."""
        for event in events:
            if event.state is JobState.QUEUED:
                if event.job not in self.jobs:
                    self._arrived[event.job] = None
            elif event.state is not None:
                self.jobs.pop(event.job, None)
                self._arrived.pop(event.job, None)

    def left(self, job_ids: Iterable[str]) -> None:
        """Jobs this scheduler took out of the queue itself (leased): gone from the view at once."""
        for job_id in job_ids:
            self.jobs.pop(job_id, None)

    def stale(self) -> None:
        """Make the next `queued` a full read."""
        self._next_full = 0.0

    def _refresh(self, now: float) -> None:
        """The head of the queue, with the oldest jobs of every (team, priority) queue; a job already known is
        not read again, and what left the queue is forgotten."""
        store = self.store
        head = store.pending_ids(self.window)
        ids = list(dict.fromkeys(head + store.queue_heads(self.per_queue)))
        known = {i: self.jobs[i] for i in ids if i in self.jobs}
        missing = [i for i in ids if i not in known]
        if missing:
            for job_id, job in zip(missing, store.get_many(missing, quarantine=True)):
                # None: no record behind the id (an orphan still queued), or one just quarantined (gone from the queue).
                if job is None and store.position(job_id) is not None:
                    store.quarantine(job_id, "queue entry without a job record")
                elif job is not None and job.state is JobState.QUEUED:
                    known[job_id] = job
        self.added += sum(1 for i in ids if i in known and i not in self.jobs)
        self.jobs = {i: known[i] for i in ids if i in known}
        self._arrived = {}
        self._cut, self._cut_size = len(head) >= self.window, len(self.jobs)
        self._next_full = now + self.full_every_s
        self.counters["full_reads"] += 1
