"""Choosing a profile: every rung of the card's ladder predicted (planning/vram.py), the fastest one that fits
the card and the machine's RAM chosen, and why. Also the next rung when a render runs out of memory, and the
report `renderfarm plan` prints.

Kept apart from profiles.py (what a profile is) so that the VRAM model and the choice depend on the types
and never on each other: profiles -> vram -> choose.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from renderfarm.planning.catalog import ModelEntry
from renderfarm.planning.devices import Device
from renderfarm.planning.profiles import (
    Placement,
    Profile,
    VaeMode,
    ladder,
    unavailable_reason,
)
from renderfarm.planning.vram import Prediction, check_task, predict

# --- choosing ---------------------------------------------------------------------------------------

DEFAULT_MARGIN_GIB = 0.5  # kept free on top of the prediction: other processes, driver, estimate error
DISK_MARGIN_GIB = 2.0  # free disk left beside disk offload's files


@dataclass(frozen=True)
class Candidate:
    profile: Profile
    prediction: Prediction
    fits: bool
    reason: str  # one line: why it fits, why not, or why the device cannot run it


@dataclass(frozen=True)
class ProfileChoice:
    model: str
    device: Device
    width: int
    height: int
    batch: int
    margin_gib: float
    chosen: Profile | None  # None: not even the floor fits
    candidates: tuple[Candidate, ...]
    reason: str
    steps: int = 28  # the job length the choice was timed for
    task: str = "txt2img"  # "img2img" and "inpaint" add the VAE encode (planning/vram.py)

    @property
    def usable_gib(self) -> float:
        return self.device.vram_gib - self.margin_gib

    @property
    def chosen_candidate(self) -> Candidate | None:
        return next((c for c in self.candidates if c.profile == self.chosen), None)

    def explain(self) -> str:
        d = self.device
        cc = f"cc {d.cc_text}" if d.cc_text else "cpu"
        host = d.host_budget_gib
        ram = (f"; RAM {d.ram_gib:g} GiB, {host:.2f} usable for weights" if host is not None and d.is_cuda
               else "; RAM not given: host memory not checked" if d.is_cuda else "")
        task = f" {self.task}," if self.task != "txt2img" else ""
        lines = [
            (
                f"{self.model}{task} {self.width}x{self.height} x{self.batch}, {self.steps} steps, on {d.name} "
                f"({d.vram_gib:g} GiB, {cc}; usable {self.usable_gib:.2f} GiB after a {self.margin_gib:g} GiB "
                f"margin{ram})"
            ),
            f"chosen: {self.chosen.name if self.chosen else 'none'}: {self.reason}",
            f"  {'profile':<34} {'VRAM GiB':>8} {'host GiB':>8} {'s/step':>7} {'s/job':>7}  fits  reason",
        ]
        for c in self.candidates:
            p = c.prediction
            lines.append(
                f"  {c.profile.name:<34} {p.peak_gib:8.2f} {p.host_peak_gib:8.2f} {p.seconds_per_step:7.2f} "
                f"{p.seconds_per_job(self.steps):7.1f}  {'yes ' if c.fits else 'no  '}  {c.reason}"
            )
        return "\n".join(lines)


def _check_job(entry: ModelEntry, width: int, height: int, batch: int, task: str = "txt2img") -> None:
    entry.check_size("width", width)
    entry.check_size("height", height)
    if batch < 1:
        raise ValueError(f"batch={batch} must be at least 1")
    check_task(task)


def _measured(pred: Prediction) -> str:
    return " (measured)" if pred.measured else ""


def _evaluate(
    entry: ModelEntry, profile: Profile, device: Device, width: int, height: int, batch: int, usable: float,
    floors: Mapping[str, float], host_usable: float | None, task: str = "txt2img",
) -> Candidate:
    def estimate(p: Profile) -> Prediction:
        """The prediction, raised to the measured floor where a node measured this profile here."""
        pred = predict(entry, p, device, width, height, batch, task)
        floor = floors.get(p.name)
        return replace(pred, peak_gib=floor, measured=True) if floor is not None and floor > pred.peak_gib else pred

    full = profile
    full_pred = estimate(full)
    unavailable = unavailable_reason(entry, profile, device)
    if unavailable:
        return Candidate(full, full_pred, False, f"unavailable: {unavailable}")
    if host_usable is not None and full_pred.host_peak_gib > host_usable:
        # The VAE mode changes nothing in host memory: no tiled retry.
        return Candidate(
            full, full_pred, False,
            f"needs {full_pred.host_peak_gib:.2f} GiB of host RAM ({full_pred.pinned_gib:.2f} pinned); "
            f"{host_usable:.2f} usable",
        )
    if profile.placement is Placement.DISK_OFFLOAD and device.disk_free_gib is not None:
        need = full_pred.weights_gib[entry.denoiser.name] + DISK_MARGIN_GIB
        if need > device.disk_free_gib:
            return Candidate(full, full_pred, False,
                             f"needs {need:.1f} GiB of free disk for its blocks; {device.disk_free_gib:.1f} free")
    if full_pred.peak_gib <= usable:
        return Candidate(
            full, full_pred, True, f"fits: {full_pred.peak_gib:.2f}{_measured(full_pred)} of {usable:.2f} GiB"
        )
    tiled = profile.with_vae(VaeMode.TILED)
    tiled_pred = estimate(tiled)
    if tiled_pred.peak_gib <= usable:
        return Candidate(
            tiled, tiled_pred, True,
            f"fits with tiled VAE: {tiled_pred.peak_gib:.2f}{_measured(tiled_pred)} of {usable:.2f} GiB "
            f"(full decode needs {full_pred.peak_gib:.2f})",
        )
    best, pred = (tiled, tiled_pred) if tiled_pred.peak_gib < full_pred.peak_gib else (full, full_pred)
    return Candidate(
        best, pred, False,
        f"needs {pred.peak_gib:.2f} GiB{_measured(pred)} at {pred.peak_stage.value}; {usable:.2f} usable",
    )


# Rungs predicted within this fraction of the fastest count as equally fast: the higher-fidelity one (earlier
# on the ladder: 16-bit before fp8 before 4-bit) wins. The speed model is rough; fidelity is certain.
SPEED_TIE = 0.05


def _keeping_text_encoders(candidates: list[Candidate]) -> list[Candidate]:
    """The candidates that keep every text encoder, when there are any; else all of them.
    Dropping T5 changes what the prompt conditions on, not just how finely: it is the last resort, taken only
    where nothing that keeps T5 fits, however much faster (profiles.py, the SD3 ladder)."""
    keeping = [c for c in candidates if not c.profile.drop_large_text_encoder]
    return keeping or candidates


def choose_profile(
    entry: ModelEntry,
    device: Device,
    width: int,
    height: int,
    batch: int = 1,
    margin_gib: float = DEFAULT_MARGIN_GIB,
    floors: Mapping[str, float] | None = None,
    steps: int | None = None,
    task: str = "txt2img",
) -> ProfileChoice:
    """The rung of `entry`'s ladder predicted to finish a job soonest among those whose predicted peak fits
    `device` with `margin_gib` to spare and whose host-memory peak fits the machine's RAM (when known).
    A job's time is `steps` (default: the model's) denoising steps plus what the placement moves between host
    and card per job; rungs within `SPEED_TIE` of the fastest count as equal and the higher-fidelity one wins.
    A rung that drops a text encoder (SD3's T5) is taken only where no rung that keeps it fits.
    Each rung is tried with a full VAE decode, then tiled; every rung's prediction and verdict come along in
    `candidates`. `floors` (profile name -> GiB, from planning.measured) raises a prediction to what a node
    measured for that profile at this size: an estimate never goes below it. `task` ("img2img", "inpaint")
    predicts the render with its VAE encode (planning/vram.py)."""
    _check_job(entry, width, height, batch, task)
    steps = steps or entry.default_steps
    usable = device.vram_gib - margin_gib
    host_usable = device.host_budget_gib if device.is_cuda else None
    candidates = tuple(
        _evaluate(entry, rung, device, width, height, batch, usable, floors or {}, host_usable, task)
        for rung in ladder(entry, device)
    )
    fitting = _keeping_text_encoders([c for c in candidates if c.fits])
    chosen = None
    if fitting:
        fastest = min(c.prediction.seconds_per_job(steps) for c in fitting)
        chosen = next(c for c in fitting if c.prediction.seconds_per_job(steps) <= fastest * (1 + SPEED_TIE))
        first = fitting[0]
        job_s = chosen.prediction.seconds_per_job(steps)
        if chosen is first:
            why = "the first rung that fits, and"
            why += " the fastest" if job_s <= fastest else f" within {SPEED_TIE:.0%} of the fastest"
        else:
            why = (f"predicted fastest ({first.profile.name}, which fits above it, "
                   f"{first.prediction.seconds_per_job(steps):.1f} s)")
        reason = f"{why}: {job_s:.1f} s per job of {steps} steps ({chosen.reason})"
        if chosen.profile.drop_large_text_encoder:
            reason += "; it drops T5, since no rung that keeps it fits"
    else:
        runnable = [c for c in candidates if not c.reason.startswith("unavailable")]
        if runnable:
            floor = min(runnable, key=lambda c: c.prediction.peak_gib)
            reason = (
                f"nothing fits: the most frugal rung, {floor.profile.name}, needs {floor.prediction.peak_gib:.2f} "
                f"GiB; {usable:.2f} usable"
            )
            on_card = [c for c in runnable if c.prediction.peak_gib <= usable]
            if on_card:
                lightest = min(on_card, key=lambda c: c.prediction.host_peak_gib)
                reason = (f"nothing fits: what fits the card's {usable:.2f} GiB does not fit the machine; the "
                          f"lightest on host RAM, {lightest.profile.name}, {lightest.reason}")
        else:
            reason = f"nothing fits: {device.name} can run no rung of {entry.name}"
    return ProfileChoice(
        model=entry.name, device=device, width=width, height=height, batch=batch, margin_gib=margin_gib,
        chosen=chosen.profile if chosen else None, candidates=candidates, reason=reason, steps=steps, task=task,
    )


def next_rung(
    entry: ModelEntry, device: Device, current: Profile, width: int, height: int, batch: int = 1,
    task: str = "txt2img",
) -> Profile | None:
    """Where to go after an out-of-memory error with `current`: first the same profile with a tiled VAE,
    then the next rung down (tiled too, and group offload at its smallest) that predicts a lower peak (for
    `task`). None at the floor."""
    _check_job(entry, width, height, batch, task)
    if current.vae is not VaeMode.TILED:
        return current.with_vae(VaeMode.TILED)
    current_peak = predict(entry, current, device, width, height, batch, task).peak_gib
    rungs = ladder(entry, device)
    base = current.base_name
    names = [r.name for r in rungs]
    start = names.index(base) + 1 if base in names else 0
    for rung in rungs[start:]:
        if unavailable_reason(entry, rung, device):
            continue
        candidate = rung.with_vae(VaeMode.TILED)
        if predict(entry, candidate, device, width, height, batch, task).peak_gib < current_peak:
            return candidate
    return None


def next_rung_for_host(
    entry: ModelEntry, device: Device, current: Profile, width: int, height: int, batch: int = 1,
    margin_gib: float = DEFAULT_MARGIN_GIB, task: str = "txt2img",
) -> Profile | None:
    """Where to go after HOST memory ran out with `current` (a pinned allocation failed): the fastest rung that
    fits the card and predicts a smaller host-memory peak than `current`. None when there is none. (Walking
    down the VRAM ladder instead would reach leaf offload, which pins the most.)"""
    _check_job(entry, width, height, batch, task)
    ceiling = predict(entry, current, device, width, height, batch, task).host_peak_gib
    unknown_ram = replace(device, ram_gib=None, ram_available_gib=None)
    choice = choose_profile(entry, unknown_ram, width, height, batch, margin_gib, task=task)
    lighter = _keeping_text_encoders(
        [c for c in choice.candidates if c.fits and c.prediction.host_peak_gib < ceiling])
    if not lighter:
        return None
    return min(lighter, key=lambda c: c.prediction.seconds_per_job(choice.steps)).profile


def plan_report(
    entry: ModelEntry, device: Device, width: int, height: int, batch: int = 1,
    margin_gib: float = DEFAULT_MARGIN_GIB,
    steps: int | None = None,
    task: str = "txt2img",
) -> dict[str, Any]:
    """What `renderfarm plan` prints as JSON: the device, the chosen profile and every candidate."""
    choice = choose_profile(entry, device, width, height, batch, margin_gib, steps=steps, task=task)
    return {
        "model": entry.name,
        "task": task,
        "device": device.as_dict(),
        "size": [width, height],
        "batch": batch,
        "margin_gib": margin_gib,
        "steps": choice.steps,
        "host_usable_gib": round(device.host_budget_gib, 2) if device.host_budget_gib is not None else None,
        "chosen": choice.chosen.name if choice.chosen else None,
        "reason": choice.reason,
        "candidates": [
            {
                "name": c.profile.name,
                "weights": c.profile.weights.value,
                "text_encoder_weights": (c.profile.text_encoder_weights or c.profile.weights).value,
                "compute_dtype": c.profile.compute_dtype.value,
                "placement": c.profile.placement.value,
                "vae": c.profile.vae.value,
                "vae_dtype": (c.profile.vae_dtype or c.profile.compute_dtype).value,
                "drop_large_text_encoder": c.profile.drop_large_text_encoder,
                "predicted_peak_gib": round(c.prediction.peak_gib, 2),
                "peak_stage": c.prediction.peak_stage.value,
                "stage_peaks_gib": {k.value: round(v, 2) for k, v in c.prediction.stage_peaks_gib.items()},
                "host_gib": round(c.prediction.host_gib, 2),
                "host_peak_gib": round(c.prediction.host_peak_gib, 2),
                "pinned_gib": round(c.prediction.pinned_gib, 2),
                "seconds_per_step": round(c.prediction.seconds_per_step, 3),
                "vae_encode_s": round(c.prediction.vae_encode_s, 3),
                "seconds_per_job": round(c.prediction.seconds_per_job(choice.steps), 2),
                "fits": c.fits,
                "reason": c.reason,
            }
            for c in choice.candidates
        ],
    }
