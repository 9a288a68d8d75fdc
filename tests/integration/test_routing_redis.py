"""Routing state in a real redis-server (no mocks, no Ray): per-(team, priority) queues, online calibration
records, measured peaks at submit time, fair share and ETAs published by the scheduler and read back by the
client and the CLI, and fair-share usage across a scheduler restart."""

from __future__ import annotations

import json
import logging
import time

import pytest

from renderfarm.client import FarmClient, SpecError
from renderfarm.cluster.keys import Keys, peak_field
from renderfarm.cluster.redis_server import EmbeddedRedis, connect
from renderfarm.cluster.store import Store
from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.devices import device_from_spec
from renderfarm.planning.measured import MEASURED_MARGIN_GIB
from renderfarm.planning.measured import snapshot as measured_snapshot
from renderfarm.planning.profiles import VaeMode, ladder
from tests.helpers import run_cli

pytestmark = pytest.mark.integration

CARD_8G = device_from_spec("GeForce RTX 3070", 8, "8.6")


def node_record(device=CARD_8G, **extra) -> dict:
    """A node's record as a worker registers it: its VRAM and its card (Device.as_dict())."""
    return {"vram_gib": device.vram_gib, "card": device.as_dict(), "state": "idle", "loaded": [], **extra}


def spec(team: str = "default", priority: int = 0, model: str = "tiny-sd15", **kw) -> dict:
    return {"model": model, "prompt": "a fox", "width": 64, "height": 64, "steps": 2, "seed": 1,
            "team": team, "priority": priority, **kw}


def members(store: Store, key: str) -> list[str]:
    return [m.decode() for m in store.redis.zrange(key, 0, -1)]


def queues(store: Store) -> set[str]:
    return {m.decode() for m in store.redis.smembers(store.keys.queues)}


# --- 1. per-(team, priority) queues ------------------------------------------------------------------------


def test_team_queues_expose_every_teams_head(redis_url, redis_client):
    prefix = "rq1"
    client = FarmClient(redis_url, key_prefix=prefix)
    store = client.store
    a_ids = client.submit_batch([spec("a")] * 300, job_ids=[f"a-{i:03d}" for i in range(300)])
    b_ids = client.submit_batch([spec("b")] * 5, job_ids=[f"b-{i}" for i in range(5)])
    qa, qb = store.keys.queue("a", 0), store.keys.queue("b", 0)
    assert qa == f"{prefix}:queue:a:0" and qb == f"{prefix}:queue:b:0"
    assert queues(store) == {qa, qb}
    assert redis_client.zcard(qa) == 300 and members(store, qb) == b_ids

    # The global queue's head is all team a (older); the per-team heads still reach b.
    assert set(store.pending_ids(50)) <= set(a_ids)
    heads = store.queue_heads(10)
    assert len(heads) == 15 and len(set(heads)) == 15
    assert set(heads) == set(a_ids[:10]) | set(b_ids)

    # Leased: out of its team queue; requeued: back at its place.
    assert store.lease("b-2", "n1", 60)
    assert members(store, qb) == ["b-0", "b-1", "b-3", "b-4"]
    assert "b-2" not in store.queue_heads(10)
    assert store.requeue("b-2", "node died", node="n1")
    assert members(store, qb) == b_ids
    assert "b-2" in store.queue_heads(10)

    # A failed job requeued by hand returns too; a started job does not re-enter on start.
    assert store.lease("b-0", "n1", 60) and store.start("b-0", "n1", 60)
    assert "b-0" not in members(store, qb)
    assert store.fail("b-0", "boom", node="n1")
    assert "b-0" not in members(store, qb)
    assert store.requeue("b-0", "retry by hand")
    assert members(store, qb) == b_ids

    # Cancelling all of b's jobs empties its queue and drops it from the set of queues.
    assert all(v.startswith("cancelled") for v in client.cancel(b_ids).values())
    assert redis_client.exists(qb) == 0
    assert queues(store) == {qa}
    assert set(store.queue_heads(10)) == set(a_ids[:10])

    # Another priority is another queue, and it is read as well.
    [urgent] = client.submit_batch([spec("a", priority=5)], job_ids=["a-urgent"])
    q5 = store.keys.queue("a", 5)
    assert q5 != qa and queues(store) == {qa, q5}
    assert members(store, q5) == [urgent] and urgent not in members(store, qa)
    assert store.pending_ids(1) == [urgent]
    assert urgent in store.queue_heads(10)

    # Everything this test wrote is under its prefix.
    assert all(k.decode().startswith(prefix + ":") for k in redis_client.scan_iter())
    for key in redis_client.scan_iter(f"{prefix}:*"):
        redis_client.delete(key)


# --- 2. online calibration in Redis ----------------------------------------------------------------------


def test_measurements_keep_max_peak_blend_speed_skip_garbage_and_survive_restart(tmp_path):
    server = EmbeddedRedis(tmp_path / "redis")
    url = server.start()
    try:
        store = Store(connect(url), Keys("rq2"))
        assert store.measurements_version() == 0
        args = ("tiny-sd15", "bf16", 64, 64, 1)
        store.record_measurement("n1", *args, peak_gib=3.0, s_per_step=1.0, load_s=4.0)
        v1 = store.measurements_version()
        store.record_measurement("n1", *args, peak_gib=2.0, s_per_step=2.0, load_s=2.0)
        v2 = store.measurements_version()
        assert 0 < v1 < v2
        # a record with neither peak nor speed still counts as a change
        store.record_measurement("n2", *args, peak_gib=None, s_per_step=None)
        assert store.measurements_version() > v2

        peak = json.loads(store.redis.hget(store.keys.calib_peaks, peak_field(*args)))
        assert peak["peak_gib"] == 3.0 and peak["samples"] == 2 and peak["node"] == "n1"
        speed = json.loads(store.redis.hget(store.keys.calib_speeds, "n1|tiny-sd15|64x64|1"))
        assert speed["samples"] == 2
        assert speed["s_per_step"] == pytest.approx(1.3) and speed["load_s"] == pytest.approx(3.4)
        assert store.redis.hlen(store.keys.calib_speeds) == 1  # n2 measured nothing

        snapshot, bad = measured_snapshot(store.calibration_records())
        assert bad == []
        assert snapshot.floors("tiny-sd15", 64, 64, 1) == {"bf16": pytest.approx(3.0 + MEASURED_MARGIN_GIB)}
        assert snapshot.floors("tiny-sd15", 64, 64, 4) == {"bf16": pytest.approx(3.0 + MEASURED_MARGIN_GIB)}
        assert snapshot.floors("tiny-sd15", 128, 128, 1) == {}
        assert snapshot.seconds_per_step("n1", "tiny-sd15", 64, 64, 1) == pytest.approx(1.3)
        assert snapshot.load_seconds("n1", "tiny-sd15") == pytest.approx(3.4)

        # Malformed records written by hand: skipped and reported, never raised.
        store.redis.hset(store.keys.calib_peaks, mapping={
            "tiny-sd15|bf16+vae-tiled|64x64|1": "not json",
            "tiny-sd15|bf16+model-offload|64x64|1": json.dumps({"samples": 1}),
            "tiny-sd15|fp8|64x64|2": json.dumps({"peak_gib": "lots"}),
        })
        store.redis.hset(store.keys.calib_speeds, "n9|tiny-sd15|64x64|1", "{broken")
        snapshot, bad = measured_snapshot(store.calibration_records())
        assert len(bad) == 4, bad
        assert sum("bf16+vae-tiled" in line for line in bad) == 1
        assert sum("bf16+model-offload" in line for line in bad) == 1
        assert sum("fp8" in line for line in bad) == 1
        assert sum("n9" in line for line in bad) == 1
        assert snapshot.floors("tiny-sd15", 64, 64, 2) == {"bf16": pytest.approx(3.0 + MEASURED_MARGIN_GIB)}

        # Recording over a malformed record replaces it with a good one.
        store.record_measurement("n1", "tiny-sd15", "bf16+vae-tiled", 64, 64, 1, peak_gib=1.5, s_per_step=None)
        fixed = json.loads(store.redis.hget(store.keys.calib_peaks, "tiny-sd15|bf16+vae-tiled|64x64|1"))
        assert fixed["peak_gib"] == 1.5 and fixed["samples"] == 1
        version = store.measurements_version()
        store.redis.close()

        # The records come back from the append-only file after a restart.
        server.stop()
        assert not server.is_running()
        url = server.start()
        store = Store(connect(url), Keys("rq2"))
        assert store.measurements_version() == version
        snapshot, bad = measured_snapshot(store.calibration_records())
        assert len(bad) == 3  # the three still malformed
        assert snapshot.floors("tiny-sd15", 64, 64, 1) == {
            "bf16": pytest.approx(3.0 + MEASURED_MARGIN_GIB), "bf16+vae-tiled": pytest.approx(1.5 + MEASURED_MARGIN_GIB),
        }
        assert snapshot.seconds_per_step("n1", "tiny-sd15", 64, 64, 1) == pytest.approx(1.3)
        peak = json.loads(store.redis.hget(store.keys.calib_peaks, peak_field(*args)))
        assert peak["peak_gib"] == 3.0 and peak["samples"] == 2
        store.redis.close()
    finally:
        server.stop()


# --- 3. measured peaks reach submit-time rejection ---------------------------------------------------------


@pytest.mark.parametrize("model,size", [("tiny-sd15", 64), ("sdxl", 1024)])
def test_measured_peaks_make_submit_reject_what_fits_nowhere(redis_url, redis_client, model, size):
    catalog = default_catalog()  # the packaged catalog: it has component data
    entry = catalog.get(model)
    assert entry.components
    client = FarmClient(redis_url, catalog=catalog, key_prefix="rq3")
    store = client.store
    store.register_node("small-8g", node_record())
    job = spec(model=model, width=size, height=size, steps=entry.default_steps)

    client.submit_batch([job])
    counts = store.counts()
    assert counts["queued"] == 1

    profiles = ladder(entry, CARD_8G)
    names = {p.name for p in profiles} | {p.with_vae(VaeMode.TILED).name for p in profiles}
    assert len(names) == 2 * len(profiles)
    for name in sorted(names):
        store.record_measurement("small-8g", model, name, size, size, 1, peak_gib=30.0, s_per_step=None)
    snapshot, bad = measured_snapshot(store.calibration_records())
    assert bad == [] and set(snapshot.floors(model, size, size, 1)) == names

    with pytest.raises(SpecError) as info:
        client.submit_batch([job], job_ids=["rejected-1"])
    message = str(info.value)
    assert "needs at least 30." in message, message
    assert "largest node (small-8g) has 8 GiB" in message, message
    assert "nothing was enqueued" in message
    assert store.counts() == counts
    assert store.state("rejected-1") is None

    # A model the measurements do not cover still fits the same node.
    other = "tiny-sdxl" if model != "tiny-sdxl" else "tiny-sd15"
    client.submit_batch([spec(model=other, steps=2)])
    assert store.counts()["queued"] == counts["queued"] + 1
    for key in redis_client.scan_iter("rq3:*"):
        redis_client.delete(key)


# --- 4. fair share and ETAs through the scheduler, the client and the CLI ----------------------------------


def scheduler_settings(tmp_path, models_file, **kw) -> dict:
    return {"data_dir": str(tmp_path), "models_file": str(models_file), "max_batch": 8,
            "team_weights": {"a": 3, "b": 1}, "aging_seconds": 0, **kw}


def make_scheduler(redis_url, settings, prefix):
    from renderfarm.scheduler.scheduler import Scheduler

    sched = Scheduler(redis_url, settings, workers={"n1": (None, node_record(CARD_8G))}, key_prefix=prefix)
    # No free slot anywhere: a round plans and publishes ETAs, and never calls a worker (no Ray).
    for worker in sched.workers.values():
        worker.inflight = sched.settings.worker_queue_depth
    return sched


def test_scheduler_publishes_fair_positions_and_etas(redis_url, redis_client, models_file, tmp_path):
    # The CLI reads the default prefix, so this test writes there and flushes what it wrote at the end.
    prefix = "rf"
    catalog = default_catalog(models_file)
    client = FarmClient(redis_url, catalog=catalog, key_prefix=prefix)
    try:
        a_ids = client.submit_batch([spec("a")] * 40)
        b_ids = client.submit_batch([spec("b")] * 40)
        ids = a_ids + b_ids
        sched = make_scheduler(redis_url, scheduler_settings(tmp_path, models_file, eta_seconds=0.01), prefix)
        # Before any round, a job's position is its place in the priority queue, marked approximate.
        before = client.estimates(b_ids)
        assert all(e["approximate"] for e in before.values())
        assert sorted(e["position"] for e in before.values()) == list(range(40, 80))

        sched._dispatch()
        assert sched.counters["eta_rounds"] == 1 and sched.counters["dispatched"] == 0
        assert client.store.counts()["queued"] == 80 and client.store.counts()["leased"] == 0

        estimates = client.estimates(ids)
        assert set(estimates) == set(ids)
        assert sorted(e["position"] for e in estimates.values()) == list(range(80))
        assert all(e["node"] == "n1" and not e.get("approximate") for e in estimates.values())
        by_position = sorted(ids, key=lambda i: estimates[i]["position"])
        etas = [estimates[i]["eta_s"] for i in by_position]
        assert all(isinstance(e, (int, float)) and e >= 0 for e in etas)
        assert etas == sorted(etas), "an ETA never decreases down the queue"
        assert etas[-1] > etas[0]
        starts = [estimates[i]["start_in_s"] for i in by_position]
        assert starts == sorted(starts) and all(s <= e for s, e in zip(starts, etas))
        first20 = set(by_position[:20])
        assert 14 <= len(first20 & set(a_ids)) <= 16, "weights 3:1 give team a 3 of every 4 places"
        # Each team's jobs keep their own order (one batch: one submit time, then by id).
        for team in (a_ids, b_ids):
            assert [i for i in by_position if i in team] == sorted(team)

        # `renderfarm status JOB --json` shows the published place and ETA.
        probe = b_ids[0]
        proc = run_cli("status", probe, "--json", "--redis", redis_url)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = proc.stdout.splitlines()
        assert len(lines) == 1, proc.stdout
        [row] = json.loads(lines[0])["jobs"]
        assert row["id"] == probe and row["state"] == "queued"
        assert row["queue_position"] == estimates[probe]["position"]
        assert isinstance(row["eta_s"], (int, float)) and row["eta_s"] >= 0
        assert row["waits_for"] == "n1"

        # An urgent job submitted last is first after the next round (ETAs are republished).
        [urgent] = client.submit_batch([spec("b", priority=10)])
        assert client.position(urgent) == 0  # approximate: the priority queue already puts it first
        time.sleep(0.05)
        sched._dispatch()
        assert sched.counters["eta_rounds"] == 2
        after = client.estimates([urgent, *ids])
        assert after[urgent]["position"] == 0 and not after[urgent].get("approximate")
        assert sorted(e["position"] for e in after.values()) == list(range(81))
        assert client.store.counts()["queued"] == 81

        # A job that left the queue has no estimate any more.
        client.cancel([urgent])
        assert client.estimates([urgent]) == {} and client.position(urgent) is None
    finally:
        redis_client.flushdb()


# --- 5. fair-share usage across a scheduler restart ---------------------------------------------------------


def test_fair_share_usage_survives_restart_and_corruption_is_ignored(
    redis_url, redis_client, models_file, tmp_path, caplog
):
    prefix = "rq5"
    settings = scheduler_settings(tmp_path, models_file)
    first = make_scheduler(redis_url, settings, prefix)
    assert first.store.read_fair_share() is None and first.fair.usage("a", time.time()) == 0.0
    first.fair.charge("a", 100.0, time.time())
    first.store.write_fair_share(first.fair.to_json())

    second = make_scheduler(redis_url, settings, prefix)
    now = time.time()
    assert second.fair.usage("a", now) > 0 and second.fair.usage("a", now) == pytest.approx(100.0, rel=1e-3)
    assert second.fair.usage("b", now) == 0.0

    # The restored usage steers the order: a's heavy past puts b first though a submitted first.
    client = FarmClient(redis_url, catalog=default_catalog(models_file), key_prefix=prefix)
    [a_job] = client.submit_batch([spec("a")])
    [b_job] = client.submit_batch([spec("b")])
    second._dispatch()
    assert client.position(b_job) == 0 and client.position(a_job) == 1

    key = Keys(prefix).fair_share
    for corrupt in ("not json", json.dumps([1, 2]), json.dumps({"usage": {"a": "lots"}})):
        redis_client.set(key, corrupt)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="renderfarm.scheduler.scheduler"):
            third = make_scheduler(redis_url, settings, prefix)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("fair-share usage in Redis ignored" in r.getMessage() for r in errors), corrupt
        assert third.fair.usage("a", time.time()) == 0.0
        third._dispatch()  # it still plans
        assert client.position(a_job) == 0  # without the usage, first come first served
    for k in redis_client.scan_iter(f"{prefix}:*"):
        redis_client.delete(k)


def test_a_record_that_is_not_utf8_is_skipped(store):
    store.record_measurement("n1", "tiny-sd15", "bf16", 64, 64, 1, peak_gib=3.0, s_per_step=None)
    store.redis.hset(store.keys.calib_peaks, "tiny-sd15|fp8|64x64|1", b"\xff")
    snapshot, bad = measured_snapshot(store.calibration_records())
    assert len(bad) == 1 and snapshot.floors("tiny-sd15", 64, 64, 1) == {"bf16": 3.0 + MEASURED_MARGIN_GIB}
    store.redis.hset(store.keys.etas, "j-bad", b"\xff")
    assert store.etas(["j-bad"]) == {}


def test_a_nodes_ram_reaches_submit_time_rejection(redis_url, redis_client):
    """Host memory through the real store: a node that reports an 8 GB card in an 8 GB PC with 10 GB of free
    disk cannot take Flux-dev at 1024 (nothing that fits the card fits its RAM, and disk offload's files do
    not fit its disk), and the error says so; the same card with 32 GB of RAM takes it."""
    catalog = default_catalog()
    client = FarmClient(redis_url, catalog=catalog, key_prefix="rq-ram")
    store = client.store
    poor = device_from_spec("NVIDIA GeForce RTX 3070", 7.6, "8.6", ram_gib=8.0, disk_free_gib=10.0)
    store.register_node("pc-8g-ram", node_record(poor))
    job = spec(model="flux-dev", width=1024, height=1024, steps=28)
    with pytest.raises(SpecError) as info:
        client.submit_batch([job], job_ids=["ram-1"])
    message = str(info.value)
    assert "does not fit the machine" in message and "free disk" in message and "pc-8g-ram" in message, message
    assert store.state("ram-1") is None
    store.register_node("pc-32g-ram", node_record(device_from_spec("NVIDIA GeForce RTX 3070", 7.6, "8.6",
                                                                   ram_gib=32.0)))
    client.submit_batch([job], job_ids=["ram-2"])
    assert store.state("ram-2") == "queued"
    for key in redis_client.scan_iter("rq-ram:*"):
        redis_client.delete(key)
