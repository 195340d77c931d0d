"""Bounded load test of `grdnet serve` on loopback: latency percentiles and throughput.

Starts a real server (`python -m grdnet.cli serve MODEL`) on 127.0.0.1, then runs three phases
from this process with httpx: 1 client x N requests (baseline latency), C concurrent clients x N
requests, and the same with `?overlay=true`. Each request uploads one 128 x 128 PNG from the demo
surface dataset. Prints one JSON line per phase; exits 1 if any request failed.

Without --model it first trains the `cpu` preset on a generated surface dataset for
--train-minutes (1 by default), so the figures are for a realistic network, not the tiny one.
The clients share the machine with the server: on a small CPU they take some of its time.

    PYTHONPATH=src python benchmarks/serve_load.py --work /tmp/serve-bench
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_model(work: Path, preset: str, minutes: float) -> tuple[Path, Path]:
    import grdnet
    from grdnet.demo_data import make_surface_dataset

    data = work / "data"
    if not (data / "train" / "good").is_dir():
        make_surface_dataset(data, n_train=120, n_test_good=8, n_test_defect=8, size=128, seed=0)
    model = work / "run" / "model"
    if not model.is_dir():
        grdnet.train(data, work / "run", preset, max_minutes=minutes, train={"epochs": 1000}, progress=False)
    return model, data


def start_server(model: Path, port: int, extra: list[str]) -> subprocess.Popen:
    log = open(Path(tempfile.gettempdir()) / f"grdnet-serve-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "grdnet.cli", "serve", str(model), "--host", "127.0.0.1",
                             "--port", str(port), *extra], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise SystemExit(f"server did not come up in 180 s; see {log.name}")
        time.sleep(0.5)


async def phase(base: str, images: list[bytes], clients: int, requests: int, overlay: bool) -> dict:
    latencies, errors, batch_sizes, inference = [], [], [], []

    async def client(k: int):
        async with httpx.AsyncClient(base_url=base, timeout=60) as c:
            for i in range(requests):
                img = images[(k * requests + i) % len(images)]
                t0 = time.perf_counter()
                try:
                    r = await c.post("/predict", params={"overlay": overlay}, files={"file": ("part.png", img)})
                except httpx.HTTPError as e:
                    errors.append(repr(e))
                    continue
                latencies.append((time.perf_counter() - t0) * 1000)
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    continue
                body = r.json()
                batch_sizes.append(body["batch_images"])
                inference.append(body["timings_ms"]["inference"])

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    lat = np.array(latencies)
    return {"clients": clients, "requests": clients * requests, "overlay": overlay, "errors": len(errors),
            "first_errors": errors[:3], "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p90_ms": round(float(np.percentile(lat, 90)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "max_ms": round(float(lat.max()), 1), "throughput_rps": round((len(lat) - len(errors)) / wall, 1),
            "mean_batch_images": round(float(np.mean(batch_sizes)), 2) if batch_sizes else None,
            "mean_forward_ms": round(float(np.mean(inference)), 1) if inference else None, "wall_s": round(wall, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an existing model folder (default: train one)")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--train-minutes", type=float, default=1.0)
    ap.add_argument("--work", help="folder for the generated data and model (default: a temp folder); reused")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=50, help="per client")
    ap.add_argument("--serve-args", default="", help="extra `grdnet serve` options, e.g. '--max-batch 4'")
    a = ap.parse_args()

    work = Path(a.work or tempfile.mkdtemp(prefix="grdnet-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.model:
        model = Path(a.model)
        from grdnet.demo_data import make_surface_dataset
        data = work / "data"
        if not (data / "test").is_dir():
            make_surface_dataset(data, n_train=1, n_test_good=8, n_test_defect=8, size=128, seed=0)
    else:
        model, data = prepare_model(work, a.preset, a.train_minutes)
    cfg = json.loads((model / "config.json").read_text())
    images = [p.read_bytes() for p in sorted((data / "test").rglob("*.png"))]
    print(json.dumps({"what": "setup", "date": dt.date.today().isoformat(), "model": str(model),
                      "image_size": cfg["model"]["image_size"], "gen_widths": cfg["model"]["gen_widths"],
                      "trained_minutes": cfg.get("training", {}).get("minutes"),
                      "request_image": "128x128 RGB PNG", "n_distinct_images": len(images),
                      "cpus": os.cpu_count(), "python": platform.python_version(),
                      "setup_s": round(time.time() - t0, 1)}), flush=True)

    port = free_port()
    server = start_server(model, port, a.serve_args.split())
    base = f"http://127.0.0.1:{port}"
    failed = 0
    try:
        asyncio.run(phase(base, images, 2, 5, False))  # warm the connection pool and the server
        for clients, overlay in ((1, False), (a.clients, False), (a.clients, True)):
            res = asyncio.run(phase(base, images, clients, a.requests, overlay))
            failed += res["errors"]
            print(json.dumps({"what": "load", **res}), flush=True)
        health = httpx.get(base + "/health").json()
        print(json.dumps({"what": "after", "health": health["status"], "queue": health["queue"]}), flush=True)
    finally:
        server.terminate()
        server.wait(30)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
