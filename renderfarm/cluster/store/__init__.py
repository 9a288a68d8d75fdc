"""The Store: the only way into the farm's Redis (jobs, nodes, telemetry, events).

Rules (../DESIGN.md): keys come from `cluster/keys.Keys`; values are JSON or plain strings, never pickles;
a state change and its index move happen in one Lua script (scripts/*.lua, beside this file), which also
checks that the move is legal and, when asked, that the job is still held by the node reporting on it.
Submit is idempotent by job id and a batch is all-or-nothing; a state change is idempotent by operation
token, so a command that redis-py retries after a lost reply does not report a move it made as refused.

The Store uses the client it is given as it is: the retry policy that rides out a Redis restart belongs to
whoever built the client (`RedisSettings.client()`), not to the Store.

One class over five parts, each in its own module: `JobRecords` (jobs.py), `NodeRecords` (nodes.py),
`Telemetry` (telemetry.py), `Reconciler` (reconcile.py: the indexes checked against the job hashes),
`WebhookRecords` (webhooks.py: webhook deliveries), and `EventCursor` (events.py). They are mixins rather
than sub-objects so that
callers keep one `store` and one flat vocabulary (`store.lease`, `store.nodes()`, `store.events()`).
"""

from __future__ import annotations

from importlib import resources

import redis

from renderfarm.cluster.keys import Keys
from renderfarm.cluster.redis_settings import RedisSettings
from renderfarm.cluster.round_trips import count_round_trips
from renderfarm.cluster.store.chains import ChainBlocked, ChainRecords
from renderfarm.cluster.store.codec import job_from_hash, job_to_hash, queue_score
from renderfarm.cluster.store.events import Event, EventCursor
from renderfarm.cluster.store.jobs import EVENTS_MAXLEN, Fenced, JobRecords, LeaseLive, OwnershipLost
from renderfarm.cluster.store.leader import Leadership
from renderfarm.cluster.store.nodes import NodeRecords
from renderfarm.cluster.store.reconcile import Reconciler, ReconcileReport
from renderfarm.cluster.store.round import Round
from renderfarm.cluster.store.telemetry import MEASURE_ALPHA, SAMPLES_MAXLEN, Telemetry
from renderfarm.cluster.store.webhooks import WEBHOOK_SCRIPTS, WebhookRecords

__all__ = [
    "EVENTS_MAXLEN", "MEASURE_ALPHA", "SAMPLES_MAXLEN", "Event", "EventCursor", "Fenced", "LeaseLive", "OwnershipLost",
    "ChainBlocked", "ReconcileReport", "Round", "Store", "job_from_hash", "job_to_hash", "queue_score",
]

SCRIPTS = ("submit", "transition", "renew", "expired", "quarantine", "measure", "reconcile", "lead", "observe", "settle")
SCRIPTS += WEBHOOK_SCRIPTS
PRELUDES = {"transition": "chain", "settle": "chain"}  # Lua shared by scripts: prepended to each that uses it


def script_source(name: str) -> str:
    scripts = resources.files(__package__).joinpath("scripts")
    source = scripts.joinpath(f"{name}.lua").read_text()
    prelude = PRELUDES.get(name)
    return source if prelude is None else scripts.joinpath(f"{prelude}.lua").read_text() + "\n" + source


class Store(JobRecords, ChainRecords, NodeRecords, Telemetry, Reconciler, Leadership, WebhookRecords):
    """The farm's system of record. One instance per process; thread-safe as redis-py is."""

    def __init__(self, client: redis.Redis, keys: Keys | None = None):
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("Store needs a Redis client with decode_responses=False (results are bytes)")
        self.redis = client
        self.keys = keys or Keys()
        self.trips = count_round_trips(client)  # what this process's work costs Redis (issue 16)
        for name in SCRIPTS:
            setattr(self, f"_{name}", client.register_script(script_source(name)))

    @classmethod
    def open(cls, redis_settings: str | RedisSettings, keys: Keys | None = None) -> Store:
        """A Store on a new client for `redis_settings` (a URL, or RedisSettings), with the farm's retry policy."""
        return cls(RedisSettings.from_url(redis_settings).client(), keys)

    @property
    def round_trips(self) -> int:
        """Requests sent to Redis on this Store's client so far (a pipeline or a round is one)."""
        return self.trips.value

    def events(self, *, from_start: bool = False, finished_only: bool = False, after: str | None = None) -> EventCursor:
        """A cursor on the event stream: what happens from now on, (`from_start`) everything kept, or what came
        after the entry `after`. With `finished_only`, on the stream of moves to a terminal state only
        (Keys.finished)."""
        stream = self.keys.finished if finished_only else self.keys.events
        return EventCursor(self.redis, stream, from_start=from_start, counters=self.keys.metrics("counters"),
                           after=after)

    def close(self) -> None:
        """Close the client's connections (a Store made for one call must not leave them open)."""
        self.redis.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
