"""Several Store operations in one request to Redis: one round trip, however many jobs they touch.

A node starting a batch marks each job running and says it is busy; a node finishing one records every
result, its measurement and its new totals; the scheduler leases a round's batches, saves the fair-share usage
and reads the events since its last look. Each is one `Round`:

    rnd = Round(store)
    started = [rnd.move(store.move(job_id, JobState.RUNNING, ...)) for job_id in ids]
    rnd.command(lambda pipe: pipe.hset(node_key, mapping=fields))
    rnd.run()
    states = [outcome() for outcome in started]  # each returns, or raises, as `Store.transition` would

redis-py sends a pipeline's commands in one write and reads the replies back together; a script in a
pipeline would cost one more request (redis-py asks SCRIPT EXISTS first), so scripts go in as EVALSHA by
their digest, and a server that does not know one yet (a new or restarted Redis) answers NOSCRIPT: the scripts
it lacks are loaded (one request for all of them) and the whole round sent again. That is safe because every
operation put in a round is idempotent: state changes carry their operation token (scripts/transition.lua),
the job-duration histograms mark each job they count (scripts/observe.lua), the rest are writes of the same
values or reads. The round is not a transaction: each operation is atomic on its own (a script, a command), as
the same calls made one by one would be.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from renderfarm.jobs import JobState

__all__ = ["Round"]


class Round:
    def __init__(self, store: Any):  # the Store (store/__init__.py), which imports this module
        self.store = store
        self._ops: list[tuple[Script | None, Callable[[redis.client.Pipeline], Any]]] = []
        self._replies: list[Any] = []

    def __len__(self) -> int:
        return len(self._ops)

    def script(self, script: Script, keys: list[Any], args: list[Any]) -> Callable[[], Any]:
        """Run a registered script; returns a getter of its reply (an exception reply raises)."""
        return self._add(script, lambda pipe: pipe.evalsha(script.sha, len(keys), *keys, *args))

    def command(self, queue: Callable[[redis.client.Pipeline], Any]) -> Callable[[], Any]:
        """`queue(pipe)` queues one idempotent command on the round's pipeline; returns a getter of its reply."""
        return self._add(None, queue)

    def move(self, move: Any) -> Callable[[], JobState]:
        """A state change (a `jobs.Move`, from `Store.move`); the getter returns the state it left or raises as `transition`."""
        reply = self.script(self.store._transition, move.keys, move.args)
        return lambda: self.store.moved(move, reply())

    def run(self) -> None:
        """Send every queued operation in one request (two when Redis had to be taught a script first)."""
        if not self._ops:
            return
        for attempt in range(2):
            pipe = self.store.redis.pipeline(transaction=False)
            for _, queue in self._ops:
                queue(pipe)
            replies = pipe.execute(raise_on_error=False)
            unknown = {id(s): s for (s, _), r in zip(self._ops, replies) if isinstance(r, NoScriptError) and s}
            if not unknown or attempt:
                self._replies = replies
                return
            teach = self.store.redis.pipeline(transaction=False)  # every script it lacks, in one request
            for script in unknown.values():
                teach.script_load(script.script)
            for script, sha in zip(unknown.values(), teach.execute()):
                script.sha = sha

    def _add(self, script: Script | None, queue: Callable[[redis.client.Pipeline], Any]) -> Callable[[], Any]:
        index = len(self._ops)
        self._ops.append((script, queue))

        def reply() -> Any:
            if index >= len(self._replies):
                raise RuntimeError("a Round's reply was read before the round ran")
            value = self._replies[index]
            if isinstance(value, Exception):
                raise value
            return value

        return reply
