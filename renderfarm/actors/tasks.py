"""Img2img and inpainting on a loaded text-to-image pipeline: the task pipeline, and the inputs fitted as A1111 does.

The task pipeline (`task_pipeline`): diffusers' `*Img2ImgPipeline` / `*InpaintPipeline` of the model's family,
built from the loaded pipeline's own components, so the weights are shared, never copied. Not through
`DiffusionPipeline.from_pipe`: it ends with `new_pipeline.to(dtype=torch.float32)` when no dtype is given (and
with one dtype for everything when one is), which would cast the shared modules in place: a bf16 denoiser upcast
to twice its memory, a deliberately float32 VAE cast down, a quantized module refused (tests/actors/test_tasks.py
pins that diffusers still does it). What from_pipe does besides is kept: the components the class takes, the
config values its constructor takes (`requires_safety_checker`, `force_zeros_for_empty_prompt`). One task
pipeline per task is kept on the loaded pipeline and goes with it when the cache drops it.

What is shared and what is not:
- modules (weights, LoRA adapters, group-offloading and layerwise-casting hooks, which live on the modules):
  shared, so the task pipeline runs on the same placement as the text-to-image one;
- the scheduler: a fresh one from the loaded pipeline's config at every render (img2img sets its begin index;
  the text-to-image pipeline's own must not carry that);
- model CPU offload (accelerate hooks, chained in the pipeline's `model_cpu_offload_seq` and listed in the
  pipeline's `_all_hooks`): `model_offload_for` installs the task pipeline's chain for the render and the loaded
  pipeline's after it (GPU only: unverified on the CPU machines that test this, see the gpu-marked test);
- the VAE's dtype: SDXL's img2img and inpaint pipelines cast the VAE to float32 to encode and then to the
  prompt's dtype, whatever it was before (pipeline_stable_diffusion_xl_img2img.py, `prepare_latents`), and the
  SD pipelines feed it the prompt's dtype; `vae_as_loaded` encodes in the VAE's own dtype with no cast.

The inputs (`prepare_inputs`): each init image fitted to the job's size by its resize mode as A1111's
`images.resize_image` does, each mask blurred by `mask_blur` as A1111's img2img does (a Gaussian of that sigma,
in x then in y, kernel 2 * int(2.5 * sigma + 0.5) + 1, edges reflected as OpenCV's default) and then fitted
the same way; `apply_overlay` composites the original back outside the mask as A1111's `apply_overlay` does.

Inpaint area "masked" (A1111's "Only masked", `inpaint_full_res`): per job, the box of the blurred, fitted mask's
nonzero pixels grown by `mask_padding` (A1111's `get_crop_region_v2`), widened or heightened to the job's aspect
ratio and kept inside the image (`expand_crop_region`). That crop of the fitted init image and of the mask is
resized to the job's size (resize and fill), rendered, and the result resized back to the crop (crop and resize)
and composited into the fitted init image through the blurred mask, not doubled (A1111's `mask_for_overlay` in
that mode): outside the mask, the original pixels exactly. A1111 cuts the crop from the init image at its own
size and answers at that size; the farm cuts it from the init image fitted to the job's size and answers at the
job's size (the same when the init image is the job's size). An all-black mask has no box: A1111 then renders
plain img2img (the whole picture repainted); the farm renders that job's whole picture, which through an
all-black mask gives the init image back unchanged (nothing to repaint), in a batch as alone.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from renderfarm.actors.families import Family
from renderfarm.errors import SpecError, UnsupportedFamily

TASKS = ("txt2img", "img2img", "inpaint")
RESIZE_MODES = ("none", "resize", "crop", "fill")
LANCZOS = Image.Resampling.LANCZOS


# --- the task pipeline ------------------------------------------------------------------------------


def build_task_pipeline(pipe: Any, pipeline_cls: type) -> Any:
    """A `pipeline_cls` on `pipe`'s components and config, with no cast: what `from_pipe` builds, less its
    final `.to(dtype)`."""
    expected, optional = pipeline_cls._get_signature_keys(pipeline_cls)
    components = {name: module for name, module in pipe.components.items() if name in expected}
    config = {name: value for name, value in pipe.config.items() if name in optional}
    if "add_watermarker" in optional:  # not in the config: whether the loaded pipeline has one
        config["add_watermarker"] = getattr(pipe, "watermark", None) is not None
    task = pipeline_cls(**components, **config)
    task.set_progress_bar_config(disable=True)
    return task


def task_pipeline(pipe: Any, family: Family, task: str) -> Any:
    """The `task` pipeline ("img2img", "inpaint") sharing `pipe`'s weights, built once per loaded pipeline and
    kept on it; its scheduler is a fresh copy of `pipe`'s own (the sampler swap happens on it after)."""
    import diffusers

    class_name = family.task_pipelines.get(task)
    pipeline_cls = getattr(diffusers, class_name, None) if class_name else None
    if pipeline_cls is None:
        raise UnsupportedFamily(
            f"family {family.name!r}: diffusers {diffusers.__version__} has no {task} pipeline"
            + (f" ({class_name})" if class_name else "")
        )
    held = pipe.__dict__.setdefault("_renderfarm_task_pipelines", {})
    if task not in held:
        held[task] = build_task_pipeline(pipe, pipeline_cls)
    task_pipe = held[task]
    task_pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    return task_pipe


@contextlib.contextmanager
def model_offload_for(pipe: Any, task_pipe: Any) -> Iterator[None]:
    """Model CPU offload (the loaded pipeline has accelerate hooks): the task pipeline's hook chain on the shared
    modules during the block, the loaded pipeline's again after it. Nothing to do otherwise."""
    if not getattr(pipe, "_all_hooks", None):
        yield
        return
    device = getattr(pipe, "_offload_device", None)
    task_pipe.enable_model_cpu_offload(device=device)
    try:
        yield
    finally:
        pipe.enable_model_cpu_offload(device=device)


@contextlib.contextmanager
def vae_as_loaded(pipe: Any) -> Iterator[None]:
    """The task pipeline encodes with the VAE as it was loaded: in its own dtype (a float32 VAE beside 16-bit
    weights gets its input cast to float32 and gives its latents back in the input's dtype), and without the
    `force_upcast` casts (SDXL's task pipelines cast the VAE to float32 and then to the prompt's dtype, whatever
    it was: a deliberately float32 VAE would come back float16, its weights rounded). Whatever happens, its
    dtype after the block is what it was before."""
    from diffusers.configuration_utils import FrozenDict
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.models.modeling_outputs import AutoencoderKLOutput

    vae = pipe.vae
    before, config, encode = vae.dtype, vae._internal_dict, vae.encode

    def encode_in_own_dtype(x: torch.Tensor, return_dict: bool = True):
        latent_dist = encode(x.to(vae.dtype), return_dict=True).latent_dist
        latent_dist = DiagonalGaussianDistribution(latent_dist.parameters.to(x.dtype))
        return AutoencoderKLOutput(latent_dist=latent_dist) if return_dict else (latent_dist,)

    vae._internal_dict = FrozenDict({**config, "force_upcast": False})
    vae.encode = encode_in_own_dtype
    try:
        yield
    finally:
        del vae.encode
        vae._internal_dict = config
        if vae.dtype != before:
            vae.to(dtype=before)


# --- inputs -----------------------------------------------------------------------------------------


def open_image(data: bytes, what: str, mode: str) -> Image.Image:
    """The PNG (or other PIL-readable) `data` in `mode`; SpecError naming `what` when it is not an image."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise SpecError(f"{what}: not a readable image ({error})") from None
    transparent = image.mode in ("RGBA", "LA", "PA") or image.mode == "P" and "transparency" in image.info
    if mode == "RGB" and transparent:
        # A1111's images.flatten: transparency over its default background colour (white).
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, "#ffffff")
        background.paste(image, mask=image)
        image = background
    return image.convert(mode)


def fit_image(image: Image.Image, width: int, height: int, resize_mode: str, what: str = "image") -> Image.Image:
    """`image` at width x height as A1111's `images.resize_image` makes it (Lanczos, no upscaler model):
    "resize" stretches it; "crop" resizes it to cover and centre-crops; "fill" resizes it to fit and fills each
    side left over by stretching the image's edge row (column) across it. "none": it must have the size already."""
    if image.size == (width, height):
        return image
    if resize_mode == "none":
        raise SpecError(
            f"{what} is {image.width}x{image.height}, the job renders {width}x{height}: give a resize_mode "
            f"(resize, crop, fill) or an image of the job's size"
        )
    if resize_mode == "resize":
        return image.resize((width, height), resample=LANCZOS)
    if resize_mode not in ("crop", "fill"):
        raise SpecError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
    ratio = width / height
    src_ratio = image.width / image.height
    if resize_mode == "crop":
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=LANCZOS)
    result = Image.new(image.mode, (width, height))
    result.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if resize_mode == "fill":
        if ratio < src_ratio:
            fill_height = height // 2 - src_h // 2
            if fill_height > 0:
                result.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
                result.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                             box=(0, fill_height + src_h))
        elif ratio > src_ratio:
            fill_width = width // 2 - src_w // 2
            if fill_width > 0:
                result.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
                result.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                             box=(fill_width + src_w, 0))
    return result


def _reflect_101(index: np.ndarray, size: int) -> np.ndarray:
    # OpenCV's BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba), repeated for pads wider than the image.
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


def _blur_axis(values: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    radius = int(2.5 * sigma + 0.5)  # A1111's kernel size: 2 * radius + 1
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets.astype(np.float64) ** 2) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    size = values.shape[axis]
    result = np.zeros(values.shape, dtype=np.float64)
    positions = np.arange(size)
    for offset, weight in zip(offsets, kernel):
        result += weight * np.take(values, _reflect_101(positions + offset, size), axis=axis)
    return result


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """A1111's mask blur: a Gaussian of sigma `radius` along x, then along y, on the 8-bit mask (rounded after
    each pass, as cv2.GaussianBlur on uint8 does; OpenCV's fixed-point kernels may differ by one level)."""
    if radius <= 0:
        return mask
    values = np.asarray(mask.convert("L"), dtype=np.float64)
    values = np.clip(np.rint(_blur_axis(values, radius, axis=1)), 0, 255)
    values = np.clip(np.rint(_blur_axis(values, radius, axis=0)), 0, 255)
    return Image.fromarray(values.astype(np.uint8), mode="L")


def overlay_mask(mask: Image.Image) -> Image.Image:
    """A1111's `mask_for_overlay`: the blurred, fitted mask doubled and clipped, so the generated image shows
    fully wherever the mask is at least half on, and the original wherever it is 0."""
    values = np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
    return Image.fromarray(values, mode="L")


# --- inpaint area "masked" ----------------------------------------------------------------------------

Box = tuple[int, int, int, int]  # x1, y1, x2, y2: PIL's crop box (x2, y2 exclusive)


def mask_box(mask: Image.Image, padding: int) -> Box | None:
    """A1111's `masking.get_crop_region_v2`: the box of the mask's nonzero pixels, grown by `padding` on every
    side and clipped to the mask; None when the mask is all black."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_crop_region(box: Box, width: int, height: int, image_width: int, image_height: int) -> Box:
    """A1111's `masking.expand_crop_region`: `box` grown on its short side, about its centre, to the aspect ratio
    of width x height (the size it is rendered at), shifted back inside the image where it would stick out and
    clipped only when the image itself is too small for it (the rounding as A1111's, so the crop is A1111's)."""
    x1, y1, x2, y2 = box
    if (x2 - x1) / (y2 - y1) > width / height:
        grow = int((x2 - x1) / (width / height) - (y2 - y1))
        y1, y2 = _grow_inside(y1 - grow // 2, y2 + grow - grow // 2, image_height)
    else:
        grow = int((y2 - y1) * (width / height) - (x2 - x1))
        x1, x2 = _grow_inside(x1 - grow // 2, x2 + grow - grow // 2, image_width)
    return x1, y1, x2, y2


def _grow_inside(start: int, stop: int, size: int) -> tuple[int, int]:
    if stop >= size:  # past the far edge: shift back
        start, stop = start - (stop - size), size
    if start < 0:  # past the near edge: shift forward
        start, stop = 0, stop - start
    return start, min(stop, size)


def crop_region(mask: Image.Image, padding: int, width: int, height: int) -> Box | None:
    """The crop rendered for inpaint area "masked": the mask's box grown by `padding`, then expanded to the
    width x height aspect ratio inside the mask's bounds (A1111's `init`, `inpaint_full_res` branch). None for an
    all-black mask (nothing to repaint)."""
    box = mask_box(mask, padding)
    return None if box is None else expand_crop_region(box, width, height, mask.width, mask.height)


@dataclass(frozen=True)
class PasteBack:
    """How the render of a crop goes back (A1111's `paste_to` and overlay image for "Only masked"): resized to
    `box` (crop and resize), pasted into `original` (the fitted init image), and composited through `mask` (the
    blurred, fitted mask, not doubled: A1111's `mask_for_overlay` in that mode). `padding`: the job's mask
    padding, for the infotext."""

    original: Image.Image
    mask: Image.Image
    box: Box
    padding: int

    def paste(self, generated: Image.Image) -> Image.Image:
        x1, y1, x2, y2 = self.box
        pasted = self.original.copy()
        pasted.paste(fit_image(generated.convert("RGB"), x2 - x1, y2 - y1, "crop"), (x1, y1))
        return pasted


def apply_overlay(generated: Image.Image, original: Image.Image, overlay: Image.Image | PasteBack) -> Image.Image:
    """A1111's inpainting overlay: the original, with alpha = 255 - overlay mask (premultiplied, as A1111 pastes
    it), alpha-composited over the generated image. Where the overlay mask is 0 the pixel is the original's.
    A `PasteBack` overlay (inpaint area "masked"): `generated` is the render of its crop and `original` the crop it
    was rendered from; the render is pasted back into the whole init image first, which is the original then."""
    if isinstance(overlay, PasteBack):
        generated, original, overlay = overlay.paste(generated), overlay.original, overlay.mask
    masked = Image.new("RGBa", original.size)
    masked.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay))
    image = generated.convert("RGBA")
    image.alpha_composite(masked.convert("RGBA"))
    return image.convert("RGB")


@dataclass
class TaskInputs:
    """The inputs of a batch, one entry per image (a job's inputs repeated for each of its images)."""

    images: list[Image.Image]  # RGB, the job's size: what the pipeline starts from (for "masked": the crop)
    masks: list[Image.Image] | None  # L, blurred and fitted (and cropped): what the pipeline's mask is
    overlays: list[Image.Image | PasteBack] | None  # L: A1111's overlay masks; PasteBack: a crop's way back

    def masked_area_padding(self, index: int) -> int | None:
        """The mask padding of image `index` when only its masked area was rendered, else None (the whole
        picture; an all-black mask too): A1111 writes "Inpaint area: Only masked" and "Masked area padding" into
        the infotext in the first case only."""
        overlay = self.overlays[index] if self.overlays is not None else None
        return overlay.padding if isinstance(overlay, PasteBack) else None


def prepare_inputs(requests: list[Any], width: int, height: int) -> TaskInputs:
    """Decode, fit and blur each request's init image and mask (`RenderRequest.init_image` / `.mask`, PNG bytes),
    repeated for each of its images (or one init image per image: a list, from `init_from`); for inpaint area "masked", the crop of each (its own region per job) at the
    job's size. SpecError (the job's fault) for an unreadable image or a size that does not fit without a resize
    mode."""
    images: list[Image.Image] = []
    masks: list[Image.Image] = []
    overlays: list[Image.Image | PasteBack] = []
    inpaint = requests[0].mask is not None
    for request in requests:
        if request.init_image is None:
            raise SpecError(f"job {request.job_id}: {request.task} needs an init image")
        # One init image for all the job's images, or (init_from an earlier job, image for image) one each.
        sources = request.init_image if isinstance(request.init_image, list) else [request.init_image]
        if len(sources) not in (1, request.num_images):
            raise SpecError(f"job {request.job_id}: {len(sources)} init images for {request.num_images} images")
        mask = None
        if inpaint:  # as A1111: blurred at its own size, then fitted as the image is
            mask = fit_image(blur_mask(open_image(request.mask, f"job {request.job_id}: mask", "L"), request.mask_blur),
                             width, height, request.resize_mode, f"job {request.job_id}: mask")
        repeat = request.num_images // len(sources)
        for source in sources:
            image = fit_image(open_image(source, f"job {request.job_id}: init_image", "RGB"),
                              width, height, request.resize_mode, f"job {request.job_id}: init_image")
            if mask is None:
                images += [image] * repeat
                continue
            box = crop_region(mask, request.mask_padding, width, height) if request.inpaint_area == "masked" else None
            if box is None:  # the whole picture ("whole", or "masked" with an all-black mask: see the module's doc)
                rendered, rendered_mask, overlay = image, mask, overlay_mask(mask)
            else:
                rendered = fit_image(image.crop(box), width, height, "fill")
                rendered_mask = fit_image(mask.crop(box), width, height, "fill")
                overlay = PasteBack(original=image, mask=mask, box=box, padding=request.mask_padding)
            images += [rendered] * repeat
            masks += [rendered_mask] * repeat
            overlays += [overlay] * repeat
    return TaskInputs(images=images, masks=masks if inpaint else None, overlays=overlays if inpaint else None)


def task_call_arguments(task_pipe: Any, task: str, inputs: TaskInputs, strength: float, width: int,
                        height: int) -> dict[str, Any]:
    """The image arguments of the task pipeline's call (SD and SDXL img2img take their size from the image)."""
    import inspect

    arguments: dict[str, Any] = {"image": inputs.images, "strength": strength}
    if task == "inpaint":
        arguments["mask_image"] = inputs.masks
    accepted = inspect.signature(type(task_pipe).__call__).parameters
    if "height" in accepted:
        arguments.update(height=height, width=width)
    return arguments


def image_tensor(pipe: Any, images: list[Image.Image]) -> torch.Tensor:
    """The images as the pipeline's image processor gives them to its VAE: a batch in [-1, 1]."""
    return pipe.image_processor.preprocess(images)
