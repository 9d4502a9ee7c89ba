"""Bounded load test of ``medbridge serve`` on loopback: C concurrent clients send N requests in total (one real NIH
image each, no heat maps), then stop. Prints p50/p95 latency, throughput, errors, the server's RSS before/after
(after a warm-up at the same concurrency, half-way and at the end) and the mean model batch (micro-batching), for
each --max-batch setting given (ratios side by side).

    python benchmarks/serve_load.py runs/demo --clients 8 --requests 300 --max-batch 16,1

The server is started as a subprocess (``medbridge serve RUN --port P``, 127.0.0.1 only) and stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(run: str, images: list[bytes], clients: int, requests: int, max_batch: int, timeout: float) -> dict:
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "medbridge", "serve", run, "--port", str(port), "--max-batch",
                             str(max_batch), "--max-pending", str(4 * clients)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.poll() is not None else ''}")
            time.sleep(0.5)
        latencies, errors, lock = [], [], threading.Lock()
        counter = iter(range(2 * clients))
        samples, done = [], threading.Event()

        def sample() -> None:
            while not done.wait(1.0):
                samples.append(rss_mib(proc.pid))

        def client(record: bool = True) -> None:
            with httpx.Client(timeout=timeout) as c:
                for i in counter:
                    t0 = time.perf_counter()
                    try:
                        r = c.post(base + "/v1/predict", content=images[i % len(images)])
                        ok = r.status_code == 200
                        why = None if ok else f"{r.status_code}: {r.text[:120]}"
                    except httpx.HTTPError as exc:
                        ok, why = False, type(exc).__name__
                    if record:
                        with lock:
                            (latencies if ok else errors).append(time.perf_counter() - t0 if ok else why)

        # warm-up at the same concurrency (allocator pools for full batches), not counted in the numbers
        warm = [threading.Thread(target=client, args=(False,)) for _ in range(clients)]
        for t in warm:
            t.start()
        for t in warm:
            t.join()
        rss_before = rss_mib(proc.pid)
        counter = iter(range(requests))
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)] + [threading.Thread(target=sample)]
        for t in threads:
            t.start()
        for t in threads[:-1]:
            t.join()
        wall = time.perf_counter() - t0
        done.set()
        threads[-1].join()
        rss_after = rss_mib(proc.pid)
        service = httpx.get(base + "/v1/model", timeout=timeout).json()["service"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    lat = np.array(latencies) * 1000
    return {"max_batch": max_batch, "ok": len(latencies), "errors": len(errors), "error_examples": errors[:3],
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
            "p95_ms": float(np.percentile(lat, 95)) if len(lat) else None, "throughput_rps": len(latencies) / wall,
            "wall_s": wall, "rss_before_mib": rss_before, "rss_after_mib": rss_after,
            "rss_half_mib": samples[len(samples) // 2] if samples else float("nan"),
            "rss_max_mib": max(samples, default=float("nan")),
            "mean_batch": service["images"] / max(service["batches"], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder or method folder to serve")
    ap.add_argument("--data", default="../shared/data/nih-cxr14-sample", help="NIH-layout folder (images/)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--images", type=int, default=32, help="distinct real images cycled through")
    ap.add_argument("--max-batch", default="16", help="comma-separated --max-batch settings to compare")
    ap.add_argument("--timeout", type=float, default=300, help="per-request timeout (s)")
    args = ap.parse_args()
    files = sorted(p for p in (Path(args.data) / "images").iterdir() if p.suffix.lower() in (".png", ".jpg"))
    images = [p.read_bytes() for p in files[: args.images]]
    print(f"serve load: {args.run}, {args.clients} clients, {args.requests} requests, {len(images)} real NIH images "
          f"({np.mean([len(b) for b in images]) / 1024:.0f} KiB mean), {os.cpu_count()} CPUs", flush=True)
    rows = [run_once(args.run, images, args.clients, args.requests, int(b), args.timeout)
            for b in args.max_batch.split(",")]
    print("| --max-batch | ok | errors | p50 ms | p95 ms | throughput req/s | mean model batch | RSS before / half-way "
          "/ after MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['max_batch']} | {r['ok']} | {r['errors']} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} "
              f"| {r['throughput_rps']:.2f} | {r['mean_batch']:.1f} | {r['rss_before_mib']:.0f} / "
              f"{r['rss_half_mib']:.0f} / {r['rss_after_mib']:.0f} |")
    if len(rows) > 1:
        print(f"throughput ratio (first / last setting): {rows[0]['throughput_rps'] / rows[-1]['throughput_rps']:.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
