"""What the farm costs on top of rendering, like for like: the same tiny-sd15 jobs (64x64, 2 steps) through a
farm with one worker, and through a direct loop on one pipeline in this process, at the SAME batch size.

    python bench/overhead.py [--json] [--jobs 32] [--rounds 5] [--sizes 1,8]
    python bench/overhead.py --quick [--json]        # 8 jobs, 2 rounds (tests/bench runs this)
    python bench/overhead.py --image-size 128 --steps 8 # more work per job: the farm's cost per job is fixed

Like for like:
- the same jobs: each round renders the same specs on both sides, with prompts new to that round (so no side
  gets prompt embeddings from a cache the other lacks);
- the same batch size: at batch B the farm coalesces up to B jobs per pipeline call (Settings.max_batch = B)
  and the direct loop calls the pipeline with B prompts at once (batch 1: one call per job);
- the same render code and profile: the direct loop calls renderfarm.actors.pipelines.render_batch, as the
  worker does, with the profile the farm's node chooses for its declared card, and gets the same PNG bytes
  (infotext included); the farm's figure runs from submit to the last PNG read back from its result store
  (FarmClient.result);
- the model warm on both sides (loaded, and one untimed round each first);
- interleaved rounds (farm, direct, farm, direct, ...) so both see the same machine, and the median with its
  min-max over the rounds, not the best round.

Figures, per job: wall time (the round's wall over its jobs) and CPU time summed over every process of each
contender: the farm's is this process (the client), redis-server, and every process of its private Ray
(raylet, GCS, dashboard agents, the scheduler and worker actors: found by ray_processes.cluster_pids); the
direct loop's is this process. The farm's processes that idle between jobs count: they are its cost. Goal:
farm / direct <= 1.10 at every size, for wall and CPU. Redis per job: commands redis-server processed
(INFO total_commands_processed) and round trips (requests sent and waited on: the client's Store, each
node's record `redis_round_trips` and `redis_round_trips_timed` (heartbeats, renewals, progress), and the
scheduler's stats() `redis_round_trips` where it reports one). Issue 16's target: at most 3 round trips per
job at batch 1.

On a 2-core machine the farm's worker and the direct loop use the same torch threads (all cores), and the
same scheduling priority: Ray's raylet starts its workers at nice 15 by default (RAY_worker_niceness; seen
with ps: ray::RenderWorker and ray::Scheduler at NI 15), which on a machine doing other work would slow the
farm beside a direct loop at nice 0, so the bench starts its farms with RAY_worker_niceness set to this
process's niceness (--ray-niceness to choose) and reports the niceness each side ran at. Figures taken while
other work runs on the machine are noisy: compare the median, read the range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL, GUIDANCE = "tiny-sd15", 5.0
SIZE, STEPS = 64, 2  # the work of one job (--image-size, --steps)
GOAL_RATIO = 1.10


def cpu_seconds(pids: set[int]) -> dict[int, float]:
    """User + system CPU seconds of each live process in `pids` (those that are gone are left out)."""
    import psutil

    out = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out[pid] = times.user + times.system
    return out


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two readings; a process born in between counts whole."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def role_of(pid: int, me: int, redis_pid: int | None) -> str:
    """Which part of the farm a process is, for the CPU breakdown: client (this process), redis, the worker
    or scheduler actor, or Ray's own daemons (raylet, gcs_server, its agents and idle workers)."""
    import psutil

    if pid == me:
        return "client"
    if pid == redis_pid:
        return "redis"
    try:
        cmd = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "ray"
    head = cmd[0] if cmd else ""
    if head.startswith("ray::RenderWorker"):
        return "worker"
    if head.startswith("ray::Scheduler"):
        return "scheduler"
    return "ray"


def cpu_by_role(before: dict[int, float], after: dict[int, float], roles: dict[int, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for pid, t in after.items():
        role = roles.get(pid, "ray")
        out[role] = out.get(role, 0.0) + t - before.get(pid, 0.0)
    return out


def redis_commands(client: Any) -> int:
    return int(client.info("stats")["total_commands_processed"])


def actor_niceness(pids: set[int]) -> dict[str, int]:
    """The niceness of the farm's actors (ray::RenderWorker..., ray::Scheduler), by name."""
    import psutil

    out = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            name = process.cmdline()[0] if process.cmdline() else process.name()
            if name.startswith("ray::"):
                out[name.split(".")[0].removeprefix("ray::")] = process.nice()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def round_trips(farm: Any, client: Any) -> dict[str, int | None]:
    """Requests sent to Redis so far, by who sent them. The scheduler's is None until its stats() reports
    `redis_round_trips` (issue 16: being added)."""
    nodes = client.store.nodes()
    stats = farm.scheduler_stats()
    return {
        "client": client.store.round_trips,
        "workers": sum(int(n.get("redis_round_trips") or 0) for n in nodes),
        "workers_timed": sum(int(n.get("redis_round_trips_timed") or 0) for n in nodes),
        "scheduler": stats.get("redis_round_trips"),
    }


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def specs_for(round_no: int, jobs: int) -> list[dict[str, Any]]:
    return [{"model": MODEL, "prompt": f"overhead round {round_no} job {i}", "width": SIZE, "height": SIZE,
             "steps": STEPS, "guidance": GUIDANCE, "negative_prompt": "", "seed": i} for i in range(jobs)]


def measure_size(batch: int, jobs: int, rounds: int, threads: int, pipe: Any, entry: Any, node: Any,
                 say) -> dict[str, Any]:
    """Interleaved rounds at one batch size, on a farm of its own (Settings.max_batch = batch)."""
    import redis

    from renderfarm.actors.pipelines import RenderRequest, render_batch
    from renderfarm.cluster.blobs import open_blob_store, result_keys
    from renderfarm.cluster.ray_processes import cluster_pids
    from renderfarm.config import Settings
    from renderfarm.farm import Farm

    farm_render_s: list[float] = []  # render_batch's own time per job (its timings' total_s), each side
    render_s: list[float] = []

    def direct(specs: list[dict[str, Any]], saved_to: Any = None) -> tuple[float, float]:
        """The same renders in this process; with `saved_to` (a result store), each PNG is also written
        there, one after another, as a loop that keeps its pictures would (the farm's node does write them)."""
        cpu0 = time.process_time()
        start = time.perf_counter()
        for i in range(0, len(specs), batch):
            requests = [RenderRequest(f"direct-{s['seed']}", s["prompt"], "", SIZE, SIZE, STEPS, GUIDANCE,
                                      s["seed"], 1)
                        for s in specs[i:i + batch]]
            results = render_batch(pipe, entry, requests)
            render_s.append(results[0].timings["total_s"] / len(requests))  # the batch's render_batch, per job
            for result in results:
                if not result.images:
                    raise RuntimeError(f"direct render of {result.job_id} returned no image")
                if saved_to is not None:
                    for key, png in zip(result_keys(result.job_id, len(result.images)), result.images):
                        saved_to.put(key, png)
        return time.perf_counter() - start, time.process_time() - cpu0

    with tempfile.TemporaryDirectory(prefix="rf-bench-") as tmp:
        settings = Settings(data_dir=Path(tmp), max_batch=batch, torch_threads=threads)
        kept = open_blob_store(str(Path(tmp) / "direct-results"))  # the store class the farm's node writes through
        started = time.perf_counter()
        with Farm(settings, [node], warm_models=[MODEL], log_to_driver=False) as farm:
            say(f"batch {batch}: farm up in {time.perf_counter() - started:.1f} s")
            client = farm.client()
            server = redis.Redis.from_url(farm.redis_url)

            def farm_pids() -> set[int]:
                return {os.getpid(), farm.redis_pid} | cluster_pids(Path(farm.ray_temp_dir), set())

            roles: dict[int, str] = {}
            by_role: dict[str, list[float]] = {}  # the farm's CPU per job, by process role, per round

            def through_farm(specs: list[dict[str, Any]]) -> tuple[float, float, int]:
                pids = farm_pids()
                roles.update({p: role_of(p, os.getpid(), farm.redis_pid) for p in pids if p not in roles})
                commands0 = redis_commands(server)
                cpu0 = cpu_seconds(pids)
                start = time.perf_counter()
                ids = client.submit_batch(specs)
                for job in client.as_completed(ids, timeout=600):
                    if job.state.value != "done":
                        raise RuntimeError(f"job {job.id} {job.state.value}: {job.error}")
                    farm_render_s.append(job.timings["total_s"] / job.timings.get("batch_size", 1.0))
                    # the PNG bytes from the farm's result store, as the direct loop has them (FarmClient.result
                    # also decodes them: a fraction of a millisecond at 64x64, counted against the farm)
                    if not client.result(job.id).png:
                        raise RuntimeError(f"job {job.id}: no image read back")
                wall = time.perf_counter() - start
                cpu1 = cpu_seconds(pids | farm_pids())
                for role, seconds in cpu_by_role(cpu0, cpu1, roles).items():
                    by_role.setdefault(role, []).append(seconds / len(specs))
                return wall, cpu_spent(cpu0, cpu1), redis_commands(server) - commands0 - 1  # less the INFO that read it

            direct(specs_for(-1, min(jobs, batch * 2)))  # warm both paths (first-call allocations, kernels)
            through_farm(specs_for(-1, min(jobs, batch * 2)))
            by_role.clear()  # the warm-up is not a round
            farm_render_s.clear()
            render_s.clear()
            time.sleep(settings.heartbeat_seconds * 1.5)  # node records carry their counters of the warm-up
            trips0 = round_trips(farm, client)
            farm_wall, farm_cpu, direct_wall, direct_cpu, commands = [], [], [], [], []
            saved_wall, saved_cpu = [], []
            def farm_round(r: int) -> None:
                wall, cpu, cmds = through_farm(specs_for(r, jobs))
                farm_wall.append(wall / jobs)
                farm_cpu.append(cpu / jobs)
                commands.append(cmds / jobs)

            def direct_round(r: int) -> None:
                wall, cpu = direct(specs_for(r, jobs))
                direct_wall.append(wall / jobs)
                direct_cpu.append(cpu / jobs)

            def saving_round(r: int) -> None:
                wall, cpu = direct(specs_for(r, jobs), saved_to=kept)
                saved_wall.append(wall / jobs)
                saved_cpu.append(cpu / jobs)

            for r in range(rounds):
                # Each contender's place in the round alternates, so none always runs right after the farm
                # (whose heartbeats and Ray housekeeping go on a moment after its last job).
                order = [farm_round, direct_round, saving_round]
                for contender in order if r % 2 == 0 else order[::-1]:
                    contender(r)
                say(f"batch {batch} round {r + 1}: farm {farm_wall[-1] * 1e3:.1f} ms/job wall, "
                    f"{farm_cpu[-1] * 1e3:.1f} ms/job CPU; direct {direct_wall[-1] * 1e3:.1f} ms wall, "
                    f"{direct_cpu[-1] * 1e3:.1f} ms CPU")
            time.sleep(settings.heartbeat_seconds * 1.5)  # the node records catch up with the last round
            trips1 = round_trips(farm, client)
            niceness = actor_niceness(farm_pids())
            server.close()
    total = jobs * rounds
    trips = {k: None if trips0[k] is None or trips1[k] is None else round((trips1[k] - trips0[k]) / total, 2)
             for k in trips0}
    per_job = [trips["client"], trips["workers"], trips["scheduler"]]
    fw, fc, dw, dc = summary(farm_wall), summary(farm_cpu), summary(direct_wall), summary(direct_cpu)
    sw, sc = summary(saved_wall), summary(saved_cpu)
    return {
        "batch": batch,
        "niceness": {"direct": os.nice(0), **niceness},
        "farm_wall_ms": {k: round(v * 1e3, 2) for k, v in fw.items()},
        "direct_wall_ms": {k: round(v * 1e3, 2) for k, v in dw.items()},
        "farm_cpu_ms": {k: round(v * 1e3, 2) for k, v in fc.items()},
        "direct_cpu_ms": {k: round(v * 1e3, 2) for k, v in dc.items()},
        # where the farm's CPU went, per job (median over rounds): client, redis, worker, scheduler, ray daemons
        "farm_cpu_ms_by_role": {role: round(statistics.median(v) * 1e3, 2) for role, v in sorted(by_role.items())},
        "direct_saving_wall_ms": {k: round(v * 1e3, 2) for k, v in sw.items()},
        "direct_saving_cpu_ms": {k: round(v * 1e3, 2) for k, v in sc.items()},
        # against a direct loop that also writes each PNG (synced to disk) as the farm's node does
        "wall_ratio_saving": round(fw["median"] / sw["median"], 3),
        "cpu_ratio_saving": round(fc["median"] / sc["median"], 3),
        # what the farm adds to each job, in ms: a fixed cost, so the ratio falls as a job's work grows
        "added_wall_ms": round((fw["median"] - dw["median"]) * 1e3, 2),
        "added_cpu_ms": round((fc["median"] - dc["median"]) * 1e3, 2),
        "wall_ratio": round(fw["median"] / dw["median"], 3),
        "cpu_ratio": round(fc["median"] / dc["median"], 3),
        "goal_ratio": GOAL_RATIO,
        "meets_goal": fw["median"] / dw["median"] <= GOAL_RATIO and fc["median"] / dc["median"] <= GOAL_RATIO,
        # render_batch's own time per job on each side (the node's, from its jobs' timings): the part of the
        # farm's extra wall that is inside the render (a slower render on the node) rather than around it
        "render_ms_per_job": {"farm": round(statistics.median(farm_render_s) * 1e3, 2),
                              "direct": round(statistics.median(render_s) * 1e3, 2)},
        "redis_commands_per_job": round(statistics.median(commands), 2),
        "redis_round_trips_per_job": trips,
        # client + workers (per batch) + scheduler; None while the scheduler reports none (see round_trips)
        "redis_round_trips_per_job_total": None if None in per_job else round(sum(per_job), 2),
    }


def run(jobs: int, rounds: int, sizes: list[int], quiet: bool, ray_niceness: int | None = None,
        threads: int | None = None, image_size: int = SIZE, steps: int = STEPS) -> dict[str, Any]:
    import torch

    global SIZE, STEPS
    SIZE, STEPS = image_size, steps  # read by specs_for and the direct loop
    from renderfarm.actors.pipelines import PipelineCache
    from renderfarm.config import NodeDeclaration
    from renderfarm.planning.catalog import default_catalog
    from renderfarm.planning.choose import choose_profile
    from renderfarm.planning.devices import device_from_declaration

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    threads = threads or os.cpu_count() or 1  # the same torch threads on both sides
    torch.set_num_threads(threads)
    # the farm's actors at the direct loop's priority (Ray's default is nice 15): read by the raylet at start
    os.environ["RAY_worker_niceness"] = str(os.nice(0) if ray_niceness is None else ray_niceness)
    entry = default_catalog().get(MODEL)
    node = NodeDeclaration(name="bench", vram_gib=24, compute_capability="8.6")
    profile = choose_profile(entry, device_from_declaration(node), SIZE, SIZE, 1).chosen
    pipe, _ = PipelineCache(device="cpu").get(entry, profile)  # the profile the farm's node picks
    pipe.set_progress_bar_config(disable=True)
    results = [measure_size(b, jobs, rounds, threads, pipe, entry, node, say) for b in sizes]
    return {"model": MODEL, "size": f"{SIZE}x{SIZE}", "steps": STEPS, "jobs": jobs, "rounds": rounds,
            "torch_threads": threads, "profile": profile.name, "cores": os.cpu_count(), "sizes": results}


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['jobs']} jobs x {report['rounds']} interleaved rounds, {report['model']} {report['size']} "
          f"{report['steps']} steps, profile {report['profile']}, {report['torch_threads']} torch threads; "
          "per job, median [min-max] over rounds")
    print(f"  {'batch':>5} {'farm wall ms':>22} {'direct wall ms':>22} {'ratio':>6} {'farm CPU ms':>22} "
          f"{'direct CPU ms':>22} {'ratio':>6}  goal")
    for s in report["sizes"]:
        def cell(key):
            v = s[key]
            return f"{v['median']:.1f} [{v['min']:.1f}-{v['max']:.1f}]"
        verdict = "ok" if s["meets_goal"] else "MISSED"
        print(f"  {s['batch']:>5} {cell('farm_wall_ms'):>22} {cell('direct_wall_ms'):>22} {s['wall_ratio']:>6.2f} "
              f"{cell('farm_cpu_ms'):>22} {cell('direct_cpu_ms'):>22} {s['cpu_ratio']:>6.2f}  "
              f"<= {s['goal_ratio']:.2f} {verdict}")
    for s in report["sizes"]:
        r = s["render_ms_per_job"]
        print(f"  batch {s['batch']}: the farm adds {s['added_wall_ms']:.1f} ms wall and {s['added_cpu_ms']:.1f} ms CPU "
              f"to each job; render_batch itself takes {r['farm']:.1f} ms a job on the node, {r['direct']:.1f} ms here")
    print("  the direct loop also writing each PNG to the same kind of result store (synced), one after another:")
    for s in report["sizes"]:
        w, c = s["direct_saving_wall_ms"], s["direct_saving_cpu_ms"]
        print(f"  {s['batch']:>5} direct+store wall {w['median']:.1f} [{w['min']:.1f}-{w['max']:.1f}] ms, "
              f"farm/that {s['wall_ratio_saving']:.2f}; CPU {c['median']:.1f} ms, farm/that {s['cpu_ratio_saving']:.2f}")
    for s in report["sizes"]:
        parts = ", ".join(f"{role} {ms:.1f}" for role, ms in s["farm_cpu_ms_by_role"].items())
        print(f"  batch {s['batch']}: the farm's CPU ms per job by process: {parts}")
    for s in report["sizes"]:
        nice = ", ".join(f"{k} {v}" for k, v in s["niceness"].items())
        print(f"  batch {s['batch']}: niceness: {nice}")
        t = s["redis_round_trips_per_job"]
        scheduler = "not reported yet" if t["scheduler"] is None else f"{t['scheduler']}"
        total = "?" if s["redis_round_trips_per_job_total"] is None else s["redis_round_trips_per_job_total"]
        print(f"  batch {s['batch']}: Redis per job: {s['redis_commands_per_job']} commands; round trips "
              f"{total} (client {t['client']}, workers {t['workers']}, scheduler {scheduler}; "
              f"timed: workers {t['workers_timed']}) (target at batch 1: <= 3)")


def round_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The options every side-by-side bench takes (this one and serve_peer.py)."""
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--jobs", type=int, default=32, help="jobs per round (default 32)")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"timed rounds per contender (default {rounds})")
    parser.add_argument("--sizes", default="1,8", help="batch sizes, comma-separated (default 1,8)")


def round_plan(parser: argparse.ArgumentParser, args: argparse.Namespace, quick: tuple[int, int]) -> tuple:
    """(jobs, rounds, batch sizes) from `round_arguments`' options, `quick` the jobs and rounds of --quick."""
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: expected batch sizes separated by commas")
    jobs, rounds = quick if args.quick else (args.jobs, args.rounds)
    if jobs < 1 or rounds < 1 or any(not 1 <= s <= 64 for s in sizes):
        parser.error("--jobs and --rounds must be at least 1, each of --sizes within 1..64")
    return jobs, rounds, sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    round_arguments(parser, rounds=5)
    parser.add_argument("--ray-niceness", type=int, default=None,
                        help="niceness of the farm's Ray workers (default: this process's, like the direct loop)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch threads of the node and of the direct loop alike (default: every core; 1 on a "
                             "2-core machine leaves the farm's scheduler, Redis and client a core of their own)")
    parser.add_argument("--image-size", type=int, default=SIZE,
                        help=f"width and height of every job, a multiple of 8 within 64..512 (default {SIZE})")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"denoising steps of every job, 1..50 (default {STEPS})")
    parser.add_argument("--quick", action="store_true", help="8 jobs, 2 rounds: a smoke run (tests/bench)")
    args = parser.parse_args(argv)
    jobs, rounds, sizes = round_plan(parser, args, quick=(8, 2))
    if not 64 <= args.image_size <= 512 or args.image_size % 8:
        parser.error(f"--image-size {args.image_size}: expected a multiple of 8 within 64..512")
    if not 1 <= args.steps <= 50:
        parser.error(f"--steps {args.steps}: expected 1..50")
    report = run(jobs, rounds, sizes, quiet=args.json, ray_niceness=args.ray_niceness, threads=args.torch_threads,
                 image_size=args.image_size, steps=args.steps)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
