"""The store against a real redis-server: atomic moves, idempotent submit, exactly-once results."""

import json

import pytest

from renderfarm.cluster.store import Store
from renderfarm.errors import JobNotFound
from renderfarm.jobs import IllegalTransition, Job, JobSpec, JobState
from tests.helpers import pngs_of, put_pngs

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


def test_lifecycle_moves_indexes_in_one_step(store, tmp_path):
    store.submit(make_jobs(1), "b")
    assert store.lease("j0", "n1", 600)
    assert store.counts()["leased"] == 1 and store.counts()["queued"] == 0
    assert not store.lease("j0", "n2", 600), "a leased job cannot be leased again"
    assert not store.start("j0", "n2", 600), "only the holder may start it"
    assert store.start("j0", "n1", 600)
    urls = put_pngs(tmp_path, "j0", [b"\x89PNG-a", b"\x89PNG-b"])
    assert store.complete("j0", "n1", urls, {"decode_s": 0.1}, 3.5)
    job = store.get("j0")
    assert (job.state, job.attempts, job.images, job.timings) == (JobState.DONE, 1, 2, {"decode_s": 0.1})
    assert pngs_of(store, "j0") == [b"\x89PNG-a", b"\x89PNG-b"]
    assert store.result_blobs("j0") == urls and not store.redis.exists(store.keys.result("j0")), \
        "Redis keeps the URLs, not the images"
    counts = store.counts()
    assert counts["done"] == 1 and sum(counts.values()) == 1


def test_completion_is_exactly_once_and_late_results_are_discarded(store, tmp_path):
    store.submit(make_jobs(2), "b")
    for j in ("j0", "j1"):
        store.lease(j, "n1", 600)
        store.start(j, "n1", 600)
    assert store.complete("j0", "n1", put_pngs(tmp_path, "j0", [b"first"]), {}, None)
    assert not store.complete("j0", "n1", put_pngs(tmp_path, "j0", [b"second"]), {}, None)
    assert pngs_of(store, "j0") == [b"first"]
    # cancelled while rendering: the render's result is thrown away
    assert store.cancel("j1") is JobState.RUNNING
    assert not store.complete("j1", "n1", put_pngs(tmp_path, "j1", [b"late"]), {}, None)
    assert store.result_blobs("j1") is None and store.state("j1") is JobState.CANCELLED


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
    states = [e.state.value for e in store.events(from_start=True).drain() if e.job == "j0"]
    assert states == ["queued", "leased", "running", "failed"]


def test_refuses_a_decoding_client(redis_url):
    import redis

    with pytest.raises(ValueError, match="decode_responses=False"):
        Store(redis.Redis.from_url(redis_url, decode_responses=True))


def test_event_cursor_follows_from_now_and_survives_a_malformed_entry(store):
    store.submit(make_jobs(1), "b")
    cursor = store.events()  # from now: the submit above is behind it
    assert cursor.read() == []
    store.redis.xadd(store.keys.events, {"job": "j0", "ts": "x"})  # no state: written by hand or by a bug
    store.lease("j0", "n1", 600)
    events = cursor.read(block_s=1.0)
    assert [(e.job, e.state) for e in events] == [("j0", None), ("j0", JobState.LEASED)]
    assert events[0].ts is None and events[1].node == "n1"
    assert cursor.read(block_s=0.05) == []  # nothing new: waits, then returns empty
    assert [e.state for e in store.events(from_start=True).drain()] == [JobState.QUEUED, None, JobState.LEASED]


class _LosesOneEvalReply:
    """A redis-py connection whose first EVALSHA reply is lost after Redis ran the script (the connection
    drops on the way back), as on a flaky network: redis-py's retry then sends the same script again."""

    armed = False


def _reply_losing_client(redis_url):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    class Connection(redis.Connection):
        def send_command(self, *args, **kwargs):
            self._evalsha = bool(args) and str(args[0]).upper() == "EVALSHA"
            return super().send_command(*args, **kwargs)

        def read_response(self, *args, **kwargs):
            reply = super().read_response(*args, **kwargs)
            if getattr(self, "_evalsha", False) and _LosesOneEvalReply.armed:
                _LosesOneEvalReply.armed = False
                self.disconnect()
                raise redis.ConnectionError("reply lost on the way back (test)")
            return reply

    return redis.Redis.from_url(redis_url, connection_class=Connection, retry=Retry(NoBackoff(), 3))


@pytest.mark.parametrize("move", ["lease", "start", "complete", "cancel"])
def test_a_state_change_whose_reply_is_lost_is_not_reported_as_refused(redis_client, redis_url, move):
    client = _reply_losing_client(redis_url)
    try:
        store = Store(client)
        store.submit(make_jobs(1), "b")
        if move in ("start", "complete"):
            assert store.lease("j0", "n1", 600)
        if move == "complete":
            assert store.start("j0", "n1", 600)
        _LosesOneEvalReply.armed = True
        if move == "lease":
            assert store.lease("j0", "n1", 600) is True
        elif move == "start":
            assert store.start("j0", "n1", 600) is True
        elif move == "complete":
            assert store.complete("j0", "n1", ["file:///results/j0-0.png"], {}, None) is True
            assert store.counters().get("late_results", 0) == 0
        else:
            assert store.cancel("j0") is JobState.QUEUED  # the state it left, as the first run saw it
        assert _LosesOneEvalReply.armed is False  # the reply really was lost, and the script ran again
        job = store.get("j0")
        assert job.attempts == (0 if move == "cancel" else 1)  # the re-run applied nothing twice
        states = [e.state for e in store.events(from_start=True).drain() if e.job == "j0"]
        assert len(states) == len(set(states))  # one event per move
    finally:
        client.close()


def test_the_store_leaves_its_clients_retry_policy_alone(redis_url):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    mine = Retry(NoBackoff(), 2)
    client = redis.Redis.from_url(redis_url, retry=mine)
    try:
        Store(client)
        assert client.get_connection_kwargs()["retry"] is not None
        assert client.get_connection_kwargs()["retry"].get_retries() == 2
    finally:
        client.close()


def test_settings_give_a_client_the_farm_retry_policy_after_it_connects(redis_url):
    """RedisSettings.client(): an unreachable server is reported at once (the PING is not retried), and a
    connected client rides out a restart (its commands are retried)."""
    import time

    from renderfarm.cluster.processes import free_port
    from renderfarm.cluster.redis_settings import RETRY_ATTEMPTS, RedisSettings
    from renderfarm.errors import RedisUnavailable

    client = RedisSettings.from_url(redis_url).client()
    try:
        assert client.get_connection_kwargs()["retry"].get_retries() == RETRY_ATTEMPTS
    finally:
        client.close()
    started = time.monotonic()
    with pytest.raises(RedisUnavailable):
        RedisSettings.from_url(f"redis://127.0.0.1:{free_port()}/0").client()
    assert time.monotonic() - started < 5
