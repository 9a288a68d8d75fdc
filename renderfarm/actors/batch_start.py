"""Starting a batch in Redis, in as few requests as can be (issue 16: round trips per job).

To start a batch is one request: each job leased -> running with its run deadline fixed (a node that hangs loses
its jobs then), and the node's record busy with what it renders. Finishing a batch is another (its results, the
measurement, the node's totals). At batch 1 that is two requests a job on the node, unless the start rides in
the request that finishes the batch before it, which the node sends anyway:
- a node that finishes on its torch thread (a CPU node: RenderWorker._finish_inline) finishes the batch before
  just before the next begins: when the next call has arrived by then (the scheduler keeps two batches in a
  node's queue), its start goes into that request (`_ride_with`), and its begin finds it done (`_begin`);
- a node that finishes beside the next render (a card) has the batch before still to finish when the next one
  begins: the next one's start goes into that finish's request and the render does not wait for it; when that
  batch's finishing ends without its request (a store that refused its images), the starts are sent alone
  (`_send_riding`), before the next batch may finish.
A start that rides may find a job no longer this node's (cancelled or taken back meanwhile): the render goes on,
its result is refused at completion (the store takes a result only from the node that holds the job running),
and the heartbeat's renewals stop the render at its next step once no job of it is held (RenderWorker._renew).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from renderfarm.jobs import Job, JobSpec

Started = tuple[list[Job], list[str], float]  # the jobs started, those lost meanwhile, the batch's time limit (s)


class BatchStarts:
    """The start half of RenderWorker (a mixin): it supplies `store`, `settings`, `name`, `progress`, `state`,
    `_books`, `_rendering`, `_finish_inline`, `_record` and `_idle`."""

    _books: threading.RLock

    def _init_starts(self) -> None:
        self._arrived: deque[tuple[tuple[str, ...], list[dict[str, Any]] | None]] = deque()  # calls not begun
        self._prestarted: dict[tuple[str, ...], Started] = {}  # begun in the request before theirs
        self._riding: list[tuple[list[Job], float, dict[str, Any]]] = []  # starts waiting for a finish's request
        self._finish_pending = False  # a rendered batch waits for its finish's request (finishing beside)

    def _arrive(self, job_ids: list[str], specs: list[dict[str, Any]] | None) -> None:
        """A call came (on its call thread): the batch before may take its start along."""
        with self._books:
            self._arrived.append((tuple(job_ids), specs))

    def _plan(self, job_ids: list[str], specs: list[dict[str, Any]] | None) -> Started:
        """The jobs a call names (from its specs, or read from Redis), those gone, and the batch's time limit."""
        if specs is None or len(specs) != len(job_ids):
            found = self.store.get_many(job_ids, quarantine=True)
            given = {j.id: j for j in found if j is not None}
        else:
            given = {job_id: Job(id=job_id, spec=JobSpec.model_validate(spec)) for job_id, spec in zip(job_ids, specs)}
        known = [given[j] for j in job_ids if j in given]
        lost = [j for j in job_ids if j not in given]
        if not known:
            return [], lost, 0.0
        spec = known[0].spec
        return known, lost, self.settings.job_timeout_s(spec.steps, spec.width, spec.height,
                                                        sum(j.spec.num_images for j in known))

    def _queue_start(self, rnd: Any, jobs: list[Job], timeout_s: float, shown: dict[str, Any]) -> list[Callable]:
        """The jobs' moves to running and the node's busy record, in `rnd`; a getter per job (held or not)."""
        starting = [self.store.queue_start(rnd, job.id, self.name, self.settings.lease_seconds,
                                           run_seconds=timeout_s) for job in jobs]
        self.store.queue_update_node(rnd, self.name, state=self.state, **self._record(), **shown)
        return starting

    def _busy(self, jobs: list[Job]) -> dict[str, Any]:
        """The node renders `jobs` now: its state, and the progress fields its record is to carry."""
        self.state, self._rendering = "busy", True
        return self.progress.start([job.id for job in jobs], jobs[0].spec.steps, publish=False)

    def _begin(self, job_ids: list[str], specs: list[dict[str, Any]] | None) -> Started:
        """Start the jobs that are still this node's (see the module's doc for when that rides in another
        request). Returns (the jobs started, those lost meanwhile, the batch's time limit in s)."""
        key = tuple(job_ids)
        with self._books:
            if (key, specs) in self._arrived:
                self._arrived.remove((key, specs))
            if key in self._prestarted:
                return self._prestarted.pop(key)
        jobs, lost, timeout_s = self._plan(job_ids, specs)
        if not jobs:
            return [], lost, 0.0
        with self._books:
            if self._finish_pending:  # the batch before finishes beside this render: ride in its request
                self._riding.append((jobs, timeout_s, self._busy(jobs)))
                return jobs, lost, timeout_s
            rnd = self.store.round()
            starting = self._queue_start(rnd, jobs, timeout_s, self._busy(jobs))
            try:
                rnd.run()
            except BaseException:
                self._rendering = False
                raise
        return self._held(jobs, lost, timeout_s, starting)

    def _held(self, jobs: list[Job], lost: list[str], timeout_s: float, starting: list[Callable]) -> Started:
        held = [started() for started in starting]
        kept = [job for job, ok in zip(jobs, held) if ok]
        lost = lost + [job.id for job, ok in zip(jobs, held) if not ok]
        if not kept:  # all cancelled or taken back before it began: the record says idle again
            with self._books:
                self._rendering = False
                self._idle()
        return kept, lost, timeout_s

    def _ride_with(self, rnd: Any) -> Callable[[], None]:
        """Put into `rnd`, a finish's request (under `_books`, after the node's record): the starts riding with
        it, and, finishing on the torch thread, the next call's start. The returned callable, called once `rnd`
        ran, keeps that call's outcome for its `_begin`."""
        riding, self._riding, self._finish_pending = self._riding, [], False
        for jobs, timeout_s, shown in riding:
            self._queue_start(rnd, jobs, timeout_s, shown)
        if not (self._finish_inline and self._arrived):
            return lambda: None
        key, specs = self._arrived[0]
        if specs is None:  # its jobs would have to be read first: it begins on its own
            return lambda: None
        jobs, lost, timeout_s = self._plan(list(key), specs)
        if not jobs:
            return lambda: None
        starting = self._queue_start(rnd, jobs, timeout_s, self._busy(jobs))

        def keep() -> None:
            self._prestarted[key] = self._held(jobs, lost, timeout_s, starting)

        return keep

    def _send_riding(self) -> None:
        """The starts still riding (their finish's request never went: its batch failed first), sent alone."""
        with self._books:
            self._finish_pending = False
            if not self._riding:
                return
            rnd = self.store.round()
            self._ride_with(rnd)
            rnd.run()
