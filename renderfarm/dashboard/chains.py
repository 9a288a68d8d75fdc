"""What the dashboard's chains view reads from Redis: the jobs that wait for others, the jobs a parent ended, and
one job's chain (renderfarm/chains.py builds chains at submit, cluster/store/chains.py settles them).

Bounded like the rest of the page (queries.py): the waiting jobs are the first `limit` of the `waiting` index
(scored as in the queue: higher priority first, then the oldest) with ZCARD for the count of all; the jobs a
parent ended are looked for among the latest `scan` failed and cancelled jobs only (one pipelined HGET of
`blocked_by` each); a job's children are read `limit` at a time from its children set (SSCAN), counted with
SCARD. Jobs are read many at once through `queries.load_jobs` (one pipeline, JSON fields, never a pickle), the
other records' fields with one pipelined HMGET; a record that does not read is shown as such, never allowed to
break the page.

No streamlit here: plain dicts and lists.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from renderfarm.chains import BASE_SUFFIX, parse_init_from
from renderfarm.cluster.store import Store
from renderfarm.cluster.store.codec import finite_number
from renderfarm.dashboard.queries import load_jobs
from renderfarm.jobs import Job, JobState

WAITING_LIMIT = 50  # waiting jobs shown (the head of the waiting index)
BLOCKED_LIMIT = 20  # jobs a parent ended, shown
BLOCKED_SCAN = 200  # latest failed and cancelled jobs looked through for them (each)
CHILDREN_LIMIT = 50  # children shown of a selected job
SSCAN_COUNT = 100


def _text(raw: Any) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else ""


def chain_kind(job: Job) -> str:
    """How a job joins its chain: "hires pass" (the second pass of a hires fix, on `<id>-base`), "img2img from
    P" / "img2img from P:i" (init_from), or "after" (waits only)."""
    spec = job.spec
    if spec.init_from is None:
        return "after" if spec.after else ""
    parent, index = parse_init_from(spec.init_from)
    if parent == job.id + BASE_SUFFIX:
        return "hires pass"
    return f"img2img from {parent}" + ("" if index is None else f":{index}")


def waits_text(parents: list[tuple[str, str]]) -> str:
    """"a (queued), b (running)"; "its parents are done: being queued" when none is left (the store settles it
    in the move that finished the last, or the scheduler's reconciling does)."""
    if not parents:
        return "its parents are done: being queued"
    return ", ".join(f"{parent} ({state})" for parent, state in parents)


def waiting(store: Store, limit: int = WAITING_LIMIT, now: float | None = None) -> dict[str, Any]:
    """The first `limit` waiting jobs (as the index orders them: higher priority first, then the oldest), each
    with what it waits for. Returns {"rows", "total" (every waiting job), "skipped" (unreadable records)}."""
    now = time.time() if now is None else now
    total = int(store.redis.zcard(store.keys.index(JobState.WAITING)))
    ids = store.ids_in(JobState.WAITING, limit=limit) if total else []
    found, skipped = load_jobs(store, ids)
    found = [job for job in found if job.state is JobState.WAITING]  # moved on between the two reads: not shown
    waits = store.waits_for(found)
    rows = []
    for job in found:
        spec = job.spec
        parents = waits.get(job.id, [])
        rows.append({
            "id": job.id, "batch": job.batch_id or "", "team": spec.team, "model": spec.model,
            "size": f"{spec.width}x{spec.height}", "priority": spec.priority, "kind": chain_kind(job),
            "after": list(spec.after), "waits_for": [{"id": p, "state": s} for p, s in parents],
            "waits_text": waits_text(parents), "created_at": job.created_at, "age_s": max(0.0, now - job.created_at),
        })
    return {"rows": rows, "total": total, "skipped": skipped}


def blocked(store: Store, limit: int = BLOCKED_LIMIT, scan: int = BLOCKED_SCAN) -> list[dict[str, Any]]:
    """The latest jobs a parent ended (failed or cancelled with it: their `blocked_by`), newest first, among
    the latest `scan` failed and the latest `scan` cancelled jobs, with the reason."""
    scored: list[tuple[float, str]] = []
    for state in (JobState.FAILED, JobState.CANCELLED):
        scored += [(score, m.decode()) for m, score in
                   store.redis.zrevrange(store.keys.index(state), 0, scan - 1, withscores=True)]
    if not scored:
        return []
    scored.sort(key=lambda pair: pair[0], reverse=True)
    pipe = store.redis.pipeline(transaction=False)
    for _, job_id in scored:
        pipe.hget(store.keys.job(job_id), "blocked_by")
    ids = [job_id for (_, job_id), by in zip(scored, pipe.execute(raise_on_error=False)) if _text(by)][:limit]
    found, _ = load_jobs(store, ids)
    return [{
        "id": job.id, "state": job.state.value, "blocked_by": job.blocked_by or "", "batch": job.batch_id or "",
        "team": job.spec.team, "model": job.spec.model, "finished_at": job.finished_at,
        "reason": job.error or "(no reason recorded)",
    } for job in found if job.blocked_by and job.state in (JobState.FAILED, JobState.CANCELLED)]


def _records(store: Store, ids: list[str]) -> dict[str, dict[str, Any]]:
    """State, blocked_by, team and finished_at of each of `ids`, from one pipelined HMGET: "missing" for a job
    without a record, "unreadable" for a key that is not a job's hash."""
    pipe = store.redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(store.keys.job(job_id), "state", "blocked_by", "finished_at")
    out = {}
    for job_id, got in zip(ids, pipe.execute(raise_on_error=False) if ids else []):
        if isinstance(got, redis.ResponseError) or not isinstance(got, list):
            out[job_id] = {"id": job_id, "state": "unreadable", "blocked_by": "", "finished_at": None}
            continue
        state, by, finished = (_text(v) for v in got)
        out[job_id] = {"id": job_id, "state": state or "missing", "blocked_by": by,
                       "finished_at": finite_number(finished) if finished else None}
    return out


def children(store: Store, job_id: str, limit: int = CHILDREN_LIMIT) -> tuple[list[str], int]:
    """Up to `limit` of the jobs that waited for `job_id` (its children set: jobs submitted while it was not
    done; sorted), and how many there are."""
    key = store.keys.children(job_id)
    try:
        total = int(store.redis.scard(key))
    except redis.ResponseError:  # WRONGTYPE: the key holds something else than a set
        return [], 0
    found: set[str] = set()
    cursor = 0
    while total:
        cursor, members = store.redis.sscan(key, cursor, count=SSCAN_COUNT)
        found.update(m.decode(errors="replace") for m in members)
        if cursor == 0 or len(found) >= limit:
            break
    return sorted(found)[:limit], total


def chain(store: Store, job_id: str, limit: int = CHILDREN_LIMIT, now: float | None = None) -> dict[str, Any] | None:
    """One job and its chain: the job (state, batch, what it is, why it ended), its parents (`after`, each with
    its state), and its children (the jobs that waited for it, each with its state and whether this job ended
    it). None when there is no such job or its record does not read."""
    now = time.time() if now is None else now
    job_id = job_id.strip()
    if not job_id:
        return None
    found, _ = load_jobs(store, [job_id])
    if not found:
        return None
    job = found[0]
    spec = job.spec
    kids, total = children(store, job.id, limit)
    records = _records(store, [*spec.after, *kids])
    parents = [records[p] for p in spec.after]
    return {
        "job": {
            "id": job.id, "state": job.state.value, "batch": job.batch_id or "", "team": spec.team,
            "model": spec.model, "size": f"{spec.width}x{spec.height}", "kind": chain_kind(job),
            "init_from": spec.init_from or "", "node": job.node or "", "attempts": job.attempts,
            "age_s": max(0.0, now - job.created_at), "finished_at": job.finished_at,
            "blocked_by": job.blocked_by or "", "error": job.error or "",
        },
        "parents": parents,
        "waits_on": [p for p in parents if p["state"] != JobState.DONE.value],
        "children": [{**records[k], "ended_by_it": records[k]["blocked_by"] == job.id} for k in kids],
        "children_total": total,
    }
