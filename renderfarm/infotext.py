"""The AUTOMATIC1111 / Forge "parameters" text (infotext) of a rendered image: writing it, parsing it back,
and saving a PNG that carries it.

The infotext is the prompt, an optional "Negative prompt:" line and one line of "Key: value" pairs (sampler
and schedule type in A1111's names, CFG scale, seed, size, model, version); A1111, Forge and most image
viewers read it from the PNG's "parameters" text chunk. No torch: pure text and PIL.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

from PIL.PngImagePlugin import PngInfo

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


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("renderfarm")
    except PackageNotFoundError:
        # Running from a source tree that is not installed: read the version from pyproject.toml.
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
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
    loras: tuple[tuple[str, float, str], ...] = (),
    denoising_strength: float | None = None,
    mask_blur: int | None = None,
    masked_area_padding: int | None = None,
    hires: tuple[float, int] | None = None,
) -> str:
    """The infotext AUTOMATIC1111 / Forge write into a PNG's `parameters` chunk. `loras`: (name, weight, short
    hash) of each LoRA applied, written the A1111 way: a `<lora:name:weight>` tag per LoRA after the prompt (the
    prompt as an artist would have typed it) and `Lora hashes: "name: hash, ..."` (A1111's short hash of the
    file, loras/library.py), which A1111's and Civitai's readers match LoRAs by. `denoising_strength` (img2img and
    inpainting) and `mask_blur` (inpainting) go where A1111's `create_infotext` puts them: the strength after the
    model, the mask blur with the extra generation parameters (before the LoRA hashes, which A1111 adds later).
    `masked_area_padding`: an inpainting that rendered only the masked area ("Only masked"), with that padding:
    A1111 writes "Inpaint area: Only masked" and "Masked area padding" after the mask blur, and nothing about the
    area otherwise (the whole picture, or an all-black mask, for which A1111 falls back to plain img2img).
    `hires`: (scale, steps or 0) of a hires fix's second pass: A1111 writes the first pass's Size and Steps, then
    "Hires upscale", "Hires steps" (when not 0: the first pass's) and "Hires upscaler" with the extra parameters."""
    fields: dict[str, Any] = {"Steps": steps, "Sampler": sampler}
    if schedule_type:
        fields["Schedule type"] = schedule_type
    fields["CFG scale"] = float(cfg_scale)
    if distilled_cfg_scale is not None:
        fields["Distilled CFG Scale"] = float(distilled_cfg_scale)
    fields["Seed"] = seed
    fields["Size"] = f"{width}x{height}"
    fields["Model"] = model
    if denoising_strength is not None:
        fields["Denoising strength"] = float(denoising_strength)
    if mask_blur is not None:
        fields["Mask blur"] = mask_blur
    if masked_area_padding is not None:
        fields["Inpaint area"] = "Only masked"
        fields["Masked area padding"] = masked_area_padding
    if hires is not None:  # the second pass of a hires fix: `width`, `height`, `steps` are the first pass's
        fields["Hires upscale"] = float(hires[0])
        if hires[1]:
            fields["Hires steps"] = hires[1]
        fields["Hires upscaler"] = "Lanczos"
    if loras:
        fields["Lora hashes"] = ", ".join(f"{name}: {short}" for name, _, short in loras)
        prompt = " ".join([prompt, *(f"<lora:{name}:{weight:g}>" for name, weight, _ in loras)])
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


def png_bytes(image: Any, parameters: str) -> bytes:
    """`image` as a PNG file with `parameters` in its "parameters" text chunk, where A1111 reads it."""
    info = PngInfo()
    # A tEXt chunk; PIL writes iTXt instead when the text is not Latin-1, as A1111 does.
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
