"""The metrics' pure parts (renderfarm/metrics.py): a stored histogram made cumulative, team names from queue keys,
node states. What Redis holds is read in tests/integration/test_metrics.py."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry

from renderfarm.cluster.keys import Keys
from renderfarm.cluster.store.telemetry import DURATION_BUCKETS
from renderfarm.metrics import METRIC_NAMES, FarmCollector, _histogram, _node_state, _team_of


def _buckets(metric) -> list[tuple[float, float]]:
    return [(float(s.labels["le"]), s.value) for s in metric.samples if s.name.endswith("_bucket")]


def _sample(metric, suffix: str) -> float:
    return next(s.value for s in metric.samples if s.name.endswith(suffix))


def test_a_stored_histogram_is_exported_cumulative_with_every_bound():
    raw = {b"0.05": b"2", b"2.5": b"3", b"+Inf": b"1", b"sum": b"9.5", b"count": b"6"}
    metric = _histogram("job_wait_seconds", "help", raw)
    buckets = _buckets(metric)
    assert [b for b, _ in buckets] == [*DURATION_BUCKETS, math.inf]
    by_bound = dict(buckets)
    assert by_bound[0.05] == 2 and by_bound[1.0] == 2 and by_bound[2.5] == 5 and by_bound[3600.0] == 5
    assert by_bound[math.inf] == 6 == _sample(metric, "_count")
    assert _sample(metric, "_sum") == 9.5


def test_a_bound_of_another_version_is_kept_and_garbage_is_skipped():
    raw = {b"7.0": b"4", b"1.0": b"1", b"junk": b"3", b"5.0": b"not a number", b"sum": b"30"}
    buckets = dict(_buckets(_histogram("h", "help", raw)))
    assert buckets[7.0] == 5 and buckets[5.0] == 1 and buckets[math.inf] == 5
    assert all(a <= b for a, b in zip(list(buckets.values()), list(buckets.values())[1:]))


def test_an_empty_histogram_exports_zeros():
    metric = _histogram("h", "help", {})
    assert all(v == 0 for _, v in _buckets(metric)) and _sample(metric, "_count") == 0


def test_team_of_a_queue_key():
    prefix = Keys().queue("x", 0).removesuffix("x:0")
    assert _team_of(Keys().queue("anim", 5), prefix) == "anim"
    assert _team_of(Keys().queue("fx.team-2", -3), prefix) == "fx.team-2"
    assert _team_of("rf:queue:anim", prefix) is None
    assert _team_of("other:queue:anim:0", prefix) is None


def test_node_state_as_the_dashboard_shows_it():
    fresh = {"state": "busy", "draining": False}
    assert _node_state(fresh, 100.0, now=105.0, dead_after=15) == "busy"
    assert _node_state(fresh, 100.0, now=120.0, dead_after=15) == "dead"
    assert _node_state(fresh, None, now=100.0, dead_after=15) == "dead"
    assert _node_state({"state": "idle", "draining": True}, 100.0, now=101.0, dead_after=15) == "draining"
    assert _node_state({"state": 3, "draining": None}, 100.0, now=101.0, dead_after=15) == "unknown"


def test_registering_the_collector_reads_nothing():
    class NoStore:
        def __getattr__(self, name):
            raise AssertionError(f"the store was touched: {name}")

    CollectorRegistry(auto_describe=True).register(FarmCollector(NoStore()))


def test_metric_names_are_prefixed_and_carry_their_units():
    assert all(name.startswith("renderfarm_") for name in METRIC_NAMES)
    assert {"renderfarm_node_images_total", "renderfarm_node_vram_used_bytes", "renderfarm_job_wait_seconds_bucket",
            "renderfarm_job_render_seconds_sum", "renderfarm_webhook_deliveries_total"} <= METRIC_NAMES
