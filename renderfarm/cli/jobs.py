"""The job commands: `submit` (prompts, or a spec file, as one batch; waits with a progress bar and saves
the images), `status` (the farm, or given jobs), `jobs` (list them, filtered), `cancel`, `retry` (failed or
cancelled jobs back in the queue), and `drain` (a node takes no new work)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from renderfarm.cli.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_TIMEOUT,
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
from renderfarm.errors import CliError, SpecError, SpecFileError, shown
from renderfarm.jobs import JobState, new_job_id

log = logging.getLogger("renderfarm")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             with_redis: argparse.ArgumentParser) -> None:
    # Numbers are parsed by cmd_submit, not argparse: a bad one is then one `error:` line, a JSON object with
    # --json, like any other submit error. A flag left out is None, so --specs can tell what was given.
    submit = sub.add_parser("submit", parents=[common, with_redis], help="submit prompts and save the images")
    submit.add_argument("prompt", nargs="?", help="the prompt (or use --prompts FILE or --specs FILE)")
    submit.add_argument("--prompts", metavar="FILE",
                        help="a file with one prompt per line (blank lines and lines starting with # are skipped)")
    submit.add_argument("--specs", metavar="FILE",
                        help="job specs as a JSON list of objects or as JSON Lines, submitted as one batch (all or "
                             "none); takes no other job flags")
    submit.add_argument("--model", help="default tiny-sd15")
    submit.add_argument("--size", metavar="WxH", help="WIDTHxHEIGHT (default: the model's)")
    submit.add_argument("--steps", metavar="N", help="default: the model's")
    submit.add_argument("--guidance", metavar="X", help="default: the model's")
    submit.add_argument("--negative", metavar="TEXT", help="negative prompt")
    submit.add_argument("--sampler", metavar="NAME", help="by its A1111 name: Euler a, DPM++ 2M, ... (default: the "
                        "model's own)")
    submit.add_argument("--schedule", metavar="TYPE", help="Karras, Exponential or Beta (with --sampler)")
    submit.add_argument("--init", metavar="IMG", help="an init image (PNG, JPEG or WebP): img2img from it, one upload "
                        "for every job (docs/inputs.md)")
    submit.add_argument("--mask", metavar="IMG", help="with --init: inpaint where the mask is white (its size "
                        "must be the init image's)")
    submit.add_argument("--strength", metavar="S", help="with --init: 0..1, how much is repainted (default 0.75)")
    submit.add_argument("--mask-blur", metavar="N", help="with --mask: pixels of the mask's edge blurred (default 4)")
    submit.add_argument("--resize-mode", metavar="MODE", help="with --init of another size than --size: none "
                        "(refused), resize, crop or fill")
    submit.add_argument("--after", action="append", metavar="JOB", help="each job waits until JOB is done, and "
                        "fails or is cancelled with it (repeat for more: docs/chains.md)")
    submit.add_argument("--init-from", metavar="JOB[:I]", help="img2img from an earlier job's images (image for image, "
                        "or its image I for all); waits for it")
    submit.add_argument("--hires", metavar="SCALE", help="a hires fix: a second, img2img pass at SCALE times the size "
                        "(1..4), its own job routed on its own; the ids printed are the second passes'")
    submit.add_argument("--hires-strength", metavar="S", help="with --hires: its denoising strength (default 0.7)")
    submit.add_argument("--hires-steps", metavar="N", help="with --hires: its steps (default: the first pass's)")
    submit.add_argument("--count", metavar="N", help="jobs per prompt (seeds seed, seed+1, ...; default 1)")
    submit.add_argument("--images", metavar="N", help="images per job (default 1)")
    submit.add_argument("--seed", metavar="N")
    submit.add_argument("--priority", metavar="N", help="-100..100 (default 0)")
    submit.add_argument("--team", help="default: default")
    submit.add_argument("--tag", action="append", metavar="TAG", help="a tag for every job (repeat for more)")
    submit.add_argument("--out", default="renders")
    submit.add_argument("--timeout", metavar="SECONDS", help="default: wait as long as it takes")
    submit.add_argument("--no-wait", action="store_true", help="print the job ids and return")
    submit.add_argument("--webhook", metavar="URL", help="POSTed to (signed: docs/webhooks.md) once the whole "
                        "batch is finished; goes with --specs too (a spec's own `webhook` field: that job)")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", parents=[common, with_redis], help="queue, nodes, or given jobs")
    status.add_argument("jobs", nargs="*")
    status.set_defaults(func=cmd_status)

    jobs = sub.add_parser("jobs", parents=[common, with_redis], help="list jobs, newest first")
    jobs.add_argument("--state", choices=[s.value for s in JobState])
    jobs.add_argument("--team")
    jobs.add_argument("--batch", metavar="ID")
    jobs.add_argument("--tag")
    jobs.add_argument("--model")
    jobs.add_argument("--node")
    jobs.add_argument("--limit", type=int, default=50, metavar="N", help="at most N jobs (default 50)")
    jobs.set_defaults(func=cmd_jobs)

    cancel = sub.add_parser("cancel", parents=[common, with_redis], help="cancel jobs")
    cancel.add_argument("jobs", nargs="*")
    cancel.add_argument("--batch", help="cancel every job of a batch")
    cancel.set_defaults(func=cmd_cancel)

    retry = sub.add_parser("retry", parents=[common, with_redis],
                           help="put failed or cancelled jobs back in the queue")
    retry.add_argument("jobs", nargs="*")
    retry.add_argument("--batch", help="retry every failed or cancelled job of a batch")
    retry.set_defaults(func=cmd_retry)

    drain = sub.add_parser("drain", parents=[common, with_redis], help="a node finishes its work, takes no more")
    drain.add_argument("node_names", nargs="+", metavar="NODE")
    drain.add_argument("--undo", action="store_true", help="put the nodes back to work")
    drain.set_defaults(func=cmd_drain)


# Flags that describe the jobs: --specs takes all of that from its file, so none of these go with it.
SUBMIT_SPEC_FLAGS = ("prompt", "prompts", "model", "size", "steps", "guidance", "negative", "count", "images",
                     "seed", "priority", "team", "tag", "sampler", "schedule", "init", "mask", "strength",
                     "mask_blur", "resize_mode", "after", "init_from", "hires", "hires_strength", "hires_steps")
# The image-input flags, by the job field they fill: an error naming the field names the flag too.
INPUT_FLAGS = {"init_image": "--init", "mask": "--mask", "strength": "--strength", "mask_blur": "--mask-blur",
               "resize_mode": "--resize-mode", "after": "--after", "init_from": "--init-from", "hires": "--hires"}


def _submit_file(args: argparse.Namespace, batch: str) -> tuple[Any, list[str]]:
    """Submit a --specs file as one batch (FarmClient.submit_file): every spec is checked first, and any
    error enqueues nothing."""
    mixed = [f"--{name.replace('_', '-')}" if name != "prompt" else "PROMPT" for name in SUBMIT_SPEC_FLAGS
             if getattr(args, name) is not None]
    if mixed:
        raise CliError(f"--specs takes every job field from its file; drop {', '.join(mixed)} "
                       "(only --no-wait, --out, --timeout, --webhook, --json and --redis go with --specs)")
    client = client_from(args)
    try:
        return client, client.submit_file(args.specs, batch_id=batch, webhook=args.webhook)
    except SpecFileError as exc:
        raise CliError(f"--specs {exc}") from None


def _submit_flags(args: argparse.Namespace, batch: str) -> tuple[Any, list[str]]:
    """Submit PROMPT or each line of --prompts, --count times, with the other flags as the job fields."""
    if args.prompts is not None and args.prompt is not None:
        raise CliError("give a PROMPT or --prompts FILE, not both")
    if args.prompts is not None:
        lines = (line.strip() for line in read_flag_file("--prompts", args.prompts).splitlines())
        prompts = [line for line in lines if line and not line.startswith("#")]  # blank lines, comments
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
             "num_images": given(flag_int("--images", args.images), 1), "tags": args.tag or []}
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
    for name in ("sampler", "schedule"):
        if getattr(args, name) is not None:
            fixed[name] = getattr(args, name)
    fixed.update(_input_fields(args))
    seed = flag_int("--seed", args.seed)
    specs = [{**fixed, "prompt": prompt, **({"seed": seed + i} if seed is not None else {})}
             for prompt in prompts for i in range(count)]
    client = client_from(args)
    try:
        return client, client.submit_batch(specs, batch_id=batch, webhook=args.webhook)
    except SpecError as exc:
        message = str(exc)
        for field, flag in INPUT_FLAGS.items():
            if getattr(args, flag[2:].replace("-", "_")) is not None:
                message = message.replace(f": {field}: ", f": {flag} ({field}): ")
        raise SpecError(message) from None


def _input_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The image-input and chain fields of --init, --mask, --strength, --mask-blur, --resize-mode, --after,
    --init-from and --hires: each image read once here (one upload for every job, checked by the client), the
    numbers parsed, the rest JobSpec's to check."""
    out: dict[str, Any] = {}
    for flag, field in (("--init", "init_image"), ("--mask", "mask")):
        path = getattr(args, flag[2:])
        if path is not None:
            try:
                out[field] = Path(path).read_bytes()
            except OSError as exc:
                raise CliError(f"{flag} {shown(path)}: cannot read it: {exc.strerror or exc}") from None
    if (strength := flag_float("--strength", args.strength)) is not None:
        out["strength"] = strength
    if (blur := flag_int("--mask-blur", args.mask_blur)) is not None:
        out["mask_blur"] = blur
    if args.resize_mode is not None:
        out["resize_mode"] = args.resize_mode
    if args.after:
        out["after"] = args.after
    if args.init_from is not None:
        out["init_from"] = args.init_from
    hires = {"scale": flag_float("--hires", args.hires), "strength": flag_float("--hires-strength", args.hires_strength),
             "steps": flag_int("--hires-steps", args.hires_steps)}
    if hires["scale"] is None and any(v is not None for v in hires.values()):
        raise CliError("--hires-strength and --hires-steps go with --hires SCALE")
    if hires["scale"] is not None:
        out["hires"] = {k: v for k, v in hires.items() if v is not None}
    return out


def cmd_submit(args: argparse.Namespace) -> int:
    # What only matters after submitting is checked before it: a bad --timeout must not leave jobs behind.
    timeout = flag_float("--timeout", args.timeout)
    if timeout is not None and timeout <= 0:
        raise CliError(f"--timeout {args.timeout}: must be more than 0 seconds")
    if "\x00" in args.out:
        raise CliError("--out: the path contains a NUL character")
    batch = new_job_id()
    client, ids = _submit_file(args, batch) if args.specs is not None else _submit_flags(args, batch)
    log.info("batch %s: %d job(s) queued", batch, len(ids))  # stderr: stdout is for the ids and images
    if args.no_wait:
        emit(args, {"ok": True, "batch": batch, "jobs": ids}, "\n".join(ids))
        return 0
    outcome = follow(client, ids, Path(args.out), timeout, quiet=args.json)
    payload = {"ok": not outcome["failed"] and not outcome["stopped"], "batch": batch, "jobs": ids,
               "done": len(outcome["done"]), "failed": [{"id": j.id, "error": j.error} for j in outcome["failed"]],
               "images": outcome["images"], "pending": outcome["pending"]}
    human = "\n".join([*outcome["images"], *(f"failed {j.id}: {j.error}" for j in outcome["failed"]),
                       *(f"pending {job_id}" for job_id in outcome["pending"])])
    if outcome["stopped"]:
        why = f"timed out after {timeout:g} s" if outcome["stopped"] == "timeout" else "interrupted"
        payload["error"] = (f"{why}: {len(outcome['pending'])} of {len(ids)} job(s) still pending; they stay in "
                            f"the farm (follow them with `renderfarm jobs --batch {batch}`, stop them with "
                            f"`renderfarm cancel --batch {batch}`)")
        payload[outcome["stopped"]] = True
    emit(args, payload, human)
    if not args.json and outcome["stopped"]:
        print(f"renderfarm submit: {payload['error']}", file=sys.stderr)
    if outcome["stopped"]:
        return EXIT_TIMEOUT if outcome["stopped"] == "timeout" else EXIT_INTERRUPTED
    return 0 if not outcome["failed"] else EXIT_ERROR


def _list_row(job) -> dict[str, Any]:
    """What `jobs` shows of a job (and `status JOB` too): who asked for what, where it is, and when."""
    spec = job.spec
    return {"id": job.id, "state": job.state.value, "team": spec.team, "batch": job.batch_id,
            "model": spec.model, "size": f"{spec.width}x{spec.height}", "node": job.node, "tags": list(spec.tags),
            "prompt": spec.prompt, "seed": spec.seed, "priority": spec.priority, "created_at": job.created_at,
            "started_at": job.started_at, "finished_at": job.finished_at, "error": job.error}


def _job_row(client, job) -> dict[str, Any]:
    spec = job.spec
    row = {**_list_row(job), "negative_prompt": spec.negative_prompt, "steps": spec.steps,
           "guidance": spec.guidance, "num_images": spec.num_images, "attempts": job.attempts,
           "timings": job.timings, "peak_memory_mb": job.peak_memory_mb, "images": job.images,
           "profile": job.profile, "escalations": job.escalations}
    if job.state.value == "queued":
        estimate = client.estimates([job.id]).get(job.id, {})
        row["queue_position"] = estimate.get("position")
        row["eta_s"] = estimate.get("eta_s")
        row["waits_for"] = estimate.get("node")
        if estimate.get("waiting"):
            row["waiting"] = estimate["waiting"]
    if job.spec.after:
        row["after"] = list(job.spec.after)
        if job.state.value == "waiting":  # what it waits for: the jobs it runs after that are not done
            row["waits_on"] = [{"job": p, "state": st} for p, st in client.store.waits_for([job]).get(job.id, [])]
    if job.blocked_by:
        row["blocked_by"] = job.blocked_by
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


def _when(epoch: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch)) if epoch else "-"


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _job_block(r: dict[str, Any]) -> str:
    """A job as `status JOB` prints it: the line it always had, then what was asked and when."""
    head = (f"{r['id']}  {r['state']:<9} {r['model']} {r['size']} node={r['node'] or '-'} "
            f"attempts={r['attempts']}" + _stages(r)
            + (f" position={r['queue_position']}" if r.get("queue_position") is not None else "")
            + (f" eta={r['eta_s']:.1f}s on {r['waits_for']}" if r.get("eta_s") is not None else "")
            + (f" waiting: {r['waiting']}" if r.get("waiting") else "")
            + (" waits for " + ", ".join(f"{w['job']} ({w['state']})" for w in r["waits_on"])
               if r.get("waits_on") else "")
            + (f" error={r['error']}" if r["error"] else ""))
    lines = [head, f"  prompt: {_one_line(r['prompt'], 200)}"]
    if r["negative_prompt"]:
        lines.append(f"  negative: {_one_line(r['negative_prompt'], 200)}")
    lines.append(f"  seed={r['seed']} steps={r['steps']} guidance={r['guidance']:g} images={r['num_images']} "
                 f"team={r['team']} priority={r['priority']} batch={r['batch'] or '-'} "
                 f"tags={','.join(r['tags']) or '-'}")
    lines.append(f"  created {_when(r['created_at'])}  started {_when(r['started_at'])}  "
                 f"finished {_when(r['finished_at'])}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    client = client_from(args, empty_ok=bool(args.jobs))  # an empty overview of the wrong database misleads
    if args.jobs:
        rows = [_job_row(client, job) for job in client.jobs(args.jobs)]
        emit(args, {"ok": True, "jobs": rows}, "\n".join(_job_block(r) for r in rows))
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
        held = status["assets"].get(node["name"])
        if held:
            lines.append(f"       models={', '.join(held['models']) or '-'}")
            lines.append(f"       loras={', '.join(held['loras']) or '-'}"
                         + (f"  unusable={len(held['lora_problems'])}" if held["lora_problems"] else "")
                         + (f"  library: {held['lora_dir_error']}" if held["lora_dir_error"] else ""))
    if status["counters"]:
        lines.append("farm   " + "  ".join(f"{k}={v}" for k, v in sorted(status["counters"].items())))
    for job_id, reason in sorted(status["quarantined"].items()):
        lines.append(f"quarantined {job_id}: {reason}")
    emit(args, {"ok": True, **status}, "\n".join(lines))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise CliError(f"--limit {args.limit}: must be at least 1")
    client = client_from(args, empty_ok=False)  # "no jobs" from the wrong database misleads
    found = client.list_jobs(state=args.state, team=args.team, batch=args.batch, tag=args.tag, model=args.model,
                             node=args.node, limit=args.limit)
    rows = [_list_row(job) for job in found]
    lines = [f"{'ID':<16}  {'STATE':<9} {'TEAM':<10} {'MODEL':<12} {'SIZE':<9} {'NODE':<10} {'CREATED':<19}  PROMPT"]
    lines += [f"{r['id']:<16}  {r['state']:<9} {r['team']:<10} {r['model']:<12} {r['size']:<9} "
              f"{r['node'] or '-':<10} {_when(r['created_at']):<19}  {_one_line(r['prompt'], 50)}" for r in rows]
    emit(args, {"ok": True, "count": len(rows), "limit": args.limit, "jobs": rows},
         "\n".join(lines) if rows else "no jobs match")
    return 0


def _named_or_batch(client, args: argparse.Namespace, states: set[str] | None = None) -> list[str]:
    """The job ids a command names, then those of --batch (only those in `states`, when given)."""
    ids = list(args.jobs)
    if args.batch:
        members = client.store.batch_ids(args.batch)
        if not members:
            raise CliError(f"no such batch: {args.batch}")
        if states is not None:
            members = [job.id for job in client.jobs(members) if job.state.value in states]
        ids += [job_id for job_id in members if job_id not in ids]
    elif not ids:
        raise CliError("give job ids or --batch ID")
    return ids


def cmd_cancel(args: argparse.Namespace) -> int:
    client = client_from(args)
    outcome = client.cancel(_named_or_batch(client, args))
    # A job already finished needs no cancel; one that is unknown or another team's is an error.
    refused = {k: v for k, v in outcome.items() if v.startswith("not cancelled") and "already" not in v}
    emit(args, {"ok": not refused, "jobs": outcome}, "\n".join(f"{k}  {v}" for k, v in outcome.items()))
    return EXIT_ERROR if refused else 0


def cmd_retry(args: argparse.Namespace) -> int:
    client = client_from(args)
    ids = _named_or_batch(client, args, states={"failed", "cancelled"})
    if not ids:  # a batch with nothing to retry
        emit(args, {"ok": True, "jobs": {}}, f"batch {args.batch}: no failed or cancelled jobs")
        return 0
    outcome = client.retry(ids)
    refused = {k: v for k, v in outcome.items() if v.startswith("not retried")}
    emit(args, {"ok": not refused, "jobs": outcome}, "\n".join(f"{k}  {v}" for k, v in outcome.items()))
    return EXIT_ERROR if refused else 0


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
