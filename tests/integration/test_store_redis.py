"""The store against a real redis-server: atomic moves, idempotent submit, exactly-once results."""

import json

import pytest

from renderfarm.cluster.store import JobNotFound, Store
from renderfarm.jobs import IllegalTransition, Job, JobSpec, JobState

pytestmark = pytest.mark.integration


def make_jobs(n, prefix="j", **kw):
    spec = JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64, steps=2, **kw)
    return [Job(id=f"{prefix}{i}", spec=spec, created_at=1000.0 + i) for i in range(n)]


def test_submit_is_idempotent_by_job_id(store):
    jobs = make_jobs(3)
    assert store.submit(jobs, "b1") == [True, True, True]
    assert store.submit(jobs, "b1") == [False, False, False]
    assert store.counts()["queued"] == 3
    assert store.batch_ids("b1") == ["j0", "j1", "j2"]
    # every hash value is plain text or JSON, never a pickle
    raw = store.redis.hgetall(store.keys.job("j0"))
    assert JobSpec.model_validate_json(raw[b"spec"]).prompt == "a fox"
    assert json.loads(raw[b"timings"]) == {}


def test_queue_order_is_priority_then_submit_time(store):
    low = make_jobs(2, prefix="low")
    high = make_jobs(1, prefix="high", priority=5)
    store.submit(low, "b")
    store.submit(high, "b")
    assert store.pending_ids() == ["high0", "low0", "low1"]
    assert store.position("low1") == 2


def test_lifecycle_moves_indexes_in_one_step(store):
    store.submit(make_jobs(1), "b")
    assert store.lease("j0", "n1", 600)
    assert store.counts()["leased"] == 1 and store.counts()["queued"] == 0
    assert not store.lease("j0", "n2", 600), "a leased job cannot be leased again"
    assert not store.start("j0", "n2", 600), "only the holder may start it"
    assert store.start("j0", "n1", 600)
    assert store.complete("j0", "n1", [b"\x89PNG-a", b"\x89PNG-b"], {"decode_s": 0.1}, 3.5, 60)
    job = store.get("j0")
    assert (job.state, job.attempts, job.images, job.timings) == (JobState.DONE, 1, 2, {"decode_s": 0.1})
    assert store.result_images("j0") == [b"\x89PNG-a", b"\x89PNG-b"]
    assert 0 < store.redis.ttl(store.keys.result("j0")) <= 60
    counts = store.counts()
    assert counts["done"] == 1 and sum(counts.values()) == 1


def test_completion_is_exactly_once_and_late_results_are_discarded(store):
    store.submit(make_jobs(2), "b")
    for j in ("j0", "j1"):
        store.lease(j, "n1", 600)
        store.start(j, "n1", 600)
    assert store.complete("j0", "n1", [b"first"], {}, None, 60)
    assert not store.complete("j0", "n1", [b"second"], {}, None, 60)
    assert store.result_images("j0") == [b"first"]
    # cancelled while rendering: the render's result is thrown away
    assert store.cancel("j1") is JobState.RUNNING
    assert not store.complete("j1", "n1", [b"late"], {}, None, 60)
    assert store.result_images("j1") == [] and store.state("j1") is JobState.CANCELLED


def test_requeue_returns_to_original_place_and_illegal_moves_raise(store):
    store.submit(make_jobs(3), "b")
    store.lease("j0", "n1", 600)
    assert store.requeue("j0", "node died", node="n1")
    assert store.pending_ids() == ["j0", "j1", "j2"]
    job = store.get("j0")
    assert job.attempts == 1 and job.error == "node died" and job.node is None
    with pytest.raises(IllegalTransition, match="queued -> done"):
        store.transition("j0", JobState.DONE)
    with pytest.raises(JobNotFound):
        store.transition("nope", JobState.LEASED)


def test_every_state_change_is_on_the_event_stream(store):
    store.submit(make_jobs(1), "b")
    store.lease("j0", "n1", 600)
    store.start("j0", "n1", 600)
    store.fail("j0", "boom", node="n1")
    states = [f[b"state"].decode() for _, f in store.redis.xrange(store.keys.events) if f[b"job"] == b"j0"]
    assert states == ["queued", "leased", "running", "failed"]


def test_refuses_a_decoding_client(redis_url):
    import redis

    with pytest.raises(ValueError, match="decode_responses=False"):
        Store(redis.Redis.from_url(redis_url, decode_responses=True))
