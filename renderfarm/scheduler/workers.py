"""The scheduler's table of workers: what it knows of each node, shared by its managers.

The loop thread is the only writer; `stats()` reads the table from other threads (the scheduler actor runs
with max_concurrency > 1), so whatever changes the table's size or a set that `stats` iterates does so under
`lock`, and readers take it too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from renderfarm.planning.devices import Device, device_from_record


@dataclass
class Worker:
    name: str
    handle: Any  # handle.WorkerHandle (None in tests that never call a worker)
    loaded: set[str]
    device: Device | None = None  # its card, for fit checks
    alive: bool = True
    draining: bool = False  # finishes what it holds, takes nothing new (`renderfarm drain`, the dashboard)
    suspect: bool = False  # a lease of its expired (hung?): no new work, no renewals, until a batch returns
    failures: int = 0  # batches failed in a row by the node's fault (renderfarm/faults.py)
    fault_reasons: list[str] = field(default_factory=list)  # why each of those failed, oldest first
    inflight: int = 0  # batches sent and not yet returned
    recovered: set[str] = field(default_factory=set)  # jobs it was rendering when this scheduler started
    pid: int | None = None  # its process: a record with another pid is a new worker of the same name
    silent: bool = False  # taken out because its heartbeat went stale (not because Ray reported it dead)
    forbidden: frozenset[str] = frozenset()  # node overrides: models never sent here,
    max_batch: int | None = None  # and the most images per call
    busy_until: float = 0.0  # epoch seconds its sent batches are expected to be done
    estimates: dict[Any, float] = field(default_factory=dict)  # batch ref -> its estimated seconds

    def backlog(self, now: float) -> float:
        return max(0.0, self.busy_until - now)

    def has_room(self, queue_depth: int) -> bool:
        """Alive, not draining, with fewer batches queued than a worker may hold. A suspect (a lease of its
        expired) holding nothing gets one batch as a probe: its answer clears the suspicion, and a node that
        rejoined after a restart is not left idle forever waiting for a batch nobody sends."""
        held = self.inflight + (1 if self.recovered else 0)
        probe = self.suspect and held == 0
        return self.alive and not self.draining and (not self.suspect or probe) and held < queue_depth


def worker_from_info(name: str, handle: Any, info: dict[str, Any]) -> Worker:
    """A worker as its ready() info or its node record describes it (card, loaded models, overrides). A card
    that does not describe a device raises CorruptRecord (see `device_from_record`)."""
    forbid = info.get("forbid_models")
    max_batch = info.get("max_batch")
    loaded = info.get("loaded")
    return Worker(
        name, handle, {m for m in loaded if isinstance(m, str)} if isinstance(loaded, list) else set(),
        device_from_record(info),
        pid=info.get("pid") if isinstance(info.get("pid"), int) else None,
        forbidden=frozenset(m for m in forbid if isinstance(m, str)) if isinstance(forbid, list) else frozenset(),
        max_batch=max_batch if isinstance(max_batch, int) and max_batch >= 1 else None,
    )


class WorkerTable:
    """Workers by name. Reads of one entry need no lock (a dict lookup is atomic); iteration returns a
    snapshot taken under the lock, so a worker adopted meanwhile never breaks an iteration in progress."""

    def __init__(self, workers: dict[str, Worker] | None = None):
        self.lock = threading.RLock()
        self._workers: dict[str, Worker] = dict(workers or {})

    def __getitem__(self, name: str) -> Worker:
        return self._workers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._workers

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> Worker | None:
        return self._workers.get(name)

    def names(self) -> list[str]:
        with self.lock:
            return list(self._workers)

    def values(self) -> list[Worker]:
        with self.lock:
            return list(self._workers.values())

    def put(self, worker: Worker) -> None:
        """Add a worker, or replace the one of the same name (a worker that rejoined is a new object)."""
        with self.lock:
            self._workers[worker.name] = worker

    def add_loaded(self, worker: Worker, model: str) -> None:
        with self.lock:  # `stats` may be sorting this very set in another thread
            worker.loaded.add(model)

    def stats(self, now: float) -> dict[str, dict[str, Any]]:
        """Each worker's state for `Scheduler.stats`, safe to call from any thread."""
        with self.lock:
            return {w.name: {"alive": w.alive, "draining": w.draining, "suspect": w.suspect,
                             "failures": w.failures, "inflight": w.inflight,
                             "loaded": sorted(w.loaded),
                             "backlog_s": round(w.backlog(now), 3)}
                    for w in self._workers.values()}
