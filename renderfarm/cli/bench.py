"""`renderfarm bench`: routing policies on a simulated cluster (`sim`), and jobs through a real local farm
while its parts are killed (`chaos`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from renderfarm.chaos import SCENARIOS  # chaos.py imports no Ray at module level
from renderfarm.cli.common import EXIT_ERROR, emit, stderr_console
from renderfarm.errors import CliError


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             with_redis: argparse.ArgumentParser) -> None:
    bench = sub.add_parser("bench", help="benchmarks: routing in a simulator, chaos on a local farm")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    sim = bench_sub.add_parser("sim", parents=[common], help="routing policies on a simulated cluster")
    sim.add_argument("--trace", help="JSONL of job specs with submit_s (default: the trace shipped in "
                     "renderfarm/configs/sim)")
    sim.add_argument("--lora-trace", action="store_true",
                     help="simulate the shipped LoRA trace (the same jobs, a third of them carrying one of ten "
                     "LoRAs: renderfarm/configs/sim/trace_loras.jsonl) instead of --trace")
    sim.add_argument("--cluster", help="cluster YAML (default: renderfarm/configs/sim/cluster.yaml)")
    sim.add_argument("--error", type=float, default=0.3, metavar="E",
                     help="prediction error: each job's true duration is its predicted one x a factor drawn "
                     "around 1 (uniform: within +-E; lognormal: sigma E); the policies plan with the prediction, "
                     "the simulation runs with the truth (default 0.3; 0: exact knowledge)")
    sim.add_argument("--error-dist", choices=("uniform", "lognormal"), default="uniform",
                     help="how the true factor is drawn (default uniform)")
    sim.add_argument("--seed", type=int, default=0, help="seed of the true factors (default 0)")
    sim.set_defaults(func=cmd_bench_sim)
    chaos = bench_sub.add_parser("chaos", parents=[common],
                                 help="kill or freeze a worker, the scheduler, redis-server mid-render; count lost jobs")
    chaos.add_argument("--jobs", type=int, default=50, help="jobs per scenario (default 50)")
    chaos.add_argument("--scenario", action="append", choices=SCENARIOS,
                       help="run only this scenario (repeatable; default all; renderfarm/chaos.py says what each does)")
    chaos.set_defaults(func=cmd_bench_chaos)


def cmd_bench_sim(args: argparse.Namespace) -> int:
    """The same placement code against a simulated cluster and a job trace, beside two baselines."""
    from renderfarm.scheduler.simulate import DEFAULT_LORA_TRACE, PredictionError, run_sim

    if args.lora_trace and args.trace:
        raise CliError("--lora-trace and --trace: give one trace")
    error = PredictionError(args.error, args.error_dist, args.seed)  # ConfigError names a bad --error
    report = run_sim(DEFAULT_LORA_TRACE if args.lora_trace else args.trace, args.cluster, error)
    if args.json:
        emit(args, {"ok": True, **report})
        return 0
    bound = report["lower_bound_s"]
    spread = (f"+-{error.spread:.0%} uniform" if error.distribution == "uniform"
              else f"lognormal sigma {error.spread:g}") if error.spread else "none (exact knowledge)"
    print(f"{report.get('jobs', '?')} jobs on {report.get('nodes', '?')} nodes; lower bound on the makespan "
          f"{bound:.0f} s; rejected up front: {report['rejected']}")
    print(f"prediction error: {spread}, seed {error.seed} (policies plan with the prediction; jobs run with "
          "the truth)")
    loras = report.get("lora_jobs", 0) > 0  # the LoRA column only where there are LoRAs: the old table otherwise
    if loras:
        print(f"LoRA jobs: {report['lora_jobs']} carrying {report['lora_sets']} distinct LoRA sets; every node holds "
              "every LoRA; switches: runs whose set differs from the one their node's pipeline had applied")
    print(f"  {'policy':<16} {'makespan s':>10} {'x bound':>8} {'p50 wait':>9} {'p95 wait':>9} {'util':>5} "
          f"{'OOMs':>5} {'loads':>6}" + (f" {'switches':>8}" if loras else ""))
    for name, p in report["policies"].items():
        print(f"  {name:<16} {p['makespan_s']:10.0f} {p['makespan_s'] / bound:8.2f} {p['p50_wait_s']:9.0f} "
              f"{p['p95_wait_s']:9.0f} {p['utilization']:5.2f} {p['ooms']:5d} {p['model_loads']:6d}"
              + (f" {p['lora_switches']:8d}" if loras else ""))
    return 0


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send everything written to file descriptor 1 (by this process and threads of libraries that print)
    to stderr for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_bench_chaos(args: argparse.Namespace) -> int:
    """Jobs through a real local farm while a worker, the scheduler or redis-server is killed mid-render."""
    from renderfarm.chaos import SCENARIOS, run_scenario

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # stand-ins only
    if args.jobs < 1:
        raise CliError(f"--jobs {args.jobs}: must be at least 1")
    scenarios = args.scenario or list(SCENARIOS)
    say = (lambda line: None) if args.json else (lambda line: stderr_console().print(line, highlight=False))
    with _stdout_to_stderr():  # Ray reports the deaths this causes on stdout; --json owns stdout
        results = [run_scenario(name, args.jobs, say=say).as_dict() for name in scenarios]
    ok = all(r["done"] == r["submitted"] and r["lost"] == 0 and r["duplicates"] == 0 for r in results)
    if args.json:
        emit(args, {"ok": ok, "scenarios": results})
        return 0 if ok else EXIT_ERROR
    print(f"  {'scenario':<10} {'submitted':>9} {'done':>5} {'lost':>5} {'dupes':>5} {'in flight':>9} "
          f"{'retried':>7} {'recovery s':>10} {'total s':>8}")
    for r in results:
        recovery = "-" if r["recovery_s"] is None else f"{r['recovery_s']:.2f}"
        print(f"  {r['scenario']:<10} {r['submitted']:9d} {r['done']:5d} {r['lost']:5d} {r['duplicates']:5d} "
              f"{r['in_flight_at_fault']:9d} {r['retried']:7d} {recovery:>10} {r['total_s']:8.2f}")
    return 0 if ok else EXIT_ERROR
