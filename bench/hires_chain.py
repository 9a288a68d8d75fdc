"""A hires fix as a farm chain against the same two passes submitted by hand (issue 19).

    python bench/hires_chain.py [--json] [--rounds 5] [--size 128] [--steps 8] [--scale 2] [--strength 0.5]
    python bench/hires_chain.py --quick [--json]          # 2 rounds, 64 px, 4 steps (tests/bench runs this)

One private farm (embedded Redis, local Ray, two simulated nodes of different cards: config.two_card_nodes), the
tiny-sd15 stand-in, the same work on both sides: a first pass at `--size` px and `--steps` steps, then an img2img
pass at `--scale` times the size with `--strength` and the same steps, from the first pass's image:
- chain: one submit of a spec with `hires` (the client builds the two jobs; the farm queues the second when the
  first is done and its node reads the first pass's image from the result store), then a wait for the second;
- by hand: submit the first pass, wait for it, read its PNG back (FarmClient.result), submit the img2img pass
  with that PNG as its init image (the client checks and uploads it) and the steps that run the same denoising
  steps (chains.hires_steps), wait for it: what a script does without chains.
Rounds interleave (chain, hand, chain, hand, ...) with new seeds each round, after one untimed round each (the
models warm at both sizes). Figures: wall seconds end to end per side (median, min-max), the chain's saving,
and whether the two final images are the same pixels (same seed and work; they are when both second passes
ran on nodes with the same profile).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "tiny-sd15"


def first_pass(size: int, steps: int, seed: int) -> dict[str, Any]:
    return {"model": MODEL, "prompt": f"a lighthouse at dusk, round {seed}", "width": size, "height": size,
            "steps": steps, "seed": seed}


def by_chain(client, size: int, steps: int, scale: float, strength: float, seed: int) -> tuple[float, bytes]:
    start = time.perf_counter()
    (job_id,) = client.submit_batch([{**first_pass(size, steps, seed),
                                      "hires": {"scale": scale, "strength": strength}}])
    (job,) = client.wait([job_id], timeout=600)
    png = client.result(job_id).png[0] if job.state.value == "done" else b""
    elapsed = time.perf_counter() - start
    if not png:
        raise RuntimeError(f"chain job {job_id}: {job.state.value}: {job.error}")
    return elapsed, png


def by_hand(client, size: int, steps: int, scale: float, strength: float, seed: int) -> tuple[float, bytes]:
    from renderfarm.chains import hires_size, hires_steps

    start = time.perf_counter()
    (first,) = client.submit_batch([first_pass(size, steps, seed)])
    (job,) = client.wait([first], timeout=600)
    if job.state.value != "done":
        raise RuntimeError(f"first pass {first}: {job.state.value}: {job.error}")
    image = client.result(first).png[0]
    family = client.catalog.get(MODEL).family
    side = hires_size(size, scale, family.size_multiple)
    # The same work as the chain's second pass: `steps` denoising steps at `strength`, as A1111's hires pass runs.
    (second,) = client.submit_batch([{**first_pass(size, hires_steps(steps, strength, family.flow_matching), seed),
                                      "width": side, "height": side, "init_image": image, "strength": strength,
                                      "resize_mode": "resize"}])
    (job,) = client.wait([second], timeout=600)
    png = client.result(second).png[0] if job.state.value == "done" else b""
    elapsed = time.perf_counter() - start
    if not png:
        raise RuntimeError(f"second pass {second}: {job.state.value}: {job.error}")
    return elapsed, png


def pixels(png: bytes) -> bytes:
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()


def run(rounds: int, size: int, steps: int, scale: float, strength: float) -> dict[str, Any]:
    from renderfarm.config import Settings, two_card_nodes
    from renderfarm.farm import Farm

    with tempfile.TemporaryDirectory(prefix="rf-bench-hires-") as tmp:
        settings = Settings(data_dir=Path(tmp), max_batch=4)
        with Farm(settings, two_card_nodes(big="big", small="small"), warm_models=[MODEL],
                  log_to_driver=False) as farm:
            client = farm.client()
            by_chain(client, size, steps, scale, strength, seed=10_000)  # untimed: both sizes warm on the nodes
            by_hand(client, size, steps, scale, strength, seed=10_001)
            chain, hand, same = [], [], 0
            for r in range(rounds):
                seconds, chain_png = by_chain(client, size, steps, scale, strength, seed=r)
                chain.append(seconds)
                seconds, hand_png = by_hand(client, size, steps, scale, strength, seed=r)
                hand.append(seconds)
                same += pixels(chain_png) == pixels(hand_png)
    med_chain, med_hand = statistics.median(chain), statistics.median(hand)
    return {
        "work": {"model": MODEL, "first_pass": f"{size}x{size}", "steps": steps, "scale": scale,
                 "strength": strength, "rounds": rounds},
        "chain_s": {"median": round(med_chain, 4), "min": round(min(chain), 4), "max": round(max(chain), 4)},
        "by_hand_s": {"median": round(med_hand, 4), "min": round(min(hand), 4), "max": round(max(hand), 4)},
        "chain_over_hand": round(med_chain / med_hand, 3),
        "saved_s": round(med_hand - med_chain, 4),
        "same_pixels": f"{same}/{rounds}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 64 px, 4 steps")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.size, args.steps = 2, 64, 4
    figures = run(args.rounds, args.size, args.steps, args.scale, args.strength)
    if args.json:
        print(json.dumps(figures))
        return 0
    work = figures["work"]
    print(f"hires fix, {work['model']} {work['first_pass']} x{work['scale']:g}, {work['steps']} steps, strength "
          f"{work['strength']:g}, {work['rounds']} interleaved rounds")
    for name, key in (("chain (one submit)", "chain_s"), ("by hand (submit, wait, fetch, upload, submit)", "by_hand_s")):
        f = figures[key]
        print(f"  {name:<48} {f['median']:.3f} s  (min {f['min']:.3f}, max {f['max']:.3f})")
    print(f"  chain / by hand: {figures['chain_over_hand']:.3f}  (saves {figures['saved_s'] * 1000:.0f} ms a chain); "
          f"same final pixels in {figures['same_pixels']} rounds")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
