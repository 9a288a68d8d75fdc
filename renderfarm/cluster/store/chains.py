"""Chains in the store: jobs that wait for others (renderfarm/chains.py builds them at submit).

A waiting job sits in the `waiting` index, outside every queue, until the jobs it names in `after` are done.
The scripts settle it (chain.lua): the move that finishes a parent queues its children whose parents are all
done, and fails or cancels, with the reason, those it failed or was cancelled under (and their children in
turn). `settle` runs the same over given waiting jobs: the scheduler's reconciling passes over the whole index
with it (`settle_waiting`), so that nothing waits forever for a parent that finished while nothing looked (a
retry racing its parent). `retry` of a job the cascade ended puts it back to wait, and a retried parent
brings back the chain it ended.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from renderfarm.cluster.keys import Keys
from renderfarm.cluster.store.jobs import EVENTS_MAXLEN
from renderfarm.jobs import IllegalTransition, Job, JobState

__all__ = ["ChainBlocked", "ChainRecords"]

SETTLE_SLICE = 500


class ChainBlocked(RuntimeError):
    """A job cannot be retried while a job it waits for is failed or cancelled."""

    def __init__(self, job_id: str, parent: str, state: str):
        self.job_id, self.parent, self.state = job_id, parent, state
        super().__init__(f"job {parent} it waits for is {state}: retry {parent} (its chain comes back with it)")


class ChainRecords:
    """The chain half of the Store; `Store` supplies `redis`, `keys`, `get`, `get_many`, `transition` and the
    registered `settle` script."""

    redis: redis.Redis
    keys: Keys

    def settle(self, job_ids: Sequence[str]) -> int:
        """Queue each waiting job among `job_ids` whose parents are all done; fail or cancel each whose parent
        failed or was cancelled (and its waiting descendants); how many moved."""
        if not job_ids:
            return 0
        keys = [*self.keys.all_indexes(), self.keys.queues, self.keys.events, self.keys.finished]
        args = [",".join(s.value for s in JobState), self.keys.job(""), self.keys.children(""), EVENTS_MAXLEN,
                repr(time.time()), *job_ids]
        return int(self._settle(keys=keys, args=args))

    def settle_waiting(self, cursor: int = 0, limit: int = SETTLE_SLICE) -> tuple[int, int]:
        """`settle` over `limit` waiting jobs from `cursor` (oldest first); (how many moved, the next cursor:
        0 after the last slice)."""
        ids = [m.decode() for m in self.redis.zrange(self.keys.index(JobState.WAITING), cursor, cursor + limit - 1)]
        moved = self.settle(ids)
        return moved, 0 if len(ids) < limit else cursor + len(ids) - moved

    def waits_for(self, jobs: Iterable[Job]) -> dict[str, list[tuple[str, str]]]:
        """For each waiting job among `jobs`: the jobs it names in `after` that are not done, with their states
        ("missing" for one without a record), in its order."""
        waiting = [job for job in jobs if job.state is JobState.WAITING]
        parents = sorted({p for job in waiting for p in job.spec.after})
        if not parents:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for parent in parents:
            pipe.hget(self.keys.job(parent), "state")
        states = {p: (raw.decode(errors="replace") if isinstance(raw, bytes) else "missing")
                  for p, raw in zip(parents, pipe.execute(raise_on_error=False))}
        return {job.id: [(p, states[p]) for p in job.spec.after if states[p] != JobState.DONE.value]
                for job in waiting}

    def retry(self, job_id: str) -> JobState:
        """failed or cancelled -> queued at its original place by an operator (a fresh set of attempts, no node,
        no error), or -> waiting when jobs it waits for are not done yet. The jobs this one's failure or cancel
        ended (chain.lua: their `blocked_by`) wait again, their descendants too. Returns the state it left;
        raises JobNotFound, IllegalTransition (any other state), ChainBlocked (a job it waits for is failed or
        cancelled), CorruptRecord (see `transition`)."""
        job = self.get(job_id)
        pending = self._parents_pending(job)
        left = self.transition(
            job_id, JobState.WAITING if pending else JobState.QUEUED, allowed_from={JobState.FAILED, JobState.CANCELLED},
            fields={"attempts": 0, "error": "", "node": "", "started_at": "", "finished_at": "", "run_deadline": "",
                    "blocked_by": "", **({"parents": json.dumps(pending)} if pending else {})},
        )
        self._reopen_chain(job_id)
        if pending:
            self.settle([job_id])  # a parent may have finished since it was read
        return left

    def _parents_pending(self, job: Job) -> list[str]:
        """The jobs `job` waits for that are not done; ChainBlocked if one failed or was cancelled."""
        if not job.spec.after:
            return []
        pending = []
        for parent, found in zip(job.spec.after, self.get_many(job.spec.after)):
            if found is None:
                raise ChainBlocked(job.id, parent, "gone")
            if found.state in (JobState.FAILED, JobState.CANCELLED):
                raise ChainBlocked(job.id, parent, found.state.value)
            if found.state is not JobState.DONE:
                pending.append(parent)
        return pending

    def _reopen_chain(self, job_id: str) -> int:
        """Every job the cascade ended because of `job_id` (transitively), back to waiting; how many."""
        reopened, frontier = 0, [job_id]
        while frontier:
            parent = frontier.pop()
            children = sorted(m.decode() for m in self.redis.smembers(self.keys.children(parent)))
            for child in self.get_many(children):
                if child is None or child.blocked_by != parent or not child.state.terminal:
                    continue
                try:
                    self.transition(child.id, JobState.WAITING, allowed_from={JobState.FAILED, JobState.CANCELLED},
                                    fields={"error": "", "finished_at": "", "blocked_by": "",
                                            "parents": json.dumps(list(child.spec.after))})
                except IllegalTransition:  # retried or moved by someone else meanwhile
                    continue
                reopened += 1
                frontier.append(child.id)
        return reopened

    # Supplied by the Store's other parts.
    def get(self, job_id: str) -> Job:
        raise NotImplementedError

    def get_many(self, job_ids: Iterable[str], quarantine: bool = False) -> list[Job | None]:
        raise NotImplementedError

    def transition(self, job_id: str, target: JobState, **options: Any) -> JobState:
        raise NotImplementedError
