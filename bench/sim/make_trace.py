"""Write renderfarm/configs/sim/trace.jsonl: 500 mixed Flux / SDXL / SD 1.5 jobs, 512 to 2048 px, arriving over ~10 minutes.

Run once and commit the output (seeded: the same file every time):
    python bench/sim/make_trace.py [--jobs 500] [--seed 7] [--out renderfarm/configs/sim/trace.jsonl]

With --lora-share, the same jobs (the same draws) and then, from a separate seeded draw, that share of them
(exactly, rounded) each carrying one of ten LoRAs, one made for its model's family, uniformly among them:
renderfarm/configs/sim/trace_loras.jsonl (`renderfarm bench sim --lora-trace`) is
    python bench/sim/make_trace.py --lora-share 0.3333 --out renderfarm/configs/sim/trace_loras.jsonl
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
FAMILY = {"flux-dev": "flux", "flux-schnell": "flux", "sdxl": "sdxl", "sd15": "sd15"}
# Ten LoRAs (name, family, the weight studios use it at): a job takes one made for its model's family.
LORAS = [
    ("flux-character", "flux", 1.0), ("flux-product", "flux", 0.8), ("flux-ink-style", "flux", 0.7),
    ("flux-film-grain", "flux", 0.6), ("sdxl-character", "sdxl", 1.0), ("sdxl-watercolor", "sdxl", 0.8),
    ("sdxl-product", "sdxl", 0.9), ("sd15-character", "sd15", 1.0), ("sd15-anime-style", "sd15", 0.8),
    ("sd15-detail", "sd15", 0.5),
]


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


def add_loras(jobs: list[dict], share: float, seed: int) -> list[dict]:
    """`jobs` with round(share x len(jobs)) of them, drawn with `seed`, each carrying one LoRA of its family."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(jobs)), round(share * len(jobs)))
    out = [dict(job) for job in jobs]
    for i in sorted(chosen):
        name, _, weight = rng.choice([lora for lora in LORAS if lora[1] == FAMILY[out[i]["model"]]])
        out[i]["loras"] = [{"name": name, "weight": weight}]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "renderfarm" / "configs" / "sim" / "trace.jsonl")
    parser.add_argument("--lora-share", type=float, default=0.0, help="share of the jobs that carry a LoRA (0: none)")
    parser.add_argument("--lora-seed", type=int, default=11)
    args = parser.parse_args()
    if not 0 <= args.lora_share <= 1:
        parser.error(f"--lora-share {args.lora_share}: expected a share between 0 and 1")
    jobs = make_trace(args.jobs, args.seed)
    if args.lora_share:
        jobs = add_loras(jobs, args.lora_share, args.lora_seed)
    lines = [json.dumps(job, separators=(",", ":")) for job in jobs]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} jobs to {args.out}")


if __name__ == "__main__":
    main()
