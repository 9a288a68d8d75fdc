"""The HTTP API under load, and what HTTP adds to a job, side by side in one run.

    python bench/api_load.py [--json] [--seconds 10] [--concurrency 8] [--jobs 20]
    python bench/api_load.py --quick [--json]          # 2 s per phase, 4 jobs: does it run

1. Requests per second against ONE API process (`renderfarm api`, a child process, as deployed), from
   `--concurrency` client threads on keep-alive connections, for `--seconds` each, with p50/p99 latency:
   - submit: POST /v1/jobs (one tiny-sd15 spec: the client's full validation, one Lua submit);
   - status: GET /v1/jobs/{id} of the jobs just submitted (record + ETA lookups);
   beside the same calls made by FarmClient in this process from the same number of threads (the peer: what
   the API costs over the Python client). A private redis-server, no farm, so nothing renders meanwhile; the
   queued jobs are what a busy farm's queue would hold.
2. The added latency of a job: a farm with one simulated node renders tiny-sd15 64x64 in 2 steps; `--jobs`
   jobs, alternating, are submitted and followed through the API (POST /v1/jobs, then GET /v1/events?job=ID
   until done, then GET the PNG) and through FarmClient (submit, as_completed, result), from submit to PNG
   in hand; median and p90 of each, and the difference.

The load generator runs on the same machine as the API and Redis (2 cores here): the figures are what one
machine does with all three, not the API alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPEC = {"model": "tiny-sd15", "prompt": "api load", "width": 64, "height": 64, "steps": 2, "guidance": 5.0}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_api(redis_url: str) -> tuple[subprocess.Popen, str]:
    """`renderfarm api` on a free loopback port, in a child process; returns it and its base URL once it answers."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RENDERFARM_REDIS_URL": redis_url}
    env.pop("RENDERFARM_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "renderfarm.cli", "api", "--port", str(port), "--no-webhooks"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"renderfarm api exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("renderfarm api did not answer within 60 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def hammer(call, threads: int, seconds: float) -> dict[str, Any]:
    """`call(i)` from `threads` threads for `seconds`: requests/s and latency percentiles (ms)."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors: list[str] = []
    start_gate = threading.Barrier(threads + 1)
    stop_at = [0.0]

    def run(slot: int) -> None:
        local = latencies[slot]
        start_gate.wait()
        i = 0
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                call(slot, i)
            except Exception as exc:  # a failed request is a finding, reported, not a crash of the bench
                errors.append(f"{type(exc).__name__}: {exc}")
                if len(errors) > 20:
                    return
            local.append(time.perf_counter() - t0)
            i += 1

    workers = [threading.Thread(target=run, args=(s,), daemon=True) for s in range(threads)]
    for w in workers:
        w.start()
    stop_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    start_gate.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    flat = [x for slot in latencies for x in slot]
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, first: {errors[0]}")
    return {"requests": len(flat), "rps": round(len(flat) / elapsed, 1),
            "p50_ms": round(percentile(flat, 0.50) * 1e3, 2), "p99_ms": round(percentile(flat, 0.99) * 1e3, 2)}


def throughput(seconds: float, threads: int, say) -> dict[str, Any]:
    import httpx

    from renderfarm.client import FarmClient
    from renderfarm.cluster.redis_server import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="rf-api-bench-") as tmp:
        server = EmbeddedRedis(Path(tmp))
        url = server.start()
        try:
            proc, base = start_api(url)
            try:
                sessions = [httpx.Client(base_url=base, timeout=30) for _ in range(threads)]
                clients = [FarmClient(url) for _ in range(threads)]
                submitted: list[list[str]] = [[] for _ in range(threads)]

                def http_submit(slot: int, i: int) -> None:
                    reply = sessions[slot].post("/v1/jobs", json={**SPEC, "seed": i})
                    if reply.status_code != 201:
                        raise RuntimeError(f"{reply.status_code}: {reply.text[:300]}")
                    submitted[slot].append(reply.json()["job_ids"][0])

                def http_status(slot: int, i: int) -> None:
                    ids = submitted[slot]
                    reply = sessions[slot].get(f"/v1/jobs/{ids[i % len(ids)]}")
                    if reply.status_code != 200:
                        raise RuntimeError(f"{reply.status_code}: {reply.text[:300]}")

                def client_submit(slot: int, i: int) -> None:
                    submitted[slot].append(clients[slot].submit({**SPEC, "seed": i}))

                def client_status(slot: int, i: int) -> None:
                    ids = submitted[slot]
                    job_id = ids[i % len(ids)]
                    clients[slot].job(job_id)
                    clients[slot].estimates([job_id])

                out = {}
                # alternating API and client, so both see the same queue growing
                for name, call in (("submit_api", http_submit), ("submit_client", client_submit),
                                   ("status_api", http_status), ("status_client", client_status)):
                    out[name] = hammer(call, threads, seconds)
                    say(f"{name}: {out[name]}")
                for s in sessions:
                    s.close()
                for c in clients:
                    c.store.close()
                return out
            finally:
                stop(proc)
        finally:
            server.stop()


def added_latency(jobs: int, say) -> dict[str, Any]:
    import httpx

    from renderfarm.config import NodeDeclaration, Settings
    from renderfarm.farm import Farm

    with tempfile.TemporaryDirectory(prefix="rf-api-bench-") as tmp:
        settings = Settings(data_dir=Path(tmp), max_batch=1)
        node = NodeDeclaration(name="bench", vram_gib=24, compute_capability="8.6")
        with Farm(settings, [node], warm_models=[SPEC["model"]], log_to_driver=False) as farm:
            proc, base = start_api(farm.redis_url)
            try:
                client = farm.client()
                http = httpx.Client(base_url=base, timeout=120)

                def via_api(i: int) -> float:
                    t0 = time.perf_counter()
                    job = http.post("/v1/jobs", json={**SPEC, "seed": i}).json()["job_ids"][0]
                    with http.stream("GET", f"/v1/events?job={job}") as stream:
                        for line in stream.iter_lines():
                            if line.startswith("data: ") and json.loads(line[6:])["state"] in ("done", "failed"):
                                break
                    png = http.get(f"/v1/jobs/{job}/images/0")
                    if png.status_code != 200:
                        raise RuntimeError(f"job {job}: {png.status_code} {png.text[:200]}")
                    return time.perf_counter() - t0

                def via_client(i: int) -> float:
                    t0 = time.perf_counter()
                    job = client.submit({**SPEC, "seed": i})
                    for done in client.as_completed([job], timeout=120):
                        if done.state.value != "done":
                            raise RuntimeError(f"job {job} {done.state.value}: {done.error}")
                    if not client.result(job).png:
                        raise RuntimeError(f"job {job}: no image")
                    return time.perf_counter() - t0

                via_api(10**6), via_client(10**6 + 1)  # warm both paths
                api_s, client_s = [], []
                for i in range(jobs):
                    order = [(via_api, api_s), (via_client, client_s)]
                    for run, into in order if i % 2 == 0 else order[::-1]:
                        into.append(run(i))
                say(f"added latency: api {statistics.median(api_s) * 1e3:.1f} ms, client "
                    f"{statistics.median(client_s) * 1e3:.1f} ms (median)")
                http.close()
                api_ms = [x * 1e3 for x in api_s]
                client_ms = [x * 1e3 for x in client_s]
                return {"jobs": jobs, "api_median_ms": round(statistics.median(api_ms), 1),
                        "api_p90_ms": round(percentile(api_ms, 0.9), 1),
                        "client_median_ms": round(statistics.median(client_ms), 1),
                        "client_p90_ms": round(percentile(client_ms, 0.9), 1),
                        "added_median_ms": round(statistics.median(api_ms) - statistics.median(client_ms), 1)}
            finally:
                stop(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per throughput phase (default 10)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--jobs", type=int, default=20, help="jobs per side for the added latency (default 20)")
    parser.add_argument("--quick", action="store_true", help="2 s per phase, 4 jobs")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.jobs = 2.0, 4
    if args.seconds <= 0 or args.concurrency < 1 or args.jobs < 1:
        parser.error("--seconds must be positive, --concurrency and --jobs at least 1")

    def say(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr)

    report = {"concurrency": args.concurrency, "seconds": args.seconds, "cores": os.cpu_count(),
              "throughput": throughput(args.seconds, args.concurrency, say), "latency": added_latency(args.jobs, say)}
    if args.json:
        print(json.dumps(report))
        return 0
    t = report["throughput"]
    print(f"one API process, {args.concurrency} client threads, {args.seconds:g} s each, {report['cores']} cores "
          "(API, Redis and the load on one machine):")
    print(f"  {'':14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name in ("submit_api", "submit_client", "status_api", "status_client"):
        row = t[name]
        print(f"  {name:14} {row['rps']:>8} {row['p50_ms']:>8} {row['p99_ms']:>8}")
    lat = report["latency"]
    print(f"a job submit -> PNG in hand ({lat['jobs']} each, alternating): API {lat['api_median_ms']} ms "
          f"(p90 {lat['api_p90_ms']}), FarmClient {lat['client_median_ms']} ms (p90 {lat['client_p90_ms']}); "
          f"HTTP adds {lat['added_median_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
