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
        assert store.get(b[0]).state is JobState.RUNNING, "B finished before A, which rendered first"
        assert store.get(c[0]).state is JobState.LEASED, "C rendered while two finished batches were held"
        gated.release.set()
        for thread in (ta, tb, tc):
            thread.join(WAIT_S)
    finally:
        gated.release.set()
        worker.shutdown()
    assert [out[k]["done"] for k in "abc"] == [a, b, c], out
    finished = [store.get(ids[0]).finished_at for ids in (a, b, c)]
    assert finished == sorted(finished)
