"""Chains in the store against a real redis-server: a waiting job is queued when its parents are done, failed or
cancelled with them (through the whole chain), refused at submit when a parent is unknown or already failed, and
brought back by a retry of the parent that ended it. Nothing of it is decided in Python: the scripts do it in
the move that finishes a parent (chain.lua)."""

import pytest

from renderfarm.cluster.store import ChainBlocked
from renderfarm.errors import SpecError
from renderfarm.jobs import Job, JobSpec, JobState

pytestmark = pytest.mark.integration


def job(job_id, after=(), **kw):
    spec = JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64, steps=2, after=tuple(after), **kw)
    return Job(id=job_id, spec=spec, created_at=1000.0 + len(job_id))


def finish(store, job_id, how="done", error="boom"):
    """Lease, start and finish `job_id` as a node would."""
    assert store.lease(job_id, "n1", 30)
    assert store.start(job_id, "n1", 30)
    if how == "done":
        assert store.complete(job_id, "n1", [f"file:///tmp/{job_id}.png"], {}, None)
    else:
        assert store.fail(job_id, error, node="n1")


def states(store, *ids):
    return [store.state(i).value for i in ids]


def test_a_chain_waits_outside_the_queue_and_runs_in_order(store):
    store.submit([job("a"), job("b", after=["a"]), job("c", after=["b"])], "batch")
    assert states(store, "a", "b", "c") == ["queued", "waiting", "waiting"]
    assert store.pending_ids() == ["a"]  # the scheduler never sees a waiting job
    assert store.counts()["waiting"] == 2
    assert store.waits_for(store.get_many(["b", "c"])) == {"b": [("a", "queued")], "c": [("b", "waiting")]}
    finish(store, "a")
    assert states(store, "b", "c") == ["queued", "waiting"]
    assert store.pending_ids() == ["b"]
    assert [q for q in store.queue_heads(10)] == ["b"]  # in its team queue too
    finish(store, "b")
    assert store.pending_ids() == ["c"]
    finish(store, "c")
    assert store.counts()["done"] == 3


def test_a_job_waits_for_all_its_parents(store):
    store.submit([job("p1"), job("p2"), job("kid", after=["p1", "p2"])], "b")
    finish(store, "p1")
    assert store.state("kid") is JobState.WAITING
    assert store.waits_for([store.get("kid")]) == {"kid": [("p2", "queued")]}
    finish(store, "p2")
    assert store.state("kid") is JobState.QUEUED


def test_a_failed_parent_fails_its_whole_chain_with_the_reason(store):
    store.submit([job("a"), job("b", after=["a"]), job("c", after=["b"]), job("other")], "b")
    finish(store, "a", how="fail", error="CUDA error: device-side assert")
    b, c = store.get("b"), store.get("c")
    assert b.state is JobState.FAILED and "job a it waits for failed: CUDA error" in b.error and b.blocked_by == "a"
    assert c.state is JobState.FAILED and "job b it waits for failed" in c.error and c.blocked_by == "b"
    assert store.state("other") is JobState.QUEUED
    # each end is on the stream of finished moves (what clients and webhooks follow)
    finished = [(e.job, e.state) for e in store.events(from_start=True, finished_only=True).read(count=100)]
    assert ("b", JobState.FAILED) in finished and ("c", JobState.FAILED) in finished


def test_a_cancelled_parent_cancels_its_chain_even_while_waiting(store):
    store.submit([job("a"), job("b", after=["a"]), job("c", after=["b"])], "b")
    store.cancel("b")  # a waiting job can be cancelled: its children go with it, its parent runs on
    assert states(store, "a", "b", "c") == ["queued", "cancelled", "cancelled"]
    assert "job b it waits for was cancelled" in store.get("c").error


def test_unknown_or_failed_parents_are_refused_with_nothing_written(store):
    store.submit([job("dead")], "b0")
    finish(store, "dead", how="fail")
    before = store.redis.dbsize()
    with pytest.raises(SpecError, match="job kid: after: job nope does not exist; nothing was enqueued"):
        store.submit([job("ok"), job("kid", after=["nope"])], "b1")
    with pytest.raises(SpecError, match="after: job dead is failed: retry it first"):
        store.submit([job("ok"), job("kid", after=["dead"])], "b2")
    assert store.redis.dbsize() == before
    assert store.get_many(["ok", "kid"]) == [None, None]


def test_a_done_parent_does_not_hold_a_job(store):
    store.submit([job("a")], "b0")
    finish(store, "a")
    store.submit([job("b", after=["a"])], "b1")
    assert store.state("b") is JobState.QUEUED


def test_resubmitting_a_chain_is_idempotent(store):
    chain = [job("a"), job("b", after=["a"])]
    assert store.submit(chain, "b") == [True, True]
    assert store.submit(chain, "b") == [False, False]
    assert states(store, "a", "b") == ["queued", "waiting"]
    assert store.redis.smembers(store.keys.children("a")) == {b"b"}


def test_retrying_the_parent_brings_its_chain_back(store):
    store.submit([job("a"), job("b", after=["a"]), job("c", after=["b"])], "b")
    finish(store, "a", how="fail")
    with pytest.raises(ChainBlocked, match="job a it waits for is failed: retry a"):
        store.retry("b")
    assert store.retry("a") is JobState.FAILED
    assert states(store, "a", "b", "c") == ["queued", "waiting", "waiting"]
    assert store.get("b").error is None and store.get("b").blocked_by is None
    finish(store, "a")
    finish(store, "b")
    finish(store, "c")


def test_retrying_a_cancelled_child_waits_for_its_running_parent(store):
    store.submit([job("a"), job("b", after=["a"])], "b")
    store.cancel("b")
    assert store.lease("a", "n1", 30)
    assert store.retry("b") is JobState.CANCELLED
    assert store.state("b") is JobState.WAITING
    assert store.start("a", "n1", 30) and store.complete("a", "n1", ["file:///tmp/a.png"], {}, None)
    assert store.state("b") is JobState.QUEUED


def test_settle_catches_a_job_whose_parent_finished_unseen(store):
    """A waiting job whose parent finished without settling it (here: the parent's children set lost, as after a
    partial restore) is settled by the reconciling's pass over the waiting index."""
    store.submit([job("a"), job("b", after=["a"]), job("x"), job("y", after=["x"])], "b")
    store.redis.delete(store.keys.children("a"), store.keys.children("x"))
    finish(store, "a")
    finish(store, "x", how="fail")
    assert states(store, "b", "y") == ["waiting", "waiting"]
    assert store.settle_waiting() == (2, 0)
    assert states(store, "b", "y") == ["queued", "failed"]
    assert store.pending_ids() == ["b"]


def test_the_reconciler_accepts_waiting_jobs(store):
    store.submit([job("a"), job("b", after=["a"])], "b")
    report = store.reconcile()
    assert (report.moved, report.quarantined) == (0, 0)
