"""A job as a Redis hash and back: every field a plain string or JSON, never a pickle; a record that does not
parse raises CorruptRecord naming it."""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import ValidationError

from renderfarm.errors import CorruptRecord
from renderfarm.jobs import Job, JobSpec, JobState


def queue_score(priority: int, created_at: float) -> float:
    """Higher priority first, then first come first served (ZRANGE ascending)."""
    return -priority * 1e10 + created_at


def finite_number(value: Any) -> float | None:
    """`value` (a field of a record written by others: trust nothing) as a finite float, or None. The metrics and
    the dashboard read node records and samples with it."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def text(value: Any) -> str:
    return "" if value is None else str(value)


def job_to_hash(job: Job) -> dict[str, str]:
    return {
        "id": job.id,
        "spec": job.spec.model_dump_json(),
        "state": job.state.value,
        "attempts": str(job.attempts),
        "node": text(job.node),
        "batch_id": text(job.batch_id),
        "created_at": repr(job.created_at),
        "updated_at": text(job.updated_at),
        "started_at": text(job.started_at),
        "finished_at": text(job.finished_at),
        "error": text(job.error),
        "timings": json.dumps(job.timings),
        "peak_memory_mb": text(job.peak_memory_mb),
        "images": str(job.images),
        "profile": text(job.profile),
        "escalations": json.dumps(job.escalations),
        "score": repr(queue_score(job.spec.priority, job.created_at)),
        "blocked_by": text(job.blocked_by),
        # The jobs it waits for (the submit script keeps those not done yet, and sets the state to waiting).
        **({"parents": json.dumps(list(job.spec.after))} if job.spec.after else {}),
    }


def job_from_hash(raw: dict[bytes, bytes]) -> Job:
    data = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
    try:
        return Job(
            id=data["id"],
            spec=JobSpec.model_validate_json(data["spec"]),
            state=JobState(data["state"]),
            attempts=int(data.get("attempts") or 0),
            node=data.get("node") or None,
            batch_id=data.get("batch_id") or None,
            created_at=float(data["created_at"]),
            updated_at=float(data["updated_at"]) if data.get("updated_at") else None,
            started_at=float(data["started_at"]) if data.get("started_at") else None,
            finished_at=float(data["finished_at"]) if data.get("finished_at") else None,
            error=data.get("error") or None,
            timings=json.loads(data.get("timings") or "{}"),
            peak_memory_mb=float(data["peak_memory_mb"]) if data.get("peak_memory_mb") else None,
            images=int(data.get("images") or 0),
            profile=data.get("profile") or None,
            escalations=json.loads(data.get("escalations") or "[]"),
            blocked_by=data.get("blocked_by") or None,
        )
    except (KeyError, ValueError, ValidationError, json.JSONDecodeError) as exc:
        raise CorruptRecord(f"job record {data.get('id', '?')!r} does not parse: {exc}") from None


def quarantine_reason(raw: bytes) -> str:
    """The reason in a quarantine entry (JSON {reason, at}); the raw text if it does not parse."""
    try:
        return str(json.loads(raw).get("reason"))
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")
