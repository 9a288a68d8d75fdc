"""WebhookDispatcher: follows the farm's finish events and delivers the webhooks they call for.

One daemon thread follows `Keys.finished` through the Redis consumer group `webhooks` (XREADGROUP), so several
dispatchers (the farm head, every API process) share the events and each event is handled by one of them; the
events a dead dispatcher read and never acknowledged are claimed by another after `claim_idle_s` (XAUTOCLAIM).
For each finish it creates the job's delivery (when its spec has a webhook) and, when the job's batch has a
webhook and this was its last job to finish, the batch's; a delivery's id comes from the event, so an event
handled twice creates its delivery once. Then it acknowledges the event.

The same thread claims the deliveries that are due (`Keys.webhook_due`, a sorted set by due time, claimed in one
atomic step) and hands each to a small pool of sender threads, so one slow receiver holds up one sender, never
the others nor the stream. An attempt that gets a 2xx is delivered; any other status or a network error is
retried after 1 s, 2 s, 4 s ... (capped at `backoff_cap_s`) until `webhook_retry_s` after the delivery was
created, then the delivery has failed; a refused target (a private address without `webhook_allow_private`)
fails at once. Every outcome is in the delivery's record and in the counters webhook_attempts,
webhook_delivered and webhook_failed. Nothing here runs in the scheduler or waits on it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

from renderfarm.cluster.keys import Keys
from renderfarm.cluster.store import Event, Store
from renderfarm.config import FARM_WIDE, Settings, with_farm_wide
from renderfarm.errors import ConfigError, CorruptRecord, JobNotFound
from renderfarm.webhooks.payloads import batch_body, encode, job_body, job_event
from renderfarm.webhooks.secrets import team_secret
from renderfarm.webhooks.sender import Attempt, post, redact_url
from renderfarm.webhooks.signing import signed_headers

__all__ = ["WebhookDispatcher", "retry_delay"]

log = logging.getLogger(__name__)

CLAIM_MARGIN_S = 30.0  # a claimed delivery is someone else's to try again this long after its attempt's timeout
READ_COUNT = 100  # finish events read at once
FORGET_CONSUMER_S = 24 * 3600  # a consumer silent this long and holding nothing died: the group forgets it


def retry_delay(attempts: int, base_s: float = 1.0, cap_s: float = 120.0) -> float:
    """Seconds to wait after the `attempts`-th failed attempt: base, 2 x base, 4 x base ..., at most `cap_s`."""
    if attempts < 1:
        return 0.0
    return min(cap_s, base_s * 2.0 ** min(attempts - 1, 60))


class WebhookDispatcher:
    """Delivers the farm's webhooks; start() it in any process that talks to the farm's Redis, stop() it there.

        dispatcher = WebhookDispatcher(redis_client, Keys(prefix), settings).start()
        ...
        dispatcher.stop()   # joins its threads (an attempt in flight finishes first: at most webhook_timeout_s)

    `redis_client`: a redis-py client with decode_responses=False (the Store's rule), shared with the caller as
    it is. `settings`: webhook_allow_private, webhook_retry_s and webhook_timeout_s; with `follow_published` the
    values the farm's head published win (so an API process follows the head). `senders`: attempts in flight
    at once. `consumer`: this dispatcher's name in the consumer group (unique per process by default).
    `poll_s`: how long the stream read waits, so how late a due retry may start. The backoff's `backoff_base_s`
    and `backoff_cap_s` are for tests and tuning.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        keys: Keys | None = None,
        settings: Settings | None = None,
        *,
        senders: int = 4,
        consumer: str | None = None,
        poll_s: float = 0.5,
        claim_idle_s: float = 60.0,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 120.0,
        follow_published: bool = True,
    ):
        if senders < 1:
            raise ValueError(f"senders must be at least 1, got {senders}")
        self.store = Store(redis_client, keys)
        self.settings = settings or Settings()
        self.senders = senders
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.poll_s = poll_s
        self.claim_idle_s = claim_idle_s
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.follow_published = follow_published
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._in_flight = 0
        self._read_own_pending = True  # at start, and after an error: events this consumer read and never acked
        self._next_reclaim = 0.0
        self._created = 0  # deliveries created in this step

    @classmethod
    def for_settings(cls, store: Store, settings: Settings | None = None, **options: Any) -> WebhookDispatcher:
        """A dispatcher on an existing Store's client and keys (stop() leaves that client open), with `settings`
        (None: the defaults, under what the head published) and the keyword options of the constructor."""
        return cls(store.redis, store.keys, settings, **options)

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> WebhookDispatcher:
        if self._thread is not None:
            return self
        self._refresh_settings()
        self.store.ensure_webhook_group()
        self._stop.clear()
        self._pool = ThreadPoolExecutor(max_workers=self.senders, thread_name_prefix="webhook-send")
        self._thread = threading.Thread(target=self._run, name="webhook-dispatch", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop following events and claiming deliveries; wait for the attempts in flight. Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        try:
            self.store.drop_consumer(self.consumer)
        except redis.RedisError:
            pass

    def __enter__(self) -> WebhookDispatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _refresh_settings(self) -> None:
        if not self.follow_published:
            return
        try:
            published = {k: v for k, v in self.store.published_settings().items()
                         if k in FARM_WIDE and k.startswith("webhook_")}
            if published:
                self.settings = with_farm_wide(self.settings, published)
        except (redis.RedisError, ConfigError) as exc:
            log.warning("webhooks: the farm's published settings are not usable (%s); keeping this process's", exc)

    # --- the loop -------------------------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.step(block_s=self.poll_s)
                failures = 0
            except Exception as exc:  # Redis away, a bug: logged, and tried again after a pause
                failures += 1
                self._read_own_pending = True
                if isinstance(exc, redis.ResponseError) and "NOGROUP" in str(exc):
                    self._recreate_group()
                else:
                    log.warning("webhooks: dispatch round failed (%s); trying again", exc,
                                exc_info=not isinstance(exc, redis.RedisError))
                self._stop.wait(min(10.0, 0.5 * 2 ** min(failures, 5)))

    def _recreate_group(self) -> None:
        try:
            self.store.ensure_webhook_group()
        except redis.RedisError as exc:
            log.warning("webhooks: cannot create the consumer group: %s", exc)

    def step(self, block_s: float = 0.0) -> int:
        """One round: take over stale events (now and then), read finish events (waiting up to `block_s` for
        one), create their deliveries and acknowledge them, then hand due deliveries to the senders. Returns
        the number of events handled. The thread calls this in a loop; a test may call it directly."""
        now = time.monotonic()
        handled = 0
        if now >= self._next_reclaim:
            self._next_reclaim = now + max(1.0, self.claim_idle_s / 2)
            self._refresh_settings()
            handled += self._handle(self.store.claim_stale_finished(self.consumer, self.claim_idle_s))
            self.store.forget_idle_consumers(FORGET_CONSUMER_S)
        if self._read_own_pending:
            handled += self._handle(self.store.read_finished(self.consumer, READ_COUNT, None, own_pending=True))
            self._read_own_pending = False
        self._dispatch_due()  # retries that came due (their senders run while this thread waits for events)
        self._created = 0
        handled += self._handle(self.store.read_finished(self.consumer, READ_COUNT, block_s))
        if self._created:  # new deliveries are due at once
            self._dispatch_due()
        return handled

    # --- events -> deliveries ---------------------------------------------------------------------------

    def _handle(self, events: Sequence[Event]) -> int:
        if not events:
            return 0
        sources = self.store.webhook_sources([e.job for e in events])  # one request for the lot
        batches: list[tuple[str, str]] = []
        for event, source in zip(events, sources):
            if source is None or event.state is None or not event.state.terminal:
                continue
            spec_json, batch_id = source
            try:
                spec = json.loads(spec_json)
            except ValueError:
                spec = None
            url = spec.get("webhook") if isinstance(spec, dict) else None
            if isinstance(url, str) and url:
                self._job_delivery(event, url, str(spec.get("team") or "default"))
            if batch_id:
                batches.append((batch_id, event.job))
        fired = {}  # a batch whose last jobs finish in one read fires once
        for (batch_id, _), due in zip(batches, self.store.batch_webhooks_due(batches)):  # one request too
            if due is not None:
                fired[batch_id] = due
        for batch_id, (url, team) in fired.items():
            self._batch_delivery(batch_id, url, team)
        self.store.ack_finished([e.id for e in events])
        return len(events)

    def _job_delivery(self, event: Event, url: str, team: str) -> None:
        delivery_id = f"{event.job}-{event.id}"
        try:
            job, results = self.store.get_with_blobs(event.job)
        except (JobNotFound, CorruptRecord) as exc:
            log.warning("webhooks: job %s finished but its record cannot be read (%s): no delivery", event.job, exc)
            return
        stamp = event.ts if event.ts is not None else time.time()
        body = job_body(job, results, event.state, delivery_id, stamp)
        self._create(delivery_id, kind="job", job=job.id, batch=job.batch_id, team=team, url=url,
                     event=job_event(event.state), payload=body)

    def _batch_delivery(self, batch_id: str, url: str, team: str) -> None:
        delivery_id = f"batch-{batch_id}"
        if self.store.delivery(delivery_id) is not None:  # fired before (an event handled again): created once
            return
        jobs = [job for job in self.store.get_many(self.store.batch_ids(batch_id), quarantine=True) if job is not None]
        body = batch_body(batch_id, team, jobs, delivery_id, time.time())
        self._create(delivery_id, kind="batch", job=None, batch=batch_id, team=team, url=url,
                     event=body["event"], payload=body)

    def _create(self, delivery_id: str, *, kind: str, job: str | None, batch: str | None, team: str, url: str,
                event: str, payload: dict[str, Any]) -> None:
        now = time.time()
        record = {"id": delivery_id, "kind": kind, "job": job, "batch": batch, "team": team, "event": event,
                  "url": redact_url(url), "target": url, "state": "pending", "attempts": 0, "last_status": None,
                  "last_error": None, "created": now, "updated": now, "next_at": now, "finished": None,
                  "payload": payload}
        if self.store.enqueue_delivery(record, due_at=now):
            self._created += 1
            log.debug("webhooks: %s %s for %s", kind, delivery_id, record["url"])

    # --- deliveries -> attempts ------------------------------------------------------------------------

    def _free_senders(self) -> int:
        with self._lock:
            return self.senders - self._in_flight

    def _dispatch_due(self) -> None:
        free = self._free_senders()
        if free <= 0 or (self._pool is None and self._thread is not None):  # busy, or stopping
            return
        now = time.time()
        ids = self.store.claim_deliveries(now, now + self.settings.webhook_timeout_s + CLAIM_MARGIN_S, free)
        for delivery_id in ids:
            with self._lock:
                self._in_flight += 1
            if self._pool is None:  # step() called without start(): attempt inline
                self._attempt(delivery_id)
            else:
                self._pool.submit(self._attempt, delivery_id)

    def _attempt(self, delivery_id: str) -> None:
        try:
            self.attempt(delivery_id)
        except Exception as exc:  # left claimed: due again when the claim lapses
            log.warning("webhooks: delivery %s: attempt failed in the farm (%s); it will be tried again",
                        delivery_id, exc, exc_info=not isinstance(exc, redis.RedisError))
        finally:
            with self._lock:
                self._in_flight -= 1

    def attempt(self, delivery_id: str) -> dict[str, Any] | None:
        """Try delivery `delivery_id` once (it must be claimed) and record how it went; its record after."""
        record = self.store.delivery(delivery_id)
        if record is None or record.get("state") != "pending":
            self.store.drop_due(delivery_id)
            return record
        settings = self.settings
        secret = team_secret(self.store.redis, self.store.keys, str(record.get("team") or "default"))
        body = encode(record["payload"])
        headers = signed_headers(secret.signing(), body, delivery=delivery_id, event=str(record["event"]))
        result: Attempt = post(str(record["target"]), body, headers, timeout_s=settings.webhook_timeout_s,
                               allow_private=settings.webhook_allow_private)
        now = time.time()
        attempts = int(record.get("attempts") or 0) + 1
        record.update(attempts=attempts, last_status=result.status, last_error=result.error, updated=now)
        counts = {"webhook_attempts": 1}
        next_at: float | None = None
        if result.delivered:
            record.update(state="delivered", finished=now, next_at=None)
            counts["webhook_delivered"] = 1
        else:
            delay = retry_delay(attempts, self.backoff_base_s, self.backoff_cap_s) * random.uniform(1.0, 1.1)
            deadline = float(record.get("created") or now) + settings.webhook_retry_s
            if result.refused or now + delay > deadline:
                record.update(state="failed", finished=now, next_at=None)
                counts["webhook_failed"] = 1
                log.warning("webhooks: delivery %s to %s failed after %d attempt(s): %s", delivery_id,
                            record.get("url"), attempts, result.error)
            else:
                next_at = now + delay
                record["next_at"] = next_at
        self.store.settle_delivery(record, next_at, counts)
        return record
