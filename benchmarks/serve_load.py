"""Load test of `detector serve` on loopback (#22), bounded in count and time; it stops by itself.

Starts ``detector serve`` (the default detector, its defaults: 2 decode workers, batches of up to
16 within 5 ms) on a free port, waits for ``/readyz``, then sends ``--requests`` uploads of the
shared fixture's images (``../shared/data/fixture``; the bundled samples when it is absent) to
``POST /v1/scan`` at each concurrency level, each level stopping after ``--max-seconds``. Prints
requests per second, p50/p95/p99 latency and errors per level, the server's resident memory (its
process and its decode workers) before and after, and the throughput of ``detector scan`` on the
same images (a whole process, and its rate once started). Run from the repository root, never
beside another heavy job::

    .venv/bin/python benchmarks/serve_load.py [--requests 1000] [--levels 1,4,16]

Results: benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scan_speed import BIN, ROOT, machine  # noqa: E402

FIXTURE = (ROOT / ".." / "shared" / "data" / "fixture").resolve()


def images() -> list[Path]:
    from detector.images import find_images

    folder = FIXTURE if FIXTURE.is_dir() else ROOT / "data" / "samples"
    return find_images([folder])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the decode workers), in MB."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def _children(pid: int) -> list[int]:
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return kids + [g for k in kids for g in _children(k)]


def level(url: str, payloads: list[tuple[str, bytes]], n: int, concurrency: int, max_seconds: float) -> dict:
    import httpx

    latencies, errors = [], 0
    deadline = time.monotonic() + max_seconds
    clients = [httpx.Client(timeout=120) for _ in range(concurrency)]

    def one(k: int) -> tuple[float, bool]:
        if time.monotonic() > deadline:
            return -1.0, True
        name, data = payloads[k % len(payloads)]
        kind = "image/jpeg" if name.lower().endswith((".jpg", ".jpeg")) else "image/png"
        t0 = time.perf_counter()
        try:
            r = clients[k % concurrency].post(url, content=data, headers={"Content-Type": kind})
            ok = r.status_code == 200 and r.json().get("label") in ("fake", "real")
        except Exception:  # noqa: BLE001 - counted, reported
            ok = False
        return time.perf_counter() - t0, ok

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for seconds, ok in pool.map(one, range(n)):
            if seconds < 0:
                continue
            latencies.append(seconds)
            errors += not ok
    elapsed = time.perf_counter() - t0
    for c in clients:
        c.close()
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
            "requests_per_s": round(len(latencies) / elapsed, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1)}


def scan_throughput(paths: list[Path]) -> dict:
    """`detector scan` on the same images: the whole process, and its rate once the first row is out."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for i, p in enumerate(paths):
            (folder / f"{i:03d}{p.suffix}").write_bytes(p.read_bytes())
        out = Path(tmp) / "scan.csv"
        t0 = time.perf_counter()
        subprocess.run([str(BIN / "detector"), "scan", str(folder), "-o", str(out), "-q"], check=True,
                       capture_output=True, cwd=ROOT)
        whole = time.perf_counter() - t0
        import pandas as pd

        seconds = pd.read_csv(out)["seconds"].sum()
    return {"images": len(paths), "process_seconds": round(whole, 2), "images_per_s_whole_process": round(len(paths) / whole, 2),
            "images_per_s_scoring": round(len(paths) / seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="per level")
    args = parser.parse_args()
    paths = images()
    payloads = [(p.name, p.read_bytes()) for p in paths]
    port = free_port()
    server = subprocess.Popen([str(BIN / "detector"), "serve", "--port", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                sys.exit(f"the server stopped: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        level(f"{base}/v1/scan", payloads, 2 * len(payloads), 2, 120)  # warm-up: spawn and load the decode workers
        before = rss_mb(server.pid)
        rows = []
        for c in [int(v) for v in args.levels.split(",")]:
            print(f"concurrency {c}: {args.requests} requests ...", file=sys.stderr, flush=True)
            rows.append(level(f"{base}/v1/scan", payloads, args.requests, c, args.max_seconds))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
        after = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    scan = scan_throughput(paths)
    result = {"machine": machine(), "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "images": [str(p) for p in paths], "levels": rows, "server_rss_mb": {"before": round(before, 1),
                                                                                     "after": round(after, 1)},
              "scan": scan}
    (HERE / "results" / "serve_load.json").write_text(json.dumps(result, indent=1))
    print("| concurrency | requests | errors | requests/s | p50 ms | p95 ms | p99 ms |\n|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['requests_per_s']} | {r['p50_ms']} | "
              f"{r['p95_ms']} | {r['p99_ms']} |")
    print(f"server RSS (process and decode workers): {before:.0f} MB before, {after:.0f} MB after")
    print(f"detector scan on the same {scan['images']} images: {scan['process_seconds']} s as a whole process "
          f"({scan['images_per_s_whole_process']} images/s), {scan['images_per_s_scoring']} images/s once started")


if __name__ == "__main__":
    main()
