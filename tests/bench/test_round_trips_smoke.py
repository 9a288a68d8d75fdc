"""bench/round_trips.py on a few jobs: a real farm (redis-server, private Ray, two stand-in nodes) in a subprocess;
the figures are checked for shape and sense (the per-batch counts are pinned in tests/integration/
test_round_trips.py and test_worker_overlap.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.bench import BENCH


def test_round_trips_per_job_are_counted_by_part():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(BENCH / "round_trips.py"), "--json", "--jobs", "8", "--sizes", "1"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    (report,) = json.loads(out.stdout.strip().splitlines()[-1])
    trips = report["per_job"]
    assert report["batch"] == 1 and sum(report["jobs_per_node"].values()) == 8
    # each job is started and finished by a node: at most two requests of its own, at least one shared
    assert 0 < trips["workers"] <= 2.0 and trips["scheduler"] > 0 and trips["client"] > 0
    assert report["farm_per_job"] == round(trips["workers"] + trips["workers_timed"] + trips["scheduler"], 2)
