"""The `renderfarm` command. Every command takes --json (one JSON object on one line on stdout; logs
and progress go to stderr) and --debug (tracebacks). Errors are one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from renderfarm.config import ConfigError, Settings, load_nodes

EXIT_ERROR = 1
EXIT_USAGE = 2
FARM_FILE = "farm.json"
DEFAULT_PLAN_CC = "8.6"  # `plan` without --gpu or --compute-capability: an Ampere card  # written by `up` in its data dir so other commands find its Redis

log = logging.getLogger("renderfarm")


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


# --- helpers ---------------------------------------------------------------------------------------


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _emit(args: argparse.Namespace, payload: dict[str, Any], human: str | None = None) -> None:
    if args.json:
        sys.stdout.write(json.dumps(payload, default=str, separators=(",", ":")) + "\n")
        sys.stdout.flush()
    elif human is not None:
        print(human)


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.load(
        getattr(args, "config", None),
        redis_url=getattr(args, "redis", None),
        data_dir=getattr(args, "data_dir", None),
        nodes_file=getattr(args, "nodes", None),
    )


def _resolve_url(args: argparse.Namespace) -> str:
    """--redis, then RENDERFARM_REDIS_URL / the config file, then the URL a running `up` recorded."""
    settings = _settings(args)
    if settings.redis_url:
        return settings.redis_url
    farm_file = settings.data_dir / FARM_FILE
    if farm_file.exists():
        try:
            return json.loads(farm_file.read_text())["redis_url"]
        except (ValueError, KeyError) as exc:
            raise CliError(f"{farm_file} is not a farm record ({exc}); pass --redis URL") from None
    raise CliError(
        "no farm found: start one with `renderfarm up`, or pass --redis URL "
        f"(or set RENDERFARM_REDIS_URL); looked for {farm_file}"
    )


def _client(args: argparse.Namespace):
    from renderfarm.client import FarmClient

    return FarmClient(_resolve_url(args))


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None


def _save_images(client, job, out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(client.result(job.id).png):
        path = out / f"{job.id}_{i}.png"
        path.write_bytes(data)
        paths.append(str(path))
    return paths


def _follow(client, ids: list[str], out: Path | None, timeout: float | None, quiet: bool) -> dict[str, Any]:
    """Wait for `ids` with a progress bar on stderr, saving images as they arrive."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    done, failed, images = [], [], []
    progress = Progress(
        TextColumn("[bold]rendering"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=_stderr_console(), disable=quiet, transient=False,
    )
    with progress:
        task = progress.add_task("jobs", total=len(ids))
        for job in client.as_completed(ids, timeout=timeout):
            if job.state.value == "done":
                done.append(job)
                if out is not None:
                    images += _save_images(client, job, out)
            else:
                failed.append(job)
            progress.advance(task)
    return {"done": done, "failed": failed, "images": images}


# --- commands --------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from renderfarm.farm import Farm

    settings = _settings(args)
    nodes = load_nodes(args.nodes) if args.nodes else None
    farm_file = settings.data_dir / FARM_FILE
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with Farm(settings, nodes) as farm:
        info = {"redis_url": farm.redis_url, "ray_address": farm.ray_address_in_use,
                "ray_temp_dir": farm.ray_temp_dir, "redis_pid": farm.redis_pid, "nodes": farm.nodes,
                "data_dir": str(settings.data_dir), "pid": os.getpid()}
        farm_file.write_text(json.dumps(info))
        try:
            _emit(args, {"ok": True, **info}, _farm_summary(info))
            log.info("farm is up; Ctrl-C stops it")
            stop.wait()
        finally:
            farm_file.unlink(missing_ok=True)
    log.info("farm stopped")
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
    ("tiny-sdxl", 128, 4), ("tiny-flux", 64, 4), ("tiny-flux", 128, 4),
]


def demo_specs(count: int) -> list[dict[str, Any]]:
    specs = []
    for i in range(count):
        model, size, steps = DEMO_MIX[i % len(DEMO_MIX)]
        specs.append({"model": model, "prompt": DEMO_PROMPTS[i % len(DEMO_PROMPTS)], "width": size,
                      "height": size, "steps": steps, "seed": 1000 + i, "team": "demo", "tags": ["demo"]})
    return specs


def cmd_demo(args: argparse.Namespace) -> int:
    from renderfarm.config import NodeDeclaration
    from renderfarm.farm import Farm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the demo renders stand-ins only
    started = time.monotonic()
    nodes = load_nodes(args.nodes) if args.nodes else [
        NodeDeclaration(name="quadro-24g", gpu="Quadro RTX 6000", vram_gib=24, compute_capability="7.5"),
        NodeDeclaration(name="rtx-8g", gpu="GeForce RTX 3070", vram_gib=8, compute_capability="8.6"),
    ]
    with tempfile.TemporaryDirectory(prefix="rf-demo-") as tmp:
        settings = Settings.load(args.config, redis_url=args.redis, data_dir=Path(tmp))
        log.info("starting a local farm with %d simulated nodes", len(nodes))
        with Farm(settings, nodes, log_to_driver=args.debug) as farm:
            client = farm.client()
            specs = demo_specs(args.jobs)
            ids = client.submit_batch(specs)
            log.info("submitted %d jobs", len(ids))
            outcome = _follow(client, ids, Path(args.out), args.timeout, quiet=args.json)
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
        _stderr_console().print(table)
        for row in node_rows:  # what each card chose: the per-card profile, applied on its CPU stand-in
            chosen = ", ".join(f"{m} {p}" for m, p in sorted(row["profiles"].items())) or "-"
            print(f"{row['name']} profiles: {chosen}")
        print(f"{len(outcome['images'])} images saved under {payload['out']}")
        for job in outcome["failed"]:
            print(f"failed {job.id}: {job.error}")
    _emit(args, payload)
    return 0 if not outcome["failed"] else EXIT_ERROR


def cmd_submit(args: argparse.Namespace) -> int:
    if args.prompts:
        try:
            prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise CliError(f"--prompts {args.prompts}: {exc.strerror}") from None
        if not prompts:
            raise CliError(f"--prompts {args.prompts}: the file has no prompts")
    elif args.prompt:
        prompts = [args.prompt]
    else:
        raise CliError("give a PROMPT or --prompts FILE")
    client = _client(args)
    specs = []
    for prompt in prompts:
        for i in range(args.count):
            spec = {"model": args.model, "prompt": prompt, "negative_prompt": args.negative,
                    "priority": args.priority, "team": args.team, "num_images": args.images}
            # Left out, size, steps and guidance take the model's defaults (FarmClient.validate).
            if args.size:
                spec["width"], spec["height"] = args.size
            if args.steps is not None:
                spec["steps"] = args.steps
            if args.guidance is not None:
                spec["guidance"] = args.guidance
            if args.seed is not None:
                spec["seed"] = args.seed + i
            specs.append(spec)
    ids = client.submit_batch(specs)
    if args.no_wait:
        _emit(args, {"ok": True, "jobs": ids}, "\n".join(ids))
        return 0
    outcome = _follow(client, ids, Path(args.out), args.timeout, quiet=args.json)
    payload = {"ok": not outcome["failed"], "jobs": ids, "done": len(outcome["done"]),
               "failed": [{"id": j.id, "error": j.error} for j in outcome["failed"]], "images": outcome["images"]}
    human = "\n".join([*outcome["images"], *(f"failed {j.id}: {j.error}" for j in outcome["failed"])])
    _emit(args, payload, human)
    return 0 if not outcome["failed"] else EXIT_ERROR


def _job_row(client, job) -> dict[str, Any]:
    row = {"id": job.id, "state": job.state.value, "model": job.spec.model,
           "size": f"{job.spec.width}x{job.spec.height}", "steps": job.spec.steps, "node": job.node,
           "attempts": job.attempts, "error": job.error, "timings": job.timings,
           "peak_memory_mb": job.peak_memory_mb, "images": job.images, "profile": job.profile,
           "escalations": job.escalations}
    if job.state.value == "queued":
        estimate = client.estimates([job.id]).get(job.id, {})
        row["queue_position"] = estimate.get("position")
        row["eta_s"] = estimate.get("eta_s")
        row["waits_for"] = estimate.get("node")
        if estimate.get("waiting"):
            row["waiting"] = estimate["waiting"]
    return row


# Stage timings in the order a render runs them, as `status` prints them.
STAGES = [("load_s", "load", "s"), ("move_s", "move", "s"), ("encode_s", "encode", "s"),
          ("denoise_s_per_step", "denoise", "s/it"), ("decode_s", "decode", "s")]


def _stages(row: dict[str, Any]) -> str:
    t = row["timings"] or {}
    parts = [f"{label}={t[key]:.3f}{unit}" for key, label, unit in STAGES if key in t]
    if row.get("peak_memory_mb") is not None:
        parts.append(f"peak={row['peak_memory_mb']:.0f}MiB")
    if row.get("profile"):
        parts.append(f"profile={row['profile']}")
    if row.get("escalations"):
        parts.append(f"escalated={' ; '.join(row['escalations'])}")
    return (" " + " ".join(parts)) if parts else ""


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.jobs:
        rows = [_job_row(client, job) for job in client.jobs(args.jobs)]
        human = "\n".join(
            f"{r['id']}  {r['state']:<9} {r['model']} {r['size']} node={r['node'] or '-'} "
            f"attempts={r['attempts']}" + _stages(r)
            + (f" position={r['queue_position']}" if r.get("queue_position") is not None else "")
            + (f" eta={r['eta_s']:.1f}s on {r['waits_for']}" if r.get("eta_s") is not None else "")
            + (f" waiting: {r['waiting']}" if r.get("waiting") else "")
            + (f" error={r['error']}" if r["error"] else "")
            for r in rows
        )
        _emit(args, {"ok": True, "jobs": rows}, human)
        return 0
    status = client.status()
    now = time.time()
    lines = ["queue  " + "  ".join(f"{k}={v}" for k, v in status["counts"].items())]
    for node in status["nodes"]:
        age = now - float(node.get("heartbeat") or 0)
        lines.append(f"node   {node['name']:<14} {node.get('state', '?'):<8} {node.get('vram_gib')} GiB "
                     f"done={node.get('jobs_done', 0)} loaded={','.join(node.get('loaded') or []) or '-'} "
                     f"heartbeat={age:.0f}s ago{' (simulated)' if node.get('simulated') else ''}")
    _emit(args, {"ok": True, **status}, "\n".join(lines))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    client = _client(args)
    ids = list(args.jobs)
    if args.batch:
        ids += client.store.batch_ids(args.batch)
    if not ids:
        raise CliError("give job ids or --batch ID")
    outcome = client.cancel(ids)
    _emit(args, {"ok": True, "jobs": outcome}, "\n".join(f"{k}  {v}" for k, v in outcome.items()))
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    """A draining node finishes what it holds and takes nothing new; --undo puts it back to work."""
    client = _client(args)
    known = {n["name"] for n in client.store.nodes()}
    missing = [name for name in args.node_names if name not in known]
    if missing:
        raise CliError(f"no such node: {', '.join(missing)} (known: {', '.join(sorted(known)) or 'none'})")
    for name in args.node_names:
        client.store.set_draining(name, not args.undo)
    verb = "back to work" if args.undo else "draining: finishes what it holds, takes nothing new"
    _emit(args, {"ok": True, "nodes": args.node_names, "draining": not args.undo},
          "\n".join(f"{name}  {verb}" for name in args.node_names))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    """Run the Streamlit dashboard against the farm's Redis (it reads Redis only, never Ray)."""
    import subprocess

    from renderfarm.cluster.redis_server import redact

    url = _resolve_url(args)
    app = Path(__file__).resolve().parent / "dashboard" / "app.py"
    command = [
        sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(args.port),
        "--server.address", args.address, "--server.headless", "true", "--browser.gatherUsageStats", "false",
        "--client.toolbarMode", "minimal", "--", "--prefix", args.prefix,
    ]
    # The URL may carry a password: it travels in the environment, never on a command line others can read.
    env = {**os.environ, "RENDERFARM_REDIS_URL": url}
    log.info("dashboard for %s on http://%s:%d (Ctrl-C stops it)", redact(url), args.address, args.port)
    if args.json:
        _emit(args, {"ok": True, "url": f"http://{args.address}:{args.port}", "redis": redact(url)})
    return subprocess.call(command, env=env)


def cmd_plan(args: argparse.Namespace) -> int:
    """What a node with this card would choose for a job, and why: pure planning, no farm needed."""
    from renderfarm.planning.catalog import default_catalog
    from renderfarm.planning.devices import device_from_spec, known_card
    from renderfarm.planning.profiles import choose_profile
    from renderfarm.planning.vram import plan_report

    settings = _settings(args)
    entry = default_catalog(settings.models_file).get(args.model)
    width, height = args.size or (entry.default_size, entry.default_size)
    card = known_card(args.gpu, args.vram) if args.gpu else None
    cc = args.compute_capability or (card.compute_capability if card else DEFAULT_PLAN_CC)
    device = device_from_spec(args.gpu or f"{args.vram:g} GiB card", args.vram, cc)
    report = plan_report(entry, device, width, height, args.batch, args.margin)
    if args.json:
        _emit(args, {"ok": True, **report})
    else:
        print(choose_profile(entry, device, width, height, args.batch, args.margin).explain())
    return 0 if report["chosen"] else EXIT_ERROR


def cmd_bench_sim(args: argparse.Namespace) -> int:
    """The same placement code against a simulated cluster and a job trace, beside two baselines."""
    from renderfarm.scheduler.simulate import DEFAULT_CLUSTER, DEFAULT_TRACE, run_sim

    for given, default, flag in ((args.trace, DEFAULT_TRACE, "--trace"), (args.cluster, DEFAULT_CLUSTER, "--cluster")):
        if not given and not default.exists():
            raise CliError(f"no default {flag} file at {default} (it ships in the source tree's bench/sim); pass {flag}")
    report = run_sim(args.trace, args.cluster)
    if args.json:
        _emit(args, {"ok": True, **report})
        return 0
    bound = report["lower_bound_s"]
    print(f"{report.get('jobs', '?')} jobs on {report.get('nodes', '?')} nodes; lower bound on the makespan "
          f"{bound:.0f} s; rejected up front: {report['rejected']}")
    print(f"  {'policy':<16} {'makespan s':>10} {'x bound':>8} {'p50 wait':>9} {'p95 wait':>9} {'util':>5} "
          f"{'OOMs':>5} {'loads':>6}")
    for name, p in report["policies"].items():
        print(f"  {name:<16} {p['makespan_s']:10.0f} {p['makespan_s'] / bound:8.2f} {p['p50_wait_s']:9.0f} "
              f"{p['p95_wait_s']:9.0f} {p['utilization']:5.2f} {p['ooms']:5d} {p['model_loads']:6d}")
    return 0


# --- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("--config", help="settings YAML (fields of renderfarm.config.Settings)")
    common.add_argument("--data-dir", type=Path, help="where the farm keeps its Redis data and farm.json")

    with_redis = argparse.ArgumentParser(add_help=False)
    with_redis.add_argument("--redis", metavar="URL", help="redis:// or rediss:// URL of the farm's Redis")

    parser = argparse.ArgumentParser(prog="renderfarm", description="A render farm for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common, with_redis], help="run a farm in the foreground")
    up.add_argument("--nodes", help="nodes YAML for simulated nodes (machines without GPUs)")
    up.set_defaults(func=cmd_up)

    demo = sub.add_parser("demo", parents=[common, with_redis], help="a local farm renders a mixed batch")
    demo.add_argument("--nodes", help="nodes YAML (default: a 24 GiB and an 8 GiB simulated node)")
    demo.add_argument("--jobs", type=int, default=24, help="number of jobs (default 24)")
    demo.add_argument("--out", default="renders", help="where to save the PNGs (default ./renders)")
    demo.add_argument("--timeout", type=float, default=600.0)
    demo.set_defaults(func=cmd_demo)

    submit = sub.add_parser("submit", parents=[common, with_redis], help="submit prompts and save the images")
    submit.add_argument("prompt", nargs="?", help="the prompt (or use --prompts FILE)")
    submit.add_argument("--prompts", help="a file with one prompt per line")
    submit.add_argument("--model", default="tiny-sd15")
    submit.add_argument("--size", type=_parse_size, help="WIDTHxHEIGHT (default: the model's)")
    submit.add_argument("--steps", type=int)
    submit.add_argument("--guidance", type=float)
    submit.add_argument("--negative", default="", help="negative prompt")
    submit.add_argument("--count", type=int, default=1, help="jobs per prompt (seeds seed, seed+1, ...)")
    submit.add_argument("--images", type=int, default=1, help="images per job")
    submit.add_argument("--seed", type=int)
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--team", default="default")
    submit.add_argument("--out", default="renders")
    submit.add_argument("--timeout", type=float, default=None)
    submit.add_argument("--no-wait", action="store_true", help="print the job ids and return")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", parents=[common, with_redis], help="queue, nodes, or given jobs")
    status.add_argument("jobs", nargs="*")
    status.set_defaults(func=cmd_status)

    plan = sub.add_parser("plan", parents=[common], help="which profile a card would choose for a job")
    plan.add_argument("--model", required=True)
    plan.add_argument("--vram", type=float, required=True, metavar="GIB", help="the card's VRAM in GiB")
    plan.add_argument("--size", type=_parse_size, help="WIDTHxHEIGHT (default: the model's)")
    plan.add_argument("--batch", type=int, default=1, help="images rendered together")
    plan.add_argument("--compute-capability", metavar="X.Y",
                      help=f"e.g. 7.5 (Turing), 8.9 (Ada) (default: the --gpu card's, else {DEFAULT_PLAN_CC})")
    plan.add_argument("--gpu", help="card name, e.g. 'Quadro RTX 6000' (its figures refine the estimate)")
    plan.add_argument("--margin", type=float, default=0.5, metavar="GIB", help="VRAM kept free (default 0.5)")
    plan.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="benchmarks that need no farm")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    sim = bench_sub.add_parser("sim", parents=[common], help="routing policies on a simulated cluster")
    sim.add_argument("--trace", help="JSONL of job specs with submit_s (default bench/sim/trace.jsonl)")
    sim.add_argument("--cluster", help="cluster YAML (default bench/sim/cluster.yaml)")
    sim.set_defaults(func=cmd_bench_sim)

    cancel = sub.add_parser("cancel", parents=[common, with_redis], help="cancel jobs")
    cancel.add_argument("jobs", nargs="*")
    cancel.add_argument("--batch", help="cancel every job of a batch")
    cancel.set_defaults(func=cmd_cancel)

    drain = sub.add_parser("drain", parents=[common, with_redis], help="a node finishes its work, takes no more")
    drain.add_argument("node_names", nargs="+", metavar="NODE")
    drain.add_argument("--undo", action="store_true", help="put the nodes back to work")
    drain.set_defaults(func=cmd_drain)

    dashboard = sub.add_parser("dashboard", parents=[common, with_redis], help="the Streamlit dashboard")
    dashboard.add_argument("--port", type=int, default=8501)
    dashboard.add_argument("--address", default="127.0.0.1", help="interface to listen on (default loopback)")
    dashboard.add_argument("--prefix", default="rf", help=argparse.SUPPRESS)
    dashboard.set_defaults(func=cmd_dashboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if args.debug else "%(message)s",
        stream=sys.stderr,
    )
    if args.json and not args.debug:
        logging.getLogger().setLevel(logging.WARNING)
    from pydantic import ValidationError

    from renderfarm.client import SpecError
    from renderfarm.cluster.redis_server import RedisUnavailable
    from renderfarm.cluster.store import JobNotFound
    from renderfarm.farm import FarmError
    from renderfarm.planning.catalog import UnknownModelError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (CliError, SpecError, RedisUnavailable, ConfigError, UnknownModelError, JobNotFound,
            FarmError, TimeoutError, ValidationError, ValueError, OSError) as exc:
        if args.debug:
            raise
        message = str(exc) if not isinstance(exc, JobNotFound) else f"no such job: {exc.args[0]}"
        if args.json:
            _emit(args, {"ok": False, "error": message})
        else:
            print(f"renderfarm {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
