"""Nodes (their records, heartbeats, draining) and the farm-wide settings the head publishes."""

from __future__ import annotations

import json
import logging
import time
import uuid
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

    def mark_farm(self) -> dict[str, Any]:
        """Write the farm's marker (Keys.farm): its id and creation time are kept from the first start, the
        start time is this one's. Returns the marker."""
        now = time.time()
        marker = self.farm_marker() or {"id": uuid.uuid4().hex[:12], "created": now}
        marker = {**marker, "started": now}
        self.redis.set(self.keys.farm, json.dumps(marker))
        return marker

    def farm_marker(self) -> dict[str, Any] | None:
        """The farm's marker; None when no farm has started on this database. A marker that does not parse
        still says a farm is here (logged, returned as {})."""
        raw = self.redis.get(self.keys.farm)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError as exc:
            log.error("%s does not parse: %s", self.keys.farm, exc)
            return {}
        return value if isinstance(value, dict) else {}

    def holds_farm_records(self) -> bool:
        """Whether this database holds any job, node or token record (a farm from before the marker existed,
        or one written by a tool), as opposed to an empty database."""
        keys = [self.keys.nodes, self.keys.tokens, self.keys.settings, *self.keys.all_indexes()]
        return bool(self.redis.exists(*keys))

    def farm_databases(self) -> list[int]:
        """The other databases of this server that hold a farm marker, so that a client given the wrong
        database number can name the right one; [] when the server does not say (INFO or SELECT refused)."""
        pool = self.redis.connection_pool
        here = int(pool.connection_kwargs.get("db") or 0)
        try:
            keyspace = self.redis.info("keyspace")
        except redis.RedisError:
            return []
        found = []
        for name in keyspace:
            if not (str(name).startswith("db") and str(name)[2:].isdigit()) or int(str(name)[2:]) == here:
                continue
            db = int(str(name)[2:])
            other = redis.Redis(connection_pool=redis.ConnectionPool(
                connection_class=pool.connection_class, **{**pool.connection_kwargs, "db": db}))
            try:
                if other.exists(self.keys.farm):
                    found.append(db)
            except redis.RedisError:
                pass
            finally:
                other.close()
        return found

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

    def publish_assets(self, name: str, assets: dict[str, Any], version: str) -> None:
        """Node `name` holds `assets` (loras/assets.py node_assets): written to Keys.assets, and `version` (their
        digest) to its record, in one transaction, so that a reader who sees the version sees the assets."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.assets, name, json.dumps({**assets, "version": version}))
            pipe.hset(self.keys.node(name), "assets_version", json.dumps(version))
            pipe.execute()

    def assets(self, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """What each node (of `names`, default all) said it holds; a node that said nothing, or whose entry does
        not parse (logged and counted, `malformed_assets`), is left out: it holds nothing a job can count on."""
        if names is None:
            raw = dict(self.redis.hgetall(self.keys.assets))
        else:
            raw = {n.encode(): v for n, v in zip(names, self.redis.hmget(self.keys.assets, names) if names else [])
                   if v is not None}
        out = {}
        for key, value in raw.items():
            name = key.decode(errors="replace")
            try:
                doc = json.loads(value)
                if not isinstance(doc, dict):
                    raise ValueError(f"a {type(doc).__name__}, not an object")
            except ValueError as exc:
                log.error("assets of node %s do not parse, ignored: %s", name, exc)
                self.count("malformed_assets")
                continue
            out[name] = doc
        return out

    def update_node(self, name: str, **info: Any) -> None:
        self.redis.hset(self.keys.node(name), mapping=self._node_fields(info))

    def queue_update_node(self, rnd: Any, name: str, **info: Any) -> None:
        """`update_node` as part of a round (store/round.py): one request with the jobs it reports on."""
        fields = self._node_fields(info)
        rnd.command(lambda pipe: pipe.hset(self.keys.node(name), mapping=fields))

    @staticmethod
    def _node_fields(info: dict[str, Any]) -> dict[str, str]:
        return {**{k: json.dumps(v) for k, v in info.items()}, "heartbeat": json.dumps(time.time())}

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
