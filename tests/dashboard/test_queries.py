"""The dashboard's queries against a real redis-server holding a realistic farm (tests/dashboard/conftest.py)."""

from __future__ import annotations

import pytest

from renderfarm.cluster.blobs.local import path_of
from renderfarm.dashboard import queries
from renderfarm.jobs import JobState

pytestmark = pytest.mark.integration


def test_overview_counts_from_the_indexes(seeded):
    counts = queries.overview(seeded.store)
    for state, n in seeded.counts.items():
        assert counts[state] == n, state
    assert (counts["done_1h"], counts["failed_1h"], counts["cancelled_1h"]) == (3, 1, 1)
    assert counts["total"] == sum(seeded.counts.values())


def test_queue_history_from_samples(seeded):
    history = queries.queue_history(seeded.store.samples())
    assert [row["queued"] for row in history] == [5, 4, 3]
    assert history[0]["t"] < history[-1]["t"]
    assert set(history[0]) == {"t", "queued", "leased", "running", "waiting"}


def test_nodes_state_hardware_and_throughput(seeded):
    store = seeded.store
    rows = {n["name"]: n for n in queries.nodes(store, store.samples(), dead_after=15)}
    assert {name: row["state"] for name, row in rows.items()} == seeded.node_states
    a, b, c = rows["node-a"], rows["node-b"], rows["node-c"]
    assert (a["gpu"], a["kind"]) == ("NVIDIA GeForce RTX 4090", "real")
    assert (a["vram_used_gib"], a["vram_total_gib"]) == (12.5, 24.0)
    assert (a["ram_planned_gib"], a["ram_total_gib"], a["ram_available_gib"]) == (64.0, 62.7, 58.1)
    assert b["ram_planned_gib"] is None and b["ram_total_gib"] is None
    assert a["profiles"] == {"tiny-sd15": "fp16-resident", "tiny-flux": "fp8-offload"}
    assert a["loaded"] == ["tiny-sd15", "tiny-flux"]
    assert b["kind"] == "simulated" and b["draining"]
    # now: over its samples of the last few minutes (10 images, 2.5 MP in 10 s)
    assert a["source"] == "samples"
    assert a["images_per_min"] == pytest.approx(60.0)
    assert a["mp_per_s"] == pytest.approx(0.25)
    assert a["s_per_step"] == 0.05
    assert b["images_per_min"] == 0.0
    # node-c is in no sample: its totals over its render time (8 images, 2 MP in 16 s)
    assert c["source"] == "totals"
    assert c["images_per_min"] == pytest.approx(30.0) and c["mp_per_s"] == pytest.approx(0.125)
    assert c["heartbeat_age_s"] == pytest.approx(120, abs=5)
    assert a["heartbeat_age_s"] < 15


def test_node_state_rules():
    now = 1000.0
    assert queries.node_state({"heartbeat": now - 1, "state": "idle"}, now, 15) == "idle"
    assert queries.node_state({"heartbeat": now - 1, "state": "busy", "draining": True}, now, 15) == "draining"
    assert queries.node_state({"heartbeat": now - 16, "state": "busy", "draining": True}, now, 15) == "dead"
    assert queries.node_state({"state": "idle"}, now, 15) == "dead"  # never beat
    assert queries.node_state({"heartbeat": "garbage", "state": "idle"}, now, 15) == "dead"


def test_throughput_over_time_and_stale_samples(seeded):
    samples = seeded.store.samples()
    rows = queries.throughput_history(samples)
    node_a = [r for r in rows if r["node"] == "node-a"]
    assert [round(r["images_per_min"]) for r in node_a] == [48, 60]  # each over the minute before it
    assert {r["node"] for r in rows} == {"node-a", "node-b"}
    # samples from a scheduler that stopped long ago say nothing about now: totals instead
    record = {"name": "node-a", "images": 40, "megapixels": 10.5, "render_seconds": 100.0}
    later = queries.throughput_now(record, samples, now=samples[-1]["t"] + 600)
    assert later["source"] == "totals" and later["images_per_min"] == pytest.approx(24.0)
    # a worker that restarted (totals went down) counts from zero
    restarted = [{"t": 0, "nodes": {"n": {"images": 50, "megapixels": 5}}},
                 {"t": 10, "nodes": {"n": {"images": 2, "megapixels": 0.5}}}]
    assert queries.throughput_history(restarted)[0]["images_per_min"] == pytest.approx(12.0)


def busy_samples(now: float) -> list[dict]:
    """A node busy for two minutes, sampled every 5 s: its totals move only when a batch of 4 images (1 MP)
    finishes, every 30 s, the last time 10 s ago."""
    samples = []
    for k in range(25):
        t = now - 120 + 5 * k
        batches = (k + 2) // 6  # batches end at t = now - 100, -70, -40, -10
        samples.append({"t": t, "nodes": {"busy": {"images": 4 * batches, "megapixels": 1.0 * batches}}})
    return samples


def test_a_busy_node_between_two_batches_shows_its_rate_over_the_window():
    now = 1_000_000.0
    samples = busy_samples(now)
    last, before = samples[-1]["nodes"]["busy"], samples[-2]["nodes"]["busy"]
    assert last == before, "the last two samples fall inside one batch: an instant rate would read 0.0"
    record = {"name": "busy", "images": 16, "megapixels": 4.0, "render_seconds": 120.0}
    rates = queries.throughput_now(record, samples, now)
    assert rates["source"] == "samples"
    # 4 batches (16 images, 4 MP) finished between its first sample (now - 120) and its last (now)
    assert rates["images_per_min"] == pytest.approx(8.0)
    assert rates["mp_per_s"] == pytest.approx(4.0 / 120)
    # the chart's points are rates over the minute before each: none of the last ones reads 0
    points = [r["images_per_min"] for r in queries.throughput_history(samples) if r["t"] >= now - 60]
    assert points and min(points) > 0
    # samples older than the window do not count
    old = [{"t": now - 900, "nodes": {"busy": {"images": 0, "megapixels": 0.0}}}] + samples
    assert queries.throughput_now(record, old, now)["images_per_min"] == pytest.approx(8.0)


def test_node_colours_are_distinct_and_stable_per_name():
    names = [f"node-{i}" for i in range(10)]
    colors = queries.node_colors(names)
    assert len(set(colors.values())) == 10 and set(colors.values()) == set(queries.NODE_PALETTE)
    assert queries.node_colors(list(reversed(names))) == colors, "the order nodes are listed in does not matter"
    # A node keeps its colour as nodes join and leave (only one that lands on a colour already taken moves on):
    # each colour is picked from the name, never from a node's place in the list.
    for i in range(1, 10):
        assert all(queries.node_colors(names[: i + 1])[n] == colors[n] for n in names[:i])
    assert queries.node_colors(["quadro-24g", "rtx-8g"])["quadro-24g"] == queries.node_colors(["quadro-24g"])["quadro-24g"]
    two = queries.node_colors(["quadro-24g", "rtx-8g"])  # the browser test's farm: they hash to one colour
    assert two["quadro-24g"] != two["rtx-8g"]


def test_jobs_all_states_with_filters(seeded):
    listing = queries.jobs(seeded.store)
    assert len(listing["rows"]) == sum(seeded.counts.values()) and listing["skipped"] == 0
    assert listing["facets"] == {"team": ["design", "research"], "model": ["tiny-flux", "tiny-sd15"],
                                 "node": ["node-a", "node-b", "node-c"]}

    def ids(**filters):
        return sorted(r["id"] for r in queries.jobs(seeded.store, **filters)["rows"])

    assert ids(state="done") == ["d0", "d1", "d2", "d3"]
    assert ids(state="running") == ["r0", "r1"]
    assert ids(team="research") == ["d1", "f0", "q1", "q2", "r1"]
    assert ids(model="tiny-flux") == ["d1", "f0", "q1", "r1"]
    assert ids(node="node-c") == ["f1", "r1"]
    assert ids(state="done", node="node-b", team="design") == ["d2", "d3"]
    assert ids(state="cancelled") == ["c0"]
    assert queries.jobs(seeded.store, state="done", limit=2)["rows"][0]["id"] in {"d0", "d1", "d2"}
    assert len(queries.jobs(seeded.store, state="done", limit=2)["rows"]) == 2


def test_queued_jobs_carry_position_and_eta(seeded):
    rows = queries.jobs(seeded.store, state="queued", now=seeded.now)["rows"]
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"], "the queue is shown from its head"
    q0, q1, q2 = rows
    assert (q0["position"], q1["position"], q2["position"]) == (0, 1, None)
    assert q0["eta_s"] == pytest.approx(25) and q1["eta_s"] == pytest.approx(45)
    assert q2["eta_s"] is None and q2["waiting"] == "no node has room for 4096x4096"


def test_the_table_follows_the_queue_then_running_then_the_latest_finished(seeded):
    store, now = seeded.store, seeded.now
    # The scheduler's order, not the ids' (jobs of one batch share their queue score: the index sorts them by id).
    store.write_etas({
        "q2": {"position": 0, "node": "node-a", "start": now + 5, "finish": now + 25, "as_of": now},
        "q1": {"position": 1, "node": "node-a", "start": now + 25, "finish": now + 45, "as_of": now},
        "q0": {"position": None, "node": None, "waiting": "no node has room", "as_of": now},
    })
    rows = queries.jobs(store, now=now)["rows"]
    assert [r["id"] for r in rows[:6]] == ["q2", "q1", "q0", "l0", "r1", "r0"]
    finished = rows[6:]
    assert {r["state"] for r in finished} == {"done", "failed", "cancelled"}
    times = [r["finished_at"] for r in finished]
    assert times == sorted(times, reverse=True), "the finished ones newest first, whatever their state"
    assert [r["id"] for r in finished][-2:] == ["f1", "d3"] or [r["id"] for r in finished][-2:] == ["d3", "f1"]
    assert [r["id"] for r in queries.jobs(store, state="queued", now=now)["rows"]] == ["q2", "q1", "q0"]


def test_failed_in_the_last_hour_adds_up_over_the_node_cards(seeded):
    store = seeded.store
    overview = queries.overview(store, seeded.now)
    rows = {n["name"]: n for n in queries.nodes(store, store.samples(), 15, seeded.now)}
    # f0 failed on node-a a moment ago; f1 on node-c two hours ago (the workers' own counters say 1 and 1)
    assert {name: n["failed_1h"] for name, n in rows.items()} == {"node-a": 1, "node-b": 0, "node-c": 0}
    assert sum(n["failed_1h"] for n in rows.values()) == overview["failed_1h"] == 1
    assert queries.failed_by_node(store, seeded.now - 3 * 3600) == {"node-a": 1, "node-c": 1}


def test_a_node_shows_the_job_it_renders_and_its_step(seeded):
    rows = {n["name"]: n for n in queries.nodes(seeded.store, [], 15)}
    assert {k: rows["node-a"][k] for k in ("current_job", "batch_jobs", "step", "steps")} == {
        "current_job": "r0", "batch_jobs": 1, "step": 12, "steps": 28}
    assert rows["node-b"]["current_job"] is None and rows["node-b"]["step"] is None
    assert queries.progress({"current_job": None, "step": 3}) == {
        "current_job": None, "batch_jobs": 0, "step": None, "steps": None}
    assert queries.progress({"current_job": "j", "step": "x", "steps": [2]})["step"] is None


def test_failures_with_reasons(seeded):
    failed = queries.failures(seeded.store)
    assert [(f["id"], f["error"]) for f in failed] == [
        ("f0", "CUDA out of memory at every profile"), ("f1", "model files missing"),
    ]
    assert failed[0]["node"] == "node-a" and failed[0]["attempts"] == 1


def test_gallery_latest_images_with_their_settings(seeded):
    entries = queries.gallery(seeded.store)
    assert [e["id"] for e in entries] == ["d2", "d1", "d0", "d3"], "newest first"
    d1 = entries[1]
    assert d1["image"].startswith(b"\x89PNG") and d1["from_image"]
    settings = d1["settings"]
    assert settings["prompt"] == "a red fox, picture d1" and settings["negative_prompt"] == "blurry"
    assert (settings["Model"], settings["Size"], settings["Steps"]) == ("tiny-flux", "64x64", "4")
    assert settings["Seed"] == "1007"
    assert settings["Sampler"] == "Euler" and "Negative prompt: blurry" in settings["text"]
    assert (d1["node"], d1["profile"]) == ("node-a", "fp16-resident")
    assert queries.gallery(seeded.store, count=2)[0]["id"] == "d2"


def test_gallery_without_image_or_parameters_falls_back_to_the_spec(seeded):
    store = seeded.store
    (d0,) = store.result_blobs("d0")
    path_of(d0).unlink()  # expired: retention swept it
    (d1,) = store.result_blobs("d1")
    path_of(d1).write_bytes(b"not a png")
    entries = {e["id"]: e for e in queries.gallery(store)}
    assert entries["d0"]["image"] is None and entries["d0"]["settings"]["Model"] == "tiny-sd15"
    assert not entries["d1"]["from_image"] and entries["d1"]["settings"]["Seed"] == "1007"


def test_malformed_records_are_skipped_and_counted(seeded):
    store = seeded.store
    store.redis.hset(store.keys.job("bad"), mapping={"id": "bad", "spec": "{not json", "state": "done"})
    store.redis.zadd(store.keys.index(JobState.DONE), {"bad": seeded.now + 1, "gone": seeded.now + 2})
    listing = queries.jobs(store, state="done")
    assert sorted(r["id"] for r in listing["rows"]) == ["d0", "d1", "d2", "d3"]
    assert listing["skipped"] == 2
    assert [e["id"] for e in queries.gallery(store)] == ["d2", "d1", "d0", "d3"]
    # a node record with nonsense in it still reads as a node
    store.redis.sadd(store.keys.nodes, "node-x")
    store.redis.hset(store.keys.node("node-x"), mapping={"heartbeat": "soon", "vram_gib": "[1]", "loaded": "7"})
    rows = {n["name"]: n for n in queries.nodes(store, store.samples(), dead_after=15)}
    x = rows["node-x"]
    assert x["state"] == "dead" and x["loaded"] == [] and x["vram_total_gib"] is None
    store.redis.xadd(store.keys.samples, {"json": b'{"t": 1, "counts": "x", "nodes": [1]}'})
    assert queries.queue_history(store.samples())[-1]["queued"] == 3  # the bad sample is skipped
    assert queries.throughput_history(store.samples())  # and does not break the rates


def test_actions(seeded):
    store = seeded.store
    result = queries.cancel_job(store, "q0")
    assert result == {"ok": True, "message": "Cancelled job q0 (was queued)."}
    assert store.state("q0") is JobState.CANCELLED
    assert not queries.cancel_job(store, "d0")["ok"]
    assert "only queued, waiting, leased or running" in queries.cancel_job(store, "d0")["message"]
    assert queries.cancel_job(store, "nope") == {"ok": False, "message": "No job 'nope'."}
    assert queries.cancel_job(store, "  ")["message"] == "Enter a job id."

    assert queries.retry_job(store, "f0") == {"ok": True, "message": "Job f0 is queued again."}
    assert store.state("f0") is JobState.QUEUED and store.get("f0").node is None
    assert queries.retry_job(store, "f0")["message"] == "Job f0 is queued: only failed jobs can be retried."
    assert queries.retry_job(store, "nope") == {"ok": False, "message": "No job 'nope'."}

    assert queries.drain_node(store, "node-a")["ok"]
    assert {n["name"]: n["draining"] for n in queries.nodes(store, [], 15)}["node-a"] is True
    assert queries.drain_node(store, "node-b", draining=False)["message"] == "Node node-b is taking jobs again."
    assert queries.drain_node(store, "nope") == {"ok": False, "message": "No node 'nope'."}
    counts = queries.overview(store)
    assert (counts["queued"], counts["failed"], counts["cancelled"]) == (3, 1, 2)


def test_empty_farm(dash_store):
    assert queries.overview(dash_store)["total"] == 0
    assert queries.nodes(dash_store, dash_store.samples(), 15) == []
    assert queries.jobs(dash_store) == {"rows": [], "facets": {"team": [], "model": [], "node": []}, "skipped": 0}
    assert queries.gallery(dash_store) == [] and queries.failures(dash_store) == []


def test_reliability_counters_and_why_a_node_drains(dash_store):
    dash_store.register_node("node-x", {"vram_gib": 8})
    dash_store.count("leases_expired", 2)
    dash_store.count("late_results")
    assert dash_store.set_draining("node-x", True, reason="drained automatically after 3 failed batches in a row")
    counts = queries.overview(dash_store)
    assert (counts["leases_expired"], counts["late_results"], counts["timeouts"], counts["quarantined"]) == (2, 1, 0, 0)
    (node,) = queries.nodes(dash_store, [], 15)
    assert node["state"] == "draining" and node["drain_reason"].startswith("drained automatically after 3")
    assert dash_store.set_draining("node-x", False)
    assert queries.nodes(dash_store, [], 15)[0]["drain_reason"] == ""
