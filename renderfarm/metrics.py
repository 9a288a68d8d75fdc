"""Prometheus metrics of the farm, read from Redis when Prometheus scrapes (issue 18, point 4).

The HTTP API is stateless (several may run behind a load balancer), so nothing is counted in its process:
every scrape reads the farm's records in two requests to Redis, whichever API process answers it.

What the API calls (renderfarm/api mounts it at `GET /metrics`):

    render_metrics(store: Store, accept: str | None = None, *, dead_after_seconds: float | None = None)
        -> tuple[bytes, str]
        The body and its Content-Type: Prometheus's text format, or OpenMetrics when `accept` (the request's
        Accept header) asks for it. Raises redis.RedisError when Redis cannot be read: answer 503 then (a failed
        scrape shows as `up == 0` in Prometheus). Blocking (redis-py): from an async handler, run it in a
        thread (`await anyio.to_thread.run_sync(render_metrics, store, accept)`), or declare the route `def`.

    FarmCollector(store: Store, *, dead_after_seconds: float | None = None, clock=time.time)
        A prometheus_client collector, for whoever keeps a registry of their own (never the global one:
        `registry.register(FarmCollector(store))`). `dead_after_seconds`: a node silent this long is down;
        None takes the farm's published setting (Settings.dead_after_seconds), else 15 s.

The metrics (all prefixed `renderfarm_`; a counter's samples end in `_total`, Prometheus's rate() turns them
into images per minute, megapixels per second...):

    jobs{state}                              gauge: jobs in each state (the state indexes' sizes)
    team_jobs{team,state}                    gauge: queued, leased and running jobs per team (see below)
    node_up{node}                            gauge: 1 while its heartbeat is fresh
    node_state{node,state}                   gauge: 1 for its state: idle, busy, draining, stopped, dead
                                             (or unknown), 0 for the others
    node_heartbeat_timestamp_seconds{node}   gauge: its last heartbeat (Unix time)
    node_images_total{node}                  counter: images rendered (rate()*60: images per minute)
    node_megapixels_total{node}              counter: megapixels rendered (rate(): megapixels per second)
    node_jobs_done_total, node_jobs_failed_total, node_batches_total, node_render_seconds_total{node}
    node_model_loads_total{node}             counter: pipelines loaded (a model under a profile)
    node_oom_escalations_total{node}         counter: out-of-memory steps down the profile ladder
    node_vram_used_bytes, node_vram_total_bytes{node}   gauges, where the record has them
    node_loaded_models{node}                 gauge: pipelines it holds loaded
    webhook_deliveries_total{outcome}        counter: delivered / failed (the counters hash; 0 until any)
    webhook_attempts_total                   counter: POSTs made, retries included
    farm_events_total{event}                 counter: the rest of the farm's counters hash (leases_expired,
                                             timeouts, late_results, quarantined, ...)
    job_wait_seconds                         histogram: created -> started, of jobs done
    job_render_seconds                       histogram: started -> finished, of jobs done

Node counters start again from 0 when a worker restarts; rate() and increase() take that as a counter reset.

Queue depth per team. Queued jobs sit in one sorted set per (team, priority) (`Keys.queue`), so their count
per team is one ZCARD per such queue. Leased and running jobs have no per-team index, but there are few of
them (what the nodes hold: batches in flight), so their team is read from each one's record (the `queue`
field it carries from submit), one HGET each in the scrape's second request, at most MAX_TEAM_SCAN per state.
Done, failed and cancelled jobs are counted per state only: their indexes grow without bound (until someone
deletes old records), so reading every record's team at each scrape is out, and a per-team counter kept by the
transition script would add a write to every state change of every job and a second record to keep in step
with the indexes (quarantine, reconcile) for a figure `renderfarm jobs --team T --state done` already gives.

The histograms live in Redis (Keys.histogram: one hash each, a field per bucket upper bound holding that
bucket's own count, plus `sum` and `count`), written by each worker in the round that completes a batch
(Store.queue_observe_finished: no request of its own); they are exported with cumulative buckets. Both times
are wall-clock differences between two machines' clocks (the submitter's, the node's): keep them in NTP sync.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from renderfarm.cluster.keys import (
    HISTOGRAM_COUNT,
    HISTOGRAM_INF,
    HISTOGRAM_SUM,
    JOB_RENDER_HISTOGRAM,
    JOB_WAIT_HISTOGRAM,
)
from renderfarm.cluster.store import Store
from renderfarm.cluster.store.codec import finite_number
from renderfarm.cluster.store.telemetry import DURATION_BUCKETS
from renderfarm.jobs import JobState

__all__ = ["DEFAULT_DEAD_AFTER_S", "MAX_TEAM_SCAN", "METRIC_NAMES", "FarmCollector", "render_metrics"]

log = logging.getLogger(__name__)

PREFIX = "renderfarm_"
DEFAULT_DEAD_AFTER_S = 15.0  # Settings.dead_after_seconds's default, when the farm published none
MAX_TEAM_SCAN = 10_000  # leased or running jobs whose team a scrape reads; past it, no per-team count of that state
NODE_STATES = ("idle", "busy", "draining", "stopped", "dead", "unknown")
GIB = 2**30
WEBHOOK_OUTCOMES = {"webhook_delivered": "delivered", "webhook_failed": "failed"}
WEBHOOK_ATTEMPTS = "webhook_attempts"

# Node record field -> (metric, HELP, scale): the worker's running totals (actors/worker.py `stats`).
NODE_COUNTERS = {
    "images": ("node_images", "Images rendered by the node (rate()*60: images per minute).", 1.0),
    "megapixels": ("node_megapixels", "Megapixels rendered by the node: width x height x images / 1e6 "
                   "(rate(): megapixels per second).", 1.0),
    "jobs_done": ("node_jobs_done", "Jobs the node completed.", 1.0),
    "jobs_failed": ("node_jobs_failed", "Jobs that failed on the node.", 1.0),
    "batches": ("node_batches", "Batches the node rendered.", 1.0),
    "render_seconds": ("node_render_seconds", "Seconds the node's card spent starting and rendering batches.", 1.0),
    "model_loads": ("node_model_loads", "Pipelines the node loaded (a model under a profile).", 1.0),
    "oom_escalations": ("node_oom_escalations", "Out-of-memory errors after which the node stepped down its "
                        "profile ladder.", 1.0),
}
NODE_GAUGES = {
    "vram_used_gib": ("node_vram_used_bytes", "Bytes in use on the node's card (what torch reserved; on a "
                      "simulated node, the weights it holds).", GIB),
    "vram_gib": ("node_vram_total_bytes", "Bytes of the node's card that the farm plans with (less any reserve).",
                 GIB),
}
NODE_FIELDS = ("heartbeat", "state", "draining", "loaded", *NODE_COUNTERS, *NODE_GAUGES)

# Every sample name the collector can export (a counter's with its `_total`, a histogram's three), for the
# Grafana dashboard's cross-check (tests/integration/test_deploy_files.py).
METRIC_NAMES = frozenset(
    {PREFIX + n for n in ("jobs", "team_jobs", "node_up", "node_state", "node_heartbeat_timestamp_seconds",
                          "node_loaded_models")}
    | {PREFIX + metric for metric, _, _ in NODE_GAUGES.values()}
    | {PREFIX + metric + "_total" for metric, _, _ in NODE_COUNTERS.values()}
    | {PREFIX + n + "_total" for n in ("webhook_deliveries", "webhook_attempts", "farm_events")}
    | {PREFIX + h + end for h in (JOB_WAIT_HISTOGRAM, JOB_RENDER_HISTOGRAM) for end in ("_bucket", "_sum", "_count")}
)


def render_metrics(store: Store, accept: str | None = None, *,
                   dead_after_seconds: float | None = None) -> tuple[bytes, str]:
    """The farm's metrics as Prometheus reads them: (body, Content-Type). See the module's docstring."""
    registry = CollectorRegistry(auto_describe=False)  # a private one per scrape: never the process's global one
    registry.register(FarmCollector(store, dead_after_seconds=dead_after_seconds))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class FarmCollector(Collector):
    """Reads the farm's Redis at every `collect()` (two requests) and yields its metrics."""

    def __init__(self, store: Store, *, dead_after_seconds: float | None = None,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.dead_after_seconds = dead_after_seconds
        self.clock = clock

    def describe(self) -> list[Metric]:
        return []  # registering must not read Redis; the metrics are whatever collect() finds

    def collect(self) -> Iterator[Metric]:
        keys, redis = self.store.keys, self.store.redis
        # First request: what needs no name read before it.
        pipe = redis.pipeline(transaction=False)
        states = list(JobState)
        for state in states:
            pipe.zcard(keys.index(state))
        pipe.smembers(keys.queues)
        for state in (JobState.LEASED, JobState.RUNNING):
            pipe.zrange(keys.index(state), 0, MAX_TEAM_SCAN)  # one more than scanned: says it was cut
        pipe.smembers(keys.nodes)
        pipe.hgetall(keys.metrics("counters"))
        pipe.hgetall(keys.histogram(JOB_WAIT_HISTOGRAM))
        pipe.hgetall(keys.histogram(JOB_RENDER_HISTOGRAM))
        pipe.get(keys.settings)
        replies = pipe.execute()
        counts = dict(zip(states, (int(n) for n in replies[:len(states)])))
        queues, leased, running, node_names, counters, wait, render, settings = replies[len(states):]
        queues = sorted(_text(q) for q in queues)
        in_flight = {JobState.LEASED: [_text(j) for j in leased], JobState.RUNNING: [_text(j) for j in running]}
        nodes = sorted(_text(n) for n in node_names)

        # Second request: the per-team queues' sizes, the in-flight jobs' teams, the nodes' records.
        pipe = redis.pipeline(transaction=False)
        for queue in queues:
            pipe.zcard(queue)
        scanned = {s: ids for s, ids in in_flight.items() if len(ids) <= MAX_TEAM_SCAN}
        for state, ids in in_flight.items():
            if state not in scanned:
                log.warning("metrics: more than %d jobs %s: no per-team count for them", MAX_TEAM_SCAN, state.value)
        for ids in scanned.values():
            for job_id in ids:
                pipe.hget(keys.job(job_id), "queue")
        for name in nodes:
            pipe.hmget(keys.node(name), list(NODE_FIELDS))
        replies = iter(pipe.execute(raise_on_error=False))

        yield from self._jobs(counts)
        teams: dict[tuple[str, str], int] = {}
        queue_prefix = keys.queue("x", 0).removesuffix("x:0")
        for queue in queues:
            n = next(replies)
            team = _team_of(queue, queue_prefix)
            if team is not None and isinstance(n, int):
                teams[(team, JobState.QUEUED.value)] = teams.get((team, JobState.QUEUED.value), 0) + n
        for state, ids in scanned.items():
            for _ in ids:
                raw = next(replies)
                queue = _text(raw) if isinstance(raw, bytes) else None
                team = (_team_of(queue, queue_prefix) if queue else None) or "unknown"
                teams[(team, state.value)] = teams.get((team, state.value), 0) + 1
        yield self._teams(teams)
        records = {name: next(replies) for name in nodes}
        yield from self._nodes(records, self._dead_after(settings))
        yield from self._counters({_text(k): v for k, v in counters.items()})
        yield _histogram(JOB_WAIT_HISTOGRAM, "Seconds from a job's submission to its start, of jobs done.", wait)
        yield _histogram(JOB_RENDER_HISTOGRAM, "Seconds from a job's start to its finish, of jobs done.", render)

    # --- families -----------------------------------------------------------------------------------------

    @staticmethod
    def _jobs(counts: dict[JobState, int]) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(PREFIX + "jobs", "Jobs in each state (queued: the queue's depth).", labels=["state"])
        for state, n in counts.items():
            jobs.add_metric([state.value], n)
        yield jobs

    @staticmethod
    def _teams(teams: dict[tuple[str, str], int]) -> Metric:
        family = GaugeMetricFamily(
            PREFIX + "team_jobs", "Queued, leased and running jobs per team (done, failed and cancelled are counted "
            "per state only: renderfarm_jobs).", labels=["team", "state"])
        for (team, state), n in sorted(teams.items()):
            family.add_metric([team, state], n)
        return family

    def _dead_after(self, settings: bytes | None) -> float:
        if self.dead_after_seconds is not None:
            return self.dead_after_seconds
        try:
            value = json.loads(settings).get("dead_after_seconds") if settings else None
        except (ValueError, AttributeError):
            value = None
        number = finite_number(value)
        return number if number is not None and number > 0 else DEFAULT_DEAD_AFTER_S

    def _nodes(self, records: dict[str, Any], dead_after: float) -> Iterator[Metric]:
        now = self.clock()
        up = GaugeMetricFamily(PREFIX + "node_up", "1 while the node's heartbeat is fresh, else 0.", labels=["node"])
        state = GaugeMetricFamily(PREFIX + "node_state", "1 for the node's state (idle, busy, draining, stopped, "
                                  "dead, unknown), 0 for the others.", labels=["node", "state"])
        beat = GaugeMetricFamily(PREFIX + "node_heartbeat_timestamp_seconds", "When the node last wrote its record "
                                 "(Unix time).", labels=["node"])
        loaded = GaugeMetricFamily(PREFIX + "node_loaded_models", "Pipelines the node holds loaded.", labels=["node"])
        counters = {f: CounterMetricFamily(PREFIX + m, h, labels=["node"]) for f, (m, h, _) in NODE_COUNTERS.items()}
        gauges = {f: GaugeMetricFamily(PREFIX + m, h, labels=["node"]) for f, (m, h, _) in NODE_GAUGES.items()}
        for name, raw in records.items():
            if not isinstance(raw, list):  # WRONGTYPE: the node's key is not a hash
                log.error("metrics: node record %s is not a hash: %s", name, raw)
                continue
            record = dict(zip(NODE_FIELDS, (_json(v) for v in raw)))
            heartbeat = finite_number(record["heartbeat"])
            current = _node_state(record, heartbeat, now, dead_after)
            up.add_metric([name], 0.0 if current == "dead" else 1.0)
            for candidate in NODE_STATES:
                state.add_metric([name, candidate], 1.0 if candidate == current else 0.0)
            if heartbeat is not None:
                beat.add_metric([name], heartbeat)
            if isinstance(record["loaded"], list):
                loaded.add_metric([name], len(record["loaded"]))
            for field, family in counters.items():
                value = finite_number(record[field])
                if value is not None:
                    family.add_metric([name], value * NODE_COUNTERS[field][2])
            for field, family in gauges.items():
                value = finite_number(record[field])
                if value is not None:
                    family.add_metric([name], value * NODE_GAUGES[field][2])
        yield from (up, state, beat, loaded, *counters.values(), *gauges.values())

    @staticmethod
    def _counters(counters: dict[str, Any]) -> Iterator[Metric]:
        def value(name: str) -> float:
            number = finite_number(_json(counters.get(name)))
            return number if number is not None else 0.0

        deliveries = CounterMetricFamily(PREFIX + "webhook_deliveries", "Webhook deliveries that ended, by outcome "
                                         "(failed: retries exhausted).", labels=["outcome"])
        for field, outcome in WEBHOOK_OUTCOMES.items():
            deliveries.add_metric([outcome], value(field))
        yield deliveries
        yield CounterMetricFamily(PREFIX + "webhook_attempts", "Webhook POSTs made, retries included.",
                                  value=value(WEBHOOK_ATTEMPTS))
        events = CounterMetricFamily(PREFIX + "farm_events", "The farm's other counters: leases expired, timeouts, "
                                     "late results, quarantined records...", labels=["event"])
        for name in sorted(counters):
            if name not in WEBHOOK_OUTCOMES and name != WEBHOOK_ATTEMPTS and finite_number(_json(counters[name])) is not None:
                events.add_metric([name], value(name))
        yield events


def _histogram(name: str, documentation: str, raw: dict[bytes, bytes]) -> Metric:
    """A stored histogram (each bucket's own count) as Prometheus's (cumulative, ending at +Inf, whose count is
    the `_count`). Every bound of DURATION_BUCKETS is exported, counted or not, and any other a hash holds (from
    another version's buckets)."""
    own: dict[float, float] = {float(b): 0.0 for b in DURATION_BUCKETS}
    total = 0.0
    for field, value in raw.items():
        key, number = _text(field), finite_number(_text(value))
        if number is None:
            continue
        if key == HISTOGRAM_SUM:
            total = number
        elif key == HISTOGRAM_COUNT:
            continue  # the +Inf bucket's cumulative count is the count (the script keeps them equal)
        else:
            bound = math.inf if key == HISTOGRAM_INF else finite_number(key)
            if bound is not None:
                own[bound] = own.get(bound, 0.0) + number
    own.setdefault(math.inf, 0.0)
    buckets, running = [], 0.0
    for bound in sorted(own):
        running += own[bound]
        buckets.append((floatToGoString(bound), running))
    return HistogramMetricFamily(PREFIX + name, documentation, buckets=buckets, sum_value=total)


def _node_state(record: dict[str, Any], heartbeat: float | None, now: float, dead_after: float) -> str:
    """As the dashboard shows it (dashboard/queries.node_state): dead when silent, else draining, else its own."""
    if heartbeat is None or now - heartbeat > dead_after:
        return "dead"
    if record["draining"] is True:
        return "draining"
    return record["state"] if record["state"] in NODE_STATES else "unknown"


def _team_of(queue: str, queue_prefix: str) -> str | None:
    """The team of a per-team queue's key (`<prefix>:queue:<team>:<priority>`; team names hold no ':')."""
    if not queue.startswith(queue_prefix):
        return None
    team, _, priority = queue[len(queue_prefix):].rpartition(":")
    return team if team and priority.lstrip("-").isdigit() else None


def _text(raw: bytes | str) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else raw


def _json(raw: bytes | None) -> Any:
    """A node record's field (JSON, written by its worker); None when absent or not JSON."""
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None
