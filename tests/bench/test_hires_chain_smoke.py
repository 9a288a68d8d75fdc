"""bench/hires_chain.py --quick: a hires fix as a chain and by hand through a real farm (redis-server, private
Ray, two stand-in nodes), in a subprocess. The figures are checked for shape and sense, never against a speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.bench import BENCH


def test_quick_run_reports_both_sides_of_the_same_work():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(BENCH / "hires_chain.py"), "--quick", "--json"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["work"]["rounds"] == 2 and report["work"]["first_pass"] == "64x64"
    for key in ("chain_s", "by_hand_s"):
        assert 0 < report[key]["min"] <= report[key]["median"] <= report[key]["max"], report
    ratio = report["chain_s"]["median"] / report["by_hand_s"]["median"]  # of the rounded medians
    assert report["chain_over_hand"] == pytest.approx(ratio, abs=2e-3)
    assert report["same_pixels"].endswith("/2")
