"""Webhook deliveries and the consumer group that feeds them (renderfarm/webhooks holds the logic).

A delivery is one JSON record (`Keys.webhook_delivery`, expiring after DELIVERY_TTL_S) with its target, its
body and its outcome; its id sits in an index scored by creation time (`Keys.webhook_deliveries`, capped at
DELIVERIES_KEPT) and, while it is pending, in a sorted set scored by when its next attempt is due
(`Keys.webhook_due`). Creating one is idempotent by id (scripts/webhook_enqueue.lua); claiming due ones moves
them to the end of their claim in one step (scripts/webhook_claim.lua), so several dispatchers never take the
same one and a dead dispatcher's claims lapse. A batch's webhook is written by the submit script and fires
once (scripts/webhook_batch.lua).

Dispatchers follow `Keys.finished` through one Redis consumer group (`WEBHOOK_GROUP`): each event goes to one
dispatcher, which acknowledges it once its deliveries exist; what a dead dispatcher left unacknowledged is
claimed by another (XAUTOCLAIM).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from renderfarm.cluster.keys import WEBHOOK_GROUP, Keys
from renderfarm.cluster.store.events import Event, _event
from renderfarm.errors import CorruptRecord

log = logging.getLogger(__name__)

WEBHOOK_SCRIPTS = ("webhook_enqueue", "webhook_claim", "webhook_batch")  # scripts/*.lua, registered by the Store
DELIVERY_TTL_S = 7 * 24 * 3600  # a delivery's record is kept this long after its last change
DELIVERIES_KEPT = 10_000  # the index lists at most this many (the newest); older records still expire on their own


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class WebhookRecords:
    """The webhook half of the Store; `Store` supplies `redis`, `keys` and the registered scripts."""

    redis: redis.Redis
    keys: Keys

    # --- deliveries ---------------------------------------------------------------------------------

    def enqueue_delivery(self, record: dict[str, Any], due_at: float) -> bool:
        """Create delivery `record` (its `id`, `created` and the rest), due at `due_at`; False when a delivery of
        that id exists already (nothing written)."""
        delivery_id = str(record["id"])
        created = self._webhook_enqueue(
            keys=[self.keys.webhook_delivery(delivery_id), self.keys.webhook_due, self.keys.webhook_deliveries],
            args=[delivery_id, json.dumps(record), repr(due_at), DELIVERY_TTL_S, DELIVERIES_KEPT,
                  repr(float(record["created"]))],
        )
        if isinstance(created, list):
            raise CorruptRecord(f"webhook delivery {delivery_id!r} not created: {_text(created[1])}")
        return bool(created)

    def claim_deliveries(self, now: float, claim_until: float, limit: int) -> list[str]:
        """The ids of at most `limit` deliveries due by `now`, each claimed until `claim_until`."""
        if limit <= 0:
            return []
        ids = self._webhook_claim(keys=[self.keys.webhook_due], args=[repr(now), repr(claim_until), int(limit)])
        return [_text(i) for i in ids]

    def delivery(self, delivery_id: str) -> dict[str, Any] | None:
        """A delivery's record; None when there is none (expired), or it does not parse (logged)."""
        try:
            raw = self.redis.get(self.keys.webhook_delivery(delivery_id))
        except redis.ResponseError:  # WRONGTYPE
            log.error("webhook delivery %s: its key is not a string", delivery_id)
            return None
        return self._delivery_from(delivery_id, raw)

    @staticmethod
    def _delivery_from(delivery_id: str, raw: bytes | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError as exc:
            log.error("webhook delivery %s does not parse: %s", delivery_id, exc)
            return None
        return value if isinstance(value, dict) else None

    def settle_delivery(self, record: dict[str, Any], next_at: float | None, counts: dict[str, int]) -> None:
        """Write `record` after an attempt, in one transaction with its place in the due set (due again at
        `next_at`, or out of it: delivered, failed, gone) and the counters to add (`Keys.metrics("counters")`)."""
        delivery_id = str(record["id"])
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.webhook_delivery(delivery_id), json.dumps(record), ex=DELIVERY_TTL_S)
            if next_at is None:
                pipe.zrem(self.keys.webhook_due, delivery_id)
            else:
                pipe.zadd(self.keys.webhook_due, {delivery_id: next_at})
            for name, n in counts.items():
                if n:
                    pipe.hincrby(self.keys.metrics("counters"), name, n)
            pipe.execute()

    def drop_due(self, delivery_id: str) -> None:
        """Take a delivery whose record is gone (expired, unreadable) out of the due set."""
        self.redis.zrem(self.keys.webhook_due, delivery_id)

    def recent_deliveries(self, page: int = 200, scan_max: int = DELIVERIES_KEPT) -> Iterator[dict[str, Any]]:
        """The kept deliveries' records, newest first (index entries whose record expired are dropped)."""
        for offset in range(0, scan_max, page):
            ids = [_text(i) for i in self.redis.zrevrange(self.keys.webhook_deliveries, offset, offset + page - 1)]
            if not ids:
                return
            raws = self.redis.mget([self.keys.webhook_delivery(i) for i in ids])
            gone = []
            for delivery_id, raw in zip(ids, raws):
                record = self._delivery_from(delivery_id, raw)
                if record is None:
                    gone.append(delivery_id)
                else:
                    yield record
            if gone:
                self.redis.zrem(self.keys.webhook_deliveries, *gone)
            if len(ids) < page:
                return

    # --- batches ------------------------------------------------------------------------------------

    def batch_webhooks_due(self, finished: Sequence[tuple[str, str]], ttl_s: int = DELIVERY_TTL_S
                           ) -> list[tuple[str, str] | None]:
        """Each (batch id, job id) of `finished` (that job of that batch has finished), in one request: (url,
        team) of the batch's webhook when the whole batch has finished (then and afterwards: the caller creates
        its delivery once, by id), else None (no webhook, or jobs of the batch still to finish)."""
        if not finished:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for batch_id, job_id in finished:
            self._webhook_batch(
                keys=[self.keys.batch_webhook(batch_id), self.keys.batch_open(batch_id), self.keys.batch(batch_id)],
                args=[job_id, self.keys.job(""), int(ttl_s)], client=pipe)
        out: list[tuple[str, str] | None] = []
        for reply in pipe.execute():
            fired = bool(reply) and _text(reply[0]) == "fire"
            out.append((_text(reply[1]), _text(reply[2])) if fired else None)
        return out

    def batch_webhook(self, batch_id: str) -> dict[str, str] | None:
        """A batch's webhook record (url, team, created, fired), None when it has none."""
        raw = self.redis.hgetall(self.keys.batch_webhook(batch_id))
        return {_text(k): _text(v) for k, v in raw.items()} or None

    # --- the consumer group on Keys.finished --------------------------------------------------------

    def ensure_webhook_group(self) -> None:
        """Create the dispatchers' consumer group on Keys.finished (and the stream) if missing. It starts at
        the stream's beginning: a job that finished before any dispatcher ran still gets its webhook."""
        try:
            self.redis.xgroup_create(self.keys.finished, WEBHOOK_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read_finished(self, consumer: str, count: int, block_s: float | None, *, own_pending: bool = False
                      ) -> list[Event]:
        """New finish events for `consumer` of the group (at most `count`, waiting up to `block_s`); with
        `own_pending`, those it read before and never acknowledged instead (after an error, or a restart under
        the same name)."""
        block = None if own_pending or not block_s or block_s <= 0 else max(1, int(block_s * 1000))
        position = "0" if own_pending else ">"
        replies = self.redis.xreadgroup(WEBHOOK_GROUP, consumer, {self.keys.finished: position}, count=count,
                                        block=block)
        entries = [entry for _, found in replies or [] for entry in found]
        gone = [entry_id for entry_id, fields in entries if not fields]  # trimmed from the stream meanwhile
        if gone:
            self.ack_finished(gone)
        return [_event(entry_id, fields) for entry_id, fields in entries if fields]

    def claim_stale_finished(self, consumer: str, min_idle_s: float, count: int = 100) -> list[Event]:
        """Events another consumer read and left unacknowledged for `min_idle_s` (it died), now `consumer`'s.
        Entries trimmed from the stream meanwhile are acknowledged and skipped."""
        out: list[Event] = []
        start = "0-0"
        for _ in range(100):  # bounded: at most 100 pages per call
            reply = self.redis.xautoclaim(self.keys.finished, WEBHOOK_GROUP, consumer,
                                          min_idle_time=max(0, int(min_idle_s * 1000)), start_id=start, count=count)
            start, entries = _text(reply[0]), reply[1]
            gone = [entry_id for entry_id, fields in entries if not fields]
            if gone:
                self.ack_finished(gone)
            out += [_event(entry_id, fields) for entry_id, fields in entries if fields]
            if start == "0-0":
                break
        return out

    def ack_finished(self, entry_ids: Sequence[str | bytes]) -> None:
        if entry_ids:
            self.redis.xack(self.keys.finished, WEBHOOK_GROUP, *entry_ids)

    def drop_consumer(self, consumer: str) -> None:
        """Forget `consumer` when it holds no unacknowledged event (a dispatcher that stopped cleanly)."""
        try:
            pending = self.redis.xpending_range(self.keys.finished, WEBHOOK_GROUP, min="-", max="+", count=1,
                                                consumername=consumer)
            if not pending:
                self.redis.xgroup_delconsumer(self.keys.finished, WEBHOOK_GROUP, consumer)
        except redis.ResponseError:  # no group (the database was emptied): nothing to forget
            pass

    def forget_idle_consumers(self, idle_s: float) -> int:
        """Forget the group's consumers idle for `idle_s` that hold nothing (dispatchers that died: what they
        held was claimed by others); how many."""
        forgotten = 0
        for consumer in self.redis.xinfo_consumers(self.keys.finished, WEBHOOK_GROUP):
            if consumer.get("pending") == 0 and consumer.get("idle", 0) >= idle_s * 1000:
                self.redis.xgroup_delconsumer(self.keys.finished, WEBHOOK_GROUP, consumer["name"])
                forgotten += 1
        return forgotten

    def webhook_sources(self, job_ids: Sequence[str]) -> list[tuple[str, str] | None]:
        """Per job: (its spec's JSON, its batch id) from one request; None for a job without a record."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.keys.job(job_id), ["spec", "batch_id"])
        out: list[tuple[str, str] | None] = []
        for reply in pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception) or reply[0] is None:
                out.append(None)
            else:
                out.append((_text(reply[0]), _text(reply[1])))
        return out
