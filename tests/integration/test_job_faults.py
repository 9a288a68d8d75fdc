"""A job's fault is not a node's, on a real farm (real redis-server, real Ray, real diffusers stand-ins): a job
for weights that are absent fails once with the reason and drains no node, and once the nodes have said what
they can load, such a job is refused at submit. The catalog (tests/conftest.py) has a model `broken` whose
source folder does not exist."""

from __future__ import annotations

import pytest
import yaml

from renderfarm.client import FarmClient
from renderfarm.errors import SpecError
from renderfarm.jobs import Job, JobSpec, JobState
from renderfarm.planning.catalog import DEFAULT_MODELS_FILE, Catalog

pytestmark = pytest.mark.integration


@pytest.fixture
def client(farm_client):
    return farm_client


def test_every_node_says_what_it_can_load_and_why_not(farm, client):
    nodes = {n["name"]: n for n in client.store.nodes()}
    assert set(nodes) == {"big", "small"}
    for node in nodes.values():
        assert set(node["loadable"]) == {"tiny-sd15", "tiny-flux"}
        assert "weights not found on this node" in node["unloadable"]["broken"]
        assert "/nonexistent/model/folder" in node["unloadable"]["broken"]


def test_a_job_for_absent_weights_fails_once_and_drains_no_node(farm, client):
    # Enqueued as a job submitted before any node had reported would be (the store takes it as given).
    broken = [Job(id=f"broken-{i}", spec=JobSpec(model="broken", prompt=f"p{i}", width=64, height=64, seed=i))
              for i in range(4)]
    client.store.submit(broken, "broken-batch")
    jobs = client.wait([j.id for j in broken], timeout=180)
    for job in jobs:
        assert job.state is JobState.FAILED
        assert job.attempts == 1, "a job fault is not retried: no other node could mend it"
        assert "ModelSourceError" in job.error and "/nonexistent/model/folder" in job.error
    assert not any(n.get("draining") for n in client.store.nodes()), "no node is blamed for the job"
    stats = farm.scheduler_stats()
    assert stats["auto_drained"] == 0
    assert all(w["failures"] == 0 and not w["draining"] for w in stats["workers"].values())
    # The farm still takes and renders good work.
    (good,) = client.wait(client.submit_batch([{"model": "tiny-sd15", "prompt": "a fox", "width": 64,
                                                "height": 64, "steps": 2}]), timeout=180)
    assert good.state is JobState.DONE


def test_a_model_no_node_can_load_is_refused_at_submit(farm, client):
    before = client.store.counts()
    with pytest.raises(SpecError) as refused:
        client.submit_batch([{"model": "tiny-sd15", "prompt": "fine"}, {"model": "broken", "prompt": "a fox"}])
    message = str(refused.value)
    assert message.startswith("jobs[1]: model: no node of this farm can load 'broken'")
    assert "big: weights not found on this node" in message and "nothing was enqueued" in message
    assert client.store.counts() == before


def test_a_family_listed_for_planning_only_is_refused_at_submit(farm):
    # Every family of the packaged catalog renders (tests/actors/test_families.py holds that); a catalog may
    # still list one for the planner only, as this one lists SD3.
    data = yaml.safe_load(DEFAULT_MODELS_FILE.read_text())
    data["families"]["sd3"]["planning_only"] = True
    client = FarmClient(farm.redis_url, catalog=Catalog.from_dict(data))
    try:
        with pytest.raises(SpecError, match=r"jobs\[0\]: model: 'sd3.5-large' \(family sd3\) is listed for "
                                            r"planning only: no worker renders it yet; nothing was enqueued"):
            client.submit_batch([{"model": "sd3.5-large", "prompt": "a fox"}])
    finally:
        client.store.close()
