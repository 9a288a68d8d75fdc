"""Chains at submit: jobs that wait for others (`after`), that start from an earlier job's output (`init_from`),
and the hires fix, which the client builds as a two-job chain (`hires`).

What a batch may say, and what the client makes of it before anything is enqueued (`plan_chains`):
- `after` names job ids, or "#N": the batch's Nth spec (0-based, as given); `init_from` ("JOB" or "JOB:i", the
  same references) implies `after` that job. Every reference becomes a real id; a job waiting for itself, a
  "#N" past the batch, a cycle inside the batch, a parent that does not exist, belongs to another team, or has
  already failed or been cancelled: refused, naming the spec and the field, and nothing is enqueued. (The
  store's submit script checks the parents again in the transaction: a parent that fails meanwhile refuses
  the batch there, store/scripts/submit.lua.)
- `init_from` "JOB" gives this job's image k the parent's image k (the image counts must match); "JOB:i" gives
  every image the parent's image i (i below its count). A parent of another size needs a `resize_mode`.
- `hires` on a text-to-image spec: the spec becomes two jobs. The first pass is the spec without `hires`, with
  the id `<id>-base`; the second, which keeps the spec's id (the job whose images were asked for), is an
  img2img job at `scale` times the size (rounded down to the family's size multiple), the fix's `strength`,
  running the fix's `steps` (0: the first pass's) denoising steps as A1111's hires pass does (`hires_steps`:
  the job's steps stretched so that strength x steps are those), the same seed, `init_from` the first pass image for image, resized with
  Lanczos (`resize_mode` "resize"). A1111's hires fix does the same in one process; on the farm each pass is
  routed on its own to a node where it fits (the second is the bigger).

The store settles a waiting job when its parents finish (cluster/store/chains.py); the worker reads an
`init_from` parent's images from the result store (actors/job_inputs.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from renderfarm.errors import SpecError
from renderfarm.jobs import MAX_STEPS, Job, JobSpec, JobState
from renderfarm.planning.vram import effective_steps

BASE_SUFFIX = "-base"  # the first pass of a hires fix: `<id>-base`
_LOCAL = re.compile(r"#([0-9]+)")


def parse_init_from(value: str) -> tuple[str, int | None]:
    """("JOB", None) for "JOB" (image for image), ("JOB", i) for "JOB:i"."""
    job, sep, index = value.partition(":")
    return job, int(index) if sep else None


def hires_size(value: int, scale: float, multiple: int) -> int:
    """A side of the hires pass: `value` times `scale`, rounded down to the family's size multiple."""
    return max(multiple, int(value * scale) // multiple * multiple)


def hires_steps(steps: int, strength: float, flow_matching: bool) -> int:
    """The `steps` of the hires pass's img2img job so that it runs `steps` denoising steps at `strength`, as
    A1111's hires pass does (sd_samplers_common.setup_img2img_steps: given steps, it stretches the schedule to
    steps / strength and runs the last `steps` of it); an img2img job of `steps` steps would run only about
    steps x strength. At strength 0 nothing runs either way."""
    if strength <= 0:
        return steps
    total = steps  # the fewest: a pass of n steps runs at most n, and one more step adds at most one run
    while effective_steps(total, strength, flow_matching) < steps and total <= MAX_STEPS:
        total += 1
    return total  # past MAX_STEPS when the strength is too low for the steps: the pass's check refuses it


def plan_chains(
    specs: Sequence[JobSpec],
    ids: Sequence[str],
    *,
    validate: Callable[[dict[str, Any], str], JobSpec],
    read: Callable[[list[str]], list[Job | None]],
    may_touch: Callable[[str], bool],
    family: Callable[[str], Any],
) -> tuple[list[JobSpec], list[str]]:
    """The jobs to enqueue for `specs` (already validated) with `ids`: references resolved, hires fixes built,
    every parent checked. `validate` checks a built spec (dict, where); `read` reads existing jobs (None when
    missing); `may_touch(team)` says whether this client may read a team's jobs; `family(model)`: the model's
    family (its `size_multiple`, `flow_matching`). Raises SpecError naming each problem; then nothing may be
    enqueued."""
    if not any(spec.after or spec.init_from or spec.hires for spec in specs):
        return list(specs), list(ids)
    errors: list[str] = []
    resolved = [_resolve(spec, i, ids, errors) for i, spec in enumerate(specs)]
    _raise(errors)
    out_specs: list[JobSpec] = []
    out_ids: list[str] = []
    for i, (spec, job_id) in enumerate(zip(resolved, ids)):
        if spec.hires is None or spec.init_from is not None:
            out_specs.append(spec)
            out_ids.append(job_id)
            continue
        base_id = job_id + BASE_SUFFIX
        if base_id in ids:
            errors.append(f"jobs[{i}]: hires: its first pass would take the id {base_id}, which the batch uses")
            continue
        try:
            second = _hires_pass(spec, base_id, family(spec.model), validate, f"jobs[{i}] (hires pass)")
        except SpecError as exc:
            errors.append(str(exc))
            continue
        out_specs += [spec.model_copy(update={"hires": None, "webhook": None}), second]  # the hook: when it is all done
        out_ids += [base_id, job_id]
    _raise(errors)
    in_batch = dict(zip(out_ids, out_specs))
    where = _where(ids, out_ids)
    errors += _cycles(out_specs, out_ids, where)
    _raise(errors)
    outside = sorted({p for spec in out_specs for p in spec.after if p not in in_batch})
    existing = dict(zip(outside, read(outside))) if outside else {}
    for spec, job_id in zip(out_specs, out_ids):
        for parent in spec.after:
            if parent in in_batch:
                continue
            found = existing.get(parent)
            if found is None:
                errors.append(f"{where[job_id]}: after: job {parent} does not exist")
            elif not may_touch(found.spec.team):
                errors.append(f"{where[job_id]}: after: job {parent} belongs to team {found.spec.team!r}")
            elif found.state in (JobState.FAILED, JobState.CANCELLED):
                errors.append(f"{where[job_id]}: after: job {parent} is {found.state.value}: retry it first, "
                              "or leave it out")
        if spec.init_from is not None:
            parent, index = parse_init_from(spec.init_from)
            found = in_batch.get(parent) or (existing[parent].spec if existing.get(parent) else None)
            if found is not None and (problem := _init_from_problem(spec, found, parent, index)):
                errors.append(f"{where[job_id]}: init_from: {problem}")
    _raise(errors)
    return out_specs, out_ids


def _raise(errors: list[str]) -> None:
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise SpecError("; ".join(errors[:5]) + more + "; nothing was enqueued")


def _where(given: Sequence[str], built: Sequence[str]) -> dict[str, str]:
    """How an error names each job: jobs[i] as given, jobs[i].hires (first pass) for a hires fix's first pass."""
    index = {job_id: i for i, job_id in enumerate(given)}
    return {job_id: f"jobs[{index[job_id]}]" if job_id in index
            else f"jobs[{index[job_id.removesuffix(BASE_SUFFIX)]}] (hires first pass)" for job_id in built}


def _resolve(spec: JobSpec, i: int, ids: Sequence[str], errors: list[str]) -> JobSpec:
    """`spec` with every "#N" made the Nth id, and `init_from`'s job in `after`."""
    def real(ref: str, field: str) -> str | None:
        local = _LOCAL.fullmatch(ref)
        if local is None:
            target = ref
        elif int(local.group(1)) >= len(ids):
            errors.append(f"jobs[{i}]: {field}: {ref} is past the batch's {len(ids)} specs")
            return None
        else:
            target = ids[int(local.group(1))]
        if target == ids[i]:
            errors.append(f"jobs[{i}]: {field}: a job cannot wait for itself")
            return None
        return target

    after = [real(ref, "after") for ref in spec.after]
    init_from = spec.init_from
    if init_from is not None:
        job, index = parse_init_from(init_from)
        parent = real(job, "init_from")
        if parent is not None:
            init_from = parent if index is None else f"{parent}:{index}"
            after.append(parent)
    parents = list(dict.fromkeys(p for p in after if p is not None))
    if parents == list(spec.after) and init_from == spec.init_from:
        return spec
    return spec.model_copy(update={"after": tuple(parents), "init_from": init_from})


def _hires_pass(spec: JobSpec, base_id: str, family: Any, validate: Callable[[dict[str, Any], str], JobSpec],
                where: str) -> JobSpec:
    fix = spec.hires
    assert fix is not None
    multiple = family.size_multiple
    data = spec.model_dump()
    data.update(
        width=hires_size(spec.width, fix.scale, multiple), height=hires_size(spec.height, fix.scale, multiple),
        steps=hires_steps(fix.steps or spec.steps, fix.strength, family.flow_matching), strength=fix.strength,
        init_from=base_id, after=[base_id],
        resize_mode="resize",
    )
    return validate(data, where)


def _cycles(specs: Sequence[JobSpec], ids: Sequence[str], where: dict[str, str]) -> list[str]:
    """A cycle of `after` inside the batch (jobs outside it cannot wait for jobs not yet submitted)."""
    edges = {job_id: [p for p in spec.after if p in where] for job_id, spec in zip(ids, specs)}
    colour: dict[str, int] = {}
    for start in ids:
        if colour.get(start):
            continue
        stack = [(start, iter(edges[start]))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                loop = path[path.index(child):] + [child]
                return [f"{where[loop[0]]}: after: a cycle: " + " -> ".join(loop)]
            elif not colour.get(child):
                colour[child] = 1
                stack.append((child, iter(edges[child])))
                path.append(child)
    return []


def _init_from_problem(spec: JobSpec, parent: JobSpec, parent_id: str, index: int | None) -> str | None:
    if index is None and spec.num_images != parent.num_images:
        return (f"job {parent_id} renders {parent.num_images} images and this job {spec.num_images}: take them "
                f"image for image with equal counts, or name one ({parent_id}:0)")
    if index is not None and index >= parent.num_images:
        return f"job {parent_id} renders {parent.num_images} images; there is no image {index}"
    if (parent.width, parent.height) != (spec.width, spec.height) and spec.resize_mode == "none":
        return (f"job {parent_id} renders {parent.width}x{parent.height}, this job {spec.width}x{spec.height}: "
                "give a resize_mode (resize, crop or fill)")
    return None
