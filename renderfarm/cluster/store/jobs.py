"""Jobs: submit, read, and every state change (one checked Lua script, idempotent by operation token)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from renderfarm.cluster.keys import Keys
from renderfarm.cluster.store.codec import job_from_hash, job_to_hash, quarantine_reason, text
from renderfarm.cluster.store.round import Round
from renderfarm.errors import CorruptRecord, JobNotFound, SpecError
from renderfarm.jobs import IllegalTransition, Job, JobState, sources_of

log = logging.getLogger(__name__)

EVENTS_MAXLEN = 100_000
STATES = list(JobState)


class LeaseLive(RuntimeError):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"job {job_id}: its lease has not expired")


class Fenced(RuntimeError):
    """A write made under a leadership epoch that is no longer the farm's: another scheduler leads now."""

    def __init__(self, job_id: str, epoch: int | None):
        self.job_id, self.epoch = job_id, epoch
        super().__init__(f"job {job_id}: not written under epoch {epoch}: another scheduler leads the farm now")


class OwnershipLost(RuntimeError):
    def __init__(self, job_id: str, node: str):
        self.job_id, self.node = job_id, node
        super().__init__(f"job {job_id} is no longer held by node {node!r}")


@dataclass(frozen=True)
class Move:
    """One state change, ready to send (`JobRecords.move`)."""

    job_id: str
    target: JobState
    expect_node: str | None
    fence: int | None
    keys: list[str]
    args: list[Any]


def _succeeded(outcome: Callable[[], JobState], *refusals: type[Exception]) -> bool:
    """True when the move happened; False when it was refused for one of `refusals` (someone else moved the
    job first); anything else raises."""
    try:
        outcome()
    except refusals:
        return False
    return True


def _blob_urls(job_id: str, raw: bytes | None) -> list[str] | None:
    if not raw:
        return None
    try:
        urls = json.loads(raw)
    except ValueError as exc:
        raise CorruptRecord(f"job {job_id!r}: its blobs field is not JSON: {exc}") from None
    if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
        raise CorruptRecord(f"job {job_id!r}: its blobs field is not a list of URLs: {raw[:200]!r}")
    return urls


class JobRecords:
    """The job half of the Store (jobs.py); `Store` supplies `redis`, `keys` and the registered scripts."""

    redis: redis.Redis
    keys: Keys

    def submit(self, jobs: Sequence[Job], batch_id: str, webhook: dict[str, str] | None = None) -> list[bool]:
        """Enqueue `jobs` as one batch in one transaction; True per job that was new, False if it existed.
        `webhook`: the batch's webhook ({url, team}: renderfarm/webhooks), written in the same transaction (kept
        from the first submit that gave one)."""
        if not jobs:
            return []
        keys = [self.keys.pending, self.keys.events, self.keys.batch(batch_id), self.keys.queues,
                self.keys.batch_webhook(batch_id), self.keys.batch_open(batch_id), self.keys.index(JobState.WAITING)]
        hook = "" if webhook is None else json.dumps({**{k: str(v) for k, v in webhook.items()},
                                                       "created": repr(time.time())})
        args: list[Any] = [EVENTS_MAXLEN, repr(time.time()), hook, self.keys.job(""), self.keys.children("")]
        for job in jobs:
            fields = job_to_hash(job.model_copy(update={"batch_id": batch_id}))
            fields["queue"] = self.keys.queue(job.spec.team, job.spec.priority)
            keys.append(self.keys.job(job.id))
            args += [job.id, fields["score"], json.dumps(fields)]
        created = self._submit(keys=keys, args=args)
        if created and created[0] == b"corrupt":  # checked before any write: nothing was enqueued
            raise CorruptRecord(f"batch {batch_id!r} not enqueued: {created[1].decode(errors='replace')}")
        if created and created[0] == b"parent":
            job_id, parent, state = (part.decode(errors="replace") for part in created[1:4])
            why = "does not exist" if state == "missing" else f"is {state}: retry it first, or leave it out"
            raise SpecError(f"job {job_id}: after: job {parent} {why}; nothing was enqueued")
        return [bool(flag) for flag in created]

    def get(self, job_id: str) -> Job:
        return job_from_hash(self._job_hash(job_id))

    def get_with_blobs(self, job_id: str) -> tuple[Job, list[str] | None]:
        """The job and the blob URLs of its images (see `result_blobs`), from one read of its record."""
        raw = self._job_hash(job_id)
        return job_from_hash(raw), _blob_urls(job_id, raw.get(b"blobs"))

    def _job_hash(self, job_id: str) -> dict[bytes, bytes]:
        try:
            raw = self.redis.hgetall(self.keys.job(job_id))
        except redis.ResponseError as exc:  # WRONGTYPE: the job's key holds something else than a hash
            raise CorruptRecord(f"job record {job_id!r} is not a hash: {exc}") from None
        if not raw:
            reason = self.quarantine_reason(job_id)
            if reason is not None:
                raise CorruptRecord(f"job {job_id!r} is quarantined: {reason}")
            raise JobNotFound(job_id)
        return raw

    def get_many(self, job_ids: Iterable[str], quarantine: bool = False) -> list[Job | None]:
        """The jobs, None for each that does not exist. A record that does not parse raises CorruptRecord,
        or with `quarantine`, is quarantined (see `quarantine`) and comes back as None."""
        ids = list(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        out: list[Job | None] = []
        for job_id, raw in zip(ids, pipe.execute(raise_on_error=False)):
            try:
                if isinstance(raw, redis.ResponseError):  # WRONGTYPE: the key holds something else than a hash
                    raise CorruptRecord(f"job record {job_id!r} is not a hash: {raw}")
                out.append(job_from_hash(raw) if raw else None)
            except CorruptRecord as exc:
                if not quarantine:
                    raise
                self.quarantine(job_id, str(exc))
                out.append(None)
        return out

    def state(self, job_id: str) -> JobState | None:
        raw = self.redis.hget(self.keys.job(job_id), "state")
        return JobState(raw.decode()) if raw else None

    def pending_ids(self, limit: int = 1000) -> list[str]:
        return [m.decode() for m in self.redis.zrange(self.keys.pending, 0, limit - 1)]

    def ids_in(self, state: JobState, limit: int = 1000, newest_first: bool = False, offset: int = 0) -> list[str]:
        index = self.keys.index(state)
        fetch = self.redis.zrevrange if newest_first else self.redis.zrange
        return [m.decode() for m in fetch(index, offset, offset + limit - 1)]

    def counts(self) -> dict[str, int]:
        pipe = self.redis.pipeline(transaction=False)
        for state in STATES:
            pipe.zcard(self.keys.index(state))
        return {state.value: n for state, n in zip(STATES, pipe.execute())}

    def batch_ids(self, batch_id: str) -> list[str]:
        return sorted(m.decode() for m in self.redis.smembers(self.keys.batch(batch_id)))

    def result_images(self, job_id: str) -> list[bytes]:
        raw = self.redis.hgetall(self.keys.result(job_id))
        return [raw[k] for k in sorted(raw, key=lambda k: int(k))]

    def result_blobs(self, job_id: str) -> list[str] | None:
        """The blob URLs of a done job's images, in order (its record's `blobs` field, a JSON list written at
        completion); None for a record without one (written before results moved to the blob store: its
        images, if any, are in `result_images`). A field that is not a JSON list of strings: CorruptRecord."""
        return _blob_urls(job_id, self.redis.hget(self.keys.job(job_id), "blobs"))

    def position(self, job_id: str) -> int | None:
        """0-based place in the pending queue, None when not queued."""
        return self.redis.zrank(self.keys.pending, job_id)

    def queue_heads(self, per_queue: int) -> list[str]:
        """The oldest `per_queue` jobs of every (team, priority) queue: what fair share and aging choose
        from, however long any one team's queue is."""
        queues = sorted(self.redis.smembers(self.keys.queues))
        pipe = self.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.zrange(queue, 0, per_queue - 1)
        return [m.decode() for heads in pipe.execute() for m in heads]

    def transition(self, job_id: str, target: JobState, **options: Any) -> JobState:
        """Move `job_id` to `target` atomically; returns the state it left.

        `score` is the job's score in its new index; a string "+N" means N seconds after Redis's clock (lease
        deadlines), and so does each value of `timed_fields` (a field set to that moment: a run deadline).
        With `expired_only`, the move happens only if the job's deadline in its current index
        has passed (a lease reaped at the same moment as it was renewed stays with its holder).
        Idempotent: each call carries an operation token (`op`, a fresh one by default), so a script that
        redis-py re-sends after a lost reply answers what its first run did (scripts/transition.lua).
        `fence`: see `lease`. Raises Fenced, JobNotFound, IllegalTransition (the move is not legal from the
        current state, or not one of `allowed_from`), OwnershipLost (the job is no longer held by `expect_node`), LeaseLive, or
        CorruptRecord: the record cannot be moved as it stands (then it is quarantined, see `quarantine`), or a
        farm key holds the wrong type. The script checks all that before it writes anything.
        """
        move = self.move(job_id, target, **options)  # the options: see `move`
        return self.moved(move, self._transition(keys=move.keys, args=move.args))

    def move(
        self,
        job_id: str,
        target: JobState,
        *,
        allowed_from: Iterable[JobState] | None = None,
        expect_node: str | None = None,
        score: float | str | None = None,
        fields: dict[str, Any] | None = None,
        timed_fields: dict[str, float] | None = None,
        add_attempt: bool = False,
        expired_only: bool = False,
        op: str | None = None,
        fence: int | None = None,
    ) -> Move:
        """One state change as the transition script's keys and arguments (see `transition`), to run alone or
        with others in one round trip (`Round.move`, store/round.py); `moved` reads its reply."""
        legal = sources_of(target)
        if allowed_from is not None:
            legal &= frozenset(allowed_from)
        args: list[Any] = [
            job_id,
            "," + ",".join(s.value for s in legal) + ",",
            target.value,
            "" if score is None else score if isinstance(score, str) else repr(score),
            expect_node or "",
            repr(time.time()),
            json.dumps({k: text(v) for k, v in (fields or {}).items()}),
            "1" if add_attempt else "0",
            EVENTS_MAXLEN,
            ",".join(s.value for s in STATES),
            "1" if expired_only else "0",
            op or uuid.uuid4().hex,
            "" if fence is None else str(int(fence)),
            json.dumps({k: float(v) for k, v in (timed_fields or {}).items()}),
            self.keys.job(""),
            self.keys.children(""),
        ]
        keys = [
            self.keys.job(job_id), self.keys.events, *self.keys.all_indexes(),
            self.keys.queues, self.keys.leader_epoch, self.keys.finished,
        ]
        return Move(job_id, target, expect_node, fence, keys, args)

    def moved(self, move: Move, reply: Any) -> JobState:
        """The state `move` left, from the transition script's reply; raises as `transition` says."""
        job_id, target = move.job_id, move.target
        status, current = (part.decode(errors="replace") for part in reply)
        if status == "missing":
            raise JobNotFound(job_id)
        if status == "corrupt":  # the script wrote nothing; taken aside whole, never lost half-way
            self.quarantine(job_id, f"job record cannot move to {target.value}: {current}")
            raise CorruptRecord(f"job {job_id!r} is quarantined: its record cannot move to {target.value}: {current}")
        if status == "badkey":
            raise CorruptRecord(f"job {job_id!r} not moved to {target.value}: {current}")
        if status == "state":
            raise IllegalTransition(job_id, current, target)
        if status == "node":
            raise OwnershipLost(job_id, move.expect_node or "")
        if status == "live":
            raise LeaseLive(job_id)
        if status == "fenced":
            raise Fenced(job_id, move.fence)
        return JobState(current)

    def run_deadline(self, job_id: str) -> float | None:
        """When a running job's lease stops being renewable (Redis's clock), once its node fixed it; else None."""
        raw = self.redis.hget(self.keys.job(job_id), "run_deadline")
        try:
            return float(raw) if raw else None
        except ValueError:
            return None

    def lease(self, job_id: str, node: str, lease_seconds: float, fence: int | None = None) -> bool:
        """queued -> leased to `node` for `lease_seconds` (renewed by whoever holds it, see `renew`);
        False if someone else got there first (cancelled, leased). With `fence` (the scheduler's leadership
        epoch) the lease is refused (Fenced) unless that is still the farm's current leadership: a scheduler
        that lost the lock without noticing leases nothing."""
        return self._alone(lambda rnd: self.queue_lease(rnd, job_id, node, lease_seconds, fence))

    def queue_lease(
        self, rnd: Round, job_id: str, node: str, lease_seconds: float, fence: int | None = None
    ) -> Callable[[], bool]:
        """`lease` as part of a round (one request for many jobs); the getter answers as `lease` does."""
        outcome = rnd.move(self.move(
            job_id, JobState.LEASED, score=f"+{float(lease_seconds)!r}", add_attempt=True,
            fields={"node": node, "error": "", "run_deadline": ""}, fence=fence,
        ))
        return lambda: _succeeded(outcome, IllegalTransition, JobNotFound, CorruptRecord)

    def start(self, job_id: str, node: str, lease_seconds: float, run_seconds: float | None = None) -> bool:
        """leased -> running on `node`; False when the job is no longer this node's (cancelled, requeued).
        With `run_seconds`, the job's run deadline (see `renew`) is fixed now: that long after Redis's clock."""
        return self._alone(lambda rnd: self.queue_start(rnd, job_id, node, lease_seconds, run_seconds))

    def queue_start(
        self, rnd: Round, job_id: str, node: str, lease_seconds: float, run_seconds: float | None = None
    ) -> Callable[[], bool]:
        """`start` as part of a round; the getter answers as `start` does."""
        outcome = rnd.move(self.move(
            job_id, JobState.RUNNING, expect_node=node, score=f"+{float(lease_seconds)!r}",
            fields={"started_at": time.time(), **({} if run_seconds is not None else {"run_deadline": ""})},
            timed_fields=None if run_seconds is None else {"run_deadline": float(run_seconds)},
        ))
        return lambda: _succeeded(outcome, IllegalTransition, JobNotFound, OwnershipLost, CorruptRecord)

    def renew(
        self, job_ids: Sequence[str], node: str, lease_seconds: float, timeout_seconds: float | None = None
    ) -> list[bool]:
        """Extend the leases `node` holds on `job_ids` to `lease_seconds` from now (Redis's clock); a running
        job's lease never goes past its run deadline (fixed by `start`, or else `timeout_seconds` after its first
        renewal while running). True per job
        still held by `node`; False for one that was cancelled, requeued or finished meanwhile."""
        if not job_ids:
            return []
        keys = [self.keys.index(JobState.LEASED), self.keys.index(JobState.RUNNING),
                *(self.keys.job(j) for j in job_ids)]
        args = [node, repr(float(lease_seconds)), "" if timeout_seconds is None else repr(float(timeout_seconds)),
                *job_ids]
        flags = self._renew(keys=keys, args=args)
        for job_id, flag in zip(job_ids, flags):
            if flag == -1:  # checked before any write: taken aside whole
                self.quarantine(job_id, "its lease cannot be renewed: the record is not a hash, names another id, "
                                        "or its run_deadline is not a number")
        return [flag == 1 for flag in flags]

    def expired(self, limit: int = 1000) -> list[str]:
        """Leased or running jobs whose lease deadline has passed by Redis's clock (nobody renewed them)."""
        keys = [self.keys.index(JobState.LEASED), self.keys.index(JobState.RUNNING)]
        return [m.decode() for m in self._expired(keys=keys, args=[limit])]

    def complete(
        self,
        job_id: str,
        node: str,
        blobs: Sequence[str],
        timings: dict[str, float],
        peak_memory_mb: float | None,
        profile: str | None = None,
        escalations: Sequence[str] = (),
    ) -> bool:
        """running -> done, exactly once, with the URLs of its images in the blob store (cluster/blobs: the
        images themselves never enter Redis); False (result discarded, and counted: `cancelled` results apart
        from `late_results`) when the job was cancelled, requeued or handed to another node meanwhile, e.g.
        because this node's lease expired. The caller deletes the blobs of a discarded result."""
        return self._alone(lambda rnd: self.queue_complete(
            rnd, job_id, node, blobs, timings, peak_memory_mb, profile, escalations))

    def queue_complete(
        self,
        rnd: Round,
        job_id: str,
        node: str,
        blobs: Sequence[str],
        timings: dict[str, float],
        peak_memory_mb: float | None,
        profile: str | None = None,
        escalations: Sequence[str] = (),
    ) -> Callable[[], bool]:
        """`complete` as part of a round; the getter answers (and counts a late result) as `complete` does."""
        if not all(isinstance(url, str) and url for url in blobs):
            raise TypeError(f"job {job_id}: complete takes the blob URLs of its images, not {type(blobs).__name__}")
        now = time.time()
        outcome = rnd.move(self.move(
            job_id, JobState.DONE, expect_node=node, score=now,
            fields={"finished_at": now, "timings": json.dumps(timings), "peak_memory_mb": peak_memory_mb,
                    "profile": profile, "escalations": json.dumps(list(escalations)),
                    "blobs": json.dumps(list(blobs)), "images": len(blobs)},
        ))

        def done() -> bool:
            try:
                outcome()
            except IllegalTransition as exc:
                self.count("results_after_cancel" if exc.current is JobState.CANCELLED else "late_results")
                return False
            except (JobNotFound, OwnershipLost):
                self.count("late_results")
                return False
            except CorruptRecord:  # quarantined (and counted) by `moved`
                return False
            return True

        return done

    def round(self) -> Round:
        """Operations to send together in one request (store/round.py)."""
        return Round(self)

    def _alone(self, queue: Callable[[Round], Callable[[], bool]]) -> bool:
        rnd = self.round()
        outcome = queue(rnd)
        rnd.run()
        return outcome()

    def fail(self, job_id: str, error: str, node: str | None = None, *, expired_only: bool = False) -> bool:
        now = time.time()
        try:
            self.transition(
                job_id, JobState.FAILED, expect_node=node, score=now, expired_only=expired_only,
                fields={"finished_at": now, "error": error[:2000]},
            )
        except (IllegalTransition, JobNotFound, OwnershipLost, LeaseLive, CorruptRecord):
            return False
        return True

    def requeue(
        self, job_id: str, error: str, node: str | None = None, *,
        allowed_from: Iterable[JobState] | None = None, expired_only: bool = False,
    ) -> bool:
        """Back to the queue at its original place (retry): from leased/running, or failed by hand. Never
        from cancelled unless `allowed_from` says so: a cancel that races a node's failure stays a cancel."""
        if allowed_from is None:
            allowed_from = (JobState.LEASED, JobState.RUNNING, JobState.FAILED)
        try:
            self.transition(
                job_id, JobState.QUEUED, expect_node=node, allowed_from=allowed_from, expired_only=expired_only,
                fields={"error": error[:2000], "node": "", "finished_at": "", "run_deadline": ""},
            )
        except (IllegalTransition, JobNotFound, OwnershipLost, LeaseLive, CorruptRecord):
            return False
        return True

    def cancel(self, job_id: str) -> JobState:
        """Cancel from any non-terminal state; returns the state it left. A rendering job's node sees it at
        its next lease renewal and stops the render; a result that arrives anyway is discarded by `complete`."""
        now = time.time()
        return self.transition(job_id, JobState.CANCELLED, score=now, fields={"finished_at": now})

    def quarantine(self, job_id: str, reason: str, *, only_if_missing: bool = False) -> bool:
        """Take `job_id` out of circulation because its record is malformed (or missing behind an index
        entry): off every index and queue, its hash kept aside for a human, the reason recorded. With
        `only_if_missing`, nothing happens (False) if the job's record exists by the time the script runs."""
        done = bool(self._quarantine(
            keys=[self.keys.job(job_id), self.keys.quarantined(job_id), self.keys.quarantine,
                  self.keys.metrics("counters"), *self.keys.all_indexes(), self.keys.queues],
            args=[job_id, json.dumps({"reason": reason[:2000], "at": time.time()}), "1" if only_if_missing else "0"],
        ))
        if done:
            log.error("job %s quarantined: %s", job_id, reason)
        return done

    def quarantine_reason(self, job_id: str) -> str | None:
        """Why `job_id` was quarantined; None when it is not."""
        raw = self.redis.hget(self.keys.quarantine, job_id)
        return None if raw is None else quarantine_reason(raw)

    def quarantined(self) -> dict[str, str]:
        """Quarantined job id -> why."""
        return {job_id.decode(errors="replace"): quarantine_reason(raw)
                for job_id, raw in self.redis.hgetall(self.keys.quarantine).items()}
