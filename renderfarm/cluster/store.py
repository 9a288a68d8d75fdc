"""All Redis reads and writes of jobs, results, nodes and events.

Rules (DESIGN.md): keys come from `keys.Keys`; values are JSON or plain strings, never pickles; a state
change and its index move happen in one Lua script, which also checks that the move is legal and, when
asked, that the job is still held by the node reporting on it. Submit is idempotent by job id and a batch
is all-or-nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from pydantic import ValidationError
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from renderfarm.cluster.keys import Keys
from renderfarm.errors import CorruptRecord, JobNotFound
from renderfarm.jobs import (
    IllegalTransition,
    Job,
    JobSpec,
    JobState,
    sources_of,
)

log = logging.getLogger(__name__)

EVENTS_MAXLEN = 100_000
RETRY_ATTEMPTS = 60  # with backoff capped at 0.5 s: about 30 s of retrying a lost connection
SAMPLES_MAXLEN = 4320  # 6 hours of samples at one per 5 s
STATES = list(JobState)

# Insert jobs that do not exist yet; skip (and report) those that do. Atomic: all new jobs of the batch
# become visible together or not at all.
# Each job also joins its (team, priority) queue, named in its hash's `queue` field (built by Keys).
#   KEYS: pending, events, batch, queues set, job keys...    ARGV: maxlen, now, then per job: id, score, hash-json
_SUBMIT = """
local created = {}
local n = #KEYS - 4
for i = 1, n do
  local jkey = KEYS[4 + i]
  local id, score, fields = ARGV[3*i], ARGV[3*i + 1], ARGV[3*i + 2]
  if redis.call('EXISTS', jkey) == 0 then
    local flat = {}
    local decoded = cjson.decode(fields)
    for k, v in pairs(decoded) do flat[#flat + 1] = k; flat[#flat + 1] = v end
    redis.call('HSET', jkey, unpack(flat))
    redis.call('ZADD', KEYS[1], score, id)
    if decoded['queue'] then
      redis.call('ZADD', decoded['queue'], decoded['created_at'], id)
      redis.call('SADD', KEYS[4], decoded['queue'])
    end
    redis.call('SADD', KEYS[3], id)
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'job', id, 'state', 'queued', 'ts', ARGV[2])
    created[#created + 1] = 1
  else
    created[#created + 1] = 0
  end
end
return created
"""

# Move one job from its current state to ARGV[3], checking legality and ownership; a job leaving or
# re-entering the queue leaves or re-enters its (team, priority) queue too.
#   KEYS: job, events, result, index keys (one per state, in STATES order), queues set
#   ARGV: 1 id, 2 allowed-from (",a,b,"), 3 target, 4 score ('' = stored queue score, '+N' = N seconds
#         after the server's clock: lease deadlines use Redis's TIME, so nodes' clocks may disagree),
#         5 expected node ('' = any), 6 now, 7 fields-json, 8 attempts increment, 9 events maxlen,
#         10 state names csv, 11 result ttl, 12 expired-only ('1': move only if the job's deadline in its
#         current index has passed by the server's clock), 13.. result blobs
# Returns {status, current-state}: status is ok | missing | state | node | live.
_TRANSITION = """
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local jkey = KEYS[1]
local state = redis.call('HGET', jkey, 'state')
if not state then return {'missing', ''} end
if not string.find(ARGV[2], ',' .. state .. ',', 1, true) then return {'state', state} end
if ARGV[5] ~= '' then
  local node = redis.call('HGET', jkey, 'node')
  if node ~= ARGV[5] then return {'node', state} end
end
local names = {}
for name in string.gmatch(ARGV[10], '[^,]+') do names[#names + 1] = name end
local from_key, to_key
for i, name in ipairs(names) do
  if name == state then from_key = KEYS[3 + i] end
  if name == ARGV[3] then to_key = KEYS[3 + i] end
end
if ARGV[12] == '1' then
  local deadline = tonumber(redis.call('ZSCORE', from_key, ARGV[1]))
  if deadline and deadline > server_now() then return {'live', state} end
end
local score = ARGV[4]
if score == '' then
  score = redis.call('HGET', jkey, 'score') or '0'
elseif string.sub(score, 1, 1) == '+' then
  score = string.format('%.6f', server_now() + tonumber(string.sub(score, 2)))
end
redis.call('ZREM', from_key, ARGV[1])
redis.call('ZADD', to_key, score, ARGV[1])
local queue = redis.call('HGET', jkey, 'queue')
if queue then
  if state == 'queued' then
    redis.call('ZREM', queue, ARGV[1])
    if redis.call('ZCARD', queue) == 0 then redis.call('SREM', KEYS[#KEYS], queue) end
  end
  if ARGV[3] == 'queued' then
    redis.call('ZADD', queue, redis.call('HGET', jkey, 'created_at') or ARGV[6], ARGV[1])
    redis.call('SADD', KEYS[#KEYS], queue)
  end
end
local flat = {'state', ARGV[3], 'updated_at', ARGV[6]}
for k, v in pairs(cjson.decode(ARGV[7])) do flat[#flat + 1] = k; flat[#flat + 1] = v end
redis.call('HSET', jkey, unpack(flat))
if ARGV[8] ~= '0' then redis.call('HINCRBY', jkey, 'attempts', ARGV[8]) end
if #ARGV >= 13 then
  redis.call('DEL', KEYS[3])
  for i = 13, #ARGV do redis.call('HSET', KEYS[3], tostring(i - 13), ARGV[i]) end
  redis.call('EXPIRE', KEYS[3], ARGV[11])
  redis.call('HSET', jkey, 'images', tostring(#ARGV - 12))
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[9], '*', 'job', ARGV[1], 'state', ARGV[3],
           'node', redis.call('HGET', jkey, 'node') or '', 'ts', ARGV[6])
return {'ok', state}
"""


# Renew the leases `node` holds: each job still leased or running on `node` gets its deadline moved to
# server time + lease seconds; a running job's deadline never passes its run deadline (set at its first
# renewal: server time + timeout), so a hung node loses its job even while its heartbeat thread renews.
#   KEYS: leased index, running index, job keys...    ARGV: 1 node, 2 lease seconds, 3 timeout seconds ('' none)
# Returns 1 per job still held, 0 per job no longer held (cancelled, requeued, finished, given to another).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local out = {}
for i = 3, #KEYS do
  local f = redis.call('HMGET', KEYS[i], 'state', 'node', 'id', 'run_deadline')
  local held = 0
  if f[2] == ARGV[1] and (f[1] == 'leased' or f[1] == 'running') then
    local deadline = now + tonumber(ARGV[2])
    local index = KEYS[1]
    if f[1] == 'running' then
      index = KEYS[2]
      local cap = tonumber(f[4])
      if not cap and ARGV[3] ~= '' then
        cap = now + tonumber(ARGV[3])
        redis.call('HSET', KEYS[i], 'run_deadline', string.format('%.6f', cap))
      end
      if cap and cap < deadline then deadline = cap end
    end
    redis.call('ZADD', index, 'XX', string.format('%.6f', deadline), f[3])
    held = 1
  end
  out[#out + 1] = held
end
return out
"""

# Jobs whose lease deadline has passed by the server's clock.    KEYS: leased index, running index    ARGV: limit
_EXPIRED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local out = {}
for _, index in ipairs(KEYS) do
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', index, '-inf', '(' .. now, 'LIMIT', 0, ARGV[1])) do
    out[#out + 1] = id
  end
end
return out
"""

# Take a job whose record does not parse (or an index entry without a record) out of circulation: off every
# index and queue, its hash renamed aside, the reason kept in the quarantine hash.
#   KEYS: job, quarantined job, quarantine hash, counters, index keys..., queues set    ARGV: id, reason-json
_QUARANTINE = """
for i = 5, #KEYS - 1 do redis.call('ZREM', KEYS[i], ARGV[1]) end
if redis.call('EXISTS', KEYS[1]) == 1 then
  local queue = redis.call('HGET', KEYS[1], 'queue')
  if queue then
    redis.call('ZREM', queue, ARGV[1])
    if redis.call('ZCARD', queue) == 0 then redis.call('SREM', KEYS[#KEYS], queue) end
  end
  redis.call('RENAME', KEYS[1], KEYS[2])
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[4], 'quarantined', 1)
return 1
"""

# Record a node's measurement. Peaks keep the maximum; speeds and load times a moving average (weight ALPHA).
#   KEYS: peaks, speeds, version
#   ARGV: 1 peak field, 2 peak GiB ('' none), 3 speed field, 4 s/step ('' none), 5 load s ('' none), 6 now,
#         7 node, 8 profile, 9 alpha
_MEASURE = """
local function decode(raw)
  if not raw then return nil end
  local ok, value = pcall(cjson.decode, raw)
  if ok and type(value) == 'table' then return value end
  return nil
end
local now = tonumber(ARGV[6])
if ARGV[2] ~= '' then
  local rec = decode(redis.call('HGET', KEYS[1], ARGV[1])) or {samples = 0}
  local peak = tonumber(ARGV[2])
  if type(rec.peak_gib) ~= 'number' or peak > rec.peak_gib then rec.peak_gib = peak; rec.node = ARGV[7] end
  rec.samples = (tonumber(rec.samples) or 0) + 1
  rec.updated = now
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(rec))
end
if ARGV[4] ~= '' then
  local rec = decode(redis.call('HGET', KEYS[2], ARGV[3])) or {samples = 0}
  local alpha = tonumber(ARGV[9])
  local function blend(old, new)
    if type(old) ~= 'number' then return new end
    return old + alpha * (new - old)
  end
  rec.s_per_step = blend(rec.s_per_step, tonumber(ARGV[4]))
  if ARGV[5] ~= '' then rec.load_s = blend(rec.load_s, tonumber(ARGV[5])) end
  rec.profile = ARGV[8]
  rec.samples = (tonumber(rec.samples) or 0) + 1
  rec.updated = now
  redis.call('HSET', KEYS[2], ARGV[3], cjson.encode(rec))
end
return redis.call('INCR', KEYS[3])
"""
MEASURE_ALPHA = 0.3


def queue_score(priority: int, created_at: float) -> float:
    """Higher priority first, then first come first served (ZRANGE ascending)."""
    return -priority * 1e10 + created_at


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def job_to_hash(job: Job) -> dict[str, str]:
    return {
        "id": job.id,
        "spec": job.spec.model_dump_json(),
        "state": job.state.value,
        "attempts": str(job.attempts),
        "node": _text(job.node),
        "batch_id": _text(job.batch_id),
        "created_at": repr(job.created_at),
        "updated_at": _text(job.updated_at),
        "started_at": _text(job.started_at),
        "finished_at": _text(job.finished_at),
        "error": _text(job.error),
        "timings": json.dumps(job.timings),
        "peak_memory_mb": _text(job.peak_memory_mb),
        "images": str(job.images),
        "profile": _text(job.profile),
        "escalations": json.dumps(job.escalations),
        "score": repr(queue_score(job.spec.priority, job.created_at)),
    }


def job_from_hash(raw: dict[bytes, bytes]) -> Job:
    data = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
    try:
        return Job(
            id=data["id"],
            spec=JobSpec.model_validate_json(data["spec"]),
            state=JobState(data["state"]),
            attempts=int(data.get("attempts") or 0),
            node=data.get("node") or None,
            batch_id=data.get("batch_id") or None,
            created_at=float(data["created_at"]),
            updated_at=float(data["updated_at"]) if data.get("updated_at") else None,
            started_at=float(data["started_at"]) if data.get("started_at") else None,
            finished_at=float(data["finished_at"]) if data.get("finished_at") else None,
            error=data.get("error") or None,
            timings=json.loads(data.get("timings") or "{}"),
            peak_memory_mb=float(data["peak_memory_mb"]) if data.get("peak_memory_mb") else None,
            images=int(data.get("images") or 0),
            profile=data.get("profile") or None,
            escalations=json.loads(data.get("escalations") or "[]"),
        )
    except (KeyError, ValueError, ValidationError, json.JSONDecodeError) as exc:
        raise CorruptRecord(f"job record {data.get('id', '?')!r} does not parse: {exc}") from None


class Store:
    """The farm's system of record. One instance per process; thread-safe as redis-py is."""

    def __init__(self, client: redis.Redis, keys: Keys | None = None):
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("Store needs a Redis client with decode_responses=False (results are bytes)")
        # Ride out a Redis restart (crash, failover, upgrade): a call that finds the connection gone retries
        # with backoff for about RETRY_SECONDS before it raises. Redis keeps its data in its append-only file.
        client.set_retry(Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=RETRY_ATTEMPTS))
        self.redis = client
        self.keys = keys or Keys()
        self._submit = client.register_script(_SUBMIT)
        self._transition = client.register_script(_TRANSITION)
        self._measure = client.register_script(_MEASURE)
        self._renew = client.register_script(_RENEW)
        self._expired = client.register_script(_EXPIRED)
        self._quarantine = client.register_script(_QUARANTINE)

    # --- submit -------------------------------------------------------------------------------------

    def submit(self, jobs: Sequence[Job], batch_id: str) -> list[bool]:
        """Enqueue `jobs` as one batch in one transaction; True per job that was new, False if it existed."""
        if not jobs:
            return []
        keys = [self.keys.pending, self.keys.events, self.keys.batch(batch_id), self.keys.queues]
        args: list[Any] = [EVENTS_MAXLEN, repr(time.time())]
        for job in jobs:
            fields = job_to_hash(job.model_copy(update={"batch_id": batch_id}))
            fields["queue"] = self.keys.queue(job.spec.team, job.spec.priority)
            keys.append(self.keys.job(job.id))
            args += [job.id, fields["score"], json.dumps(fields)]
        return [bool(flag) for flag in self._submit(keys=keys, args=args)]

    # --- reads --------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        raw = self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            reason = self.redis.hget(self.keys.quarantine, job_id)
            if reason is not None:
                raise CorruptRecord(f"job {job_id!r} is quarantined: {_quarantine_reason(reason)}")
            raise JobNotFound(job_id)
        return job_from_hash(raw)

    def get_many(self, job_ids: Iterable[str], quarantine: bool = False) -> list[Job | None]:
        """The jobs, None for each that does not exist. A record that does not parse raises CorruptRecord,
        or with `quarantine`, is quarantined (see `quarantine`) and comes back as None."""
        ids = list(job_ids)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        out: list[Job | None] = []
        for job_id, raw in zip(ids, pipe.execute()):
            try:
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

    def ids_in(self, state: JobState, limit: int = 1000, newest_first: bool = False) -> list[str]:
        index = self.keys.index(state)
        fetch = self.redis.zrevrange if newest_first else self.redis.zrange
        return [m.decode() for m in fetch(index, 0, limit - 1)]

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

    # --- estimates: ETAs and fair-share usage, written by the scheduler ---------------------------------

    def write_etas(self, etas: dict[str, dict[str, Any]], ttl_seconds: int = 300) -> None:
        """Replace the published ETAs (job id -> JSON) in one step; they expire if no scheduler renews them."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.etas)
            if etas:
                pipe.hset(self.keys.etas, mapping={k: json.dumps(v) for k, v in etas.items()})
                pipe.expire(self.keys.etas, ttl_seconds)
            pipe.execute()

    def etas(self, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The published ETA of each of `job_ids` that has one (a record that does not parse is skipped)."""
        if not job_ids:
            return {}
        out = {}
        for job_id, raw in zip(job_ids, self.redis.hmget(self.keys.etas, list(job_ids))):
            if raw is None:
                continue
            try:
                value = json.loads(raw)
            except ValueError:  # not JSON, or not UTF-8
                continue
            if isinstance(value, dict):
                out[job_id] = value
        return out

    def read_fair_share(self) -> dict[str, Any] | None:
        raw = self.redis.get(self.keys.fair_share)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError as exc:  # not JSON, or not UTF-8
            raise CorruptRecord(f"{self.keys.fair_share} does not parse: {exc}") from None
        if not isinstance(value, dict):
            raise CorruptRecord(f"{self.keys.fair_share} is not a JSON object")
        return value

    def write_fair_share(self, state: dict[str, Any]) -> None:
        self.redis.set(self.keys.fair_share, json.dumps(state))

    # --- samples for the dashboard -------------------------------------------------------------------

    def record_sample(self, sample: dict[str, Any], maxlen: int = SAMPLES_MAXLEN) -> None:
        """Append one sample ({"t": epoch, "counts": {state: n}, "nodes": {name: {...totals}}}), keeping about
        the last `maxlen`."""
        self.redis.xadd(self.keys.samples, {"json": json.dumps(sample)}, maxlen=maxlen, approximate=True)

    def samples(self, count: int = 720) -> list[dict[str, Any]]:
        """The last `count` samples, oldest first; an entry that does not parse is skipped."""
        out = []
        for _, fields in reversed(self.redis.xrevrange(self.keys.samples, count=count)):
            try:
                value = json.loads(fields.get(b"json", b""))
            except ValueError:
                continue
            if isinstance(value, dict) and isinstance(value.get("t"), (int, float)):
                out.append(value)
        return out

    def finished_since(self, state: JobState, since: float) -> int:
        """How many jobs reached terminal `state` at or after `since` (epoch seconds)."""
        return int(self.redis.zcount(self.keys.index(state), since, "+inf"))

    def set_draining(self, name: str, draining: bool = True, reason: str = "") -> bool:
        """Mark node `name` draining (it finishes what it holds and takes nothing new) or not, with why (an
        operator, or the scheduler after failures in a row); False when no such node is registered."""
        if not self.redis.sismember(self.keys.nodes, name):
            return False
        self.redis.hset(self.keys.node(name), mapping={
            "draining": json.dumps(bool(draining)), "drain_reason": json.dumps(reason if draining else "")})
        return True

    # --- online calibration -------------------------------------------------------------------------------

    def record_measurement(
        self, node: str, model: str, profile: str, width: int, height: int, batch: int,
        peak_gib: float | None, s_per_step: float | None, load_s: float | None = None,
    ) -> None:
        """What `node` measured rendering `batch` images of `model` at `width` x `height` with `profile`: the
        peak (kept as the highest seen for model, profile, size bucket and batch), the seconds per step and,
        when it loaded the model for this batch, the load time (both a moving average per node)."""
        from renderfarm.planning.measured import peak_field, speed_field

        self._measure(
            keys=[self.keys.calib_peaks, self.keys.calib_speeds, self.keys.calib_version],
            args=[
                peak_field(model, profile, width, height, batch), "" if peak_gib is None else repr(float(peak_gib)),
                speed_field(node, model, width, height, batch),
                "" if s_per_step is None else repr(float(s_per_step)),
                "" if load_s is None else repr(float(load_s)),
                repr(time.time()), node, profile, repr(MEASURE_ALPHA),
            ],
        )

    def measurements_version(self) -> int:
        return int(self.redis.get(self.keys.calib_version) or 0)

    def measurements(self) -> tuple[Any, list[str]]:
        """A planning.measured.Measurements snapshot of everything measured, and one line per record that
        did not parse (skipped, reported: a malformed record must not stop planning)."""
        from renderfarm.planning.measured import Measurements

        bad: list[str] = []

        def records(key: str) -> list[tuple[str, dict]]:
            out = []
            for field_name, raw in self.redis.hgetall(key).items():
                name = field_name.decode(errors="replace")
                try:
                    value = json.loads(raw)
                except ValueError as exc:  # not JSON, or not UTF-8
                    bad.append(f"{key} {name!r}: {exc}")
                    continue
                out.append((name, value))
            return out

        snapshot, unparsed = Measurements.from_records(records(self.keys.calib_peaks), records(self.keys.calib_speeds))
        return snapshot, bad + unparsed

    # --- state changes ------------------------------------------------------------------------------

    def transition(
        self,
        job_id: str,
        target: JobState,
        *,
        allowed_from: Iterable[JobState] | None = None,
        expect_node: str | None = None,
        score: float | str | None = None,
        fields: dict[str, Any] | None = None,
        add_attempt: bool = False,
        images: Sequence[bytes] = (),
        result_ttl: int = 7 * 24 * 3600,
        expired_only: bool = False,
    ) -> JobState:
        """Move `job_id` to `target` atomically; returns the state it left.

        `score` is the job's score in its new index; a string "+N" means N seconds after Redis's clock (lease
        deadlines). With `expired_only`, the move happens only if the job's deadline in its current index
        has passed (a lease reaped at the same moment as it was renewed stays with its holder).
        Raises JobNotFound, IllegalTransition (the move is not legal from the current state, or not one
        of `allowed_from`), OwnershipLost (the job is no longer held by `expect_node`), or LeaseLive.
        """
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
            json.dumps({k: _text(v) for k, v in (fields or {}).items()}),
            "1" if add_attempt else "0",
            EVENTS_MAXLEN,
            ",".join(s.value for s in STATES),
            str(result_ttl),
            "1" if expired_only else "0",
            *images,
        ]
        keys = [
            self.keys.job(job_id), self.keys.events, self.keys.result(job_id), *self.keys.all_indexes(),
            self.keys.queues,
        ]
        status, current = (part.decode() for part in self._transition(keys=keys, args=args))
        if status == "missing":
            raise JobNotFound(job_id)
        if status == "state":
            raise IllegalTransition(job_id, current, target)
        if status == "node":
            raise OwnershipLost(job_id, expect_node or "")
        if status == "live":
            raise LeaseLive(job_id)
        return JobState(current)

    def lease(self, job_id: str, node: str, lease_seconds: float) -> bool:
        """queued -> leased to `node` for `lease_seconds` (renewed by whoever holds it, see `renew`);
        False if someone else got there first (cancelled, leased)."""
        try:
            self.transition(
                job_id, JobState.LEASED, score=f"+{float(lease_seconds)!r}", add_attempt=True,
                fields={"node": node, "error": "", "run_deadline": ""},
            )
        except (IllegalTransition, JobNotFound):
            return False
        return True

    def start(self, job_id: str, node: str, lease_seconds: float) -> bool:
        """leased -> running on `node`; False when the job is no longer this node's (cancelled, requeued)."""
        try:
            self.transition(
                job_id, JobState.RUNNING, expect_node=node, score=f"+{float(lease_seconds)!r}",
                fields={"started_at": time.time(), "run_deadline": ""},
            )
        except (IllegalTransition, JobNotFound, OwnershipLost):
            return False
        return True

    def renew(
        self, job_ids: Sequence[str], node: str, lease_seconds: float, timeout_seconds: float | None = None
    ) -> list[bool]:
        """Extend the leases `node` holds on `job_ids` to `lease_seconds` from now (Redis's clock); a running
        job's lease never goes past `timeout_seconds` after its first renewal while running. True per job
        still held by `node`; False for one that was cancelled, requeued or finished meanwhile."""
        if not job_ids:
            return []
        keys = [self.keys.index(JobState.LEASED), self.keys.index(JobState.RUNNING),
                *(self.keys.job(j) for j in job_ids)]
        args = [node, repr(float(lease_seconds)), "" if timeout_seconds is None else repr(float(timeout_seconds))]
        return [bool(flag) for flag in self._renew(keys=keys, args=args)]

    def expired(self, limit: int = 1000) -> list[str]:
        """Leased or running jobs whose lease deadline has passed by Redis's clock (nobody renewed them)."""
        keys = [self.keys.index(JobState.LEASED), self.keys.index(JobState.RUNNING)]
        return [m.decode() for m in self._expired(keys=keys, args=[limit])]

    def complete(
        self,
        job_id: str,
        node: str,
        images: Sequence[bytes],
        timings: dict[str, float],
        peak_memory_mb: float | None,
        result_ttl: int,
        profile: str | None = None,
        escalations: Sequence[str] = (),
    ) -> bool:
        """running -> done with its images, exactly once; False (result discarded, and counted: `cancelled`
        results apart from `late_results`) when the job was cancelled, requeued or handed to another node
        meanwhile, e.g. because this node's lease expired."""
        now = time.time()
        try:
            self.transition(
                job_id, JobState.DONE, expect_node=node, score=now, images=images, result_ttl=result_ttl,
                fields={"finished_at": now, "timings": json.dumps(timings), "peak_memory_mb": peak_memory_mb,
                        "profile": profile, "escalations": json.dumps(list(escalations))},
            )
        except IllegalTransition as exc:
            self.count("results_after_cancel" if exc.current is JobState.CANCELLED else "late_results")
            return False
        except (JobNotFound, OwnershipLost):
            self.count("late_results")
            return False
        return True

    def fail(self, job_id: str, error: str, node: str | None = None, *, expired_only: bool = False) -> bool:
        now = time.time()
        try:
            self.transition(
                job_id, JobState.FAILED, expect_node=node, score=now, expired_only=expired_only,
                fields={"finished_at": now, "error": error[:2000]},
            )
        except (IllegalTransition, JobNotFound, OwnershipLost, LeaseLive):
            return False
        return True

    def requeue(
        self, job_id: str, error: str, node: str | None = None, *,
        allowed_from: Iterable[JobState] | None = None, expired_only: bool = False,
    ) -> bool:
        """Back to the queue at its original place (retry): from leased/running, or failed by hand."""
        try:
            self.transition(
                job_id, JobState.QUEUED, expect_node=node, allowed_from=allowed_from, expired_only=expired_only,
                fields={"error": error[:2000], "node": "", "finished_at": "", "run_deadline": ""},
            )
        except (IllegalTransition, JobNotFound, OwnershipLost, LeaseLive):
            return False
        return True

    def cancel(self, job_id: str) -> JobState:
        """Cancel from any non-terminal state; returns the state it left. A rendering job's node sees it at
        its next lease renewal and stops the render; a result that arrives anyway is discarded by `complete`."""
        now = time.time()
        return self.transition(job_id, JobState.CANCELLED, score=now, fields={"finished_at": now})

    # --- farm-wide settings -------------------------------------------------------------------------------

    def publish_settings(self, values: dict[str, Any]) -> None:
        self.redis.set(self.keys.settings, json.dumps(values))

    def published_settings(self) -> dict[str, Any]:
        """What the head published ({} when nothing, or something that does not parse: logged)."""
        raw = self.redis.get(self.keys.settings)
        if raw is None:
            return {}
        try:
            value = json.loads(raw)
        except ValueError as exc:
            log.error("%s does not parse, ignored: %s", self.keys.settings, exc)
            return {}
        return value if isinstance(value, dict) else {}

    # --- counters and quarantine -----------------------------------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        """Add `n` to the farm-wide counter `name` (late results, expired leases, quarantined records...)."""
        self.redis.hincrby(self.keys.metrics("counters"), name, n)

    def counters(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.keys.metrics("counters")).items()}

    def quarantine(self, job_id: str, reason: str) -> None:
        """Take `job_id` out of circulation because its record is malformed (or missing behind an index
        entry): off every index and queue, its hash kept aside for a human, the reason recorded."""
        log.error("job %s quarantined: %s", job_id, reason)
        self._quarantine(
            keys=[self.keys.job(job_id), self.keys.quarantined(job_id), self.keys.quarantine,
                  self.keys.metrics("counters"), *self.keys.all_indexes(), self.keys.queues],
            args=[job_id, json.dumps({"reason": reason[:2000], "at": time.time()})],
        )

    def quarantined(self) -> dict[str, str]:
        """Quarantined job id -> why."""
        return {job_id.decode(errors="replace"): _quarantine_reason(raw)
                for job_id, raw in self.redis.hgetall(self.keys.quarantine).items()}

    # --- nodes --------------------------------------------------------------------------------------

    def register_node(self, name: str, info: dict[str, Any]) -> None:
        fields = {k: json.dumps(v) for k, v in info.items()}
        fields["heartbeat"] = json.dumps(time.time())
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(self.keys.nodes, name)
            pipe.hset(self.keys.node(name), mapping=fields)
            pipe.execute()

    def update_node(self, name: str, **info: Any) -> None:
        info["heartbeat"] = time.time()
        self.redis.hset(self.keys.node(name), mapping={k: json.dumps(v) for k, v in info.items()})

    def nodes(self) -> list[dict[str, Any]]:
        names = sorted(m.decode() for m in self.redis.smembers(self.keys.nodes))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.node(name))
        out = []
        for name, raw in zip(names, pipe.execute()):
            info: dict[str, Any] = {"name": name}
            for k, v in raw.items():
                try:
                    info[k.decode(errors="replace")] = json.loads(v)
                except ValueError:  # not JSON, or not UTF-8
                    info[k.decode()] = v.decode(errors="replace")
            out.append(info)
        return out


def _quarantine_reason(raw: bytes) -> str:
    """The reason in a quarantine entry (JSON {reason, at}); the raw text if it does not parse."""
    try:
        return str(json.loads(raw).get("reason"))
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")


class LeaseLive(RuntimeError):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"job {job_id}: its lease has not expired")


class OwnershipLost(RuntimeError):
    def __init__(self, job_id: str, node: str):
        self.job_id, self.node = job_id, node
        super().__init__(f"job {job_id} is no longer held by node {node!r}")
