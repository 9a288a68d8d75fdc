"""FarmClient: submit jobs, wait for them, fetch their images. Talks to Redis only (never Ray).

    client = FarmClient("redis://127.0.0.1:6379/0")
    ids = client.submit_batch([{"model": "tiny-sd15", "prompt": "a red fox", "width": 64, "height": 64}])
    for job in client.as_completed(ids, timeout=120):
        images = client.result(job.id).images
"""

from __future__ import annotations

import io
import random
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from renderfarm.cluster.keys import Keys
from renderfarm.cluster.redis_server import connect, redact
from renderfarm.cluster.store import JobNotFound, Store
from renderfarm.jobs import (
    SEED_MAX,
    IllegalTransition,
    Job,
    JobSpec,
    JobState,
    describe_validation_error,
    new_job_id,
)
from renderfarm.planning.catalog import Catalog, UnknownModelError, default_catalog

MAX_BATCH_JOBS = 10_000
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


class SpecError(ValueError):
    """One or more job specs are invalid; nothing was enqueued. The message names each field."""


@dataclass
class Result:
    job: Job
    images: list[Any]  # PIL.Image.Image, each carrying its "parameters" text chunk
    png: list[bytes]

    @property
    def parameters(self) -> list[str]:
        return [img.info.get("parameters", "") for img in self.images]


class FarmClient:
    def __init__(self, url: str, *, catalog: Catalog | None = None, key_prefix: str = "rf"):
        self.url = url
        self.store = Store(connect(url), Keys(key_prefix))
        self.catalog = catalog or default_catalog()

    # --- submit ---------------------------------------------------------------------------------------

    def validate(self, spec: JobSpec | dict[str, Any], where: str = "spec") -> JobSpec:
        """Check one spec against the catalog. Omitted size, steps and guidance take the model's defaults
        (flux-dev: 1024 px, 28 steps, 3.5); a random seed is drawn (and recorded) when none is given."""
        if isinstance(spec, dict) and isinstance(spec.get("model"), str) and spec["model"] in self.catalog:
            entry = self.catalog.get(spec["model"])
            spec = {"width": entry.default_size, "height": entry.default_size, "steps": entry.default_steps,
                    "guidance": entry.default_guidance, **spec}
        try:
            valid = JobSpec.validate_for(spec, self.catalog)
        except ValidationError as exc:
            raise SpecError(f"{where}: {describe_validation_error(exc)}") from None
        except UnknownModelError as exc:
            raise SpecError(f"{where}: model: {exc}") from None
        except TypeError as exc:  # not a mapping at all
            raise SpecError(f"{where}: expected a mapping of job fields, got {type(spec).__name__}") from exc
        if valid.seed is None:
            valid = valid.model_copy(update={"seed": random.randint(0, SEED_MAX)})
        return valid

    def submit(self, spec: JobSpec | dict[str, Any], job_id: str | None = None) -> str:
        return self.submit_batch([spec], job_ids=[job_id] if job_id else None)[0]

    def submit_batch(
        self,
        specs: Sequence[JobSpec | dict[str, Any]],
        *,
        job_ids: Sequence[str] | None = None,
        batch_id: str | None = None,
    ) -> list[str]:
        """Validate every spec, then enqueue all of them in one transaction, or none.

        Passing the same `job_ids` again is a no-op for the jobs that already exist (safe retries).
        """
        if isinstance(specs, (dict, JobSpec)):
            raise SpecError("submit_batch takes a list of specs; use submit() for one")
        if not specs:
            raise SpecError("the batch is empty")
        if len(specs) > MAX_BATCH_JOBS:
            raise SpecError(f"the batch has {len(specs)} jobs; at most {MAX_BATCH_JOBS} per call")
        if job_ids is not None:
            if len(job_ids) != len(specs):
                raise SpecError(f"job_ids has {len(job_ids)} ids for {len(specs)} specs")
            if len(set(job_ids)) != len(job_ids):
                raise SpecError("job_ids contains duplicates")
            for i, job_id in enumerate(job_ids):
                if not isinstance(job_id, str) or not JOB_ID_PATTERN.fullmatch(job_id):
                    raise SpecError(f"job_ids[{i}]: {job_id!r} must be 1..64 letters, digits, '-' or '_'")
        errors, valid = [], []
        for i, spec in enumerate(specs):
            try:
                valid.append(self.validate(spec, where=f"jobs[{i}]"))
            except SpecError as exc:
                errors.append(str(exc))
        if not errors:
            errors = self._fits_nowhere(valid)
        if errors:
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise SpecError("; ".join(errors[:5]) + more + "; nothing was enqueued")
        ids = list(job_ids) if job_ids else [new_job_id() for _ in specs]
        now = time.time()
        jobs = [Job(id=job_id, spec=spec, created_at=now) for job_id, spec in zip(ids, valid)]
        self.store.submit(jobs, batch_id or new_job_id())
        return ids

    def _fits_nowhere(self, specs: Sequence[JobSpec]) -> list[str]:
        """One error per spec that no registered node can run in any profile (the planner's reason).
        With no node registered yet, nothing can be judged and everything is accepted."""
        from renderfarm.planning.devices import device_from_record
        from renderfarm.scheduler.placement import JobShape, NodeView, why_nothing_fits

        nodes = [
            NodeView(n["name"], device) for n in self.store.nodes() if (device := device_from_record(n)) is not None
        ]
        if not nodes:
            return []
        measured, _ = self.store.measurements()  # what nodes measured raises the estimates, never lowers them
        errors = []
        for i, spec in enumerate(specs):
            if not self.catalog.get(spec.model).components:
                continue  # a model without component data cannot be planned: let the node try
            shape = JobShape(spec.model, spec.width, spec.height, spec.steps, spec.num_images)
            reason = why_nothing_fits(shape, nodes, self.catalog, measured)
            if reason:
                errors.append(f"jobs[{i}]: {reason}")
        return errors

    # --- follow -------------------------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def jobs(self, job_ids: Iterable[str]) -> list[Job]:
        ids = list(job_ids)
        found = self.store.get_many(ids)
        missing = [i for i, job in zip(ids, found) if job is None]
        if missing:
            raise JobNotFound(missing[0])
        return [job for job in found if job is not None]

    def as_completed(
        self, job_ids: Iterable[str], timeout: float | None = None, poll: float = 0.2
    ) -> Iterator[Job]:
        """Yield each job once it reaches done, failed or cancelled, in the order they finish.

        Follows the farm's event stream (XREAD), so a result arrives within milliseconds of its write.
        """
        remaining = set(job_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        redis, stream = self.store.redis, self.store.keys.events
        last = redis.xrevrange(stream, count=1)
        cursor = last[0][0] if last else b"0-0"
        for job in self.jobs(sorted(remaining)):
            if job.state.terminal:
                remaining.discard(job.id)
                yield job
        while remaining:
            wait = poll if deadline is None else min(poll, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError(f"{len(remaining)} of the jobs did not finish within {timeout} s")
            entries = redis.xread({stream: cursor}, count=1000, block=max(1, int(wait * 1000)))
            finished = set()
            for _, messages in entries or []:
                for message_id, fields in messages:
                    cursor = message_id
                    job_id = fields.get(b"job", b"").decode()
                    if job_id in remaining and JobState(fields[b"state"].decode()).terminal:
                        finished.add(job_id)
            for job_id in sorted(finished):
                job = self.job(job_id)
                if job.state.terminal:  # a failed job may already be back in the queue by an operator
                    remaining.discard(job_id)
                    yield job

    def wait(self, job_ids: Iterable[str], timeout: float | None = None) -> list[Job]:
        """Block until every job is finished; returns them in the order given."""
        ids = list(job_ids)
        finished = {job.id: job for job in self.as_completed(ids, timeout=timeout)}
        return [finished[i] for i in ids]

    def result(self, job_id: str) -> Result:
        from PIL import Image

        job = self.job(job_id)
        if job.state is not JobState.DONE:
            raise ValueError(f"job {job_id} is {job.state.value}, not done" + (f": {job.error}" if job.error else ""))
        png = self.store.result_images(job_id)
        if not png and job.images:
            raise ValueError(f"job {job_id}: its images have expired (result TTL)")
        images = []
        for data in png:
            image = Image.open(io.BytesIO(data))
            image.load()
            images.append(image)
        return Result(job=job, images=images, png=png)

    # --- control and overview -------------------------------------------------------------------------

    def cancel(self, job_ids: Iterable[str]) -> dict[str, str]:
        """Cancel each job; returns per id the state it left, or why it could not be cancelled."""
        out = {}
        for job_id in job_ids:
            try:
                out[job_id] = f"cancelled (was {self.store.cancel(job_id).value})"
            except IllegalTransition as exc:
                out[job_id] = f"not cancelled: already {exc.current.value}"
            except JobNotFound:
                out[job_id] = "not cancelled: no such job"
        return out

    def position(self, job_id: str) -> int | None:
        """0-based place of a queued job in the order the farm will run it; None when not queued."""
        return self.estimates([job_id]).get(job_id, {}).get("position")

    def estimates(self, job_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """For each queued job of `job_ids`: `position` (0-based, in the fair order the scheduler plans
        with), `node` (the node it waits for), `start_in_s` and `eta_s` (seconds from now until its batch
        is expected to start and finish), `as_of` (when the scheduler planned it). A job the scheduler has not
        planned yet (beyond its window, or just submitted) gets its place in the priority queue with
        `approximate: true`; one no live node can take now gets `waiting` with the reason."""
        ids = list(job_ids)
        now = time.time()
        published = self.store.etas(ids)
        out: dict[str, dict[str, Any]] = {}
        for job_id in ids:
            if self.store.state(job_id) is not JobState.QUEUED:
                continue
            eta = published.get(job_id)
            if eta is None:
                out[job_id] = {"position": self.store.position(job_id), "approximate": True}
                continue
            row: dict[str, Any] = {"position": eta.get("position"), "node": eta.get("node"), "as_of": eta.get("as_of")}
            if isinstance(eta.get("finish"), (int, float)):
                row["start_in_s"] = round(max(0.0, eta.get("start", now) - now), 2)
                row["eta_s"] = round(max(0.0, eta["finish"] - now), 2)
            if eta.get("waiting"):
                row["waiting"] = eta["waiting"]
            out[job_id] = row
        return out

    def status(self) -> dict[str, Any]:
        return {"redis": redact(self.url), "counts": self.store.counts(), "nodes": self.store.nodes()}
