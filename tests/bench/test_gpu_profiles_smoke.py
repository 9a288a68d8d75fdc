"""bench/gpu_profiles.py keeps working while no GPU is at hand: its CPU smoke mode (the same loops, profile
choice, timing, measuring and table writer, on the tiny stand-ins) runs here, and its GPU mode runs on a
small grid where CUDA exists (`-m gpu`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.bench import bench_module

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_profiles.py"


def run_bench(*args: str, timeout: float) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_cpu_smoke_measures_every_fitting_profile_and_writes_the_table(tmp_path):
    from renderfarm.config import NodeDeclaration
    from renderfarm.planning.catalog import default_catalog
    from renderfarm.planning.choose import choose_profile
    from renderfarm.planning.devices import device_from_declaration

    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nwritten by hand, kept\n")
    report = run_bench("--cpu-smoke", "--json", "--out", str(out), timeout=240)

    assert report["mode"] == "cpu-smoke" and report["device"]["kind"] == "cpu"
    assert report["models"] == ["tiny-flux", "tiny-sdxl"]
    rows = report["rows"]
    keys = [(r["model"], r["size"], r["budget_gib"], r["profile"]) for r in rows]
    assert len(keys) == len(set(keys)), "one row per (model, size, budget, profile)"

    # Every grid cell, with each candidate the planner says fits on that declared card; the choice flagged.
    catalog = default_catalog()
    expected = set()
    for model in report["models"]:
        for size in report["sizes"]:
            for budget in report["budgets_gib"]:
                card = device_from_declaration(NodeDeclaration(name="x", vram_gib=budget, compute_capability="8.6"))
                choice = choose_profile(catalog.get(model), card, size, size)
                assert choice.chosen is not None
                fitting = [c.profile.name for c in choice.candidates if c.fits]
                expected |= {(model, size, budget, name) for name in fitting}
                chosen = [r for r in rows if (r["model"], r["size"], r["budget_gib"]) == (model, size, budget)
                          and r["chosen"]]
                assert [r["profile"] for r in chosen] == [choice.chosen.name]
    assert set(keys) == expected

    for r in rows:
        assert r["status"] == "ok", r
        assert r["s_per_step"] > 0 and r["encode_s"] > 0 and r["denoise_s"] > 0 and r["decode_s"] > 0
        assert r["predicted_peak_gib"] > 0 and r["predicted_s_per_step"] > 0
        assert r["rss_growth_gib"] is not None and r["peak_reserved_gib"] is None  # no VRAM on a CPU
        assert r["stands_in_for"] in ("flux-dev", "sdxl")
    # The reference (bf16, no budget) of every (model, size), and a ratio for every chosen row.
    assert {(r["model"], r["size"]) for r in report["references"]} == {
        (m, s) for m in report["models"] for s in report["sizes"]}
    assert all(r["status"] == "ok" and r["s_per_step"] > 0 for r in report["references"])
    assert len(report["ratios"]) == sum(r["chosen"] for r in rows)
    assert all(q["ratio"] > 0 for q in report["ratios"])

    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nwritten by hand, kept\n")
    assert f"### {report['device']['name']}: CPU smoke" in text
    assert "plumbing, not performance" in text
    assert text.count("<!-- gpu_profiles:cpu-smoke:begin -->") == 1
    table_lines = len(rows) + len(report["references"]) + len(report["ratios"])
    assert sum(line.startswith("| tiny-") for line in text.splitlines()) == table_lines
    assert report["markdown_path"] == str(out)


def test_the_table_replaces_its_own_block_and_leaves_the_rest(tmp_path):
    gpu_profiles = bench_module("gpu_profiles")
    out = tmp_path / "b.md"
    gpu_profiles.write_block(out, "<!-- gpu_profiles:gpu:begin -->\nold\n<!-- gpu_profiles:gpu:end -->\n", "gpu")
    out.write_text("intro\n\n" + out.read_text() + "\n## after\n")
    gpu_profiles.write_block(out, "<!-- gpu_profiles:gpu:begin -->\nnew\n<!-- gpu_profiles:gpu:end -->\n", "gpu")
    block = "<!-- gpu_profiles:gpu:begin -->\nnew\n<!-- gpu_profiles:gpu:end -->\n"
    assert out.read_text() == "intro\n\n" + block + "\n## after\n"


def test_real_architectures_have_the_catalogs_parameter_counts():
    """GPU mode builds Flux-dev and SDXL from their published configs: on the meta device (nothing
    allocated) every component has the parameter count planning uses, within 0.1%."""
    real_models = bench_module("real_models")
    from renderfarm.planning.catalog import default_catalog

    for family, model in (("flux", "flux-dev"), ("sdxl", "sdxl")):
        entry = default_catalog().get(model)
        pipe = real_models.build_real_pipeline(family, "meta")
        counts = real_models.parameter_counts(pipe)
        assert set(counts) == set(entry.components)
        for name, count in counts.items():
            assert count == pytest.approx(entry.components[name].params, rel=1e-3), (model, name)
        if family == "flux":
            assert pipe.tokenizer_2.model_max_length == 512  # Flux-dev's T5 sequence, as planned


def test_torch_q8_0_writer_writes_the_file_write_gguf_writes(tmp_path):
    real_models = bench_module("real_models")
    from renderfarm.actors.gguf_standins import write_gguf
    from renderfarm.actors.standins import build_standin
    from renderfarm.planning.profiles import WeightsFormat

    transformer = build_standin("flux").transformer
    slow = write_gguf(transformer, tmp_path / "slow.gguf", WeightsFormat.GGUF_Q8_0, "flux")
    fast = real_models.write_q8_0_gguf(transformer, tmp_path / "fast.gguf", "flux")
    assert fast.read_bytes() == slow.read_bytes()


class FakeCuda:
    """What CudaBackend reads from torch.cuda, for a 80 GiB card with 60 GiB reserved at its peak."""

    def __init__(self):
        self.fraction = None

    def set_per_process_memory_fraction(self, fraction, device):
        self.fraction = fraction

    def max_memory_allocated(self, device):
        return 50 * 2**30

    def max_memory_reserved(self, device):
        return 60 * 2**30


def test_gpu_backend_budget_arithmetic_without_a_gpu():
    """The GPU mode's budget enforcement and checks: the allocator may reserve the budget less the CUDA
    context; a run is within budget when what the DRIVER saw the process use fits the card the budget
    describes (torch's reserved figure is capped by construction, so it could never fail the check)."""
    from types import SimpleNamespace

    from renderfarm.planning.devices import device_from_spec

    gpu_profiles = bench_module("gpu_profiles")
    backend = object.__new__(gpu_profiles.CudaBackend)
    fake = FakeCuda()
    backend.torch = SimpleNamespace(cuda=fake)
    backend.total_bytes = 80 * 2**30
    backend.context_gib = 0.5
    backend.card = device_from_spec("NVIDIA H100 80GB HBM3", 80.0, (9, 0))

    backend.cap(8)
    assert fake.fraction == pytest.approx(7.5 / 80)
    backend.cap(100)  # more than the card: the whole card
    assert fake.fraction == 1.0
    backend.cap(None)
    assert fake.fraction == 1.0
    assert backend.device_for(8).vram_gib == 8 and backend.device_for(8).fp16_tflops == backend.card.fp16_tflops
    assert backend.device_for(100).vram_gib == 80 and backend.device_for(None) is backend.card

    peaks = backend.peaks(None)
    assert peaks == {"peak_allocated_gib": 50.0, "peak_reserved_gib": 60.0, "rss_growth_gib": None}
    assert backend.within_budget(peaks, 60.5) is None  # no driver reading: no verdict
    # reserved stays under the cap, but the driver saw more (a library's workspace, pinned staging...)
    peaks = {**peaks, "driver_peak_gib": 61.0}
    assert backend.within_budget(peaks, 60.5) is False
    assert backend.within_budget(peaks, 61.0) is True
    assert backend.within_budget(peaks, None) is True

    # the driver-level watch: the process's footprint is the peak used less the baseline, plus its context
    fake_used = iter([10 * 2**30, 14 * 2**30, 12 * 2**30])
    backend.device_bytes = lambda: next(fake_used, 12 * 2**30)
    backend.baseline_used = 9 * 2**30
    with backend.watch() as watch:
        pass
    assert watch.footprint_gib == pytest.approx(14 - 9 + 0.5)


def test_gpu_table_writer_without_a_gpu():
    gpu_profiles = bench_module("gpu_profiles")
    base = {
        "model": "flux-dev", "stands_in_for": None, "size": 1024, "predicted_peak_gib": 7.2,
        "predicted_allocator_peak_gib": 6.7, "s_per_image_default_steps": None, "default_steps": 28, "error": None,
        "s_per_step": None, "encode_s": None, "decode_s": None, "peak_reserved_gib": None, "peak_allocated_gib": None,
        "peak_error": None, "within_budget": None, "rss_growth_gib": None, "measured_under_gib": 8.0,
    }
    ok = {**base, "budget_gib": 8.0, "profile": "bf16+te-nf4+group-offload", "chosen": True, "status": "ok",
          "s_per_step": 0.3, "encode_s": 1.0, "decode_s": 0.5, "s_per_image_default_steps": 9.9,
          "peak_reserved_gib": 7.1, "peak_allocated_gib": 6.9, "peak_error": 0.06, "within_budget": False}
    oom = {**base, "budget_gib": 8.0, "profile": "bf16+leaf-offload", "chosen": False, "status": "oom",
           "error": "CUDA out of memory. " * 20}
    ref = {**ok, "budget_gib": None, "profile": "bf16+te-resident", "chosen": False, "s_per_step": 0.25,
           "measured_under_gib": None, "within_budget": True}
    report = {
        "mode": "gpu", "date": "2026-01-01 00:00", "elapsed_s": 400.0, "command": "python bench/gpu_profiles.py",
        "device": {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "total_gib": 79.19, "compute_capability": "9.0",
                   "context_gib": 0.52},
        "versions": {"torch": "2.13.0", "diffusers": "0.42.1", "transformers": "5.23.0"},
        "steps": 4, "warmup_steps": 1, "memory_note": "note", "rows": [ok, oom], "references": [ref],
        "cells": [{"model": "flux-dev", "size": 1024, "budget_gib": 4.0, "chosen": None, "reason": "nothing fits"}],
    }
    report["ratios"] = gpu_profiles.ratios(report["rows"], {"flux-dev@1024": ref}, on_gpu=True)
    assert report["ratios"] == [{
        "model": "flux-dev", "size": 1024, "budget_gib": 8.0, "chosen": "bf16+te-nf4+group-offload",
        "s_per_step": 0.3, "reference_profile": "bf16+te-resident", "reference_s_per_step": 0.25, "ratio": 1.2,
        "target": 1.25, "met": True}]
    text = gpu_profiles.markdown(report)
    assert "### NVIDIA H100 80GB HBM3: GPU profiles" in text and "CUDA context 0.52 GiB" in text
    lines = text.splitlines()
    assert lines[0] == "<!-- gpu_profiles:gpu:begin -->" and lines[-1] == "<!-- gpu_profiles:gpu:end -->"
    row = next(line for line in lines if "group-offload`" in line and "**yes**" in line)
    assert "| 7.10 | 6.90 | – | 6.70 / 7.20 | +6.0% | **no** | 8 | ok |" in row
    assert any("| none | `bf16+te-resident` | reference |" in line for line in lines)
    assert any("oom: CUDA out of memory." in line and len(line) < 400 for line in lines)
    assert "| 1.20x | ≤ 1.25 met |" in text
    assert "Cells where nothing fits: flux-dev 1024 px at 4 GiB (nothing fits)" in text
    at = lines.index(next(line for line in lines if line.startswith("| model | px |")))
    assert lines[at].count("|") == lines[at + 1].count("|") == row.count("|")  # header, rule and rows agree


# --- on a GPU -----------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
def test_gpu_grid_never_exceeds_its_budgets(tmp_path):
    """Real SDXL (random weights) at 512 px under 8 and 12 GiB budgets: every run that completes peaks
    within its budget (torch's reserved memory plus the CUDA context); nothing fails other than by OOM."""
    report = run_bench("--json", "--models", "sdxl", "--sizes", "512", "--budgets", "8,12", "--time-limit", "0",
                       "--out", str(tmp_path / "gpu.md"), timeout=900)
    rows = report["rows"]
    assert rows and {r["budget_gib"] for r in rows} == {8.0, 12.0}
    assert all(r["status"] in ("ok", "oom") for r in rows), [r for r in rows if r["status"] not in ("ok", "oom")]
    for budget in (8.0, 12.0):
        assert any(r["status"] == "ok" for r in rows if r["budget_gib"] == budget)
    context = report["device"]["context_gib"]
    for r in rows:
        if r["status"] == "ok":
            assert r["within_budget"] is True, r
            assert r["peak_reserved_gib"] + context <= r["budget_gib"] + 1e-6, r
            assert r["peak_allocated_gib"] <= r["peak_reserved_gib"]
    assert f"### {report['device']['name']}: GPU profiles" in (tmp_path / "gpu.md").read_text()
