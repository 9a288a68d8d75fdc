"""The farm beside its peer, Ray Serve, in one run: the same jobs, the same stand-in pipelines and render code.

    pip install -e '.[peer]'        # Ray Serve (ray[serve], pinned to the installed ray); not needed by the tests
    python bench/serve_peer.py [--json] [--jobs 32] [--rounds 3] [--sizes 1,8]
    python bench/serve_peer.py --quick               # 8 jobs, 1 round, batch 8 only: does it run

Contenders, on one private Ray (the farm's), two simulated nodes' worth of each:
- `farm`: a farm of two simulated nodes (24 GiB cards declared, running on the CPU), max batch B;
- `serve`: a Ray Serve deployment of 2 replicas, `@serve.batch(max_batch_size=B)`, each replica holding a
  PipelineCache like a worker's (at most 2 pipelines); requests of several models in one batch are rendered
  one pipeline call per model;
- `serve-mux`: the same with model multiplexing (`@serve.multiplexed(max_num_models_per_replica=2)`, requests
  sent with `multiplexed_model_id`, so Serve routes each to a replica holding its model).
Both render with renderfarm.actors.pipelines.render_batch (PNG bytes out) and the profile a 24 GiB node
picks, at 64x64 and 2 steps, one torch thread per worker or replica (two of each on the machine); a Serve
replica may hold as many requests as a farm worker may hold batches (2 x B). Workloads: `single` (every job
tiny-sd15) and `mixed` (tiny-sd15, tiny-sdxl, tiny-flux in a seeded shuffle); batch 1 and B. Each round
submits every job at once and waits for every image; rounds are interleaved (farm, serve, serve-mux, ...)
after one untimed warm round each. Figures: jobs/s, wall per round, CPU per job summed over the contender's
processes during its rounds: this process (the client), the contender's own actors (farm: Scheduler,
RenderWorker, and redis-server; Serve: ServeController and its replicas), and the Ray processes both share
(raylet, GCS, agents). The farm's Ray workers run at this process's niceness, as Serve's replicas do (see
bench/overhead.py). Figures taken while other work runs on the machine are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ("tiny-sd15", "tiny-sdxl", "tiny-flux")
SIZE, STEPS, GUIDANCE = 64, 2, 5.0
REPLICAS = 2
MAX_MODELS = 2  # a worker's PipelineCache holds 2 pipelines (actors/pipelines.py DEFAULT_MAX_PIPELINES)
INSTALL = "pip install -e '.[peer]'   (or: pip install 'ray[serve]==<your ray version>')"


def need_serve() -> None:
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        sys.exit(f"bench/serve_peer.py needs Ray Serve, which is not installed ({exc}).\nInstall it with: {INSTALL}")


class Peer:
    """One Serve replica: a PipelineCache like a worker's, render_batch per model group of a batch."""

    def __init__(self, multiplexed: bool):
        import torch

        from renderfarm.actors.pipelines import PipelineCache
        from renderfarm.config import NodeDeclaration
        from renderfarm.planning.catalog import default_catalog
        from renderfarm.planning.devices import device_from_declaration

        os.environ["HF_HUB_OFFLINE"] = "1"
        torch.set_num_threads(1)
        self.multiplexed = multiplexed
        self.catalog = default_catalog()
        self.card = device_from_declaration(NodeDeclaration(name="peer", vram_gib=24, compute_capability="8.6"))
        self.cache = PipelineCache(device="cpu", max_pipelines=MAX_MODELS)

    def load(self, model: str):
        from renderfarm.planning.choose import choose_profile

        entry = self.catalog.get(model)
        pipe, _ = self.cache.get(entry, choose_profile(entry, self.card, SIZE, SIZE, 1).chosen)
        pipe.set_progress_bar_config(disable=True)
        return entry, pipe

    def render(self, model_and_pipe, specs: list[dict]) -> list[list[bytes]]:
        from renderfarm.actors.pipelines import RenderRequest, render_batch

        entry, pipe = model_and_pipe
        requests = [RenderRequest(s["id"], s["prompt"], "", SIZE, SIZE, STEPS, GUIDANCE, s["seed"], 1) for s in specs]
        return [r.images for r in render_batch(pipe, entry, requests)]

    async def handle_batch(self, specs: list[dict], get_model) -> list[list[bytes]]:
        out: dict[str, list[bytes]] = {}
        loop = asyncio.get_running_loop()
        for model in dict.fromkeys(s["model"] for s in specs):
            group = [s for s in specs if s["model"] == model]
            loaded = await get_model(model)
            images = await loop.run_in_executor(None, self.render, loaded, group)
            out.update({s["id"]: imgs for s, imgs in zip(group, images)})
        return [out[s["id"]] for s in specs]


def deployments(batch: int):
    """The two Serve applications: plain (@serve.batch) and multiplexed (+ @serve.multiplexed)."""
    from ray import serve

    options = {"num_replicas": REPLICAS, "max_ongoing_requests": 2 * batch, "ray_actor_options": {"num_cpus": 0}}

    @serve.deployment(**options)
    class PlainPeer(Peer):
        def __init__(self):
            super().__init__(multiplexed=False)

        async def _get(self, model):
            return await asyncio.get_running_loop().run_in_executor(None, self.load, model)

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=0.01)
        async def __call__(self, specs: list[dict]) -> list[list[bytes]]:
            return await self.handle_batch(specs, self._get)

    @serve.deployment(**options)
    class MuxPeer(Peer):
        def __init__(self):
            super().__init__(multiplexed=True)

        @serve.multiplexed(max_num_models_per_replica=MAX_MODELS)
        async def get_model(self, model_id: str):
            return await asyncio.get_running_loop().run_in_executor(None, self.load, model_id)

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=0.01)
        async def __call__(self, specs: list[dict]) -> list[list[bytes]]:
            return await self.handle_batch(specs, self.get_model)

    return PlainPeer.bind(), MuxPeer.bind()


def workload(kind: str, jobs: int, round_no: int) -> list[dict[str, Any]]:
    rng = random.Random(round_no)
    models = [MODELS[0]] * jobs if kind == "single" else [MODELS[i % len(MODELS)] for i in range(jobs)]
    rng.shuffle(models)
    return [{"id": f"r{round_no}-{i}", "model": m, "prompt": f"peer round {round_no} job {i}", "seed": i}
            for i, m in enumerate(models)]


def farm_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return {"model": spec["model"], "prompt": spec["prompt"], "negative_prompt": "", "width": SIZE, "height": SIZE,
            "steps": STEPS, "guidance": GUIDANCE, "seed": spec["seed"]}


def classify(pids: set[int]) -> dict[str, set[int]]:
    """The Ray cluster's processes by owner: the farm's actors, Serve's actors, and the rest (shared)."""
    import psutil

    out: dict[str, set[int]] = {"farm": set(), "serve": set(), "shared": set()}
    for pid in pids:
        try:
            cmd = psutil.Process(pid).cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        name = cmd[0] if cmd else ""
        owner = ("farm" if name.startswith(("ray::RenderWorker", "ray::Scheduler"))
                 else "serve" if name.startswith(("ray::ServeController", "ray::ServeReplica", "ray::ProxyActor"))
                 else "shared")
        out[owner].add(pid)
    return out


def run(jobs: int, rounds: int, sizes: list[int], quiet: bool) -> dict[str, Any]:
    need_serve()
    import redis
    from overhead import cpu_seconds, cpu_spent, redis_commands  # bench/overhead.py: the same CPU accounting
    from ray import serve

    from renderfarm.cluster.ray_processes import cluster_pids
    from renderfarm.config import NodeDeclaration, Settings
    from renderfarm.farm import Farm

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    os.environ["RAY_worker_niceness"] = str(os.nice(0))  # the farm's actors at the replicas' priority
    nodes = [NodeDeclaration(name=f"node{i}", vram_gib=24, compute_capability="8.6") for i in range(2)]
    results = []
    for batch in sizes:
        with tempfile.TemporaryDirectory(prefix="rf-peer-") as tmp:
            settings = Settings(data_dir=Path(tmp), max_batch=batch, torch_threads=1)
            with Farm(settings, nodes, warm_models=list(MODELS[:MAX_MODELS]), log_to_driver=False) as farm:
                client = farm.client()
                server = redis.Redis.from_url(farm.redis_url)
                serve.start(proxy_location="Disabled")
                try:
                    plain_app, mux_app = deployments(batch)
                    plain = serve.run(plain_app, name=f"peer-plain-{batch}", route_prefix=None)
                    mux = serve.run(mux_app, name=f"peer-mux-{batch}", route_prefix=None)

                    def pids_of(who: str) -> set[int]:
                        groups = classify(cluster_pids(Path(farm.ray_temp_dir), set()))
                        extra = {farm.redis_pid} if who == "farm" else set()
                        return {os.getpid()} | groups[who] | groups["shared"] | extra

                    def through_farm(specs):
                        ids = client.submit_batch([farm_spec(s) for s in specs])
                        for job in client.as_completed(ids, timeout=600):
                            if job.state.value != "done":
                                raise RuntimeError(f"farm job {job.id} {job.state.value}: {job.error}")
                            if not client.result(job.id).png:  # from the result store (decoded too)
                                raise RuntimeError(f"farm job {job.id}: no image read back")

                    def through_serve(handle, multiplexed: bool):
                        def go(specs):
                            calls = [(handle.options(multiplexed_model_id=s["model"]) if multiplexed else handle)
                                     .remote(s) for s in specs]
                            for call in calls:
                                if not call.result(timeout_s=600):
                                    raise RuntimeError("serve returned no image")
                        return go

                    contenders = {"farm": through_farm, "serve": through_serve(plain, False),
                                  "serve-mux": through_serve(mux, True)}

                    def timed(name, specs):
                        who = "farm" if name == "farm" else "serve"
                        pids = pids_of(who)
                        commands0 = redis_commands(server) if name == "farm" else 0
                        cpu0 = cpu_seconds(pids)
                        start = time.perf_counter()
                        contenders[name](specs)
                        wall = time.perf_counter() - start
                        cpu = cpu_spent(cpu0, cpu_seconds(pids | pids_of(who)))
                        commands = redis_commands(server) - commands0 - 1 if name == "farm" else None
                        return wall, cpu, commands

                    for kind in ("single", "mixed"):
                        for name in contenders:  # warm: every model loaded where it will be, first calls done
                            timed(name, workload(kind, jobs, -1))
                        figures: dict[str, dict[str, list[float]]] = {
                            n: {"wall": [], "cpu": [], "commands": []} for n in contenders}
                        for r in range(rounds):
                            specs = workload(kind, jobs, r)
                            for name in contenders:
                                wall, cpu, commands = timed(name, specs)
                                figures[name]["wall"].append(wall)
                                figures[name]["cpu"].append(cpu / jobs)
                                if commands is not None:
                                    figures[name]["commands"].append(commands / jobs)
                                say(f"batch {batch} {kind} round {r + 1}: {name} {jobs / wall:.1f} jobs/s, "
                                    f"{cpu / jobs * 1e3:.0f} ms CPU/job")
                        for name, f in figures.items():
                            wall = statistics.median(f["wall"])
                            results.append({
                                "batch": batch, "workload": kind, "contender": name, "jobs": jobs,
                                "jobs_per_s": round(jobs / wall, 2),
                                "jobs_per_s_range": [round(jobs / max(f["wall"]), 2), round(jobs / min(f["wall"]), 2)],
                                "wall_s": round(wall, 3),
                                "cpu_ms_per_job": round(statistics.median(f["cpu"]) * 1e3, 1),
                                "cpu_ms_per_job_range": [round(min(f["cpu"]) * 1e3, 1), round(max(f["cpu"]) * 1e3, 1)],
                                "redis_commands_per_job": round(statistics.median(f["commands"]), 1)
                                if f["commands"] else None,
                            })
                finally:
                    serve.shutdown()
                    server.close()
    return {"models": list(MODELS), "size": f"{SIZE}x{SIZE}", "steps": STEPS, "jobs": jobs, "rounds": rounds,
            "replicas": REPLICAS, "farm_nodes": len(nodes), "rows": results}


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['jobs']} jobs x {report['rounds']} interleaved rounds; farm of {report['farm_nodes']} simulated "
          f"nodes vs Ray Serve with {report['replicas']} replicas; {report['size']}, {report['steps']} steps; "
          "median [range] over rounds")
    print(f"  {'batch':>5} {'workload':<8} {'contender':<10} {'jobs/s':>20} {'vs farm':>7} {'wall s':>7} "
          f"{'CPU ms/job':>20} {'Redis cmds/job':>14}")
    farm = {(r["batch"], r["workload"]): r for r in report["rows"] if r["contender"] == "farm"}
    for r in report["rows"]:
        base = farm[(r["batch"], r["workload"])]
        low, high = r["jobs_per_s_range"]
        clow, chigh = r["cpu_ms_per_job_range"]
        cmds = "-" if r["redis_commands_per_job"] is None else f"{r['redis_commands_per_job']:.1f}"
        print(f"  {r['batch']:>5} {r['workload']:<8} {r['contender']:<10} "
              f"{r['jobs_per_s']:>7.2f} [{low:.2f}-{high:.2f}] {r['jobs_per_s'] / base['jobs_per_s']:>7.2f} "
              f"{r['wall_s']:>7.2f} {r['cpu_ms_per_job']:>7.0f} [{clow:.0f}-{chigh:.0f}] {cmds:>14}")


def main(argv: list[str] | None = None) -> int:
    from overhead import round_arguments, round_plan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    round_arguments(parser, rounds=3)
    parser.add_argument("--quick", action="store_true", help="8 jobs, 1 round, batch 8")
    args = parser.parse_args(argv)
    jobs, rounds, sizes = round_plan(parser, args, quick=(8, 1))
    if args.quick:
        sizes = [8]
    report = run(jobs, rounds, sizes, quiet=args.json)
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/overhead.py
    sys.exit(main())
