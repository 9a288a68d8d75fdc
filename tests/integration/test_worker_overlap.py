"""A node writes one batch's images and completes its jobs while the next batch renders (actors/worker.py:
`_render`), and every torch call runs on one thread of its own. The worker as a plain class (no Ray), called
from two threads as the Ray actor calls it (farm.py: two threads for its calls), rendering a real diffusers
stand-in, its jobs and node record in a real redis-server. The timing is held by gates around the real result
store and the real step callback, so nothing depends on how fast this machine is."""

from __future__ import annotations

import threading
import time

import pytest

from renderfarm.actors.worker import RenderWorker
from renderfarm.config import Settings
from renderfarm.jobs import Job, JobSpec, JobState

pytestmark = pytest.mark.integration

NODE = {"name": "ov", "vram_gib": 8, "compute_capability": "8.6", "simulated": True}
WAIT_S = 120  # generous: the gates, not this, decide the order


class GatedStore:
    """The worker's real result store, with the puts of some jobs held until `release` is set."""

    def __init__(self, inner, held: set[str]):
        self.inner, self.held = inner, held
        self.writing, self.release = threading.Event(), threading.Event()

    def put(self, key: str, data: bytes) -> str:
        if key.split("/")[-1].rsplit("-", 2)[0] in self.held:  # <day>/<job>-<token>-<i>.png
            self.writing.set()
            assert self.release.wait(WAIT_S), "the test never released the held images"
        return self.inner.put(key, data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _batch(store, prefix: str, n: int) -> list[str]:
    jobs = [Job(id=f"{prefix}-{i}", spec=JobSpec(model="tiny-sd15", prompt=f"{prefix} {i}", width=64, height=64,
                                                  steps=3, seed=i)) for i in range(n)]
    store.submit(jobs, prefix)
    for job in jobs:
        assert store.lease(job.id, "ov", 60)
    return [job.id for job in jobs]


def _call(worker: RenderWorker, ids: list[str], out: dict, threads: dict, key: str) -> threading.Thread:
    def run():
        threads[key] = threading.get_ident()
        out[key] = worker.render(ids)

    thread = threading.Thread(target=run, name=f"call-{key}")
    thread.start()
    return thread


def test_the_next_batch_renders_while_the_last_one_finishes_and_the_record_follows(redis_url, store, tmp_path):
    settings = Settings(data_dir=tmp_path, torch_threads=1, heartbeat_seconds=0.2, lease_seconds=30.0)
    worker = RenderWorker("ov", redis_url, settings.model_dump(mode="json"), NODE)
    a, b = _batch(store, "ova", 2), _batch(store, "ovb", 1)
    worker.results.blobs = gated = GatedStore(worker.results.blobs, set(a))
    step_threads: list[tuple[str | None, int]] = []
    b_rendering, release_b = threading.Event(), threading.Event()
    real_step = worker.progress.step

    def step(n: int, steps: int) -> None:  # the real callback, with B held at its first step
        job = worker.progress._job
        step_threads.append((job, threading.get_ident()))
        if job == b[0] and n == 1:
            b_rendering.set()
            assert release_b.wait(WAIT_S)
        real_step(n, steps)

    worker.progress.step = step
    out: dict = {}
    callers: dict = {}
    try:
        ta = _call(worker, a, out, callers, "a")
        assert gated.writing.wait(WAIT_S), "batch A never reached its images"
        tb = _call(worker, b, out, callers, "b")
        assert b_rendering.wait(WAIT_S), "batch B did not render while batch A's images were being written"
        assert {store.get(j).state for j in a} == {JobState.RUNNING}  # A rendered, not yet finished
        gated.release.set()
        ta.join(WAIT_S)
        assert out["a"]["done"] == a, out
        record = store.nodes()[0]
        # A's finishing did not mark the node idle: B renders, and the record says so
        assert (record["state"], record["current_job"]) == ("busy", b[0]), record
        release_b.set()
        tb.join(WAIT_S)
        assert out["b"]["done"] == b, out
        record = store.nodes()[0]
        assert (record["state"], record["current_job"], record["jobs_done"]) == ("idle", None, 3), record
    finally:
        gated.release.set()
        release_b.set()
        worker.shutdown()
    # Every step of both batches ran on one thread, which is neither caller's: torch is called from one thread.
    assert {job for job, _ in step_threads} == {a[0], b[0]}
    torch_threads = {ident for _, ident in step_threads}
    assert len(torch_threads) == 1 and not torch_threads & {callers["a"], callers["b"], threading.get_ident()}


def test_batches_finish_in_the_order_they_rendered(redis_url, store, tmp_path):
    """A batch whose images wait (a slow store) holds back the finishing of the batch rendered after it, and
    the node's next render: finished results never overtake, and images do not pile up."""
    settings = Settings(data_dir=tmp_path, torch_threads=1, heartbeat_seconds=0.2, lease_seconds=30.0)
    worker = RenderWorker("ov", redis_url, settings.model_dump(mode="json"), NODE)
    a, b, c = _batch(store, "ooa", 1), _batch(store, "oob", 1), _batch(store, "ooc", 1)
    worker.results.blobs = gated = GatedStore(worker.results.blobs, set(a))
    out: dict = {}
    callers: dict = {}
    try:
        ta = _call(worker, a, out, callers, "a")
        assert gated.writing.wait(WAIT_S)
        tb = _call(worker, b, out, callers, "b")
        tc = _call(worker, c, out, callers, "c")
        time.sleep(2.0)  # ample for B to render (~0.1 s) and, were it allowed, to finish and let C render
        # B rendered; its start rides in A's finishing request (actors/batch_start.py), so it is leased still
        assert store.get(b[0]).state is JobState.LEASED, "B finished before A, which rendered first"
        with worker._books:
            riding = [job.id for jobs, _, _ in worker._riding for job in jobs]
        assert riding == b, "C began while two finished batches were held"
        assert store.get(c[0]).state is JobState.LEASED
        gated.release.set()
        for thread in (ta, tb, tc):
            thread.join(WAIT_S)
    finally:
        gated.release.set()
        worker.shutdown()
    assert [out[k]["done"] for k in "abc"] == [a, b, c], out
    finished = [store.get(ids[0]).finished_at for ids in (a, b, c)]
    assert finished == sorted(finished)


def _poll(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize("inline", [False, True], ids=["finishing beside", "finishing on the torch thread"])
def test_the_next_batch_starts_in_the_request_that_finishes_the_one_before(redis_url, store, tmp_path, inline):
    """Two batches back to back cost the node three requests, not four: the second's start rides in the first's
    finish (actors/batch_start.py), on a node that finishes beside the next render (a card; here one torch
    thread of two cores) as on one that finishes on its torch thread (a CPU node with every core)."""
    import os

    threads = (os.cpu_count() or 1) if inline else 1
    settings = Settings(data_dir=tmp_path, torch_threads=threads, heartbeat_seconds=30, lease_seconds=30.0)
    worker = RenderWorker("ov", redis_url, settings.model_dump(mode="json"), NODE)
    assert worker._finish_inline is inline
    warm, a, b = _batch(store, "rtw", 1), _batch(store, "rta", 1), _batch(store, "rtb", 1)
    specs = {job_id: store.get(job_id).spec.model_dump(mode="json") for job_id in warm + a + b}
    worker.results.blobs = gated = GatedStore(worker.results.blobs, set(a))
    out: dict = {}
    try:
        assert worker.render(warm, [specs[j] for j in warm])["done"] == warm  # the scripts loaded, the model warm
        before = worker.store.round_trips
        ta = threading.Thread(target=lambda: out.update(a=worker.render(a, [specs[j] for j in a])))
        ta.start()
        assert gated.writing.wait(WAIT_S), "batch A never reached its images"
        tb = threading.Thread(target=lambda: out.update(b=worker.render(b, [specs[j] for j in b])))
        tb.start()
        if inline:  # B waits for the torch thread, which finishes A: A's request takes B's start along
            _poll(lambda: bool(worker._arrived), "batch B never arrived")
        else:  # B renders beside A's finishing: its start waits for A's request
            _poll(lambda: bool(worker._riding), "batch B never began")
            assert store.get(b[0]).state is JobState.LEASED
        gated.release.set()
        ta.join(WAIT_S)
        tb.join(WAIT_S)
        assert (out["a"]["done"], out["b"]["done"]) == (a, b), out
        assert worker.store.round_trips - before == 3, "A's start; A's finish with B's start; B's finish"
        job = store.get(b[0])
        assert job.state is JobState.DONE and store.run_deadline(b[0]) is not None, "B ran, its deadline fixed"
        record = store.nodes()[0]
        assert (record["state"], record["current_job"], record["jobs_done"]) == ("idle", None, 3), record
    finally:
        gated.release.set()
        worker.shutdown()


def test_a_riding_start_goes_alone_when_the_batch_before_fails_to_finish(redis_url, store, tmp_path):
    """Finishing beside the next render, a batch whose images the store refuses never sends its finishing
    request: the start riding in it is sent alone, and the next batch finishes as it should."""
    settings = Settings(data_dir=tmp_path, torch_threads=1, heartbeat_seconds=30, lease_seconds=30.0)
    worker = RenderWorker("ov", redis_url, settings.model_dump(mode="json"), NODE)
    a, b = _batch(store, "rfa", 1), _batch(store, "rfb", 1)
    gated = GatedStore(worker.results.blobs, set(a))
    real_put = gated.put

    def refusing_put(key: str, data: bytes) -> str:
        real_put(key, data)  # held until released, then refused
        if key.split("/")[-1].rsplit("-", 2)[0] in set(a):
            from renderfarm.cluster.blobs import BlobStoreError

            raise BlobStoreError("blob store full: no space left", "full")
        return gated.inner.put(key, data)

    gated.put = refusing_put
    worker.results.blobs = gated
    out: dict = {}
    try:
        ta = threading.Thread(target=lambda: out.update(a=worker.render(a)))
        ta.start()
        assert gated.writing.wait(WAIT_S)
        tb = threading.Thread(target=lambda: out.update(b=worker.render(b)))
        tb.start()
        _poll(lambda: bool(worker._riding), "batch B never began")
        gated.release.set()
        ta.join(WAIT_S)
        tb.join(WAIT_S)
        assert out["a"]["done"] == [] and out["a"]["errors"], out  # the store's fault: the scheduler retries A
        assert out["b"]["done"] == b, out
        assert store.get(b[0]).state is JobState.DONE and not worker._riding
    finally:
        gated.release.set()
        worker.shutdown()
