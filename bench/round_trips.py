"""Redis round trips per job on a farm doing nothing but the jobs (issue 16: "at most 3 at batch 1").

    python bench/round_trips.py [--json] [--jobs 64] [--sizes 1,8]

A private farm of two simulated nodes (config.two_card_nodes), tiny-sd15 at 64x64 and 2 steps, `--jobs` jobs
submitted at once per batch size (Settings.max_batch); the requests each part sent while they ran, from the
counters every Store keeps (cluster/round_trips.py): the nodes' (starting and finishing batches), their
clock-driven ones (heartbeats, lease renewals, step progress, on a client of their own), the scheduler's
(stats()) and the client's (submit, wait). Unlike bench/overhead.py, no direct loop runs between the farm's
rounds, so the clock-driven requests count only for the time the jobs take.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def measure(batch: int, jobs: int) -> dict[str, Any]:
    from renderfarm.config import Settings, two_card_nodes
    from renderfarm.farm import Farm

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from overhead import round_trips

    specs = [{"model": "tiny-sd15", "prompt": f"round trips {i}", "width": 64, "height": 64, "steps": 2, "seed": i}
             for i in range(jobs)]
    with tempfile.TemporaryDirectory(prefix="rf-bench-trips-") as tmp:
        settings = Settings(data_dir=Path(tmp), max_batch=batch)
        with Farm(settings, two_card_nodes(), warm_models=["tiny-sd15"], log_to_driver=False) as farm:
            client = farm.client()
            client.wait(client.submit_batch(specs[:4]), timeout=300)  # warm: scripts loaded, pipelines built
            time.sleep(settings.heartbeat_seconds * 1.5)  # node records carry the warm-up's counters
            before = round_trips(farm, client)
            start = time.perf_counter()
            done = client.wait(client.submit_batch(specs), timeout=600)
            seconds = time.perf_counter() - start
            time.sleep(settings.heartbeat_seconds * 1.5)  # and the run's
            after = round_trips(farm, client)
            per_node: dict[str, int] = {}
            for job in done:
                per_node[job.node or "?"] = per_node.get(job.node or "?", 0) + 1
    if any(job.state.value != "done" for job in done):
        raise RuntimeError("a job did not finish: " + "; ".join(f"{j.id} {j.state.value} {j.error}" for j in done
                                                                   if j.state.value != "done"))
    trips = {k: None if before[k] is None or after[k] is None else round((after[k] - before[k]) / jobs, 2)
             for k in before}
    farm_side = [trips["workers"], trips["workers_timed"], trips["scheduler"]]
    return {"batch": batch, "jobs": jobs, "seconds": round(seconds, 2), "per_job": trips,
            "farm_per_job": None if None in farm_side else round(sum(farm_side), 2), "jobs_per_node": per_node}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--sizes", default="1,8", help="batch sizes (Settings.max_batch), comma-separated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = [measure(int(size), args.jobs) for size in args.sizes.split(",")]
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{'max batch':>9} {'farm/job':>9} {'nodes':>6} {'nodes, clock':>13} {'scheduler':>10} {'client':>7}  jobs per node")
    for r in report:
        t = r["per_job"]
        print(f"{r['batch']:>9} {r['farm_per_job']!s:>9} {t['workers']!s:>6} {t['workers_timed']!s:>13} "
              f"{t['scheduler']!s:>10} {t['client']!s:>7}  {r['jobs_per_node']}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
