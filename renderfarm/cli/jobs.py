"""The job commands: `submit` (prompts, or a spec file, as one batch; waits with a progress bar and saves
the images), `status` (the farm, or given jobs), `cancel`, and `drain` (a node takes no new work)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from renderfarm.cli.common import (
    EXIT_ERROR,
    client_from,
    emit,
    flag_float,
    flag_int,
    follow,
    given,
    parse_size,
    read_flag_file,
)
from renderfarm.client import MAX_BATCH_JOBS
from renderfarm.errors import CliError, SpecFileError
from renderfarm.jobs import shown


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             with_redis: argparse.ArgumentParser) -> None:
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

    cancel = sub.add_parser("cancel", parents=[common, with_redis], help="cancel jobs")
    cancel.add_argument("jobs", nargs="*")
    cancel.add_argument("--batch", help="cancel every job of a batch")
    cancel.set_defaults(func=cmd_cancel)

    drain = sub.add_parser("drain", parents=[common, with_redis], help="a node finishes its work, takes no more")
    drain.add_argument("node_names", nargs="+", metavar="NODE")
    drain.add_argument("--undo", action="store_true", help="put the nodes back to work")
    drain.set_defaults(func=cmd_drain)


# Flags that describe the jobs: --specs takes all of that from its file, so none of these go with it.
SUBMIT_SPEC_FLAGS = ("prompt", "prompts", "model", "size", "steps", "guidance", "negative", "count", "images",
                     "seed", "priority", "team")


def _submit_file(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """Submit a --specs file as one batch (FarmClient.submit_file): every spec is checked first, and any
    error enqueues nothing."""
    mixed = [f"--{name}" if name != "prompt" else "PROMPT" for name in SUBMIT_SPEC_FLAGS
             if getattr(args, name) is not None]
    if mixed:
        raise CliError(f"--specs takes every job field from its file; drop {', '.join(mixed)} "
                       "(only --no-wait, --out, --timeout, --json and --redis go with --specs)")
    client = client_from(args)
    try:
        return client, client.submit_file(args.specs)
    except SpecFileError as exc:
        raise CliError(f"--specs {exc}") from None


def _submit_flags(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """Submit PROMPT or each line of --prompts, --count times, with the other flags as the job fields."""
    if args.prompts is not None and args.prompt is not None:
        raise CliError("give a PROMPT or --prompts FILE, not both")
    if args.prompts is not None:
        prompts = [line.strip() for line in read_flag_file("--prompts", args.prompts).splitlines() if line.strip()]
        if not prompts:
            raise CliError(f"--prompts {args.prompts}: the file has no prompts")
    elif args.prompt is not None:
        prompts = [args.prompt]
    else:
        raise CliError("give a PROMPT, --prompts FILE or --specs FILE")
    count = given(flag_int("--count", args.count), 1)
    if not 1 <= count <= MAX_BATCH_JOBS or len(prompts) * count > MAX_BATCH_JOBS:
        raise CliError(f"--count {count} with {len(prompts)} prompt(s): at most {MAX_BATCH_JOBS} jobs per "
                       "submit, and --count must be at least 1")
    fixed = {"model": given(args.model, "tiny-sd15"), "negative_prompt": given(args.negative, ""),
             "priority": given(flag_int("--priority", args.priority), 0), "team": given(args.team, "default"),
             "num_images": given(flag_int("--images", args.images), 1)}
    # Left out, size, steps and guidance take the model's defaults (FarmClient.validate).
    if args.size is not None:
        try:
            fixed["width"], fixed["height"] = parse_size(args.size)
        except argparse.ArgumentTypeError:
            raise CliError(f"--size {shown(args.size)}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
    if (steps := flag_int("--steps", args.steps)) is not None:
        fixed["steps"] = steps
    if (guidance := flag_float("--guidance", args.guidance)) is not None:
        fixed["guidance"] = guidance
    seed = flag_int("--seed", args.seed)
    specs = [{**fixed, "prompt": prompt, **({"seed": seed + i} if seed is not None else {})}
             for prompt in prompts for i in range(count)]
    client = client_from(args)
    return client, client.submit_batch(specs)


def cmd_submit(args: argparse.Namespace) -> int:
    # What only matters after submitting is checked before it: a bad --timeout must not leave jobs behind.
    timeout = flag_float("--timeout", args.timeout)
    if timeout is not None and timeout <= 0:
        raise CliError(f"--timeout {args.timeout}: must be more than 0 seconds")
    if "\x00" in args.out:
        raise CliError("--out: the path contains a NUL character")
    client, ids = _submit_file(args) if args.specs is not None else _submit_flags(args)
    if args.no_wait:
        emit(args, {"ok": True, "jobs": ids}, "\n".join(ids))
        return 0
    outcome = follow(client, ids, Path(args.out), timeout, quiet=args.json)
    payload = {"ok": not outcome["failed"], "jobs": ids, "done": len(outcome["done"]),
               "failed": [{"id": j.id, "error": j.error} for j in outcome["failed"]], "images": outcome["images"]}
    human = "\n".join([*outcome["images"], *(f"failed {j.id}: {j.error}" for j in outcome["failed"])])
    emit(args, payload, human)
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
    client = client_from(args)
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
        emit(args, {"ok": True, "jobs": rows}, human)
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
    emit(args, {"ok": True, **status}, "\n".join(lines))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    client = client_from(args)
    ids = list(args.jobs)
    if args.batch:
        ids += client.store.batch_ids(args.batch)
    if not ids:
        raise CliError("give job ids or --batch ID")
    outcome = client.cancel(ids)
    emit(args, {"ok": True, "jobs": outcome}, "\n".join(f"{k}  {v}" for k, v in outcome.items()))
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    """A draining node finishes what it holds and takes nothing new; --undo puts it back to work."""
    client = client_from(args)
    client.require_admin("draining a node")  # a farm in token mode: nodes are everyone's
    known = {n["name"] for n in client.store.nodes()}
    missing = [name for name in args.node_names if name not in known]
    if missing:
        raise CliError(f"no such node: {', '.join(missing)} (known: {', '.join(sorted(known)) or 'none'})")
    for name in args.node_names:
        client.store.set_draining(name, not args.undo)
    verb = "back to work" if args.undo else "draining: finishes what it holds, takes nothing new"
    emit(args, {"ok": True, "nodes": args.node_names, "draining": not args.undo},
          "\n".join(f"{name}  {verb}" for name in args.node_names))
    return 0
