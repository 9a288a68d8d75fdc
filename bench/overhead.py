"""What the farm costs on top of rendering: 64 tiny-sd15 jobs (64x64, 2 steps) through a farm with one
worker, against the same renders called directly on one pipeline in this process.

    python bench/overhead.py [--json] [--jobs 64] [--max-batch 8] [--rounds 2]

Both sides render with the profile the node picks for its declared card (an Ampere card: bf16).
`farm_s` runs from submit to the last result read back from Redis (PNG bytes included) with the model
already loaded on the worker; `direct_s` is one pipeline call per job with the model already loaded
(images left as PIL, no PNG encoding: the strict baseline). Rounds alternate farm/direct and the best of
each is kept, so both see the same machine state. Target: ratio = farm_s / direct_s <= 1.15.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(jobs: int, max_batch: int, rounds: int, quiet: bool) -> dict:
    import torch

    from renderfarm.actors.pipelines import PipelineCache
    from renderfarm.config import NodeDeclaration, Settings
    from renderfarm.farm import Farm
    from renderfarm.planning.catalog import default_catalog
    from renderfarm.planning.choose import choose_profile
    from renderfarm.planning.devices import device_from_declaration

    threads = os.cpu_count() or 1
    specs = [
        {"model": "tiny-sd15", "prompt": f"benchmark prompt {i}", "width": 64, "height": 64, "steps": 2, "seed": i}
        for i in range(jobs)
    ]
    entry = default_catalog().get("tiny-sd15")

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="rf-bench-") as tmp:
        settings = Settings(data_dir=Path(tmp), max_batch=max_batch, torch_threads=threads)
        node = NodeDeclaration(name="bench", vram_gib=24, compute_capability="8.6")
        with Farm(settings, [node], warm_models=["tiny-sd15"]) as farm:
            client = farm.client()
            torch.set_num_threads(threads)
            # The same renders: the profile the farm's node chooses for its declared card, in this process.
            card = device_from_declaration(node)
            profile = choose_profile(entry, card, 64, 64, 1).chosen
            pipe, _ = PipelineCache(device="cpu").get(entry, profile)
            pipe.set_progress_bar_config(disable=True)

            def direct() -> float:
                start = time.perf_counter()
                for s in specs:
                    pipe(s["prompt"], width=64, height=64, num_inference_steps=2,
                         generator=torch.Generator("cpu").manual_seed(s["seed"]))
                return time.perf_counter() - start

            def through_farm() -> float:
                start = time.perf_counter()
                ids = client.submit_batch(specs)
                for job in client.as_completed(ids, timeout=600):
                    if job.state.value != "done":
                        raise RuntimeError(f"job {job.id} {job.state.value}: {job.error}")
                    client.store.result_images(job.id)
                return time.perf_counter() - start

            direct()  # warm both paths once (first-call allocations, kernel selection)
            through_farm()
            farm_times, direct_times = [], []
            for r in range(rounds):
                farm_times.append(through_farm())
                direct_times.append(direct())
                say(f"round {r + 1}: farm {farm_times[-1]:.2f} s, direct {direct_times[-1]:.2f} s")
            stats = farm.scheduler_stats()
    farm_s, direct_s = min(farm_times), min(direct_times)
    return {
        "jobs": jobs,
        "size": "64x64",
        "steps": 2,
        "max_batch": max_batch,
        "torch_threads": threads,
        "farm_s": round(farm_s, 3),
        "direct_s": round(direct_s, 3),
        "ratio": round(farm_s / direct_s, 3),
        "farm_rounds_s": [round(t, 3) for t in farm_times],
        "direct_rounds_s": [round(t, 3) for t in direct_times],
        "dispatched": stats["dispatched"],
        "profile": profile.name,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--jobs", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8, help="jobs per pipeline call on the farm")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    result = run(args.jobs, args.max_batch, args.rounds, quiet=args.json)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"farm {result['farm_s']} s, direct {result['direct_s']} s, ratio {result['ratio']} "
              f"(target <= 1.15; {args.jobs} jobs, batches of up to {args.max_batch})")


if __name__ == "__main__":
    main()
