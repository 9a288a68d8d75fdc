"""Nodes (their records, heartbeats, draining) and the farm-wide settings the head publishes."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis

from renderfarm.cluster.keys import Keys

log = logging.getLogger(__name__)


class NodeRecords:
    """The node half of the Store; `Store` supplies `redis` and `keys`."""

    redis: redis.Redis
    keys: Keys

    def set_draining(self, name: str, draining: bool = True, reason: str = "") -> bool:
        """Mark node `name` draining (it finishes what it holds and takes nothing new) or not, with why (an
        operator, or the scheduler after failures in a row); False when no such node is registered."""
        if not self.redis.sismember(self.keys.nodes, name):
            return False
        self.redis.hset(self.keys.node(name), mapping={
            "draining": json.dumps(bool(draining)), "drain_reason": json.dumps(reason if draining else "")})
        return True

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
        """Every registered node's record, fields as JSON values (a field that is not JSON as its text, and a
        key that is not a hash as an empty record), `name` always the registered name. Readers that act on a
        field check it and skip (and count, `malformed_node`) a record they cannot use: see
        `planning.devices.device_from_record`."""
        names = sorted(m.decode(errors="replace") for m in self.redis.smembers(self.keys.nodes))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.keys.node(name))
        out = []
        for name, raw in zip(names, pipe.execute(raise_on_error=False)):
            info: dict[str, Any] = {"name": name}
            if isinstance(raw, redis.ResponseError):  # WRONGTYPE: the node's key is not a hash
                log.error("node record %s is not a hash: %s", name, raw)
                raw = {}
            for k, v in raw.items():
                try:
                    info[k.decode(errors="replace")] = json.loads(v)
                except ValueError:  # not JSON, or not UTF-8
                    info[k.decode(errors="replace")] = v.decode(errors="replace")
            info["name"] = name  # a `name` field in the hash must not make the record speak for another node
            out.append(info)
        return out
