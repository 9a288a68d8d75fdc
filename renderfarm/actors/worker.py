"""RenderWorker: one per GPU (or per simulated node). A plain class; `farm.py` makes it a Ray actor.

The scheduler leases a batch of compatible jobs to this node and calls `render(job_ids)`. The worker
marks each job running, renders the whole batch in one pipeline call, and writes every result straight to
Redis (images never travel through the scheduler). It returns a small summary so the scheduler can
decide what to retry. A heartbeat thread keeps the node's record in Redis fresh.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from typing import Any

from renderfarm.cluster.keys import Keys
from renderfarm.cluster.redis_server import connect
from renderfarm.cluster.store import Store
from renderfarm.config import Settings
from renderfarm.jobs import Job
from renderfarm.planning.catalog import default_catalog

log = logging.getLogger(__name__)


class RenderWorker:
    def __init__(
        self,
        name: str,
        redis_url: str,
        settings: dict[str, Any],
        node: dict[str, Any],
        key_prefix: str = "rf",
    ):
        self.name = name
        self.settings = Settings.model_validate(settings)
        self.store = Store(connect(redis_url), Keys(key_prefix))
        self.catalog = default_catalog(self.settings.models_file)

        import diffusers
        import torch  # heavy imports only inside the worker process
        import transformers

        # Loading bars from every worker interleave on the console; stage timings report the same thing.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        from renderfarm.actors.pipelines import PipelineCache

        self.device = "cuda" if node.get("simulated") is False and torch.cuda.is_available() else "cpu"
        if self.device == "cuda":  # a real card describes itself (Ray sets CUDA_VISIBLE_DEVICES per actor)
            props = torch.cuda.get_device_properties(0)
            node = {**node, "gpu": props.name, "vram_gib": round(props.total_memory / 2**30, 2),
                    "compute_capability": f"{props.major}.{props.minor}"}
        else:
            torch.set_num_threads(self.settings.torch_threads or max(1, (os.cpu_count() or 1)))
        self.cache = PipelineCache(cache_dir=self.settings.cache_dir, device=self.device)
        self.node = {
            **node,
            "device": self.device,
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
        }
        self.stats: dict[str, Any] = {
            "jobs_done": 0,
            "jobs_failed": 0,
            "images": 0,
            "batches": 0,
            "render_seconds": 0.0,
            "last_s_per_step": None,
        }
        self.state = "idle"
        self._stop = threading.Event()
        self.store.register_node(name, {**self.node, "state": self.state, "loaded": [], **self.stats})
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat-{name}", daemon=True)
        self._heartbeat.start()

    # --- the actor's methods ------------------------------------------------------------------------

    def ready(self) -> dict[str, Any]:
        return {"name": self.name, **self.node}

    def warm(self, model: str) -> float:
        """Load `model` ahead of the first job; returns the seconds it took (0 when already loaded)."""
        _, seconds = self.cache.get(self.catalog.get(model))
        self._publish()
        return seconds

    def render(self, job_ids: list[str], lease_deadline: float) -> dict[str, Any]:
        """Render leased, compatible jobs in one pipeline call. Returns {"done", "lost", "errors"}."""
        from renderfarm.actors.pipelines import RenderRequest, render_batch

        summary: dict[str, Any] = {"done": [], "lost": [], "errors": {}}
        jobs: list[Job] = []
        for job_id in job_ids:
            # Skips jobs cancelled (or re-leased elsewhere) since the scheduler leased them.
            if self.store.start(job_id, self.name, lease_deadline):
                jobs.append(self.store.get(job_id))
            else:
                summary["lost"].append(job_id)
        if not jobs:
            return summary

        self.state = "busy"
        self._publish()
        started = time.perf_counter()
        try:
            entry = self.catalog.get(jobs[0].spec.model)
            pipe, load_s = self.cache.get(entry)
            requests = [
                RenderRequest(
                    job_id=job.id,
                    prompt=job.spec.prompt,
                    negative_prompt=job.spec.negative_prompt,
                    width=job.spec.width,
                    height=job.spec.height,
                    steps=job.spec.steps,
                    guidance=job.spec.guidance,
                    seed=job.spec.seed or 0,
                    num_images=job.spec.num_images,
                )
                for job in jobs
            ]
            results = render_batch(pipe, entry, requests)
        except Exception as exc:  # a broken model or render: report, let the scheduler retry or fail
            log.exception("node %s: batch %s failed", self.name, job_ids)
            message = f"{type(exc).__name__}: {exc}"
            summary["errors"] = {job.id: message for job in jobs}
            summary["traceback"] = traceback.format_exc(limit=5)
            self.stats["jobs_failed"] += len(jobs)
            self.state = "idle"
            self._publish()
            return summary

        for result in results:
            timings = {**result.timings, "load_s": load_s, "batch_size": float(len(jobs))}
            if self.store.complete(
                result.job_id, self.name, result.images, timings, result.peak_memory_mb,
                self.settings.result_ttl_seconds,
            ):
                summary["done"].append(result.job_id)
                self.stats["jobs_done"] += 1
                self.stats["images"] += len(result.images)
            else:  # cancelled or re-leased while rendering: the result is discarded, exactly-once holds
                summary["lost"].append(result.job_id)
        self.stats["batches"] += 1
        self.stats["render_seconds"] += time.perf_counter() - started
        self.stats["last_s_per_step"] = results[0].timings.get("denoise_s_per_step")
        self.state = "idle"
        self._publish()
        return summary

    def shutdown(self) -> None:
        self._stop.set()
        self.state = "stopped"
        self._publish()

    # --- node record ----------------------------------------------------------------------------------

    def _publish(self) -> None:
        try:
            self.store.update_node(self.name, state=self.state, loaded=self.cache.loaded(), **self.stats)
        except Exception:  # a missed heartbeat is not worth a failed render
            log.warning("node %s: could not update its record", self.name, exc_info=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            self._publish()
