"""Load diffusers pipelines for catalog models, keep a few loaded, and render batches of jobs.

Imported only inside worker processes: it imports torch and diffusers at module level.

A batch is rendered in ONE pipeline call, with its stages measured separately: text encoding (we call
the pipeline's `encode_prompt` ourselves and pass the embeddings in), denoising (`output_type="latent"`,
per-step times from `callback_on_step_end`), and VAE decoding (done here, per family, as the pipelines
do it). Image i of a job is drawn from its own generator seeded with `seed + i` (the AUTOMATIC1111
convention), so a job renders the same image alone or inside any batch.
"""

from __future__ import annotations

import gc
import io
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from PIL.PngImagePlugin import PngInfo

from renderfarm.actors.standins import ensure_standin
from renderfarm.planning.catalog import ModelEntry

try:
    from diffusers.utils.torch_utils import get_module_execution_device
except ImportError:  # older diffusers: no offload-aware lookup, the weights' device is the answer

    def get_module_execution_device(module: torch.nn.Module) -> torch.device:
        return next(module.parameters()).device


DEFAULT_MAX_PIPELINES = 2


class ModelSourceError(OSError):
    """A model's weights could not be found or read at its source."""


# --- loading ---------------------------------------------------------------------------------------


def resolve_source(entry: ModelEntry, cache_dir: Path | None = None) -> str:
    """Where `entry` loads from: its stand-in folder (built on first use) or its catalog source."""
    if entry.standin:
        return str(ensure_standin(entry, cache_dir))
    if not entry.source:
        raise ModelSourceError(f"model {entry.name!r} has no source in the catalog")
    return entry.source


def _dtype_kwarg() -> str:
    # Recent diffusers renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns); older
    # releases silently ignore `dtype` and would load in float32, so ask the release which it reads.
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


_DTYPE_KWARG = _dtype_kwarg()


def _is_local(source: str) -> bool:
    # A Hugging Face id is "org/name"; anything absolute, relative-looking or existing is a path.
    return os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source)


def load_pipeline(
    entry: ModelEntry,
    cache_dir: Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> diffusers.DiffusionPipeline:
    """Load `entry` with the diffusers class its family names, on `device`.

    dtype defaults to float32: models load at the highest precision unless the caller (a profile)
    asks for another, so every precision choice is visible at the call site.
    """
    pipeline_cls = getattr(diffusers, entry.family.pipeline, None)
    if pipeline_cls is None:
        raise ValueError(
            f"model {entry.name!r}: diffusers {diffusers.__version__} has no pipeline class "
            f"{entry.family.pipeline!r}"
        )
    dtype = torch.float32 if dtype is None else dtype
    source = resolve_source(entry, cache_dir)
    if _is_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelSourceError(f"model {entry.name!r}: local source {str(path)!r} does not exist")
        if path.is_file():
            raise ModelSourceError(
                f"model {entry.name!r}: {str(path)!r} is a single file; load_pipeline reads a diffusers "
                "folder (model_index.json) or a Hugging Face id"
            )
        if not (path / "model_index.json").is_file():
            raise ModelSourceError(
                f"model {entry.name!r}: {str(path)!r} is not a diffusers pipeline folder "
                "(no model_index.json)"
            )
        source = str(path)
    try:
        pipe = pipeline_cls.from_pretrained(source, **{_DTYPE_KWARG: dtype})
    except OSError as exc:
        # Offline, a hub id that is not in the local cache ends here.
        raise ModelSourceError(f"cannot load model {entry.name!r} from {source!r}: {exc}") from exc
    pipe.to(device)
    # Workers log their own progress; tqdm bars in worker logs are noise.
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PipelineCache:
    """The pipelines one worker keeps loaded, least recently used evicted first.

    A lock serialises loads and evictions, which is enough for one worker (one render at a time plus a
    control thread); it does not make two renders on one pipeline safe.
    """

    def __init__(
        self,
        max_pipelines: int = DEFAULT_MAX_PIPELINES,
        cache_dir: Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        loader: Callable[[ModelEntry], Any] | None = None,
    ):
        if max_pipelines < 1:
            raise ValueError(f"max_pipelines must be at least 1, got {max_pipelines}")
        self.max_pipelines = max_pipelines
        self.cache_dir = cache_dir
        self.device = torch.device(device)
        self.dtype = dtype
        self._loader = loader or (
            lambda entry: load_pipeline(entry, self.cache_dir, device=self.device, dtype=self.dtype)
        )
        self._pipelines: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.RLock()

    def get(self, entry: ModelEntry) -> tuple[Any, float]:
        """The pipeline of `entry` and the seconds spent loading it now (0.0 when already loaded)."""
        with self._lock:
            if entry.name in self._pipelines:
                self._pipelines.move_to_end(entry.name)
                return self._pipelines[entry.name], 0.0
            # Evict before loading: the memory must be free before the next model arrives.
            while len(self._pipelines) >= self.max_pipelines:
                self.evict(next(iter(self._pipelines)))
            start = time.perf_counter()
            pipe = self._loader(entry)
            load_s = time.perf_counter() - start
            self._pipelines[entry.name] = pipe
            return pipe, load_s

    def loaded(self) -> list[str]:
        """Names of the loaded models, least recently used first."""
        with self._lock:
            return list(self._pipelines)

    def evict(self, name: str) -> bool:
        """Drop the pipeline of model `name`; False if it was not loaded."""
        with self._lock:
            pipe = self._pipelines.pop(name, None)
            if pipe is None:
                return False
            del pipe
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return True

    def clear(self) -> None:
        with self._lock:
            for name in list(self._pipelines):
                self.evict(name)


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


# Fields every request of one batch must share: they shape the single pipeline call.
BATCH_SHARED_FIELDS = ("width", "height", "steps", "guidance")


def render_batch(pipe: Any, entry: ModelEntry, requests: list[RenderRequest]) -> list[RenderResult]:
    """Render `requests` (same size, steps and guidance) in one pipeline call; one result per request."""
    _check_batch(entry, requests)
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
        return {}

    total_start = time.perf_counter()
    with _PeakMemory(device) as peak, torch.no_grad():
        embeddings = _ENCODERS[family](
            pipe,
            prompts=[request.prompt for request in requests],
            negative_prompts=[request.negative_prompt for request in requests],
            do_cfg=do_cfg,
            device=device,
        )
        # Encode each job's prompt once, then give every image of the job its own copy.
        repeats = torch.tensor(counts, device=device)
        embeddings = {name: tensor.repeat_interleave(repeats, dim=0) for name, tensor in embeddings.items()}
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
        _synchronize(device)
        decode_end = time.perf_counter()

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
    }

    info = _sampler_info(pipe, family, guidance)
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
                **info,
            )
            pngs.append(_png_bytes(image, text))
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
        image = vae.decode(latents.to(vae_device, vae.dtype), return_dict=False)[0]
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


# --- PNG metadata in the AUTOMATIC1111 / Forge format --------------------------------------------------

A1111_SAMPLER_NAMES = {
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "FlowMatchEulerDiscreteScheduler": "Euler",
    "FlowMatchHeunDiscreteScheduler": "Heun",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
    "DEISMultistepScheduler": "DEIS",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "LCMScheduler": "LCM",
}


def sampler_name(scheduler: Any) -> str:
    """The A1111 sampler name of a diffusers scheduler (its class name, shortened, when A1111 has none)."""
    name = type(scheduler).__name__
    if name == "DPMSolverMultistepScheduler":
        sde = scheduler.config.get("algorithm_type", "") in ("sde-dpmsolver", "sde-dpmsolver++")
        return "DPM++ 2M SDE" if sde else "DPM++ 2M"
    return A1111_SAMPLER_NAMES.get(name, name.removesuffix("Scheduler"))


def schedule_type(scheduler: Any) -> str:
    """The A1111 "Schedule type" of a diffusers scheduler's sigma spacing."""
    config = scheduler.config
    if config.get("use_karras_sigmas"):
        return "Karras"
    if config.get("use_exponential_sigmas"):
        return "Exponential"
    if config.get("use_beta_sigmas"):
        return "Beta"
    if type(scheduler).__name__.startswith("FlowMatch"):
        return "Simple"  # what Forge writes for Flux's flow-matching sigmas
    return "Normal"


def _sampler_info(pipe: Any, family: str, guidance: float) -> dict[str, Any]:
    info: dict[str, Any] = {
        "sampler": sampler_name(pipe.scheduler),
        "schedule_type": schedule_type(pipe.scheduler),
        "cfg_scale": guidance,
    }
    if family == "flux":
        # Forge's convention for guidance-distilled Flux: no CFG pass (scale 1), guidance as an input.
        info["cfg_scale"] = 1.0
        if pipe.transformer.config.guidance_embeds:
            info["distilled_cfg_scale"] = guidance
    return info


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("renderfarm")
    except PackageNotFoundError:
        # Running from a source tree that is not installed: read the version from pyproject.toml.
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        match = pyproject.is_file() and re.search(
            r'^version\s*=\s*"([^"]+)"', pyproject.read_text(), flags=re.MULTILINE
        )
        return match.group(1) if match else "unknown"


RENDERFARM_VERSION = _version()


def _quote(value: Any) -> str:
    # A1111's rule: a value holding a separator is written as a JSON string.
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_parameters(
    *,
    prompt: str,
    negative_prompt: str = "",
    steps: int,
    sampler: str,
    schedule_type: str | None,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    distilled_cfg_scale: float | None = None,
    version: str | None = None,
) -> str:
    """The infotext AUTOMATIC1111 / Forge write into a PNG's `parameters` chunk."""
    fields: dict[str, Any] = {"Steps": steps, "Sampler": sampler}
    if schedule_type:
        fields["Schedule type"] = schedule_type
    fields["CFG scale"] = float(cfg_scale)
    if distilled_cfg_scale is not None:
        fields["Distilled CFG Scale"] = float(distilled_cfg_scale)
    fields["Seed"] = seed
    fields["Size"] = f"{width}x{height}"
    fields["Model"] = model
    fields["Version"] = version or f"renderfarm {RENDERFARM_VERSION}"
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


# A1111's own pattern for one "Key: value" pair of the last infotext line.
_PARAMETER_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """Split an A1111 infotext into `prompt`, `negative_prompt` and its "Key: value" pairs (as strings)."""
    *lines, last = text.strip().split("\n")
    # As in A1111: the last line holds the parameters only if it has at least 3 of them.
    if len(_PARAMETER_RE.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if not negative and line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    parsed = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in _PARAMETER_RE.findall(last):
        if len(value) >= 2 and value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        parsed[key] = value
    return parsed


def _png_bytes(image: Any, parameters: str) -> bytes:
    info = PngInfo()
    # A tEXt chunk; PIL writes iTXt instead when the text is not Latin-1, as A1111 does.
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


# --- peak memory ------------------------------------------------------------------------------------------


class _PeakMemory:
    """Peak memory of a render, in MiB.

    CUDA: `max_memory_allocated` after resetting the peak. CPU: the growth of the resident set's high-water
    mark over the resident set at the start. Linux resets the mark when "5" is written to
    /proc/self/clear_refs, so no sampling is needed; a sampling thread is only the fallback (a thread
    waking every few milliseconds measurably slows small renders on a 2-core machine). 0.0 without /proc.
    """

    INTERVAL_S = 0.01

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = 0.0
        self._start_rss = 0
        self._peak_rss = 0
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
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
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self._hwm_reset:
            self._peak_rss = max(self._peak_rss, _status_kib("VmHWM") * 1024)
        self._peak_rss = max(self._peak_rss, _status_kib("VmRSS") * 1024)
        self.mb = max(0, self._peak_rss - self._start_rss) / 2**20

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
