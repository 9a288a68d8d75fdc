"""What a delivery's body says (JSON only): a job's outcome, or a whole batch's.

    {"event": "job.done", "delivery": "<id>", "timestamp": <finish, unix s>,
     "job": {"id", "state", "error", "batch_id", "team", "model", "images", "tags", "attempts", "node",
             "finished_at", "results": [<each image's URL in the result store, as the job record has them>]}}

    {"event": "batch.finished", "delivery": "<id>", "timestamp": <unix s>,
     "batch": {"id", "team", "counts": {"done": n, "failed": n, "cancelled": n},
               "jobs": [{"id", "state", "error"}, ...]}}

The body is built once, when the delivery is created, and stored with it: every retry sends the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from renderfarm.jobs import Job, JobState

__all__ = ["BATCH_EVENT", "batch_body", "encode", "job_body", "job_event"]

BATCH_EVENT = "batch.finished"


def job_event(state: JobState) -> str:
    return f"job.{state.value}"


def job_body(job: Job, results: Sequence[str] | None, state: JobState, delivery: str, timestamp: float) -> dict[str, Any]:
    """The body of job `job`'s delivery for its move to `state` (the event's state: the record may have moved on)."""
    return {
        "event": job_event(state),
        "delivery": delivery,
        "timestamp": timestamp,
        "job": {
            "id": job.id,
            "state": state.value,
            "error": job.error,
            "batch_id": job.batch_id,
            "team": job.spec.team,
            "model": job.spec.model,
            "images": job.images,
            "tags": list(job.spec.tags),
            "attempts": job.attempts,
            "node": job.node,
            "finished_at": job.finished_at,
            "results": list(results or []),
        },
    }


def batch_body(batch_id: str, team: str, jobs: Sequence[Job], delivery: str, timestamp: float) -> dict[str, Any]:
    """The body of a batch's delivery: every job of the batch with its state and error."""
    rows = [{"id": job.id, "state": job.state.value, "error": job.error}
            for job in sorted(jobs, key=lambda j: (j.created_at, j.id))]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    return {"event": BATCH_EVENT, "delivery": delivery, "timestamp": timestamp,
            "batch": {"id": batch_id, "team": team, "counts": counts, "jobs": rows}}


def encode(body: dict[str, Any]) -> bytes:
    """The exact bytes sent (and signed): compact JSON, keys sorted, so that every retry sends the same."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
