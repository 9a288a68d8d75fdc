"""AUTOMATIC1111's web API (/sdapi/v1), as far as it maps onto the farm, for the scripts, plugins and clients
(the `webuiapi` package, Krita and Photoshop plugins, Open-WebUI) written for it.

    POST /sdapi/v1/txt2img       queued, routed and rendered by the farm; answers with A1111's shape
    GET  /sdapi/v1/sd-models     the catalog's renderable models
    GET  /sdapi/v1/loras         the LoRAs the nodes hold (use them as <lora:name:weight> in the prompt)
    GET  /sdapi/v1/progress      the caller's current A1111 job: step, ETA
    GET/POST /sdapi/v1/options   sd_model_checkpoint (kept per team in Redis: the API itself holds no state)
    GET  /sdapi/v1/samplers, /schedulers, /scripts (what the farm honours)
    POST /sdapi/v1/img2img       img2img and inpainting (init_images[0], mask): see img2img_fields
                                 (renderfarm/api/a1111_fields.py)

How a txt2img request maps: `n_iter` jobs of `batch_size` images each, submitted as one batch (so the
iterations render in parallel on whichever nodes fit), seeds `seed`, `seed+1`, ... across all images as A1111
gives them (-1: a random seed); `cfg_scale` is the guidance, `steps` the steps, the model is
`override_settings.sd_model_checkpoint`, else the team's option, else the first model a node can render.

The hires fix (`enable_hr: true`) is the job's `hires` (renderfarm/chains.py): each job becomes a first pass
`<id>-base` and a second pass at the scale, which keeps the id; the request waits for the second passes and
answers with their images (the final size), `info` reporting the first pass's size and steps and A1111's
`extra_generation_params` (Denoising strength, Hires upscale or Hires resize, Hires steps, Hires upscaler), and
each image's infotext (written by the node) the first pass's Size and Steps, then Hires upscale, Hires steps and
"Hires upscaler: Lanczos" as A1111 writes a hires fix. How each hr_* field maps, and which are refused:
hires_fields (renderfarm/api/a1111_fields.py, where every field's mapping lives). In short: `hr_scale` (or an
`hr_resize_x`/`hr_resize_y` target that is the first pass scaled uniformly), `denoising_strength` (absent: 0.7),
`hr_second_pass_steps`, `hr_upscaler` "Lanczos" or "None" only (latent modes and upscaling models are a 422: the
farm's second pass resizes with Lanczos), the other hr_* fields only as "the first pass's".

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
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse

from renderfarm.api.a1111_fields import (
    check_fields,
    checkpoint_name,
    hires_fields,
    img2img_fields,
    invalid,
    number,
    refuse,
    sampler_fields,
    text_field,
)
from renderfarm.api.app import Caller, caller
from renderfarm.api.native import lora_inventory
from renderfarm.chains import BASE_SUFFIX
from renderfarm.errors import SpecError, WaitTimeout
from renderfarm.farm_view import loadability
from renderfarm.jobs import MAX_IMAGES_PER_JOB, SEED_MAX, JobState

router = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
Who = Annotated[Caller, Depends(caller)]
TAG = "a1111"  # every job submitted here carries it (progress finds the caller's current one by it)
MAX_ITERATIONS = 100
OPTIONS_KEY = "options"  # Keys.api(OPTIONS_KEY, team): a hash of the A1111 options a team set


def renderable_models(who: Caller) -> list[str]:
    """The catalog's models some node can load (every renderable one while no node has registered)."""
    catalog = who.client.catalog
    names = [n for n in catalog.names() if not catalog.get(n).family.planning_only]
    records = who.client.store.nodes()
    if not records:
        return names
    return [n for n in names if loadability(records, n)[0]] or names


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
        raise refuse("override_settings", override, "expected an object")
    for key in override:
        if key != "sd_model_checkpoint":
            raise refuse(f"override_settings.{key}", override[key], "only sd_model_checkpoint can be overridden")
    model = checkpoint_name(str(override["sd_model_checkpoint"])) if override.get("sd_model_checkpoint") else None
    model = model or current_model(who)
    if model is None:
        raise HTTPException(422, {"error": "InvalidField", "field": "override_settings.sd_model_checkpoint",
                                  "detail": "no model: the catalog lists none a node can render"})
    entry = who.client.catalog.get(model) if model in who.client.catalog else None
    batch_size = number(body, "batch_size", int, 1, 1, MAX_IMAGES_PER_JOB)
    n_iter = number(body, "n_iter", int, 1, 1, MAX_ITERATIONS)
    seed = number(body, "seed", int, -1, -1, SEED_MAX)
    if seed == -1:
        seed = random.randint(0, SEED_MAX - batch_size * n_iter)
    if seed + batch_size * n_iter - 1 > SEED_MAX:
        raise HTTPException(422, {"error": "InvalidField", "field": "seed",
                                  "detail": f"seed: {seed} + {batch_size * n_iter} images passes {SEED_MAX}"})
    guidance_default = entry.default_guidance if entry else 7.0
    distilled = body.get("distilled_cfg_scale")  # Forge's name for Flux's guidance
    spec: dict[str, Any] = {"model": model, "prompt": text_field(body, "prompt"),
                            "negative_prompt": text_field(body, "negative_prompt"), "tags": [TAG],
                            "num_images": batch_size}
    for field, key, kind, low, high in (("steps", "steps", int, 1, 10_000), ("width", "width", int, 1, 100_000),
                                        ("height", "height", int, 1, 100_000),
                                        ("cfg_scale", "guidance", float, 0.0, 1000.0)):
        if body.get(field) is not None:
            spec[key] = number(body, field, kind, None, low, high)
    cfg = spec.get("guidance", guidance_default)  # what cfg_scale means here (before Flux's distilled guidance)
    if distilled is not None and entry is not None and not entry.family.uses_cfg:
        spec["guidance"] = number(body, "distilled_cfg_scale", float, guidance_default, 0.0, 1000.0)
    spec.update(sampler_fields(body))
    info: dict[str, Any] = {"sd_model_name": model, "batch_size": batch_size, "n_iter": n_iter, "seed": seed,
                            "all_seeds": [seed + i for i in range(batch_size * n_iter)], "hires": False}
    if img2img:
        spec.update(img2img_fields(body, who))
    elif _hires_on(body):
        size = entry.default_size if entry else 512
        spec["hires"], info["extra_generation_params"] = hires_fields(
            body, spec, width=spec.get("width", size), height=spec.get("height", size),
            multiple=entry.family.size_multiple if entry else 8, cfg=cfg,
            uses_cfg=entry.family.uses_cfg if entry else True)
        info["hires"] = True
    specs = [{**spec, "seed": seed + i * batch_size} for i in range(n_iter)]
    return specs, info


def _hires_on(body: dict[str, Any]) -> bool:
    value = body.get("enable_hr")
    if value not in (None, False, True):  # 0 and 1 included, as A1111's bool takes them
        raise invalid("enable_hr", f"{json.dumps(value, default=str)[:40]} is not true or false")
    return bool(value)


def _wait(who: Caller, ids: list[str], timeout_s: float) -> list[Any]:
    try:
        return who.client.wait(ids, timeout=timeout_s)
    except WaitTimeout:
        # Nobody will take the images: free the farm (a hires fix's first passes too, which may still render).
        first_passes = [p for job in who.client.store.get_many(ids) if job is not None and job.spec.hires
                        for p in job.spec.after]
        who.client.cancel(list(ids) + first_passes)
        raise WaitTimeout(f"the render did not finish within {timeout_s:g} s (the API's a1111 timeout); its "
                          f"{len(ids) + len(first_passes)} job(s) were cancelled") from None


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
        if info["hires"]:
            extra = (", and enable_hr's hr_scale (or hr_resize_x/hr_resize_y), denoising_strength and "
                     "hr_second_pass_steps map to hires.scale, hires.strength and hires.steps")
        raise HTTPException(422, {"error": "InvalidField", "detail": f"{exc} (steps, width, height, cfg_scale, "
                                  "prompt and the model map to the job's steps, width, height, guidance, prompt "
                                  f"and model{extra})"}) from None
    jobs = _wait(who, ids, request.app.state.ctx.a1111_timeout_s)
    # A hires fix: `ids` are the second passes (the images asked for), each after its first pass `<id>-base`.
    first_passes = who.client.jobs([i + BASE_SUFFIX for i in ids]) if info["hires"] else []
    failed = [job for job in first_passes + jobs if job.state is not JobState.DONE]
    if failed:
        job = failed[0]
        return JSONResponse({"error": "RenderFailed", "detail": f"job {job.id} {job.state.value}: {job.error}",
                             "job_ids": ids}, status_code=502)
    pngs, infotexts = [], []
    for job in jobs:
        result = who.client.result(job.id)
        pngs += result.png
        infotexts += result.parameters
    first = (first_passes or jobs)[0].spec  # A1111 reports the first pass's size and steps
    farm = {"job_ids": ids, "batch_id": jobs[0].batch_id, "nodes": [job.node for job in jobs]}
    if first_passes:
        farm.update(first_pass_job_ids=[job.id for job in first_passes],
                    first_pass_nodes=[job.node for job in first_passes])
    prompts = [s["prompt"] for s in specs for _ in range(info["batch_size"])]
    full = {
        "prompt": first.prompt, "all_prompts": prompts, "negative_prompt": first.negative_prompt,
        "all_negative_prompts": [first.negative_prompt] * len(prompts), "seed": info["seed"],
        "all_seeds": info["all_seeds"], "subseed": -1, "all_subseeds": [-1] * len(prompts), "subseed_strength": 0,
        "width": first.width, "height": first.height, "sampler_name": _sampler_of(infotexts),
        "cfg_scale": first.guidance, "steps": first.steps, "batch_size": info["batch_size"], "restore_faces": False,
        "face_restoration_model": None, "sd_model_name": first.model, "sd_model_hash": first.model_fingerprint,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": jobs[0].spec.effective_strength,
        "extra_generation_params": info.get("extra_generation_params", {}), "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(jobs[0].created_at)), "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "renderfarm": farm,
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
            raise refuse(key, value, "the only option the farm keeps is sd_model_checkpoint")
    if "sd_model_checkpoint" in body:
        value = body["sd_model_checkpoint"]
        name = checkpoint_name(value) if isinstance(value, str) else None
        if not name or name not in who.client.catalog or who.client.catalog.get(name).family.planning_only:
            raise refuse("sd_model_checkpoint", value, "not a model the farm renders (GET /sdapi/v1/sd-models)")
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
