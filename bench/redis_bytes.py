"""What a finished job costs Redis's memory: its record only, now that images live in the result store.

    python bench/redis_bytes.py [--json] [--jobs 32] [--size 64]

A private farm (one simulated node) renders `--jobs` tiny-sd15 jobs at `--size` px. Then, per finished job:
the bytes Redis holds for it (MEMORY USAGE of its record, plus the result hash if there is one), and, side by
side in the same run, what the same job cost when its PNGs went into Redis (the same images copied into a
result hash as completion wrote them before issue 16, measured and then deleted). Also redis-server's
used_memory before the submit and after the last job, per job. The PNG bytes per job show what a store
holds instead; a real 1024x1024 PNG is ~1-2 MB, so the "before" column scales with the image, the "after"
column does not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(jobs: int, size: int) -> dict:
    from renderfarm.cluster.blobs import read_blob
    from renderfarm.config import NodeDeclaration, Settings
    from renderfarm.farm import Farm

    with tempfile.TemporaryDirectory(prefix="rf-bytes-") as tmp:
        settings = Settings(data_dir=Path(tmp), max_batch=8, torch_threads=os.cpu_count() or 1)
        node = NodeDeclaration(name="bytes", vram_gib=24, compute_capability="8.6")
        with Farm(settings, [node], warm_models=["tiny-sd15"]) as farm:
            client = farm.client()
            store, redis = client.store, client.store.redis
            specs = [{"model": "tiny-sd15", "prompt": f"a lighthouse at dusk, picture {i}", "width": size,
                      "height": size, "steps": 2, "seed": i} for i in range(jobs)]
            before = redis.info("memory")["used_memory"]
            ids = client.submit_batch(specs)
            done = client.wait(ids, timeout=900)
            after = redis.info("memory")["used_memory"]
            record, legacy, png = [], [], []
            for job in done:
                urls = store.result_blobs(job.id) or []
                images = [read_blob(url) for url in urls]
                held = redis.memory_usage(store.keys.job(job.id)) or 0
                held += redis.memory_usage(store.keys.result(job.id)) or 0  # none: no image bytes in Redis
                record.append(held)
                png.append(sum(len(i) for i in images))
                # The same job as completion stored it before: the PNGs in a hash beside the record.
                key = store.keys.result(job.id) + ":legacy-measure"
                redis.hset(key, mapping={str(k): data for k, data in enumerate(images)})
                legacy.append(held + (redis.memory_usage(key) or 0))
                redis.delete(key)
            return {
                "jobs": jobs, "size": size,
                "done": sum(1 for j in done if j.state.value == "done"),
                "redis_bytes_per_job_now": round(statistics.median(record)),
                "redis_bytes_per_job_images_in_redis": round(statistics.median(legacy)),
                "png_bytes_per_job_in_store": round(statistics.median(png)),
                "used_memory_growth_per_job": round((after - before) / jobs),
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    out = run(args.jobs, args.size)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"{out['done']}/{out['jobs']} jobs done at {out['size']}x{out['size']}", file=sys.stderr)
    print("| per finished job | bytes |\n|---|---|")
    print(f"| Redis, now (its record; images in the result store) | {out['redis_bytes_per_job_now']:,} |")
    print(f"| Redis, the same job with its PNGs in Redis (before) | {out['redis_bytes_per_job_images_in_redis']:,} |")
    print(f"| PNG bytes in the result store | {out['png_bytes_per_job_in_store']:,} |")
    print(f"| redis-server used_memory growth over the run | {out['used_memory_growth_per_job']:,} |")


if __name__ == "__main__":
    main()
