"""Write renderfarm/configs/sim/trace.jsonl: 500 mixed Flux / SDXL / SD 1.5 jobs, 512 to 2048 px, arriving over ~10 minutes.

Run once and commit the output (seeded: the same file every time):
    python bench/sim/make_trace.py [--jobs 500] [--seed 7] [--out renderfarm/configs/sim/trace.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# (model, share of jobs, steps)
MODELS = [("flux-dev", 0.25, 28), ("flux-schnell", 0.2, 4), ("sdxl", 0.3, 30), ("sd15", 0.25, 25)]
SIZES = [(512, 0.2), (768, 0.15), (1024, 0.35), (1536, 0.15), (2048, 0.15)]
IMAGES = [(1, 0.5), (2, 0.25), (4, 0.25)]
MEAN_GAP_S = 1.2  # Poisson arrivals: a burst that keeps the farm busy well after the last submit


def _choice(rng: random.Random, options: list[tuple]) -> tuple:
    return rng.choices(options, weights=[o[1] for o in options])[0]


def make_trace(jobs: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    clock, out = 0.0, []
    for _ in range(jobs):
        model, _, steps = _choice(rng, MODELS)
        side = _choice(rng, SIZES)[0]
        other = side if rng.random() < 0.7 else max(512, side - 256)  # some portrait / landscape
        width, height = (side, other) if rng.random() < 0.5 else (other, side)
        out.append({
            "model": model, "width": width, "height": height, "steps": steps,
            "num_images": _choice(rng, IMAGES)[0], "submit_s": round(clock, 2),
        })
        clock += rng.expovariate(1 / MEAN_GAP_S)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "renderfarm" / "configs" / "sim" / "trace.jsonl")
    args = parser.parse_args()
    lines = [json.dumps(job, separators=(",", ":")) for job in make_trace(args.jobs, args.seed)]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} jobs to {args.out}")


if __name__ == "__main__":
    main()
