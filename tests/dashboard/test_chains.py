"""The dashboard's chains view against a real redis-server: chains submitted through Store.submit on top of the
seeded farm (tests/dashboard/conftest.py), then settled by the store's own scripts as parents finish."""

from __future__ import annotations

import pytest

from renderfarm.dashboard import chains, queries
from renderfarm.jobs import Job, JobSpec, JobState

pytestmark = pytest.mark.integration


def spec(**kw) -> JobSpec:
    base = {"model": "tiny-sd15", "prompt": "a fox", "width": 64, "height": 64, "steps": 2, "team": "design"}
    return JobSpec(**{**base, **kw})


def finish(store, job_id, how="done", error="boom"):
    assert store.lease(job_id, "node-a", 30) and store.start(job_id, "node-a", 30)
    if how == "done":
        assert store.complete(job_id, "node-a", [f"file:///tmp/{job_id}.png"], {}, None)
    else:
        assert store.fail(job_id, error, node="node-a")


def seed_chains(store, now: float) -> None:
    """A plain chain ch-a -> ch-b -> ch-c, a hires fix (hi-base, then hi), a chain whose root fails (ch-x ->
    ch-y -> ch-z) and one whose root is cancelled (ch-p -> ch-q)."""
    jobs = [
        Job(id="ch-a", spec=spec(), created_at=now - 300),
        Job(id="ch-b", spec=spec(after=("ch-a",)), created_at=now - 290),
        Job(id="ch-c", spec=spec(after=("ch-b",), model="tiny-flux", team="research"), created_at=now - 280),
        Job(id="hi-base", spec=spec(width=64, height=64), created_at=now - 200),
        Job(id="hi", spec=spec(width=128, height=128, init_from="hi-base", after=("hi-base",), strength=0.7,
                               resize_mode="resize"), created_at=now - 200),
        Job(id="ch-x", spec=spec(), created_at=now - 100),
        Job(id="ch-y", spec=spec(after=("ch-x",)), created_at=now - 90),
        Job(id="ch-z", spec=spec(after=("ch-y",)), created_at=now - 80),
        Job(id="ch-p", spec=spec(), created_at=now - 70),
        Job(id="ch-q", spec=spec(after=("ch-p",)), created_at=now - 60),
    ]
    assert store.submit(jobs, "chains-1") == [True] * len(jobs)
    finish(store, "ch-x", how="fail", error="CUDA error: device-side assert")
    store.cancel("ch-p")


@pytest.fixture
def chained(seeded):
    seed_chains(seeded.store, seeded.now)
    return seeded


def test_waiting_jobs_are_counted_apart_in_the_backlog(chained):
    counts = queries.overview(chained.store, chained.now)
    assert counts["waiting"] == 3, "ch-b, ch-c, hi"
    assert counts["queued"] == 3 + 2, "the farm's three, ch-a and hi-base: a waiting job is in no queue"
    assert counts["backlog"] == counts["queued"] + counts["leased"] + counts["running"] + 3
    assert counts["total"] == sum(counts[s.value] for s in JobState)


def test_queue_history_counts_waiting(chained):
    store = chained.store
    store.record_sample({"t": chained.now + 1, "counts": store.counts(), "nodes": {}})
    history = queries.queue_history(store.samples())
    assert set(history[0]) == {"t", "queued", "leased", "running", "waiting"}
    assert history[0]["waiting"] == 0, "samples written before chains count none"
    assert history[-1]["waiting"] == 3


def test_waiting_view_rows(chained):
    view = chains.waiting(chained.store, now=chained.now)
    assert view["total"] == 3 and view["skipped"] == 0
    rows = {r["id"]: r for r in view["rows"]}
    assert [r["id"] for r in view["rows"]] == ["ch-b", "ch-c", "hi"], "as they would be queued: the oldest first"
    b, c, hi = rows["ch-b"], rows["ch-c"], rows["hi"]
    assert b["waits_for"] == [{"id": "ch-a", "state": "queued"}] and b["waits_text"] == "ch-a (queued)"
    assert c["waits_text"] == "ch-b (waiting)"
    assert (c["batch"], c["model"], c["team"], c["size"], c["kind"]) == ("chains-1", "tiny-flux", "research", "64x64",
                                                                        "after")
    assert c["age_s"] == pytest.approx(280)
    assert (hi["kind"], hi["size"], hi["waits_text"]) == ("hires pass", "128x128", "hi-base (queued)")
    # bounded: the head of the index, with the count of all
    few = chains.waiting(chained.store, limit=1, now=chained.now)
    assert [r["id"] for r in few["rows"]] == ["ch-b"] and few["total"] == 3
    # a parent done: its child is queued by the store, and leaves the view
    finish(chained.store, "ch-a")
    assert [r["id"] for r in chains.waiting(chained.store)["rows"]] == ["ch-c", "hi"]
    assert chains.waiting(chained.store)["rows"][0]["waits_text"] == "ch-b (queued)"


def test_jobs_ended_by_a_parent(chained):
    rows = chains.blocked(chained.store)
    assert {r["id"] for r in rows} == {"ch-y", "ch-z", "ch-q"}, "f0, f1, c0 and the roots themselves were not"
    by_id = {r["id"]: r for r in rows}
    y = by_id["ch-y"]
    assert (y["state"], y["blocked_by"], y["batch"]) == ("failed", "ch-x", "chains-1")
    assert y["reason"].startswith("job ch-x it waits for failed: CUDA error: device-side assert")
    assert by_id["ch-z"]["blocked_by"] == "ch-y"
    q = by_id["ch-q"]
    assert (q["state"], q["blocked_by"], q["reason"]) == ("cancelled", "ch-p", "job ch-p it waits for was cancelled")
    times = [r["finished_at"] for r in rows]
    assert times == sorted(times, reverse=True), "newest first"
    assert len(chains.blocked(chained.store, limit=1)) == 1
    # only the latest `scan` failed and cancelled are looked through: two later plain ends hide the chain's
    store = chained.store
    store.submit([Job(id="late-f", spec=spec()), Job(id="late-c", spec=spec())], "chains-late")
    finish(store, "late-f", how="fail")
    store.cancel("late-c")
    assert chains.blocked(store, scan=1) == []
    assert len(chains.blocked(store, scan=2)) == 2


def test_a_jobs_chain_parents_and_children(chained):
    store = chained.store
    detail = chains.chain(store, "ch-b", now=chained.now)
    assert detail["job"]["state"] == "waiting" and detail["job"]["batch"] == "chains-1"
    assert [(p["id"], p["state"]) for p in detail["parents"]] == [("ch-a", "queued")]
    assert [p["id"] for p in detail["waits_on"]] == ["ch-a"]
    assert [(k["id"], k["state"], k["ended_by_it"]) for k in detail["children"]] == [("ch-c", "waiting", False)]
    assert detail["children_total"] == 1
    root = chains.chain(store, " ch-x ")
    assert root["job"]["state"] == "failed" and root["parents"] == []
    assert [(k["id"], k["state"], k["ended_by_it"]) for k in root["children"]] == [("ch-y", "failed", True)]
    y = chains.chain(store, "ch-y")
    assert y["job"]["blocked_by"] == "ch-x" and "it waits for failed" in y["job"]["error"]
    assert [(p["id"], p["state"]) for p in y["parents"]] == [("ch-x", "failed")]
    hi = chains.chain(store, "hi")
    assert hi["job"]["kind"] == "hires pass" and hi["job"]["init_from"] == "hi-base"
    assert [k["id"] for k in chains.chain(store, "hi-base")["children"]] == ["hi"]
    finish(store, "ch-a")
    detail = chains.chain(store, "ch-b")
    assert detail["job"]["state"] == "queued" and detail["waits_on"] == []
    assert detail["parents"][0]["state"] == "done" and detail["parents"][0]["finished_at"] is not None
    assert chains.chain(store, "nope") is None and chains.chain(store, "  ") is None


def test_children_are_read_bounded_and_a_bad_key_does_not_break_the_view(chained):
    store = chained.store
    kids = [Job(id=f"kid-{i:03d}", spec=spec(after=("ch-a",))) for i in range(120)]
    store.submit(kids, "chains-2")
    detail = chains.chain(store, "ch-a", limit=10)
    assert detail["children_total"] == 121 and len(detail["children"]) == 10
    assert all(k["state"] == "waiting" for k in detail["children"])
    store.redis.set(store.keys.children("ch-x"), "not a set")
    store.redis.set(store.keys.job("ch-y"), "not a hash")
    assert chains.chain(store, "ch-x")["children"] == []
    assert "ch-y" not in {r["id"] for r in chains.blocked(store)}
    waiting = chains.waiting(store)
    assert waiting["total"] == 3 + 120 and len(waiting["rows"]) == chains.WAITING_LIMIT


def test_the_jobs_table_shows_what_a_waiting_job_waits_for(chained):
    rows = queries.jobs(chained.store, now=chained.now)["rows"]
    states = [r["state"] for r in rows]
    last_queued = max(i for i, s in enumerate(states) if s == "queued")
    assert states[last_queued + 1 : last_queued + 4] == ["waiting"] * 3, "waiting right behind the queue"
    waiting = queries.jobs(chained.store, state="waiting")["rows"]
    assert [(r["id"], r["waiting"]) for r in waiting] == [
        ("ch-b", "ch-a (queued)"), ("ch-c", "ch-b (waiting)"), ("hi", "hi-base (queued)")]


def test_actions_on_chains(chained):
    store = chained.store
    # retrying a job a failed parent ended is refused; retrying the parent brings its chain back
    result = queries.retry_job(store, "ch-y")
    assert not result["ok"] and "job ch-x it waits for is failed: retry ch-x" in result["message"]
    assert queries.retry_job(store, "ch-x") == {"ok": True, "message": "Job ch-x is queued again."}
    assert [store.state(j) for j in ("ch-x", "ch-y", "ch-z")] == [JobState.QUEUED, JobState.WAITING, JobState.WAITING]
    # a failed job whose parent is not done yet waits again
    store.submit([Job(id="ch-m", spec=spec()), Job(id="ch-n", spec=spec(after=("ch-m",)))], "chains-3")
    assert store.fail("ch-n", "failed by hand while it waited")
    assert queries.retry_job(store, "ch-n") == {"ok": True, "message": "Job ch-n waits again for the jobs it runs after."}
    assert store.state("ch-n") is JobState.WAITING
    # a waiting job can be cancelled from the dashboard: its waiting children go with it
    assert queries.cancel_job(store, "ch-b") == {"ok": True, "message": "Cancelled job ch-b (was waiting)."}
    assert store.state("ch-c") is JobState.CANCELLED
    assert "only queued, waiting, leased or running" in queries.cancel_job(store, "ch-b")["message"]


def test_an_empty_farm_has_no_chains(dash_store):
    assert chains.waiting(dash_store) == {"rows": [], "total": 0, "skipped": 0}
    assert chains.blocked(dash_store) == [] and chains.chain(dash_store, "nope") is None
    assert queries.overview(dash_store)["backlog"] == 0
