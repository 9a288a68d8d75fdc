"""One scheduler dispatches at a time: a leader lock in Redis with a TTL its holder renews every round.

A second scheduler started against the same Redis (a second `up` on another data directory, an operator's
mistake, a restarted actor whose predecessor still runs) waits and takes over when the lock lapses. Each
leadership has an epoch (a counter raised at every takeover) for fencing writes.
"""

from __future__ import annotations

import redis

from renderfarm.cluster.keys import Keys


class Leadership:
    """The leader half of the Store; `Store` supplies `redis`, `keys` and the registered `_lead` script."""

    redis: redis.Redis
    keys: Keys

    def lead(self, owner: str, ttl_s: float) -> int | None:
        """Take or keep the leadership for `ttl_s`; the epoch while `owner` leads, None while another does."""
        epoch = self._lead(keys=[self.keys.leader, self.keys.leader_epoch],  # type: ignore[attr-defined]
                           args=[owner, max(1, int(ttl_s * 1000)), "0"])
        return int(epoch) if epoch else None

    def resign(self, owner: str) -> None:
        """Give the leadership up at once (a clean stop), if `owner` holds it."""
        self._lead(keys=[self.keys.leader, self.keys.leader_epoch], args=[owner, 1, "1"])  # type: ignore[attr-defined]

    def leader(self) -> str | None:
        raw = self.redis.get(self.keys.leader)
        return raw.decode(errors="replace") if raw is not None else None
