"""Chaos: a batch of jobs through a real local farm while one of its parts is killed mid-render.

Scenarios (`SCENARIOS`):
  worker     the process of the node holding running jobs gets SIGKILL; Ray reports the death, the
             scheduler requeues what it held, the other node finishes it.
  scheduler  the scheduler's process is killed; Ray starts a new one, which rebuilds its view from Redis:
             jobs leased but not started go back to the queue, jobs being rendered stay with their node.
  redis      redis-server gets SIGKILL (no shutdown, no final flush) and comes back on the same port from its
             append-only file; every process retries its Redis calls meanwhile.
  stall      the node holding running jobs is frozen (SIGSTOP) past its batch's time limit, then thawed: the
             leases expire at that limit, the batch is one node fault (not one per job), the other node renders
             the jobs, and the thawed node's late results are discarded. No node is drained.
  outage     redis-server is frozen (SIGSTOP) for 3 leases, then thawed: an outage is nobody's fault, so
             leases that expired meanwhile are requeued without blaming a node. No node is drained.
  weights    besides the batch, jobs for a model whose weights no node has (queued as if before the nodes
             reported; a submit now refuses them): each fails once with the reason, no node is drained.

Every fifth job of the batch is a chain's second pass (img2img of the job before it: renderfarm/chains.py), so
faults land between passes too; `detail["chains"]` counts the chains, their second passes done, those out of
order (a second pass started before its first was done: never), and the chains between passes at the fault.

Each run counts, from what Redis holds afterwards: `done`, `lost` (submitted jobs that are missing or never
reached a terminal state), `duplicates` (jobs with more than one "done" event in the event stream, or with a
result that does not hold exactly its images: its blob URLs, each present in the blob store) and `recovery_s`,
the seconds from the fault until every job that was leased or running at that moment is done. The same code
serves `tests/chaos/` (which asserts 50 done, 0 lost, 0 duplicates) and `renderfarm bench chaos` (which prints
the figures).
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCENARIOS = ("worker", "scheduler", "redis", "stall", "outage", "weights")
ABSENT_MODEL = "sdxl"  # the packaged catalog's; offline (HF_HUB_OFFLINE=1, as the chaos bench sets) no node has it
ABSENT_JOBS = 3
VICTIM_NODE = "small"  # the worker scenario kills this node's process
CHAIN_EVERY = 5  # every 5th job of the batch is the second pass of the one before it


@dataclass
class ChaosResult:
    scenario: str
    submitted: int
    done: int
    failed: int
    lost: int
    duplicates: int
    recovery_s: float | None  # fault -> every job in flight at the fault done
    total_s: float  # submit -> every job finished
    in_flight_at_fault: int
    retried: int  # jobs that needed more than one attempt
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def chaos_settings(data_dir: Path, scenario: str = ""):
    from renderfarm.config import Settings

    # Short leases and heartbeats: a dead holder's jobs come back within seconds, not the default 30 s.
    # While a node renders, its leases are renewed for it; what ends a hung render is its time limit, so the
    # stall scenario gives each batch 6 s (a healthy one takes 1-2 s here) and freezes the node for longer.
    limits = {"job_timeout_base_s": 6.0, "job_timeout_s_per_megapixel_step": 0.0} if scenario == "stall" else {}
    return Settings(data_dir=data_dir, lease_seconds=4.0, heartbeat_seconds=0.5, max_attempts=5, max_batch=4,
                    eta_seconds=1.0, **limits)


def chaos_nodes():
    from renderfarm.config import two_card_nodes

    return two_card_nodes(big="big", small=VICTIM_NODE)


def chaos_specs(jobs: int) -> list[dict[str, Any]]:
    """The batch: text-to-image jobs, every CHAIN_EVERY-th of them a second pass (img2img of the job before it,
    `init_from`: renderfarm/chains.py), so that faults land between the passes of some chains too."""
    specs: list[dict[str, Any]] = [{"model": "tiny-sd15", "prompt": f"chaos {i}", "width": 128, "height": 128,
                                    "steps": 12, "seed": i, "team": "chaos"} for i in range(jobs)]
    for i in range(CHAIN_EVERY - 1, jobs, CHAIN_EVERY):
        specs[i].update(init_from=f"#{i - 1}", strength=0.5)
    return specs


def run_scenario(
    scenario: str,
    jobs: int = 50,
    data_dir: Path | None = None,
    timeout: float = 300.0,
    say: Callable[[str], None] = lambda _: None,
) -> ChaosResult:
    """Start a farm, submit `jobs` jobs, inject `scenario`'s fault mid-render, wait for the batch, count."""
    from renderfarm.farm import Farm

    if scenario not in SCENARIOS:
        raise ValueError(f"scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
    with tempfile.TemporaryDirectory(prefix=f"rf-chaos-{scenario}-") as tmp:
        base = Path(data_dir) if data_dir else Path(tmp)
        farm = Farm(chaos_settings(base / scenario, scenario), chaos_nodes(), warm_models=["tiny-sd15"],
                    log_to_driver=False)
        with farm:
            client = farm.client()
            ids = [f"chaos-{i:03d}" for i in range(jobs)]
            started = time.monotonic()
            client.submit_batch(chaos_specs(jobs), job_ids=ids)
            say(f"{scenario}: submitted {jobs} jobs")
            absent = _enqueue_absent(client) if scenario == "weights" else []
            victim = VICTIM_NODE if scenario in ("worker", "stall") else None
            # The stall must land once the batch's time limit is fixed in Redis (its node does that right
            # after it starts the jobs): the limit is what ends a hung render (see the module docstring).
            in_flight = _wait_mid_render(client, ids, victim, deadline_fixed=scenario == "stall")
            between = _between_passes(client, ids)
            fault_at = time.monotonic()
            detail = _inject(farm, scenario)
            say(f"{scenario}: fault injected with {len(in_flight)} jobs in flight ({detail})")
            recovery_s = _wait_finished(client, ids, in_flight, fault_at, started + timeout)
            total_s = time.monotonic() - started
            farm.wait_scheduler(60)  # a restarted scheduler is back before the farm stops
            result = _count(client, scenario, ids, in_flight, recovery_s, total_s, detail)
            result.detail["chains"] = {**_chain_order(client, ids), "between_passes_at_fault": between}
            if absent:
                _wait_finished(client, absent, [], fault_at, started + timeout)
                result.detail["absent_weights"] = [
                    {"state": j.state.value, "attempts": j.attempts, "error": j.error}
                    for j in client.store.get_many(absent) if j is not None]
    say(f"{scenario}: {result.done}/{result.submitted} done, {result.lost} lost, {result.duplicates} duplicated, "
        f"recovery {result.recovery_s if result.recovery_s is None else round(result.recovery_s, 2)} s")
    return result


def _wait_mid_render(client, ids: list[str], node: str | None, timeout: float = 180.0,
                     deadline_fixed: bool = False) -> list[str]:
    """Block until some job is done and some is running (on `node`, when given; with `deadline_fixed`, one
    whose node has fixed its run deadline); the ids leased or running."""
    from renderfarm.jobs import JobState

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = client.store.get_many(ids)
        running = [j for j in jobs if j and j.state is JobState.RUNNING and (node is None or j.node == node)
                   and (not deadline_fixed or client.store.run_deadline(j.id) is not None)]
        if running and any(j and j.state is JobState.DONE for j in jobs):
            return [j.id for j in jobs if j and j.state in (JobState.LEASED, JobState.RUNNING)]
        time.sleep(0.02)
    raise TimeoutError(f"no job started rendering{f' on {node}' if node else ''} within {timeout:.0f} s")


def _pairs(ids: list[str]) -> list[tuple[str, str]]:
    """(first pass, second pass) of each chain in the batch (`chaos_specs`)."""
    return [(ids[i - 1], ids[i]) for i in range(CHAIN_EVERY - 1, len(ids), CHAIN_EVERY)]


def _between_passes(client, ids: list[str]) -> int:
    """Chains whose first pass is done and whose second is not yet: what a fault now lands between."""
    from renderfarm.jobs import JobState

    pairs = _pairs(ids)
    states = {j.id: j.state for j in client.store.get_many([i for pair in pairs for i in pair]) if j is not None}
    return sum(1 for first, second in pairs
               if states.get(first) is JobState.DONE and states.get(second) is not JobState.DONE)


def _chain_order(client, ids: list[str]) -> dict[str, int]:
    """Of the chains: how many, how many second passes done, and how many started (last) before their first pass
    was done (which must never happen)."""
    from renderfarm.jobs import JobState

    pairs = _pairs(ids)
    jobs = {j.id: j for j in client.store.get_many([i for pair in pairs for i in pair]) if j is not None}
    done = [(jobs[a], jobs[b]) for a, b in pairs if a in jobs and b in jobs and jobs[b].state is JobState.DONE]
    early = [b for a, b in done if a.finished_at is None or b.started_at is None or b.started_at < a.finished_at]
    return {"pairs": len(pairs), "second_passes_done": len(done), "out_of_order": len(early)}


def _enqueue_absent(client) -> list[str]:
    """Jobs for a model no node can load, written to the queue directly: what a submit made before the nodes
    reported what they can load would have enqueued (a submit now refuses them)."""
    from renderfarm.jobs import Job, JobSpec

    jobs = [Job(id=f"chaos-absent-{i}", spec=JobSpec(model=ABSENT_MODEL, prompt="absent weights", width=1024,
                                                     height=1024, steps=4, seed=i, team="chaos"),
                created_at=time.time()) for i in range(ABSENT_JOBS)]
    client.store.submit(jobs, "chaos-absent")
    return [job.id for job in jobs]


def _freeze(pid: int, seconds: float) -> None:
    """SIGSTOP `pid` for `seconds`, then SIGCONT: a process that hangs (or a server that stops answering)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)


def _inject(farm, scenario: str) -> str:
    lease = farm.settings.lease_seconds
    if scenario == "stall":
        pid = next(n["pid"] for n in farm.nodes if n["name"] == VICTIM_NODE)
        _freeze(pid, 2.5 * lease)
        return f"node {VICTIM_NODE} (pid {pid}) frozen for {2.5 * lease:g} s"
    if scenario == "outage":
        _freeze(farm.redis_pid, 3 * lease)
        return f"redis-server frozen for {3 * lease:g} s"
    if scenario == "weights":
        return f"{ABSENT_JOBS} jobs for {ABSENT_MODEL}, whose weights no node has"
    if scenario == "worker":
        pid = next(n["pid"] for n in farm.nodes if n["name"] == VICTIM_NODE)
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL to node {VICTIM_NODE} (pid {pid})"
    if scenario == "scheduler":
        farm.kill_scheduler()
        return "scheduler actor killed, restarted by Ray"
    seconds = farm.crash_redis(down_seconds=1.0)
    return f"SIGKILL to redis-server, back from its AOF after {seconds:.2f} s"


def _wait_finished(client, ids: list[str], in_flight: list[str], fault_at: float, until: float) -> float | None:
    """Block until every job is terminal (or `until`); seconds from the fault until the in-flight ones were
    all done (None if they never were)."""
    from renderfarm.jobs import JobState

    recovery = None
    pending = set(in_flight)
    while time.monotonic() < until:
        jobs = client.store.get_many(ids)  # the Store rides out the redis scenario's restart
        states = {j.id: j.state for j in jobs if j is not None}
        pending = {i for i in pending if states.get(i) is not JobState.DONE}
        if not pending and recovery is None:
            recovery = time.monotonic() - fault_at
        if len(states) == len(ids) and all(s.terminal for s in states.values()):
            return recovery  # None when an in-flight job ended other than done
        time.sleep(0.05)
    return recovery


def _holds_its_images(store, job) -> bool:
    """Whether a done job's result is exactly its images: as many distinct blob URLs as it asked for, each in
    the blob store (or, for a record without blob URLs, as many images in its Redis result)."""
    from renderfarm.cluster.blobs import options_from_published, store_for

    urls = store.result_blobs(job.id)
    if urls is None:
        return len(store.result_images(job.id)) == job.spec.num_images
    options = options_from_published(store.published_settings())
    return (len(urls) == len(set(urls)) == job.spec.num_images
            and all(store_for(url, **options).exists(url) for url in urls))


def _count(client, scenario, ids, in_flight, recovery_s, total_s, detail) -> ChaosResult:
    from renderfarm.jobs import JobState

    store = client.store
    jobs = store.get_many(ids)
    found = {j.id: j for j in jobs if j is not None}
    done = [j for j in found.values() if j.state is JobState.DONE]
    failed = [j for j in found.values() if j.state is JobState.FAILED]
    lost = len(ids) - len([j for j in found.values() if j.state.terminal])
    done_events = Counter(
        e.job for e in store.events(from_start=True).drain() if e.state is JobState.DONE and e.job in found
    )
    bad_results = {j.id for j in done if not _holds_its_images(store, j)}
    duplicates = {i for i, n in done_events.items() if n > 1} | bad_results
    return ChaosResult(
        scenario=scenario, submitted=len(ids), done=len(done), failed=len(failed), lost=lost,
        duplicates=len(duplicates), recovery_s=None if recovery_s is None else round(recovery_s, 3),
        total_s=round(total_s, 3), in_flight_at_fault=len(in_flight),
        retried=sum(1 for j in found.values() if j.attempts > 1),
        detail={"fault": detail, "counters": store.counters(),
                "errors": sorted({j.error for j in failed if j.error})[:5],
                "drained": sorted(n["name"] for n in store.nodes() if n.get("draining") is True)},
    )
