"""Samplers by their A1111 names: which diffusers scheduler each is, which model families can use it, and the
sigma schedules ("schedule types") that go with it.

A job names a sampler (`JobSpec.sampler`, A1111's `sampler_name`) and optionally a schedule type
(`JobSpec.schedule`, A1111's `scheduler`: Karras, Exponential, Beta); leaving them out renders with the
scheduler the model's pipeline comes with. The worker swaps the pipeline's scheduler for one batch
(`scheduler_for`, built from the pipeline's own scheduler config, so the model's training schedule, prediction
type and timestep spacing carry over) and puts the original back afterwards: jobs with different samplers never
share a pipeline call (they differ in JobSpec.batch_key).

Families: the UNet families trained on noise prediction (SD 1.5, SDXL) take every sampler below; the
flow-matching families (Flux, SD 3.x) take the flow-matching Euler only: diffusers' other schedulers
assume a noise-prediction model and would render garbage from a flow model. Left out on purpose: LMS (needs
scipy) and DPM++ SDE (needs torchsde), neither a dependency of the farm.

Pure: no torch at import; `scheduler_for` imports diffusers when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["SAMPLERS", "SCHEDULES", "Sampler", "check", "scheduler_for"]


SIGMAS = ("Karras", "Exponential", "Beta")  # the schedule types a k-diffusion style scheduler takes


@dataclass(frozen=True)
class Sampler:
    name: str  # A1111's name
    scheduler: str  # the diffusers class
    flow: bool = False  # a flow-matching scheduler (Flux, SD 3.x) rather than a noise-prediction one
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the pipeline's scheduler config
    # The schedule types (besides Automatic) whose config flag the class takes. Written out rather than read from
    # diffusers so that a submit need not import it; tests/unit/test_samplers.py checks them against diffusers.
    schedules: tuple[str, ...] = SIGMAS


SAMPLERS: dict[str, tuple[Sampler, ...]] = {
    name: tuple(variants) for name, variants in {
        "Euler": [Sampler("Euler", "EulerDiscreteScheduler"),
                  Sampler("Euler", "FlowMatchEulerDiscreteScheduler", flow=True)],
        "Euler a": [Sampler("Euler a", "EulerAncestralDiscreteScheduler", schedules=())],
        # (FlowMatchHeunDiscreteScheduler takes no `mu`/sigmas from the Flux and SD3 pipelines: they refuse it)
        "Heun": [Sampler("Heun", "HeunDiscreteScheduler")],
        "DPM2": [Sampler("DPM2", "KDPM2DiscreteScheduler")],
        "DPM2 a": [Sampler("DPM2 a", "KDPM2AncestralDiscreteScheduler")],
        "DPM++ 2M": [Sampler("DPM++ 2M", "DPMSolverMultistepScheduler",
                             config={"algorithm_type": "dpmsolver++", "solver_order": 2})],
        "DPM++ 2M SDE": [Sampler("DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                                 config={"algorithm_type": "sde-dpmsolver++", "solver_order": 2})],
        "DDIM": [Sampler("DDIM", "DDIMScheduler", schedules=())],
        "DDPM": [Sampler("DDPM", "DDPMScheduler", schedules=())],
        "PLMS": [Sampler("PLMS", "PNDMScheduler", schedules=())],
        "UniPC": [Sampler("UniPC", "UniPCMultistepScheduler")],
        "DEIS": [Sampler("DEIS", "DEISMultistepScheduler")],
        "LCM": [Sampler("LCM", "LCMScheduler", schedules=())],
    }.items()
}

# A1111's schedule types -> the diffusers config flag that gives that sigma spacing ("Automatic": none).
SCHEDULES: dict[str, str | None] = {
    "Automatic": None,
    "Karras": "use_karras_sigmas",
    "Exponential": "use_exponential_sigmas",
    "Beta": "use_beta_sigmas",
}


def _variant(name: str, flow: bool) -> Sampler | None:
    return next((s for s in SAMPLERS.get(name, ()) if s.flow == flow), None)


def check(sampler: str | None, schedule: str | None, *, flow: bool, family: str) -> str | None:
    """Why `sampler` with `schedule` cannot render a model of `family` (flow-matching or not), or None when it can.
    None for both: the model's own scheduler."""
    if sampler is not None and sampler not in SAMPLERS:
        return f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}"
    if schedule is not None and schedule not in SCHEDULES:
        return f"unknown schedule type {schedule!r}; known: {', '.join(SCHEDULES)}"
    if sampler is None:
        if SCHEDULES.get(schedule or "Automatic") is not None:
            return "a schedule type needs a sampler to go with it (sampler)"
        return None
    variant = _variant(sampler, flow)
    if variant is None:
        kind = "flow-matching" if flow else "noise-prediction"
        able = [name for name, variants in SAMPLERS.items() if any(v.flow == flow for v in variants)]
        return f"{sampler!r} cannot render {family} ({kind}) models; these can: {', '.join(able)}"
    # (diffusers' from_config drops a flag a class does not take, with a warning only: refused here instead)
    if schedule not in (None, "Automatic") and schedule not in variant.schedules:
        return f"{sampler!r} ({variant.scheduler}) has no {schedule} schedule"
    return None


def scheduler_for(current: Any, sampler: str, schedule: str | None) -> Any:
    """A new scheduler for `sampler` (A1111 name) and `schedule`, built from the config of `current` (the
    pipeline's own: its training schedule and prediction type carry over). ValueError when `check` refuses it."""
    import diffusers

    flow = type(current).__name__.startswith("FlowMatch")
    why = check(sampler, schedule, flow=flow, family="this")
    if why:
        raise ValueError(why)
    variant = _variant(sampler, flow)
    assert variant is not None  # check() said it exists
    cls = getattr(diffusers, variant.scheduler)
    overrides = dict(variant.config)
    flag = SCHEDULES.get(schedule or "Automatic")
    if flag is not None:
        overrides[flag] = True
    return cls.from_config(current.config, **overrides)
