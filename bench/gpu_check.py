"""One GPU check in one command: the planner's choices for a real 8 GB card, measured on the GPU at hand.

    python bench/gpu_check.py --out DIR [--time-limit 400] [--cpu-smoke] [--work-dir DIR]

Made to run on one H100/H200 in at most 7 minutes of wall time, model build included, with neither Ray
nor a Redis server (torch, diffusers, transformers, accelerate, bitsandbytes, gguf, pydantic and pytest are
all it needs). Flux-dev is the real architecture with random weights (bench/real_models.py), built once in
bf16 on the GPU and saved to a work folder that every step loads through `load_pipeline` and renders
through `render_batch`, the code a node runs. The steps, in priority order, each guarded (a failure or an
out-of-memory error is a recorded result, never a crash):

 1. `pytest -m gpu -q -x tests/actors` in a subprocess (started first, beside the model build, and waited
    for before anything is measured; its timeout is a share of the time limit): pass/fail counts, the tail.
 2. Flux-dev at 1024x1024 on the card the planner sees for a real "8 GB" card (`device_from_spec("NVIDIA
    GeForce RTX 3070", 7.6, "8.6")`, 32 GiB of host RAM where `Device` has `ram_gib`), with the profile
    `choose_profile` picks for it: loaded and rendered (3 steps) with the allocator capped to the card
    (`set_per_process_memory_fraction`, as bench/gpu_profiles.py does), but judged on what the driver says:
    device memory used (`mem_get_info`: total - free) sampled every 5 ms by a thread during load and render,
    overall and per stage (load, text encode, denoise, decode), against `predict`'s `peak_gib` and
    `stage_peaks_gib`; torch's `max_memory_reserved`/`allocated`; pinned host memory
    (`torch.cuda.host_memory_stats`, recorded as torch returns it) and the process's resident set
    (/proc/self/status VmRSS, VmHWM) against the prediction's `host_gib`, `host_peak_gib` and `pinned_gib`
    where `Prediction` has them, and against the 32 GiB host; seconds per step against the prediction for
    this GPU's throughput figures (the 8 GB card's memory).
 3. nf4 with model offload: the device-memory peak while `load_pipeline` runs under the card's cap, against
    the prediction's "load" stage where it has one; after an out-of-memory error there (a "fail" row), the
    load runs again uncapped, when the time allows, so that its peak is still measured.
 4. 1008x1008 against 1024x1024 with step 2's profile and loaded pipeline: both peaks and seconds per step
    (run right after step 2, while its pipeline is loaded, when the time left also covers step 3).
 5. The Turing path forced on Flux: a 16-bit rung turned to fp16 compute, `fp16_clamp=True` and an fp16
    VAE, rendered (2 steps, no cap): every denoiser and VAE-decoder output must be finite.
 6. Context growth: device memory not held by torch's allocator (`mem_get_info` against
    `memory_reserved`) at the start, before and after the first render, and at the end, against the
    planner's CONTEXT_GIB.

A step starts only while its expected duration (`MODES[...]["cost_s"]`) still fits before `--time-limit`
(default 400 s from the start, imports included; 0: none); a render still running at the limit stops
between two steps; a load cannot be stopped. What was left is "not run". Expected on an H100/H200
(estimates, not yet measured): start and CUDA ~15 s; building and saving Flux-dev ~60-90 s with the gpu
tests beside it (at most 150 s of the default 400); step 2 ~60-100 s (33 GB loaded, the streamed copies
pinned); step 4 ~15-35 s; step 3 ~40-70 s (twice that after an out-of-memory error); step 5 ~40-60 s.

Verdicts: "pass" or "fail" where a number is judged (a measured peak must not exceed its prediction or
its budget; seconds per step within 2x of the prediction; outputs finite; the gpu tests all pass), "info"
where there is nothing to judge against. The verdicts are the report: the command exits 0 whatever they
say, and non-zero only when the script itself broke.

CPU smoke mode (`--cpu-smoke`): the same steps and code on the tiny-flux stand-in at 64 and 48 px on the
CPU; the pytest step is skipped, nothing is capped, "device memory" is the resident set (sampled every
10 ms), and memory and speed are recorded as "info" (plumbing, not performance). Seconds, not minutes.

Output: DIR/gpu_check.json (everything measured, per step), DIR/gpu_check.md (a Markdown table: step, what
was measured, measured, predicted or limit, ratio, verdict) and, on a GPU, DIR/pytest_gpu.log. Progress
goes to stderr with timestamps.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))  # gpu_profiles.py and real_models.py, however this is started

import gpu_profiles as gp  # noqa: E402 - after the path is set

GIB = gp.GIB
# What a real "8 GB" card reports about itself (7.6-7.8 GiB), and the host RAM of such a machine.
CARD = ("NVIDIA GeForce RTX 3070", 7.6, "8.6")
HOST_RAM_GIB = 32.0
SPEED_FACTOR = 2.0  # seconds per step are rough: within this factor of the prediction passes
SAME_SIZE_SLACK = {"peak": 1.02, "s_per_step": 1.10}  # 1008 px may cost at most this much of 1024 px
PYTEST_SHARE = 0.375  # of the time limit, for the gpu tests (they run beside the model build)
PYTEST_ARGS = ("-m", "gpu", "-q", "-x", "-p", "no:cacheprovider", "tests/actors")
MODES: dict[str, dict[str, Any]] = {
    # model, sizes, steps per render, sampling interval, and each step's expected seconds (what must be
    # left before the time limit for it to start).
    "gpu": {"model": "flux-dev", "size": 1024, "small_size": 1008, "steps": 3, "fp16_steps": 2,
            "interval_s": 0.005, "cost_s": {"budget": 100, "sizes": 35, "load_peak": 70, "fp16": 60}},
    "cpu-smoke": {"model": "tiny-flux", "size": 64, "small_size": 48, "steps": 3, "fp16_steps": 2,
                  "interval_s": 0.01, "cost_s": {"budget": 5, "sizes": 3, "load_peak": 5, "fp16": 5}},
}
TITLES = {
    1: "gpu tests (pytest -m gpu tests/actors)",
    2: "the 8 GB card's profile at {size} px",
    3: "nf4 + model offload: load peak",
    4: "{small} px against {size} px",
    5: "Turing path forced (fp16 + fp16_clamp)",
    6: "context growth (outside torch's allocator)",
}
say = gp.say


# --- where it runs --------------------------------------------------------------------------------------


def _status_bytes(*fields: str) -> dict[str, int]:
    """Lines of /proc/self/status (VmRSS, VmHWM, RssAnon, ...) in bytes; 0 for those missing."""
    found = dict.fromkeys(fields, 0)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in found:
                    found[name] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return found


def _rss() -> int:
    return _status_bytes("VmRSS")["VmRSS"]


def _reset_rss_peak() -> None:
    # Linux resets VmHWM to VmRSS when "5" is written here; elsewhere the sampled peak stands alone.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class CudaChecks(gp.CudaBackend):
    """The GPU, as bench/gpu_profiles.py measures it, plus what the driver says (`mem_get_info`)."""

    judges = True
    mode = "gpu"
    memory_source = "driver level, mem_get_info"

    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device here; run with --cpu-smoke for the CPU stand-in")
        super().__init__()

    def card_bytes(self, used: int, baseline: int) -> int:
        return used  # the card is ours alone: what it has in use, context included, is what a card must hold

    def speed_card(self, card: Any) -> Any:
        """`card` with this GPU's throughput figures: the prediction the measured seconds compare with."""
        return dataclasses.replace(card, fp16_tflops=self.card.fp16_tflops, memory_gbps=self.card.memory_gbps,
                                   pcie_gbps=self.card.pcie_gbps, figures_from=self.card.figures_from)

    def reset_peaks(self) -> None:
        self.torch.cuda.reset_peak_memory_stats(0)
        try:
            self.torch.cuda.reset_peak_host_memory_stats()
        except (AttributeError, RuntimeError):
            pass

    def torch_peaks(self) -> dict[str, float | None]:
        cuda = self.torch.cuda
        return {"max_reserved_gib": cuda.max_memory_reserved(0) / GIB,
                "max_allocated_gib": cuda.max_memory_allocated(0) / GIB,
                "reserved_gib": cuda.memory_reserved(0) / GIB}

    def pinned_stats(self) -> dict[str, Any] | None:
        try:
            return dict(self.torch.cuda.host_memory_stats())
        except (AttributeError, RuntimeError):
            return None

    def release(self) -> None:
        self.fresh(collect=True)
        empty_host = getattr(self.torch._C, "_host_emptyCache", None)  # pinned blocks torch keeps cached
        if empty_host is not None:
            empty_host()


class CpuChecks(gp.CpuBackend):
    """The CPU: "device memory" is the resident set; nothing is capped or judged."""

    judges = False
    mode = "cpu-smoke"
    memory_source = "resident set"

    def device_bytes(self) -> int:
        return _rss()

    def card_bytes(self, used: int, baseline: int) -> int:
        return max(0, used - baseline)  # the runtime is no part of a model's prediction

    def speed_card(self, card: Any) -> Any:
        return card

    def outside_torch_gib(self) -> float:
        return _rss() / GIB  # no caching allocator on a CPU: the whole resident set

    def reset_peaks(self) -> None:
        pass

    def torch_peaks(self) -> dict[str, float | None]:
        return {"max_reserved_gib": None, "max_allocated_gib": None, "reserved_gib": None}

    def pinned_stats(self) -> dict[str, Any] | None:
        return None

    def release(self) -> None:
        self.fresh(collect=True)


# --- measuring ----------------------------------------------------------------------------------------------


class Watch:
    """Device memory (driver level) and the resident set, sampled by a thread while a load and render run.
    Peaks are read back per time window, so one watch gives the load's peak and each render stage's."""

    def __init__(self, backend: Any, interval_s: float) -> None:
        self.backend = backend
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []  # (perf_counter, device bytes, RSS bytes)
        self.windows: dict[str, tuple[float, float]] = {}
        self.torch: dict[str, dict[str, float | None]] = {}  # torch's peaks, read at the end of each window
        self.pinned: dict[str, dict[str, Any] | None] = {}
        self.error: str | None = None  # why the sampling thread stopped early, if it did
        self.placement: str | None = None  # what load_pipeline applied, when the watch covered a load
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-check-watch", daemon=True)

    def _sample(self) -> None:
        rss = _rss()
        device = rss if self.backend.kind == "cpu" else self.backend.device_bytes()
        self.samples.append((time.perf_counter(), device, rss))

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                self._sample()
        except Exception as exc:  # noqa: BLE001 - the readings at each window's end still stand
            self.error = gp._short(exc)

    def start(self) -> Watch:
        self.backend.fresh()
        self.backend.reset_peaks()
        _reset_rss_peak()
        self._sample()
        self.baseline_device, self.baseline_rss = self.samples[0][1:]
        self.pinned["before"] = self.backend.pinned_stats()
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
        self._sample()
        self.hwm = _status_bytes("VmHWM")["VmHWM"]

    def close_window(self, name: str, start: float) -> None:
        """The window `name` ran from `start` to now; torch's and the pinned allocator's figures at its end."""
        self._sample()
        self.windows[name] = (start, time.perf_counter())
        self.torch[name] = self.backend.torch_peaks()
        self.pinned[name] = self.backend.pinned_stats()

    def peak(self, index: int, window: str | None = None) -> int | None:
        start, end = self.windows[window] if window else (float("-inf"), float("inf"))
        values = [s[index] for s in self.samples if start <= s[0] <= end]
        return max(values) if values else None

    def card_gib(self, window: str | None = None) -> float | None:
        """Peak device memory in the window in card terms (what a card must have), GiB."""
        used = self.peak(1, window)
        return None if used is None else self.backend.card_bytes(used, self.baseline_device) / GIB

    def growth_gib(self, window: str | None = None) -> float | None:
        used = self.peak(1, window)
        return None if used is None else max(0, used - self.baseline_device) / GIB

    def rss_peak_gib(self) -> float:
        return max(self.peak(2) or 0, self.hwm) / GIB

    def summary(self) -> dict[str, Any]:
        return {
            "samples": len(self.samples), "interval_s": self.interval_s,
            "baseline_device_gib": _r(self.baseline_device / GIB), "baseline_rss_gib": _r(self.baseline_rss / GIB),
            "device_peak_gib": {w or "all": _r(self.card_gib(w)) for w in [None, *self.windows]},
            "device_growth_gib": {w or "all": _r(self.growth_gib(w)) for w in [None, *self.windows]},
            "rss_peak_gib": _r(self.rss_peak_gib()),
            "torch": {w: {k: _r(v) for k, v in t.items()} for w, t in self.torch.items()},
            "pinned": self.pinned, "sampler_error": self.error,
        }


def _r(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def pinned_peak_gib(stats: dict[str, Any] | None) -> float | None:
    """The pinned host allocator's peak bytes, from whichever key this torch reports."""
    for key in ("allocated_bytes.peak", "reserved_bytes.peak", "allocated_bytes.all.peak", "active_bytes.peak"):
        if stats and isinstance(stats.get(key), (int, float)):
            return stats[key] / GIB
    return None


def stage_prediction(pred: Any, name: str) -> float | None:
    """`pred.stage_peaks_gib` for the stage called `name` ("load", "denoise", ...), None without one."""
    for stage, value in pred.stage_peaks_gib.items():
        if getattr(stage, "value", stage) == name:
            return value
    return None


def prediction_dict(pred: Any) -> dict[str, Any]:
    out = {"peak_gib": pred.peak_gib, "allocator_peak_gib": pred.allocator_peak_gib,
           "peak_stage": pred.peak_stage.value, "seconds_per_step": pred.seconds_per_step,
           "stage_peaks_gib": {getattr(s, "value", s): v for s, v in pred.stage_peaks_gib.items()}}
    for name in ("host_gib", "host_peak_gib", "pinned_gib"):  # being added to the planner
        out[name] = getattr(pred, name, None)
    return {k: (_r(v) if not isinstance(v, dict) else {s: _r(x) for s, x in v.items()}) for k, v in out.items()}


# --- verdicts -----------------------------------------------------------------------------------------------


def check(what: str, measured: Any, predicted: Any = None, rule: str = "info", unit: str = "GiB",
          judged: bool = True, note: str = "") -> dict[str, Any]:
    """One row of the report. `rule`: "at most" (measured <= predicted or limit), "within 2x" (seconds per
    step), "true" (measured must be True), "info" (recorded, not judged). Not `judged`: "info" whatever."""
    ratio = None
    if isinstance(measured, (int, float)) and not isinstance(measured, bool) and isinstance(predicted, (int, float)) \
            and predicted > 0:
        ratio = measured / predicted
    if measured is None:
        verdict = "not measured"
    elif rule == "true":
        verdict = "pass" if measured is True else "fail"
    elif rule == "info" or not judged or ratio is None:
        verdict = "info"
    elif rule == "at most":
        verdict = "pass" if ratio <= 1 + 1e-9 else "fail"
    elif rule == "within 2x":
        verdict = "pass" if 1 / SPEED_FACTOR <= ratio <= SPEED_FACTOR else "fail"
    else:
        raise ValueError(f"unknown rule {rule!r}")
    return {"what": what, "measured": _r(measured), "predicted": _r(predicted), "unit": unit,
            "ratio": _r(ratio, 3), "rule": rule, "verdict": verdict, "note": note}


# --- the run ------------------------------------------------------------------------------------------------


@dataclass
class Step:
    number: int
    key: str
    title: str
    status: str = "not run"  # ok, oom, error, timeout, skipped, not run
    error: str | None = None
    elapsed_s: float | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Session:
    """What the steps share: the backend, the clock, the model and the card it is planned for."""

    args: argparse.Namespace
    backend: Any
    clock: gp.Clock
    settings: dict[str, Any]
    entry: Any  # the catalog entry the planner reads
    card: Any  # planning.devices.Device of the real 8 GB card
    run_entry: Any = None  # the entry load_pipeline reads (a real model pointed at its random-weight folder)
    build_error: str | None = None
    chosen: Any = None  # step 2's profile
    pipe: Any = None  # step 2's pipeline, kept for step 4
    context: dict[str, float | None] = field(default_factory=dict)  # step 6's readings
    steps: dict[int, Step] = field(default_factory=dict)

    def at(self) -> str:
        return f"[{self.clock.elapsed:6.1f}s]"

    def allows(self, seconds: float) -> bool:
        limit = self.clock.limit_s
        return not limit or self.clock.elapsed + seconds <= limit

    def should_stop(self) -> str | None:
        return "time limit" if self.clock.out_of_time() else None

    def render(self, pipe: Any, size: int, steps: int) -> tuple[Any, float]:
        """One image of `size` px through render_batch; the start time (for stage windows)."""
        from renderfarm.actors.pipelines import RenderRequest, render_batch

        request = RenderRequest(job_id="gpu-check", prompt=gp.PROMPT, negative_prompt="", width=size, height=size,
                                steps=steps, guidance=self.entry.default_guidance, seed=0, num_images=1)
        first = "before_first_render_gib" not in self.context
        if first:
            self.context["before_first_render_gib"] = self.backend.outside_torch_gib()
        start = time.perf_counter()
        try:
            return render_batch(pipe, self.run_entry, [request], should_stop=self.should_stop)[0], start
        finally:
            if first:
                self.context["after_first_render_gib"] = self.backend.outside_torch_gib()

    def load(self, profile: Any, watch: Watch) -> Any:
        from renderfarm.actors.loading import load_pipeline

        say(f"{self.at()} loading {self.entry.name} as {profile.name}")
        start = time.perf_counter()
        try:
            return load_pipeline(self.run_entry, device=self.backend.torch_device, profile=profile)
        finally:
            watch.close_window("load", start)


def run_step(session: Session, number: int, fn: Callable[[Session, Step], None], cost_s: float | None = None,
             needs_model: bool = True) -> Step:
    """Run one step, guarded: an exception is its result (status oom or error), never the script's end. It
    starts only while `cost_s` (its expected seconds) fits before the time limit; None: it always starts."""
    from renderfarm.actors.pipelines import RenderInterrupted, is_out_of_memory

    step = session.steps[number]
    if needs_model and session.build_error:
        step.status, step.error = "error", session.build_error
        return step
    if cost_s is not None and not session.allows(cost_s):
        step.error = f"time limit: {session.clock.elapsed:.0f} s gone, ~{cost_s:.0f} s needed"
        say(f"{session.at()} step {number} not run ({step.error})")
        return step
    say(f"{session.at()} step {number}: {step.title}")
    start = time.perf_counter()
    try:
        fn(session, step)
        step.status = "ok" if step.status == "not run" else step.status
    except Exception as exc:  # noqa: BLE001 - every failure is a result
        if isinstance(exc, RenderInterrupted):
            step.status, step.error = "not run", f"stopped mid-render: {exc}"
        else:
            step.status = "oom" if is_out_of_memory(exc) else "error"
            step.error = gp._short(exc)
            step.data["traceback"] = traceback.format_exc().splitlines()[-12:]
            step.checks.append(check("ran to the end", False, rule="true", unit="", note=step.error))
        del exc
    finally:
        step.elapsed_s = round(time.perf_counter() - start, 2)
        session.backend.cap(None)
        session.backend.fresh(collect=True)
    say(f"{session.at()} step {number}: {step.status}" + (f" ({step.error})" if step.error else ""))
    return step


# --- step 1: the gpu tests ----------------------------------------------------------------------------------


def start_pytest(out_dir: Path) -> tuple[subprocess.Popen, Path, float]:
    log = out_dir / "pytest_gpu.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(log, "w") as f:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "pytest", *PYTEST_ARGS], cwd=ROOT, env=env, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return proc, log, time.perf_counter()


def pytest_counts(text: str) -> dict[str, int]:
    """The counts of pytest's summary line ("1 failed, 18 passed, 40 deselected in 31.2s")."""
    counts: dict[str, int] = {}
    summary = [line for line in text.splitlines() if re.search(r"\bin [\d.]+s\b", line)]
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?)",
                                   summary[-1] if summary else ""):
        word = {"error": "errors", "warning": "warnings"}.get(word, word)
        counts[word] = counts.get(word, 0) + int(number)
    return counts


def finish_pytest(session: Session, step: Step, proc: subprocess.Popen, log: Path, started: float,
                  timeout_s: float) -> None:
    left = max(1.0, started + timeout_s - time.perf_counter())
    try:
        proc.wait(timeout=left)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: pytest and whatever it started
        proc.wait()
        step.status, step.error = "timeout", f"killed after {timeout_s:.0f} s"
    text = log.read_text(errors="replace")
    counts = pytest_counts(text)
    step.data.update(returncode=proc.returncode, counts=counts, seconds=round(time.perf_counter() - started, 1),
                     command="python -m pytest " + " ".join(PYTEST_ARGS), log=str(log),
                     tail=text.splitlines()[-30:])
    passed = counts.get("passed", 0)
    clean = proc.returncode == 0 and not counts.get("failed") and not counts.get("errors") and passed > 0
    step.checks += [
        check("gpu tests passed (failed, errors)", passed, rule="info", unit="tests",
              note=f"{counts.get('failed', 0)} failed, {counts.get('errors', 0)} errors, "
                   f"{counts.get('skipped', 0)} skipped"),
        check("all gpu tests pass (exit 0, none failed)", clean, rule="true", unit="",
              note=f"exit {proc.returncode}"),
    ]
    if step.status == "not run":
        step.status = "ok"


# --- step 2: the 8 GB card's profile ------------------------------------------------------------------------


def memory_checks(session: Session, step: Step, watch: Watch, pred: Any, rendered: bool) -> None:
    """Rows for what `watch` saw against `pred` (and the card's budget, the 32 GiB host)."""
    judged = session.backend.judges
    card = session.card
    peak = watch.card_gib()
    step.checks.append(check(f"device peak, load + render, within the {card.vram_gib:g} GiB card", peak,
                             card.vram_gib, "at most", judged=judged, note=session.backend.memory_source))
    step.checks.append(check("device peak, load + render, against the predicted peak", peak, pred.peak_gib,
                             "at most", judged=judged))
    stages = ["load"] + ([s for s in ("text-encode", "denoise", "decode") if s in watch.windows] if rendered else [])
    for stage in stages:
        predicted = stage_prediction(pred, stage)
        step.checks.append(check(f"device peak during {stage}", watch.card_gib(stage), predicted, "at most",
                                 judged=judged, note="" if predicted is not None else "no such stage predicted"))
    render_torch = watch.torch.get("render") or watch.torch.get("load") or {}
    step.checks += [
        check("torch max_memory_reserved (render)", render_torch.get("max_reserved_gib"), pred.allocator_peak_gib,
              note="predicted: the peak without the CUDA context"),
        check("torch max_memory_allocated (render)", render_torch.get("max_allocated_gib")),
    ]
    pinned = pinned_peak_gib(watch.pinned.get("render") or watch.pinned.get("load"))
    predicted_pinned = getattr(pred, "pinned_gib", None)
    step.checks.append(check("pinned host memory, peak", pinned, predicted_pinned, "at most", judged=judged,
                             note="torch.cuda.host_memory_stats"))
    rss_growth = max(0.0, watch.rss_peak_gib() - watch.baseline_rss / GIB)
    step.checks += [
        check("resident set growth, peak", rss_growth, getattr(pred, "host_peak_gib", None), "at most", judged=judged,
              note="VmHWM / sampled VmRSS over VmRSS before the load"),
        check(f"resident set, peak, within the {HOST_RAM_GIB:g} GiB host", watch.rss_peak_gib(), HOST_RAM_GIB,
              "at most", judged=judged, note="the whole process"),
    ]
    if "load" in watch.windows:
        at_load_end = [s for s in watch.samples if s[0] <= watch.windows["load"][1]][-1][2]
        step.checks.append(check("resident set growth after the load", max(0, at_load_end - watch.baseline_rss) / GIB,
                                 getattr(pred, "host_gib", None), "at most", judged=judged))


def render_windows(watch: Watch, result: Any, start: float) -> None:
    """The render's stage windows, from its stage times (render_batch measures each stage)."""
    t = result.timings
    edges = [("text-encode", t["encode_s"]), ("denoise", t["denoise_s"]), ("decode", t["decode_s"])]
    at = start
    for name, seconds in edges:
        watch.windows[name] = (at, at + seconds)
        at += seconds


def render_watched(session: Session, pipe: Any, size: int, watch: Watch) -> Any:
    start = time.perf_counter()
    try:
        result, start = session.render(pipe, size, session.settings["steps"])
    finally:
        watch.close_window("render", start)
    render_windows(watch, result, start)
    return result


def step_budget(session: Session, step: Step) -> None:
    from renderfarm.planning.choose import choose_profile
    from renderfarm.planning.vram import predict

    size, card, backend = session.settings["size"], session.card, session.backend
    choice = choose_profile(session.entry, card, size, size, 1)
    step.data.update(card=card.as_dict() | {"ram_gib": getattr(card, "ram_gib", None)}, choice=choice.reason)
    if choice.chosen is None:
        step.checks.append(check("the planner finds a profile", False, rule="true", unit="", note=choice.reason))
        return
    profile = session.chosen = choice.chosen
    pred = predict(session.entry, profile, card, size, size)
    speed = predict(session.entry, profile, backend.speed_card(card), size, size).seconds_per_step
    step.data.update(profile=profile.as_dict(), prediction=prediction_dict(pred),
                     predicted_s_per_step_this_gpu=_r(speed))
    backend.cap(card.vram_gib)
    watch = Watch(backend, session.settings["interval_s"]).start()
    result = None
    try:
        pipe = session.pipe = session.load(profile, watch)
        info = pipe.renderfarm_info
        step.data.update(placement=info.placement, notes=list(info.notes), load_s=_r(watch.windows["load"][1]
                                                                                      - watch.windows["load"][0]))
        result = render_watched(session, pipe, size, watch)
    finally:
        watch.stop()
        step.data["watch"] = watch.summary()
        memory_checks(session, step, watch, pred, rendered=result is not None)
    step.data["timings"] = {k: _r(v) for k, v in result.timings.items()}
    step.checks.append(check("seconds per step", result.timings["denoise_s_per_step"], speed, "within 2x",
                             "s/step", judged=backend.judges, note="predicted with this GPU's throughput figures"))


# --- step 3: nf4 + model offload, the load peak -------------------------------------------------------------


def _rung(session: Session, test: Callable[[Any], bool]) -> Any:
    from renderfarm.planning.profiles import ladder

    found = next((p for p in ladder(session.entry, session.card) if test(p)), None)
    if found is None:
        raise RuntimeError(f"no such rung in the ladder of {session.entry.name}")
    return found


def _watched_load(session: Session, profile: Any, cap: float | None) -> Watch:
    """Load `profile` under `cap` (GiB; None: the whole card) while a watch samples; drop the pipeline."""
    session.backend.cap(cap)
    watch = Watch(session.backend, session.settings["interval_s"]).start()
    try:
        pipe = session.load(profile, watch)
        watch.placement = pipe.renderfarm_info.placement
        del pipe
    finally:
        watch.stop()
        session.backend.cap(None)
        session.backend.release()
    return watch


def step_load_peak(session: Session, step: Step) -> None:
    """The load peak of nf4 + model offload under the card's cap; after an out-of-memory error there, again
    without the cap (when the time allows), so the peak the load wants is still measured."""
    from renderfarm.actors.pipelines import is_out_of_memory
    from renderfarm.planning.profiles import Placement, WeightsFormat
    from renderfarm.planning.vram import predict

    size, card, backend = session.settings["size"], session.card, session.backend
    profile = _rung(session, lambda p: p.weights is WeightsFormat.NF4 and p.placement is Placement.MODEL_OFFLOAD)
    pred = predict(session.entry, profile, card, size, size)
    step.data.update(profile=profile.as_dict(), prediction=prediction_dict(pred))
    judged, how = backend.judges, f"under the {card.vram_gib:g} GiB card's cap"
    try:
        watch = _watched_load(session, profile, card.vram_gib)
        step.checks.append(check(f"loads {how}", True, rule="true", unit=""))
    except Exception as exc:  # noqa: BLE001 - an out-of-memory error is this step's finding
        if not is_out_of_memory(exc) or not session.allows(session.settings["cost_s"]["load_peak"]):
            raise
        step.checks.append(check(f"loads {how}", False, rule="true", unit="", note=gp._short(exc)))
        del exc
        backend.release()  # what the failed load's frames held
        say(f"{session.at()} out of memory {how}; loading again without the cap to measure the peak")
        watch, how = _watched_load(session, profile, None), "without a cap (the capped load ran out of memory)"
    step.data.update(watch=watch.summary(), measured=how, placement=watch.placement)
    load = stage_prediction(pred, "load")
    step.data["load_s"] = _r(watch.windows["load"][1] - watch.windows["load"][0])
    step.checks += [
        check("device peak during load_pipeline", watch.card_gib("load"), load if load is not None else pred.peak_gib,
              "at most" if load is not None else "info", judged=judged,
              note=how + ("" if load is not None else
                          "; no load stage predicted: shown against the overall predicted peak, not judged")),
        check(f"device peak during load, within the {card.vram_gib:g} GiB card", watch.card_gib("load"),
              card.vram_gib, "at most", judged=judged),
        check("torch max_memory_reserved during load", watch.torch["load"]["max_reserved_gib"]),
        check("pinned host memory during load, peak", pinned_peak_gib(watch.pinned.get("load")),
              getattr(pred, "pinned_gib", None), "at most", judged=judged),
        check("resident set growth during load, peak", max(0.0, watch.rss_peak_gib() - watch.baseline_rss / GIB),
              getattr(pred, "host_peak_gib", None), "at most", judged=judged),
        check("load seconds", step.data["load_s"], unit="s"),
    ]


# --- step 4: 1008 px against 1024 px -----------------------------------------------------------------------


def step_sizes(session: Session, step: Step) -> None:
    from renderfarm.planning.vram import predict

    if session.pipe is None:
        step.status, step.error = "skipped", "step 2 loaded no pipeline"
        return
    size, small = session.settings["size"], session.settings["small_size"]
    card, backend = session.card, session.backend
    profile = session.chosen
    step.data["profile"] = profile.name
    measured: dict[int, dict[str, Any]] = {}
    backend.cap(card.vram_gib)
    for px in (small, size):  # both warm: step 2's render was the first
        pred = predict(session.entry, profile, card, px, px)
        speed = predict(session.entry, profile, backend.speed_card(card), px, px).seconds_per_step
        watch = Watch(backend, session.settings["interval_s"]).start()
        try:
            result = render_watched(session, session.pipe, px, watch)
        finally:
            watch.stop()
            step.data[f"watch_{px}"] = watch.summary()
        measured[px] = {"card_gib": watch.card_gib("render"), "s_per_step": result.timings["denoise_s_per_step"],
                        "predicted_gib": pred.peak_gib, "predicted_s_per_step": speed}
        step.checks += [
            check(f"{px} px: device peak (render)", measured[px]["card_gib"], pred.peak_gib, "at most",
                  judged=backend.judges),
            check(f"{px} px: seconds per step", measured[px]["s_per_step"], speed, "within 2x", "s/step",
                  judged=backend.judges),
        ]
    step.data["measured"] = {str(k): {n: _r(v) for n, v in m.items()} for k, m in measured.items()}
    a, b = measured[small], measured[size]
    step.checks += [
        check(f"peak {small} / {size} px (predicted ratio beside it)", _ratio(a["card_gib"], b["card_gib"]),
              _ratio(a["predicted_gib"], b["predicted_gib"]), "info", unit="x"),
        check(f"{small} px peak no more than {SAME_SIZE_SLACK['peak']:g}x {size} px", a["card_gib"],
              _times(b["card_gib"], SAME_SIZE_SLACK["peak"]), "at most", judged=backend.judges),
        check(f"{small} px s/step no more than {SAME_SIZE_SLACK['s_per_step']:g}x {size} px", a["s_per_step"],
              _times(b["s_per_step"], SAME_SIZE_SLACK["s_per_step"]), "at most", "s/step", judged=backend.judges),
    ]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _times(a: float | None, factor: float) -> float | None:
    return None if a is None else a * factor


# --- step 5: the Turing path, forced ------------------------------------------------------------------------


class FiniteWatch:
    """Whether every output of the denoiser and the VAE decoder is finite, and the largest magnitude seen."""

    def __init__(self, pipe: Any) -> None:
        self.calls: dict[str, list[bool]] = {"transformer": [], "vae decoder": []}
        self.max_abs: dict[str, float] = {"transformer": 0.0, "vae decoder": 0.0}
        self.handles = [pipe.transformer.register_forward_hook(self._hook("transformer")),
                        pipe.vae.decoder.register_forward_hook(self._hook("vae decoder"))]

    def _hook(self, name: str) -> Callable:
        def record(_module, _args, output):
            tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            self.calls[name].append(bool(tensor.isfinite().all()))
            self.max_abs[name] = max(self.max_abs[name], float(tensor.detach().abs().float().nan_to_num().max()))
        return record

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def step_fp16(session: Session, step: Step) -> None:
    from renderfarm.planning.profiles import ComputeDtype, Placement, WeightsFormat

    size, backend = session.settings["size"], session.backend
    rung = _rung(session, lambda p: p.weights.is_float and p.placement is Placement.GPU)
    fp16 = WeightsFormat.FP16
    profile = dataclasses.replace(
        rung, compute_dtype=ComputeDtype.FP16, fp16_clamp=True, vae_dtype=ComputeDtype.FP16, weights=fp16,
        text_encoder_weights=fp16 if rung.text_encoder_weights and rung.text_encoder_weights.is_float
        else rung.text_encoder_weights, name=f"{rung.name}->fp16+clamp (forced)")
    step.data.update(from_rung=rung.name, profile=profile.as_dict())
    watch = Watch(backend, session.settings["interval_s"]).start()
    try:
        pipe = session.load(profile, watch)
        finite = FiniteWatch(pipe)
        try:
            result, _ = session.render(pipe, size, session.settings["fp16_steps"])
        finally:
            finite.close()
        del pipe
    finally:
        watch.stop()
        step.data["watch"] = watch.summary()
    step.data.update(outputs=finite.calls, max_abs={k: _r(v) for k, v in finite.max_abs.items()},
                     timings={k: _r(v) for k, v in result.timings.items()})
    for name, calls in finite.calls.items():
        step.checks.append(check(f"{name} outputs all finite ({len(calls)} calls)", bool(calls) and all(calls),
                                 rule="true", unit=""))
    step.checks += [
        check("largest abs(denoiser output) against fp16's max", finite.max_abs["transformer"], 65504.0, unit=""),
        check("seconds per step (fp16, no cap)", result.timings["denoise_s_per_step"], unit="s/step"),
    ]


# --- step 6: context growth ---------------------------------------------------------------------------------


def step_context(session: Session, step: Step) -> None:
    from renderfarm.planning.vram import CONTEXT_GIB

    c, judged = session.context, session.backend.judges
    c["end_gib"] = session.backend.outside_torch_gib()
    step.data.update({k: _r(v) for k, v in c.items()})
    before, after = c.get("before_first_render_gib"), c.get("after_first_render_gib")
    growth = after - before if before is not None and after is not None else None
    unit_note = "device memory outside torch's allocator" if judged else "the resident set (no CUDA on a CPU)"
    step.checks += [
        check("outside torch at the start (after CUDA init)", c.get("start_gib"), CONTEXT_GIB, "at most",
              judged=judged, note=unit_note),
        check("outside torch before the first render", before, CONTEXT_GIB, "at most", judged=judged),
        check("outside torch after the first render", after, CONTEXT_GIB, "at most", judged=judged,
              note="the planner counts CONTEXT_GIB for it"),
        check("growth over the first render", growth),
        check("outside torch at the end", c["end_gib"], CONTEXT_GIB, "at most", judged=judged),
    ]


# --- reporting ----------------------------------------------------------------------------------------------


def _value(value: Any, unit: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        text = f"{value:.3f}" if unit in ("s/step", "x") or abs(value) < 10 else f"{value:.1f}"
        return f"{text} {unit}".strip()
    return f"{value} {unit}".strip()


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(report: dict[str, Any]) -> str:
    dev = report["device"]
    cuda = dev["kind"] == "cuda"
    card = report["card"]
    lines = [
        f"# GPU check: {dev['name']}" + ("" if cuda else " (CPU smoke: stand-ins, plumbing not performance)"),
        "",
        f"- Date: {report['date']} (UTC); {report['elapsed_s']:.0f} s in all "
        f"(time limit {report['time_limit_s']:g} s)",
        f"- Device: {dev['name']}, {dev['total_gib']:g} GiB"
        + (f", compute capability {dev['compute_capability']}, CUDA context {dev['context_gib']:.2f} GiB" if cuda
           else f" of host memory, {dev.get('torch_threads')} torch thread(s)"),
        f"- torch {report['versions']['torch']}, diffusers {report['versions']['diffusers']}, "
        f"transformers {report['versions']['transformers']}",
        f"- Command: `{report['command']}`",
        f"- Model: {report['model']} ({report['build'].get('note', '')}"
        + (f", built in {report['build']['seconds']:g} s" if report["build"].get("seconds") else "")
        + f"); planned for {card['name']}, "
        f"{card['vram_gib']:g} GiB, cc {card['compute_capability']}, host RAM "
        + (f"{card['ram_gib']:g} GiB" if card.get("ram_gib")
           else f"not in Device yet (checked against {HOST_RAM_GIB:g} GiB)"),
        "- Device memory is what the driver reports in use (mem_get_info), sampled during load and render; "
        "ratio = measured / predicted (or limit)." if cuda else
        "- \"Device memory\" is the resident set on a CPU; memory and speed rows are recorded, not judged.",
        "",
        "| step | what was measured | measured | predicted / limit | ratio | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for step in report["steps"]:
        name = f"{step['number']}. {step['title']}"
        if not step["checks"]:
            lines.append(f"| {name} | – | – | – | – | {step['status']}"
                         + (f": {_cell(step['error'][:120])}" if step["error"] else "") + " |")
        for row in step["checks"]:
            verdict = {"fail": "**fail**"}.get(row["verdict"], row["verdict"])
            note = f" ({row['note']})" if row["note"] else ""
            lines.append(f"| {name} | {_cell(row['what'] + note)} | {_value(row['measured'], row['unit'])} | "
                         f"{_value(row['predicted'], row['unit'])} | {_value(row['ratio'], 'x')} | {verdict} |")
    lines += ["", "| step | status | seconds | error |", "|---|---|---|---|"]
    for step in report["steps"]:
        lines.append(f"| {step['number']}. {step['title']} | {step['status']} | {_value(step['elapsed_s'], '')} | "
                     f"{_cell((step['error'] or '')[:200])} |")
    tail = report["steps"][0]["data"].get("tail")
    if tail:
        lines += ["", "pytest, the end of its output:", "", "```", *tail[-12:], "```"]
    totals = report["verdicts"]
    lines += ["", "Verdicts: " + ", ".join(f"{n} {v}" for v, n in sorted(totals.items())) + "."]
    return "\n".join(lines) + "\n"


def report_dict(session: Session, build: dict[str, Any]) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    steps = [dataclasses.asdict(session.steps[n]) for n in sorted(session.steps)]
    verdicts: dict[str, int] = {}
    for step in steps:
        for row in step["checks"]:
            verdicts[row["verdict"]] = verdicts.get(row["verdict"], 0) + 1
    return {
        "mode": session.backend.mode,
        "device": session.backend.describe(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
        "command": " ".join(["python", "bench/gpu_check.py", *sys.argv[1:]]),
        "model": session.entry.name,
        "sizes": [session.settings["size"], session.settings["small_size"]],
        "card": session.card.as_dict() | {"ram_gib": getattr(session.card, "ram_gib", None)},
        "time_limit_s": session.clock.limit_s,
        "build": build,
        "steps": steps,
        "verdicts": verdicts,
        "elapsed_s": round(session.clock.elapsed, 1),
    }


# --- main ---------------------------------------------------------------------------------------------------


def planned_card() -> Any:
    """The real 8 GB card as a worker on it would describe itself, with 32 GiB of host RAM where `Device`
    carries host RAM (`ram_gib`)."""
    from renderfarm.planning.devices import device_from_spec

    card = device_from_spec(*CARD)
    if "ram_gib" in {f.name for f in dataclasses.fields(card)}:
        card = dataclasses.replace(card, ram_gib=HOST_RAM_GIB)
    return card


def build_model(session: Session, work_dir: Path) -> dict[str, Any]:
    """The entry load_pipeline reads: the stand-in as it is, Flux-dev built once with random weights."""
    from renderfarm.actors.pipelines import is_out_of_memory

    start = time.perf_counter()
    try:
        session.run_entry, built = gp.prepare_source(session.entry, gp.REAL_FAMILY.get(session.entry.name), False,
                                                    session.backend, work_dir)
    except Exception as exc:  # noqa: BLE001 - every step then records why it could not run
        session.build_error = f"building the model: {'oom: ' if is_out_of_memory(exc) else ''}{gp._short(exc)}"
        say(f"{session.at()} {session.build_error}")
        return {"error": session.build_error, "note": "not built"}
    finally:
        session.backend.fresh(collect=True)
    note = "stand-in" if session.entry.standin else "real architecture, random weights, bf16"
    return {**built, "note": note, "seconds": round(time.perf_counter() - start, 1)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    clock = gp.Clock(args.time_limit)  # from before the heavy imports and CUDA's start: they count too
    import diffusers
    import transformers

    from renderfarm.planning.catalog import default_catalog

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    settings = MODES[mode]
    backend = CpuChecks(args.threads) if args.cpu_smoke else CudaChecks()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    session = Session(args, backend, clock, settings, default_catalog().get(settings["model"]), planned_card())
    sizes = {"size": settings["size"], "small": settings["small_size"]}
    session.steps = {n: Step(n, key, TITLES[n].format(**sizes)) for n, key in
                    enumerate(("pytest", "budget", "load_peak", "sizes", "fp16", "context"), start=1)}
    session.context["start_gib"] = backend.outside_torch_gib()
    say(f"{session.at()} {mode} on {backend.describe()['name']}; {session.entry.name} planned for {CARD[0]} "
        f"({CARD[1]} GiB); time limit {args.time_limit:g} s")

    pytest_run = None
    if args.cpu_smoke:
        session.steps[1].status, session.steps[1].error = "skipped", "--cpu-smoke: the gpu tests need CUDA"
    else:
        pytest_run = start_pytest(out)
        say(f"{session.at()} step 1: {session.steps[1].title}, beside the model build")

    own_work_dir = args.work_dir is None
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="rf-gpu-check-"))
    try:
        build = build_model(session, work_dir)
        if pytest_run is not None:  # nothing is measured while the tests hold the GPU
            timeout = PYTEST_SHARE * args.time_limit if args.time_limit else 600.0
            run_step(session, 1, lambda c, s: finish_pytest(c, s, *pytest_run, timeout), needs_model=False)
        cost = settings["cost_s"]
        run_step(session, 2, step_budget, cost["budget"])
        # Step 4 reuses step 2's pipeline: now, if the time left also covers step 3 (the higher priority).
        run_step(session, 4, step_sizes, cost["sizes"] + cost["load_peak"])
        session.pipe = None
        backend.release()
        run_step(session, 3, step_load_peak, cost["load_peak"])
        backend.release()
        run_step(session, 5, step_fp16, cost["fp16"])
        run_step(session, 6, step_context, needs_model=False)
    finally:
        if pytest_run is not None and pytest_run[0].poll() is None:  # the script broke before waiting for it
            os.killpg(pytest_run[0].pid, signal.SIGKILL)
        backend.cap(None)
        if own_work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)  # Flux-dev's folder is ~33 GB
    return report_dict(session, build)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md (and the pytest log)")
    parser.add_argument("--time-limit", type=float, default=400.0,
                        help="seconds after which no new step starts and a render stops (default 400; 0: none)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny stand-ins on the CPU: the same steps, in seconds")
    parser.add_argument("--work-dir", help="where the random-weight model is written (kept; reused when present)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in --cpu-smoke (default 1)")
    args = parser.parse_args(argv)

    report = run(args)
    out = Path(args.out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    say(f"[{report['elapsed_s']:6.1f}s] wrote {out / 'gpu_check.md'} and gpu_check.json; verdicts: "
        + ", ".join(f"{n} {v}" for v, n in sorted(report["verdicts"].items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
