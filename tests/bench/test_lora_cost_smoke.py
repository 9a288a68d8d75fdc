"""bench/lora_cost.py: every per-step contender (base; unmerged and fused at 1, 3 and 5 LoRAs) and every switch
(warm, cold, reweight) reports its figures. Checked for shape and sense, never against a speed (the bench
prints the ratios)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.bench import BENCH


def test_every_contender_and_switch_reports_its_figures():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(BENCH / "lora_cost.py"), "--json", "--rounds", "2", "--steps", "3"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["model"] == "tiny-flux" and report["rounds"] == 2 and report["steps"] == 3
    assert report["loras"]["count"] == 5
    assert set(report["per_step"]) == {"base"} | {f"{mode}-{n}" for mode in ("unmerged", "fused") for n in (1, 3, 5)}
    for label, figures in report["per_step"].items():
        assert figures["n"] == 2 and 0 < figures["min_ms"] <= figures["median_ms"] <= figures["max_ms"], figures
        assert figures["vs_base"] > 0
        assert (figures["active_adapter_bytes"] > 0) is (label != "base")
    one, five = report["per_step"]["unmerged-1"], report["per_step"]["unmerged-5"]
    assert five["active_adapter_bytes"] == 5 * one["active_adapter_bytes"]  # five distinct adapters, same shapes
    assert report["per_step"]["base"]["vs_base"] == 1.0
    assert set(report["switch"]) == {"unmerged-warm", "unmerged-cold", "fused-warm", "fused-cold", "fused-reweight"}
    for label, figures in report["switch"].items():
        assert figures["n"] == 2 and 0 < figures["min_ms"] <= figures["median_ms"] <= figures["max_ms"], figures
        assert (figures["load_median_ms"] > 0) is (figures["kind"] == "cold"), (label, figures)  # warm loads nothing
        assert (figures["fuse_median_ms"] > 0) is (figures["mode"] == "fused"), (label, figures)
