"""The native endpoints, /v1: the Python client's calls over HTTP, with the same validation and team rules.

    POST /v1/batches                 submit a batch (all or nothing)          201 {batch_id, job_ids}
    POST /v1/jobs                    submit one job                           201 {batch_id, job_ids}
    POST /v1/inputs                  upload an image input (raw PNG/JPEG/WebP) 201 {ref, width, height}
    GET  /v1/jobs                    the newest jobs, filtered
    GET  /v1/jobs/{id}               one job (with position and ETA while queued)
    GET  /v1/batches/{id}            a batch's jobs, counts by state, ETA
    POST /v1/jobs/{id}/cancel        cancel (also /retry)
    POST /v1/batches/{id}/cancel     cancel every job of the batch
    GET  /v1/jobs/{id}/images/{i}    a done job's i-th PNG (its infotext in the PNG's "parameters" chunk)
    GET  /v1/jobs/{id}/result        the same as JSON: base64 PNGs and their infotexts
    GET  /v1/webhooks/deliveries     webhook deliveries: attempts, last status, state
    GET  /v1/models, /v1/loras, /v1/nodes, /v1/status, /v1/health
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from renderfarm.api.app import Caller, caller
from renderfarm.client import JOB_ID_PATTERN, MAX_BATCH_JOBS
from renderfarm.errors import JobNotFound, ResultUnavailable, SpecError
from renderfarm.farm_view import loadability
from renderfarm.inputs import WHATS, InvalidImage, decode_base64_image
from renderfarm.jobs import Job, JobState, new_job_id

router = APIRouter(prefix="/v1", tags=["native"])
Who = Annotated[Caller, Depends(caller)]
NodeView = ("name", "state", "gpu", "vram_gib", "vram_used_gib", "compute_capability", "simulated", "loaded",
            "loadable", "unloadable", "profiles", "jobs_done", "jobs_failed", "images", "megapixels", "batches",
            "oom_escalations", "last_seen", "alive", "draining", "step", "steps", "lora_dir")


class BatchRequest(BaseModel):
    """A batch of job specs (the fields of renderfarm.jobs.JobSpec; omitted size, steps and guidance take the
    model's defaults). Checked whole before anything is enqueued: one bad spec refuses the batch (422)."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH_JOBS)
    batch_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    job_ids: list[str] | None = Field(default=None, max_length=MAX_BATCH_JOBS,
                                      description="your own ids (resubmitting the same ids is a no-op: safe retries)")
    webhook: str | None = Field(default=None, max_length=2048, description=(
        "a URL the farm POSTs to (signed: docs/webhooks.md) once every job of the batch is finished; a spec's own "
        "`webhook` is called when that job finishes"))


class Submitted(BaseModel):
    batch_id: str
    job_ids: list[str]


def job_view(job: Job, estimate: dict[str, Any] | None = None) -> dict[str, Any]:
    """A job as the API shows it: its record, where its images are, and while queued its place and ETA."""
    out = job.model_dump(mode="json")
    if job.state is JobState.DONE:
        out["images_url"] = [f"/v1/jobs/{job.id}/images/{i}" for i in range(job.images)]
        out["result_url"] = f"/v1/jobs/{job.id}/result"
    if estimate:
        out["estimate"] = estimate
    return out


def with_image_bytes(who: Caller, specs: list[Any]) -> list[Any]:
    """The specs with each `init_image` / `mask` sent as a `data:image/...;base64,` URL decoded to its bytes (the
    client checks and uploads them); a reference ("sha256:...") stays. SpecError naming jobs[i] and the field."""
    out = []
    for i, spec in enumerate(specs):
        if isinstance(spec, dict) and any(isinstance(spec.get(f), str) and spec[f].startswith("data:") for f in WHATS):
            spec = dict(spec)
            for field in WHATS:
                if isinstance(spec.get(field), str) and spec[field].startswith("data:"):
                    try:
                        spec[field] = decode_base64_image(spec[field], field, max_bytes=who.client.inputs().max_bytes)
                    except InvalidImage as exc:
                        raise SpecError(f"jobs[{i}]: {exc}; nothing was enqueued") from None
        out.append(spec)
    return out


def _submit(who: Caller, specs: list[dict[str, Any]], batch_id: str | None, job_ids: list[str] | None,
            webhook: str | None = None) -> Submitted:
    batch_id = batch_id or new_job_id()
    specs = with_image_bytes(who, specs)
    ids = who.client.submit_batch(specs, job_ids=job_ids, batch_id=batch_id, webhook=webhook)
    return Submitted(batch_id=batch_id, job_ids=ids)


@router.post("/batches", status_code=201, response_model=Submitted)
def submit_batch(body: BatchRequest, who: Who) -> Submitted:
    """Submit a batch: every spec is checked against the catalog and the farm's nodes first; any problem is a 422
    naming the job and the field, and then nothing was enqueued."""
    return _submit(who, body.jobs, body.batch_id, body.job_ids, body.webhook)


@router.post("/jobs", status_code=201, response_model=Submitted)
def submit_job(spec: dict[str, Any], who: Who) -> Submitted:
    """Submit one job (a JobSpec as JSON)."""
    return _submit(who, [spec], None, None)


INPUT_TYPES = ("image/png", "image/jpeg", "image/webp", "application/octet-stream")


@router.post("/inputs", status_code=201, responses={413: {"description": "past the farm's size cap"},
                                                     415: {"description": "not an image Content-Type"},
                                                     422: {"description": "not an image the farm takes"}})
async def upload_input(request: Request, who: Who,
                       what: Annotated[Literal["init_image", "mask"], Query()] = "init_image") -> JSONResponse:
    """Upload an image input: the raw PNG, JPEG or WebP bytes as the body (Content-Type image/png, image/jpeg or
    image/webp), `?what=mask` for a mask. 201 {ref, width, height, mode, bytes, expires}: put `ref` in a spec's
    `init_image` or `mask`. The same image again is stored once. 413 past input_max_bytes, 422 naming the reason
    for anything else that is not an image the farm takes (docs/inputs.md)."""
    from starlette.concurrency import run_in_threadpool

    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in INPUT_TYPES:
        raise HTTPException(415, f"{what}: Content-Type {kind or 'missing'!r}: send the image's bytes as image/png, "
                                 "image/jpeg or image/webp")
    inputs = await run_in_threadpool(who.client.inputs)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > inputs.max_bytes:
        return _too_large(what, int(declared), inputs.max_bytes)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > inputs.max_bytes:
            return _too_large(what, len(body), inputs.max_bytes)
    try:
        ref, valid = await run_in_threadpool(inputs.put, bytes(body), what)
    except InvalidImage as exc:
        return JSONResponse({"detail": str(exc), "field": what, "reason": exc.reason},
                            status_code=413 if exc.too_large else 422)
    record = inputs.describe(ref) or {}
    return JSONResponse({"ref": ref, "width": valid.width, "height": valid.height, "mode": valid.mode,
                         "bytes": len(valid.png), "expires": record.get("expires")}, status_code=201)


def _too_large(what: str, size: int, cap: int) -> JSONResponse:
    return JSONResponse({"detail": f"{what}: {size} bytes or more is past the farm's cap of {cap} bytes per image "
                                   "(input_max_bytes)", "field": what, "reason": "too large"}, status_code=413)


@router.get("/jobs")
def list_jobs(
    who: Who,
    state: JobState | None = None,
    team: Annotated[str | None, Query(max_length=64)] = None,
    batch: Annotated[str | None, Query(max_length=64)] = None,
    tag: Annotated[str | None, Query(max_length=200)] = None,
    model: Annotated[str | None, Query(max_length=200)] = None,
    node: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    """The newest jobs (by submit time) matching every filter given; a team token sees its own team's only."""
    jobs = who.client.list_jobs(state=state, team=team, batch=batch, tag=tag, model=model, node=node, limit=limit)
    return {"jobs": [job_view(job) for job in jobs]}


def _path_id(value: str) -> str:
    """A job id from a path: one that cannot be an id is no job (404), not a request error."""
    if not JOB_ID_PATTERN.fullmatch(value):
        raise JobNotFound(value[:80])
    return value


def _no_batch(batch_id: str) -> HTTPException:
    return HTTPException(404, f"no such batch: {batch_id[:80]} (or none of its jobs is this token's team's)")


@router.get("/jobs/{job_id}")
def get_job(job_id: str, who: Who) -> dict[str, Any]:
    """One job: its state, spec, node, timings, error; while queued its position and ETA (`estimate`)."""
    job = who.client.job(_path_id(job_id))
    estimate = who.client.estimates([job.id]).get(job.id) if job.state is JobState.QUEUED else None
    return job_view(job, estimate)


def _batch_jobs(who: Caller, batch_id: str) -> list[Job]:
    if not JOB_ID_PATTERN.fullmatch(batch_id):
        raise _no_batch(batch_id)
    jobs = who.client.list_jobs(batch=batch_id, limit=MAX_BATCH_JOBS)
    if not jobs:
        raise _no_batch(batch_id)
    return jobs


@router.get("/batches/{batch_id}")
def get_batch(batch_id: str, who: Who) -> dict[str, Any]:
    """A batch: its jobs (yours), how many are in each state, whether it is finished, and the ETA of its last
    queued job (seconds from now, as the scheduler last planned it)."""
    jobs = _batch_jobs(who, batch_id)
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.state.value] = counts.get(job.state.value, 0) + 1
    queued = [job.id for job in jobs if job.state is JobState.QUEUED]
    estimates = who.client.estimates(queued) if queued else {}
    etas = [e["eta_s"] for e in estimates.values() if isinstance(e.get("eta_s"), (int, float))]
    return {"batch_id": batch_id, "counts": counts, "finished": all(job.state.terminal for job in jobs),
            "eta_s": max(etas) if etas and len(etas) == len(queued) else None,
            "jobs": [job_view(job, estimates.get(job.id)) for job in sorted(jobs, key=lambda j: (j.created_at, j.id))]}


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: str, who: Who) -> dict[str, str]:
    """Cancel a job: {job_id: what happened}. 404 when there is no such job."""
    return _one(who.client.cancel([_path_id(job_id)]), job_id)


@router.post("/jobs/{job_id}/retry")
def retry_job(job_id: str, who: Who) -> dict[str, str]:
    """Put a failed or cancelled job back in the queue, with a fresh set of attempts."""
    return _one(who.client.retry([_path_id(job_id)]), job_id)


def _one(outcome: dict[str, str], job_id: str) -> dict[str, str]:
    if outcome.get(job_id, "").endswith("no such job"):
        raise JobNotFound(job_id)
    return outcome


@router.post("/batches/{batch_id}/cancel")
def cancel_batch(batch_id: str, who: Who) -> dict[str, str]:
    """Cancel every job of a batch that is not finished yet: {job_id: what happened}."""
    jobs = _batch_jobs(who, batch_id)
    return who.client.cancel([job.id for job in jobs])


@router.get("/jobs/{job_id}/images/{index}", responses={200: {"content": {"image/png": {}}}},
            response_class=Response)
def get_image(job_id: str, index: int, who: Who) -> Response:
    """A done job's image `index` (0-based) as PNG, carrying its A1111 infotext in the "parameters" chunk."""
    result = who.client.result(_path_id(job_id))
    if not 0 <= index < len(result.png):
        raise ResultUnavailable(f"job {job_id} has {len(result.png)} image(s); there is no image {index}")
    return Response(result.png[index], media_type="image/png",
                    headers={"Content-Disposition": f'inline; filename="{job_id}-{index}.png"'})


@router.get("/jobs/{job_id}/result")
def get_result(job_id: str, who: Who) -> dict[str, Any]:
    """A done job's images as base64 PNGs, with their infotexts (for scripts); 409 while it is not done."""
    result = who.client.result(_path_id(job_id))
    return {"job": job_view(result.job), "images": [base64.b64encode(png).decode() for png in result.png],
            "parameters": result.parameters}


@router.get("/models")
def models(request: Request, who: Who) -> dict[str, Any]:
    """The catalog's models, with the nodes that can load each (a node says what it cannot load, and why)."""
    nodes = who.client.store.nodes()
    catalog = who.client.catalog
    out = []
    for name in catalog.names():
        entry = catalog.get(name)
        able, unable = loadability(nodes, name)
        out.append({"name": name, "family": entry.family.name, "standin": entry.standin,
                    "renderable": not entry.family.planning_only, "default_size": entry.default_size,
                    "min_size": entry.min_size, "max_size": entry.max_size, "default_steps": entry.default_steps,
                    "default_guidance": entry.default_guidance, "nodes": able, "unloadable": unable})
    return {"models": out}


def lora_inventory(who: Caller) -> list[dict[str, Any]]:
    """Every LoRA some node holds: name, family, the copies (sha256) and which nodes hold each."""
    table: dict[str, dict[str, Any]] = {}
    for node, doc in who.client.store.assets().items():
        loras = doc.get("loras") if isinstance(doc, dict) else None
        for name, entry in (loras or {}).items() if isinstance(loras, dict) else ():
            if not isinstance(entry, dict):
                continue
            row = table.setdefault(name, {"name": name, "family": entry.get("family"), "copies": {}})
            copy = row["copies"].setdefault(str(entry.get("sha256")), {
                "sha256": entry.get("sha256"), "short_hash": entry.get("short_hash"), "rank": entry.get("rank"),
                "style": entry.get("style"), "size_bytes": entry.get("size_bytes") or entry.get("size"), "nodes": []})
            copy["nodes"].append(node)
    rows = []
    for name in sorted(table):
        row = table[name]
        row["copies"] = sorted(row["copies"].values(), key=lambda c: (-len(c["nodes"]), str(c["sha256"])))
        rows.append(row)
    return rows


@router.get("/loras")
def loras(who: Who) -> dict[str, Any]:
    """The LoRAs the farm's nodes hold (a job names them in `loras` or as <lora:name:weight> in its prompt)."""
    return {"loras": lora_inventory(who)}


@router.get("/nodes")
def nodes(who: Who) -> dict[str, Any]:
    """The farm's nodes: card, state, what they hold and have done."""
    return {"nodes": [{k: record[k] for k in NodeView if k in record} for record in who.client.store.nodes()]}


@router.get("/webhooks/deliveries")
def webhook_deliveries(
    who: Who,
    job: Annotated[str | None, Query(max_length=64)] = None,
    batch: Annotated[str | None, Query(max_length=64)] = None,
    state: Annotated[Literal["pending", "delivered", "failed"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    """Webhook deliveries, newest first: target (query string redacted), event, attempts, last status or error,
    state. A team token sees its team's."""
    from renderfarm.webhooks import deliveries

    return {"deliveries": deliveries(who.client.store, job=job, state=state, limit=limit, batch=batch,
                                     team=who.team)}


@router.get("/status")
def status(who: Who) -> dict[str, Any]:
    """Queue depth by state and the farm's counters (what `renderfarm status` shows)."""
    return {"counts": who.client.store.counts(), "nodes": len(who.client.store.nodes())}


@router.get("/health")
def health(request: Request) -> JSONResponse:
    """Liveness for a load balancer: 200 when this process reaches the farm's Redis, else 503. No token needed."""
    try:
        request.app.state.ctx.base.store.redis.ping()
    except Exception as exc:  # any failure to reach Redis is "not healthy", said as it is
        return JSONResponse({"ok": False, "redis": f"{type(exc).__name__}: {exc}"}, status_code=503)
    return JSONResponse({"ok": True, "redis": "ok"})


__all__ = ["BatchRequest", "job_view", "lora_inventory", "router"]
