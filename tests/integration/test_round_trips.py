"""Round trips to Redis, counted on a real redis-server: a round of many state changes is one request, and
survives a server that has forgotten its scripts (issue 16)."""

import pytest

from renderfarm.cluster.round_trips import count_round_trips
from renderfarm.jobs import JobState
from tests.integration.test_store_redis import make_jobs

pytestmark = pytest.mark.integration


def test_the_counter_counts_requests_not_commands(store):
    store.redis.ping()  # a new connection's handshake (CLIENT SETINFO...) is counted too: done with first
    before = store.round_trips
    store.redis.set("rf-test:a", "1")
    pipe = store.redis.pipeline(transaction=False)
    for i in range(10):
        pipe.set(f"rf-test:{i}", i)
    pipe.execute()
    assert store.round_trips - before == 2, "one command and one pipeline of ten"
    assert count_round_trips(store.redis) is store.trips, "counting twice does not count each request twice"


def test_a_round_leases_starts_and_completes_many_jobs_in_one_request_each(store):
    store.submit(make_jobs(8), "b")
    ids = [f"j{i}" for i in range(8)]
    store.lease(ids[0], "warm-up", 60)  # the transition script is now known to the server
    store.requeue(ids[0], "warm-up", allowed_from=[JobState.LEASED])

    for queue, extra in (
        (lambda rnd, j: store.queue_lease(rnd, j, "n1", 60), {}),
        (lambda rnd, j: store.queue_start(rnd, j, "n1", 60, run_seconds=120), {}),
        (lambda rnd, j: store.queue_complete(rnd, j, "n1", [b"png"], {}, None, 60), {}),
    ):
        rnd = store.round()
        outcomes = [queue(rnd, j) for j in ids]
        store.queue_update_node(rnd, "n1", state="busy", **extra)
        before = store.round_trips
        rnd.run()
        assert store.round_trips - before == 1
        assert [o() for o in outcomes] == [True] * 8
    assert store.counts()["done"] == 8
    assert all(store.get(j).attempts == 2 if j == "j0" else store.get(j).attempts == 1 for j in ids)


def test_start_fixes_the_run_deadline_by_redis_clock(store):
    store.submit(make_jobs(1), "b")
    store.lease("j0", "n1", 60)
    now = float(store.redis.time()[0])
    assert store.start("j0", "n1", 60, run_seconds=100)
    deadline = store.run_deadline("j0")
    assert deadline is not None and now + 99 <= deadline <= now + 102
    # A renewal keeps it: the lease never runs past it.
    assert store.renew(["j0"], "n1", 1000, timeout_seconds=5) == [True]
    assert store.run_deadline("j0") == deadline
    assert store.redis.zscore(store.keys.index(JobState.RUNNING), "j0") == pytest.approx(deadline, abs=1e-3)


def test_refused_moves_in_a_round_answer_false_and_the_others_still_happen(store):
    store.submit(make_jobs(3), "b")
    store.cancel("j1")
    rnd = store.round()
    outcomes = [store.queue_lease(rnd, j, "n1", 60) for j in ("j0", "j1", "j2", "nope")]
    rnd.run()
    assert [o() for o in outcomes] == [True, False, True, False]
    assert store.state("j1") is JobState.CANCELLED


def test_a_round_teaches_a_restarted_server_its_scripts_and_moves_once(store):
    store.submit(make_jobs(2), "b")
    store.redis.script_flush()  # what a restarted (or new) Redis knows: no scripts
    rnd = store.round()
    outcomes = [store.queue_lease(rnd, j, "n1", 60) for j in ("j0", "j1")]
    before = store.round_trips
    rnd.run()
    assert [o() for o in outcomes] == [True, True]
    assert store.round_trips - before == 3, "the round, loading the script, the round again"
    assert [store.get(j).attempts for j in ("j0", "j1")] == [1, 1], "no job was leased twice"
