"""bench/vram_calibration.py: the published figures load, the fitted rows are the ones the constants came
from (at most half), and every held-out row is either compared or says why it cannot be."""

from __future__ import annotations

import json

from renderfarm.planning.calibration import PUBLISHED
from tests.bench import bench_module

vram_calibration = bench_module("vram_calibration")


def test_fitted_rows_are_the_calibration_runs_and_at_most_half():
    rows = vram_calibration.load_figures()
    fitted = [r for r in rows if r.get("fitted")]
    # the 8 H100 runs planning/calibration.py holds, and the batch-8 run DECODE_BATCH_SLOPE came from
    assert len(fitted) == len(PUBLISHED) + 1
    expressible = [r for r in vram_calibration.main_rows() if "skipped" not in r]
    assert sum(r["fitted"] for r in expressible) * 2 <= len(expressible)
    for row in rows:
        assert row["source"] and row["quote"], row["id"]
    assert len({r["id"] for r in rows}) == len(rows)


def test_report_compares_held_out_rows(capsys):
    assert vram_calibration.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["in_sample"]["rows"] == len(PUBLISHED) + 1
    held_out = report["out_of_sample"]
    assert held_out["peaks"] >= 5 and held_out["speeds"] >= 5
    for row in report["rows"]:
        assert "skipped" in row or "peak_error" in row or "speed_ratio" in row, row
