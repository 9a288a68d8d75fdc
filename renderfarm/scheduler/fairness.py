"""In what order the farm's pending jobs run: priority first, weighted fair share between teams within a
priority, and aging so that no job starves. Pure functions over plain data (stdlib only), testable without
Ray or Redis.

Policy:
- A job's effective priority is its priority plus one level per `aging_s` seconds it has waited. Levels are
  integers on purpose: jobs of equal level form a group inside which fair share decides, so a small age
  difference does not override the share the way a continuous score (priority + wait / aging_s) would.
- Within a level, teams share by weighted fair queueing. Each team's usage is the seconds of work charged to
  it, decaying with a half-life, so the past counts less the older it is. A team's virtual time starts at
  usage / weight and grows by cost / weight for each job it is given; the team with the smallest virtual time
  goes next. Over a long run each team gets work in proportion to its weight, and a team that used a lot
  recently waits behind one that did not. The virtual charges carry over from one level to the next: `order`
  projects the future order, in which a team's jobs at a higher level are work it will have used by then.
- No starvation: a waiting job's level grows without bound (wait / aging_s), while every other job enters at
  its own priority (at most 100) and climbs at the same rate. Once it has waited (100 - priority + 1) *
  aging_s it ranks above every job submitted from then on, so only finitely many jobs can still precede it.

`order` is a projection and leaves usage alone; the scheduler calls `charge` when it actually dispatches a
job. `to_json`/`load_json` carry the usage state through Redis.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Queued:
    id: str
    team: str
    priority: int  # -100..100, higher first
    created_at: float  # epoch seconds of submit
    cost: float = 1.0  # estimated work in seconds (> 0); what the team is charged when this job runs

    def __post_init__(self) -> None:
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ValueError(f"job {self.id!r}: priority must be an int, got {self.priority!r}")
        if not _is_number(self.created_at) or not math.isfinite(self.created_at):
            raise ValueError(f"job {self.id!r}: created_at must be a finite number, got {self.created_at!r}")
        if not _is_number(self.cost) or not math.isfinite(self.cost) or self.cost <= 0:
            raise ValueError(f"job {self.id!r}: cost must be a finite number > 0, got {self.cost!r}")


def _is_number(x: object) -> bool:
    """A real number (int or float, not bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _positive(name: str, x: object, allow_inf: bool = False) -> float:
    if not _is_number(x) or not x > 0 or (x == math.inf and not allow_inf):  # type: ignore[operator]
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number > 0, got {x!r}")
    return float(x)  # type: ignore[arg-type]


def _finite(name: str, x: object) -> float:
    if not _is_number(x) or not math.isfinite(x):  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a finite number, got {x!r}")
    return float(x)  # type: ignore[arg-type]


def _aged(job: Queued, now: float, aging_s: float) -> int:
    """`job.priority` plus one level per `aging_s` seconds waited by `now` (both already checked)."""
    if aging_s <= 0:
        return job.priority
    return job.priority + math.floor(max(0.0, now - job.created_at) / aging_s)


def _arrival(job: Queued) -> tuple[float, str]:
    return job.created_at, job.id


class FairShare:
    """Per-team usage with exponential decay (half-life), plus the ordering."""

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        half_life_s: float = 3600.0,
        aging_s: float = 600.0,
        default_weight: float = 1.0,
    ) -> None:
        """`weights`: team -> share weight (> 0), others get `default_weight`. `half_life_s` (> 0, inf: no
        decay) is how fast usage is forgotten; `aging_s` the wait that raises a job by one level (<= 0: no
        aging)."""
        self._weights = {team: _positive(f"weight of team {team!r}", w) for team, w in (weights or {}).items()}
        self._default_weight = _positive("default_weight", default_weight)
        self.half_life_s = _positive("half_life_s", half_life_s, allow_inf=True)
        if not _is_number(aging_s) or math.isnan(aging_s):
            raise ValueError(f"aging_s must be a number, got {aging_s!r}")
        self.aging_s = float(aging_s)
        self._usage: dict[str, tuple[float, float]] = {}  # team -> (value, as_of)

    def weight(self, team: str) -> float:
        """The team's share weight."""
        return self._weights.get(team, self._default_weight)

    def _decayed(self, value: float, as_of: float, now: float) -> float:
        # Time never runs backwards here: a `now` before `as_of` (clock skew) sees the value undecayed.
        return value * 0.5 ** (max(0.0, now - as_of) / self.half_life_s)

    def usage(self, team: str, now: float) -> float:
        """The team's charged seconds, decayed to `now`."""
        if team not in self._usage:
            return 0.0
        value, as_of = self._usage[team]
        return self._decayed(value, as_of, _finite("now", now))

    def charge(self, team: str, cost: float, now: float) -> None:
        """Add `cost` seconds to the team's usage at `now` (decaying what was there first)."""
        if not _is_number(cost) or not math.isfinite(cost) or cost < 0:
            raise ValueError(f"charge to team {team!r}: cost must be a finite number >= 0, got {cost!r}")
        now = _finite("now", now)
        value, as_of = self._usage.get(team, (0.0, now))
        self._usage[team] = (self._decayed(value, as_of, now) + float(cost), max(as_of, now))

    def effective_priority(self, job: Queued, now: float) -> int:
        """`job.priority` plus one level per `aging_s` seconds waited."""
        return _aged(job, _finite("now", now), self.aging_s)

    def order(self, jobs: Sequence[Queued], now: float, limit: int | None = None) -> list[Queued]:
        """All `jobs`, in the order they should run: by effective priority (highest first), then by weighted
        fair queueing between teams within a level, each team's jobs by (created_at, id). Does not change
        usage. The merge costs O(n log t) for n jobs over t teams (after sorting each team's jobs).

        With `limit`, only the first `limit` of that order (exactly `order(jobs, now)[:limit]`), for the
        scheduler's cheap round: each team's head is then picked in O(n log limit) instead of sorted whole."""
        now = _finite("now", now)
        if limit is not None and limit <= 0:
            return []
        # `now` checked once, not once per job (a Queued's fields were checked when it was made): this pass runs
        # over the whole window every round, and the per-job checks were most of its cost.
        levels: dict[int, dict[str, list[Queued]]] = {}
        aging = self.aging_s
        for job in jobs:
            level = _aged(job, now, aging)
            teams_at = levels.get(level)
            if teams_at is None:
                teams_at = levels[level] = {}
            queue = teams_at.get(job.team)
            if queue is None:
                teams_at[job.team] = [job]
            else:
                queue.append(job)
        weights = {team: self.weight(team) for teams in levels.values() for team in teams}
        vtime = {team: self.usage(team, now) / weights[team] for team in weights}
        out: list[Queued] = []
        for level in sorted(levels, reverse=True):
            queues = levels[level]
            heap: list[tuple[float, float, str]] = []
            room = None if limit is None else limit - len(out)
            for team, queue in queues.items():
                if room is not None and len(queue) > room:
                    queue[:] = heapq.nsmallest(room, queue, key=_arrival)  # no job beyond can make the cut
                    queue.reverse()
                else:
                    queue.sort(key=_arrival, reverse=True)  # head at the end: pop() is O(1)
                heap.append((vtime[team], queue[-1].created_at, team))
            heapq.heapify(heap)
            while heap and (limit is None or len(out) < limit):
                _, _, team = heap[0]
                queue = queues[team]
                job = queue.pop()
                out.append(job)
                vtime[team] += job.cost / weights[team]
                if queue:
                    heapq.heapreplace(heap, (vtime[team], queue[-1].created_at, team))
                else:
                    heapq.heappop(heap)
            if limit is not None and len(out) >= limit:
                break
        return out

    def to_json(self) -> dict:
        """The usage state, JSON-serialisable: {"usage": {team: [value, as_of_time]}}."""
        return {"usage": {team: [value, as_of] for team, (value, as_of) in self._usage.items()}}

    def load_json(self, data: Mapping) -> None:
        """Replace the usage state with `to_json()` output; ValueError naming the bad field if malformed."""
        if not isinstance(data, Mapping):
            raise ValueError(f"fair-share state must be a mapping, got {type(data).__name__}")
        if "usage" not in data:
            raise ValueError("fair-share state: missing field 'usage'")
        usage = data["usage"]
        if not isinstance(usage, Mapping):
            raise ValueError(f"fair-share state: 'usage' must be a mapping, got {type(usage).__name__}")
        loaded: dict[str, tuple[float, float]] = {}
        for team, entry in usage.items():
            field = f"usage[{team!r}]"
            if not isinstance(team, str):
                raise ValueError(f"fair-share state: {field}: team must be a string")
            if not isinstance(entry, (list, tuple)) or len(entry) != 2:
                raise ValueError(f"fair-share state: {field} must be [value, as_of], got {entry!r}")
            value, as_of = entry
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"fair-share state: {field}[0] (value) must be a finite number >= 0, got {value!r}")
            if not _is_number(as_of) or not math.isfinite(as_of):
                raise ValueError(f"fair-share state: {field}[1] (as_of) must be a finite number, got {as_of!r}")
            loaded[team] = (float(value), float(as_of))
        self._usage = loaded
