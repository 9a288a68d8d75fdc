"""A rendering node publishes which job it renders and how far along it is (actors/progress.py): the worker as
a plain class (no Ray) rendering a real diffusers stand-in, its node record read from a real redis-server
while it renders, as the dashboard reads it."""

from __future__ import annotations

import threading
import time

import pytest

from renderfarm.actors.progress import StepProgress
from renderfarm.actors.worker import RenderWorker
from renderfarm.config import Settings
from renderfarm.dashboard import queries
from renderfarm.jobs import Job, JobSpec, JobState

pytestmark = pytest.mark.integration

NODE = {"name": "p8", "vram_gib": 8, "compute_capability": "8.6", "gpu": "GeForce RTX 3070", "simulated": True}
STEPS = 60


def test_a_rendering_node_publishes_its_job_and_step_then_clears_them(redis_url, store, tmp_path):
    settings = Settings(data_dir=tmp_path, torch_threads=1, heartbeat_seconds=0.2, lease_seconds=5.0)
    worker = RenderWorker("p8", redis_url, settings.model_dump(mode="json"), NODE)
    spec = {"model": "tiny-sd15", "prompt": "a slow fox", "width": 128, "height": 128, "steps": STEPS, "seed": 1}
    jobs = [Job(id=f"prog-{i}", spec=JobSpec(**spec)) for i in range(2)]
    store.submit(jobs, "b")
    for job in jobs:
        assert store.lease(job.id, "p8", 60)
    seen: list[tuple] = []
    out: dict = {}
    try:
        thread = threading.Thread(target=lambda: out.update(worker.render([j.id for j in jobs])))
        thread.start()
        while thread.is_alive():  # what the dashboard would read, ten times a second
            (node,) = [n for n in queries.nodes(store, [], 15) if n["name"] == "p8"]
            seen.append((node["current_job"], node["batch_jobs"], node["step"], node["steps"]))
            time.sleep(0.1)
        thread.join()
    finally:
        worker.shutdown()
    assert out["done"] == ["prog-0", "prog-1"], out
    rendering = [s for s in seen if s[0] is not None]
    assert rendering, "the node never said what it renders"
    assert {(job, batch, steps) for job, batch, _, steps in rendering} == {("prog-0", 2, STEPS)}
    steps = [step for _, _, step, _ in rendering]
    assert steps == sorted(steps), "steps only go forward"
    assert any(0 < step < STEPS for step in steps), f"no step in the middle of the render was seen: {steps}"
    # The batch ended: the record says it renders nothing (the dashboard shows no progress bar).
    (node,) = [n for n in queries.nodes(store, [], 15) if n["name"] == "p8"]
    assert node["current_job"] is None and node["step"] is None
    assert store.get("prog-0").state is JobState.DONE


class Recorder:
    """Stands in for the Store's update_node: the throttle below is pure logic."""

    def __init__(self, delay: float = 0.0):
        self.writes: list[dict] = []
        self.delay = delay

    def update_node(self, name: str, **fields) -> None:
        time.sleep(self.delay)
        self.writes.append(fields)


def test_progress_is_written_at_most_twice_a_second_and_never_waits_on_redis():
    clock = [0.0]
    recorder = Recorder()
    progress = StepProgress(recorder, "n", clock=lambda: clock[0])
    progress.start(["j1", "j2"], 100)
    progress._pending.result(timeout=5)
    for step in range(1, 101):  # 100 steps of 0.1 s
        clock[0] += 0.1
        progress.step(step, 100)
        progress._pending.result(timeout=5)  # each write lands before the next step (no in-flight skips)
    progress.clear()
    progress.close()
    steps = [w["step"] for w in recorder.writes]
    assert steps[0] == 0 and recorder.writes[-1] == {"current_job": None, "batch_jobs": 0, "step": None,
                                                      "steps": None}
    middle = steps[1:-1]
    assert all(b - a >= 4 for a, b in zip(middle, middle[1:])), f"no two writes under 0.5 s apart: {steps}"
    assert 16 <= len(steps) - 2 <= 20, f"10 s of steps, about 2 writes a second (never more): {steps}"
    first = recorder.writes[1]
    assert (first["current_job"], first["batch_jobs"], first["steps"]) == ("j1", 2, 100) and 4 <= first["step"] <= 6

    # A batch shorter than the interval writes nothing of its own: its start and end ride with the jobs'.
    quick = Recorder()
    progress = StepProgress(quick, "n", clock=lambda: clock[0])
    assert progress.start(["q"], 4, publish=False)["current_job"] == "q"
    for step in range(1, 5):
        clock[0] += 0.05
        progress.step(step, 4)
    assert progress.end()["current_job"] is None
    progress.close()
    assert quick.writes == []

    # A write that hangs (Redis away, the client retrying) does not hold the render: later steps skip theirs.
    slow = Recorder(delay=1.0)
    progress = StepProgress(slow, "n", interval=0.0)
    progress.start(["j"], 10)
    started = time.monotonic()
    for step in range(1, 11):
        progress.step(step, 10)
    assert time.monotonic() - started < 0.5
    progress.clear()
    progress.close()
    assert slow.writes[-1]["current_job"] is None, "the clear comes after every step written"
