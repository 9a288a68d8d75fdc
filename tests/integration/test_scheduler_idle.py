"""With no room anywhere and nothing in flight (every node drained, dead or gone), the scheduler sleeps until
something changes. It used to spin: ~87% of a core and ~218,000 loops a second on a 2-core node. The count of
rounds is what is asserted here (a wake-up count, not a speed); bench/scheduler_idle.py prints the CPU."""

from __future__ import annotations

import time

import pytest

from renderfarm.jobs import Job, JobSpec
from tests.helpers import rayless_scheduler, wait_until

pytestmark = pytest.mark.integration


def test_no_room_and_nothing_in_flight_sleeps_instead_of_spinning(store, redis_url, tmp_path, models_file):
    from renderfarm.scheduler.scheduler import IDLE_WAKE_SECONDS

    store.submit([Job(id=f"j{i}", spec=JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64))
                  for i in range(100)], "b")
    sched = rayless_scheduler(redis_url, {"data_dir": str(tmp_path), "models_file": str(models_file)})
    sched.workers["n1"].inflight, sched.workers["n1"].draining = 0, True  # no room anywhere, and nothing sent
    sched.start()
    try:
        time.sleep(0.5)
        before, started = sched.stats()["loops"], time.monotonic()
        time.sleep(2.0)
        rounds = sched.stats()["loops"] - before
        elapsed = time.monotonic() - started
        assert rounds <= elapsed / IDLE_WAKE_SECONDS + 5, f"{rounds} rounds in {elapsed:.1f} s: it spins"
        # A change still wakes it at once: a submit is an event.
        woke = sched.stats()["loops"]
        store.submit([Job(id="late", spec=JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64))], "c")
        wait_until(lambda: sched.stats()["loops"] > woke, 2, "a round after the submit")
    finally:
        sched.stop()
        sched.join(10)
