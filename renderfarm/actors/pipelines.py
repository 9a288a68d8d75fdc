"""Keep a few pipelines loaded per worker and render batches of jobs with them.

Imported only inside worker processes: it imports torch and diffusers at module level. Building a pipeline
for a (model, profile) is actors/loading.py; the prompt-embedding cache is actors/embeddings.py; the
A1111 infotext written into each PNG is renderfarm/infotext.py.

A batch is rendered in ONE pipeline call, with its stages measured separately: text encoding (we call
the pipeline's `encode_prompt` ourselves and pass the embeddings in; an `EmbeddingCache` keeps each
prompt's embeddings, so a prompt is encoded once per model and profile), denoising (`output_type="latent"`,
per-step times from `callback_on_step_end`), and VAE decoding (done here, as each family's pipeline does
it). What differs between families (encoding, guidance, decoding, the call's own arguments) is a method of
the model's `Family` (actors/families.py); `render_batch` itself never branches on a family. Image i of a job is drawn from its own generator seeded with `seed + i` (the AUTOMATIC1111
convention), so a job renders the same image alone or inside any batch.

Out-of-memory errors propagate to the caller, recognisable with `is_out_of_memory`; a failed render leaves
the pipeline as it was (VAE dtype, text-encoder placement, offload hooks), so the caller may retry with a
cheaper VAE mode (`set_vae_mode`) or another profile.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from renderfarm.actors.embeddings import EmbeddingCache, EmbeddingKey
from renderfarm.actors.escalation import is_out_of_memory as _is_out_of_memory
from renderfarm.actors.families import Family, family_for
from renderfarm.actors.loading import (
    PipelineInfo,
    load_pipeline,
    pipeline_bytes,
    pipeline_info,
    pipeline_key,
    set_vae_mode,
    text_encoders_on,
)
from renderfarm.actors.lora_apply import text_encoder_key
from renderfarm.actors.peak_memory import PeakMemory
from renderfarm.actors.tasks import (
    apply_overlay,
    image_tensor,
    model_offload_for,
    prepare_inputs,
    task_call_arguments,
    task_pipeline,
    vae_as_loaded,
)
from renderfarm.infotext import a1111_parameters, png_bytes
from renderfarm.jobs import image_task, strength_used
from renderfarm.planning.catalog import ModelEntry
from renderfarm.planning.profiles import Profile
from renderfarm.planning.vram import effective_steps

DEFAULT_MAX_PIPELINES = 2


# --- the per-worker pipeline cache --------------------------------------------------------------------------


class PipelineCache:
    """The pipelines one worker keeps loaded, by (model, profile), least recently used evicted first.

    Bounded by count (`max_pipelines`) and, when `max_bytes` is set, by the weight bytes of the loaded
    pipelines (measured after each load; a size seen before is freed room for ahead of the next load). One
    pipeline larger than `max_bytes` alone is still kept: refusing it would refuse the job.

    Holds the worker's `EmbeddingCache` and attaches it to each pipeline it loads, so `render_batch` reuses
    prompt embeddings across batches without the caller passing it.

    A lock serialises loads and evictions, which is enough for one worker (one render at a time plus a
    control thread); it does not make two renders on one pipeline safe.
    """

    def __init__(
        self,
        max_pipelines: int = DEFAULT_MAX_PIPELINES,
        cache_dir: Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        loader: Callable[..., Any] | None = None,
        max_bytes: int | None = None,
        embedding_cache: EmbeddingCache | None = None,
    ):
        if max_pipelines < 1:
            raise ValueError(f"max_pipelines must be at least 1, got {max_pipelines}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_pipelines = max_pipelines
        self.max_bytes = max_bytes
        self.cache_dir = cache_dir
        self.device = torch.device(device)
        self.dtype = dtype
        # loader(entry) without a profile, loader(entry, profile) with one.
        self._loader = loader or self._load
        self.embedding_cache = embedding_cache if embedding_cache is not None else EmbeddingCache()
        self._pipelines: OrderedDict[tuple[str, str | None], Any] = OrderedDict()
        self._bytes: dict[tuple[str, str | None], int] = {}
        self._seen_bytes: dict[tuple[str, str | None], int] = {}
        self._lock = threading.RLock()

    def _load(self, entry: ModelEntry, profile: Profile | None = None) -> Any:
        return load_pipeline(
            entry, self.cache_dir, device=self.device, dtype=self.dtype if profile is None else None,
            profile=profile,
        )

    def get(
        self, entry: ModelEntry, profile: Profile | None = None, host_room: Callable[[int], bool] | None = None
    ) -> tuple[Any, float]:
        """The pipeline of `entry` under `profile` and the seconds spent loading it now (0.0 when already
        loaded). A profile that differs only in its VAE mode reuses the loaded pipeline and switches the
        mode. `host_room(bytes the other pipelines hold in host memory)` says whether the new one's host
        memory fits beside them: while it does not, the least recently used is evicted first."""
        key = pipeline_key(entry.name, profile)
        with self._lock:
            if key in self._pipelines:
                self._pipelines.move_to_end(key)
                pipe = self._pipelines[key]
                if profile is not None and hasattr(pipe, "vae"):
                    set_vae_mode(pipe, profile.vae)
                return pipe, 0.0
            # Evict before loading: the memory must be free before the next model arrives.
            while len(self._pipelines) >= self.max_pipelines:
                self._evict_key(next(iter(self._pipelines)))
            if host_room is not None:
                while self._pipelines and not host_room(self.host_bytes_loaded()):
                    self._evict_key(next(iter(self._pipelines)))
            expected = self._seen_bytes.get(key, 0)
            if self.max_bytes is not None and expected:
                while self._pipelines and self.bytes_loaded() + expected > self.max_bytes:
                    self._evict_key(next(iter(self._pipelines)))
            start = time.perf_counter()
            pipe = self._loader(entry) if profile is None else self._loader(entry, profile)
            load_s = time.perf_counter() - start
            self._pipelines[key] = pipe
            self._bytes[key] = self._seen_bytes[key] = pipeline_bytes(pipe)
            info = pipeline_info(pipe)
            if info is not None:
                info.embedding_cache = self.embedding_cache
            if self.max_bytes is not None:
                while len(self._pipelines) > 1 and self.bytes_loaded() > self.max_bytes:
                    self._evict_key(next(iter(self._pipelines)))
            return pipe, load_s

    def loaded(self) -> list[str]:
        """Names of the loaded models, least recently used first (a model under two profiles: twice)."""
        with self._lock:
            return [model for model, _ in self._pipelines]

    def loaded_keys(self) -> list[tuple[str, str | None]]:
        """(model, profile name) of each loaded pipeline, least recently used first."""
        with self._lock:
            return list(self._pipelines)

    def describe(self) -> dict[str, Any]:
        """The cache as plain JSON data, for the worker's node record: its caps; its pipelines, least recently
        used first, with their weight bytes; and the bytes of every pipeline it has loaded (what it frees room
        for before loading one again). The scheduler models the cache from it (scheduler/workers.py)."""
        with self._lock:
            return {
                "max_pipelines": self.max_pipelines,
                "max_bytes": self.max_bytes,
                "entries": [{"model": model, "profile": profile, "bytes": self._bytes.get((model, profile), 0)}
                            for model, profile in self._pipelines],
                "sizes": [{"model": model, "profile": profile, "bytes": size}
                          for (model, profile), size in self._seen_bytes.items()],
            }

    def bytes_loaded(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def bytes_of(self, pipe: Any) -> int | None:
        """The weight bytes measured when `pipe` was loaded; None when it is not one of the loaded pipelines."""
        with self._lock:
            return next((self._bytes.get(key) for key, held in self._pipelines.items() if held is pipe), None)

    def host_bytes_loaded(self) -> int:
        """Weight bytes the loaded pipelines hold in host memory now (offloaded components, pinned copies of
        streamed ones; on a CPU device, everything)."""
        with self._lock:
            return sum(pipeline_bytes(pipe, on="cpu") for pipe in self._pipelines.values())

    def evict(self, name: str, profile: Profile | None = None) -> bool:
        """Drop the pipelines of model `name` (only the one under `profile` when given); False if none was
        loaded."""
        with self._lock:
            if profile is not None:
                keys = [pipeline_key(name, profile)] if pipeline_key(name, profile) in self._pipelines else []
            else:
                keys = [key for key in self._pipelines if key[0] == name]
            for key in keys:
                self._evict_key(key)
            return bool(keys)

    def _evict_key(self, key: tuple[str, str | None]) -> None:
        pipe = self._pipelines.pop(key)
        self._bytes.pop(key, None)
        self.embedding_cache.drop(key)
        info = pipeline_info(pipe)
        offload_dir = info.offload_dir if info is not None else None
        del pipe, info
        gc.collect()
        if offload_dir is not None:  # disk offload's block files: the size of the denoiser
            shutil.rmtree(offload_dir, ignore_errors=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def clear(self) -> None:
        with self._lock:
            for key in list(self._pipelines):
                self._evict_key(key)


# --- out of memory ------------------------------------------------------------------------------------------

# One definition of an out-of-memory error for the worker and its tests (re-exported here).
is_out_of_memory = _is_out_of_memory


def _recover_after_failure(pipe: Any, device: torch.device) -> None:
    # Model offload: put every component back where its hooks expect it, as the pipeline does on success.
    free_hooks = getattr(pipe, "maybe_free_model_hooks", None)
    if callable(free_hooks):
        with contextlib.suppress(Exception):
            free_hooks()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- requests and results ----------------------------------------------------------------------------


@dataclass
class RenderRequest:
    job_id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    num_images: int
    # The LoRAs applied for it, (name, weight, A1111 short hash), for the infotext; the pipeline has them applied
    # already (actors/lora_apply.py): a batch shares one set.
    loras: tuple[tuple[str, float, str], ...] = ()
    # A1111's sampler name and schedule type (renderfarm/samplers.py); None: the pipeline's own scheduler.
    sampler: str | None = None
    schedule: str | None = None
    # Image inputs (actors/tasks.py): the init image (img2img) as PNG bytes, and a mask (inpainting, white
    # repaints) as a single-channel PNG; `strength` (None: A1111's 0.75 with an init image), `mask_blur` and
    # `resize_mode`, `inpaint_area` and `mask_padding` as JobSpec names them.
    init_image: bytes | list[bytes] | None = None  # a list: one per image (init_from an earlier job, renderfarm/chains.py)
    mask: bytes | None = None
    strength: float | None = None
    mask_blur: int = 4
    resize_mode: str = "none"
    inpaint_area: str = "whole"
    mask_padding: int = 32
    # The second pass of a hires fix (renderfarm/chains.py): (scale, its steps or 0, the first pass's width,
    # height and steps), for the infotext, which A1111 writes with the first pass's size and steps.
    hires: tuple[float, int, int, int, int] | None = None

    @property
    def task(self) -> str:
        return image_task(self.init_image, self.mask)

    @property
    def effective_strength(self) -> float | None:
        return strength_used(self.init_image, self.strength)


@dataclass
class RenderResult:
    job_id: str
    images: list[bytes]  # PNG files
    seeds: list[int]
    parameters: list[str]  # the A1111 infotext written into each PNG
    # load_s (filled by the caller), encode_s, denoise_s, denoise_s_per_step, decode_s, total_s:
    # the stage times of the whole batch, shared by every job in it.
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    peak_growth_mb: float = 0.0  # the peak less what was on the device when the render began
    # CUDA: torch's peak *reserved* memory (what the planner predicts, less the context); 0.0 elsewhere.
    peak_reserved_mb: float = 0.0
    # Distinct prompts of the whole batch encoded now / taken from the embedding cache.
    encoded_prompts: int = 0
    cached_prompts: int = 0


# Fields every request of one batch must share: they shape the single pipeline call.
BATCH_SHARED_FIELDS = ("width", "height", "steps", "guidance", "loras", "sampler", "schedule", "task",
                       "effective_strength", "mask_blur", "resize_mode")


class RenderInterrupted(RuntimeError):
    """A render stopped between two steps, for the reason given (cancelled, out of time)."""


def render_batch(
    pipe: Any,
    entry: ModelEntry,
    requests: list[RenderRequest],
    embedding_cache: EmbeddingCache | None = None,
    should_stop: Callable[[], str | None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[RenderResult]:
    """Render `requests` (same size, steps and guidance) in one pipeline call; one result per request.

    `should_stop` is asked after every denoising step; when it returns a reason (the jobs were cancelled,
    the render ran past its time) the render stops there with RenderInterrupted. `on_step(step, steps)` is
    called after every denoising step too (the worker publishes it: actors/progress.py); it must not block.

    Prompt embeddings come from `embedding_cache`, or when it is None from the cache of the PipelineCache
    that loaded `pipe` (if any): a prompt already encoded for this model and profile is not encoded again.
    Any exception (out-of-memory included, see `is_out_of_memory`) propagates after the pipeline has been put
    back in a usable state.
    """
    # 1. Check inputs.
    _check_batch(entry, requests)
    family = family_for(entry)
    info = pipeline_info(pipe)
    if embedding_cache is None and info is not None:
        embedding_cache = info.embedding_cache
    first = requests[0]
    width, height, steps, guidance = first.width, first.height, first.steps, first.guidance
    device = pipe._execution_device
    seeds = [[request.seed + i for i in range(request.num_images)] for request in requests]
    # One generator per image: the image depends on its own seed only, never on its batch neighbours.
    generators = [torch.Generator(device).manual_seed(seed) for job_seeds in seeds for seed in job_seeds]
    do_cfg = family.does_cfg(pipe, guidance)
    # Img2img and inpainting: the inputs fitted to the job's size (a bad one fails here, before anything runs),
    # the task pipeline on the same weights, and the steps the pipeline really runs under the strength.
    task, strength = first.task, first.effective_strength
    inputs = prepare_inputs(requests, width, height) if task != "txt2img" else None
    call_pipe = task_pipeline(pipe, family, task) if task != "txt2img" else pipe
    denoise_steps = effective_steps(steps, strength, entry.family.flow_matching)
    if task != "txt2img":
        size_arguments = task_call_arguments(call_pipe, task, inputs, strength, width, height)
    else:
        size_arguments = {"height": height, "width": width}

    step_ends: list[float] = []

    def on_step_end(_pipe, _step, _timestep, _callback_kwargs):
        _synchronize(device)
        step_ends.append(time.perf_counter())
        if on_step is not None:
            on_step(min(_step + 1, denoise_steps), denoise_steps)
        reason = should_stop() if should_stop is not None else None
        if reason:
            raise RenderInterrupted(reason)
        return {}

    total_start = time.perf_counter()
    moves_before = info.encoder_moves_s if info is not None else 0.0
    try:
        with PeakMemory(device) as peak, torch.no_grad():
            # 2. Prompt embeddings, one row per image.
            embeddings, encoded, cached = _embeddings(
                pipe, family, entry, requests, do_cfg, device, info, embedding_cache
            )
            _synchronize(device)
            denoise_start = time.perf_counter()

            # 3. Denoise: the whole batch in one pipeline call, which stops at the latents (with the batch's sampler:
            # the pipeline's own scheduler is back in place after it, whatever happens).
            with sampler_for_call(call_pipe, first.sampler, first.schedule), _task_guards(pipe, call_pipe):
                if denoise_steps == 0:
                    # No step runs at this strength (diffusers' pipelines refuse it): the init image's VAE round trip.
                    latents = family.encode_image(pipe, image_tensor(pipe, inputs.images))
                else:
                    latents = call_pipe(
                        **embeddings,
                        **family.call_arguments(pipe),
                        **size_arguments,
                        num_inference_steps=steps,
                        guidance_scale=guidance,
                        num_images_per_prompt=1,
                        generator=generators,
                        output_type="latent",
                        callback_on_step_end=on_step_end,
                    ).images
                infotext = family.infotext_fields(call_pipe, guidance)  # names the scheduler that rendered
            _synchronize(device)
            decode_start = time.perf_counter()

            # 4. Decode, as the family's pipeline does after its denoising loop.
            images = family.decode(pipe, latents, height=height, width=width, device=device)
            _offload_after_decode(pipe)
            if inputs is not None and inputs.overlays is not None:
                # Inpainting: the original outside the (blurred) mask, as A1111 composites it.
                images = [apply_overlay(image, original, overlay)
                          for image, original, overlay in zip(images, inputs.images, inputs.overlays)]
            _synchronize(device)
            decode_end = time.perf_counter()
    except BaseException:
        _recover_after_failure(pipe, device)
        raise

    # 5. Package the results: PNGs carrying their infotext, the batch's stage times shared by every job.
    denoise_s = decode_start - denoise_start
    if len(step_ends) >= 2:
        # Steady state: leaves out the pipeline's set-up before the first step.
        per_step = (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1)
    else:
        per_step = denoise_s / max(denoise_steps, 1)
    timings = {
        "load_s": 0.0,
        "encode_s": denoise_start - total_start,
        "denoise_s": denoise_s,
        "denoise_s_per_step": per_step,
        "decode_s": decode_end - decode_start,
        # Cache-and-offload: text encoders moved to the device and back for this batch's encode.
        "move_s": (info.encoder_moves_s - moves_before) if info is not None else 0.0,
    }
    results: list[RenderResult] = []
    offset = 0
    for request, job_seeds in zip(requests, seeds):
        pngs, texts = [], []
        for seed, image in zip(job_seeds, images[offset : offset + request.num_images]):
            text = a1111_parameters(
                prompt=request.prompt,
                # A negative prompt acts only through classifier-free guidance: Flux (guidance-distilled)
                # and CFG scale <= 1 never see it, so the infotext does not claim it.
                negative_prompt=request.negative_prompt if do_cfg else "",
                steps=request.hires[4] if request.hires else steps,
                seed=seed,
                width=request.hires[2] if request.hires else width,
                height=request.hires[3] if request.hires else height,
                model=entry.name,
                loras=request.loras,
                denoising_strength=strength,
                mask_blur=request.mask_blur if task == "inpaint" else None,
                masked_area_padding=inputs.masked_area_padding(offset) if inputs is not None else None,
                hires=request.hires[:2] if request.hires else None,
                **infotext,
            )
            pngs.append(png_bytes(image, text))
            texts.append(text)
        offset += request.num_images
        results.append(
            RenderResult(
                job_id=request.job_id,
                images=pngs,
                seeds=job_seeds,
                parameters=texts,
                timings=dict(timings),
                peak_memory_mb=peak.mb,
                peak_growth_mb=peak.growth_mb,
                peak_reserved_mb=peak.reserved_mb,
                encoded_prompts=encoded,
                cached_prompts=cached,
            )
        )
    total_s = time.perf_counter() - total_start
    for result in results:
        result.timings["total_s"] = total_s
    return results


@contextlib.contextmanager
def _task_guards(pipe: Any, call_pipe: Any) -> Iterator[None]:
    """A task pipeline renders with its own model-offload hook chain, and leaves the shared VAE's dtype as it
    found it (actors/tasks.py)."""
    if call_pipe is pipe:
        yield
        return
    with model_offload_for(pipe, call_pipe), vae_as_loaded(pipe):
        yield


@contextlib.contextmanager
def sampler_for_call(pipe: Any, sampler: str | None, schedule: str | None) -> Iterator[None]:
    """The pipeline renders with `sampler` (A1111 name) and `schedule` inside the block, its own scheduler again
    after it (renderfarm/samplers.py). None for both: its own, untouched."""
    if sampler is None and schedule in (None, "Automatic"):
        yield
        return
    from renderfarm.samplers import scheduler_for

    own = pipe.scheduler
    pipe.scheduler = scheduler_for(own, sampler, schedule)
    try:
        yield
    finally:
        pipe.scheduler = own


def _check_batch(entry: ModelEntry, requests: list[RenderRequest]) -> None:
    if not requests:
        raise ValueError("render_batch needs at least one request")
    first = requests[0]
    for request in requests[1:]:
        for name in BATCH_SHARED_FIELDS:
            if getattr(request, name) != getattr(first, name):
                raise ValueError(
                    f"all requests of a batch must share {name}: job {request.job_id} has "
                    f"{name}={getattr(request, name)!r}, job {first.job_id} has {getattr(first, name)!r}"
                )
    for request in requests:
        if request.num_images < 1:
            raise ValueError(f"job {request.job_id}: num_images must be at least 1, got {request.num_images}")
    if first.steps < 1:
        raise ValueError(f"steps must be at least 1, got {first.steps}")
    entry.check_size("width", first.width)
    entry.check_size("height", first.height)


def _embeddings(
    pipe: Any,
    family: Family,
    entry: ModelEntry,
    requests: list[RenderRequest],
    do_cfg: bool,
    device: torch.device,
    info: PipelineInfo | None,
    cache: EmbeddingCache | None,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """The prompt embeddings of `requests`, one row per image, on `device`; also how many distinct prompts
    were encoded now and how many came from `cache`. Missing prompts are encoded together in one call."""
    owner = info.key if info is not None else (entry.name, None)
    # Without CFG the negative prompt plays no part: it must not split the cache. A LoRA on a text encoder
    # changes the embeddings: the applied set's part on them does (lora_apply.text_encoder_key).
    lora = text_encoder_key(pipe)
    keys = [(owner, r.prompt, r.negative_prompt if do_cfg else "", do_cfg, lora) for r in requests]
    rows: dict[EmbeddingKey, dict[str, torch.Tensor]] = {}
    for key in dict.fromkeys(keys):
        found = cache.get(key) if cache is not None else None
        if found is not None:
            rows[key] = found
    missing = [key for key in dict.fromkeys(keys) if key not in rows]
    if missing:
        with text_encoders_on(pipe, family, info, device):
            encoded = family.encode(
                pipe,
                prompts=[key[1] for key in missing],
                negative_prompts=[key[2] for key in missing],
                do_cfg=do_cfg,
                device=device,
            )
        for index, key in enumerate(missing):
            rows[key] = {name: tensor[index : index + 1] for name, tensor in encoded.items()}
            if cache is not None:
                cache.put(key, rows[key])
    # Each job's prompt is encoded once; every image of the job gets its own copy.
    repeats = torch.tensor([request.num_images for request in requests], device=device)
    embeddings = {
        name: torch.cat([rows[key][name].to(device) for key in keys]).repeat_interleave(repeats, dim=0)
        for name in rows[keys[0]]
    }
    return embeddings, len(missing), len(rows) - len(missing)


def _synchronize(device: torch.device) -> None:
    # Stage times on CUDA are only true once the queued kernels have run.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _offload_after_decode(pipe: Any) -> None:
    """Model offload: the pipeline call frees its hooks when it returns (`maybe_free_model_hooks`), but we
    decode after it returns, so accelerate's hook brings the VAE onto the card and nothing takes it off: it
    would sit there through the next render's encode and denoise. Free the hooks again, as the pipeline's
    own decode would have."""
    if getattr(pipe, "_all_hooks", None):
        pipe.maybe_free_model_hooks()
