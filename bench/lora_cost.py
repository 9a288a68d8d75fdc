"""What a LoRA costs on a node, per mode: the per-step cost of unmerged vs fused sets of 1, 3 and 5 LoRAs
against the base model, and the cost of switching from one set to another, side by side in one run.

    HF_HUB_OFFLINE=1 python bench/lora_cost.py [--json] [--model tiny-flux|tiny-sdxl] [--rounds 15]
        [--size 64] [--steps 8] [--threads 1]

One pipeline of the stand-in (bf16 weights computing in bf16, as a bf16 card's first rung; on this CPU) and
five distinct stand-in LoRAs, built into a temporary folder with the stand-in recipe (diffusers keys, rank 4,
the denoiser's attention and feed-forward layers) at five seeds. Every round renders once per contender
(base; unmerged 1/3/5; fused 1/3/5), in an order rotated each round, the set applied just before through
`actors.lora_apply.apply` as the worker applies it; the per-step time is render_batch's steady-state
`denoise_s_per_step` (the first step's set-up left out). Then, in the same round and also rotated, one timed
switch per mode and kind: from set A (LoRAs 1-2) to set B (LoRAs 3-4) with B's adapters already loaded
("warm": what the least-recently-used cache gives), B not loaded ("cold": read from disk first), and, fused
only, the same set at another weight ("reweight": a re-fuse). Figures: median and [min-max] over the rounds.

Stand-ins are noise on noise with layers a few dozen wide: their absolute times are Python and kernel-launch
overhead, not a card's arithmetic, and a rank-4 adapter on a 32-wide layer is not a rank-32 adapter on a
3072-wide one. Read the figures for their shape (what grows with the number of LoRAs, what a switch does), and
take a real model's figures on a GPU node.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COUNTS = (1, 3, 5)
MODES = ("unmerged", "fused")
MODELS = {"tiny-flux": "flux", "tiny-sdxl": "sdxl", "tiny-sd15": "sd15"}


def contenders() -> list[tuple[str, str | None, int]]:
    """(label, mode, LoRA count) of each per-step contender; the base first."""
    return [("base", None, 0)] + [(f"{mode}-{n}", mode, n) for mode in MODES for n in COUNTS]


def switches() -> list[tuple[str, str, str]]:
    """(label, mode, kind) of each timed switch."""
    return [(f"{mode}-{kind}", mode, kind) for mode in MODES for kind in ("warm", "cold")] + [
        ("fused-reweight", "fused", "reweight")]


def _figures(values: list[float], scale: float = 1e3) -> dict[str, float]:
    scaled = [v * scale for v in values]
    return {"median_ms": round(statistics.median(scaled), 3), "min_ms": round(min(scaled), 3),
            "max_ms": round(max(scaled), 3), "n": len(scaled)}


def build_loras(family: str, folder: Path, count: int = max(COUNTS)) -> list[Any]:
    """`count` distinct stand-in LoRAs of `family` in `folder`, indexed as a library; LoraInfo of each."""
    from renderfarm.actors.standins import build_standin
    from renderfarm.loras import LoraLibrary
    from renderfarm.loras.standins import build_standin_lora, save_lora

    pipe = build_standin(family)  # only its shapes are read
    for index in range(count):
        name = f"bench-{family}-{index + 1}"
        save_lora(build_standin_lora(family, "diffusers", seed=zlib.crc32(name.encode()), pipe=pipe),
                  folder / f"{name}.safetensors")
    library = LoraLibrary(folder, hash_cache=folder / "hashes.json")
    return [library.get(f"bench-{family}-{index + 1}") for index in range(count)]


def run(model: str = "tiny-flux", rounds: int = 15, size: int = 64, steps: int = 8, threads: int = 1) -> dict[str, Any]:
    import torch

    from renderfarm.actors.embeddings import EmbeddingCache
    from renderfarm.actors.loading import load_pipeline
    from renderfarm.actors.lora_apply import apply
    from renderfarm.actors.pipelines import RenderRequest, render_batch
    from renderfarm.planning.catalog import default_catalog
    from renderfarm.planning.profiles import ComputeDtype, Placement, Profile, WeightsFormat

    torch.set_num_threads(threads)
    entry = default_catalog().get(model)
    profile = Profile("bf16", WeightsFormat.BF16, ComputeDtype.BF16, Placement.GPU)
    pipe = load_pipeline(entry, profile=profile)
    cache = EmbeddingCache()  # prompts encoded once: the steps are what is measured
    request = RenderRequest("bench", "a lighthouse at dusk", "", size, size, steps, entry.default_guidance, 1, 1)
    per_step: dict[str, list[float]] = {label: [] for label, _, _ in contenders()}
    switch: dict[str, dict[str, list[float]]] = {
        label: {"total": [], "load": [], "fuse": [], "set": []} for label, _, _ in switches()}
    adapter_bytes: dict[str, int] = {}

    with tempfile.TemporaryDirectory(prefix="lora-cost-") as folder:
        loras = build_loras(MODELS[model], Path(folder))
        set_a = tuple((info, 1.0) for info in loras[:2])
        set_b = tuple((info, 0.8) for info in loras[2:4])
        set_b_reweighted = tuple((info, 0.5) for info in loras[2:4])

        def render() -> float:
            [result] = render_batch(pipe, entry, [request], embedding_cache=cache)
            return result.timings["denoise_s_per_step"]

        def switch_once(mode: str, kind: str) -> Any:
            if kind == "cold":
                apply(pipe, entry, profile, (), mode)  # nothing loaded: B comes from disk
                apply(pipe, entry, profile, set_a, mode)
                return apply(pipe, entry, profile, set_b, mode)
            if kind == "warm":
                apply(pipe, entry, profile, set_b, mode)  # B loaded, then A applied on top
                apply(pipe, entry, profile, set_a, mode)
                return apply(pipe, entry, profile, set_b, mode)
            apply(pipe, entry, profile, set_b, mode)
            return apply(pipe, entry, profile, set_b_reweighted, mode)

        for label, mode, count in contenders():  # warm every path once, untimed
            apply(pipe, entry, profile, tuple((info, 1.0) for info in loras[:count]), mode)
            render()
        started = time.perf_counter()
        for round_index in range(rounds):
            order = contenders()
            order = order[round_index % len(order):] + order[:round_index % len(order)]
            for label, mode, count in order:
                timings = apply(pipe, entry, profile, tuple((info, 1.0) for info in loras[:count]), mode)
                if count:
                    adapter_bytes[label] = timings.active_adapter_bytes
                per_step[label].append(render())
            kinds = switches()
            kinds = kinds[round_index % len(kinds):] + kinds[:round_index % len(kinds)]
            for label, mode, kind in kinds:
                timings = switch_once(mode, kind)
                for part, value in (("total", timings.total_s), ("load", timings.load_s), ("fuse", timings.fuse_s),
                                    ("set", timings.set_s)):
                    switch[label][part].append(value)
        apply(pipe, entry, profile, ())
        elapsed = time.perf_counter() - started

    base = statistics.median(per_step["base"])
    report: dict[str, Any] = {
        "model": model, "profile": profile.name, "size": size, "steps": steps, "rounds": rounds,
        "torch_threads": threads, "cores": os.cpu_count(), "seconds": round(elapsed, 1),
        "loras": {"count": len(loras), "rank": loras[0].rank, "components": list(loras[0].components),
                  "file_bytes": loras[0].size_bytes},
        "per_step": {}, "switch": {},
    }
    for label, mode, count in contenders():
        figures = _figures(per_step[label])
        figures["vs_base"] = round(statistics.median(per_step[label]) / base, 3)
        figures["mode"], figures["loras"] = mode, count
        figures["active_adapter_bytes"] = adapter_bytes.get(label, 0)
        report["per_step"][label] = figures
    for label, mode, kind in switches():
        figures = _figures(switch[label]["total"])
        figures["mode"], figures["kind"] = mode, kind
        for part in ("load", "fuse", "set"):
            figures[f"{part}_median_ms"] = round(statistics.median(switch[label][part]) * 1e3, 3)
        report["switch"][label] = figures
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny-flux", help="stand-in (default tiny-flux)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds, each timing every contender (default 15)")
    parser.add_argument("--size", type=int, default=64, help="image width and height (default 64)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per render (default 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stand-ins gain nothing)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 2 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1, --steps at least 2 (a steady-state step)")
    report = run(args.model, args.rounds, args.size, args.steps, args.threads)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['model']} ({report['profile']}), {args.size}x{args.size}, {args.steps} steps, "
          f"{args.threads} torch thread(s) on {report['cores']} cores, {args.rounds} rounds interleaved "
          f"({report['seconds']} s); stand-in LoRAs of rank {report['loras']['rank']} on "
          f"{', '.join(report['loras']['components'])}")
    print("per step: ms, median [min-max]; x base; bytes of the active adapters")
    for label, figures in report["per_step"].items():
        print(f"  {label:>11} {figures['median_ms']:8.3f} [{figures['min_ms']:.3f}-{figures['max_ms']:.3f}]"
              f"  x{figures['vs_base']:.2f}  {figures['active_adapter_bytes']:>9,}")
    print("switch A (2 LoRAs) -> B (2 others): ms, median [min-max]; of which load / fuse+unfuse / set_adapters")
    for label, figures in report["switch"].items():
        print(f"  {label:>15} {figures['median_ms']:8.2f} [{figures['min_ms']:.2f}-{figures['max_ms']:.2f}]"
              f"  load {figures['load_median_ms']:.2f}  fuse {figures['fuse_median_ms']:.2f}"
              f"  set {figures['set_median_ms']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
