"""How much pinned host memory streaming a model's weights takes: torch's pinned (CUDA host) allocator rounds
every allocation up to a power of two, and diffusers' group offloading with CUDA streams pins a copy of
every streamed tensor. The ratio (pinned bytes / stored bytes) over the real architectures, built on the
meta device (nothing allocated), is the catalog's `pinned_factor` of each component.

    python bench/pinned_rounding.py [--json]

Exact for 16-bit, fp8 and 4-bit storage (scaling every tensor by a power of two keeps the rounding).
tests/actors/test_pinned_rounding.py checks the catalog against it for Flux and SDXL.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def next_power_of_two(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def pinned_factor(module, bytes_per_param: int = 2) -> float:
    """Pinned bytes / stored bytes when every parameter and buffer of `module` is pinned one by one."""
    sizes = Counter(t.numel() for t in [*module.parameters(), *module.buffers()])
    stored = sum(n * k for n, k in sizes.items()) * bytes_per_param
    pinned = sum(k * next_power_of_two(n * bytes_per_param) for n, k in sizes.items() if n)
    return pinned / stored


def factors() -> dict[str, dict[str, float]]:
    import real_models

    out: dict[str, dict[str, float]] = {}
    for family in real_models.FAMILIES:
        pipe = real_models.build_real_pipeline(family, "meta")
        out[family] = {name: round(pinned_factor(c), 3) for name, c in pipe.components.items()
                       if hasattr(c, "parameters")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    table = factors()
    if args.json:
        print(json.dumps(table))
        return
    for family, components in table.items():
        for name, factor in components.items():
            print(f"{family:<6} {name:<16} pinned_factor {factor:.3f}")


if __name__ == "__main__":
    main()
