"""The scheduler's control loop and worker table as plain Python: no Redis, no Ray (the store and the Ray
calls are small fakes; the logic under test is real)."""

from __future__ import annotations

import logging
import sys
import threading
import time

import pytest

from renderfarm.config import Settings
from renderfarm.scheduler.managers import MembershipManager, SchedulerState, update_each
from renderfarm.scheduler.workers import WorkerTable, worker_from_info


class NewNodes:
    """A store whose node records show a few workers that just joined, new ones at every read."""

    def __init__(self, per_read: int = 5):
        self.per_read = per_read
        self.joined = 0

    def nodes(self) -> list[dict]:
        now = time.time()
        records = [{"name": f"joined-{self.joined + i}", "actor": f"rf-worker-joined-{self.joined + i}",
                    "heartbeat": now, "state": "idle", "vram_gib": 8, "loaded": ["tiny-sd15"]}
                   for i in range(self.per_read)]
        self.joined += self.per_read
        return records


class FindsEveryActor:
    def find(self, actor_name: str) -> object:
        return object()


def test_stats_is_safe_while_the_loop_adopts_workers(tmp_path):
    # Before the table had a lock, this failed within a second: "dictionary changed size during iteration".
    table = WorkerTable({f"n{i}": worker_from_info(f"n{i}", None, {"vram_gib": 8, "loaded": ["a", "b"]})
                         for i in range(50)})
    store = NewNodes()
    counters = {"joined": 0}
    state = SchedulerState(Settings(data_dir=tmp_path), store, table, counters)  # type: ignore[arg-type]
    membership = MembershipManager(state, FindsEveryActor())  # type: ignore[arg-type]
    errors: list[BaseException] = []
    reads = 0
    done = threading.Event()

    def read_stats() -> None:  # what `Scheduler.stats` does from another thread of the actor
        nonlocal reads
        while not done.is_set():
            try:
                table.stats(time.time())
                reads += 1
            except Exception as exc:  # noqa: BLE001 - any failure, not only the race's RuntimeError
                errors.append(exc)
                return

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, so a race shows at once
    reader = threading.Thread(target=read_stats)
    reader.start()
    try:
        # Enough adoptions to have shown the race (it failed within a second before the lock), however slow
        # the machine: at least 1.5 s and 150 workers joined, at most 20 s.
        started = time.monotonic()
        while not errors and time.monotonic() - started < 20 and (
                time.monotonic() - started < 1.5 or store.joined <= 150):
            membership.next_due = 0.0
            membership.update()
    finally:
        done.set()
        reader.join()
        sys.setswitchinterval(interval)
    assert not errors, f"stats() failed while workers joined: {errors[0]!r}"
    assert counters["joined"] == store.joined and len(table) == 50 + store.joined
    assert reads > 0 and store.joined > 150


def test_the_worker_table_iterates_over_a_snapshot():
    table = WorkerTable({"a": worker_from_info("a", None, {"vram_gib": 8})})
    for worker in table.values():
        table.put(worker_from_info("b", None, {"vram_gib": 8}))  # would break iteration over the dict itself
    assert table.names() == ["a", "b"] and "b" in table and table.get("c") is None
    assert table.stats(0.0)["a"] == {"alive": True, "draining": False, "suspect": False, "failures": 0,
                                     "inflight": 0, "loaded": [], "backlog_s": 0.0}


class Step:
    def __init__(self, fails: bool = False):
        self.fails = fails
        self.calls = 0

    def update(self) -> None:
        self.calls += 1
        if self.fails:
            raise ConnectionError("redis went away")


def test_one_failing_manager_does_not_stop_the_others_round(caplog):
    leases, membership, dispatch, sampling = Step(), Step(fails=True), Step(), Step()
    steps = {"leases": leases.update, "membership": membership.update, "dispatch": dispatch.update,
             "sampling": sampling.update}
    failures = dict.fromkeys(steps, 0)
    with caplog.at_level(logging.ERROR, logger="renderfarm.scheduler.managers"):
        assert update_each(steps, failures) is False
    assert [s.calls for s in (leases, membership, dispatch, sampling)] == [1, 1, 1, 1]
    assert failures == {"leases": 0, "membership": 1, "dispatch": 0, "sampling": 0}
    [record] = caplog.records
    assert "membership update failed" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ConnectionError, "logged with its traceback"

    membership.fails = False
    assert update_each(steps, failures) is True
    assert [s.calls for s in (leases, membership, dispatch, sampling)] == [2, 2, 2, 2]
    assert failures["membership"] == 1


def test_a_manager_failing_every_round_is_counted_every_round():
    first, second = Step(fails=True), Step()
    failures: dict[str, int] = {}
    for _ in range(3):
        update_each({"first": first.update, "second": second.update}, failures)
    assert failures == {"first": 3} and second.calls == 3


def test_an_interrupt_is_not_swallowed():
    def stop() -> None:
        raise KeyboardInterrupt

    after = Step()
    with pytest.raises(KeyboardInterrupt):
        update_each({"stop": stop, "after": after.update}, {})
    assert after.calls == 0


def test_a_suspect_worker_holding_nothing_gets_one_batch_as_a_probe():
    """After a restart a rejoining node whose old leases expired is suspect; it must not wait forever for a
    batch that nobody sends (15 jobs queued, both nodes idle)."""
    from renderfarm.scheduler.workers import Worker

    worker = Worker("n1", None, suspect=True)
    assert worker.has_room(2), "nothing held: one batch as a probe"
    worker.inflight = 1
    assert not worker.has_room(2), "one probe at a time"
    worker.inflight, worker.recovered = 0, {"j1"}
    assert not worker.has_room(2), "still holding a recovered job"
    worker.recovered, worker.suspect = set(), False
    worker.inflight = 1
    assert worker.has_room(2)
