"""Step progress of the batch a node renders, published to its Redis record for the dashboard.

`render_batch` calls `step(n, steps)` after every denoising step (from the diffusers `callback_on_step_end`);
the node's record then holds `current_job` (the batch's first job), `batch_jobs`, `step` and `steps` until the
batch ends (`clear`, or `end` when the worker writes the idle fields itself). The step writes go through
`Store.update_node` at most every `interval` s, from a thread of their own: the render never waits on Redis
(the worker's client retries a lost connection for ~30 s, and a Redis outage must not stall a render), and a
write still in flight makes later steps skip theirs. A batch shorter than `interval` costs no write of its own:
the worker says what it starts and ends in the requests that start and finish its jobs (`publish=False`,
`end`), which is what keeps a job at batch 1 within three round trips (issue 16).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

from renderfarm.cluster.store import Store
from renderfarm.faults import Fault, classify

log = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 0.5  # at most two writes a second per node
IDLE = {"current_job": None, "batch_jobs": 0, "step": None, "steps": None}


class StepProgress:
    def __init__(
        self, store: Store, name: str, interval: float = PUBLISH_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store, self.name, self.interval, self.clock = store, name, interval, clock
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"progress-{name}")
        self._pending: Future[None] | None = None
        self._last = float("-inf")
        self._job: str | None = None
        self._batch_jobs = 0

    def start(self, job_ids: list[str], steps: int, publish: bool = True) -> dict[str, Any]:
        """A batch begins (its pipeline may still have to load): step 0 of `steps`. Returns the fields; with
        `publish=False` the caller writes them (with the jobs' start, in one request)."""
        self._job, self._batch_jobs, self._last = job_ids[0], len(job_ids), self.clock()
        fields = {"current_job": self._job, "batch_jobs": self._batch_jobs, "step": 0, "steps": steps}
        if publish:
            self._submit(fields)
        return fields

    def step(self, step: int, steps: int) -> None:
        """Step `step` of `steps` is done; published unless the last write was under `interval` s ago or is
        still in flight."""
        if self._job is None:
            return
        now = self.clock()
        if now - self._last < self.interval:
            return
        if self._pending is not None and not self._pending.done():
            return
        self._last = now
        self._submit({"current_job": self._job, "batch_jobs": self._batch_jobs, "step": step, "steps": steps})

    def clear(self) -> None:
        """The batch ended (rendered, stopped or failed): the record says it renders nothing. Queued behind
        any write in flight, so no late step overwrites it."""
        self._job, self._last = None, float("-inf")
        self._pending = self._writer.submit(self._write, dict(IDLE))

    def end(self, timeout: float = 5.0) -> dict[str, Any]:
        """The batch ended and the caller writes the idle fields (returned) itself: no step is written any
        more, and a write still in flight is waited for (up to `timeout` s), so none lands after the caller's."""
        self._job, self._last = None, float("-inf")
        if self._pending is not None:
            wait([self._pending], timeout=timeout)
        return dict(IDLE)

    def close(self, timeout: float = 5.0) -> None:
        """Wait (up to `timeout` s) for the writes queued so far, then stop the writer thread."""
        if self._pending is not None:
            wait([self._pending], timeout=timeout)  # _write never raises; one still running finishes on its own
        self._writer.shutdown(wait=False)

    def _submit(self, fields: dict[str, Any]) -> None:
        self._pending = self._writer.submit(self._write, fields)

    def _write(self, fields: dict[str, Any]) -> None:
        try:
            self.store.update_node(self.name, **fields)
        except Exception as exc:  # the dashboard misses a step; the render goes on
            outage = classify(exc) is Fault.OUTAGE  # Redis away: one line, the traceback says nothing more
            log.warning("node %s: could not publish its progress: %s", self.name, exc, exc_info=not outage)
