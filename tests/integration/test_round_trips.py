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
        (lambda rnd, j: store.queue_complete(rnd, j, "n1", [f"file:///results/{j}-0.png"], {}, None), {}),
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


NODE = {"name": "rt", "vram_gib": 8, "compute_capability": "8.6", "gpu": "GeForce RTX 3070", "simulated": True}


def test_a_worker_starts_and_finishes_a_batch_in_two_requests(redis_url, store, tmp_path):
    """The worker's side of a job at batch 1: one request to start it, one to record it (the heartbeat and
    step progress go through a client of their own, counted apart)."""
    from renderfarm.actors.worker import RenderWorker
    from renderfarm.config import Settings
    from renderfarm.jobs import Job, JobSpec

    settings = Settings(data_dir=tmp_path, torch_threads=1, heartbeat_seconds=30)
    worker = RenderWorker("rt", redis_url, settings.model_dump(mode="json"), NODE)
    try:
        spec = JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64, steps=2, seed=1)
        jobs = [Job(id=f"rt{i}", spec=spec) for i in range(4)]
        store.submit(jobs, "b")
        worker.warm("tiny-sd15")
        costs = []
        for batch in (jobs[:1], jobs[1:2], jobs[2:]):  # batch 1, 1, then 2
            for job in batch:
                assert store.lease(job.id, "rt", 60)
            before = worker.store.round_trips
            out = worker.render([j.id for j in batch], [j.spec.model_dump(mode="json") for j in batch])
            assert out["done"] == [j.id for j in batch], out
            costs.append(worker.store.round_trips - before)
        # Start, then finish, whatever the batch's size; the first finish also taught this server the
        # measurement script (NOSCRIPT, load, the round again).
        assert costs == [4, 2, 2]
        job = store.get("rt0")
        assert job.state is JobState.DONE and job.images == 1 and job.profile
        assert store.run_deadline("rt0") is not None, "fixed when it started"
        record = {n["name"]: n for n in store.nodes()}["rt"]
        assert record["state"] == "idle" and record["current_job"] is None and record["jobs_done"] == 4
        assert record["redis_round_trips"] >= 6
        # Without the specs it reads them itself: one request more.
        store.submit([Job(id="rt9", spec=spec)], "b2")
        assert store.lease("rt9", "rt", 60)
        before = worker.store.round_trips
        assert worker.render(["rt9"])["done"] == ["rt9"]
        assert worker.store.round_trips - before == 3
    finally:
        worker.shutdown()


class _Handle:
    """An actor handle as the scheduler calls it (`handle.render.remote(...)`), with no Ray behind it."""

    def __init__(self):
        self.sent: list[tuple[list[str], list[dict]]] = []
        self.render = self

    def remote(self, job_ids, specs=None):
        self.sent.append((job_ids, specs))
        return object()


def test_a_dispatch_round_is_one_request_for_all_it_leases(redis_url, store, tmp_path, models_file):
    """The scheduler's side: once its view of the queue is read, each round that sends batches costs one
    request (leases, fair-share usage, events since), and new arrivals one more for all of them."""
    from renderfarm.jobs import Job, JobSpec
    from renderfarm.scheduler.scheduler import Scheduler

    settings = {"data_dir": str(tmp_path), "models_file": str(models_file), "max_batch": 1, "eta_seconds": 3600,
                "heartbeat_seconds": 3600, "sample_seconds": 3600}
    handle = _Handle()
    sched = Scheduler(redis_url, settings, workers={"n1": (handle, {"vram_gib": 24, "card": None, "loaded": []})})
    spec = JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64, steps=2)
    store.submit([Job(id=f"d{i}", spec=spec, created_at=1000.0 + i) for i in range(6)], "b")
    try:
        sched._dispatch()  # the first round reads the queue whole, and sends two batches (queue depth 2)
        assert [ids for ids, _ in handle.sent] == [["d0"], ["d1"]]
        assert handle.sent[0][1][0]["prompt"] == "a fox", "the spec travels with the batch"
        worker = sched.workers["n1"]
        for expected in (["d2"], ["d3"], ["d4"]):
            worker.inflight -= 1  # a batch came back
            before = sched.store.round_trips
            sched._dispatch()
            assert handle.sent[-1][0] == expected
            assert sched.store.round_trips - before == 1
        store.submit([Job(id=f"e{i}", spec=spec, created_at=2000.0 + i) for i in range(3)], "b2")
        worker.inflight -= 1
        sched._dispatch()  # this round's request reads the submit's events...
        worker.inflight -= 1
        before = sched.store.round_trips
        sched._dispatch()  # ...and the next reads the three new records together, then leases
        assert sched.store.round_trips - before == 2
        assert [ids for ids, _ in handle.sent][-2:] == [["d5"], ["e0"]]
        assert sched.dispatcher.view.counters == {"full_reads": 1, "arrivals_read": 3}
        assert store.redis.get(store.keys.fair_share), "the usage was saved with a round's leases"
    finally:
        sched.store.close()


def test_a_waiting_client_follows_only_the_moves_to_a_terminal_state(store):
    store.submit(make_jobs(2), "b")
    store.lease("j0", "n1", 60) and store.start("j0", "n1", 60) and store.complete("j0", "n1", ["file:///results/j0-0.png"], {}, None)
    store.cancel("j1")
    everything = [e.state for e in store.events(from_start=True).drain()]
    finished = [(e.job, e.state) for e in store.events(from_start=True, finished_only=True).drain()]
    assert everything.count(JobState.QUEUED) == 2 and JobState.RUNNING in everything
    assert finished == [("j0", JobState.DONE), ("j1", JobState.CANCELLED)]


def test_redis_py_sends_a_script_in_a_pipeline_with_a_request_of_its_own(store):
    """Why a Round sends EVALSHA by digest rather than a registered Script in a pipeline: redis-py's
    Pipeline.load_scripts asks SCRIPT EXISTS first, one more request per pipeline. Should a redis-py upgrade
    stop doing so, this fails and Round can go back to Script objects."""
    script = store.redis.register_script("return 1")
    script()  # known to the server now
    before = store.round_trips
    pipe = store.redis.pipeline(transaction=False)
    script(keys=[], args=[], client=pipe)
    assert pipe.execute() == [1]
    assert store.round_trips - before == 2


def test_the_counter_counts_a_connection_the_pool_already_held(redis_url):
    """The client `connect` returns has a connection in its pool already (its PING): the counter takes it over
    in place (redis-py's ConnectionPool._available_connections), so its first request is counted and no
    socket is left outside the pool."""
    from renderfarm.cluster.redis_server import connect

    client = connect(redis_url)
    try:
        held = list(client.connection_pool._available_connections)
        assert len(held) == 1
        trips = count_round_trips(client)
        assert type(held[0]).round_trips is trips
        client.get("rf-test:nothing")
        assert trips.value == 1
        assert client.connection_pool._available_connections == held, "the same connection, reused"
    finally:
        client.close()
