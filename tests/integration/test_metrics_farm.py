"""The metrics of a real farm (Redis + Ray + two simulated nodes rendering tiny-sd15): a batch moves the render-time
histogram by its number of jobs, and the nodes' totals by its images."""

from __future__ import annotations

import pytest

from renderfarm.client import FarmClient
from renderfarm.cluster.store import Store
from renderfarm.jobs import JobState
from renderfarm.planning.catalog import Catalog
from tests.integration.test_metrics import histogram, scrape

pytestmark = pytest.mark.integration


def test_a_batch_through_the_farm_moves_the_histograms_by_its_jobs(farm, models_file):
    client = FarmClient(farm.redis_url, catalog=Catalog.load(models_file))
    with Store.open(farm.redis_url) as store:
        before = scrape(store)
        specs = [{"model": "tiny-sd15", "prompt": f"metrics {i}", "width": 64, "height": 64, "steps": 2, "seed": i,
                  "num_images": 1 + i % 2} for i in range(6)]
        ids = client.submit_batch(specs, batch_id="metrics")
        assert [job.state for job in client.wait(ids, timeout=300)] == [JobState.DONE] * 6
        after = scrape(store)

    for name in ("job_render_seconds", "job_wait_seconds"):
        buckets, count, total = histogram(after, name)
        assert count - histogram(before, name)[1] == 6, name
        assert total >= histogram(before, name)[2] and buckets[-1][1] == count

    def images(samples) -> float:
        return sum(v for _, v in samples.get("renderfarm_node_images_total", []))

    assert images(after) - images(before) == 9  # 1 + 2 + 1 + 2 + 1 + 2
    nodes = {labels["node"] for labels, v in after["renderfarm_node_up"] if v == 1}
    assert nodes == {"big", "small"}
    assert all(v >= 1 for labels, v in after["renderfarm_node_model_loads_total"] if labels["node"] in nodes), \
        "each node warmed tiny-sd15: one load at least"
