"""The VRAM model against the published Flux.1-dev measurements (H100 80 GB, 1024x1024, batch 1).

    python bench/vram_calibration.py [--json]

Prints, per published run, the published peak (max_memory_reserved), our predicted peak with and without
the CUDA context, and the relative error. Target: |error| <= 10% for every run. Pure planning: no GPU.
"""

from __future__ import annotations

import argparse
import json

from renderfarm.planning.calibration import (
    DEVICE,
    HEIGHT,
    MODEL,
    PUBLISHED,
    WIDTH,
    reference_profile,
)
from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.devices import device_from_spec
from renderfarm.planning.vram import predict


def rows() -> list[dict]:
    entry, device = default_catalog().get(MODEL), device_from_spec(*DEVICE)
    out = []
    for ref in PUBLISHED:
        profile = reference_profile(ref.weights, ref.text_encoder_weights, ref.placement)
        p = predict(entry, profile, device, WIDTH, HEIGHT)
        out.append({
            "profile": profile.name,
            "published_peak_gib": ref.peak_gib,
            "predicted_peak_gib": round(p.peak_gib, 2),
            "predicted_without_context_gib": round(p.allocator_peak_gib, 2),
            "error": round(p.peak_gib / ref.peak_gib - 1, 4),
            "error_without_context": round(p.allocator_peak_gib / ref.peak_gib - 1, 4),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    table = rows()
    worst = max(abs(r["error"]) for r in table)
    if args.json:
        print(json.dumps({"model": MODEL, "device": DEVICE[0], "size": f"{WIDTH}x{HEIGHT}", "runs": table,
                          "worst_error": worst}))
        return
    print(f"{MODEL} {WIDTH}x{HEIGHT} on {DEVICE[0]}: published vs predicted peak (GiB)")
    for r in table:
        print(f"  {r['profile']:<24} {r['published_peak_gib']:6.2f} {r['predicted_peak_gib']:6.2f} "
              f"({r['error']:+.1%}; without CUDA context {r['predicted_without_context_gib']:.2f}, "
              f"{r['error_without_context']:+.1%})")
    print(f"worst error {worst:.1%} (target <= 10%)")


if __name__ == "__main__":
    main()
