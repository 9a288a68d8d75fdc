"""FarmClient: submit jobs, wait for them, fetch their images. Talks to Redis only (never Ray).

    client = FarmClient("redis://127.0.0.1:6379/0")
    ids = client.submit_batch([{"model": "tiny-sd15", "prompt": "a red fox", "width": 64, "height": 64}])
    for job in client.as_completed(ids, timeout=120):
        images = client.result(job.id).images

On a farm in token mode (cluster/auth.py) the client speaks for the team of its token (`token=`, else the
RENDERFARM_TOKEN environment variable) and reads, follows and cancels that team's jobs only; without a valid
token it refuses every read and write of jobs (AuthError, a PermissionError).
"""

from __future__ import annotations

import io
import os
import random
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from renderfarm.chains import plan_chains
from renderfarm.cluster import auth
from renderfarm.cluster.blobs import BlobStoreError, options_from_published, store_for
from renderfarm.cluster.keys import Keys
from renderfarm.cluster.redis_settings import RedisSettings
from renderfarm.cluster.store import ChainBlocked, Store
from renderfarm.errors import (
    AuthError,
    CorruptRecord,
    JobNotFound,
    NoFarm,
    ResultUnavailable,
    SpecError,
    SpecFileError,
    WaitTimeout,
    shown,
)
from renderfarm.farm_view import FarmView, fits_nowhere, unrenderable
from renderfarm.inputs import InputStore, SubmitInputs, image_bytes
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
from renderfarm.specfile import read_spec_file
from renderfarm.webhook_urls import webhook_refusal

MAX_BATCH_JOBS = 10_000
LIST_SCAN_MAX = 100_000  # `list_jobs` reads at most this many records per state index
LIST_PAGE = 500
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class Result:
    job: Job
    images: list[Any]  # PIL.Image.Image, each carrying its "parameters" text chunk
    png: list[bytes]

    @property
    def parameters(self) -> list[str]:
        return [img.info.get("parameters", "") for img in self.images]


class FarmClient:
    def __init__(
        self, redis: str | RedisSettings, *, catalog: Catalog | None = None, key_prefix: str = "rf",
        token: str | None = None, blob_options: dict[str, Any] | None = None,
    ):
        """`redis`: the farm's Redis, as a URL or RedisSettings (connected and checked here). `blob_options`:
        how to reach the result store (cluster/blobs: endpoint_url, region, credentials); None: the endpoint and
        region the farm published, credentials from this process's AWS_* environment."""
        self.redis_settings = RedisSettings.from_url(redis)
        self.store = Store(self.redis_settings.client(), Keys(key_prefix))
        self.catalog = catalog or default_catalog()
        # The team token (cluster/auth.py); checked on every call, so a revoked token stops working at once.
        self._token = token if token is not None else (os.environ.get("RENDERFARM_TOKEN") or None)
        self._blob_options = blob_options
        self._inputs: InputStore | None = None
        self._granted: auth.Access | None = None  # set by with_access: checked once for a server's request

    # --- submit ---------------------------------------------------------------------------------------

    def validate(self, spec: JobSpec | dict[str, Any], where: str = "spec", farm: FarmView | None = None) -> JobSpec:
        """Check one spec against the catalog and against what the farm's nodes hold (each LoRA pinned to a copy's
        sha256, the model to the copy most nodes hold: loras/assets.py; `farm`: one read for many specs). Omitted
        size, steps and guidance take the model's defaults (flux-dev: 1024 px, 28 steps, 3.5); a random seed is
        drawn (and recorded) when none is given. Raises SpecError, naming `where` and each bad field, and
        nothing else for any input."""
        from collections.abc import Mapping

        if isinstance(spec, Mapping) and not isinstance(spec, dict):
            spec = dict(spec)
        if not isinstance(spec, (dict, JobSpec)):
            raise SpecError(f"{where}: expected a mapping of job fields, got {type(spec).__name__}")
        if isinstance(spec, dict) and isinstance(spec.get("model"), str) and spec["model"] in self.catalog:
            entry = self.catalog.get(spec["model"])
            spec = {"width": entry.default_size, "height": entry.default_size, "steps": entry.default_steps,
                    "guidance": entry.default_guidance, **spec}
        farm = farm if farm is not None else FarmView(self.store)
        try:
            valid = JobSpec.validate_for(spec, self.catalog, farm, webhooks=farm)
        except ValidationError as exc:
            raise SpecError(f"{where}: {describe_validation_error(exc)}") from None
        except UnknownModelError as exc:
            raise SpecError(f"{where}: model: {exc}") from None
        except TypeError as exc:  # not a mapping at all
            raise SpecError(f"{where}: expected a mapping of job fields, got {type(spec).__name__}") from exc
        if valid.seed is None:
            valid = valid.model_copy(update={"seed": random.randint(0, SEED_MAX)})
        try:  # the copy of the model it renders with: the one most nodes hold, or the one it names
            pinned = farm.model_copies().pin(valid.model, valid.model_fingerprint)
        except ValueError as exc:
            raise SpecError(f"{where}: model_fingerprint: {exc}") from None
        if pinned != valid.model_fingerprint:
            valid = valid.model_copy(update={"model_fingerprint": pinned})
        return valid

    def submit(self, spec: JobSpec | dict[str, Any], job_id: str | None = None) -> str:
        return self.submit_batch([spec], job_ids=[job_id] if job_id else None)[0]

    def submit_file(self, path: str | Path, *, batch_id: str | None = None, webhook: str | None = None) -> list[str]:
        """Submit every spec of a job spec file (a JSON list, or JSON Lines: renderfarm/specfile.py) as one
        batch (`webhook`: see `submit_batch`). Every spec is checked first; any problem raises SpecFileError
        naming the path and the spec (`jobs[3] (line 5): width: ...`), and then nothing was enqueued."""
        entries = read_spec_file(path)
        if not entries:
            raise SpecFileError(f"{path}: the file holds no job specs")
        if len(entries) > MAX_BATCH_JOBS:
            raise SpecFileError(f"{path}: {len(entries)} job specs; at most {MAX_BATCH_JOBS} per batch")
        errors, valid = [], []
        for where, item in entries:
            try:
                valid.append(self.validate(item, where=where))
            except SpecError as exc:
                errors.append(str(exc))
        if errors:
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise SpecFileError(f"{path}: " + "; ".join(errors[:5]) + more + "; nothing was enqueued")
        try:
            return self.submit_batch(valid, batch_id=batch_id, webhook=webhook)
        except SpecError as exc:  # e.g. no registered node can run one of them
            raise SpecFileError(f"{path}: {exc}") from None

    def submit_batch(
        self,
        specs: Sequence[JobSpec | dict[str, Any]],
        *,
        job_ids: Sequence[str] | None = None,
        batch_id: str | None = None,
        webhook: str | None = None,
    ) -> list[str]:
        """Validate every spec, then enqueue all of them in one transaction, or none.

        Passing the same `job_ids` again is a no-op for the jobs that already exist (safe retries).
        `webhook`: a URL the farm POSTs to once every job of the batch is done, failed or cancelled (all of one
        team: it signs with that team's secret); a spec's own `webhook` is called when that job finishes.
        A spec's `init_image` / `mask` may be an uploaded image's reference ("sha256:<hex>", `upload`) or the image
        itself (bytes, a pathlib.Path, a PIL image): each is checked first (renderfarm/inputs.py: format, size,
        the job's size unless `resize_mode` fits it, a mask of its init image's size), then uploaded once per
        batch, just before the jobs are enqueued.
        Any bad input raises SpecError (and only SpecError); then nothing was enqueued.
        """
        from collections.abc import Mapping

        def id_problem(name: str, value: Any) -> str | None:
            if not isinstance(value, str):
                return f"{name}: expected a string, got {type(value).__name__}"
            if not JOB_ID_PATTERN.fullmatch(value):
                return f"{name}: {shown(value)} must be 1..64 letters, digits, '-' or '_'"
            return None

        if isinstance(specs, (Mapping, JobSpec)):
            raise SpecError("submit_batch takes a list of specs; use submit() for one")
        if isinstance(specs, (str, bytes, bytearray)) or not isinstance(specs, Sequence):
            raise SpecError(f"submit_batch takes a list of specs, got {type(specs).__name__}")
        if not specs:
            raise SpecError("the batch is empty")
        if len(specs) > MAX_BATCH_JOBS:
            raise SpecError(f"the batch has {len(specs)} jobs; at most {MAX_BATCH_JOBS} per call")
        if job_ids is not None:
            if isinstance(job_ids, (str, bytes, bytearray)) or not isinstance(job_ids, Sequence):
                raise SpecError(f"job_ids: expected a list of strings, got {type(job_ids).__name__}")
            if len(job_ids) != len(specs):
                raise SpecError(f"job_ids has {len(job_ids)} ids for {len(specs)} specs")
            for i, job_id in enumerate(job_ids):
                if problem := id_problem(f"job_ids[{i}]", job_id):
                    raise SpecError(problem)
            if len(set(job_ids)) != len(job_ids):
                raise SpecError("job_ids contains duplicates")
        if batch_id is not None and (problem := id_problem("batch_id", batch_id)):
            raise SpecError(problem)
        farm = FarmView(self.store)  # the nodes' records read once for the batch, their LoRAs only if a spec has some
        if webhook is not None and (problem := webhook_refusal(webhook, farm)):
            raise SpecError(f"webhook: {problem}; nothing was enqueued")
        errors, valid = [], []
        inputs = SubmitInputs(self.inputs)  # image inputs: checked now, uploaded once everything is valid
        for i, spec in enumerate(specs):
            try:
                valid.append(self.validate(inputs.take(spec, f"jobs[{i}]"), where=f"jobs[{i}]", farm=farm))
            except SpecError as exc:
                errors.append(str(exc))
        given = list(job_ids) if job_ids else [new_job_id() for _ in specs]
        ids = given
        if not errors and not (errors := inputs.check(valid)):
            try:  # chains: "#N" resolved, hires fixes built (two jobs each), parents checked (renderfarm/chains.py)
                valid, ids = plan_chains(
                    valid, given, validate=lambda data, where: self.validate(data, where, farm), read=self.store.get_many,
                    may_touch=lambda team: self.access().may_touch(team), family=lambda m: self.catalog.get(m).family)
            except SpecError as exc:
                errors = [str(exc).removesuffix("; nothing was enqueued")]
        if not errors:
            errors = (unrenderable(self.catalog, valid, farm.records())
                      or fits_nowhere(self.store, self.catalog, valid, farm.records()))
        if errors:
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise SpecError("; ".join(errors[:5]) + more + "; nothing was enqueued")
        valid = self._for_my_team(valid)  # token mode: the token's team, or SpecError naming `team`
        now = time.time()
        jobs = [Job(id=job_id, spec=spec, created_at=now) for job_id, spec in zip(ids, valid)]
        if webhook is not None and len(teams := sorted({spec.team for spec in valid})) > 1:
            raise SpecError(f"webhook: a batch webhook needs every job of one team (signed with its secret), not "
                            f"{', '.join(teams)}; nothing was enqueued")
        hook = None if webhook is None else {"url": webhook, "team": valid[0].team}
        # Content-addressed, so an upload whose submit then fails harms nothing: it is kept until it expires.
        inputs.upload()
        self.store.submit(jobs, batch_id or new_job_id(), webhook=hook)
        return given  # a hires fix's id is its second pass, the job whose images were asked for

    def inputs(self) -> InputStore:
        """The farm's image inputs (renderfarm/inputs.py): where they are uploaded, how long they are kept, the caps,
        as the head published them; opened once per client."""
        if self._inputs is None:
            self._inputs = InputStore.for_farm(self.store, self._blob_options)
        return self._inputs

    def upload(self, image: Any, what: str = "init_image") -> str:
        """Upload an image input (bytes, a pathlib.Path or a PIL image) as `what` ("init_image" or "mask"), once:
        its reference ("sha256:<hex>") for a spec's `init_image` or `mask`. InvalidImage naming `what` and why."""
        inputs = self.inputs()
        return inputs.put(image_bytes(image, what, max_bytes=inputs.max_bytes), what)[0]

    def _for_my_team(self, specs: list[JobSpec]) -> list[JobSpec]:
        """In token mode a team token submits for its own team: a spec that leaves `team` at its default gets
        the token's team, one naming another team is an error (nothing is enqueued). Open farm, admin: as is."""
        granted = self.access()
        if granted.team is None:
            return specs
        default = JobSpec.model_fields["team"].default
        errors, out = [], []
        for i, spec in enumerate(specs):
            if spec.team not in (default, granted.team):
                errors.append(f"jobs[{i}]: team: {spec.team!r} is not this token's team ({granted.team!r})")
            out.append(spec if spec.team == granted.team else spec.model_copy(update={"team": granted.team}))
        if errors:
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise SpecError("; ".join(errors[:5]) + more + "; nothing was enqueued")
        return out

    # --- access (cluster/auth.py) --------------------------------------------------------------------

    def for_token(self, token: str | None) -> FarmClient:
        """This client speaking for another team token (None or "": none), sharing its Redis connection pool and
        catalog: what a server answering many callers makes per request (renderfarm/api)."""
        import copy

        other = copy.copy(self)
        other._token, other._granted = token or None, None
        return other

    def with_access(self, granted: auth.Access) -> FarmClient:
        """This client with its token's access already checked (`access`): what a server makes for one request,
        whose calls then use it instead of reading the token's record again (a Redis round trip a call)."""
        import copy

        other = copy.copy(self)
        other._granted = granted
        return other

    def access(self) -> auth.Access:
        """What this client's token may touch: every team on an open farm or with an admin token, else its
        own team. Raises AuthError in token mode when the client has no valid token. Read at every call (a
        revoked token stops working at once), unless the client was made `with_access` for one request."""
        if self._granted is not None:
            return self._granted
        return auth.access(self.store.redis, self.store.keys, self._token)

    def require_admin(self, action: str) -> None:
        """Nothing on an open farm; in token mode, AuthError unless this client holds an admin token."""
        auth.require_admin(self.store.redis, self.store.keys, self._token, action)

    @staticmethod
    def _mine(job: Job, granted: auth.Access) -> Job:
        if not granted.may_touch(job.spec.team):
            raise AuthError(f"job {job.id} belongs to team {job.spec.team!r}; this token is for team {granted.team!r}")
        return job

    # --- follow -------------------------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        granted = self.access()
        return self._mine(self.store.get(job_id), granted)

    def jobs(self, job_ids: Iterable[str]) -> list[Job]:
        ids = list(job_ids)
        granted = self.access()
        found = self.store.get_many(ids)
        missing = [i for i, job in zip(ids, found) if job is None]
        if missing:
            if (why := self.store.quarantine_reason(missing[0])) is not None:
                raise CorruptRecord(f"job {missing[0]} is quarantined: {why}")
            raise JobNotFound(missing[0])
        return [self._mine(job, granted) for job in found if job is not None]

    def as_completed(
        self, job_ids: Iterable[str], timeout: float | None = None, poll: float = 0.2
    ) -> Iterator[Job]:
        """Yield each job once it reaches done, failed or cancelled, in the order they finish.

        Follows the farm's event stream (XREAD), so a result arrives within milliseconds of its write.
        """
        remaining = set(job_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        granted = self.access()
        # From now, and only moves to a terminal state: what finished before is read from the records below.
        events = self.store.events(finished_only=True)
        for job in self.jobs(sorted(remaining)):
            if job.state.terminal:
                remaining.discard(job.id)
                yield job
        while remaining:
            wait = poll if deadline is None else min(poll, deadline - time.monotonic())
            if wait <= 0:
                raise WaitTimeout(f"{len(remaining)} of the jobs did not finish within {timeout} s")
            finished = sorted({e.job for e in events.read(wait) if e.job in remaining and e.state and e.state.terminal})
            for job_id, job in zip(finished, self.store.get_many(finished)):  # all that finished: one request
                if job is None:
                    raise JobNotFound(job_id)
                job = self._mine(job, granted)
                if job.state.terminal:  # a failed job may already be back in the queue by an operator
                    remaining.discard(job.id)
                    yield job

    def wait(self, job_ids: Iterable[str], timeout: float | None = None) -> list[Job]:
        """Block until every job is finished; returns them in the order given."""
        ids = list(job_ids)
        finished = {job.id: job for job in self.as_completed(ids, timeout=timeout)}
        return [finished[i] for i in ids]

    def result(self, job_id: str) -> Result:
        from PIL import Image

        job, urls = self._done(job_id)
        if urls is None:  # finished before results moved to the blob store: its images are in Redis
            png = self.store.result_images(job_id)
        else:
            try:
                png = [self._blobs(url).get(url) for url in urls]
            except BlobStoreError as exc:
                if exc.kind != "missing":
                    raise  # unreachable, denied: said as it is, the images may well still be there
                raise ResultUnavailable(f"job {job_id}: its images have expired (a result is kept "
                                        f"result_ttl_seconds after its job finishes): {exc}") from exc
        if not png and job.images:
            raise ResultUnavailable(f"job {job_id}: its images have expired (a result is kept result_ttl_seconds "
                             "after its job finishes)")
        images = []
        for data in png:
            image = Image.open(io.BytesIO(data))
            image.load()
            images.append(image)
        return Result(job=job, images=images, png=png)

    def result_urls(self, job_id: str, expires_s: int = 3600) -> list[str]:
        """Where each of a done job's images can be fetched, in order: a presigned HTTP(S) URL that works
        without credentials for `expires_s` seconds where the store has one (S3, MinIO), else the blob's own
        URL (file:///..., readable where that directory is mounted). ResultUnavailable when the job is not
        done, or its images are not in a blob store (finished before the upgrade: `result` reads those)."""
        _, urls = self._done(job_id)
        if urls is None:
            raise ResultUnavailable(f"job {job_id}: its images are kept in Redis, not in a blob store (it finished "
                                    "before the upgrade): read them with result()")
        return [self._blobs(url).presign(url, expires_s) or url for url in urls]

    def _done(self, job_id: str) -> tuple[Job, list[str] | None]:
        """A done job of this client's and the blob URLs of its images (None: kept in Redis, from before the
        result store), in one read; ResultUnavailable when it is not done."""
        job, urls = self.store.get_with_blobs(job_id)
        job = self._mine(job, self.access())
        if job.state is not JobState.DONE:
            raise ResultUnavailable(f"job {job_id} is {job.state.value}, not done" + (f": {job.error}" if job.error else ""))
        return job, urls

    def _blobs(self, url: str):
        """The blob store that holds `url`, with this client's options (see __init__)."""
        if self._blob_options is None:
            self._blob_options = options_from_published(self.store.published_settings())
        return store_for(url, **self._blob_options)

    def list_jobs(
        self, *, state: JobState | str | None = None, team: str | None = None, batch: str | None = None,
        tag: str | None = None, model: str | None = None, node: str | None = None, limit: int = 50,
    ) -> list[Job]:
        """The newest jobs (by submit time) that match every filter given, at most `limit`. A team token sees
        its own team's jobs only (naming another team is an AuthError). Records that do not parse are skipped
        (the scheduler quarantines them). Terminal states are read newest first and at most LIST_SCAN_MAX
        records per state, so a filter that matches nothing in a huge history stops there."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        granted = self.access()
        if granted.team is not None:
            if team is not None and team != granted.team:
                raise AuthError(f"team {team!r}: this token is for team {granted.team!r}")
            team = granted.team
        states = [JobState(state)] if state is not None else list(JobState)

        def wanted(job: Job) -> bool:
            return (job.state in states and (team is None or job.spec.team == team)
                    and (batch is None or job.batch_id == batch) and (tag is None or tag in job.spec.tags)
                    and (model is None or job.spec.model == model) and (node is None or job.node == node))

        if batch is not None:
            found = [job for job in self._readable(self.store.batch_ids(batch)) if wanted(job)]
        else:
            found = []
            for listed in states:
                found += self._newest_in(listed, wanted, limit)
        found.sort(key=lambda job: (job.created_at, job.id), reverse=True)
        return found[:limit]

    def _newest_in(self, state: JobState, wanted: Any, limit: int) -> list[Job]:
        """Matching jobs of one state index. A terminal index is scored by finish time: read newest first and
        stop at `limit` matches. The others are read whole (a queue is scored by priority, not age)."""
        found: list[Job] = []
        for offset in range(0, LIST_SCAN_MAX, LIST_PAGE):
            ids = self.store.ids_in(state, limit=LIST_PAGE, newest_first=True, offset=offset)
            found += [job for job in self._readable(ids) if wanted(job)]
            if len(ids) < LIST_PAGE or (state.terminal and len(found) >= limit):
                break
        return found

    def _readable(self, job_ids: Sequence[str]) -> list[Job]:
        """The jobs of `job_ids` that exist and parse."""
        try:
            found = self.store.get_many(job_ids)
        except CorruptRecord:
            found = []
            for job_id in job_ids:
                try:
                    found += self.store.get_many([job_id])
                except CorruptRecord:
                    continue
        return [job for job in found if job is not None]

    # --- control and overview -------------------------------------------------------------------------

    def check_farm(self, *, empty_ok: bool = False) -> dict[str, Any] | None:
        """The farm's marker (written by the head when it starts: id, created, started), or NoFarm saying
        why there is none: another database of this server holds a farm (a wrong database number in the
        URL), or, unless `empty_ok`, the database is empty. A database that holds farm records but no marker
        (written by a tool or a test, or by a farm from before the marker) passes, as None."""
        marker = self.store.farm_marker()
        if marker is not None:
            return marker
        url = self.redis_settings.redacted
        elsewhere = self.store.farm_databases()
        if elsewhere:
            here = int(self.store.redis.connection_pool.connection_kwargs.get("db") or 0)
            there = ", ".join(str(db) for db in elsewhere)
            raise NoFarm(f"no farm at {url}: database {here} holds none, but database {there} of this server "
                         "does: wrong database number?")
        if self.store.holds_farm_records() or empty_ok:
            return None
        raise NoFarm(f"no farm at {url}: nothing has started a farm on this database (wrong database number "
                     "or URL? start one with `renderfarm up`)")

    def retry(self, job_ids: Iterable[str]) -> dict[str, str]:
        """Put each failed or cancelled job back in the queue at its original place, with a fresh set of
        attempts (to wait, if jobs it runs after are not done; the chain a job's failure ended comes back with
        it); returns per id what happened (a team token retries its own team's jobs only)."""
        def retry(job_id: str) -> str:
            try:
                left = self.store.retry(job_id)
            except ChainBlocked as exc:
                return f"not retried: {exc}"
            waiting = self.store.state(job_id) is JobState.WAITING  # for jobs it runs after
            return f"{'waiting' if waiting else 'queued'} (was {left.value})"

        return self._each_own_job(job_ids, "retried", retry,
                                  lambda state: f"it is {state} (only failed or cancelled jobs are retried)")

    def cancel(self, job_ids: Iterable[str]) -> dict[str, str]:
        """Cancel each job; returns per id the state it left, or why it could not be cancelled (a team
        token cancels its own team's jobs only)."""
        return self._each_own_job(
            job_ids, "cancelled", lambda job_id: f"cancelled (was {self.store.cancel(job_id).value})",
            lambda state: f"already {state}")

    def _each_own_job(self, job_ids: Iterable[str], verb: str, act, refused) -> dict[str, str]:
        """`act` on each job this client's token may touch; per id what it returned, or why it was not done."""
        granted = self.access()
        out = {}
        for job_id in job_ids:
            try:
                if granted.team is not None and (team := self.store.get(job_id).spec.team) != granted.team:
                    out[job_id] = f"not {verb}: belongs to team {team}"
                    continue
                out[job_id] = act(job_id)
            except IllegalTransition as exc:
                out[job_id] = f"not {verb}: {refused(exc.current.value)}"
            except JobNotFound:
                out[job_id] = f"not {verb}: no such job"
            except CorruptRecord as exc:
                out[job_id] = f"not {verb}: {exc}"
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
        granted = self.access()
        if granted.team is not None:
            for job in self.store.get_many(ids):
                if job is not None:
                    self._mine(job, granted)
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
        self.access()  # in token mode the overview needs a valid token too
        from renderfarm.loras.assets import summary

        return {"redis": self.redis_settings.redacted, "counts": self.store.counts(), "nodes": self.store.nodes(),
                "counters": self.store.counters(), "quarantined": self.store.quarantined(),
                # what each node holds (its LoRA library), as loras/assets.py summarises it
                "assets": {node: summary(doc) for node, doc in self.store.assets().items()}}
