"""A realistic farm in a real redis-server for the dashboard's tests: three nodes (busy, draining, dead),
jobs in every state, rendered PNGs that carry their A1111 parameters, ETAs and throughput samples.

Each test gets its own key prefix (and `redis_client` flushes the database), so the page under test reads
exactly this farm."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from renderfarm.cluster.keys import Keys
from renderfarm.cluster.store import Store
from renderfarm.infotext import a1111_parameters, png_bytes
from renderfarm.jobs import Job, JobSpec, JobState
from tests.helpers import put_pngs

HOUR = 3600.0


def png(prompt: str, seed: int, model: str = "tiny-sd15") -> bytes:
    parameters = a1111_parameters(
        prompt=prompt, negative_prompt="blurry", steps=4, sampler="Euler", schedule_type="Normal", cfg_scale=5.0,
        seed=seed, width=64, height=64, model=model,
    )
    return png_bytes(Image.new("RGB", (64, 64), (seed % 255, 80, 160)), parameters)


@dataclass
class SeededFarm:
    store: Store
    prefix: str
    now: float
    ids: dict[str, list[str]] = field(default_factory=dict)  # state -> job ids, in the order seeded

    # What the page should show.
    counts: ClassVar[dict[str, int]] = {"queued": 3, "leased": 1, "running": 2, "done": 4, "failed": 2, "cancelled": 1}
    done_1h, failed_1h = 3, 1
    node_states: ClassVar[dict[str, str]] = {"node-a": "busy", "node-b": "draining", "node-c": "dead"}


NODES = {
    "node-a": {
        "gpu": "NVIDIA GeForce RTX 4090", "vram_gib": 24.0, "compute_capability": "8.9", "simulated": False,
        "device": "cuda", "state": "busy", "loaded": ["tiny-sd15", "tiny-flux"],
        "profiles": {"tiny-sd15": "fp16-resident", "tiny-flux": "fp8-offload"}, "vram_used_gib": 12.5,
        "jobs_done": 30, "jobs_failed": 1, "images": 40, "megapixels": 10.5, "batches": 12,
        "render_seconds": 100.0, "last_s_per_step": 0.05, "oom_escalations": 0,
        "card": {"name": "NVIDIA GeForce RTX 4090", "vram_gib": 24.0, "ram_gib": 64.0},
        "current_job": "r0", "batch_jobs": 1, "step": 12, "steps": 28,  # what actors/progress.py publishes
        "host": {"ram_gib": 62.7, "ram_available_gib": 58.1, "disk_free_gib": 120.0},
    },
    "node-b": {
        "gpu": "GeForce RTX 3070", "vram_gib": 8.0, "compute_capability": "8.6", "simulated": True,
        "device": "cpu", "state": "idle", "loaded": ["tiny-sd15"], "profiles": {"tiny-sd15": "fp16-resident"},
        "vram_used_gib": 1.2, "jobs_done": 10, "jobs_failed": 0, "images": 10, "megapixels": 2.5, "batches": 5,
        "render_seconds": 60.0, "last_s_per_step": 0.4, "oom_escalations": 0,
    },
    "node-c": {
        "gpu": "Quadro RTX 6000", "vram_gib": 24.0, "compute_capability": "7.5", "simulated": True,
        "device": "cpu", "state": "busy", "loaded": [], "profiles": {}, "vram_used_gib": 0.0,
        "jobs_done": 8, "jobs_failed": 1, "images": 8, "megapixels": 2.0, "batches": 4,
        "render_seconds": 16.0, "last_s_per_step": 0.2, "oom_escalations": 1,
    },
}


def seed_farm(store: Store, results: Path) -> SeededFarm:
    """A farm's records in `store`; done jobs' images in a directory result store at `results`."""
    now = time.time()
    farm = SeededFarm(store=store, prefix=store.keys.prefix, now=now)

    for name, info in NODES.items():
        store.register_node(name, info)
    store.set_draining("node-b", True)
    store.redis.hset(store.keys.node("node-c"), "heartbeat", json.dumps(now - 120))  # stopped heartbeating

    def submit(name: str, i: int, team: str, model: str, **kw) -> str:
        spec = JobSpec(model=model, prompt=f"a red fox, picture {name}", width=64, height=64, steps=4, team=team,
                       seed=1000 + i, **kw)
        job = Job(id=name, spec=spec, created_at=now - 600 + i)
        assert store.submit([job], "batch-1") == [True]
        return name

    plan = [  # id, team, model, final state, node
        ("q0", "design", "tiny-sd15", "queued", None), ("q1", "research", "tiny-flux", "queued", None),
        ("q2", "research", "tiny-sd15", "queued", None),
        ("l0", "design", "tiny-sd15", "leased", "node-a"),
        ("r0", "design", "tiny-sd15", "running", "node-a"), ("r1", "research", "tiny-flux", "running", "node-c"),
        ("d0", "design", "tiny-sd15", "done", "node-a"), ("d1", "research", "tiny-flux", "done", "node-a"),
        ("d2", "design", "tiny-sd15", "done", "node-b"), ("d3", "design", "tiny-sd15", "done", "node-b"),
        ("f0", "research", "tiny-flux", "failed", "node-a"), ("f1", "design", "tiny-sd15", "failed", "node-c"),
        ("c0", "design", "tiny-sd15", "cancelled", None),
    ]
    for i, (job_id, team, model, state, node) in enumerate(plan):
        submit(job_id, i, team, model)
        farm.ids.setdefault(state, []).append(job_id)
        deadline = 300  # lease seconds
        if node:
            assert store.lease(job_id, node, deadline)
        if state in ("running", "done", "failed") and node:
            assert store.start(job_id, node, deadline)
        if state == "done":
            urls = put_pngs(results, job_id, [png(f"a red fox, picture {job_id}", 1000 + i, model)])
            assert store.complete(job_id, node, urls, {"denoise_s": 0.4}, 900.0, profile="fp16-resident")
        elif state == "failed":
            reason = "CUDA out of memory at every profile" if job_id == "f0" else "model files missing"
            assert store.fail(job_id, reason, node=node)
        elif state == "cancelled":
            store.cancel(job_id)
    # Two of them finished more than an hour ago: counted in totals, not in the last hour.
    store.redis.zadd(store.keys.index(JobState.DONE), {"d3": now - 2 * HOUR})
    store.redis.hset(store.keys.job("d3"), "finished_at", repr(now - 2 * HOUR))
    store.redis.zadd(store.keys.index(JobState.FAILED), {"f1": now - 2 * HOUR})
    store.redis.hset(store.keys.job("f1"), "finished_at", repr(now - 2 * HOUR))

    store.write_etas({
        "q0": {"position": 0, "node": "node-a", "start": now + 5, "finish": now + 25, "as_of": now},
        "q1": {"position": 1, "node": "node-a", "start": now + 25, "finish": now + 45, "as_of": now},
        "q2": {"position": None, "node": None, "waiting": "no node has room for 4096x4096", "as_of": now},
    })

    # Samples every 5 s; node-a rendered 10 images (2.5 MP) in the last 10 s: 60 images/min, 0.25 MP/s.
    totals = [(30, 8.0), (34, 9.0), (40, 10.5)]
    for k, (images, megapixels) in enumerate(totals):
        t = now - 10 + 5 * k
        store.record_sample({
            "t": t,
            "counts": {"queued": 5 - k, "leased": 1, "running": 2, "done": 2 + k, "failed": 2, "cancelled": 1},
            "nodes": {
                "node-a": {"images": images, "megapixels": megapixels, "jobs_done": 28 + k, "jobs_failed": 1,
                           "render_seconds": 90.0 + 5 * k, "last_s_per_step": 0.05, "vram_used_gib": 12.5,
                           "state": "busy"},
                "node-b": {"images": 10, "megapixels": 2.5, "jobs_done": 10, "jobs_failed": 0,
                           "render_seconds": 60.0, "last_s_per_step": 0.4, "vram_used_gib": 1.2, "state": "idle"},
            },
        })
    return farm


@pytest.fixture
def prefix() -> str:
    return "dash" + uuid.uuid4().hex[:8]


@pytest.fixture
def dash_store(redis_client, prefix) -> Store:
    return Store(redis_client, Keys(prefix))


@pytest.fixture
def seeded(dash_store, tmp_path) -> SeededFarm:
    return seed_farm(dash_store, tmp_path / "results")
