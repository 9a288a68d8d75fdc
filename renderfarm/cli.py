"""The `renderfarm` command. Every command takes --json (one JSON object on one line on stdout; logs
and progress go to stderr) and --debug (tracebacks). Errors are one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import contextlib
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

from renderfarm.cluster.processes import write_private
from renderfarm.config import ConfigError, Settings, load_nodes
from renderfarm.errors import CliError, UsageError

EXIT_ERROR = 1
EXIT_USAGE = 2
FARM_FILE = "farm.json"
DEFAULT_PLAN_CC = "8.6"  # `plan` without --gpu or --compute-capability: an Ampere card  # written by `up` in its data dir so other commands find its Redis

log = logging.getLogger("renderfarm")


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

    return FarmClient(_resolve_url(args), token=_team_token(args))


def _team_token(args: argparse.Namespace) -> str | None:
    """--token, else RENDERFARM_TOKEN: the team token a farm in token mode asks for (cluster/auth.py)."""
    return getattr(args, "token", None) or os.environ.get("RENDERFARM_TOKEN") or None


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
    if args.no_workers and not args.head:
        raise CliError("--no-workers goes with --head (a farm without a head and without workers does nothing)")
    advertise = args.advertise_ip or (_this_machine_ip() if args.head else None)
    farm_file = settings.data_dir / FARM_FILE
    stop = _stop_on_signals()
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
            _emit(args, {"ok": True, **info}, _farm_summary(info))
            log.info("farm is up; Ctrl-C stops it")
            stop.wait()
        finally:
            farm_file.unlink(missing_ok=True)
    log.info("farm stopped")
    return 0


def _stop_on_signals() -> threading.Event:
    """An event that Ctrl-C (SIGINT) or SIGTERM sets: a foreground command waits on it, then shuts down."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _this_machine_ip() -> str:
    """The address other machines reach this one at, as Ray sees it."""
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


def cmd_worker(args: argparse.Namespace) -> int:
    """Join this machine's GPUs (or declared nodes) to a farm whose head runs elsewhere; Ctrl-C leaves."""
    from renderfarm.farm import WorkerNode

    settings = _settings(args)
    if not settings.redis_url:
        raise CliError("--redis URL (or RENDERFARM_REDIS_URL): the farm's Redis, as `renderfarm up --head` printed it")
    token = args.ray_token or os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        raise CliError("the Ray cluster's token: set RAY_AUTH_TOKEN (the head keeps it in "
                       "<data_dir>/ray_auth_token), or pass --ray-token")
    nodes = load_nodes(args.nodes) if args.nodes else None
    stop = _stop_on_signals()
    with WorkerNode(settings, args.address, settings.redis_url, nodes, ray_token=token,
                    log_to_driver=args.debug, warm_models=args.warm) as node:
        info = {"address": args.address, "nodes": node.nodes, "pid": os.getpid()}
        _emit(args, {"ok": True, **info}, "\n".join(
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


# Flags that describe the jobs: --specs takes all of that from its file, so none of these go with it.
SUBMIT_SPEC_FLAGS = ("prompt", "prompts", "model", "size", "steps", "guidance", "negative", "count", "images",
                     "seed", "priority", "team")


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def _shown(text: str, limit: int = 40) -> str:
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def _flag_int(flag: str, text: str | None) -> int | None:
    """A submit flag's whole number, parsed here rather than by argparse so that a bad value is one `error:`
    line (a JSON object with --json) like every other submit error. Ranges are JobSpec's to check."""
    if text is None:
        return None
    number = text.strip()
    digits = number[1:] if number[:1] in ("+", "-") else number
    if not (digits.isascii() and digits.isdigit()):
        raise CliError(f"{flag} {_shown(text)}: expected a whole number")
    if len(digits) > 30:
        raise CliError(f"{flag} {_shown(text)}: the number is far out of range")
    return int(number)


def _flag_float(flag: str, text: str | None) -> float | None:
    import math

    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise CliError(f"{flag} {_shown(text)}: expected a number") from None
    if not math.isfinite(value):
        raise CliError(f"{flag} {_shown(text)}: expected a finite number")
    return value


def _read_text(flag: str, path: str) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"{flag} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # a NUL character in the path
        raise CliError(f"{flag} {_shown(path)}: {exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise CliError(f"{flag} {path} line {line}: not UTF-8 text (byte {raw[exc.start]:#04x})") from None


class _DuplicateField(ValueError):
    pass


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) < len(pairs):  # json.loads would keep the last value silently
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _DuplicateField(f"field {_shown(twice)} appears twice in one object")
    return found


def _parse_json(text: str) -> Any:
    """json.loads, each way it can fail turned into a ValueError that says what is wrong and where."""
    try:
        return json.loads(text, object_pairs_hook=_unique_fields)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})") from None
    except _DuplicateField:
        raise
    except RecursionError:
        raise ValueError("not valid JSON: nested too deeply") from None
    except ValueError:  # Python parses no integer of more than 4,300 digits
        raise ValueError("not valid JSON: a number has too many digits") from None


def _read_specs(path: str) -> list[tuple[str, Any]]:
    """(where, spec) for each spec of a --specs file: a JSON list of objects, or JSON Lines (one object per
    line). `where` names the spec in errors: `jobs[3]`, or `jobs[3] (line 5)` in JSON Lines."""
    text = _read_text("--specs", path)
    if text.lstrip().startswith("["):
        try:
            return [(f"jobs[{i}]", item) for i, item in enumerate(_parse_json(text))]
        except ValueError as exc:
            raise CliError(f"--specs {path}: {exc}") from None
    entries = []
    # Newlines only: str.splitlines() would also split inside a JSON string holding U+2028.
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                entries.append((f"jobs[{len(entries)}] (line {number})", _parse_json(line)))
            except ValueError as exc:
                raise CliError(f"--specs {path} line {number}: {str(exc).removeprefix('line 1 ')}; expected "
                               "a JSON list of job specs, or one JSON object per line") from None
    return entries


def _submit_file(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """Submit a --specs file as one batch: every spec is checked first, and any error enqueues nothing."""
    from renderfarm.client import MAX_BATCH_JOBS, SpecError

    mixed = [f"--{name}" if name != "prompt" else "PROMPT" for name in SUBMIT_SPEC_FLAGS
             if getattr(args, name) is not None]
    if mixed:
        raise CliError(f"--specs takes every job field from its file; drop {', '.join(mixed)} "
                       "(only --no-wait, --out, --timeout, --json and --redis go with --specs)")
    path = args.specs
    entries = _read_specs(path)
    if not entries:
        raise CliError(f"--specs {path}: the file holds no job specs")
    if len(entries) > MAX_BATCH_JOBS:
        raise CliError(f"--specs {path}: {len(entries)} job specs; at most {MAX_BATCH_JOBS} per batch")
    client = _client(args)
    errors, valid = [], []
    for where, item in entries:
        try:
            valid.append(client.validate(item, where=where))
        except SpecError as exc:
            errors.append(str(exc))
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise CliError(f"--specs {path}: " + "; ".join(errors[:5]) + more + "; nothing was enqueued")
    try:
        return client, client.submit_batch(valid)
    except SpecError as exc:  # no registered node can run one of them
        raise CliError(f"--specs {path}: {exc}") from None


def _submit_flags(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """Submit PROMPT or each line of --prompts, --count times, with the other flags as the job fields."""
    from renderfarm.client import MAX_BATCH_JOBS

    if args.prompts is not None and args.prompt is not None:
        raise CliError("give a PROMPT or --prompts FILE, not both")
    if args.prompts is not None:
        prompts = [line.strip() for line in _read_text("--prompts", args.prompts).splitlines() if line.strip()]
        if not prompts:
            raise CliError(f"--prompts {args.prompts}: the file has no prompts")
    elif args.prompt is not None:
        prompts = [args.prompt]
    else:
        raise CliError("give a PROMPT, --prompts FILE or --specs FILE")
    count = _given(_flag_int("--count", args.count), 1)
    if not 1 <= count <= MAX_BATCH_JOBS or len(prompts) * count > MAX_BATCH_JOBS:
        raise CliError(f"--count {count} with {len(prompts)} prompt(s): at most {MAX_BATCH_JOBS} jobs per "
                       "submit, and --count must be at least 1")
    fixed = {"model": _given(args.model, "tiny-sd15"), "negative_prompt": _given(args.negative, ""),
             "priority": _given(_flag_int("--priority", args.priority), 0), "team": _given(args.team, "default"),
             "num_images": _given(_flag_int("--images", args.images), 1)}
    # Left out, size, steps and guidance take the model's defaults (FarmClient.validate).
    if args.size is not None:
        try:
            fixed["width"], fixed["height"] = _parse_size(args.size)
        except argparse.ArgumentTypeError:
            raise CliError(f"--size {_shown(args.size)}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
    if (steps := _flag_int("--steps", args.steps)) is not None:
        fixed["steps"] = steps
    if (guidance := _flag_float("--guidance", args.guidance)) is not None:
        fixed["guidance"] = guidance
    seed = _flag_int("--seed", args.seed)
    specs = [{**fixed, "prompt": prompt, **({"seed": seed + i} if seed is not None else {})}
             for prompt in prompts for i in range(count)]
    client = _client(args)
    return client, client.submit_batch(specs)


def cmd_submit(args: argparse.Namespace) -> int:
    # What only matters after submitting is checked before it: a bad --timeout must not leave jobs behind.
    timeout = _flag_float("--timeout", args.timeout)
    if timeout is not None and timeout <= 0:
        raise CliError(f"--timeout {args.timeout}: must be more than 0 seconds")
    if "\x00" in args.out:
        raise CliError("--out: the path contains a NUL character")
    client, ids = _submit_file(args) if args.specs is not None else _submit_flags(args)
    if args.no_wait:
        _emit(args, {"ok": True, "jobs": ids}, "\n".join(ids))
        return 0
    outcome = _follow(client, ids, Path(args.out), timeout, quiet=args.json)
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
                     f"heartbeat={age:.0f}s ago{' (simulated)' if node.get('simulated') else ''}"
                     + (f" draining: {node.get('drain_reason') or 'by an operator'}" if node.get("draining") is True else ""))
    if status["counters"]:
        lines.append("farm   " + "  ".join(f"{k}={v}" for k, v in sorted(status["counters"].items())))
    for job_id, reason in sorted(status["quarantined"].items()):
        lines.append(f"quarantined {job_id}: {reason}")
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
    client.require_admin("draining a node")  # a farm in token mode: nodes are everyone's
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
    if args.ram is not None and args.ram <= 0:
        raise CliError(f"--ram: must be positive (the machine's RAM in GiB), got {args.ram:g}")
    device = device_from_spec(args.gpu or f"{args.vram:g} GiB card", args.vram, cc, ram_gib=args.ram)
    report = plan_report(entry, device, width, height, args.batch, args.margin, steps=args.steps)
    if args.json:
        _emit(args, {"ok": True, **report})
    else:
        print(choose_profile(entry, device, width, height, args.batch, args.margin, steps=args.steps).explain())
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


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send everything written to file descriptor 1 (by this process and threads of libraries that print)
    to stderr for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_bench_chaos(args: argparse.Namespace) -> int:
    """Jobs through a real local farm while a worker, the scheduler or redis-server is killed mid-render."""
    from renderfarm.chaos import SCENARIOS, run_scenario

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # stand-ins only
    if args.jobs < 1:
        raise CliError(f"--jobs {args.jobs}: must be at least 1")
    scenarios = args.scenario or list(SCENARIOS)
    say = (lambda line: None) if args.json else (lambda line: _stderr_console().print(line, highlight=False))
    with _stdout_to_stderr():  # Ray reports the deaths this causes on stdout; --json owns stdout
        results = [run_scenario(name, args.jobs, say=say).as_dict() for name in scenarios]
    ok = all(r["done"] == r["submitted"] and r["lost"] == 0 and r["duplicates"] == 0 for r in results)
    if args.json:
        _emit(args, {"ok": ok, "scenarios": results})
        return 0 if ok else EXIT_ERROR
    print(f"  {'scenario':<10} {'submitted':>9} {'done':>5} {'lost':>5} {'dupes':>5} {'in flight':>9} "
          f"{'retried':>7} {'recovery s':>10} {'total s':>8}")
    for r in results:
        recovery = "-" if r["recovery_s"] is None else f"{r['recovery_s']:.2f}"
        print(f"  {r['scenario']:<10} {r['submitted']:9d} {r['done']:5d} {r['lost']:5d} {r['duplicates']:5d} "
              f"{r['in_flight_at_fault']:9d} {r['retried']:7d} {recovery:>10} {r['total_s']:8.2f}")
    return 0 if ok else EXIT_ERROR


def _token_admin(args: argparse.Namespace, action: str):
    """A Redis client and keys for managing tokens; in token mode only an admin token may (cluster/auth.py)."""
    from renderfarm.cluster import auth
    from renderfarm.cluster.keys import Keys
    from renderfarm.cluster.redis_server import connect

    client, keys = connect(_resolve_url(args)), Keys()
    try:
        if auth.token_mode(client, keys):
            auth.require_admin(client, keys, _team_token(args), action)
    except BaseException:
        client.close()
        raise
    return client, keys


def cmd_token_create(args: argparse.Namespace) -> int:
    """Print a new team token once: Redis keeps only its SHA-256 digest."""
    from renderfarm.cluster import auth

    client, keys = _token_admin(args, "creating a token")
    try:
        token, record = auth.create_token(client, keys, args.team, admin=args.admin, label=args.label or "")
    finally:
        client.close()
    if not args.json:
        kind = "admin token" if record.admin else "token"
        print(f"{kind} for team {record.team} (digest {record.public()['digest']}): shown only now; give it to "
              "its holder as RENDERFARM_TOKEN", file=sys.stderr)
    _emit(args, {"ok": True, "token": token, **record.public()}, token)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from renderfarm.cluster import auth

    client, keys = _token_admin(args, "listing tokens")
    try:
        rows = [record.public() for record in auth.list_tokens(client, keys)]
    finally:
        client.close()
    lines = [f"{r['digest']}  {r['team']:<16} {'admin' if r['admin'] else 'team ':<5}  "
             f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r['created'])) if r['created'] else '?':<16}  "
             f"{r['label']}" for r in rows]
    human = "\n".join(lines) or "no tokens: the farm is open (every client may read and cancel every job)"
    _emit(args, {"ok": True, "token_mode": bool(rows), "tokens": rows}, human)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from renderfarm.cluster import auth

    client, keys = _token_admin(args, "revoking a token")
    try:
        record = auth.revoke_token(client, keys, args.digest)
        still = auth.token_mode(client, keys)
    finally:
        client.close()
    human = f"revoked {record.public()['digest']} (team {record.team})"
    if not still:
        human += "; no tokens left: the farm is open again"
    _emit(args, {"ok": True, "revoked": record.public(), "token_mode": still}, human)
    return 0


# --- parser ----------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors come back to `main` (which prints one line, or JSON with --json)
    instead of exiting from inside argparse."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    common.add_argument("--config", help="settings YAML (fields of renderfarm.config.Settings)")
    common.add_argument("--data-dir", type=Path, help="where the farm keeps its Redis data and farm.json")

    with_redis = argparse.ArgumentParser(add_help=False)
    with_redis.add_argument("--redis", metavar="URL", help="redis:// or rediss:// URL of the farm's Redis")
    with_redis.add_argument("--token", metavar="TOKEN", help="team token, for a farm in token mode (prefer the "
                            "RENDERFARM_TOKEN environment variable: a command line is visible to other users)")

    parser = _Parser(prog="renderfarm", description="A render farm for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

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

    # Numbers are parsed by cmd_submit, not argparse: a bad one is then one `error:` line, a JSON object with
    # --json, like any other submit error. A flag left out is None, so --specs can tell what was given.
    submit = sub.add_parser("submit", parents=[common, with_redis], help="submit prompts and save the images")
    submit.add_argument("prompt", nargs="?", help="the prompt (or use --prompts FILE or --specs FILE)")
    submit.add_argument("--prompts", metavar="FILE", help="a file with one prompt per line")
    submit.add_argument("--specs", metavar="FILE",
                        help="job specs as a JSON list of objects or as JSON Lines, submitted as one batch (all or "
                             "none); takes no other job flags")
    submit.add_argument("--model", help="default tiny-sd15")
    submit.add_argument("--size", metavar="WxH", help="WIDTHxHEIGHT (default: the model's)")
    submit.add_argument("--steps", metavar="N", help="default: the model's")
    submit.add_argument("--guidance", metavar="X", help="default: the model's")
    submit.add_argument("--negative", metavar="TEXT", help="negative prompt")
    submit.add_argument("--count", metavar="N", help="jobs per prompt (seeds seed, seed+1, ...; default 1)")
    submit.add_argument("--images", metavar="N", help="images per job (default 1)")
    submit.add_argument("--seed", metavar="N")
    submit.add_argument("--priority", metavar="N", help="-100..100 (default 0)")
    submit.add_argument("--team", help="default: default")
    submit.add_argument("--out", default="renders")
    submit.add_argument("--timeout", metavar="SECONDS", help="default: wait as long as it takes")
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
    plan.add_argument("--ram", type=float, metavar="GIB",
                      help="the machine's RAM: profiles whose host memory exceeds it are not chosen "
                           "(default: not checked)")
    plan.add_argument("--steps", type=int, metavar="N", help="denoising steps per job (default: the model's)")
    plan.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="benchmarks: routing in a simulator, chaos on a local farm")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    sim = bench_sub.add_parser("sim", parents=[common], help="routing policies on a simulated cluster")
    sim.add_argument("--trace", help="JSONL of job specs with submit_s (default bench/sim/trace.jsonl)")
    sim.add_argument("--cluster", help="cluster YAML (default bench/sim/cluster.yaml)")
    sim.set_defaults(func=cmd_bench_sim)
    chaos = bench_sub.add_parser("chaos", parents=[common],
                                 help="kill a worker, the scheduler, redis-server mid-render; count lost jobs")
    chaos.add_argument("--jobs", type=int, default=50, help="jobs per scenario (default 50)")
    chaos.add_argument("--scenario", action="append", choices=["worker", "scheduler", "redis"],
                       help="run only this scenario (repeatable; default all three)")
    chaos.set_defaults(func=cmd_bench_chaos)

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

    token = sub.add_parser("token", help="team tokens: who may read and cancel which team's jobs")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", parents=[common, with_redis], help="make a token (printed once)")
    create.add_argument("team", metavar="TEAM", help="the team the token submits for and sees")
    create.add_argument("--admin", action="store_true", help="may do everything, for every team")
    create.add_argument("--label", default="", help="a note: who or what holds it")
    create.set_defaults(func=cmd_token_create)
    listing = token_sub.add_parser("list", parents=[common, with_redis], help="tokens (never the tokens themselves)")
    listing.set_defaults(func=cmd_token_list)
    revoke = token_sub.add_parser("revoke", parents=[common, with_redis], help="revoke a token by its digest")
    revoke.add_argument("digest", metavar="DIGEST_PREFIX", help="the digest `token list` shows (6+ hex characters)")
    revoke.set_defaults(func=cmd_token_revoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        given = sys.argv[1:] if argv is None else argv
        if "--json" in given:
            print(json.dumps({"ok": False, "error": str(exc)}))
        else:
            print(parser.format_usage().rstrip() + "\n" + str(exc), file=sys.stderr)
        return EXIT_USAGE
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
