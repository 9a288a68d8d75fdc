"""The scheduler's CPU while it has nothing it can do: a 10,000-job backlog and no free node.

    python bench/scheduler_idle.py [--jobs 10000] [--seconds 10] [--json]

Runs the real scheduler loop (no Ray: its only worker is drained, or there is none) against a private
redis-server, and prints the CPU time of this process per second of wall time (1.0 = a whole core) and the
loop's rounds per second, for each case. Issue 16's target: under 2% of a core. Before the fix the loop spun
(~87% of a core, hundreds of thousands of rounds a second).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renderfarm.cluster.keys import Keys  # noqa: E402
from renderfarm.cluster.redis_server import EmbeddedRedis, connect  # noqa: E402
from renderfarm.cluster.store import Store  # noqa: E402
from renderfarm.jobs import Job, JobSpec  # noqa: E402
from renderfarm.scheduler.scheduler import Scheduler  # noqa: E402


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(url: str, data_dir: Path, case: str, jobs: int, seconds: float) -> dict:
    prefix = f"idle{case.replace(' ', '')}"
    store = Store(connect(url), Keys(prefix))
    spec = JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64)
    for start in range(0, jobs, 1000):
        store.submit([Job(id=f"j{i}", spec=spec) for i in range(start, min(jobs, start + 1000))], f"b{start}")
    workers = {"n1": (None, {"vram_gib": 8, "card": None, "state": "idle", "loaded": []})} if case == "drained" else {}
    sched = Scheduler(url, {"data_dir": str(data_dir)}, workers=workers, key_prefix=prefix)
    for worker in sched.workers.values():
        worker.draining = True
    sched.start()
    try:
        time.sleep(1.0)  # the first rounds plan the backlog once
        loops, cpu, wall = sched.stats()["loops"], _cpu(), time.monotonic()
        time.sleep(seconds)
        loops, cpu, wall = sched.stats()["loops"] - loops, _cpu() - cpu, time.monotonic() - wall
    finally:
        sched.stop()
        sched.join(10)
    return {"case": case, "queued": store.counts()["queued"], "seconds": round(wall, 2),
            "cpu_of_a_core": round(cpu / wall, 4), "rounds_per_s": round(loops / wall, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rf-idle-") as tmp, EmbeddedRedis(Path(tmp) / "redis") as server:
        rows = [measure(server.url, Path(tmp), case, args.jobs, args.seconds) for case in ("drained", "no workers")]
    if args.json:
        print(json.dumps({"rows": rows}))
    else:
        print(f"{'case':<12} {'queued':>7} {'seconds':>8} {'CPU of a core':>14} {'rounds/s':>9}")
        for r in rows:
            print(f"{r['case']:<12} {r['queued']:>7} {r['seconds']:>8} {r['cpu_of_a_core']:>14.2%} {r['rounds_per_s']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
