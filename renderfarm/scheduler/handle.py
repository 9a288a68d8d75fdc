"""Every Ray call the scheduler makes, in one place, so its managers are plain Python tested without Ray.

`WorkerHandle` is one worker actor as the scheduler calls it (send a batch); `RayCalls` finds a worker that
joined by its actor's name, waits for batches to finish and reads how each one ended, as a `BatchOutcome`
(Ray's exceptions stop here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayError

from renderfarm.faults import Fault, classify

RESULT_TIMEOUT_S = 5.0  # a finished batch's summary is small: longer means the call itself is in trouble


@dataclass(frozen=True)
class BatchOutcome:
    """How a batch call ended: exactly one of summary, died and error is set (`fault` goes with `error`)."""

    summary: dict[str, Any] | None = None  # what the worker returned: {"done": [...], "errors": {job: why}}
    died: str | None = None  # the worker's process died (Ray's words)
    error: str | None = None  # the call failed otherwise ("ExceptionName: message")
    fault: Fault = Fault.NODE  # whose fault that error is (renderfarm/faults.py)


class WorkerHandle:
    """One worker actor. The scheduler holds its batches as opaque refs and gives them back to `RayCalls`."""

    def __init__(self, actor: Any):
        self.actor = actor

    def render(self, job_ids: list[str], specs: list[dict[str, Any]] | None = None) -> Any:
        """Queue a batch on the worker (it renders its calls one after another); a ref to its summary. `specs`:
        the jobs' specs as JSON, so that the worker need not read them from Redis."""
        return self.actor.render.remote(job_ids, specs)


class RayCalls:
    def find(self, actor_name: str) -> WorkerHandle | None:
        """The worker of a named actor, None when no such actor is alive in this Ray namespace."""
        try:
            return WorkerHandle(ray.get_actor(actor_name))
        except ValueError:
            return None

    def wait_any(self, refs: list[Any], timeout: float) -> list[Any]:
        """The batches finished so far, returning as soon as one is (or after `timeout`)."""
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=False)
        return ready

    def outcome(self, ref: Any) -> BatchOutcome:
        """How a finished batch ended."""
        try:
            return BatchOutcome(summary=ray.get(ref, timeout=RESULT_TIMEOUT_S))
        except ActorUnavailableError as exc:  # unreachable for now, not dead: an outage, nobody's fault
            return BatchOutcome(error=f"{type(exc).__name__}: {exc}", fault=Fault.OUTAGE)
        except RayActorError as exc:
            return BatchOutcome(died=str(exc))
        except (RayError, GetTimeoutError) as exc:
            return BatchOutcome(error=f"{type(exc).__name__}: {exc}", fault=classify(exc))
