"""Webhooks end to end: a real farm (Redis, Ray, scheduler, a worker rendering the tiny SD 1.5 stand-in) whose
head delivers a job's and its batch's webhooks to a local receiver, signed with the team's secret."""

from __future__ import annotations

import json

import pytest

from renderfarm.cluster.redis_server import connect
from renderfarm.cluster.store import Store
from renderfarm.webhooks import deliveries, team_secret, verify
from tests.helpers import wait_until
from tests.integration.test_webhooks import WAIT, Receiver

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def webhook_farm(tmp_path_factory, models_file):
    """A one-node farm whose head may deliver to loopback (the receiver's address)."""
    from renderfarm.config import NodeDeclaration, Settings
    from renderfarm.farm import Farm

    settings = Settings(data_dir=tmp_path_factory.mktemp("farm"), models_file=models_file, max_batch=4,
                        lease_seconds=60, webhook_allow_private=True)
    farm = Farm(settings, [NodeDeclaration(name="big", gpu="Quadro RTX 6000", vram_gib=24, compute_capability="7.5")],
                warm_models=["tiny-sd15"])
    farm.start()
    try:
        yield farm
    finally:
        farm.stop()


def test_a_rendered_job_and_its_batch_are_posted_by_the_head(webhook_farm):
    hook = Receiver()
    client = webhook_farm.client()
    try:
        spec = {"model": "tiny-sd15", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": 1,
                "webhook": hook.url}
        [job_id] = client.submit_batch([spec], batch_id="e2e", webhook=hook.url.replace("/hook", "/batch"))
        requests = {r["headers"]["X-Renderfarm-Event"]: r for r in (hook.next(), hook.next())}
        assert set(requests) == {"job.done", "batch.finished"}
        with connect(webhook_farm.redis_url) as redis_client:
            store = Store(redis_client)
            secret = team_secret(store.redis, store.keys, "default", create=False)
            for request in requests.values():
                verify(secret.secret, request["headers"], request["body"])
            job = json.loads(requests["job.done"]["body"])["job"]
            assert job["id"] == job_id and job["state"] == "done" and job["node"] == "big" and job["images"] == 1
            assert job["results"] == store.result_blobs(job_id) and len(job["results"]) == 1
            batch = json.loads(requests["batch.finished"]["body"])["batch"]
            assert batch["jobs"] == [{"id": job_id, "state": "done", "error": None}]
            assert requests["batch.finished"]["path"].startswith("/batch")
            records = wait_until(lambda: [d for d in deliveries(store, state="delivered")] if len(
                deliveries(store, state="delivered")) == 2 else None, WAIT, "both deliveries recorded")
            assert {r["event"] for r in records} == {"job.done", "batch.finished"}
            assert store.counters()["webhook_delivered"] == 2
    finally:
        client.store.close()
        hook.close()


def test_a_batch_webhook_through_the_http_api(webhook_farm):
    """POST /v1/batches with a `webhook`: posted once when the batch finishes, although the API process runs a
    dispatcher of its own beside the head's; the delivery is listed by /v1/webhooks/deliveries."""
    import httpx

    from tests.helpers import ApiServer

    hook = Receiver()
    try:
        with ApiServer(webhook_farm.redis_url, webhooks=True, settings=webhook_farm.settings) as api:
            with httpx.Client(base_url=api.url, timeout=60) as http:
                spec = {"model": "tiny-sd15", "prompt": "a harbour", "width": 64, "height": 64, "steps": 2}
                reply = http.post("/v1/batches", json={"jobs": [spec, {**spec, "seed": 2}], "webhook": hook.url})
                assert reply.status_code == 201, reply.text
                batch = reply.json()["batch_id"]
                posted = hook.next()
                assert posted["headers"]["X-Renderfarm-Event"] == "batch.finished"
                assert json.loads(posted["body"])["batch"]["id"] == batch
                # (the receiver has the POST before the sender records its answer: wait for the record, not the POST)
                listed = wait_until(lambda: [d["state"] for d in http.get(
                    f"/v1/webhooks/deliveries?batch={batch}").json()["deliveries"]] == ["delivered"],
                    WAIT, "the delivery listed as delivered")
                assert listed
                bad = http.post("/v1/batches", json={"jobs": [spec], "webhook": "ftp://example.com/x"})
                assert bad.status_code == 422 and "webhook" in bad.json()["detail"]
        import queue

        with pytest.raises(queue.Empty):  # nothing more arrives: the batch was posted once, by one dispatcher
            hook.requests.get(timeout=3)
    finally:
        hook.close()
