"""Why a node calls torch from ONE thread: the same renders from the main thread, from one thread of their own,
and from a second thread of a process whose main thread used torch as well (what a Ray actor with two call
threads does when each call renders on its own thread).

    python bench/torch_threads.py [--json] [--batches 12] [--batch 8] [--threads N]

torch's CPU kernels run on libgomp (torch.__config__.parallel_info(): "ATen parallel backend: OpenMP"). A
libgomp worker waiting for the next parallel region spins for up to GOMP_SPINCOUNT iterations before it sleeps
on a futex, but only while the threads libgomp manages are no more than the CPUs: `do_spin` in
libgomp/config/linux/wait.h uses `gomp_throttled_spin_count_var` (100 spins by default) when
`gomp_managed_threads > gomp_available_cpus`. Each Python thread that enters a parallel region gets a team of
its own, so once two threads have used torch at N threads each on an N-core machine, every region of either
pays a futex sleep and wake per worker. A tiny render is thousands of short regions. The worker therefore runs
every torch call (loading and rendering) on a single thread (actors/worker.py: `_torch`), and this bench shows
the size of what it avoids. Each way runs in a fresh process, so no libgomp state carries over.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL, SIZE, STEPS = "tiny-sd15", 64, 2
WAYS = {
    "main": "the main thread loads and renders",
    "own-thread": "one thread of its own loads and renders (the worker's way)",
    "second-thread": "the main thread loads and renders once, then a second thread renders",
}


def _measure(way: str, batches: int, batch: int, threads: int) -> list[float]:
    """In this process: seconds per batch of `batch` renders, the `way` given."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from renderfarm.actors.pipelines import PipelineCache, RenderRequest, render_batch
    from renderfarm.config import NodeDeclaration
    from renderfarm.planning.catalog import default_catalog
    from renderfarm.planning.choose import choose_profile
    from renderfarm.planning.devices import device_from_declaration

    torch.set_num_threads(threads)
    entry = default_catalog().get(MODEL)
    node = NodeDeclaration(name="bench", vram_gib=24, compute_capability="8.6")
    profile = choose_profile(entry, device_from_declaration(node), SIZE, SIZE, batch).chosen
    state: dict[str, Any] = {"n": 0}

    def load() -> None:
        torch.set_num_threads(threads)
        state["pipe"], _ = PipelineCache(device="cpu").get(entry, profile)
        state["pipe"].set_progress_bar_config(disable=True)

    def one() -> float:
        state["n"] += 1
        requests = [RenderRequest(f"b{state['n']}-{i}", f"torch threads {state['n']} {i}", "", SIZE, SIZE, STEPS, 5.0,
                                  i, 1) for i in range(batch)]
        start = time.perf_counter()
        render_batch(state["pipe"], entry, requests)
        return time.perf_counter() - start

    if way == "main":
        load()
        run = one
    else:
        pool = ThreadPoolExecutor(max_workers=1)
        if way == "own-thread":
            pool.submit(load).result()
        else:
            load()
            one()  # the main thread renders once: its libgomp team exists
        assert threading.current_thread() is threading.main_thread()

        def run() -> float:
            return pool.submit(one).result()
    for _ in range(2):
        run()  # warm
    return [run() for _ in range(batches)]


def run(batches: int, batch: int, threads: int) -> dict[str, Any]:
    out: dict[str, Any] = {"model": MODEL, "size": SIZE, "steps": STEPS, "batch": batch, "batches": batches,
                           "torch_threads": threads, "cores": os.cpu_count(), "ways": {}}
    for way in WAYS:
        child = subprocess.run([sys.executable, __file__, "--child", way, "--batches", str(batches), "--batch",
                                str(batch), "--threads", str(threads)], capture_output=True, text=True, check=True)
        seconds = json.loads(child.stdout.strip().splitlines()[-1])
        ms = [s * 1e3 for s in seconds]
        out["ways"][way] = {"median_ms": round(statistics.median(ms), 1), "min_ms": round(min(ms), 1),
                            "max_ms": round(max(ms), 1)}
    base = out["ways"]["main"]["median_ms"]
    for figures in out["ways"].values():
        figures["vs_main"] = round(figures["median_ms"] / base, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--batches", type=int, default=12, help="timed batches per way (default 12)")
    parser.add_argument("--batch", type=int, default=8, help="renders per batch (default 8)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (default: every core, as a node uses)")
    parser.add_argument("--child", choices=sorted(WAYS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batches < 1 or args.batch < 1 or args.threads < 1:
        parser.error("--batches, --batch and --threads must be at least 1")
    if args.child:
        print(json.dumps(_measure(args.child, args.batches, args.batch, args.threads)))
        return 0
    report = run(args.batches, args.batch, args.threads)
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{MODEL} {SIZE}x{SIZE}, {STEPS} steps, batches of {args.batch}, {args.threads} torch threads on "
          f"{report['cores']} cores; ms per batch, median [min-max] of {args.batches}")
    for way, figures in report["ways"].items():
        print(f"  {way:>14} {figures['median_ms']:7.1f} [{figures['min_ms']:.1f}-{figures['max_ms']:.1f}]"
              f"  x{figures['vs_main']:.2f}  {WAYS[way]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
