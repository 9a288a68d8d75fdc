"""What the dashboard reads from Redis, and the three things it may change: plain functions over a `Store`.

Redis only, never Ray: the page runs anywhere the Redis URL reaches. Every read is bounded by what the page
shows, so it stays quick with 100,000 jobs in Redis: counts come from the state indexes (ZCARD, ZCOUNT), job
rows from the latest `limit` ids of each shown state, the gallery from the first image of the latest few
done jobs. A record that does not parse is skipped and counted, never allowed to break the page.

No streamlit here: every function returns plain dicts and lists (easy to test, easy to render).
"""

from __future__ import annotations

import io
import time
import zlib
from itertools import pairwise
from typing import Any

from renderfarm.cluster.blobs import BlobStoreError, options_from_published, read_blob
from renderfarm.cluster.store import ChainBlocked, Store
from renderfarm.cluster.store.codec import finite_number
from renderfarm.errors import CorruptRecord, JobNotFound
from renderfarm.jobs import IllegalTransition, Job, JobState
from renderfarm.loras.assets import summary as assets_summary

HOUR = 3600.0
JOB_LIMIT = 50  # job rows read per shown state
GALLERY_SIZE = 8
SAMPLE_COUNT = 720  # one hour of samples at the scheduler's default one per 5 s
STALE_SAMPLES_S = 60.0  # older than this, the latest samples say nothing about "now"
# A node's totals move only when a batch finishes, so the last two samples (5 s apart) of a busy node often
# hold the same totals: a node's rate "now" is taken over its samples of the last few minutes instead.
RATE_WINDOW_S = 300.0
CHART_WINDOW_S = 60.0  # the throughput chart: each point is the rate over the minute before it
# Tableau 10: ten hues far apart (Streamlit's default palette pairs a dark and a light shade of each hue).
NODE_PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
                "#9c755f", "#bab0ac")
# Not finished: the backlog. A waiting job (chains: held until the jobs it runs after are done) is part of it
# but not runnable: it is in no queue, and the page shows it apart.
PENDING = (JobState.QUEUED, JobState.LEASED, JobState.RUNNING, JobState.WAITING)


# --- overview ----------------------------------------------------------------------------------------


RELIABILITY_COUNTERS = ("leases_expired", "timeouts", "late_results", "quarantined")


def overview(store: Store, now: float | None = None) -> dict[str, int]:
    """Queue depth now: jobs per state (index sizes; `waiting`: held for other jobs, chains), the backlog (every
    job not finished, waiting ones included), and done / failed / cancelled in the last hour."""
    now = time.time() if now is None else now
    counts = store.counts()
    out = {state.value: int(counts.get(state.value, 0)) for state in JobState}
    for state in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
        out[f"{state.value}_1h"] = store.finished_since(state, now - HOUR)
    out["total"] = sum(int(counts.get(state.value, 0)) for state in JobState)
    out["backlog"] = sum(out[state.value] for state in PENDING)
    counters = store.counters()  # what the farm survived: leases reaped, late results discarded, ...
    for name in RELIABILITY_COUNTERS:
        out[name] = int(counters.get(name, 0))
    return out


def queue_history(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Queue depth over time, one row per sample: {"t", "queued", "leased", "running", "waiting"} (0 waiting in
    samples written before chains)."""
    rows = []
    for sample in samples:
        counts = sample.get("counts")
        if not isinstance(counts, dict):
            continue
        rows.append({"t": sample["t"], **{s.value: int(finite_number(counts.get(s.value)) or 0) for s in PENDING}})
    return rows


# --- nodes -------------------------------------------------------------------------------------------


def node_state(record: dict[str, Any], now: float, dead_after: float) -> str:
    """dead (heartbeat older than `dead_after` s, or none), else draining (set by an operator), else what the
    worker last said (idle, busy, stopped)."""
    heartbeat = finite_number(record.get("heartbeat"))
    if heartbeat is None or now - heartbeat > dead_after:
        return "dead"
    if record.get("draining") is True:
        return "draining"
    state = record.get("state")
    return state if isinstance(state, str) and state else "unknown"


def _rates(held: list[tuple[float, dict[str, Any]]]) -> dict[str, float] | None:
    """Images per minute and megapixels per second over samples (t, totals) of one node, oldest first: the
    sum of the increments between consecutive samples (a total that went down means the worker restarted:
    counted from zero) over the time they span. None when they span no time or a total does not read."""
    if len(held) < 2 or held[-1][0] <= held[0][0]:
        return None
    d_images = d_mp = 0.0
    for (_, before), (_, after) in pairwise(held):
        images = (finite_number(before.get("images")), finite_number(after.get("images")))
        megapixels = (finite_number(before.get("megapixels")), finite_number(after.get("megapixels")))
        if None in images or None in megapixels:
            return None
        d_images += images[1] - images[0] if images[1] >= images[0] else images[1]
        d_mp += megapixels[1] - megapixels[0] if megapixels[1] >= megapixels[0] else megapixels[1]
    dt = held[-1][0] - held[0][0]
    return {"images_per_min": d_images / dt * 60.0, "mp_per_s": d_mp / dt}


def _held(samples: list[dict[str, Any]], name: str) -> list[tuple[float, dict[str, Any]]]:
    """(t, totals) of node `name` in every sample that holds it, in order."""
    out = []
    for sample in samples:
        nodes, t = sample.get("nodes"), finite_number(sample.get("t"))
        if t is not None and isinstance(nodes, dict) and isinstance(nodes.get(name), dict):
            out.append((t, nodes[name]))
    return out


def throughput_now(
    record: dict[str, Any], samples: list[dict[str, Any]], now: float, stale_after: float = STALE_SAMPLES_S,
    window: float = RATE_WINDOW_S,
) -> dict[str, Any]:
    """A node's images/min and MP/s over its samples of the last `window` s (when the latest is recent),
    else its totals over its render time; seconds per step as it last measured. "source" says which."""
    held = [(t, totals) for t, totals in _held(samples, record["name"]) if t >= now - window]
    rates = None
    if held and now - held[-1][0] <= stale_after:
        rates = _rates(held)
    source = "samples"
    if rates is None:
        source = "totals"
        seconds = finite_number(record.get("render_seconds")) or 0.0
        images, megapixels = finite_number(record.get("images")) or 0.0, finite_number(record.get("megapixels")) or 0.0
        rates = {
            "images_per_min": images / seconds * 60.0 if seconds > 0 else None,
            "mp_per_s": megapixels / seconds if seconds > 0 else None,
        }
    return {**rates, "s_per_step": finite_number(record.get("last_s_per_step")), "source": source}


def throughput_history(samples: list[dict[str, Any]], window: float = CHART_WINDOW_S) -> list[dict[str, Any]]:
    """Per node, over time: one row per sample that holds the node after its first, the rate over its samples
    of the `window` s before: {"t", "node", "images_per_min", "mp_per_s"}."""
    names = sorted({name for s in samples if isinstance(s.get("nodes"), dict) for name in s["nodes"]})
    rows = []
    for name in names:
        held = _held(samples, name)
        first = 0
        for last in range(1, len(held)):
            while held[first][0] < held[last][0] - window and first < last - 1:
                first += 1
            rates = _rates(held[first : last + 1])
            if rates is not None:
                rows.append({"t": held[last][0], "node": name, **rates})
    rows.sort(key=lambda r: r["t"])
    return rows


def node_colors(names: list[str]) -> dict[str, str]:
    """A colour per node from a qualitative palette: picked by a stable hash of its name (the same node keeps
    its colour across refreshes, restarts and other nodes joining), moved on to the next free colour when
    taken, so up to ten nodes never share one."""
    colors: dict[str, str] = {}
    for name in sorted(set(names)):
        start = zlib.crc32(name.encode()) % len(NODE_PALETTE)
        taken = set(colors.values())
        free = [NODE_PALETTE[(start + i) % len(NODE_PALETTE)] for i in range(len(NODE_PALETTE))]
        colors[name] = next((c for c in free if c not in taken), free[0])
    return colors


def nodes(
    store: Store, samples: list[dict[str, Any]], dead_after: float, now: float | None = None
) -> list[dict[str, Any]]:
    """One row per registered node: what it is, what it holds, how fast it renders, whether it lives."""
    now = time.time() if now is None else now
    failed_1h = failed_by_node(store, now - HOUR)
    assets = store.assets()  # the LoRAs each node holds (loras/assets.py), written when they change
    rows = []
    for record in store.nodes():
        heartbeat = finite_number(record.get("heartbeat"))
        card = record.get("card") if isinstance(record.get("card"), dict) else {}
        profiles = record.get("profiles") if isinstance(record.get("profiles"), dict) else {}
        loaded = record.get("loaded") if isinstance(record.get("loaded"), list) else []
        host = record.get("host") if isinstance(record.get("host"), dict) else {}
        simulated = record.get("simulated")
        rows.append({
            "name": record["name"],
            "state": node_state(record, now, dead_after),
            "gpu": str(record.get("gpu") or card.get("name") or "unknown GPU"),
            "kind": "simulated" if simulated is True else "real" if simulated is False else "unknown",
            "device": str(record.get("device") or ""),
            "vram_used_gib": finite_number(record.get("vram_used_gib")),
            "vram_total_gib": finite_number(record.get("vram_gib")) or finite_number(card.get("vram_gib")),
            # The RAM the node plans against (None: not checked) and what its machine has and had free.
            "ram_planned_gib": finite_number(card.get("ram_gib")),
            "ram_total_gib": finite_number(host.get("ram_gib")),
            "ram_available_gib": finite_number(host.get("ram_available_gib")),
            "profiles": {str(k): str(v) for k, v in profiles.items()},
            "loaded": [str(m) for m in loaded],
            "heartbeat": heartbeat,
            "heartbeat_age_s": None if heartbeat is None else max(0.0, now - heartbeat),
            "draining": record.get("draining") is True,
            "drain_reason": str(record.get("drain_reason") or ""),
            "jobs_done": int(finite_number(record.get("jobs_done")) or 0),
            "jobs_failed": int(finite_number(record.get("jobs_failed")) or 0),
            "images": int(finite_number(record.get("images")) or 0),
            "failed_1h": failed_1h.get(record["name"], 0),
            **assets_summary(assets.get(record["name"])),
            **progress(record),
            **throughput_now(record, samples, now),
        })
    return rows


def progress(record: dict[str, Any]) -> dict[str, Any]:
    """What the node renders now, as its worker publishes it between two denoising steps (actors/progress.py):
    {"current_job" (None when nothing), "batch_jobs", "step", "steps"}."""
    job, step, steps = record.get("current_job"), finite_number(record.get("step")), finite_number(record.get("steps"))
    if not isinstance(job, str) or not job:
        return {"current_job": None, "batch_jobs": 0, "step": None, "steps": None}
    return {"current_job": job, "batch_jobs": int(finite_number(record.get("batch_jobs")) or 1),
            "step": None if step is None else int(step), "steps": None if steps is None else int(steps)}


def failed_by_node(store: Store, since: float) -> dict[str, int]:
    """How many jobs failed at or after `since`, per node they last ran on ("" for none): the jobs that the
    queue's "Failed (1 h)" counts (`Store.finished_since`), so the node cards add up to it."""
    ids = store.redis.zrangebyscore(store.keys.index(JobState.FAILED), since, "+inf")
    pipe = store.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(store.keys.job(job_id.decode()), "node")
    out: dict[str, int] = {}
    for node in pipe.execute() if ids else []:
        name = node.decode(errors="replace") if node else ""
        out[name] = out.get(name, 0) + 1
    return out


# --- jobs --------------------------------------------------------------------------------------------


def load_jobs(store: Store, ids: list[str]) -> tuple[list[Job], int]:
    """The jobs of `ids` that exist and parse, in order, and how many were skipped as unreadable."""
    try:
        found = store.get_many(ids)
    except CorruptRecord:  # one bad record: read them one by one to keep the others
        found = []
        for job_id in ids:
            try:
                found.append(store.get(job_id))
            except (CorruptRecord, JobNotFound):
                found.append(None)
    jobs = [job for job in found if job is not None]
    return jobs, len(ids) - len(jobs)


def _ids(store: Store, state: JobState, limit: int) -> list[str]:
    # The queue is shown from its head (the next jobs to run), the waiting jobs too (scored as in the queue:
    # the order they would be queued in); every other state newest first.
    return store.ids_in(state, limit=limit, newest_first=state not in (JobState.QUEUED, JobState.WAITING))


def _row(
    job: Job, eta: dict[str, Any] | None, now: float, waits: list[tuple[str, str]] | None = None
) -> dict[str, Any]:
    spec = job.spec
    row = {
        "id": job.id,
        "state": job.state.value,
        "team": spec.team,
        "model": spec.model,
        "node": job.node or "",
        "size": f"{spec.width}x{spec.height}",
        "steps": spec.steps,
        "images": spec.num_images,
        "priority": spec.priority,
        "attempts": job.attempts,
        "prompt": spec.prompt if len(spec.prompt) <= 80 else spec.prompt[:79] + "…",
        "created_at": job.created_at,
        "finished_at": job.finished_at,
        "position": None,
        "eta_s": None,
        "waiting": "",
        "error": job.error or "",
    }
    if job.state is JobState.WAITING:  # what it waits for: the parents not done, with their states
        row["waiting"] = ", ".join(f"{parent} ({state})" for parent, state in waits or []) or "its parents are done"
    if eta is not None:
        position, finish = eta.get("position"), finite_number(eta.get("finish"))
        row["position"] = int(position) if isinstance(position, int) and not isinstance(position, bool) else None
        row["eta_s"] = None if finish is None else max(0.0, finish - now)
        row["waiting"] = str(eta.get("waiting") or "")
    return row


_ACTIVE_ORDER = {JobState.QUEUED.value: 0, JobState.WAITING.value: 1, JobState.LEASED.value: 2,
                 JobState.RUNNING.value: 3}


def _table_order(row: dict[str, Any]) -> tuple[Any, ...]:
    """Queued jobs by their place in the queue (those the scheduler placed nowhere after them), then waiting
    (behind the queue, in index order), leased, running, then the finished ones newest first. A stable sort: ties
    keep the index order."""
    group = _ACTIVE_ORDER.get(row["state"], 4)
    if group == 0:
        return (0, row["position"] is None, row["position"] or 0)
    if group == 4:
        return (4, -(row["finished_at"] or 0.0))
    return (group,)


def jobs(
    store: Store,
    state: str | None = None,
    team: str | None = None,
    model: str | None = None,
    node: str | None = None,
    limit: int = JOB_LIMIT,
    now: float | None = None,
) -> dict[str, Any]:
    """The latest `limit` jobs of each shown state (one state, or all), filtered by team, model and node.

    Queued jobs carry their place in the queue and ETA (seconds until they should finish) as the scheduler
    last published them, or why they wait; waiting jobs (chains) what they wait for. Rows come queued jobs first,
    in queue order, then waiting, leased, running, and the finished newest first. Returns {"rows", "facets":
    {"team", "model", "node"} (values seen before filtering: the filters' choices), "skipped" (unreadable
    records)}.
    """
    now = time.time() if now is None else now
    states = [JobState(state)] if state else list(JobState)
    ids = [job_id for s in states for job_id in _ids(store, s, limit)]
    found, skipped = load_jobs(store, ids)
    etas = store.etas([job.id for job in found if job.state is JobState.QUEUED])
    waits = store.waits_for(found)  # one pipelined read of the waiting jobs' parents' states
    rows = sorted((_row(job, etas.get(job.id), now, waits.get(job.id)) for job in found), key=_table_order)
    facets = {key: sorted({r[key] for r in rows if r[key]}) for key in ("team", "model", "node")}
    wanted = {"team": team, "model": model, "node": node}
    rows = [r for r in rows if all(not value or r[key] == value for key, value in wanted.items())]
    return {"rows": rows, "facets": facets, "skipped": skipped}


def failures(store: Store, limit: int = 20) -> list[dict[str, Any]]:
    """The latest failed jobs with why they failed."""
    found, _ = load_jobs(store, store.ids_in(JobState.FAILED, limit=limit, newest_first=True))
    return [
        {"id": j.id, "team": j.spec.team, "model": j.spec.model, "node": j.node or "", "attempts": j.attempts,
         "finished_at": j.finished_at, "error": j.error or "(no reason recorded)"}
        for j in found
    ]


# --- gallery -----------------------------------------------------------------------------------------


def latest_done(store: Store, count: int = GALLERY_SIZE) -> list[str]:
    """The ids of the latest `count` finished jobs, newest first."""
    return store.ids_in(JobState.DONE, limit=count, newest_first=True)


def image_parameters(png: bytes) -> dict[str, str] | None:
    """The A1111 "parameters" a rendered PNG carries, parsed (prompt, negative_prompt, Steps, Seed, ...);
    None when it carries none or is not an image."""
    from PIL import Image

    from renderfarm.infotext import (
        parse_a1111_parameters,  # torch-free: text and PIL only
    )

    try:
        with Image.open(io.BytesIO(png)) as image:
            text = image.info.get("parameters")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # not an image PIL can read
        return None
    if not isinstance(text, str) or not text.strip():
        return None
    return {"text": text, **parse_a1111_parameters(text)}


def first_image(store: Store, job_id: str) -> bytes | None:
    """A done job's first image: from the blob store when its record lists blob URLs, else from its Redis
    result (records written before the upgrade). None when it expired, or the store cannot be read now (the
    page shows the job without its image rather than break)."""
    try:
        urls = store.result_blobs(job_id)
    except CorruptRecord:
        return None
    if urls is None:
        return store.redis.hget(store.keys.result(job_id), "0")  # the first image only, not the whole result
    if not urls:
        return None
    try:
        return read_blob(urls[0], **options_from_published(store.published_settings()))
    except BlobStoreError:
        return None


def gallery_entry(store: Store, job_id: str) -> dict[str, Any] | None:
    """A done job's first image (PNG bytes, or None when expired) with its generation settings: parsed from
    the image, else taken from the job's spec. None when the job is gone or unreadable. A finished job's
    result never changes, so callers may cache this by job id."""
    found, _ = load_jobs(store, [job_id])
    if not found:
        return None
    job, spec = found[0], found[0].spec
    png = first_image(store, job_id)
    parameters = image_parameters(png) if png else None
    settings = {
        "prompt": spec.prompt, "negative_prompt": spec.negative_prompt, "Model": spec.model,
        "Size": f"{spec.width}x{spec.height}", "Steps": str(spec.steps), "CFG scale": str(spec.guidance),
        "Seed": "" if spec.seed is None else str(spec.seed),
    }
    if parameters:
        settings.update(parameters)
    return {
        "id": job.id, "image": png or None, "settings": settings, "from_image": parameters is not None,
        "node": job.node or "", "profile": job.profile or "", "finished_at": job.finished_at,
        "images": job.images,
    }


def gallery(store: Store, count: int = GALLERY_SIZE) -> list[dict[str, Any]]:
    """The latest `count` done jobs' first images with their settings, newest first."""
    return [entry for job_id in latest_done(store, count) if (entry := gallery_entry(store, job_id))]


# --- actions -----------------------------------------------------------------------------------------


def _result(ok: bool, message: str) -> dict[str, Any]:
    return {"ok": ok, "message": message}


def cancel_job(store: Store, job_id: str) -> dict[str, Any]:
    """Cancel a queued, waiting, leased or running job (a waiting job's waiting children go with it)."""
    job_id = job_id.strip()
    if not job_id:
        return _result(False, "Enter a job id.")
    try:
        left = store.cancel(job_id)
    except JobNotFound:
        return _result(False, f"No job {job_id!r}.")
    except IllegalTransition as exc:
        return _result(
            False,
            f"Job {job_id} is {exc.current.value}: only queued, waiting, leased or running jobs can be cancelled.",
        )
    return _result(True, f"Cancelled job {job_id} (was {left.value}).")


def retry_job(store: Store, job_id: str) -> dict[str, Any]:
    """Put a failed job back in the queue, at its original place, as `renderfarm retry` does (Store.retry): to
    wait, when jobs it runs after are not done; the chain its failure ended comes back with it (waiting); refused
    while a job it waits for is failed or cancelled (retry that one)."""
    job_id = job_id.strip()
    if not job_id:
        return _result(False, "Enter a job id.")
    state = store.state(job_id)
    if state is None:
        return _result(False, f"No job {job_id!r}.")
    if state is not JobState.FAILED:
        return _result(False, f"Job {job_id} is {state.value}: only failed jobs can be retried.")
    try:
        store.retry(job_id)
    except ChainBlocked as exc:
        return _result(False, f"Job {job_id} not retried: {exc}.")
    except (IllegalTransition, JobNotFound):
        return _result(False, f"Job {job_id} changed state meanwhile; not retried.")
    except CorruptRecord as exc:
        return _result(False, f"Job {job_id} not retried: {exc}.")
    if store.state(job_id) is JobState.WAITING:
        return _result(True, f"Job {job_id} waits again for the jobs it runs after.")
    return _result(True, f"Job {job_id} is queued again.")


def drain_node(store: Store, name: str, draining: bool = True) -> dict[str, Any]:
    """Mark a node draining (it finishes what it holds and takes nothing new), or take it back."""
    if not store.set_draining(name, draining):
        return _result(False, f"No node {name!r}.")
    return _result(True, f"Node {name} is {'draining' if draining else 'taking jobs again'}.")
