"""Reconciling the indexes with the job hashes: the hash is the record, an index entry only points at it.

Every move keeps them in step (one Lua script each), but a hand edit, a restored backup or a bug can leave an
id where its hash does not say it is: a job done in Redis still queued, so it sits at the head of its queue
forever; an id in `leased` or `running` whose hash was deleted, so nothing ever reaps it. `reconcile` walks
every index and team queue a bounded slice at a time (ZSCAN) and, per id, in one script
(scripts/reconcile.lua): an id whose hash names another state moves to the index its hash names; one without
a hash, or whose hash cannot be placed (no known state, a queued job without a numeric score), is quarantined
(`JobRecords.quarantine`). Both are counted (`reconciled_moved`, `reconciled_quarantined`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from renderfarm.cluster.keys import Keys
from renderfarm.jobs import JobState

log = logging.getLogger(__name__)

__all__ = ["ReconcileReport", "Reconciler"]


@dataclass(frozen=True)
class ReconcileReport:
    checked: int  # ids looked at in this call
    moved: int  # ids moved to the index their hash names
    quarantined: int  # ids without a hash, or with one that cannot be placed
    cursor: tuple[int, int]  # where the next call goes on; (0, 0) after a full pass


class Reconciler:
    """The reconciling part of the Store; `Store` supplies `redis`, `keys`, `quarantine`, `count` and the
    registered scripts."""

    redis: redis.Redis
    keys: Keys

    def reconcile(self, cursor: tuple[int, int] = (0, 0), limit: int = 500) -> ReconcileReport:
        """Check about `limit` index entries against their hashes, from `cursor` (the report's cursor of the
        previous call; (0, 0) starts a pass), and repair or quarantine those that disagree."""
        indexes = self.keys.all_indexes()
        targets = indexes + sorted(q.decode(errors="replace") for q in self.redis.smembers(self.keys.queues))
        position, scan = cursor
        checked = moved = quarantined = 0
        while checked < limit and position < len(targets):
            key = targets[position]
            in_state = list(JobState)[position].value if position < len(indexes) else JobState.QUEUED.value
            if self.redis.type(key) != b"zset":
                scan = 0  # gone since the list was read (an emptied queue), or not ours to read
            else:
                scan, entries = self.redis.zscan(key, scan, count=max(1, limit - checked))
                ids = [member.decode(errors="replace") for member, _ in entries]
                if ids:
                    args: list[str] = [",".join(s.value for s in JobState), in_state,
                                       "0" if position < len(indexes) else "1", repr(time.time())]
                    for job_id in ids:
                        args += [job_id, self.keys.job(job_id)]
                    verdicts = self._reconcile(keys=[*indexes, self.keys.queues, key], args=args)
                    for job_id, raw in zip(ids, verdicts):
                        verdict = raw.decode(errors="replace")
                        if verdict == "moved":
                            moved += 1
                            log.warning("job %s was listed in %s against its record: moved", job_id, key)
                        elif verdict == "missing":
                            quarantined += self.quarantine(job_id, f"listed in {key} without a job record",
                                                           only_if_missing=True)
                        elif verdict.startswith("corrupt:"):
                            self.quarantine(job_id, f"listed in {key}: {verdict.removeprefix('corrupt:')}")
                            quarantined += 1
                    checked += len(ids)
            if scan == 0:
                position += 1
        if moved:
            self.count("reconciled_moved", moved)
        if quarantined:
            self.count("reconciled_quarantined", quarantined)
        done = position >= len(targets)
        return ReconcileReport(checked, moved, quarantined, (0, 0) if done else (position, scan))

    # Supplied by the Store's other parts.
    def quarantine(self, job_id: str, reason: str, *, only_if_missing: bool = False) -> bool:
        raise NotImplementedError

    def count(self, name: str, n: int = 1) -> None:
        raise NotImplementedError
