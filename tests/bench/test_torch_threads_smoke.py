"""bench/torch_threads.py: each way of calling torch runs in a fresh process and reports its batches. Figures
are checked for shape and sense, never against a speed (the bench prints the ratio; docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.bench import BENCH


def test_each_way_reports_its_batches():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(BENCH / "torch_threads.py"), "--json", "--batches", "2", "--batch", "2"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["batch"] == 2 and report["batches"] == 2
    assert set(report["ways"]) == {"main", "own-thread", "second-thread"}
    for figures in report["ways"].values():
        assert 0 < figures["min_ms"] <= figures["median_ms"] <= figures["max_ms"], figures
    assert report["ways"]["main"]["vs_main"] == 1.0
