"""Counting a client's Redis round trips: what a job costs the farm's system of record (issue 16).

A round trip is one request the client sends and waits on: a command, a script call, or a whole pipeline
(redis-py packs a pipeline's commands into one send). Each is one `send_packed_command` on a connection, so
the count is taken there, by a subclass of the pool's connection class, which the connections the pool
already holds take on too (a new connection's handshake is counted as well: its requests are real).

    trips = count_round_trips(client)
    ... ; trips.value
"""

from __future__ import annotations

import threading

import redis

__all__ = ["RoundTrips", "count_round_trips"]


class RoundTrips:
    """A thread-safe counter of requests sent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = 0

    def add(self) -> None:
        with self._lock:
            self._value += 1

    @property
    def value(self) -> int:
        return self._value


def count_round_trips(client: redis.Redis) -> RoundTrips:
    """Count every request `client` sends from now on; returns the counter (the same one when called again)."""
    pool = client.connection_pool
    existing = getattr(pool.connection_class, "round_trips", None)
    if isinstance(existing, RoundTrips):
        return existing
    trips = RoundTrips()
    base = pool.connection_class

    class Counted(base):  # type: ignore[valid-type, misc]
        round_trips = trips

        def send_packed_command(self, command, check_health=True):  # noqa: ANN001 (redis-py's signature)
            trips.add()
            return super().send_packed_command(command, check_health)

    Counted.__name__ = f"Counted{base.__name__}"
    Counted.__qualname__ = Counted.__name__
    pool.connection_class = Counted  # the connections the pool makes from now on
    # and those it holds already (a subclass adds no state, so an object can take it on in place): dropping
    # them instead (pool.reset) would leave their sockets open, outside the pool's reach and its close().
    with pool._lock:
        held = [*getattr(pool, "_available_connections", ()), *getattr(pool, "_in_use_connections", ())]
        for connection in held:
            if type(connection) is base:
                connection.__class__ = Counted
    return trips
