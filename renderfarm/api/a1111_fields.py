"""How the fields of an A1111 request map onto a job spec's (renderfarm/api/a1111.py serves the routes): which
are mapped, which are accepted only at A1111's neutral value, the 422 that names any other; img2img's image
fields (`img2img_fields`), the sampler and schedule (`sampler_fields`) and the hires fix (`hires_fields`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from fastapi.exceptions import HTTPException

from renderfarm.api.app import Caller
from renderfarm.chains import hires_size
from renderfarm.jobs import MAX_STEPS

NEUTRAL_SAMPLERS = ("", "Default", "default")  # the model's own scheduler
NEUTRAL_SCHEDULERS = ("", "automatic", "Automatic")


def _any(_: Any) -> bool:
    return True


def _is(*values: Any) -> Callable[[Any], bool]:
    return lambda v: v in values


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {} or v == ""


def _no_script_args(v: Any) -> bool:
    """alwayson_scripts: nothing, or scripts given no arguments (webuiapi sends {"ControlNet": {"args": []}}
    when it believes ControlNet is installed; the farm lists no scripts, so it should not)."""
    return v is None or (isinstance(v, dict) and all(isinstance(s, dict) and _empty(s.get("args")) for s in v.values()))


# field -> accepted when (a value that changes nothing in a txt2img render on the farm)
NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "styles": _empty,
    "subseed": _any,  # used only with subseed_strength > 0
    "subseed_strength": _is(0, 0.0, None),
    "seed_resize_from_h": _is(-1, 0, None),
    "seed_resize_from_w": _is(-1, 0, None),
    "restore_faces": _is(False, None),
    "tiling": _is(False, None),
    "do_not_save_samples": _any,  # A1111's outputs folder: the farm keeps results in its store regardless
    "do_not_save_grid": _any,
    "save_images": _any,
    # webuiapi sends 1.0, A1111's default: full ancestral noise, which is what "Euler a" does here; 0 is plain DDIM's
    "eta": _is(None, 0, 0.0, 1, 1.0),
    "s_min_uncond": _is(None, 0, 0.0),
    "s_churn": _is(None, 0, 0.0),
    "s_tmax": _is(None, 0, 0.0),
    "s_tmin": _is(None, 0, 0.0),
    "s_noise": _is(None, 1, 1.0),
    "override_settings_restore_afterwards": _any,
    "script_name": _empty,
    "script_args": _empty,
    "alwayson_scripts": _no_script_args,
    "refiner_checkpoint": _empty,
    "refiner_switch_at": _any,  # only with a refiner_checkpoint
    "disable_extra_networks": _is(False, None),
    "comments": _any,
    "infotext": _empty,
    "firstpass_image": _empty,
    "force_task_id": _any,
    "firstphase_width": _is(0, None),  # A1111's old way to size a hires fix's first pass
    "firstphase_height": _is(0, None),
}
# The hires fix (txt2img): mapped by hires_fields while `enable_hr` is on; ignored, as A1111 does, while it is off.
HIRES = ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
         "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_additional_modules",
         "hr_cfg", "hr_distilled_cfg")
MAPPED = ("prompt", "negative_prompt", "seed", "batch_size", "n_iter", "steps", "cfg_scale", "width", "height",
          "send_images", "override_settings", "distilled_cfg_scale", "sampler_name", "sampler_index", "scheduler")
TXT2IMG_MAPPED = ("enable_hr", "denoising_strength")  # the strength: the hires pass's (unused without enable_hr)
# img2img's own fields. Mapped: the init image, the mask and how it is used (see img2img_fields).
IMG2IMG_MAPPED = ("init_images", "mask", "denoising_strength", "mask_blur", "mask_blur_x", "mask_blur_y", "resize_mode",
                  "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert")
IMG2IMG_NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "image_cfg_scale": _any,  # instruct-pix2pix models only: none on the farm
    "initial_noise_multiplier": _is(None, 1, 1.0),
    "include_init_images": _any,  # whether the answer repeats the init images: it does not here
    "latent_mask": _empty,
    "mask_round": _is(None, True),
    "use_deprecated_controlnet": _is(None, False),
    "enable_hr": _is(None, False, 0),  # A1111's img2img has no hires fix (it is txt2img's)
}
RESIZE_MODES = {0: "resize", 1: "crop", 2: "fill"}  # A1111: just resize, crop and resize, resize and fill
WHY = {
    "enable_hr": "A1111's hires fix is txt2img's: img2img has none",
    "firstphase_width": "A1111's old hires sizing: give the first pass's size as width and height, the second's as "
                        "hr_scale or hr_resize_x/hr_resize_y",
    "firstphase_height": "A1111's old hires sizing: give the first pass's size as width and height, the second's as "
                         "hr_scale or hr_resize_x/hr_resize_y",
    "restore_faces": "no face restoration on the farm",
    "tiling": "no tiling on the farm",
    "alwayson_scripts": "the farm runs no A1111 scripts or extensions",
    "script_name": "the farm runs no A1111 scripts",
    "script_args": "the farm runs no A1111 scripts",
    "styles": "the farm has no prompt styles: put their text in the prompt",
    "refiner_checkpoint": "no refiner pass on the farm",
}


def refuse(field: str, value: Any, why: str) -> HTTPException:
    shown = json.dumps(value, default=str)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return HTTPException(422, {"error": "UnsupportedField", "field": field,
                               "detail": f"{field}: {shown} is not supported: {why}; nothing was enqueued"})


def check_fields(body: dict[str, Any], img2img: bool = False) -> None:
    """422 naming the first field the farm cannot honour (see the module docstring); nothing else. `img2img`:
    a /img2img request, which takes its own fields too (IMG2IMG_MAPPED, IMG2IMG_NEUTRAL). The hires fields are
    hires_fields' to check (txt2img with `enable_hr`); otherwise A1111 ignores them, and so does the farm."""
    mapped = MAPPED + (IMG2IMG_MAPPED if img2img else TXT2IMG_MAPPED)
    neutral = {**NEUTRAL, **IMG2IMG_NEUTRAL} if img2img else NEUTRAL
    for field, value in body.items():
        if field in mapped or field in HIRES:
            continue
        accepted = neutral.get(field)
        if accepted is None:
            raise refuse(field, value, "not a field the farm knows (A1111 extensions' fields included)")
        if not accepted(value):
            raise refuse(field, value, WHY.get(field, "only its neutral value is accepted"))


def number(body: dict[str, Any], field: str, kind: type, default: Any, low: Any, high: Any) -> Any:
    value = body.get(field, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise HTTPException(422, {"error": "InvalidField", "field": field,
                                  "detail": f"{field}: expected {'an integer' if kind is int else 'a number'}, "
                                            f"got {json.dumps(value, default=str)[:60]}; nothing was enqueued"})
    value = kind(value)
    if not low <= value <= high:
        raise HTTPException(422, {"error": "InvalidField", "field": field,
                                  "detail": f"{field}: {value} is outside {low}..{high}; nothing was enqueued"})
    return value


def text_field(body: dict[str, Any], field: str) -> str:
    value = body.get(field, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise HTTPException(422, {"error": "InvalidField", "field": field,
                                  "detail": f"{field}: expected a string; nothing was enqueued"})
    return value

def checkpoint_name(title: str) -> str:
    """A1111 names a checkpoint "name [hash]" or "name.safetensors [hash]": the farm's model name in it."""
    name = title.split(" [", 1)[0].strip()
    for suffix in (".safetensors", ".ckpt", ".gguf"):
        name = name.removesuffix(suffix)
    return name


def invalid(field: str, detail: str) -> HTTPException:
    return HTTPException(422, {"error": "InvalidField", "field": field, "detail": f"{field}: {detail}; nothing was "
                               "enqueued"})


def img2img_fields(body: dict[str, Any], who: Caller) -> dict[str, Any]:
    """The job's image-input fields from an A1111 img2img request: `init_images[0]` (base64) the init image,
    `mask` (base64) the mask (inverted here for `inpainting_mask_invert: 1`), `denoising_strength` the strength,
    `mask_blur` (or equal mask_blur_x and _y) the blur, `resize_mode` 0/1/2 resize/crop/fill (3, latent upscale,
    is refused), `inpaint_full_res` true, 1 or absent (A1111's API default) the inpaint area "masked" ("Only masked";
    false or 0: the whole picture) with `inpaint_full_res_padding` its mask padding (absent: 0, A1111's API default). What the
    farm does not do is a 422 naming it: another `inpainting_fill` than 1 (original). The images are checked by
    the client (renderfarm/inputs.py)."""
    from renderfarm.inputs import InvalidImage, decode_base64_image

    cap = who.client.inputs().max_bytes
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise invalid("init_images", "give one init image (base64)")
    if len(images) > 1:
        raise refuse("init_images", f"{len(images)} images", "one init image per request on the farm")
    out: dict[str, Any] = {}
    try:
        out["init_image"] = decode_base64_image(images[0], "init_image", max_bytes=cap)
        if not _empty(body.get("mask")):
            out["mask"] = decode_base64_image(body["mask"], "mask", max_bytes=cap)
    except InvalidImage as exc:
        field = "init_images[0]" if exc.what == "init_image" else "mask"
        raise HTTPException(413 if exc.too_large else 422, {"error": "InvalidImage", "field": field,
                            "detail": f"{field}: {exc.reason}; nothing was enqueued"}) from None
    if body.get("denoising_strength") is not None:
        out["strength"] = number(body, "denoising_strength", float, 0.75, 0.0, 1.0)
    blurs = {f: number(body, f, int, None, 0, 64) for f in ("mask_blur", "mask_blur_x", "mask_blur_y")
             if body.get(f) is not None}
    if "mask_blur_x" in blurs and "mask_blur_y" in blurs and blurs["mask_blur_x"] != blurs["mask_blur_y"]:
        raise refuse("mask_blur_y", blurs["mask_blur_y"], "one blur for both directions (mask_blur) on the farm")
    blur = blurs.get("mask_blur", blurs.get("mask_blur_x", blurs.get("mask_blur_y")))
    if blur is not None:
        out["mask_blur"] = blur
    mode = body.get("resize_mode", 0)
    if mode == 3:
        raise refuse("resize_mode", mode, "latent upscale (3) is not on the farm: use 0 (just resize), 1 (crop and "
                      "resize) or 2 (resize and fill)")
    if isinstance(mode, bool) or mode not in RESIZE_MODES:
        raise invalid("resize_mode", f"{json.dumps(mode, default=str)[:40]} is not 0, 1 or 2")
    out["resize_mode"] = RESIZE_MODES[mode]
    if "mask" in out:
        if body.get("inpainting_fill", 1) not in (1, None):
            raise refuse("inpainting_fill", body["inpainting_fill"], "the farm starts the masked area from the "
                          "original image only: send 1 (original)")
        full_res = body.get("inpaint_full_res", True)  # absent: A1111's API default, only the masked area
        if full_res is None:
            full_res = True
        if full_res not in (False, True):  # 0 and 1 included
            raise invalid("inpaint_full_res", f"{json.dumps(full_res, default=str)[:40]} is not true/1 (only the "
                           "masked area) or false/0 (the whole picture)")
        if full_res:
            out["inpaint_area"] = "masked"
            # A1111's API default is 0 (its UI's is 32, JobSpec's too); the farm's cap is JobSpec's.
            out["mask_padding"] = number(body, "inpaint_full_res_padding", int, 0, 0, 256)
        invert = body.get("inpainting_mask_invert", 0)
        if invert not in (0, 1, None) or isinstance(invert, bool):
            raise invalid("inpainting_mask_invert", "0 (paint the masked area) or 1 (paint the rest)")
        if invert == 1:
            out["mask"] = _inverted_mask(out["mask"], who)
    return out


def _inverted_mask(data: bytes, who: Caller) -> bytes:
    """A1111's `inpainting_mask_invert: 1`: the mask checked and made single-channel as the farm stores it, then
    inverted (white repainted becomes black kept)."""
    import io

    from PIL import Image, ImageOps

    from renderfarm.inputs import InvalidImage

    try:
        valid = who.client.inputs().check(data, "mask")
    except InvalidImage as exc:
        raise HTTPException(413 if exc.too_large else 422, {"error": "InvalidImage", "field": "mask",
                            "detail": f"mask: {exc.reason}; nothing was enqueued"}) from None
    buffer = io.BytesIO()
    ImageOps.invert(Image.open(io.BytesIO(valid.png))).save(buffer, format="PNG")
    return buffer.getvalue()


def sampler_fields(body: dict[str, Any]) -> dict[str, str]:
    """The job's `sampler` and `schedule` from A1111's `sampler_name` (or the older `sampler_index`) and `scheduler`:
    "Default"/"automatic" leave the model's own; an old combined name ("DPM++ 2M Karras") is split as A1111 does.
    Whether they suit the model is the job spec's check (422 naming sampler or schedule)."""
    from renderfarm.samplers import SAMPLERS, SCHEDULES

    out: dict[str, str] = {}
    name = body.get("sampler_name") if body.get("sampler_name") is not None else body.get("sampler_index")
    if name is not None and not isinstance(name, str):
        raise refuse("sampler_name", name, "expected a sampler's name")
    if name and name not in NEUTRAL_SAMPLERS:
        for schedule in SCHEDULES:
            if name.endswith(f" {schedule}") and name.removesuffix(f" {schedule}") in SAMPLERS:
                name, out["schedule"] = name.removesuffix(f" {schedule}"), schedule
        out["sampler"] = name
    schedule = body.get("scheduler")
    if schedule is not None and not isinstance(schedule, str):
        raise refuse("scheduler", schedule, "expected a schedule type's name")
    if schedule and schedule not in NEUTRAL_SCHEDULERS:
        out["schedule"] = schedule[:1].upper() + schedule[1:]  # A1111 sends "karras", diffusers' docs "Karras"
    return out


# A1111's hires fix (StableDiffusionProcessingTxt2Img). Its upscalers by name: "None" resizes the first pass's
# images with PIL's Lanczos, "Lanczos" is the Lanczos upscaler (the same resize, in steps); the "Latent ..." modes
# interpolate the latents instead (an absent hr_upscaler is A1111's default latent mode, "Latent"); the rest are
# upscaling models (ESRGAN, SwinIR, ...) or "Nearest". The farm's second pass resizes with Lanczos.
LANCZOS_UPSCALERS = ("Lanczos", "None")
HIRES_STRENGTH = 0.7  # A1111's UI default for the hires pass (its API has none that works: see hires_fields)
SAME = {"hr_checkpoint_name": "Use same checkpoint", "hr_sampler_name": "Use same sampler",
        "hr_scheduler": "Use same scheduler"}  # what A1111's UI sends for "as the first pass"
HIRES_WHY = {
    "hr_checkpoint_name": "the farm's hires pass renders with the first pass's model",
    "hr_sampler_name": "the farm's hires pass samples as the first pass does",
    "hr_scheduler": "the farm's hires pass samples as the first pass does",
    "hr_prompt": "the farm's hires pass takes the first pass's prompt",
    "hr_negative_prompt": "the farm's hires pass takes the first pass's negative prompt",
    "hr_cfg": "the farm's hires pass takes the first pass's guidance (cfg_scale)",
    "hr_distilled_cfg": "the farm's hires pass takes the first pass's guidance (distilled_cfg_scale)",
    "hr_additional_modules": "the farm's hires pass takes the first pass's modules",
}


def hires_fields(body: dict[str, Any], spec: dict[str, Any], *, width: int, height: int, multiple: int,
                 cfg: float, uses_cfg: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """A1111's hires fix (`enable_hr: true` on txt2img) as the job's `hires`, and the `extra_generation_params`
    A1111 reports of it. `spec`: the first pass's job fields so far; `width`/`height` its size, `multiple` the
    family's size multiple, `cfg` the guidance its `cfg_scale` means, `uses_cfg` whether the model takes one.

    - `hr_scale` (absent: 2, A1111's default) is the scale, more than 1 and at most 4;
    - `hr_resize_x`/`hr_resize_y`, when either is given (not 0), replace it as in A1111: one side is the target's,
      the other follows the first pass's aspect ratio. The farm scales the whole image, so a target is accepted
      only when it is the first pass scaled uniformly (A1111 would crop to another aspect ratio) to the size the
      farm renders (sides rounded down to the family's multiple): that scale is used; else a 422 saying why;
    - `denoising_strength` is the strength (absent: 0.7, A1111's UI default; A1111's API passes its base class's
      None on, which its hires pass cannot use);
    - `hr_second_pass_steps` the steps (0: the first pass's);
    - `hr_upscaler` must be "Lanczos" or "None" (A1111 resizes the image with Lanczos for both); a latent mode,
      an absent one (A1111 then upscales the latents) or a model's is a 422: the farm resizes with Lanczos;
    - the other hr_* fields are accepted only as "the first pass's" (empty, A1111's "Use same ...", or equal to
      the first pass's value), else a 422 naming them."""
    _hires_same(body, spec, cfg, uses_cfg)
    upscaler = body.get("hr_upscaler")
    if upscaler not in LANCZOS_UPSCALERS:
        if upscaler is None:
            why = "absent, A1111 upscales the latents (its default latent mode, \"Latent\")"
        elif isinstance(upscaler, str) and upscaler.startswith("Latent"):
            why = "a latent upscale"
        else:
            why = "an upscaler the farm does not have (an upscaling model, or not Lanczos)"
        raise refuse("hr_upscaler", upscaler, f"{why}; the farm's second pass resizes the first pass's images with "
                     "Lanczos: send \"Lanczos\" (or \"None\", the same resize)")
    strength = number(body, "denoising_strength", float, HIRES_STRENGTH, 0.0, 1.0)
    steps = number(body, "hr_second_pass_steps", int, 0, 0, MAX_STEPS)
    resize_x = number(body, "hr_resize_x", int, 0, 0, 100_000)
    resize_y = number(body, "hr_resize_y", int, 0, 0, 100_000)
    extra: dict[str, Any] = {"Denoising strength": strength}
    if resize_x or resize_y:
        scale = _resize_scale(resize_x, resize_y, width, height, multiple)
        extra["Hires resize"] = f"{resize_x}x{resize_y}"
    else:
        scale = number(body, "hr_scale", float, 2.0, 0.0, 1000.0)
        if not 1.0 < scale <= 4.0:
            raise invalid("hr_scale", f"{scale:g}: the farm's hires pass scales by more than 1 and at most 4")
        extra["Hires upscale"] = scale
    if steps:
        extra["Hires steps"] = steps
    extra["Hires upscaler"] = upscaler
    return {"scale": scale, "strength": strength, "steps": steps}, extra


def _resize_scale(resize_x: int, resize_y: int, width: int, height: int, multiple: int) -> float:
    """The scale that renders A1111's hr_resize_x/hr_resize_y target, or a 422 (see hires_fields)."""
    field = "hr_resize_x" if resize_x else "hr_resize_y"
    if resize_x and resize_y and resize_x * height != resize_y * width:
        raise refuse(field, f"{resize_x}x{resize_y}", f"not the first pass's {width}x{height} scaled uniformly "
                     "(A1111 would crop to it); the farm's hires pass scales the whole image: give one side (0 for "
                     "the other), or hr_scale")
    target = (resize_x or resize_y * width // height, resize_y or resize_x * height // width)
    scale = resize_x / width if resize_x else resize_y / height
    if not 1.0 < scale <= 4.0:
        raise invalid(field, f"{target[0]}x{target[1]} is {scale:g} times the first pass's {width}x{height}; the "
                      "farm's hires pass scales by more than 1 and at most 4")

    def size(s: float) -> tuple[int, int]:
        return hires_size(width, s, multiple), hires_size(height, s, multiple)

    if size(scale) != target and size(bumped := math.nextafter(scale, math.inf)) == target and bumped <= 4.0:
        scale = bumped  # width * (x / width) fell a hair below x
    if size(scale) != target:
        got = size(scale)
        raise refuse(field, f"{target[0]}x{target[1]}", f"the farm's second pass would render {got[0]}x{got[1]} "
                     f"(sides are multiples of {multiple} for this model): give a target of the first pass's aspect "
                     f"ratio in multiples of {multiple}, or hr_scale")
    return scale


def _hires_same(body: dict[str, Any], spec: dict[str, Any], cfg: float, uses_cfg: bool) -> None:
    """422 naming the first hr_* field that asks the hires pass for something else than the first pass's."""
    first = sampler_fields(body)

    def same_sampler(v: Any) -> bool:
        return isinstance(v, str) and sampler_fields({"sampler_name": v, "scheduler": body.get("scheduler")}) == first

    def same_schedule(v: Any) -> bool:
        return isinstance(v, str) and sampler_fields({"scheduler": v}).get("schedule") == first.get("schedule")

    same: dict[str, Callable[[Any], bool]] = {
        "hr_checkpoint_name": lambda v: isinstance(v, str) and checkpoint_name(v) == spec["model"],
        "hr_sampler_name": same_sampler,
        "hr_scheduler": same_schedule,
        "hr_prompt": lambda v: v == spec["prompt"],
        "hr_negative_prompt": lambda v: v == spec["negative_prompt"],
        "hr_cfg": lambda v: _number_equal(v, cfg),
        # like distilled_cfg_scale, unused by a model that takes a cfg_scale
        "hr_distilled_cfg": lambda v: uses_cfg or _number_equal(v, spec.get("guidance", cfg)),  # Flux's guidance
        "hr_additional_modules": lambda v: v == ["Use same choices"],  # Forge's UI default
    }
    for field, accepted in same.items():
        value = body.get(field)
        if not (_empty(value) or value == SAME.get(field) or accepted(value)):
            raise refuse(field, value, HIRES_WHY[field])


def _number_equal(value: Any, other: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == other
