"""Every reader of a finished job's images through the blob store, in a real redis-server: the client
(`result`, `result_urls`), the dashboard's gallery, the chaos count; through a directory and through a real
S3-compatible server; and the fallback to the Redis result hash for records written before the upgrade (no
`blobs` field). The retention sweep run by the scheduler's ReconcileManager is tested here too.

The records are written as the worker's completion will write them: the job done, its `blobs` field a JSON
list of the images' URLs, in order, and `images` their count."""

from __future__ import annotations

import io
import os
import time
import urllib.request

import pytest
from PIL import Image, PngImagePlugin

from renderfarm.chaos import _holds_its_images
from renderfarm.client import FarmClient
from renderfarm.cluster.blobs import open_blob_store, result_keys
from renderfarm.dashboard.queries import gallery_entry
from renderfarm.errors import BlobStoreError, ResultUnavailable
from renderfarm.jobs import Job, JobSpec
from tests.helpers import legacy_result, rayless_scheduler, wait_until

pytestmark = pytest.mark.integration


def png(text: str, colour=(200, 30, 30)) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    out = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def finish(store, job_id: str, *, num_images: int = 1, redis_images=(), blobs=None) -> None:
    """A job done: its images in the Redis result (`redis_images`, the old way) or as blob URLs (`blobs`)."""
    spec = JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64, num_images=num_images)
    store.submit([Job(id=job_id, spec=spec)], f"batch-{job_id}")
    assert store.lease(job_id, "n1", 30) and store.start(job_id, "n1", 30)
    assert store.complete(job_id, "n1", list(blobs or []), {"denoise": 0.1}, None)
    if blobs is None:
        legacy_result(store, job_id, list(redis_images))


def put_images(blob_store, job_id: str, images: list[bytes]) -> list[str]:
    return [blob_store.put(key, data) for key, data in zip(result_keys(job_id, len(images)), images)]


@pytest.fixture(scope="module")
def s3_options():
    pytest.importorskip("boto3", reason="the S3 blob store needs boto3 (pip install 'renderfarm[s3]')")
    pytest.importorskip("moto.server", reason="the S3 test server is moto[server] (the test extra)")
    from tests.integration.test_blobs_s3 import moto_s3

    with moto_s3() as options:
        yield options


@pytest.fixture(params=["directory", "s3"])
def blob_store(request, tmp_path, store, monkeypatch):
    """The farm's result store, one of each kind. For S3 the head publishes the endpoint and region (as the farm
    does with its farm-wide settings) and a reader's credentials come from its AWS_* environment."""
    if request.param == "directory":
        return open_blob_store(str(tmp_path / "results"))
    options = request.getfixturevalue("s3_options")
    store.publish_settings({"result_store": "s3://renders/farm", "result_store_endpoint": options["endpoint_url"],
                            "result_store_region": options["region"]})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", options["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options["aws_secret_access_key"])
    return open_blob_store("s3://renders/farm", **options)


@pytest.fixture
def client(store, redis_url):
    client = FarmClient(redis_url)
    yield client
    client.store.close()


# --- the client --------------------------------------------------------------------------------------------


def test_the_client_reads_a_result_from_the_blob_store(store, client, blob_store):
    images = [png("a fox, Seed: 1"), png("a fox, Seed: 2", (30, 200, 30))]
    urls = put_images(blob_store, "j1", images)
    finish(store, "j1", num_images=2, blobs=urls)
    assert store.redis.exists(store.keys.result("j1")) == 0, "nothing of the images in Redis"
    result = client.result("j1")
    assert result.png == images
    assert result.parameters == ["a fox, Seed: 1", "a fox, Seed: 2"]
    assert [img.getpixel((0, 0)) for img in result.images] == [(200, 30, 30), (30, 200, 30)]


def test_the_client_falls_back_to_the_redis_result_of_an_old_record(store, client):
    images = [png("old, Seed: 7")]
    finish(store, "old", redis_images=images)
    assert store.result_blobs("old") is None
    assert client.result("old").png == images
    with pytest.raises(ResultUnavailable, match="kept in Redis"):
        client.result_urls("old")


def test_an_expired_blob_is_result_unavailable(store, client, blob_store):
    urls = put_images(blob_store, "gone", [png("x")])
    finish(store, "gone", blobs=urls)
    blob_store.delete(urls[0])  # as the retention sweep does
    with pytest.raises(ResultUnavailable, match="expired") as caught:
        client.result("gone")
    assert isinstance(caught.value.__cause__, BlobStoreError) and caught.value.__cause__.kind == "missing"


def test_an_unreachable_store_is_said_as_such_not_as_expired(store, client, monkeypatch):
    from renderfarm.cluster.processes import free_port

    pytest.importorskip("boto3", reason="the S3 blob store needs boto3 (pip install 'renderfarm[s3]')")
    finish(store, "far", blobs=["s3://renders/farm/far/t-0.png"])
    closed = free_port()  # nothing listens there
    store.publish_settings({"result_store_endpoint": f"http://127.0.0.1:{closed}"})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    with pytest.raises(BlobStoreError, match="unreachable") as caught:
        client.result("far")
    assert f"127.0.0.1:{closed}" in str(caught.value)


def test_result_urls_are_presigned_where_the_store_can(store, client, blob_store):
    images = [png("a"), png("b")]
    urls = put_images(blob_store, "j2", images)
    finish(store, "j2", num_images=2, blobs=urls)
    links = client.result_urls("j2", expires_s=300)
    if blob_store.scheme == "s3":
        assert all(link.startswith("http://127.0.0.1:") and "X-Amz-Expires=300" in link for link in links)
        fetched = []
        for link in links:
            with urllib.request.urlopen(link, timeout=30) as response:
                fetched.append(response.read())
        assert fetched == images
    else:
        assert links == urls  # a directory has no HTTP URL: the blob's own file URL
    store.submit([Job(id="queued", spec=JobSpec(model="tiny-sd15", prompt="p", width=64, height=64))], "b2")
    with pytest.raises(ResultUnavailable, match="not done"):
        client.result_urls("queued")


# --- the dashboard and the chaos count ------------------------------------------------------------------


def test_the_gallery_shows_the_first_image_from_the_blob_store_or_redis(store, blob_store):
    first, second = png("first\nSteps: 3, Sampler: Euler, Seed: 5"), png("second")
    finish(store, "new", num_images=2, blobs=put_images(blob_store, "new", [first, second]))
    finish(store, "old", redis_images=[png("old one\nSteps: 2, Sampler: Euler, Seed: 9")])
    entry = gallery_entry(store, "new")
    assert entry["image"] == first and entry["from_image"] and entry["settings"]["Seed"] == "5"
    assert gallery_entry(store, "old")["settings"]["Seed"] == "9"
    blob_store.delete(store.result_blobs("new")[0])
    gone = gallery_entry(store, "new")
    assert gone["image"] is None and not gone["from_image"]  # expired: shown without its image, no error


def test_the_chaos_count_checks_the_blob_store(store, blob_store):
    images = [png("1"), png("2")]
    finish(store, "whole", num_images=2, blobs=put_images(blob_store, "whole", images))
    one_url = put_images(blob_store, "twice", images[:1])[0]
    finish(store, "twice", num_images=2, blobs=[one_url, one_url])  # the same blob listed twice
    finish(store, "short", num_images=2, blobs=put_images(blob_store, "short", images[:1]))
    urls = put_images(blob_store, "lost", images)
    finish(store, "lost", num_images=2, blobs=urls)
    blob_store.delete(urls[1])
    finish(store, "old", num_images=1, redis_images=images[:1])
    verdict = {job_id: _holds_its_images(store, store.get(job_id))
               for job_id in ("whole", "twice", "short", "lost", "old")}
    assert verdict == {"whole": True, "twice": False, "short": False, "lost": False, "old": True}


# --- retention ------------------------------------------------------------------------------------------


def test_the_scheduler_sweeps_blobs_older_than_the_result_ttl(store, redis_url, tmp_path, models_file):
    results = tmp_path / "results"
    sched = rayless_scheduler(redis_url, {
        "data_dir": str(tmp_path / "farm"), "models_file": str(models_file), "result_store": str(results),
        "result_ttl_seconds": 3600, "result_sweep_seconds": 600,
    })
    blobs = open_blob_store(str(results))
    now = time.time()
    old = put_images(blobs, "old", [b"1", b"2"])
    new = put_images(blobs, "new", [b"3"])
    for url in old:
        path = url.removeprefix("file://")
        os.utime(path, (now - 3700, now - 3700))

    sched.steps["reconcile"]()
    wait_until(lambda: not sched.reconciler.sweeping.is_alive(), 30, "the sweep thread to end")
    assert [blobs.exists(u) for u in old + new] == [False, False, True]
    assert store.counters()["blobs_swept"] == 2

    later = put_images(blobs, "later", [b"4"])[0]
    os.utime(later.removeprefix("file://"), (now - 3700, now - 3700))
    sweeper = sched.reconciler.sweeping
    sched.steps["reconcile"]()
    assert sched.reconciler.sweeping is sweeper and blobs.exists(later), "the next sweep waits its cadence"
    sched.reconciler.next_sweep = 0.0  # its time has come
    sched.steps["reconcile"]()
    wait_until(lambda: not sched.reconciler.sweeping.is_alive(), 30, "the second sweep to end")
    assert not blobs.exists(later) and blobs.exists(new[0])
    assert store.counters()["blobs_swept"] == 3
    sched.store.close()


def test_a_failing_sweep_is_logged_and_the_scheduler_goes_on(store, redis_url, tmp_path, models_file, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"not a directory")
    sched = rayless_scheduler(redis_url, {
        "data_dir": str(tmp_path / "farm"), "models_file": str(models_file), "result_store": str(blocker / "results"),
    })
    assert sched.reconciler.sweep_blobs() == 0
    assert "result store sweep failed" in caplog.text and str(blocker) in caplog.text
    sched.store.close()
