"""GET /v1/events: the farm's job state changes as Server-Sent Events.

    curl -N -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:8000/v1/events?batch=BATCH"

Each change is one event `state` whose `id` is its entry in the farm's event stream and whose data is JSON
{job, state, node, ts, batch_id}. A client that reconnects with `Last-Event-ID` (browsers' EventSource do) or
`?after=ID` gets what it missed, as far as the capped stream still holds it. With `job=` (repeatable) or
`batch=`, the stream starts with each of those jobs' current state (events without an id) and ends once every
one of them is finished; without them it follows every job the token may see until the client goes. A team
token sees its own team's jobs only. A comment line every 15 s keeps idle proxies from closing the stream.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from renderfarm.api.app import Caller, caller
from renderfarm.client import JOB_ID_PATTERN

router = APIRouter(prefix="/v1", tags=["native"])
KEEPALIVE_S = 15.0
READ_BLOCK_S = 1.0
MAX_FOLLOWED = 10_000
KNOWN_JOBS = 50_000  # job -> (team, batch) remembered per stream, so each job's record is read once


def _frame(data: dict[str, Any], event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: state\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@router.get("/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "a stream of `state` events"}})
async def events(
    request: Request,
    who: Annotated[Caller, Depends(caller)],
    job: Annotated[list[str], Query(max_length=1000)] = [],  # noqa: B006 (FastAPI copies query defaults)
    batch: Annotated[str | None, Query(max_length=64)] = None,
    after: Annotated[str | None, Query(max_length=41, description="resume after this event id")] = None,
    last_event_id: Annotated[str | None, Header(max_length=41)] = None,
) -> StreamingResponse:
    """Job state changes as Server-Sent Events (see the module docstring)."""
    for value in [*job, *([batch] if batch else [])]:
        if not JOB_ID_PATTERN.fullmatch(value):
            raise HTTPException(422, f"job/batch: {value[:80]!r} is not a job or batch id")
    store = who.client.store
    try:
        cursor = store.events(after=after or last_event_id)
    except ValueError as exc:
        raise HTTPException(422, f"after / Last-Event-ID: {exc}") from None
    followed: set[str] | None = None
    opening: list[dict[str, Any]] = []
    batches: dict[str, str | None] = {}
    if job or batch:
        found = who.client.jobs(sorted(set(job))) if job else []  # 404 / 403 for an unknown or another team's job
        if batch:
            found += who.client.list_jobs(batch=batch, limit=MAX_FOLLOWED)
        if not found:
            raise HTTPException(404, f"no such batch: {batch} (or none of its jobs is this token's team's)")
        followed = {j.id for j in found if not j.state.terminal}
        batches = {j.id: j.batch_id for j in found}
        opening = [{"job": j.id, "state": j.state.value, "node": j.node or "", "ts": j.updated_at or j.created_at,
                    "batch_id": j.batch_id} for j in found]
    known: OrderedDict[str, tuple[str, str | None]] = OrderedDict()

    def describe(job_ids: list[str]) -> None:
        missing = [j for j in dict.fromkeys(job_ids) if j not in known]
        for job_id, record in zip(missing, store.get_many(missing) if missing else []):
            known[job_id] = (record.spec.team, record.batch_id) if record is not None else ("", None)
        while len(known) > KNOWN_JOBS:
            known.popitem(last=False)

    async def stream() -> AsyncIterator[bytes]:
        for data in opening:
            yield _frame(data)
        if followed is not None and not followed:
            return
        quiet_since = time.monotonic()
        while not await request.is_disconnected():
            read = await anyio.to_thread.run_sync(cursor.read, READ_BLOCK_S)
            if followed is None:
                await anyio.to_thread.run_sync(describe, [e.job for e in read])
            sent = False
            for event in read:
                if event.state is None:
                    continue
                if followed is not None:
                    if event.job not in followed:
                        continue
                    batch_id = batches.get(event.job)
                else:
                    team, batch_id = known.get(event.job, ("", None))
                    if not who.access.may_touch(team):
                        continue
                yield _frame({"job": event.job, "state": event.state.value, "node": event.node, "ts": event.ts,
                              "batch_id": batch_id}, event.id)
                sent = True
                if followed is not None and event.state.terminal:
                    followed.discard(event.job)
                    if not followed:
                        return
            if sent:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield b": keep-alive\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
