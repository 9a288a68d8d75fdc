"""The Prometheus metrics (renderfarm/metrics.py) read from a real redis-server: jobs driven through the store's
own methods, the output parsed back with prometheus_client's parser."""

from __future__ import annotations

import math
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from renderfarm.cluster.keys import JOB_RENDER_HISTOGRAM, JOB_WAIT_HISTOGRAM
from renderfarm.cluster.store.telemetry import DURATION_BUCKETS
from renderfarm.errors import CorruptRecord
from renderfarm.jobs import Job, JobSpec, JobState
from renderfarm.metrics import METRIC_NAMES, FarmCollector, render_metrics

pytestmark = pytest.mark.integration


def scrape(store, **kw) -> dict[str, list]:
    """sample name -> [(labels, value)] of one scrape."""
    body, content_type = render_metrics(store, **kw)
    assert content_type.startswith("text/plain")
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(samples: dict[str, list], name: str, **labels) -> float:
    found = [v for got, v in samples.get(name, []) if got == labels]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def jobs(n: int, prefix: str, team: str = "default", ago: float = 0.0, **kw) -> list[Job]:
    spec = JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64, steps=2, team=team, **kw)
    now = time.time()
    return [Job(id=f"{prefix}{i}", spec=spec, created_at=now - ago + i * 1e-3) for i in range(n)]


def finish(store, node: str, ids: list[str], url: str = "file:///r/{}.png") -> list[bool]:
    """What a worker's _finish sends for `ids` (already started on `node`): the completions and the histograms,
    in one round."""
    rnd = store.round()
    done = [store.queue_complete(rnd, j, node, [url.format(j)], {"total_s": 0.01}, None) for j in ids]
    counted = store.queue_observe_finished(rnd, node, ids)
    rnd.run()
    outcome = [d() for d in done]
    counted()
    return outcome


def test_jobs_per_state_and_per_team(store):
    store.submit(jobs(3, "a", team="anim"), "b1")
    store.submit(jobs(2, "l", team="light") + jobs(1, "u", team="light", priority=5), "b2")
    store.submit(jobs(1, "d"), "b3")
    assert store.lease("a0", "n1", 60) and store.lease("a1", "n1", 60) and store.start("a1", "n1", 60)
    assert store.lease("l0", "n2", 60)
    assert store.lease("d0", "n2", 60) and store.start("d0", "n2", 60)
    assert finish(store, "n2", ["d0"]) == [True]
    store.cancel("l1")

    got = scrape(store)
    expected = {"queued": 2, "leased": 2, "running": 1, "done": 1, "failed": 0, "cancelled": 1}
    assert {s: value(got, "renderfarm_jobs", state=s) for s in expected} == expected
    teams = {(labels["team"], labels["state"]): v for labels, v in got["renderfarm_team_jobs"]}
    # light's queued job sits in its priority-5 queue: the per-team count adds up the team's queues.
    assert teams == {("anim", "queued"): 1, ("anim", "leased"): 1, ("anim", "running"): 1,
                     ("light", "queued"): 1, ("light", "leased"): 1}


def test_a_scrape_costs_two_requests_however_many_jobs_nodes_and_teams(store):
    for team in ("a", "b", "c"):
        store.submit(jobs(5, team, team=team), f"batch-{team}")
    for i in range(4):
        assert store.lease(f"a{i}", f"n{i}", 60)
        store.register_node(f"n{i}", {"state": "busy", "images": i})
    collector = FarmCollector(store)
    list(collector.collect())  # a new connection's handshake is counted too: done with first
    before = store.round_trips
    families = list(collector.collect())
    assert store.round_trips - before == 2
    assert {f.name for f in families} >= {"renderfarm_jobs", "renderfarm_team_jobs", "renderfarm_node_up"}


def test_node_totals_vram_state_and_heartbeat(store):
    store.register_node("big", {"state": "busy", "images": 12, "megapixels": 0.75, "jobs_done": 6, "jobs_failed": 1,
                                "batches": 3, "render_seconds": 4.5, "model_loads": 2, "oom_escalations": 1,
                                "vram_used_gib": 1.5, "vram_gib": 24, "loaded": ["tiny-sd15", "tiny-flux"]})
    store.register_node("old", {"state": "idle", "images": 3, "vram_gib": 8})  # a worker before model_loads
    store.register_node("gone", {"state": "idle"})
    store.redis.hset(store.keys.node("gone"), "heartbeat", str(time.time() - 60))
    store.register_node("drained", {"state": "idle"})
    assert store.set_draining("drained")

    got = scrape(store)
    assert value(got, "renderfarm_node_images_total", node="big") == 12
    assert value(got, "renderfarm_node_megapixels_total", node="big") == 0.75
    assert value(got, "renderfarm_node_jobs_done_total", node="big") == 6
    assert value(got, "renderfarm_node_jobs_failed_total", node="big") == 1
    assert value(got, "renderfarm_node_model_loads_total", node="big") == 2
    assert value(got, "renderfarm_node_oom_escalations_total", node="big") == 1
    assert value(got, "renderfarm_node_render_seconds_total", node="big") == 4.5
    assert value(got, "renderfarm_node_vram_used_bytes", node="big") == 1.5 * 2**30
    assert value(got, "renderfarm_node_vram_total_bytes", node="big") == 24 * 2**30
    assert value(got, "renderfarm_node_loaded_models", node="big") == 2
    assert value(got, "renderfarm_node_images_total", node="old") == 3
    assert "old" not in {labels["node"] for labels, _ in got["renderfarm_node_model_loads_total"]}, \
        "a total the record lacks is left out, not exported as 0"
    assert "old" not in {labels["node"] for labels, _ in got["renderfarm_node_vram_used_bytes"]}
    states = {labels["node"]: labels["state"] for labels, v in got["renderfarm_node_state"] if v == 1}
    assert states == {"big": "busy", "old": "idle", "gone": "dead", "drained": "draining"}
    assert sum(1 for labels, _ in got["renderfarm_node_state"] if labels["node"] == "big") == 6, "one per state"
    up = {labels["node"]: v for labels, v in got["renderfarm_node_up"]}
    assert up == {"big": 1, "old": 1, "gone": 0, "drained": 1}
    assert time.time() - value(got, "renderfarm_node_heartbeat_timestamp_seconds", node="big") < 30
    # The farm's published dead_after_seconds decides, unless the caller gives one.
    store.publish_settings({"dead_after_seconds": 120})
    assert value(scrape(store), "renderfarm_node_up", node="gone") == 1
    assert value(scrape(store, dead_after_seconds=5), "renderfarm_node_up", node="gone") == 0


def test_a_node_record_that_is_not_a_hash_or_not_json_breaks_nothing(store):
    store.register_node("good", {"state": "idle", "images": 5})
    store.redis.sadd(store.keys.nodes, "broken")
    store.redis.set(store.keys.node("broken"), "not a hash")
    store.register_node("garbled", {"state": "idle"})
    store.redis.hset(store.keys.node("garbled"), mapping={"images": "not json", "megapixels": '"NaN"'})
    got = scrape(store)
    assert value(got, "renderfarm_node_images_total", node="good") == 5
    nodes = {labels["node"] for labels, _ in got["renderfarm_node_up"]}
    assert nodes == {"good", "garbled"}
    assert not [labels for labels, _ in got.get("renderfarm_node_images_total", []) if labels["node"] == "garbled"]


def test_webhook_deliveries_are_zero_until_counted_and_other_counters_are_farm_events(store):
    got = scrape(store)
    assert value(got, "renderfarm_webhook_deliveries_total", outcome="delivered") == 0
    assert value(got, "renderfarm_webhook_deliveries_total", outcome="failed") == 0
    assert value(got, "renderfarm_webhook_attempts_total") == 0
    store.count("webhook_delivered", 3)
    store.count("webhook_failed")
    store.count("webhook_attempts", 6)
    store.count("leases_expired", 2)
    got = scrape(store)
    assert value(got, "renderfarm_webhook_deliveries_total", outcome="delivered") == 3
    assert value(got, "renderfarm_webhook_deliveries_total", outcome="failed") == 1
    assert value(got, "renderfarm_webhook_attempts_total") == 6
    assert value(got, "renderfarm_farm_events_total", event="leases_expired") == 2
    assert {labels["event"] for labels, _ in got["renderfarm_farm_events_total"]} == {"leases_expired"}


def histogram(samples: dict[str, list], name: str) -> tuple[list[tuple[float, float]], float, float]:
    buckets = sorted((float(labels["le"]), v) for labels, v in samples[f"renderfarm_{name}_bucket"])
    return buckets, value(samples, f"renderfarm_{name}_count"), value(samples, f"renderfarm_{name}_sum")


def check_histogram(buckets: list[tuple[float, float]], count: float) -> None:
    """Cumulative, every bound exported, ending at +Inf with the count."""
    assert [b for b, _ in buckets] == [*DURATION_BUCKETS, math.inf]
    assert all(a <= b for (_, a), (_, b) in zip(buckets, buckets[1:])), buckets
    assert buckets[-1][1] == count


def test_histograms_count_each_done_job_once_with_cumulative_buckets(store):
    store.submit(jobs(3, "w", ago=2.0), "b")  # submitted two seconds ago: a wait of about 2 s
    store.submit(jobs(1, "x", ago=7200.0), "b2")  # waited two hours: beyond the last bucket
    ids = ["w0", "w1", "w2", "x0"]
    for j in ids:
        assert store.lease(j, "n1", 60) and store.start(j, "n1", 60)

    empty = scrape(store)
    for name in (JOB_WAIT_HISTOGRAM, JOB_RENDER_HISTOGRAM):
        buckets, count, total = histogram(empty, name)
        check_histogram(buckets, count)
        assert count == 0 and total == 0

    assert finish(store, "n1", ids) == [True] * 4
    got = scrape(store)
    buckets, count, total = histogram(got, JOB_WAIT_HISTOGRAM)
    check_histogram(buckets, count)
    assert count == 4
    by_bound = dict(buckets)
    assert by_bound[1.0] == 0 and by_bound[2.5] == 3 and by_bound[3600.0] == 3 and by_bound[math.inf] == 4
    assert total == pytest.approx(3 * 2.0 + 7200.0, abs=1.0)
    buckets, count, total = histogram(got, JOB_RENDER_HISTOGRAM)
    check_histogram(buckets, count)
    assert count == 4 and dict(buckets)[1.0] == 4 and 0 <= total < 4.0

    # Counted once: the same round again (as redis-py or a NOSCRIPT resend would) adds nothing.
    rnd = store.round()
    again = store.queue_observe_finished(rnd, "n1", ids)
    rnd.run()
    assert again() == 0
    assert histogram(scrape(store), JOB_WAIT_HISTOGRAM)[1] == 4


def test_a_discarded_result_or_another_nodes_job_does_not_count(store):
    store.submit(jobs(3, "k"), "b")
    for j in ("k0", "k1"):
        assert store.lease(j, "n1", 60) and store.start(j, "n1", 60)
    assert store.lease("k2", "n2", 60) and store.start("k2", "n2", 60)
    store.cancel("k1")  # cancelled while it rendered: its result is discarded
    assert finish(store, "n1", ["k0", "k1", "k2"]) == [True, False, False]
    assert store.state("k2") is JobState.RUNNING
    got = scrape(store)
    assert histogram(got, JOB_RENDER_HISTOGRAM)[1] == 1
    assert histogram(got, JOB_WAIT_HISTOGRAM)[1] == 1


def test_a_round_sent_again_after_noscript_counts_once(store):
    store.submit(jobs(2, "s"), "b")
    for j in ("s0", "s1"):
        assert store.lease(j, "n1", 60) and store.start(j, "n1", 60)
    store.redis.script_flush()  # a restarted Redis: neither the transition nor the histogram script is known
    before = store.round_trips
    assert finish(store, "n1", ["s0", "s1"]) == [True, True]
    assert store.round_trips - before == 3, "the round, loading both scripts in one request, the round again"
    assert histogram(scrape(store), JOB_RENDER_HISTOGRAM)[1] == 2
    # Only the histogram script forgotten... and only the transition script: each way, once.
    store.submit(jobs(2, "t"), "b2")
    for j in ("t0", "t1"):
        assert store.lease(j, "n1", 60) and store.start(j, "n1", 60)
    store.redis.script_flush()
    store.redis.script_load(store._observe.script)  # known: it runs in the first send, before the moves do
    assert finish(store, "n1", ["t0"]) == [True]
    store.redis.script_flush()
    store.redis.script_load(store._transition.script)
    assert finish(store, "n1", ["t1"]) == [True]
    assert histogram(scrape(store), JOB_RENDER_HISTOGRAM)[1] == 4


def test_a_histogram_that_is_not_a_hash_of_numbers_is_refused_and_the_jobs_still_complete(store):
    store.submit(jobs(2, "h"), "b")
    for j in ("h0", "h1"):
        assert store.lease(j, "n1", 60) and store.start(j, "n1", 60)
    store.redis.hset(store.keys.histogram(JOB_WAIT_HISTOGRAM), "1.0", "many")
    with pytest.raises(CorruptRecord, match="not a number"):
        finish(store, "n1", ["h0"])
    assert store.state("h0") is JobState.DONE
    assert not store.redis.exists(store.keys.histogram(JOB_RENDER_HISTOGRAM)), "checked before any write"
    store.redis.delete(store.keys.histogram(JOB_WAIT_HISTOGRAM))
    store.redis.set(store.keys.histogram(JOB_RENDER_HISTOGRAM), "x")
    with pytest.raises(CorruptRecord, match="not a hash"):
        finish(store, "n1", ["h1"])
    assert store.state("h1") is JobState.DONE


def test_every_exported_sample_name_is_in_metric_names_and_openmetrics_on_request(store):
    store.register_node("n1", {"state": "idle", "images": 1, "megapixels": 0.1, "jobs_done": 1, "jobs_failed": 0,
                               "batches": 1, "render_seconds": 1.0, "model_loads": 1, "oom_escalations": 0,
                               "vram_used_gib": 1.0, "vram_gib": 8, "loaded": []})
    store.submit(jobs(1, "q", team="t"), "b")
    store.count("leases_expired")
    names = set(scrape(store))
    assert names == METRIC_NAMES, (names ^ METRIC_NAMES)
    body, content_type = render_metrics(store, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")
    help_lines = [line for line in render_metrics(store)[0].decode().splitlines() if line.startswith("# HELP")]
    assert help_lines and all(len(line.split(" ", 3)) == 4 for line in help_lines), "every metric has its HELP"
