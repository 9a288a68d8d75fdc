"""AUTOMATIC1111's web API (/sdapi/v1), as far as it maps onto the farm, for the scripts, plugins and clients
(the `webuiapi` package, Krita and Photoshop plugins, Open-WebUI) written for it.

    POST /sdapi/v1/txt2img       queued, routed and rendered by the farm; answers with A1111's shape
    GET  /sdapi/v1/sd-models     the catalog's renderable models
    GET  /sdapi/v1/loras         the LoRAs the nodes hold (use them as <lora:name:weight> in the prompt)
    GET  /sdapi/v1/progress      the caller's current A1111 job: step, ETA
    GET/POST /sdapi/v1/options   sd_model_checkpoint (kept per team in Redis: the API itself holds no state)
    GET  /sdapi/v1/samplers, /schedulers, /scripts (what the farm honours)
    POST /sdapi/v1/img2img       img2img and inpainting (init_images[0], mask): see img2img_fields

How a txt2img request maps: `n_iter` jobs of `batch_size` images each, submitted as one batch (so the
iterations render in parallel on whichever nodes fit), seeds `seed`, `seed+1`, ... across all images as A1111
gives them (-1: a random seed); `cfg_scale` is the guidance, `steps` the steps, the model is
`override_settings.sd_model_checkpoint`, else the team's option, else the first model a node can render.

Fields the farm cannot honour are refused with a 422 naming them (never ignored): a field is accepted only at
a value that changes nothing (A1111's own neutral value, e.g. `restore_faces: false`, `subseed_strength: 0`,
the hires fields while `enable_hr` is false), or when it concerns A1111's own bookkeeping (`save_images`,
`do_not_save_grid`: the farm keeps every result in its result store for `result_ttl_seconds`). Samplers:
`sampler_name` (or the older `sampler_index`, or a combined "DPM++ 2M Karras") and `scheduler` map to the job's
`sampler` and `schedule` (renderfarm/samplers.py); "Default" / "automatic" keep the model's own; one that
cannot render the model (e.g. "Euler a" on Flux) is a 422 naming it.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse

from renderfarm.api.app import Caller, caller
from renderfarm.api.native import lora_inventory
from renderfarm.errors import SpecError, WaitTimeout
from renderfarm.jobs import MAX_IMAGES_PER_JOB, SEED_MAX, JobState

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
Who = Annotated[Caller, Depends(caller)]
TAG = "a1111"  # every job submitted here carries it (progress finds the caller's current one by it)
MAX_ITERATIONS = 100
NEUTRAL_SAMPLERS = ("", "Default", "default")  # the model's own scheduler
NEUTRAL_SCHEDULERS = ("", "automatic", "Automatic")
OPTIONS_KEY = "options"  # Keys.api(OPTIONS_KEY, team): a hash of the A1111 options a team set


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
    "enable_hr": _is(False, None),
    "denoising_strength": _any,  # txt2img uses it only for the hires pass (enable_hr)
    "firstphase_width": _is(0, None),
    "firstphase_height": _is(0, None),
}
HIRES = ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name",
         "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_additional_modules",
         "hr_cfg", "hr_distilled_cfg")
MAPPED = ("prompt", "negative_prompt", "seed", "batch_size", "n_iter", "steps", "cfg_scale", "width", "height",
          "send_images", "override_settings", "distilled_cfg_scale", "sampler_name", "sampler_index", "scheduler")
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
}
RESIZE_MODES = {0: "resize", 1: "crop", 2: "fill"}  # A1111: just resize, crop and resize, resize and fill
WHY = {
    "enable_hr": "the hires fix is not on the farm yet (job chains: issue 19)",
    "restore_faces": "no face restoration on the farm",
    "tiling": "no tiling on the farm",
    "alwayson_scripts": "the farm runs no A1111 scripts or extensions",
    "script_name": "the farm runs no A1111 scripts",
    "script_args": "the farm runs no A1111 scripts",
    "styles": "the farm has no prompt styles: put their text in the prompt",
    "refiner_checkpoint": "no refiner pass on the farm",
}


def _refuse(field: str, value: Any, why: str) -> HTTPException:
    shown = json.dumps(value, default=str)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return HTTPException(422, {"error": "UnsupportedField", "field": field,
                               "detail": f"{field}: {shown} is not supported: {why}; nothing was enqueued"})


def check_fields(body: dict[str, Any], img2img: bool = False) -> None:
    """422 naming the first field the farm cannot honour (see the module docstring); nothing else. `img2img`:
    a /img2img request, which takes its own fields too (IMG2IMG_MAPPED, IMG2IMG_NEUTRAL)."""
    hires = bool(body.get("enable_hr"))
    mapped = MAPPED + IMG2IMG_MAPPED if img2img else MAPPED
    neutral = {**NEUTRAL, **IMG2IMG_NEUTRAL} if img2img else NEUTRAL
    for field, value in body.items():
        if field in mapped or (field in HIRES and not hires):
            continue
        accepted = neutral.get(field)
        if accepted is None:
            raise _refuse(field, value, "not a field the farm knows (A1111 extensions' fields included)")
        if not accepted(value):
            raise _refuse(field, value, WHY.get(field, "only its neutral value is accepted"))


def _number(body: dict[str, Any], field: str, kind: type, default: Any, low: Any, high: Any) -> Any:
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


def _text(body: dict[str, Any], field: str) -> str:
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


def renderable_models(who: Caller) -> list[str]:
    """The catalog's models some node can load (every renderable one while no node has registered)."""
    catalog = who.client.catalog
    names = [n for n in catalog.names() if not catalog.get(n).family.planning_only]
    records = who.client.store.nodes()
    if not records:
        return names
    loadable = {m for r in records for m in (r.get("loadable") or []) if isinstance(m, str)}
    return [n for n in names if n in loadable] or names


def _options_key(who: Caller) -> str:
    return who.client.store.keys.api(OPTIONS_KEY, who.team or "all")


def current_model(who: Caller) -> str | None:
    raw = who.client.store.redis.hget(_options_key(who), "sd_model_checkpoint")
    chosen = raw.decode() if isinstance(raw, bytes) else raw
    if chosen and chosen in who.client.catalog:
        return chosen
    models = renderable_models(who)
    return models[0] if models else None


def job_specs(body: dict[str, Any], who: Caller, img2img: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The farm's job specs for an A1111 txt2img (or, `img2img`, img2img) request, and what A1111's `info` reports
    of it."""
    check_fields(body, img2img)
    override = body.get("override_settings") or {}
    if not isinstance(override, dict):
        raise _refuse("override_settings", override, "expected an object")
    for key in override:
        if key != "sd_model_checkpoint":
            raise _refuse(f"override_settings.{key}", override[key], "only sd_model_checkpoint can be overridden")
    model = checkpoint_name(str(override["sd_model_checkpoint"])) if override.get("sd_model_checkpoint") else None
    model = model or current_model(who)
    if model is None:
        raise HTTPException(422, {"error": "InvalidField", "field": "override_settings.sd_model_checkpoint",
                                  "detail": "no model: the catalog lists none a node can render"})
    entry = who.client.catalog.get(model) if model in who.client.catalog else None
    batch_size = _number(body, "batch_size", int, 1, 1, MAX_IMAGES_PER_JOB)
    n_iter = _number(body, "n_iter", int, 1, 1, MAX_ITERATIONS)
    seed = _number(body, "seed", int, -1, -1, SEED_MAX)
    if seed == -1:
        seed = random.randint(0, SEED_MAX - batch_size * n_iter)
    if seed + batch_size * n_iter - 1 > SEED_MAX:
        raise HTTPException(422, {"error": "InvalidField", "field": "seed",
                                  "detail": f"seed: {seed} + {batch_size * n_iter} images passes {SEED_MAX}"})
    guidance_default = entry.default_guidance if entry else 7.0
    distilled = body.get("distilled_cfg_scale")  # Forge's name for Flux's guidance
    spec: dict[str, Any] = {"model": model, "prompt": _text(body, "prompt"),
                            "negative_prompt": _text(body, "negative_prompt"), "tags": [TAG],
                            "num_images": batch_size}
    for field, key, kind, low, high in (("steps", "steps", int, 1, 10_000), ("width", "width", int, 1, 100_000),
                                        ("height", "height", int, 1, 100_000),
                                        ("cfg_scale", "guidance", float, 0.0, 1000.0)):
        if body.get(field) is not None:
            spec[key] = _number(body, field, kind, None, low, high)
    if distilled is not None and entry is not None and not entry.family.uses_cfg:
        spec["guidance"] = _number(body, "distilled_cfg_scale", float, guidance_default, 0.0, 1000.0)
    spec.update(sampler_fields(body))
    if img2img:
        spec.update(img2img_fields(body, who))
    specs = [{**spec, "seed": seed + i * batch_size} for i in range(n_iter)]
    info = {"sd_model_name": model, "batch_size": batch_size, "n_iter": n_iter, "seed": seed,
            "all_seeds": [seed + i for i in range(batch_size * n_iter)]}
    return specs, info


def _invalid(field: str, detail: str) -> HTTPException:
    return HTTPException(422, {"error": "InvalidField", "field": field, "detail": f"{field}: {detail}; nothing was "
                               "enqueued"})


def img2img_fields(body: dict[str, Any], who: Caller) -> dict[str, Any]:
    """The job's image-input fields from an A1111 img2img request: `init_images[0]` (base64) the init image,
    `mask` (base64) the mask (inverted here for `inpainting_mask_invert: 1`), `denoising_strength` the strength,
    `mask_blur` (or equal mask_blur_x and _y) the blur, `resize_mode` 0/1/2 resize/crop/fill (3, latent upscale,
    is refused), `inpaint_full_res` true (or 1) the inpaint area "masked" ("Only masked"; false, 0 or absent: the
    whole picture) with `inpaint_full_res_padding` its mask padding (absent: 0, A1111's API default). What the
    farm does not do is a 422 naming it: another `inpainting_fill` than 1 (original). The images are checked by
    the client (renderfarm/inputs.py)."""
    from renderfarm.inputs import InvalidImage, decode_base64_image

    cap = who.client.inputs().max_bytes
    images = body.get("init_images")
    if not isinstance(images, list) or not images:
        raise _invalid("init_images", "give one init image (base64)")
    if len(images) > 1:
        raise _refuse("init_images", f"{len(images)} images", "one init image per request on the farm")
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
        out["strength"] = _number(body, "denoising_strength", float, 0.75, 0.0, 1.0)
    blurs = {f: _number(body, f, int, None, 0, 64) for f in ("mask_blur", "mask_blur_x", "mask_blur_y")
             if body.get(f) is not None}
    if "mask_blur_x" in blurs and "mask_blur_y" in blurs and blurs["mask_blur_x"] != blurs["mask_blur_y"]:
        raise _refuse("mask_blur_y", blurs["mask_blur_y"], "one blur for both directions (mask_blur) on the farm")
    blur = blurs.get("mask_blur", blurs.get("mask_blur_x", blurs.get("mask_blur_y")))
    if blur is not None:
        out["mask_blur"] = blur
    mode = body.get("resize_mode", 0)
    if mode == 3:
        raise _refuse("resize_mode", mode, "latent upscale (3) is not on the farm: use 0 (just resize), 1 (crop and "
                      "resize) or 2 (resize and fill)")
    if isinstance(mode, bool) or mode not in RESIZE_MODES:
        raise _invalid("resize_mode", f"{json.dumps(mode, default=str)[:40]} is not 0, 1 or 2")
    out["resize_mode"] = RESIZE_MODES[mode]
    if "mask" in out:
        if body.get("inpainting_fill", 1) not in (1, None):
            raise _refuse("inpainting_fill", body["inpainting_fill"], "the farm starts the masked area from the "
                          "original image only: send 1 (original)")
        full_res = body.get("inpaint_full_res")
        if full_res not in (False, True, None):  # 0 and 1 included
            raise _invalid("inpaint_full_res", f"{json.dumps(full_res, default=str)[:40]} is not true/1 (only the "
                           "masked area) or false/0 (the whole picture)")
        if full_res:
            out["inpaint_area"] = "masked"
            # A1111's API default is 0 (its UI's is 32, JobSpec's too); the farm's cap is JobSpec's.
            out["mask_padding"] = _number(body, "inpaint_full_res_padding", int, 0, 0, 256)
        invert = body.get("inpainting_mask_invert", 0)
        if invert not in (0, 1, None) or isinstance(invert, bool):
            raise _invalid("inpainting_mask_invert", "0 (paint the masked area) or 1 (paint the rest)")
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
        raise _refuse("sampler_name", name, "expected a sampler's name")
    if name and name not in NEUTRAL_SAMPLERS:
        for schedule in SCHEDULES:
            if name.endswith(f" {schedule}") and name.removesuffix(f" {schedule}") in SAMPLERS:
                name, out["schedule"] = name.removesuffix(f" {schedule}"), schedule
        out["sampler"] = name
    schedule = body.get("scheduler")
    if schedule is not None and not isinstance(schedule, str):
        raise _refuse("scheduler", schedule, "expected a schedule type's name")
    if schedule and schedule not in NEUTRAL_SCHEDULERS:
        out["schedule"] = schedule[:1].upper() + schedule[1:]  # A1111 sends "karras", diffusers' docs "Karras"
    return out


def _wait(who: Caller, ids: list[str], timeout_s: float) -> list[Any]:
    try:
        return who.client.wait(ids, timeout=timeout_s)
    except WaitTimeout:
        who.client.cancel(ids)  # nobody will take the images: free the farm
        raise WaitTimeout(f"the render did not finish within {timeout_s:g} s (the API's a1111 timeout); its "
                          f"{len(ids)} job(s) were cancelled") from None


@router.post("/txt2img")
def txt2img(request: Request, who: Who, body: Annotated[dict[str, Any], Body()]) -> JSONResponse:
    """Render through the farm and answer as A1111 does: base64 PNGs, the request's `parameters`, and `info`
    (a JSON string: seeds, prompts, infotexts)."""
    specs, info = job_specs(body, who)
    return _render(request, who, body, specs, info)


@router.post("/img2img")
def img2img(request: Request, who: Who, body: Annotated[dict[str, Any], Body()]) -> JSONResponse:
    """img2img and inpainting through the farm, answered as A1111 does (as txt2img). `init_images[0]` and `mask`
    are base64 images; see img2img_fields for how the rest maps."""
    specs, info = job_specs(body, who, img2img=True)
    return _render(request, who, body, specs, info, img2img=True)


def _render(request: Request, who: Caller, body: dict[str, Any], specs: list[dict[str, Any]], info: dict[str, Any],
            img2img: bool = False) -> JSONResponse:
    try:
        ids = who.client.submit_batch(specs)
    except SpecError as exc:  # the client's message names jobs[i].field: say which A1111 field it came from
        extra = (", init_images[0], mask, denoising_strength, mask_blur, resize_mode, inpaint_full_res and "
                 "inpaint_full_res_padding map to init_image, mask, strength, mask_blur, resize_mode, inpaint_area "
                 "and mask_padding") if img2img else ""
        raise HTTPException(422, {"error": "InvalidField", "detail": f"{exc} (steps, width, height, cfg_scale, "
                                  "prompt and the model map to the job's steps, width, height, guidance, prompt "
                                  f"and model{extra})"}) from None
    jobs = _wait(who, ids, request.app.state.ctx.a1111_timeout_s)
    failed = [job for job in jobs if job.state is not JobState.DONE]
    if failed:
        job = failed[0]
        return JSONResponse({"error": "RenderFailed", "detail": f"job {job.id} {job.state.value}: {job.error}",
                             "job_ids": ids}, status_code=502)
    pngs, infotexts = [], []
    for job in jobs:
        result = who.client.result(job.id)
        pngs += result.png
        infotexts += result.parameters
    first = jobs[0].spec
    prompts = [s["prompt"] for s in specs for _ in range(info["batch_size"])]
    full = {
        "prompt": first.prompt, "all_prompts": prompts, "negative_prompt": first.negative_prompt,
        "all_negative_prompts": [first.negative_prompt] * len(prompts), "seed": info["seed"],
        "all_seeds": info["all_seeds"], "subseed": -1, "all_subseeds": [-1] * len(prompts), "subseed_strength": 0,
        "width": first.width, "height": first.height, "sampler_name": _sampler_of(infotexts),
        "cfg_scale": first.guidance, "steps": first.steps, "batch_size": info["batch_size"], "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": first.model, "sd_model_hash": first.model_fingerprint,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": first.effective_strength,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(jobs[0].created_at)), "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "renderfarm": {"job_ids": ids, "batch_id": jobs[0].batch_id, "nodes": [job.node for job in jobs]},
    }
    send = body.get("send_images", True) is not False
    images = [base64.b64encode(png).decode() for png in pngs] if send else []
    return JSONResponse({"images": images, "parameters": body, "info": json.dumps(full)})


def _sampler_of(infotexts: list[str]) -> str:
    for text in infotexts:
        for part in text.splitlines()[-1].split(", "):
            if part.startswith("Sampler: "):
                return part.removeprefix("Sampler: ")
    return "Default"


@router.get("/sd-models")
def sd_models(who: Who) -> list[dict[str, Any]]:
    """The models the farm renders, as A1111 lists checkpoints (`title` is what sd_model_checkpoint takes)."""
    out = []
    for name in renderable_models(who):
        entry = who.client.catalog.get(name)
        out.append({"title": name, "model_name": name, "hash": None, "sha256": None,
                    "filename": entry.source or name,
                    "config": None})
    return out


@router.get("/loras")
def loras(who: Who) -> list[dict[str, Any]]:
    """The LoRAs the farm's nodes hold, as A1111 lists them (use them as <lora:name:weight> in the prompt)."""
    out = []
    for row in lora_inventory(who):
        copy = row["copies"][0] if row["copies"] else {}
        out.append({"name": row["name"], "alias": row["name"], "path": f"{row['name']}.safetensors",
                    "metadata": {"ss_base_model_version": row.get("family"), "sha256": copy.get("sha256"),
                                 "short_hash": copy.get("short_hash"), "nodes": copy.get("nodes", [])}})
    return out


@router.get("/samplers")
def samplers() -> list[dict[str, Any]]:
    """The samplers the farm renders with ("Default": each model's own; Flux and SD 3.x take Euler only)."""
    from renderfarm.samplers import SAMPLERS

    return [{"name": "Default", "aliases": [], "options": {}}] + [
        {"name": name, "aliases": [], "options": {"flow_matching": str(any(v.flow for v in variants)).lower()}}
        for name, variants in SAMPLERS.items()]


@router.get("/schedulers")
def schedulers() -> list[dict[str, Any]]:
    """The schedule types ("automatic": the sampler's own spacing)."""
    from renderfarm.samplers import SCHEDULES

    return [{"name": name.lower(), "label": name, "aliases": None, "default_rho": -1, "need_inner_model": False}
            for name in SCHEDULES]


@router.get("/scripts")
def scripts() -> dict[str, list[str]]:
    """The farm runs no A1111 scripts (clients such as webuiapi ask which extensions are installed)."""
    return {"txt2img": [], "img2img": []}


@router.get("/options")
def get_options(who: Who) -> dict[str, Any]:
    """The options that mean something on the farm: the model txt2img renders when a request names none."""
    model = current_model(who)
    return {"sd_model_checkpoint": model, "sd_checkpoint_hash": None, "samples_format": "png",
            "CLIP_stop_at_last_layers": 1}


@router.post("/options")
def set_options(who: Who, body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    """Set sd_model_checkpoint for the caller's team (every API process sees it: it is kept in Redis). Any
    other option is a 422 naming it; nothing is changed then."""
    for key, value in body.items():
        if key != "sd_model_checkpoint":
            raise _refuse(key, value, "the only option the farm keeps is sd_model_checkpoint")
    if "sd_model_checkpoint" in body:
        value = body["sd_model_checkpoint"]
        name = checkpoint_name(value) if isinstance(value, str) else None
        if not name or name not in who.client.catalog or who.client.catalog.get(name).family.planning_only:
            raise _refuse("sd_model_checkpoint", value, "not a model the farm renders (GET /sdapi/v1/sd-models)")
        who.client.store.redis.hset(_options_key(who), "sd_model_checkpoint", name)
    return {}


@router.get("/progress")
def progress(who: Who) -> dict[str, Any]:
    """The caller's oldest unfinished A1111 job: its step while it renders, its ETA while queued. A1111 shows
    one global job; the farm shows the caller's (their team's, with a team token)."""
    running = who.client.list_jobs(state=JobState.RUNNING, tag=TAG, limit=100)
    queued = who.client.list_jobs(state=JobState.QUEUED, tag=TAG, limit=100)
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
             "job_count": len(running) + len(queued), "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
             "sampling_steps": 0}
    if running:
        job = min(running, key=lambda j: j.created_at)
        record = next((r for r in who.client.store.nodes() if r.get("name") == job.node), {})
        in_batch = job.id in (record.get("batch_jobs") or [record.get("current_job")])
        step = int(record.get("step") or 0) if in_batch else 0
        steps = int(record.get("steps") or job.spec.steps) if in_batch else job.spec.steps
        per_step = record.get("last_s_per_step")
        state.update(job=job.id, sampling_step=step, sampling_steps=steps,
                     job_timestamp=time.strftime("%Y%m%d%H%M%S", time.gmtime(job.created_at)))
        eta = (steps - step) * per_step if isinstance(per_step, (int, float)) else None
        return {"progress": round(step / steps, 4) if steps else 0.0, "eta_relative": eta, "state": state,
                "current_image": None, "textinfo": None}
    if queued:
        job = min(queued, key=lambda j: j.created_at)
        eta = who.client.estimates([job.id]).get(job.id, {}).get("eta_s")
        state.update(job=job.id)
        return {"progress": 0.0, "eta_relative": eta, "state": state, "current_image": None, "textinfo": "queued"}
    return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
