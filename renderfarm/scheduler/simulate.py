"""Run the farm's placement code against a simulated cluster and a job trace, next to two baselines.

A discrete-event simulation, deterministic for a given cluster, trace and seed (no clocks):
- a cluster (YAML): `nodes:` with name, gpu, vram_gib, compute_capability and count (count copies, named
  name-0, name-1, ...); each becomes a planning Device (throughput from the known-card table);
- a trace (JSONL): job spec fields model, width, height, steps, num_images, and `submit_s`; optionally
  `loras` ([{name, weight}], an optional sha256 each), a job's LoRA set as JobSpec.lora_set() forms it;
- a node runs one batch (one job, `num_images` images) at a time and holds one model; a job is PREDICTED
  to take steps x the predicted seconds per step of the profile the node picks for it, plus a load (weights
  over disk and PCIe, placement.load_seconds) when the node holds another model;
- LoRAs: a node's pipeline has one LoRA set applied (none after a load or an out-of-memory error); a job
  whose set differs from it (none included: a LoRA-free job on a pipeline with LoRAs unloads them; a LoRA
  job on a freshly loaded pipeline applies its own) counts one adapter switch and costs what the planner
  predicts, placement.lora_switch_seconds. Like the load, the switch is part of the job's predicted busy
  time, so it is scaled by the job's error factor with the rest: one rule for the truth (predicted x
  factor), and `--error 0` stays exact knowledge. Every node holds every LoRA of the trace (who holds which
  file is routing's filter, tested with the live scheduler); a trace without LoRAs runs exactly as before;
- prediction error: the truth is drawn around the prediction, one factor per job (seeded, the same for
  every policy): uniform in [1 - e, 1 + e] (default e = 0.3, +-30%) or lognormal (median 1, sigma e). A job
  really takes its predicted seconds x its factor on whichever node runs it. Policies plan with the
  prediction (the renderfarm policy's backlogs are its estimates, corrected as the live scheduler corrects
  them: when a batch ends, a node's backlog becomes the estimates of what it still holds); the simulation
  runs with the truth, and the lower bound is computed from the truth. e = 0 is the old exact-knowledge
  simulation. Memory is not perturbed: what fits is what planning predicts;
- a job sent where it does not fit (planning predicts no profile fits that node) runs out of memory: it
  costs the load and 30% of its run in the most frugal profile, counts an OOM, and is sent again (never to
  a node where it failed before);
- a job that fits no node of the cluster is rejected up front (every policy), and reported.

Policies (every one gets the same trace and the same true durations):
- `renderfarm`: the live scheduler's round (scheduler/dispatch.py): on every arrival and every finished job, the
  queue in fair order (fairness.FairShare) goes through placement.plan_dispatch, with each node's backlog in
  seconds as the scheduler estimates it and WORKER_QUEUE_DEPTH batches per node at most, and each job's LoRA
  set and the set each node's pipeline will have applied, so the live score weighs a switch; a job waits for
  its best node when that node is full. One job per batch (no coalescing), so that the lower bound, which
  counts each job alone, stays a bound.
- `least-busy`: the node with the fewest queued jobs, whatever the job needs (ComfyUI-Distributed, SwarmUI).
  Like max-pixels-fifo, it ignores LoRAs (as those peers do) and pays the switches it causes.
- `max-pixels-fifo`: AI Horde: each idle node pulls the oldest job whose width x height is within its
  max-pixels limit (MAX_PIXELS_PER_GIB x VRAM); a job above every node's limit goes to the largest.

The lower bound on the makespan is the largest of: the total work, each job on its fastest feasible node,
over the number of nodes (`work_s`); the same weighted by how fast each kind of node is (`capacity_s`, an LP
dual bound: on a mixed cluster "fastest node / N" pretends every node is the fastest); the longest job on
its fastest feasible node; the latest submit time plus that job's fastest run. Loads and LoRA switches
are not counted.

Each policy reports its makespan and its median (p50) and p95 wait (submit to start) side by side: a
policy that wins the makespan can still make the typical job wait longer; and its adapter switches.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from renderfarm.errors import ConfigError
from renderfarm.planning.devices import Device, device_from_spec
from renderfarm.planning.fit import Fit, JobShape, NodeView, fit_on, why_nothing_fits
from renderfarm.scheduler.fairness import FairShare, Queued
from renderfarm.scheduler.placement import PendingJob, load_seconds, lora_switch_seconds, plan_dispatch

# Package data, so an installed wheel simulates too; bench/sim/make_trace.py writes the trace.
SIM_DATA = Path(__file__).resolve().parents[1] / "configs" / "sim"
DEFAULT_CLUSTER = SIM_DATA / "cluster.yaml"
DEFAULT_TRACE = SIM_DATA / "trace.jsonl"
DEFAULT_LORA_TRACE = SIM_DATA / "trace_loras.jsonl"  # the same jobs, a third of them with one of ten LoRAs
OOM_FRACTION = 0.3  # of the run, lost before the out-of-memory error
MAX_PIXELS_PER_GIB = 2**20 / 6  # AI Horde-style limit: 8 GiB -> 1.33 Mpx, 24 GiB -> 4 Mpx (2048 x 2048)
POLICIES = ("renderfarm", "least-busy", "max-pixels-fifo")
WORKER_QUEUE_DEPTH = 2  # batches a node holds, as config.Settings.worker_queue_depth
ERROR_DISTRIBUTIONS = ("uniform", "lognormal")
DEFAULT_ERROR = 0.3  # +-30%: the truth is drawn around the prediction


@dataclass(frozen=True)
class PredictionError:
    """How far a job's true duration strays from the prediction: one factor per job, seeded.

    uniform: factor in [1 - spread, 1 + spread]; lognormal: exp(N(0, spread)), median 1."""

    spread: float = DEFAULT_ERROR
    distribution: str = "uniform"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.distribution not in ERROR_DISTRIBUTIONS:
            raise ConfigError(f"error distribution {self.distribution!r}: expected one of "
                              f"{', '.join(ERROR_DISTRIBUTIONS)}")
        if not math.isfinite(self.spread) or self.spread < 0:
            raise ConfigError(f"error spread {self.spread}: must be a finite number >= 0")
        if self.distribution == "uniform" and self.spread >= 1:
            raise ConfigError(f"error spread {self.spread}: a uniform error must stay below 1 (a job cannot "
                              "take no time or less)")

    def factors(self, jobs: list[TraceJob]) -> dict[int, float]:
        """Each job's true duration over its predicted one, by job index (drawn in index order)."""
        rng = random.Random(self.seed)
        out = {}
        for job in sorted(jobs, key=lambda j: j.index):
            if self.distribution == "uniform":
                out[job.index] = rng.uniform(1 - self.spread, 1 + self.spread)
            else:
                out[job.index] = math.exp(rng.gauss(0.0, self.spread))
        return out


EXACT = PredictionError(0.0)


@dataclass(frozen=True)
class SimNode:
    name: str
    device: Device


@dataclass(frozen=True)
class TraceJob:
    index: int
    submit_s: float
    shape: JobShape


def load_cluster(path: str | Path | None = None) -> list[SimNode]:
    path = Path(path) if path else DEFAULT_CLUSTER
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the cluster file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) or not data["nodes"]:
        raise ConfigError(f"{path}: expected `nodes:` with a list of nodes")
    nodes = []
    for i, raw in enumerate(data["nodes"]):
        try:
            name, vram = str(raw["name"]), float(raw["vram_gib"])
            cc = str(raw["compute_capability"])
            count = int(raw.get("count", 1))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: node {i}: needs name, vram_gib, compute_capability ({exc})") from exc
        try:
            device = device_from_spec(str(raw.get("gpu") or name), vram, cc)
        except ValueError as exc:
            raise ConfigError(f"{path}: node {i}: {exc}") from None
        nodes.extend(SimNode(f"{name}-{k}" if count > 1 else name, device) for k in range(count))
    return nodes


def load_trace(path: str | Path | None = None) -> list[TraceJob]:
    path = Path(path) if path else DEFAULT_TRACE
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the trace ({exc})") from None
    jobs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            shape = JobShape(
                str(raw["model"]), int(raw["width"]), int(raw["height"]), int(raw["steps"]),
                int(raw.get("num_images", 1)), _lora_set(raw.get("loras") or []),
            )
            jobs.append(TraceJob(len(jobs), float(raw["submit_s"]), shape))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"{path}:{n}: bad job ({exc})") from exc
    jobs.sort(key=lambda j: (j.submit_s, j.index))
    return jobs


def _lora_set(raw: list) -> tuple[tuple[str, str | None, float], ...]:
    """A trace job's `loras` as JobSpec.lora_set() gives them: (name, sha256 or None, weight), name order."""
    if not isinstance(raw, list):
        raise ValueError(f"loras: expected a list of {{name, weight}}, got {type(raw).__name__}")
    out = []
    for lora in raw:
        name, weight, sha = str(lora["name"]), float(lora.get("weight", 1.0)), lora.get("sha256")
        if not name or not math.isfinite(weight):
            raise ValueError(f"loras: {lora!r} needs a name and a finite weight")
        out.append((name, str(sha) if sha else None, weight))
    if len({name for name, _, _ in out}) != len(out):
        raise ValueError(f"loras: a LoRA named twice in {raw!r}")
    return tuple(sorted(out))


def held_loras(jobs: list[TraceJob]) -> frozenset[tuple[str, str]]:
    """Every LoRA the trace names, as NodeView.loras holds them: what each simulated node holds."""
    return frozenset((name, sha or "") for job in jobs for name, sha, _ in job.shape.loras)


def _fit(job: TraceJob, device: Device) -> Fit:
    s = job.shape
    return fit_on(s.model, s.width, s.height, s.num_images, device)


@dataclass
class _Node:
    name: str
    device: Device
    model: str | None = None  # held now, or once its queue drains (push policies)
    queue: deque[TraceJob] = field(default_factory=deque)
    busy: bool = False
    free_at: float = 0.0  # estimated end of its queued work (push policies)
    tail_model: str | None = None  # the model it will hold once its queue drains
    applied: tuple = ()  # the LoRA set the pipeline of `model` has applied now
    tail_loras: tuple = ()  # the LoRA set it will have applied once its queue drains
    estimates: dict[int, float] = field(default_factory=dict)  # job index -> predicted seconds, sent and unfinished


@dataclass
class _Stats:
    waits: list[float] = field(default_factory=list)
    starts: dict[int, tuple[float, str]] = field(default_factory=dict)  # job index -> (start, node) of its run
    busy_s: float = 0.0
    ooms: int = 0
    model_loads: int = 0
    lora_switches: int = 0  # runs whose LoRA set differed from the one their node's pipeline had applied
    lora_switches_on_load: int = 0  # of those, runs on a pipeline loaded for them (the load brought the switch)
    makespan_s: float = 0.0


class _Sim:
    """One policy over one trace. Push policies choose a node when a job arrives (or is retried); the pull
    policy lets each idle node take a job from the shared queue."""

    def __init__(self, nodes: list[SimNode], jobs: list[TraceJob], policy: str,
                 truth: dict[int, float] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        self.policy = policy
        self.nodes = [_Node(n.name, n.device) for n in nodes]
        self.jobs = jobs
        self.truth = truth or {}  # job index -> true / predicted duration (1 when absent)
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = 0
        self.stats = _Stats()
        self.failed_on: dict[int, set[str]] = {}
        self.shared: list[TraceJob] = []  # pull policy: waiting jobs, oldest first
        self.waiting: dict[int, TraceJob] = {}  # renderfarm: jobs not yet sent to a node
        self.fair = FairShare()
        self.held_loras = held_loras(jobs)  # every node holds every LoRA of the trace
        self.now = 0.0

    def _at(self, time: float, kind: str, payload: Any) -> None:
        self.seq += 1
        heapq.heappush(self.events, (time, self.seq, kind, payload))

    def run(self) -> _Stats:
        for job in self.jobs:
            self._at(job.submit_s, "arrive", job)
        while self.events:
            self.now, _, kind, payload = heapq.heappop(self.events)
            if kind == "arrive":
                self._dispatch(payload)
            else:
                node, job, oom = payload
                node.busy = False
                node.estimates.pop(job.index, None)
                # as the live scheduler (managers.py): the backlog becomes the estimates of what it still holds
                node.free_at = self.now + sum(node.estimates.values())
                self._start_next(node)
                self._dispatch(job if oom else None)
        return self.stats

    # --- choosing -----------------------------------------------------------------------------------
    def _eligible(self, job: TraceJob) -> list[_Node]:
        failed = self.failed_on.get(job.index, set())
        return [n for n in self.nodes if n.name not in failed] or self.nodes

    def _dispatch(self, job: TraceJob | None) -> None:
        if self.policy == "renderfarm":
            if job is not None:
                self.waiting[job.index] = job
            self._plan()
            return
        if job is None:
            return
        if self.policy == "max-pixels-fifo":
            self.shared.append(job)
            self.shared.sort(key=lambda j: (j.submit_s, j.index))
            for node in self.nodes:
                if not node.busy:
                    self._start_next(node)
            return
        # least-busy: fewest jobs queued or running, first listed on ties
        self._send(min(self._eligible(job), key=lambda n: len(n.queue) + n.busy), job)

    def _send(self, node: _Node, job: TraceJob) -> None:
        node.queue.append(job)
        estimate = self._duration(node, node.tail_model, node.tail_loras, job)[0]
        node.estimates[job.index] = estimate
        node.free_at = max(node.free_at, self.now) + estimate
        node.tail_model = job.shape.model
        node.tail_loras = job.shape.loras
        if not node.busy:
            self._start_next(node)

    def _plan(self) -> None:
        """The live scheduler's round over the waiting jobs: fair order, then plan_dispatch; send what it
        assigns to a node with a free slot."""
        if not self.waiting:
            return
        order = self.fair.order(
            [Queued(str(j.index), "default", 0, j.submit_s, _work(j.shape)) for j in self.waiting.values()],
            self.now,
        )
        pending = []
        for q in order:
            s = self.waiting[int(q.id)].shape
            key = (s.model, s.width, s.height, s.steps, q.id)  # unique: one job per batch (see the docstring)
            pending.append(PendingJob(q.id, s.model, key, s.num_images, s.width, s.height, s.steps, s.loras))
        views = [
            NodeView(
                n.name, n.device, frozenset({n.tail_model}) if n.tail_model else frozenset(),
                max(0.0, n.free_at - self.now), WORKER_QUEUE_DEPTH - len(n.queue) - n.busy,
                loras=self.held_loras, applied={n.tail_model: n.tail_loras} if n.tail_model else None,
            )
            for n in self.nodes
        ]
        by_name = {n.name: n for n in self.nodes}
        for assignment in plan_dispatch(pending, views, 1, full=False).assignments:
            job = self.waiting.pop(int(assignment.job_ids[0]))
            self.fair.charge("default", _work(job.shape), self.now)
            self._send(by_name[assignment.worker], job)

    def _pull(self, node: _Node) -> TraceJob | None:
        limit = node.device.vram_gib * MAX_PIXELS_PER_GIB
        largest = max(n.device.vram_gib for n in self.nodes)
        for i, job in enumerate(self.shared):
            if node.name in self.failed_on.get(job.index, set()):
                continue
            pixels = job.shape.width * job.shape.height
            if pixels <= limit or (
                pixels > largest * MAX_PIXELS_PER_GIB and node.device.vram_gib == largest
            ):
                return self.shared.pop(i)
        return None

    # --- running ------------------------------------------------------------------------------------
    def _duration(
        self, node: _Node, held: str | None, applied: tuple, job: TraceJob,
    ) -> tuple[float, bool, bool, bool]:
        """(seconds the node is busy with `job`, whether it runs out of memory, whether it loads, whether it
        switches LoRAs), its pipeline holding `held` with the LoRA set `applied`."""
        fit = _fit(job, node.device)
        loads = held != job.shape.model
        load = load_seconds(fit, node.device) if loads else 0.0
        before = () if loads else applied  # a pipeline loaded for the job has no LoRAs yet
        switches = before != job.shape.loras
        load += lora_switch_seconds(before, job.shape.loras)  # 0.0 without LoRAs: the old sums, to the bit
        run = job.shape.steps * fit.seconds_per_step
        if not fit.fits:
            return load + OOM_FRACTION * run, True, loads, switches
        return load + run, False, loads, switches

    def _start_next(self, node: _Node) -> None:
        if node.busy:
            return
        job = self._pull(node) if self.policy == "max-pixels-fifo" else (node.queue[0] if node.queue else None)
        if job is None:
            return
        if node.queue and node.queue[0] is job:
            node.queue.popleft()
        predicted, oom, loads, switches = self._duration(node, node.model, node.applied, job)
        seconds = predicted * self.truth.get(job.index, 1.0)
        node.busy = True
        self.stats.busy_s += seconds
        self.stats.model_loads += loads
        self.stats.lora_switches += switches  # paid before the run, so an out-of-memory run paid it too
        self.stats.lora_switches_on_load += switches and loads
        if oom:
            self.stats.ooms += 1
            self.failed_on.setdefault(job.index, set()).add(node.name)
            node.model, node.applied = None, ()  # the failed pipeline is dropped
        else:
            node.model, node.applied = job.shape.model, job.shape.loras
            self.stats.waits.append(self.now - job.submit_s)
            self.stats.starts[job.index] = (self.now, node.name)
            self.stats.makespan_s = max(self.stats.makespan_s, self.now + seconds)
        self._at(self.now + seconds, "done", (node, job, oom))


def _work(shape: JobShape) -> float:
    """A job's work for fair share, as the live scheduler charges it: megapixel-steps."""
    return shape.num_images * shape.width * shape.height * shape.steps / 1e6


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _capacity_bound(nodes: list[SimNode], jobs: list[TraceJob], truth: dict[int, float] | None = None) -> float:
    """A makespan bound that respects how much slower each kind of node is (loads aside).

    LP duality: for any shares w_k >= 0 of the node kinds summing to 1 (kind k has m_k nodes),
    sum over jobs of min over feasible kinds of (w_k / m_k) x seconds on k is at most the makespan of any
    schedule, even one that splits jobs. w_k = m_k / N gives "each job on its fastest node / N"; a short
    local search over w from there only raises the bound, and every w tried is a valid bound."""
    kinds: dict[Device, int] = {}
    for n in nodes:
        kinds[n.device] = kinds.get(n.device, 0) + 1
    devices = list(kinds)
    classes: dict[JobShape, float] = {}  # shape -> its jobs' summed true factors (a count when exact)
    for job in jobs:
        classes[job.shape] = classes.get(job.shape, 0.0) + (truth or {}).get(job.index, 1.0)
    table = [
        (count, [shape.steps * f.seconds_per_step if (f := fit_on(
            shape.model, shape.width, shape.height, shape.num_images, d)).fits else math.inf for d in devices])
        for shape, count in classes.items()
    ]
    counts = [kinds[d] for d in devices]

    def value(shares: list[float]) -> float:
        return sum(count * min(w / m * t for w, m, t in zip(shares, counts, times)) for count, times in table)

    shares = [m / len(nodes) for m in counts]
    best = value(shares)
    for step in (0.1, 0.05, 0.02, 0.01, 0.005, 0.002):
        improved = True
        while improved:
            improved = False
            for a in range(len(devices)):
                for b in range(len(devices)):
                    if a == b or shares[a] < step:
                        continue
                    trial = list(shares)
                    trial[a] -= step
                    trial[b] += step
                    v = value(trial)
                    if v > best + 1e-9:
                        shares, best, improved = trial, v, True
    return best


def lower_bound(nodes: list[SimNode], jobs: list[TraceJob], truth: dict[int, float] | None = None) -> dict[str, float]:
    """Makespans no schedule can beat (loads aside), measured from time 0, with each job's true duration
    (`truth`: factor by job index; exact when absent): see the module docstring."""
    truth = truth or {}
    fastest = [
        truth.get(job.index, 1.0) * min(
            job.shape.steps * _fit(job, n.device).seconds_per_step for n in nodes if _fit(job, n.device).fits)
        for job in jobs
    ]
    if not fastest:
        return {"work_s": 0.0, "capacity_s": 0.0, "longest_job_s": 0.0, "last_arrival_s": 0.0}
    return {
        "work_s": sum(fastest) / len(nodes),
        "capacity_s": _capacity_bound(nodes, jobs, truth),
        "longest_job_s": max(fastest),
        "last_arrival_s": max(job.submit_s + t for job, t in zip(jobs, fastest)),
    }


def run_policy(
    nodes: list[SimNode], jobs: list[TraceJob], policy: str, error: PredictionError = PredictionError(),
) -> _Stats:
    """One policy over `jobs` (all assumed to fit some node) with the truth drawn from `error`: its raw
    figures, each job's start and node included (bench/sim/error_sweep.py reads them)."""
    return _Sim(nodes, jobs, policy, error.factors(jobs)).run()


def simulate(
    nodes: list[SimNode], jobs: list[TraceJob], policies: tuple[str, ...] = POLICIES,
    on_reject: Callable[[TraceJob, str], None] | None = None, error: PredictionError = PredictionError(),
) -> dict[str, Any]:
    """Every policy over `jobs` on `nodes`, planning with the prediction and running with the truth drawn
    around it (`error`); the figures `run_sim` returns."""
    if not nodes:
        raise ValueError("the cluster has no nodes")
    held = held_loras(jobs)
    views = [NodeView(n.name, n.device, loras=held) for n in nodes]
    accepted, rejected = [], []
    for job in jobs:
        reason = why_nothing_fits(job.shape, views)
        if reason is None:
            accepted.append(job)
        else:
            rejected.append(job)
            if on_reject:
                on_reject(job, reason)
    start = min((j.submit_s for j in accepted), default=0.0)
    truth = error.factors(accepted)
    results: dict[str, dict[str, float | int]] = {}
    for policy in policies:
        stats = _Sim(nodes, accepted, policy, truth).run()
        makespan = max(0.0, stats.makespan_s - start)
        results[policy] = {
            "makespan_s": round(makespan, 1),
            "p50_wait_s": round(_percentile(stats.waits, 50), 1),
            "p95_wait_s": round(_percentile(stats.waits, 95), 1),
            "utilization": round(stats.busy_s / (len(nodes) * makespan), 3) if makespan else 0.0,
            "ooms": stats.ooms,
            "model_loads": stats.model_loads,
            "lora_switches": stats.lora_switches,
        }
    bound = {k: round(v - start if k == "last_arrival_s" else v, 1) for k, v in lower_bound(nodes, accepted, truth).items()}
    return {
        "policies": results,
        "lower_bound_s": max(bound.values()),
        "lower_bound_parts": bound,
        "rejected": len(rejected),
        "jobs": len(accepted),
        "lora_jobs": sum(1 for j in accepted if j.shape.loras),
        "lora_sets": len({j.shape.loras for j in accepted if j.shape.loras}),
        "nodes": len(nodes),
        "prediction_error": {"spread": error.spread, "distribution": error.distribution, "seed": error.seed},
    }


def run_sim(
    trace_path: str | Path | None = None, cluster_path: str | Path | None = None,
    error: PredictionError = PredictionError(),
) -> dict[str, Any]:
    """Simulate every policy over a trace (default: the shipped configs/sim/trace.jsonl) on a cluster
    (configs/sim/cluster.yaml), with the truth drawn around the prediction (default +-30%, uniform, seed 0)."""
    return simulate(load_cluster(cluster_path), load_trace(trace_path), error=error)
