"""The seeds' machines, planned: Flux-dev and SDXL at 1024x1024 on the cards and PCs the farm is for, with
the chosen profile, predicted VRAM, host RAM and seconds per step, and the reason. Pure planning, no GPU.

    python bench/seed_machines.py [--json]

docs/profiles.md shows its output beside the figures users publish for those cards.
"""

from __future__ import annotations

import argparse
import json

from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.choose import choose_profile
from renderfarm.planning.devices import device_from_spec

# (label, card name, VRAM GiB as the card reports it, compute capability, RAM GiB). An "8 GB" GeForce card
# reports ~7.6-7.8 GiB to CUDA; 7.6 is the conservative end.
MACHINES = (
    ("(a) Quadro RTX 6000 24 GB, 64 GB PC", "Quadro RTX 6000", 24.0, "7.5", 64.0),
    ("(b) RTX 8 GB, 32 GB PC", "NVIDIA GeForce RTX 3070", 7.6, "8.6", 32.0),
    ("(c) RTX 8 GB, 16 GB PC", "NVIDIA GeForce RTX 3070", 7.6, "8.6", 16.0),
    ("(d) RTX 8 GB, 8 GB PC", "NVIDIA GeForce RTX 3070", 7.6, "8.6", 8.0),
)
MODELS = ("flux-dev", "sdxl")


def rows(size: int = 1024) -> list[dict]:
    catalog = default_catalog()
    out = []
    for label, card, vram, cc, ram in MACHINES:
        device = device_from_spec(card, vram, cc, ram_gib=ram)
        for model in MODELS:
            choice = choose_profile(catalog.get(model), device, size, size)
            c = choice.chosen_candidate
            out.append({
                "machine": label, "model": model, "size": size, "steps": choice.steps,
                "host_usable_gib": round(device.host_budget_gib, 2),
                "chosen": choice.chosen.name if choice.chosen else None,
                "vram_gib": round(c.prediction.peak_gib, 2) if c else None,
                "host_gib": round(c.prediction.host_peak_gib, 2) if c else None,
                "pinned_gib": round(c.prediction.pinned_gib, 2) if c else None,
                "s_per_step": round(c.prediction.seconds_per_step, 2) if c else None,
                "reason": choice.reason,
            })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    table = rows()
    if args.json:
        print(json.dumps(table))
        return
    print("| machine | model | chosen | VRAM GiB | host GiB (pinned) | s/step | why |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        host = f"{r['host_gib']} ({r['pinned_gib']})" if r["chosen"] else "-"
        print(f"| {r['machine']} | {r['model']} | {r['chosen'] or 'none'} | {r['vram_gib'] or '-'} | {host} | "
              f"{r['s_per_step'] or '-'} | {r['reason']} |")


if __name__ == "__main__":
    main()
