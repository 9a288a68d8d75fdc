"""Whose fault a failure is: the job's, the node's, or nobody's. The one place that decides it.

The worker reports with each failed batch which kind its failure was (`classify` of what it caught), and the
scheduler acts on the kind (scheduler/managers.py):

- `Fault.JOB`: the job cannot render like this on any node: the model's weights are absent
  (ModelSourceError), no worker renders its family (UnsupportedFamily), the job is invalid for its model
  (SpecError, UnknownModelError), or its record is unreadable. The job fails at once with the reason (a retry
  elsewhere cannot help) and no node is blamed.
- `Fault.NODE`: this node failed this batch: out of memory at the floor of the profile ladder (DoesNotFit), a
  render past its time limit, a hang (an expired lease), any exception nothing here recognises. The jobs are
  retried elsewhere, and the node is charged once per batch; `drain_after_failures` node faults in a row
  drain it.
- `Fault.OUTAGE`: the infrastructure was unreachable: Redis (a lost connection, a timeout, RedisUnavailable)
  or a Ray actor that is temporarily unavailable. The jobs go back to the queue; nobody is charged.
- `Fault.STORE`: the result store refused the finished images (full, read-only, denied, unreachable: a
  BlobStoreError of those kinds). Neither the job's fault nor the node's: the jobs are retried while they have
  attempts left, then fail with the store's reason (kept, for `renderfarm retry` once the store is mended);
  no node is charged. Not an outage: a full disk stays full, and retrying without end would render in vain.

Pure: no Ray import (Ray's exceptions are recognised by class name), nothing that touches a network.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum

import redis.exceptions

from renderfarm.errors import (
    BlobStoreError,
    CorruptRecord,
    JobNotFound,
    ModelSourceError,
    RedisUnavailable,
    SpecError,
    UnknownModelError,
    UnsupportedFamily,
)

__all__ = ["JOB_FAULTS", "Fault", "classify"]


class Fault(str, Enum):
    JOB = "job"  # fail the job now, blame no node
    NODE = "node"  # retry elsewhere, count one failure against the node (per batch)
    OUTAGE = "outage"  # retry, blame nobody
    STORE = "store"  # the result store refused the images: retry while attempts last, blame nobody

    @classmethod
    def parse(cls, value: object) -> Fault:
        """The kind a summary reports; a missing or unknown one (an older worker) is a node fault, as before."""
        try:
            return cls(value)
        except ValueError:
            return cls.NODE


# Exceptions that say the job is at fault wherever it runs.
JOB_FAULTS: tuple[type[BaseException], ...] = (
    ModelSourceError, UnsupportedFamily, SpecError, UnknownModelError, JobNotFound, CorruptRecord,
)
STORE_REFUSALS = frozenset({"full", "unwritable", "unreachable"})  # BlobStoreError kinds (cluster/blobs)
_REDIS_OUTAGES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, RedisUnavailable)
# Ray's exceptions by class name (ray.exceptions): the call could not reach a live actor or its result, which
# says nothing about the node's health. A dead actor (ActorDiedError) is not here: that node is gone.
_RAY_OUTAGES = frozenset({"ActorUnavailableError", "GetTimeoutError", "RaySystemError", "ObjectLostError",
                          "ObjectFetchTimedOutError", "OwnerDiedError"})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it wraps: a Ray task error's `cause`, then `__cause__` / `__context__`."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        cause = getattr(current, "cause", None) if _ray_names(current) & {"RayTaskError"} else None
        current = cause if isinstance(cause, BaseException) else (current.__cause__ or current.__context__)


def _ray_names(exc: BaseException) -> set[str]:
    return {k.__name__ for k in type(exc).__mro__ if k.__module__.startswith("ray.")}


def classify(exc: BaseException) -> Fault:
    """Whose fault `exc` is. The outermost exception of its chain that is recognised decides (a job fault
    raised while handling a lost connection is the job's); nothing recognised is the node's."""
    for current in _chain(exc):
        if isinstance(current, JOB_FAULTS):
            return Fault.JOB
        if isinstance(current, BlobStoreError) and current.kind in STORE_REFUSALS:
            return Fault.STORE
        if isinstance(current, _REDIS_OUTAGES) or _ray_names(current) & _RAY_OUTAGES:
            return Fault.OUTAGE
    return Fault.NODE
