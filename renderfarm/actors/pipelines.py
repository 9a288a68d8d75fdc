"""Keep a few pipelines loaded per worker and render batches of jobs with them.

Imported only inside worker processes: it imports torch and diffusers at module level. Building a pipeline
for a (model, profile) is actors/loading.py; the prompt-embedding cache is actors/embeddings.py; the
A1111 infotext written into each PNG is renderfarm/infotext.py.

A batch is rendered in ONE pipeline call, with its stages measured separately: text encoding (we call
the pipeline's `encode_prompt` ourselves and pass the embeddings in; an `EmbeddingCache` keeps each
prompt's embeddings, so a prompt is encoded once per model and profile), denoising (`output_type="latent"`,
per-step times from `callback_on_step_end`), and VAE decoding (done here, per family, as the pipelines
do it). Image i of a job is drawn from its own generator seeded with `seed + i` (the AUTOMATIC1111
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from renderfarm.actors.embeddings import EmbeddingCache, EmbeddingKey
from renderfarm.actors.escalation import is_out_of_memory as _is_out_of_memory
from renderfarm.actors.loading import (
    PipelineInfo,
    get_module_execution_device,
    load_pipeline,
    pipeline_bytes,
    pipeline_info,
    pipeline_key,
    set_vae_mode,
    text_encoders_on,
)
from renderfarm.infotext import a1111_parameters, png_bytes, sampler_info
from renderfarm.planning.catalog import ModelEntry
from renderfarm.planning.profiles import Profile

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

    def bytes_loaded(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

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
BATCH_SHARED_FIELDS = ("width", "height", "steps", "guidance")


class RenderInterrupted(RuntimeError):
    """A render stopped between two steps, for the reason given (cancelled, out of time)."""


def render_batch(
    pipe: Any,
    entry: ModelEntry,
    requests: list[RenderRequest],
    embedding_cache: EmbeddingCache | None = None,
    should_stop: Callable[[], str | None] | None = None,
) -> list[RenderResult]:
    """Render `requests` (same size, steps and guidance) in one pipeline call; one result per request.

    `should_stop` is asked after every denoising step; when it returns a reason (the jobs were cancelled,
    the render ran past its time) the render stops there with RenderInterrupted.

    Prompt embeddings come from `embedding_cache`, or when it is None from the cache of the PipelineCache
    that loaded `pipe` (if any): a prompt already encoded for this model and profile is not encoded again.
    Any exception (out-of-memory included, see `is_out_of_memory`) propagates after the pipeline has been put
    back in a usable state.
    """
    _check_batch(entry, requests)
    info = pipeline_info(pipe)
    if embedding_cache is None and info is not None:
        embedding_cache = info.embedding_cache
    family = entry.family.name
    if family not in _ENCODERS:
        raise ValueError(f"render_batch does not know how to render family {family!r} ({entry.name})")
    first = requests[0]
    width, height, steps, guidance = first.width, first.height, first.steps, first.guidance
    device = pipe._execution_device
    counts = [request.num_images for request in requests]
    seeds = [[request.seed + i for i in range(request.num_images)] for request in requests]
    # One generator per image: the image depends on its own seed only, never on its batch neighbours.
    generators = [torch.Generator(device).manual_seed(seed) for job_seeds in seeds for seed in job_seeds]
    do_cfg = _does_cfg(pipe, family, guidance)

    step_ends: list[float] = []

    def on_step_end(_pipe, _step, _timestep, _callback_kwargs):
        _synchronize(device)
        step_ends.append(time.perf_counter())
        reason = should_stop() if should_stop is not None else None
        if reason:
            raise RenderInterrupted(reason)
        return {}

    total_start = time.perf_counter()
    moves_before = info.encoder_moves_s if info is not None else 0.0
    try:
        with _PeakMemory(device) as peak, torch.no_grad():
            embeddings, encoded, cached = _embeddings(
                pipe, entry, requests, do_cfg, device, info, embedding_cache
            )
            # Each job's prompt is encoded once; every image of the job gets its own copy.
            repeats = torch.tensor(counts, device=device)
            embeddings = {name: rows.repeat_interleave(repeats, dim=0) for name, rows in embeddings.items()}
            _synchronize(device)
            denoise_start = time.perf_counter()

            extra = {"max_sequence_length": _t5_max_length(pipe)} if family == "flux" else {}
            latents = pipe(
                **embeddings,
                **extra,
                height=height,
                width=width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                num_images_per_prompt=1,
                generator=generators,
                output_type="latent",
                callback_on_step_end=on_step_end,
            ).images
            _synchronize(device)
            decode_start = time.perf_counter()

            images = _decode(pipe, family, latents, height=height, width=width, device=device)
            _offload_after_decode(pipe)
            _synchronize(device)
            decode_end = time.perf_counter()
    except BaseException:
        _recover_after_failure(pipe, device)
        raise

    denoise_s = decode_start - denoise_start
    if len(step_ends) >= 2:
        # Steady state: leaves out the pipeline's set-up before the first step.
        per_step = (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1)
    else:
        per_step = denoise_s / steps
    timings = {
        "load_s": 0.0,
        "encode_s": denoise_start - total_start,
        "denoise_s": denoise_s,
        "denoise_s_per_step": per_step,
        "decode_s": decode_end - decode_start,
        # Cache-and-offload: text encoders moved to the device and back for this batch's encode.
        "move_s": (info.encoder_moves_s - moves_before) if info is not None else 0.0,
    }

    infotext = sampler_info(pipe, family, guidance)
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
                steps=steps,
                seed=seed,
                width=width,
                height=height,
                model=entry.name,
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
    entry: ModelEntry,
    requests: list[RenderRequest],
    do_cfg: bool,
    device: torch.device,
    info: PipelineInfo | None,
    cache: EmbeddingCache | None,
) -> tuple[dict[str, torch.Tensor], int, int]:
    """The prompt embeddings of `requests`, one row per request, on `device`; also how many distinct prompts
    were encoded now and how many came from `cache`. Missing prompts are encoded together in one call."""
    family = entry.family.name
    owner = info.key if info is not None else (entry.name, None)
    # Without CFG the negative prompt plays no part: it must not split the cache.
    keys = [(owner, r.prompt, r.negative_prompt if do_cfg else "", do_cfg) for r in requests]
    rows: dict[EmbeddingKey, dict[str, torch.Tensor]] = {}
    for key in dict.fromkeys(keys):
        found = cache.get(key) if cache is not None else None
        if found is not None:
            rows[key] = found
    missing = [key for key in dict.fromkeys(keys) if key not in rows]
    if missing:
        with text_encoders_on(pipe, family, info, device):
            encoded = _ENCODERS[family](
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
    names = rows[keys[0]].keys()
    embeddings = {name: torch.cat([rows[key][name].to(device) for key in keys]) for name in names}
    return embeddings, len(missing), len(rows) - len(missing)


def _does_cfg(pipe: Any, family: str, guidance: float) -> bool:
    # The SD pipelines' own rule: guidance <= 1, or a guidance-embedding UNet (LCM), means one pass.
    if family == "flux":
        return False
    return guidance > 1 and pipe.unet.config.time_cond_proj_dim is None


def _t5_max_length(pipe: Any) -> int:
    # Flux pads prompts to this many T5 tokens; 512 is the pipeline's ceiling (FLUX.1-dev's length).
    return min(512, int(pipe.tokenizer_2.model_max_length))


def _synchronize(device: torch.device) -> None:
    # Stage times on CUDA are only true once the queued kernels have run.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- text encoding, per family ------------------------------------------------------------------------


def _encode_sd15(pipe, prompts, negative_prompts, do_cfg, device) -> dict[str, torch.Tensor]:
    prompt_embeds, negative_embeds = pipe.encode_prompt(
        prompts, device, 1, do_cfg, negative_prompt=negative_prompts if do_cfg else None
    )
    embeddings = {"prompt_embeds": prompt_embeds}
    if do_cfg:
        embeddings["negative_prompt_embeds"] = negative_embeds
    return embeddings


def _encode_sdxl(pipe, prompts, negative_prompts, do_cfg, device) -> dict[str, torch.Tensor]:
    prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=do_cfg,
        negative_prompt=negative_prompts if do_cfg else None,
    )
    embeddings = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
    if do_cfg:
        if pipe.config.force_zeros_for_empty_prompt:
            # SDXL's convention for "no negative prompt" is a zero embedding, not the encoded "";
            # decided per job so a job renders the same alone and in a batch.
            empty = torch.tensor([not text for text in negative_prompts], device=negative_embeds.device)
            negative_embeds = torch.where(empty[:, None, None], 0.0, negative_embeds)
            negative_pooled = torch.where(empty[:, None], 0.0, negative_pooled)
        embeddings["negative_prompt_embeds"] = negative_embeds
        embeddings["negative_pooled_prompt_embeds"] = negative_pooled
    return embeddings


def _encode_flux(pipe, prompts, negative_prompts, do_cfg, device) -> dict[str, torch.Tensor]:
    prompt_embeds, pooled, _text_ids = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        device=device,
        num_images_per_prompt=1,
        max_sequence_length=_t5_max_length(pipe),
    )
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}


_ENCODERS = {"sd15": _encode_sd15, "sdxl": _encode_sdxl, "flux": _encode_flux}


# --- VAE decoding, per family (as each pipeline does it after its denoising loop) -----------------------


def _offload_after_decode(pipe: Any) -> None:
    """Model offload: the pipeline call frees its hooks when it returns (`maybe_free_model_hooks`), but we
    decode after it returns, so accelerate's hook brings the VAE onto the card and nothing takes it off: it
    would sit there through the next render's encode and denoise. Free the hooks again, as the pipeline's
    own decode would have."""
    if getattr(pipe, "_all_hooks", None):
        pipe.maybe_free_model_hooks()


def _decode(pipe: Any, family: str, latents: torch.Tensor, height: int, width: int, device: torch.device):
    vae = pipe.vae
    # With offloading the VAE's weights may sit elsewhere than where it computes.
    vae_device = get_module_execution_device(vae)
    do_denormalize = None
    if family == "flux":
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae_device, vae.dtype), return_dict=False)[0]
    elif family == "sdxl":
        # The SDXL VAE overflows in float16: the pipeline decodes in float32 when the config says so.
        needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
        if needs_upcasting:
            vae.to(dtype=torch.float32)
        mean, std = vae.config.get("latents_mean"), vae.config.get("latents_std")
        if mean is not None and std is not None:
            channels = latents.shape[1]
            mean = torch.tensor(mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        try:
            image = vae.decode(latents.to(vae_device, vae.dtype), return_dict=False)[0]
        finally:  # also after an out-of-memory error: the next render expects the VAE as it was
            if needs_upcasting:
                vae.to(dtype=torch.float16)
        if getattr(pipe, "watermark", None) is not None:
            image = pipe.watermark.apply_watermark(image)
    else:
        latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(vae_device, vae.dtype), return_dict=False)[0]
        # A real SD 1.5 folder ships a safety checker; the pipeline runs it, so we do too.
        image, has_nsfw = pipe.run_safety_checker(image, device, latents.dtype)
        if has_nsfw is not None:
            do_denormalize = [not flagged for flagged in has_nsfw]
    return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=do_denormalize)


# --- peak memory ------------------------------------------------------------------------------------------


class _PeakMemory:
    """Peak memory of a render, in MiB.

    CUDA: `max_memory_allocated` after resetting the peak (`growth_mb`: less what was allocated at the start,
    the other pipelines held on the card among it). CPU: the growth of the resident set's high-water
    mark over the resident set at the start. Linux resets the mark when "5" is written to
    /proc/self/clear_refs, so no sampling is needed; a sampling thread is only the fallback (a thread
    waking every few milliseconds measurably slows small renders on a 2-core machine). 0.0 without /proc.
    """

    INTERVAL_S = 0.01

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = 0.0
        self.growth_mb = 0.0
        self.reserved_mb = 0.0
        self._start_allocated = 0
        self._start_rss = 0
        self._peak_rss = 0
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_allocated = torch.cuda.memory_allocated(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self._start_rss = self._peak_rss = _status_kib("VmRSS") * 1024
        if not self._hwm_reset and self._start_rss:
            self._thread = threading.Thread(target=self._sample, name="renderfarm-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.mb = peak / 2**20
            self.growth_mb = max(0, peak - self._start_allocated) / 2**20
            self.reserved_mb = torch.cuda.max_memory_reserved(self.device) / 2**20
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self._hwm_reset:
            self._peak_rss = max(self._peak_rss, _status_kib("VmHWM") * 1024)
        self._peak_rss = max(self._peak_rss, _status_kib("VmRSS") * 1024)
        self.mb = self.growth_mb = max(0, self._peak_rss - self._start_rss) / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            self._peak_rss = max(self._peak_rss, _status_kib("VmRSS") * 1024)


def _status_kib(field: str) -> int:
    """A `VmRSS`/`VmHWM` line of /proc/self/status in KiB; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
