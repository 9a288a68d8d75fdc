"""What the farm measures and publishes: ETAs, fair-share usage, dashboard samples, online calibration,
counters, job-duration histograms."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from renderfarm.cluster.keys import (
    HISTOGRAM_COUNT,
    HISTOGRAM_INF,
    HISTOGRAM_SUM,
    JOB_RENDER_HISTOGRAM,
    JOB_WAIT_HISTOGRAM,
    OBSERVED_FIELD,
    Keys,
    peak_field,
    speed_field,
)
from renderfarm.errors import CorruptRecord
from renderfarm.jobs import JobState

SAMPLES_MAXLEN = 4320  # 6 hours of samples at one per 5 s
MEASURE_ALPHA = 0.3  # weight of a new speed or load time in its moving average
# Upper bounds (seconds) of the job-duration histograms' buckets: a 64x64 stand-in to an hour-long batch.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class Telemetry:
    """The measuring half of the Store; `Store` supplies `redis`, `keys` and the registered scripts."""

    redis: redis.Redis
    keys: Keys

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

    def record_sample(self, sample: dict[str, Any], maxlen: int = SAMPLES_MAXLEN) -> None:
        """Append one sample ({"t": epoch, "counts": {state: n}, "nodes": {name: {...totals}}}), keeping about
        the last `maxlen`."""
        self.redis.xadd(self.keys.samples, {"json": json.dumps(sample)}, maxlen=maxlen, approximate=True)

    def samples(self, count: int = 720) -> list[dict[str, Any]]:
        """The last `count` samples, oldest first; an entry that does not parse is skipped (and counted:
        `malformed_sample`)."""
        out, skipped = [], 0
        for _, fields in reversed(self.redis.xrevrange(self.keys.samples, count=count)):
            try:
                value = json.loads(fields.get(b"json", b""))
            except ValueError:  # not JSON, or not UTF-8
                value = None
            if isinstance(value, dict) and isinstance(value.get("t"), (int, float)):
                out.append(value)
            else:
                skipped += 1
        if skipped:
            self.count("malformed_sample", skipped)
        return out

    def finished_since(self, state: JobState, since: float) -> int:
        """How many jobs reached terminal `state` at or after `since` (epoch seconds)."""
        return int(self.redis.zcount(self.keys.index(state), since, "+inf"))

    def record_measurement(
        self, node: str, model: str, profile: str, width: int, height: int, batch: int,
        peak_gib: float | None, s_per_step: float | None, load_s: float | None = None,
    ) -> None:
        """What `node` measured rendering `batch` images of `model` at `width` x `height` with `profile`: the
        peak (kept as the highest seen for model, profile, size bucket and batch), the seconds per step and,
        when it loaded the model for this batch, the load time (both a moving average per node)."""
        rnd = self.round()
        recorded = self.queue_measurement(rnd, node, model, profile, width, height, batch, peak_gib, s_per_step, load_s)
        rnd.run()
        recorded()

    def queue_measurement(
        self, rnd: Any, node: str, model: str, profile: str, width: int, height: int, batch: int,
        peak_gib: float | None, s_per_step: float | None, load_s: float | None = None,
    ) -> Callable[[], int]:
        """`record_measurement` as part of a round; the getter returns the calibration version it made (see
        `measurements_version`) or raises CorruptRecord as `record_measurement` would."""
        reply = rnd.script(self._measure,
            [self.keys.calib_peaks, self.keys.calib_speeds, self.keys.calib_version],
            [
                peak_field(model, profile, width, height, batch), "" if peak_gib is None else repr(float(peak_gib)),
                speed_field(node, model, width, height, batch),
                "" if s_per_step is None else repr(float(s_per_step)),
                "" if load_s is None else repr(float(load_s)),
                repr(time.time()), node, profile, repr(MEASURE_ALPHA),
            ],
        )

        def recorded() -> int:
            answer = reply()
            if answer[0] == b"corrupt":  # checked before any write: nothing was recorded
                self.count("malformed_calibration")
                raise CorruptRecord(
                    f"measurement of {model} on {node} not recorded: {answer[1].decode(errors='replace')}")
            if answer[2]:  # a stored record that did not parse, replaced by this measurement
                self.count("malformed_calibration", int(answer[2]))
            return int(answer[1])

        return recorded

    def measurements_version(self) -> int:
        return int(self.redis.get(self.keys.calib_version) or 0)

    def calibration_records(self) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]], list[str]]:
        """(peak records, speed records, one line per record that did not parse) as (field, JSON value):
        `planning.measured.Measurements.from_records` turns them into numbers. A malformed record is
        skipped and reported, so it cannot stop planning."""
        bad: list[str] = []

        def records(key: str) -> list[tuple[str, Any]]:
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

        return records(self.keys.calib_peaks), records(self.keys.calib_speeds), bad

    def queue_observe_finished(self, rnd: Any, node: str, job_ids: Sequence[str]) -> Callable[[], int]:
        """Count the jobs `node` completes in round `rnd` in the job-duration histograms (Keys.histogram: wait,
        created -> started; render, started -> finished), as part of that round: no request of its own. Queue it
        after the jobs' completions: only those done on `node` count, each once (scripts/observe.lua). The
        getter returns how many were counted, or raises CorruptRecord when a histogram is not a hash of numbers
        (nothing written)."""
        keys = [self.keys.histogram(JOB_WAIT_HISTOGRAM), self.keys.histogram(JOB_RENDER_HISTOGRAM),
                *(self.keys.job(job_id) for job_id in job_ids)]
        args = [node, ",".join(repr(float(b)) for b in DURATION_BUCKETS), HISTOGRAM_SUM, HISTOGRAM_COUNT,
                HISTOGRAM_INF, OBSERVED_FIELD]
        reply = rnd.script(self._observe, keys, args)

        def counted() -> int:
            status, value = reply()
            if status == b"badkey":
                raise CorruptRecord(f"job durations not counted: {value.decode(errors='replace')}")
            return int(value)

        return counted

    def count(self, name: str, n: int = 1) -> None:
        """Add `n` to the farm-wide counter `name` (late results, expired leases, quarantined records...)."""
        self.redis.hincrby(self.keys.metrics("counters"), name, n)

    def counters(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.keys.metrics("counters")).items()}
