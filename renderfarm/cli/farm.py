"""The farm commands: `up` (a farm in the foreground), `worker` (this machine joins a farm), `demo` (a
private farm renders a mixed batch), `dashboard` (the Streamlit dashboard)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from renderfarm.cli.common import (
    EXIT_ERROR,
    FARM_FILE,
    emit,
    follow,
    log,
    resolve_url,
    settings_from,
    stderr_console,
    stop_on_signals,
)
from renderfarm.cluster.processes import write_private
from renderfarm.config import Settings, load_nodes, two_card_nodes
from renderfarm.errors import CliError


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             with_redis: argparse.ArgumentParser) -> None:
    up = sub.add_parser("up", parents=[common, with_redis], help="run a farm in the foreground")
    up.add_argument("--nodes", help="nodes YAML: simulated nodes (machines without GPUs), or overrides per GPU")
    up.add_argument("--head", action="store_true",
                    help="other machines join this farm (`renderfarm worker`): Redis and Ray listen for them")
    up.add_argument("--advertise-ip", metavar="IP", help="with --head: the address other machines reach "
                    "(default: this machine's, as Ray sees it)")
    up.add_argument("--ray-port", type=int, default=6379, help="with --head: the Ray head's port (default 6379)")
    up.add_argument("--no-workers", action="store_true", help="with --head: no workers on this machine")
    up.set_defaults(func=cmd_up)

    worker = sub.add_parser("worker", parents=[common, with_redis],
                            help="join this machine's GPUs to a farm whose head runs elsewhere")
    worker.add_argument("--address", required=True, metavar="HEAD:PORT", help="the Ray head (`up --head` prints it)")
    worker.add_argument("--nodes", help="nodes YAML: simulated nodes (no GPU here), or overrides per GPU")
    worker.add_argument("--ray-token", metavar="TOKEN", help="the Ray cluster's token (prefer the RAY_AUTH_TOKEN "
                        "environment variable: a command line is visible to other users)")
    worker.add_argument("--warm", action="append", metavar="MODEL", help="load this model before taking work "
                        "(repeatable)")
    worker.set_defaults(func=cmd_worker)

    demo = sub.add_parser("demo", parents=[common, with_redis], help="a local farm renders a mixed batch")
    demo.add_argument("--nodes", help="nodes YAML (default: a 24 GiB and an 8 GiB simulated node)")
    demo.add_argument("--jobs", type=int, default=24, help="number of jobs (default 24)")
    demo.add_argument("--out", default="renders", help="where to save the PNGs (default ./renders)")
    demo.add_argument("--timeout", type=float, default=600.0)
    demo.set_defaults(func=cmd_demo)

    dashboard = sub.add_parser("dashboard", parents=[common, with_redis], help="the Streamlit dashboard")
    dashboard.add_argument("--port", type=int, default=8501)
    dashboard.add_argument("--address", default="127.0.0.1", help="interface to listen on (default loopback)")
    dashboard.add_argument("--prefix", default="rf", help=argparse.SUPPRESS)
    dashboard.set_defaults(func=cmd_dashboard)


def cmd_up(args: argparse.Namespace) -> int:
    from renderfarm.farm import Farm

    settings = settings_from(args)
    nodes = load_nodes(args.nodes) if args.nodes else None
    if args.no_workers and not args.head:
        raise CliError("--no-workers goes with --head (a farm without a head and without workers does nothing)")
    advertise = args.advertise_ip or (_this_machine_ip() if args.head else None)
    farm_file = settings.data_dir / FARM_FILE
    stop = stop_on_signals()
    with Farm(settings, nodes, head=args.head, advertise_ip=advertise, ray_port=args.ray_port if args.head else None,
              local_workers=not args.no_workers) as farm:
        info = {"redis_url": farm.redis_url, "ray_address": farm.ray_address_in_use,
                "ray_temp_dir": farm.ray_temp_dir, "redis_pid": farm.redis_pid, "nodes": farm.nodes,
                "data_dir": str(settings.data_dir), "pid": os.getpid(), "head": args.head}
        if args.head:
            from renderfarm.farm import RAY_TOKEN_FILE

            token_file = settings.data_dir / RAY_TOKEN_FILE
            info["ray_token_file"] = str(token_file)
            # Secrets travel in the environment, never on a command line others can read with `ps`.
            info["join"] = (f"RAY_AUTH_TOKEN=\"$(cat {token_file})\" RENDERFARM_REDIS_URL='{farm.redis_url}' "
                            f"renderfarm worker --address {farm.ray_address_in_use}")
        write_private(farm_file, json.dumps(info))  # it holds the Redis URL, password included
        try:
            emit(args, {"ok": True, **info}, _farm_summary(info))
            log.info("farm is up; Ctrl-C stops it")
            stop.wait()
        finally:
            farm_file.unlink(missing_ok=True)
    log.info("farm stopped")
    return 0


def _this_machine_ip() -> str:
    """The address other machines reach this one at, as Ray sees it."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def cmd_worker(args: argparse.Namespace) -> int:
    """Join this machine's GPUs (or declared nodes) to a farm whose head runs elsewhere; Ctrl-C leaves."""
    from renderfarm.farm import WorkerNode

    settings = settings_from(args)
    if not settings.redis_url:
        raise CliError("--redis URL (or RENDERFARM_REDIS_URL): the farm's Redis, as `renderfarm up --head` printed it")
    token = args.ray_token or os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        raise CliError("the Ray cluster's token: set RAY_AUTH_TOKEN (the head keeps it in "
                       "<data_dir>/ray_auth_token), or pass --ray-token")
    nodes = load_nodes(args.nodes) if args.nodes else None
    stop = stop_on_signals()
    with WorkerNode(settings, args.address, settings.redis_url, nodes, ray_token=token,
                    log_to_driver=args.debug, warm_models=args.warm) as node:
        info = {"address": args.address, "nodes": node.nodes, "pid": os.getpid()}
        emit(args, {"ok": True, **info}, "\n".join(
            f"node   {n['name']}: {n.get('gpu') or ''} {n.get('vram_gib')} GiB joined {args.address}"
            for n in node.nodes))
        log.info("this machine is in the farm; Ctrl-C takes it out")
        stop.wait()
    log.info("left the farm")
    return 0


def _farm_summary(info: dict[str, Any]) -> str:
    from renderfarm.cluster.redis_server import redact

    lines = [f"redis  {redact(info['redis_url'])}", f"ray    {info['ray_address']}"]
    for node in info["nodes"]:
        kind = "simulated on CPU" if node.get("simulated") else node.get("device", "")
        lines.append(f"node   {node['name']}: {node.get('gpu') or ''} {node.get('vram_gib')} GiB ({kind})")
    return "\n".join(lines)


DEMO_PROMPTS = [
    "a lighthouse on a cliff at dusk, volumetric light",
    "a red fox in fresh snow, telephoto",
    "an isometric city block, soft shadows",
    "a bowl of ramen, studio lighting",
    "a sailing ship in a storm, oil painting",
    "a robot tending a garden, morning mist",
]


# (model, size, steps): a mixed batch over the three families and several sizes.
DEMO_MIX = [
    ("tiny-sd15", 64, 4), ("tiny-sd15", 96, 4), ("tiny-sdxl", 64, 4),
    ("tiny-sdxl", 128, 4), ("tiny-flux", 64, 4), ("tiny-flux", 128, 4), ("tiny-sd3", 64, 4),
]
DEMO_LORA_EVERY = 3  # every third demo job carries its model's stand-in LoRA, written the A1111 way
DEMO_HIRES_EVERY = 8  # every eighth is a hires fix: two chained jobs, the second at twice the size (docs/chains.md)


def demo_specs(count: int) -> list[dict[str, Any]]:
    specs = []
    for i in range(count):
        model, size, steps = DEMO_MIX[i % len(DEMO_MIX)]
        prompt = DEMO_PROMPTS[i % len(DEMO_PROMPTS)]
        if i % DEMO_LORA_EVERY == DEMO_LORA_EVERY - 1:
            prompt += f" <lora:{model}-style:0.8>"  # the stand-in LoRAs (renderfarm loras)
        spec = {"model": model, "prompt": prompt, "width": size, "height": size, "steps": steps, "seed": 1000 + i,
                "team": "demo", "tags": ["demo"]}
        if i % DEMO_HIRES_EVERY == DEMO_HIRES_EVERY - 1:
            spec["hires"] = {"scale": 2, "strength": 0.5}
        specs.append(spec)
    return specs


def cmd_demo(args: argparse.Namespace) -> int:
    from renderfarm.farm import Farm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo renders stand-ins only
    started = time.monotonic()
    nodes = load_nodes(args.nodes) if args.nodes else two_card_nodes()
    with tempfile.TemporaryDirectory(prefix="rf-demo-") as tmp:
        settings = Settings.load(args.config, redis_url=args.redis, data_dir=Path(tmp))
        log.info("starting a local farm with %d simulated nodes", len(nodes))
        with Farm(settings, nodes, log_to_driver=args.debug) as farm:
            client = farm.client()
            specs = demo_specs(args.jobs)
            ids = client.submit_batch(specs)
            log.info("submitted %d jobs", len(ids))
            outcome = follow(client, ids, Path(args.out), args.timeout, quiet=args.json)
            per_node = Counter(job.node for job in outcome["done"])
            records = {n["name"]: n for n in client.store.nodes()}
            node_rows = [
                {"name": n["name"], "gpu": n.get("gpu"), "vram_gib": n["vram_gib"],
                 "compute_capability": n.get("compute_capability"), "simulated": n["simulated"],
                 "jobs_done": per_node.get(n["name"], 0),
                 "profiles": records.get(n["name"], {}).get("profiles", {})}
                for n in farm.nodes
            ]
    seconds = round(time.monotonic() - started, 2)
    payload = {
        "ok": not outcome["failed"], "jobs": len(ids), "done": len(outcome["done"]),
        "hires_fixes": sum(1 for spec in specs if "hires" in spec),  # each also ran its first pass, ID-base
        "failed": len(outcome["failed"]), "seconds": seconds, "images": outcome["images"],
        "nodes": node_rows, "out": str(Path(args.out).resolve()),
    }
    if not args.json:
        from rich.table import Table

        table = Table(title=f"renderfarm demo: {payload['done']}/{payload['jobs']} jobs in {seconds} s")
        for col in ("node", "card (declared)", "VRAM GiB", "cc", "jobs done"):
            table.add_column(col)
        for row in node_rows:
            table.add_row(row["name"], row["gpu"] or "", f"{row['vram_gib']:g}", row["compute_capability"] or "",
                          str(row["jobs_done"]))
        stderr_console().print(table)
        for row in node_rows:  # what each card chose: the per-card profile, applied on its CPU stand-in
            chosen = ", ".join(f"{m} {p}" for m, p in sorted(row["profiles"].items())) or "-"
            print(f"{row['name']} profiles: {chosen}")
        print(f"{len(outcome['images'])} images saved under {payload['out']} ({payload['hires_fixes']} of them hires "
              "fixes: a first pass, then a second at twice the size from it)")
        for job in outcome["failed"]:
            print(f"failed {job.id}: {job.error}")
    emit(args, payload)
    return 0 if not outcome["failed"] else EXIT_ERROR


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Run the Streamlit dashboard against the farm's Redis (it reads Redis only, never Ray)."""
    import subprocess

    from renderfarm.cluster.redis_server import redact

    url = resolve_url(args)
    app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    command = [
        sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
        "--server.address", args.address, "--server.headless", "true", "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal", "--", "--prefix", args.prefix,
    ]
    # The URL may carry a password: it travels in the environment, never on a command line others can read.
    env = {**os.environ, "RENDERFARM_REDIS_URL": url}
    log.info("dashboard for %s on http://%s:%d (Ctrl-C stops it)", redact(url), args.address, args.port)
    if args.json:
        emit(args, {"ok": True, "url": f"http://{args.address}:{args.port}", "redis": redact(url)})
    return subprocess.call(command, env=env)
