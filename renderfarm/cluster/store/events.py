"""The farm's event stream: one entry per job state change, written by the same Lua script as the change.

`EventCursor` is the one way to follow it (the client waiting for its jobs, the scheduler waking on a
submit, the chaos bench counting what happened): it remembers where it is, blocks for at most the time
asked, and turns each entry into an `Event`. An entry that does not parse (no state, an unknown state) is
an `Event` with `state=None`, never an exception: one malformed entry must not stop a waiting client. Given a
counters hash, the cursor counts each such entry it reads there (`malformed_event`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from renderfarm.jobs import JobState

__all__ = ["STREAM_ID", "Event", "EventCursor"]

STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


@dataclass(frozen=True)
class Event:
    id: str  # the stream entry's id ("<ms>-<seq>")
    job: str
    state: JobState | None  # None for an entry that does not parse
    node: str
    ts: float | None


def _event(entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
    def get(name: str) -> str:
        return fields.get(name.encode(), b"").decode(errors="replace")

    try:
        state = JobState(get("state"))
    except ValueError:
        state = None
    try:
        ts = float(get("ts"))
    except ValueError:
        ts = None
    return Event(entry_id.decode(), get("job"), state, get("node"), ts)


class EventCursor:
    """A position in the event stream. `from_start=False` (the default) follows only what happens after
    the cursor was made; `from_start=True` reads the whole (capped) stream first; `after` (an entry id read
    before) resumes after that entry (ValueError when it is not an entry id)."""

    def __init__(self, client: redis.Redis, stream: str, *, from_start: bool = False, counters: str | None = None,
                 after: str | None = None):
        self._redis, self._stream, self._counters = client, stream, counters
        if after is not None:  # resume after an entry read before (an SSE client's Last-Event-ID)
            if not STREAM_ID.fullmatch(after):
                raise ValueError(f"{after!r} is not an event id (expected <milliseconds>-<sequence>)")
            self._position = after.encode()
        elif from_start:
            self._position = b"0-0"
        else:
            last = client.xrevrange(stream, count=1)
            self._position = last[0][0] if last else b"0-0"

    @property
    def position(self) -> str:
        return self._position.decode() if isinstance(self._position, bytes) else str(self._position)

    def read(self, block_s: float | None = None, count: int = 1000) -> list[Event]:
        """The next events (at most `count`), waiting up to `block_s` seconds for one when there are none
        (None or 0: do not wait)."""
        block = None if not block_s or block_s <= 0 else max(1, int(block_s * 1000))
        return self._take(self._redis.xread({self._stream: self._position}, count=count, block=block))

    def queue_read(self, rnd: Any, count: int = 1000) -> Callable[[], list[Event]]:
        """`read` without waiting, as part of a round (store/round.py): the getter returns the events and
        moves the cursor past them. Read the getter once, before the next read."""
        position = self._position
        reply = rnd.command(lambda pipe: pipe.xread({self._stream: position}, count=count))
        return lambda: self._take(reply())

    def _take(self, replies: Any) -> list[Event]:
        events = []
        for _, entries in replies or []:
            for entry_id, fields in entries:
                self._position = entry_id
                events.append(_event(entry_id, fields))
        malformed = sum(1 for e in events if e.state is None)
        if malformed and self._counters:
            self._redis.hincrby(self._counters, "malformed_event", malformed)
        return events

    def drain(self, count: int = 1000) -> list[Event]:
        """Every event from here to the end of the stream, without waiting."""
        out: list[Event] = []
        while batch := self.read(None, count):
            out += batch
        return out
