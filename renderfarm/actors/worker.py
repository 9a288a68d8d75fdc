"""RenderWorker: one per GPU (or per simulated node). A plain class; `farm.py` makes it a Ray actor.

The scheduler leases a batch of compatible jobs to this node and calls `render(job_ids)`. The worker
marks each job running, picks the profile its card should run the model with (the fastest whose predicted
peak fits), renders the whole batch in one pipeline call, and writes every result straight to Redis (images
never travel through the scheduler). On an out-of-memory error it walks down the profile ladder (tiled VAE
first, then more frugal rungs), records the escalation on the job and in the node's stats, and remembers it
for that model and size. It returns a small summary so the scheduler can decide what to retry. A heartbeat
thread keeps the node's record in Redis fresh and renews the leases of the jobs it renders; a renewal that
finds every job of the batch gone (cancelled) stops the render at its next step, and so does the batch's
time limit (`Settings.job_timeout_s`). A late result (a job cancelled or re-leased meanwhile) is discarded
by the store and counted.

A simulated node (a CPU standing in for a declared card) chooses and applies the profile of the card it
declares, as far as a CPU can: weights format and compute dtype are real, placements run resident.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from renderfarm.actors.batch_start import BatchStarts
from renderfarm.actors.escalation import DoesNotFit
from renderfarm.actors.job_inputs import InputReader, render_requests
from renderfarm.actors.progress import StepProgress
from renderfarm.actors.results import ResultWriter
from renderfarm.cluster.blobs import open_result_store
from renderfarm.cluster.keys import Keys
from renderfarm.cluster.store import Store
from renderfarm.config import NodeDeclaration, Settings, farm_wide
from renderfarm.faults import Fault, classify
from renderfarm.inputs import InputStore
from renderfarm.jobs import Job
from renderfarm.planning.catalog import ModelEntry, default_catalog
from renderfarm.planning.choose import DEFAULT_MARGIN_GIB, choose_profile, next_rung, next_rung_for_host
from renderfarm.planning.devices import Device, device_from_declaration
from renderfarm.planning.profiles import Profile

log = logging.getLogger(__name__)

RENDER_THREADS = 2  # the actor's calls run at once: one batch renders while the one before it finishes


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A batch rendered and not yet finished: what `_finish` records."""

    entry: ModelEntry
    profile: str  # the profile's name ("as-loaded": a catalog entry without component data)
    jobs: list[Job]
    requests: list[Any]  # pipelines.RenderRequest, one per job
    results: list[Any]  # pipelines.RenderResult, one per job
    load_s: float
    move_s: float
    escalations: list[str]
    resident: int  # weight bytes on the device when the render began
    seconds: float  # started and rendered: the time this batch had the card


class RenderWorker(BatchStarts):
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
        self.store = Store.open(redis_url, Keys(key_prefix))
        # What the heartbeat and step progress send, by the clock rather than per job, on a client of its own:
        # the round trips each job costs are counted apart (issue 16: at most three per job at batch 1).
        self.timed_store = Store.open(redis_url, Keys(key_prefix))
        self.catalog = default_catalog(self.settings.models_file)

        import diffusers
        import torch  # heavy imports only inside the worker process
        import transformers

        from renderfarm.actors.pipelines import PipelineCache

        # Loading bars from every worker interleave on the console; stage timings report the same thing.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()

        from renderfarm.actors.hardware import host_memory, probe_device
        from renderfarm.actors.loading import why_unloadable
        from renderfarm.actors.standins import default_cache_dir

        # What this machine has; the free disk where disk offload writes its blocks (the cache folder).
        host = host_memory(self.settings.cache_dir or default_cache_dir())
        self.device = "cuda" if node.get("simulated") is False and torch.cuda.is_available() else "cpu"
        if self.device == "cuda":  # a real card describes itself (Ray sets CUDA_VISIBLE_DEVICES per actor)
            self.card: Device = probe_device(0, host=host)
            node = {**node, "gpu": self.card.name, "vram_gib": round(self.card.vram_gib, 2),
                    "compute_capability": self.card.cc_text}
        else:
            torch.set_num_threads(self.settings.torch_threads or max(1, (os.cpu_count() or 1)))
            self.card = device_from_declaration(NodeDeclaration(
                name=name, vram_gib=node["vram_gib"], compute_capability=node.get("compute_capability", "8.6"),
                gpu=node.get("gpu"), ram_gib=node.get("ram_gib"),
            ))
        reserve = float(node.get("reserve_gib") or 0.0)
        if reserve:  # a node override: VRAM kept free for something else; the planner never sees it
            self.card = dataclasses.replace(self.card, vram_gib=max(0.5, self.card.vram_gib - reserve))
            node = {**node, "vram_gib": round(self.card.vram_gib, 2)}
        # Loaded pipelines share the card: evict least recently used ones beyond its VRAM (less a margin).
        budget_gib = self.settings.pipeline_cache_gib or max(0.5, self.card.vram_gib - DEFAULT_MARGIN_GIB)
        from renderfarm.actors.loading import load_pipeline

        def load(entry: ModelEntry, profile: Profile | None = None) -> Any:  # the cache's own loader, counted
            pipe = load_pipeline(entry, self.settings.cache_dir, device=self.device, profile=profile)
            self.stats["model_loads"] += 1  # (no lock: only the torch thread loads; _books would wait on the cache)
            return pipe

        self.cache = PipelineCache(
            cache_dir=self.settings.cache_dir, device=self.device, max_bytes=int(budget_gib * 2**30), loader=load
        )
        self.node = {
            **node,
            # What this machine really has (a simulated node plans against its declared `ram_gib`, if any).
            "host": host,
            "device": self.device,
            "pid": os.getpid(),
            "torch_threads": torch.get_num_threads(),
            "card": self.card.as_dict(),
            "farm_settings": farm_wide(self.settings),  # what it renews leases and times renders with
        }
        # Which models of the catalog this node can load, and why not the others: the client refuses at
        # submit a model no node can load (client.py), rather than letting each node fail it in turn.
        entries = [self.catalog.get(model) for model in self.catalog.names()]
        unloadable = {e.name: why for e in entries if (why := why_unloadable(e, self.settings.cache_dir))}
        self.node["loadable"] = [e.name for e in entries if e.name not in unloadable]
        self.node["unloadable"] = unloadable
        self.stats: dict[str, Any] = {
            "jobs_done": 0,
            "jobs_failed": 0,
            "images": 0,
            "megapixels": 0.0,  # width x height x images rendered, in millions
            "batches": 0,
            "model_loads": 0,  # pipelines loaded (a model under a profile): the first, after evictions, escalations
            "render_seconds": 0.0,
            "last_s_per_step": None,
            "oom_escalations": 0,
            "host_memory_escalations": 0,  # of those, host RAM (a pinned allocation) rather than VRAM
            "stopped_cancelled": 0,  # renders stopped between two steps because their jobs were cancelled
            "stopped_timeout": 0,  # renders stopped at their time limit
        }
        self.profiles: dict[str, str] = {}  # model -> the profile it last ran with here
        self.escalated: dict[tuple[str, int, int], Profile] = {}  # (model, w, h) -> rung after an OOM
        self.state = "idle"
        # Two batches overlap (farm.py gives the actor two threads for its calls): while one batch's images are
        # written and its jobs completed, the next one starts and renders. Every torch call runs on ONE thread of
        # its own (`_torch`, which also renders batches one at a time, in the order they came): libgomp spins
        # only while the threads it manages are no more than the CPUs, so torch from two threads at two torch
        # threads each made every render ~2x slower on a 2-core node (bench/torch_threads.py).
        # `_finishing`: one batch finishes at a time, in the order they rendered (taken on the torch thread
        # before it takes the next batch, released by the call thread when its batch is finished); `_books`:
        # the node's state, stats and record writes, which both touch.
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"torch-{name}",
                                         initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
        self._finishing, self._books = threading.Lock(), threading.RLock()
        # On a CPU node torch has every core: a batch finished on another thread while the next one renders only
        # takes cores and the GIL from that render (bench/overhead.py), so there it finishes on the torch thread
        # before the next starts. On a card the render waits on the GPU, and finishing beside it hides the finishing.
        self._finish_inline = self.device == "cpu" and torch.get_num_threads() >= (os.cpu_count() or 1)
        self._init_starts()  # a batch's start rides in the request finishing the batch before (batch_start.py)
        self._rendering = False  # a batch is starting or rendering: its fields (state, step) are in the record
        self._holding: list[str] = []  # jobs of the batch being rendered, whose leases the heartbeat renews
        self._timeout_s: float | None = None
        self._all_gone = False  # set by a renewal that found none of them held any more
        self._stop = threading.Event()
        self.progress = StepProgress(self.timed_store, name)  # the batch's job and step, for the dashboard
        # Where finished images go (cluster/blobs; Redis keeps their URLs), several written at once.
        self.results = ResultWriter(open_result_store(self.settings), name)
        # Jobs' uploaded images (renderfarm/inputs.py), in the same store under inputs/: opened when first needed.
        self.inputs = InputReader(lambda: InputStore.for_settings(self.store, self.settings))
        # The LoRAs this node holds (actors/node_loras.py), and the set each cached pipeline has applied.
        from renderfarm.actors.model_assets import model_assets
        from renderfarm.actors.node_loras import NodeLoras

        self.loras = NodeLoras(name, self.settings, node.get("lora_dir"),
                               models=lambda: model_assets(self.catalog, self.node["loadable"]))
        self.loras.publish(self.store)  # what it holds (models, LoRAs), re-indexed every LORA_RESCAN_S
        self.store.register_node(name, {**self.node, "state": self.state, **self._record()})
        self._heartbeat = threading.Thread(target=self._beat, name=f"heartbeat-{name}", daemon=True)
        self._heartbeat.start()

    # --- the actor's methods ------------------------------------------------------------------------

    def ready(self) -> dict[str, Any]:
        return {"name": self.name, **self.node}

    def warm(self, model: str) -> float:
        """Load `model` (in the profile its default size needs) ahead of the first job; returns the
        seconds it took (0 when already loaded)."""
        entry = self.catalog.get(model)
        profile = self.profile_for(entry, entry.default_size, entry.default_size, 1)
        _, seconds = self._torch.submit(self.cache.get, entry, profile).result()  # never beside a render
        self._publish()
        return seconds

    def profile_for(self, entry: ModelEntry, width: int, height: int, images: int,
                    task: str = "txt2img") -> Profile | None:
        """The profile this card runs `entry` with at this size: remembered from an earlier out-of-memory
        escalation, else the fastest that the planner predicts to fit. None for a catalog entry that
        carries no component data (nothing to plan with): it loads as the model's files are."""
        remembered = self.escalated.get((entry.name, width, height))
        if remembered is not None:
            return remembered
        if not entry.components:
            return None
        choice = choose_profile(entry, self.card, width, height, images, task=task)  # image tasks: the VAE encode
        if choice.chosen is None:
            raise DoesNotFit(f"{entry.name} at {width}x{height}, batch {images} on {self.name}: {choice.reason}")
        return choice.chosen

    def render(self, job_ids: list[str], specs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Render leased, compatible jobs in one pipeline call. Returns {"done", "lost", "errors"} and, when
        there are errors, "fault": whose fault they are (renderfarm/faults.py), which the scheduler acts on.
        `specs`: the jobs' specs (JobSpec as JSON, in the order of `job_ids`), which the scheduler has read
        already; without them the worker reads them from Redis (one more request)."""
        try:
            return self._render(job_ids, specs)
        except Exception as exc:  # Redis lost while starting or completing the jobs: nobody's fault
            if classify(exc) is not Fault.OUTAGE:
                raise
            log.error("node %s: batch %s: Redis unreachable: %s", self.name, job_ids, exc)
            with self._books:
                if not self._rendering:  # (a batch rendering meanwhile owns the state)
                    self.state = "idle"
            return {"done": [], "lost": [], "errors": dict.fromkeys(job_ids, f"{type(exc).__name__}: {exc}"),
                    "fault": Fault.OUTAGE.value}

    def _idle(self, rnd: Any = None) -> None:
        """A batch of this node stopped rendering (rendered, stopped, failed, or never begun): unless another
        batch renders now (whose state and step the record shows), the node is idle. The record is written in
        the round `rnd`, or at once."""
        with self._books:
            fields: dict[str, Any] = {}
            if not self._rendering:
                self.state = "idle"
                fields = self.progress.end()
            if rnd is not None:
                self.store.queue_update_node(rnd, self.name, state=self.state, **self._record(), **fields)
            else:
                self._publish(**fields)

    def _render(self, job_ids: list[str], specs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Start and render the batch on the torch thread (one batch at a time), then, on this call's thread,
        write its images and complete its jobs while the next batch renders (on a CPU node, on the torch thread
        before the next: `_finish_inline`). `_finishing` is taken on the torch
        thread before it moves on, so batches finish in the order they rendered, and a batch whose finishing
        waits (a slow store) holds the next render back rather than piling up images."""
        summary: dict[str, Any] = {"done": [], "lost": [], "errors": {}}
        if self._finish_inline:
            self._arrive(job_ids, specs)
            return self._torch.submit(self._render_and_finish, job_ids, specs, summary).result()
        rendered = self._torch.submit(self._render_exclusive, job_ids, specs, summary).result()
        return summary if rendered is None else self._finish_rendered(rendered, summary)

    def _render_and_finish(self, job_ids: list[str], specs: list[dict[str, Any]] | None,
                           summary: dict[str, Any]) -> dict[str, Any]:
        """`_render` on the torch thread from start to finish (a CPU node: see `_finish_inline`)."""
        rendered = self._render_exclusive(job_ids, specs, summary)
        return summary if rendered is None else self._finish_rendered(rendered, summary)

    def _finish_rendered(self, rendered: Rendered, summary: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._complete(rendered, summary)
        finally:
            try:
                self._send_riding()  # starts that were to ride in a finish that never went
            finally:
                self._finishing.release()

    def _render_exclusive(self, job_ids: list[str], specs: list[dict[str, Any]] | None,
                          summary: dict[str, Any]) -> Rendered | None:
        """Start the jobs and render them. None when nothing rendered (lost, stopped or failed: `summary` says
        which, and the record is written)."""
        from renderfarm.actors.pipelines import RenderInterrupted

        started = time.perf_counter()
        jobs, summary["lost"], timeout_s = self._begin(job_ids, specs)
        if not jobs:
            return None
        deadline = time.monotonic() + timeout_s
        self._holding, self._timeout_s, self._all_gone = [j.id for j in jobs], timeout_s, False

        def should_stop() -> str | None:
            if self._all_gone:
                return "every job of the batch was cancelled or taken back"
            if self._stop.is_set():  # a clean stop: the farm hands the jobs back (farm.stop_workers)
                return "the node is shutting down"
            if time.monotonic() > deadline:
                return f"timed out: the render took longer than its limit of {timeout_s:.4g} s"
            return None

        try:
            entry = self.catalog.get(jobs[0].spec.model)
            requests = render_requests(jobs, self.inputs)
            results, profile, load_s, move_s, escalations, resident = self._render_escalating(
                entry, requests, should_stop, jobs[0].spec.lora_set()
            )
            rendered = Rendered(entry, profile.name if profile else "as-loaded", jobs, requests, results, load_s,
                                move_s, escalations, resident, time.perf_counter() - started)
            self._finishing.acquire()  # released by the call thread once the batch is finished (_render)
            if not self._finish_inline:
                with self._books:  # the next batch's start may ride in this one's finish (batch_start.py)
                    self._finish_pending = True
            return rendered
        except RenderInterrupted as exc:
            with self._books:
                if self._all_gone or self._stop.is_set():  # cancelled, or shutting down: nothing failed
                    summary["lost"] = [job.id for job in jobs]
                    self.stats["stopped_cancelled"] += 1
                    log.info("node %s: batch %s stopped: %s", self.name, job_ids, exc)
                else:
                    log.error("node %s: batch %s %s", self.name, job_ids, exc)
                    summary["errors"] = {job.id: str(exc) for job in jobs}
                    summary["fault"] = Fault.NODE.value
                    self.stats["jobs_failed"] += len(jobs)
                    self.stats["stopped_timeout"] += 1
                    self.store.count("timeouts", len(jobs))
        except Exception as exc:  # a broken model or render: report whose fault, the scheduler retries or fails
            self._failed(job_ids, jobs, exc, summary)
        finally:
            with self._books:  # rendered, stopped or failed: the heartbeat renews nothing more
                self._holding, self._rendering = [], False
        self._idle()
        return None

    def _failed(self, job_ids: list[str], jobs: list[Job], exc: Exception, summary: dict[str, Any]) -> None:
        """The batch failed with `exc`: whose fault it is, in the summary the scheduler acts on (retry or fail)."""
        fault = classify(exc)
        if fault is Fault.NODE:
            log.exception("node %s: batch %s failed", self.name, job_ids)
        else:
            log.error("node %s: batch %s failed (%s fault): %s", self.name, job_ids, fault.value, exc)
        message = f"{type(exc).__name__}: {exc}"
        summary["errors"] = {job.id: message for job in jobs}
        summary["fault"] = fault.value
        summary["traceback"] = traceback.format_exc(limit=5)
        with self._books:
            self.stats["jobs_failed"] += len(jobs)

    def _complete(self, rendered: Rendered, summary: dict[str, Any]) -> dict[str, Any]:
        """Write the rendered images to the result store (cluster/blobs; Redis keeps their URLs) and complete the
        jobs. A store that refuses them (full, read-only, unreachable) is neither the job's fault nor this node's
        (faults.Fault.STORE)."""
        try:
            blobs = self.results.store(rendered.results)
        except Exception as exc:
            self._failed([job.id for job in rendered.jobs], rendered.jobs, exc, summary)
            self._idle()
            return summary
        self._finish(rendered, blobs, summary)
        return summary

    def _finish(self, rendered: Rendered, blobs: list[list[str]], summary: dict[str, Any]) -> None:
        """Record the batch in one request to Redis: every job's result (exactly once: one cancelled or taken
        back meanwhile is discarded), what it measured, the jobs' wait and render times (the metrics'
        histograms), and the node's new totals with its idle state (unless the next batch renders already)."""
        entry, profile_name, jobs, requests, results = (rendered.entry, rendered.profile, rendered.jobs,
                                                        rendered.requests, rendered.results)
        load_s, move_s = rendered.load_s, rendered.move_s
        # Counted as done before the replies come, so that the record written with them is right; a result
        # discarded (rare) is taken back below and the record written again.
        pixels = requests[0].width * requests[0].height / 1e6

        def count(done: list[Any], sign: int = 1) -> None:
            images = sum(len(r.images) for r in done)
            self.stats["jobs_done"] += sign * len(done)
            self.stats["images"] += sign * images
            self.stats["megapixels"] += sign * images * pixels

        with self._books:
            rnd = self.store.round()
            completing = []
            for result, urls in zip(results, blobs):
                timings = {**result.timings, "load_s": load_s, "move_s": result.timings["move_s"] + move_s,
                           "batch_size": float(len(jobs))}
                completing.append(self.store.queue_complete(
                    rnd, result.job_id, self.name, urls, timings, result.peak_memory_mb,
                    profile=profile_name, escalations=rendered.escalations,
                ))
            measured = self._measured(rnd, entry.name, profile_name, requests, results[0], rendered.resident,
                                      load_s + move_s)
            # The jobs' wait and render times into the farm's histograms (renderfarm/metrics.py), in this round.
            observed = self.store.queue_observe_finished(rnd, self.name, [r.job_id for r in results])
            count(results)
            self.profiles[entry.name] = profile_name
            self.stats["batches"] += 1
            self.stats["render_seconds"] += rendered.seconds  # the card's time: a batch's finishing overlaps the next
            self.stats["last_s_per_step"] = results[0].timings.get("denoise_s_per_step")
            self._idle(rnd)
            kept = self._ride_with(rnd)  # after the record: a start riding here leaves it busy
            rnd.run()
            kept()
            discarded = []
            for result, urls, completed in zip(results, blobs, completing):
                if completed():
                    summary["done"].append(result.job_id)
                else:  # cancelled or re-leased while rendering: the result is discarded, exactly-once holds
                    summary["lost"].append(result.job_id)
                    discarded.append((result, urls))
            count([result for result, _ in discarded], -1)
        for _, urls in discarded:
            self.results.delete(urls)
        try:
            # The scheduler learns from the summary that the nodes' measurements changed (no request of its own).
            summary["measurements"] = measured()
        except Exception:  # a lost measurement costs accuracy, never a render
            log.warning("node %s: could not record its measurement", self.name, exc_info=True)
        try:
            observed()
        except Exception:  # nor does a lost metric
            log.warning("node %s: could not count its jobs' durations", self.name, exc_info=True)
        if discarded:
            self._publish()

    def _render_escalating(
        self, entry: ModelEntry, requests: list[Any], should_stop: Any = None, loras: tuple = ()
    ) -> tuple[list[Any], Profile | None, float, float, list[str], int]:
        """Render with the batch's LoRA set applied (actors/node_loras.py; the empty set: the base model),
        walking down the ladder on out-of-memory errors (while loading or rendering) until a rung succeeds or
        the floor fails too (actors/escalation.py). Returns (results, the profile that rendered, seconds reading
        weights, seconds placing them on the device, escalations, weight bytes on the device when the render
        began)."""
        from renderfarm.actors.escalation import render_escalating
        from renderfarm.actors.pipelines import render_batch

        width, height = requests[0].width, requests[0].height
        images, task = sum(r.num_images for r in requests), requests[0].task
        current = [self.profile_for(entry, width, height, images, task)]

        def stepped(step: str, lower: Profile, host: bool) -> None:
            self.stats["oom_escalations"] += 1
            if host:
                self.stats["host_memory_escalations"] += 1
            self.escalated[(entry.name, width, height)] = current[0] = lower

        def render(pipe: Any) -> list[Any]:
            applied, tags = self.loras.apply(pipe, entry, current[0], loras)
            batch = [dataclasses.replace(r, loras=tags) for r in requests] if tags else requests
            results = render_batch(pipe, entry, batch, should_stop=should_stop, on_step=self.progress.step)
            for result in results:  # switching the LoRA set: its own stage of the job's timings
                result.timings["lora_s"] = applied.total_s
            return results

        outcome = render_escalating(
            self.cache, entry, current[0], render=render,
            lower_for_vram=lambda p: next_rung(entry, self.card, p, width, height, images, task=task),
            lower_for_host=lambda p: next_rung_for_host(entry, self.card, p, width, height, images, task=task),
            resident_bytes=self._resident_bytes,
            host_room=lambda p: self._host_room(entry, p, width, height, images, task),
            on_step=stepped, where=f"node {self.name} at {width}x{height}",
        )
        return (outcome.results, outcome.profile, outcome.load_s, outcome.move_s, outcome.escalations,
                outcome.resident_bytes)

    def _resident_bytes(self, pipe: Any) -> int:
        """Weight bytes on the device when a render begins. On a CPU (a simulated node) every weight stays
        where it is, so the figure the cache measured when it loaded the pipeline holds (walking its parameters
        again cost ~5 ms a batch); on a card, offloaded weights come and go, so they are counted each time."""
        from renderfarm.actors.loading import pipeline_bytes

        known = self.cache.bytes_of(pipe) if self.device == "cpu" else None
        return known if known is not None else pipeline_bytes(pipe, on=self.device)

    def _host_room(self, entry: ModelEntry, profile: Profile | None, width: int, height: int, images: int,
                   task: str = "txt2img"):
        """On a card whose machine's RAM is known: a test of whether `profile`'s predicted host-memory peak fits
        beside what the other cached pipelines hold in host memory (the cache evicts until it does)."""
        budget = self.card.host_budget_gib
        if self.device != "cuda" or budget is None or profile is None:
            return None
        from renderfarm.planning.vram import predict

        def room(held: int) -> bool:  # asked only when the cache has to load the rung
            need = predict(entry, profile, self.card, width, height, images, task=task).host_peak_gib
            return held / 2**30 + need <= budget

        return room

    def _measured(
        self, rnd: Any, model: str, profile: str, requests: list[Any], result: Any, resident_bytes: int,
        load_s: float,
    ) -> Any:
        """Report what this batch measured (online calibration), as part of the round `rnd`: the peak the card
        needed (the weights that sat on it, the render's growth above them, the context) and the seconds per
        step; the planner never estimates this profile below that peak again, and scores this node with this
        speed. Returns the round's getter, which raises if the record was refused."""
        from renderfarm.planning.vram import CONTEXT_GIB

        first = requests[0]
        if result.peak_reserved_mb:  # a card: reserved memory, as the planner predicts it (context aside)
            peak_gib = result.peak_reserved_mb / 1024 + CONTEXT_GIB
        else:  # a CPU standing in for a card: the weights it holds and the render's growth above them
            peak_gib = (resident_bytes + result.peak_growth_mb * 2**20) / 2**30 + CONTEXT_GIB
        return self.store.queue_measurement(
            rnd, self.name, model, profile, first.width, first.height, sum(r.num_images for r in requests),
            peak_gib=peak_gib, s_per_step=result.timings.get("denoise_s_per_step"), load_s=load_s or None,
        )

    def shutdown(self) -> None:
        self._stop.set()
        self.state = "stopped"
        self._publish()

    # --- node record ----------------------------------------------------------------------------------

    def _record(self) -> dict[str, Any]:
        embeddings = self.cache.embedding_cache.stats()
        lookups = embeddings["hits"] + embeddings["misses"]
        embeddings["hit_rate"] = round(embeddings["hits"] / lookups, 4) if lookups else None
        return {
            "vram_used_gib": round(self._vram_used() / 2**30, 3),
            "loaded": self.cache.loaded(),
            "cache": self.cache.describe(),  # what the scheduler models its reloads and evictions on (fit.CacheView)
            "profiles": dict(self.profiles),
            "escalated": {f"{m} {w}x{h}": p.name for (m, w, h), p in self.escalated.items()},
            "embedding_cache": embeddings,
            "applied_loras": self.loras.applied,  # model -> its pipeline's LoRA set (scheduler/workers.py)
            "model_fingerprints": self.loras.model_fingerprints,  # model -> which copy it holds (model_assets.py)
            "redis_round_trips": self.store.round_trips,  # starting and finishing batches (per job)
            "redis_round_trips_timed": self.timed_store.round_trips,  # heartbeats, leases renewed, step progress
            **self.stats,
        }

    def _vram_used(self) -> int:
        """Bytes in use on the card: what torch reserved on a real one; on a simulated node, the weights of
        the pipelines it holds (what they would occupy on the card it stands in for)."""
        if self.device == "cuda":
            import torch

            return torch.cuda.memory_reserved()
        return self.cache.bytes_loaded()

    def _publish(self, store: Store | None = None, **extra: Any) -> None:
        try:
            (store or self.store).update_node(self.name, state=self.state, **self._record(), **extra)
        except Exception:  # a missed heartbeat is not worth a failed render
            log.warning("node %s: could not update its record", self.name, exc_info=True)

    def _renew(self) -> None:
        """Extend the leases of the jobs being rendered; note when none of them is this node's any more."""
        holding = list(self._holding)
        if not holding:
            return
        try:
            held = self.timed_store.renew(holding, self.name, self.settings.lease_seconds, self._timeout_s)
        except Exception:  # Redis away for a moment: the lease has `lease_seconds` of slack
            log.warning("node %s: could not renew its leases", self.name, exc_info=True)
            return
        if holding == self._holding and not any(held):
            self._all_gone = True

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            self._renew()
            self._publish(self.timed_store)
            if self.loras.due():
                self.loras.publish(self.timed_store)
