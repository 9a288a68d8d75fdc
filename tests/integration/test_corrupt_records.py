"""Corrupt records planted by hand in a real redis-server (no Ray): every state-changing script checks before
it writes (Redis does not roll a script back), so a bad record is quarantined whole and never lost half-way;
the indexes are reconciled against the job hashes; a malformed node, event, calibration or sample record is
skipped and counted wherever it is read."""

from __future__ import annotations

import json
import threading
import time

import pytest

from renderfarm.errors import CorruptRecord
from renderfarm.jobs import Job, JobSpec, JobState
from renderfarm.planning.devices import device_from_spec

pytestmark = pytest.mark.integration

CARD = device_from_spec("NVIDIA GeForce RTX 3070", 8, "8.6")


def put(store, *job_ids: str, team: str = "default") -> None:
    spec = JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64, steps=2, team=team)
    store.submit([Job(id=j, spec=spec, created_at=time.time()) for j in job_ids], "b")


def members(store, key: str) -> set[str]:
    return {m.decode() for m in store.redis.zrange(key, 0, -1)}


def everywhere(store, job_id: str) -> set[str]:
    """Every index and team queue that lists `job_id`."""
    keys = store.keys.all_indexes() + [q.decode() for q in store.redis.smembers(store.keys.queues)]
    return {key for key in keys if store.redis.type(key) == b"zset" and store.redis.zscore(key, job_id) is not None}


def assert_quarantined(store, job_id: str, why: str, kept: bool = True) -> None:
    reason = store.quarantined()[job_id]
    assert why in reason, reason
    assert everywhere(store, job_id) == set(), "a quarantined job is in no index"
    assert store.redis.exists(store.keys.quarantined(job_id)) == kept, "its record (if any) is kept aside for a human"
    with pytest.raises(CorruptRecord, match="quarantined"):
        store.get(job_id)


# --- every script checks before it writes -------------------------------------------------------------------


def test_a_requeue_of_a_running_job_with_a_bad_score_loses_no_job(store, redis_url):
    put(store, "j")
    assert store.lease("j", "n1", 30) and store.start("j", "n1", 30)
    store.redis.hset(store.keys.job("j"), "score", "not-a-number")
    # Before: the script took the id out of rf:running, then failed on the score: the job was in no index.
    assert not store.requeue("j", "lease expired", node="n1")
    assert_quarantined(store, "j", "score")
    assert store.redis.hget(store.keys.quarantined("j"), "state") == b"running", "kept as it was"
    assert store.counters()["quarantined"] == 1
    # `renderfarm status j` asks the client for the job: it says quarantined, and why (not "no such job").
    from renderfarm.client import FarmClient

    client = FarmClient(redis_url)
    try:
        with pytest.raises(CorruptRecord, match="quarantined.*score"):
            client.jobs(["j"])
        with pytest.raises(CorruptRecord, match="quarantined"):
            client.job("j")
    finally:
        client.store.close()


def test_a_lease_of_a_job_with_bad_attempts_quarantines_it_whole(store):
    put(store, "j")
    store.redis.hset(store.keys.job("j"), "attempts", "x")
    # Before: the job was moved to leased and its state written, then HINCRBY failed: a lease nobody holds.
    assert not store.lease("j", "n1", 30)
    assert_quarantined(store, "j", "attempts")
    assert store.redis.hget(store.keys.quarantined("j"), "state") == b"queued"


def test_a_requeue_with_a_bad_created_at_quarantines_it_whole(store):
    put(store, "j")
    assert store.lease("j", "n1", 30)
    store.redis.hset(store.keys.job("j"), "created_at", "yesterday")
    assert not store.requeue("j", "again", node="n1")
    assert_quarantined(store, "j", "created_at")


def test_a_farm_key_of_the_wrong_type_refuses_the_move_and_writes_nothing(store):
    put(store, "j")
    store.redis.delete(store.keys.events)
    store.redis.set(store.keys.events, "not a stream")
    # Before: the job was leased in full, then XADD failed: a move made and reported as an error.
    with pytest.raises(CorruptRecord, match="not a stream"):
        store.transition("j", JobState.LEASED, score="+30", fields={"node": "n1"})
    assert store.state("j") is JobState.QUEUED and everywhere(store, "j") == {
        store.keys.pending, store.keys.queue("default", 0)}
    assert store.quarantined() == {}, "nobody's job is at fault"


def test_a_batch_is_checked_whole_before_any_job_is_written(store):
    store.redis.set(store.keys.queue("default", 0), "not a queue")
    # Before: the first job's hash and pending entry were written, then its queue ZADD failed.
    with pytest.raises(CorruptRecord, match="not enqueued"):
        put(store, "a", "b")
    assert not store.redis.exists(store.keys.job("a")) and store.pending_ids() == []


def test_renew_checks_every_record_before_it_renews_any(store):
    put(store, "a", "b")
    for j in ("a", "b"):
        assert store.lease(j, "n1", 30) and store.start(j, "n1", 30)
    store.redis.hdel(store.keys.job("b"), "id")  # a record that no longer says which job it is
    # Before: "a" was renewed, then the script failed on "b" and the caller saw an error for both.
    assert store.renew(["a", "b"], "n1", 60) == [True, False]
    assert store.redis.zscore(store.keys.index(JobState.RUNNING), "a") > time.time() + 50
    assert_quarantined(store, "b", "cannot be renewed")


def test_quarantine_itself_does_not_stop_half_way(store):
    put(store, "j")
    store.redis.delete(store.keys.queue("default", 0))
    store.redis.set(store.keys.queue("default", 0), "not a queue")  # the job's team queue is clobbered
    store.quarantine("j", "by hand")
    # Before: the id left the indexes, then ZREM on the queue failed: no reason kept, record not set aside.
    assert_quarantined(store, "j", "by hand")


def test_a_measurement_is_checked_before_it_is_written(store):
    store.redis.set(store.keys.calib_speeds, "not a hash")
    with pytest.raises(CorruptRecord, match="not recorded"):
        store.record_measurement("n1", "tiny-sd15", "fp16", 64, 64, 1, peak_gib=2.0, s_per_step=0.1)
    assert store.redis.hlen(store.keys.calib_peaks) == 0, "before: the peak was written, then the speed failed"
    store.redis.delete(store.keys.calib_speeds)
    store.redis.hset(store.keys.calib_speeds, "n1|tiny-sd15|64x64|1", "{not json")
    store.record_measurement("n1", "tiny-sd15", "fp16", 64, 64, 1, peak_gib=2.0, s_per_step=0.1)
    _, speeds, bad = store.calibration_records()
    assert bad == [] and speeds[0][1]["s_per_step"] == 0.1, "the unreadable record is replaced"
    assert store.counters()["malformed_calibration"] == 2


# --- every index reconciled against the job hashes ---------------------------------------------------------


def plant_disagreements(store) -> None:
    put(store, "good", "done-but-queued", "queued-but-leased", "running-gone", "leased-gone", "no-state", "bad-score")
    store.redis.hset(store.keys.job("done-but-queued"), mapping={"state": "done", "finished_at": repr(time.time())})
    assert store.lease("queued-but-leased", "n1", 30)
    store.redis.hset(store.keys.job("queued-but-leased"), "state", "queued")
    assert store.lease("running-gone", "n1", 30) and store.start("running-gone", "n1", 30)
    store.redis.delete(store.keys.job("running-gone"))
    assert store.lease("leased-gone", "n1", 30)
    store.redis.delete(store.keys.job("leased-gone"))
    store.redis.hdel(store.keys.job("no-state"), "state")
    store.redis.hset(store.keys.job("bad-score"), "score", "?")


def test_reconcile_moves_what_disagrees_and_quarantines_what_has_no_record(store, redis_url):
    plant_disagreements(store)
    calls, report = 0, None
    cursor = (0, 0)
    while True:  # small slices: a pass takes several calls, and carries on where the last one stopped
        report = store.reconcile(cursor, limit=2)
        cursor, calls = report.cursor, calls + 1
        if cursor == (0, 0):
            break
    assert calls > 3
    queue = store.keys.queue("default", 0)
    assert everywhere(store, "good") == {store.keys.pending, queue}
    assert everywhere(store, "done-but-queued") == {store.keys.index(JobState.DONE)}
    assert everywhere(store, "queued-but-leased") == {store.keys.pending, queue}
    for job_id, why in [("running-gone", "without a job record"), ("leased-gone", "without a job record"),
                        ("no-state", "not a job state"), ("bad-score", "score")]:
        assert_quarantined(store, job_id, why, kept=not job_id.endswith("-gone"))
    counters = store.counters()
    assert counters["reconciled_moved"] == 2 and counters["reconciled_quarantined"] == 4
    assert counters["quarantined"] == 4
    # A second pass finds nothing more to do.
    report = store.reconcile(limit=1000)
    assert report.cursor == (0, 0) and (report.moved, report.quarantined) == (0, 0) and report.checked == 5
    # And an operator sees it: `renderfarm status` prints the counters and the quarantined ids.
    from renderfarm.client import FarmClient

    client = FarmClient(redis_url)
    try:
        status = client.status()
    finally:
        client.store.close()
    assert status["counters"]["reconciled_moved"] == 2
    assert set(status["quarantined"]) == {"running-gone", "leased-gone", "no-state", "bad-score"}


def test_the_scheduler_reconciles_on_its_own(store, redis_url, tmp_path, models_file):
    from tests.integration.test_leases import make_scheduler

    plant_disagreements(store)
    sched = make_scheduler(redis_url, tmp_path, models_file)
    assert "reconcile" in sched.steps
    sched.steps["reconcile"]()
    assert everywhere(store, "done-but-queued") == {store.keys.index(JobState.DONE)}
    assert "leased-gone" in store.quarantined()
    # The repaired queue is what dispatch reads: the job that was stuck in leased is queued again.
    assert {j.id for j in sched._queued()} == {"good", "queued-but-leased"}


# --- malformed node, event, calibration and sample records: skipped and counted -----------------------------


BAD_CARDS = [{"vram_gib": 8}, "garbage", {"name": "x", "vram_gib": "eight"}, {"name": "x", "vram_gib": 8,
             "compute_capability": 8.6}, {"name": "x", "vram_gib": -1}]


@pytest.mark.parametrize("card", BAD_CARDS, ids=["no-name", "not-an-object", "vram-text", "cc-number", "vram-negative"])
def test_a_bad_node_record_does_not_stop_submit(store, redis_url, card):
    from renderfarm.client import FarmClient

    store.register_node("bad", {"vram_gib": 8, "card": card, "state": "idle"})
    store.register_node("good", {"vram_gib": 8, "card": CARD.as_dict(), "state": "idle"})
    store.redis.hset(store.keys.calib_peaks, "nonsense", "{not json")
    client = FarmClient(redis_url)
    try:
        (job_id,) = client.submit_batch([{"model": "tiny-sd15", "prompt": "a fox", "width": 64, "height": 64}])
    finally:
        client.store.close()
    assert store.state(job_id) is JobState.QUEUED
    counters = store.counters()
    assert counters["malformed_node"] == 1 and counters["malformed_calibration"] == 1


class _Handle:
    def __init__(self):
        self.sent: list[list[str]] = []

    def render(self, job_ids, specs=None):
        self.sent.append(job_ids)
        return object()


class _Calls:
    """Every actor asked for is alive (there is no Ray here)."""

    def __init__(self):
        self.handles: dict[str, _Handle] = {}

    def find(self, actor_name):
        return self.handles.setdefault(actor_name, _Handle())


def test_a_bad_node_record_naming_a_live_actor_does_not_stop_dispatch(store, redis_url, tmp_path, models_file):
    from renderfarm.scheduler.managers import update_each
    from tests.integration.test_leases import make_scheduler

    put(store, "j")
    fresh = {"state": "idle", "loaded": [], "heartbeat": time.time()}
    store.register_node("a-bad", {**fresh, "vram_gib": 8, "card": {"vram_gib": 8}, "actor": "rf-worker-a-bad"})
    store.register_node("b-good", {**fresh, "vram_gib": 8, "card": CARD.as_dict(), "actor": "rf-worker-b-good"})
    sched = make_scheduler(redis_url, tmp_path, models_file)
    calls = _Calls()
    sched.membership.calls = calls
    failures: dict[str, int] = {}
    update_each({"membership": sched.membership.update, "dispatch": sched.dispatcher.update}, failures)
    assert failures == {}, "before: KeyError 'name' in adoption, and the good node never joined"
    assert list(sched.workers.names()) == ["b-good"]
    assert calls.handles["rf-worker-b-good"].sent == [["j"]] and store.get("j").node == "b-good"
    assert store.counters()["malformed_node"] == 1


def test_an_event_without_a_state_does_not_stop_a_waiting_client(store, redis_url):
    from renderfarm.client import FarmClient

    put(store, "j")
    client = FarmClient(redis_url)

    def later():
        time.sleep(0.3)  # the client follows the stream from when it started waiting
        # on the stream a waiting client follows: the moves to a terminal state (Keys.finished)
        store.redis.xadd(store.keys.finished, {"job": "j"})
        store.redis.xadd(store.keys.finished, {"job": "j", "state": "exploded", "ts": "soon"})
        assert store.lease("j", "n1", 30) and store.start("j", "n1", 30)
        assert store.complete("j", "n1", ["file:///results/j-0.png"], {}, None)

    thread = threading.Thread(target=later)
    thread.start()
    try:
        finished = list(client.as_completed(["j"], timeout=20))
    finally:
        thread.join()
        client.store.close()
    assert [(job.id, job.state) for job in finished] == [("j", JobState.DONE)]
    assert store.counters()["malformed_event"] >= 2


def test_a_bad_sample_is_skipped_and_counted(store):
    store.record_sample({"t": 1.0, "counts": {}, "nodes": {}})
    store.redis.xadd(store.keys.samples, {"json": b"{not json"})
    store.redis.xadd(store.keys.samples, {"json": b'{"counts": {}}'})  # no time
    assert [s["t"] for s in store.samples()] == [1.0]
    assert store.counters()["malformed_sample"] == 2


def test_a_node_record_cannot_rename_itself(store):
    store.register_node("n1", {"vram_gib": 8})
    store.redis.hset(store.keys.node("n1"), "name", json.dumps("someone-else"))
    assert [n["name"] for n in store.nodes()] == ["n1"]
