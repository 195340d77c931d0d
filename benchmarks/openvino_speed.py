"""Inference speed of one trained model in PyTorch, ONNX Runtime, OpenVINO fp32 and OpenVINO INT8.

    OMP_NUM_THREADS=1 python benchmarks/openvino_speed.py --model RUN --onnx m.onnx --xml fp32.xml \
        --int8-xml int8.xml --images DATA/test --threads 1

Network only (`_run` on model-size tensors made from real images: ms/image at batch 1, images/s
at batch 16) and end to end (`predict()` on the image files themselves: decoding, every view the
model scores, resizing back, decisions; images/s). The backends are timed in interleaved rounds
(each round times every backend once, in turn), so that load from other processes falls on all of
them alike; the figure is the median over rounds. One JSON line per figure, then a Markdown table.
Files not given are skipped (export them first with `grdnet export`).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path


def _backends(a):
    import grdnet
    from grdnet.export import OnnxPredictor, OpenVinoPredictor

    out = {"pytorch": grdnet.load(a.model)}
    if a.onnx:
        out["onnxruntime"] = OnnxPredictor.load(a.onnx, threads=a.threads)
    if a.xml:
        out["openvino fp32"] = OpenVinoPredictor.load(a.xml, threads=a.threads)
    if a.int8_xml:
        out["openvino int8"] = OpenVinoPredictor.load(a.int8_xml, threads=a.threads)
    return out


def _inputs(paths, cfg, n):
    import torch

    from grdnet.data import array_to_tensor, open_image, pil_to_array

    return torch.stack([array_to_tensor(pil_to_array(open_image(p), cfg.channels), cfg.image_size)
                        for p in (paths * n)[:n]])


def _time(fn, reps):
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model folder or run folder (the PyTorch reference)")
    p.add_argument("--onnx")
    p.add_argument("--xml", help="OpenVINO fp32 .xml")
    p.add_argument("--int8-xml", help="OpenVINO INT8 .xml")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--threads", type=int, default=1, help="threads per backend (PyTorch via torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--predict-images", type=int, default=16, help="images for the end-to-end figure")
    a = p.parse_args(argv)

    import torch

    from grdnet.data import list_images

    torch.set_num_threads(a.threads)
    paths = [q for d in sorted({f.parent for f in Path(a.images).rglob("*")}) for q in list_images(d)]
    paths = [paths[i] for i in range(0, len(paths), max(1, len(paths) // 64))]  # spread over the folders
    if not paths:
        raise SystemExit(f"{a.images}: no images")
    backends = _backends(a)
    cfg = backends["pytorch"].cfg
    x1, x16 = _inputs(paths, cfg, 1), _inputs(paths, cfg, 16)
    files = paths[:a.predict_images]
    tasks = {"batch1_ms": lambda b: b._run(x1), "batch16": lambda b: b._run(x16),
             "predict": lambda b: b.predict(files, batch_size=16)}
    reps = {"batch1_ms": 10, "batch16": 2, "predict": 1}
    for b in backends.values():  # warm-up: first-call allocation, OpenVINO's shape compilation
        for name, task in tasks.items():
            task(b)
    times = {(k, n): [] for k in backends for n in tasks}
    for _ in range(a.rounds):
        for n, task in tasks.items():
            for k, b in backends.items():
                times[(k, n)].append(_time(lambda: task(b), reps[n]))
    info = {"date": dt.datetime.now().isoformat(timespec="minutes"),
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "threads": a.threads, "torch": torch.__version__,
            "image_size": cfg.image_size, "flip_average": cfg.flip_average, "aspect": cfg.aspect,
            "predict_images": len(files), "rounds": a.rounds}
    try:
        import openvino
        import onnxruntime
        info.update(openvino=openvino.__version__.split("-")[0], onnxruntime=onnxruntime.__version__)
    except ImportError:
        pass
    print(json.dumps({"kind": "conditions", **info}), flush=True)
    rows = []
    for k in backends:
        b1 = statistics.median(times[(k, "batch1_ms")]) * 1000
        b16 = 16 / statistics.median(times[(k, "batch16")])
        pr = len(files) / statistics.median(times[(k, "predict")])
        rows.append((k, b1, b16, pr))
        print(json.dumps({"kind": "speed", "backend": k, "ms_per_image_batch1": round(b1, 2),
                          "images_per_s_batch16": round(b16, 1), "predict_images_per_s": round(pr, 2)}), flush=True)
    ref = dict((r[0], r) for r in rows)["pytorch"]
    print("\n| backend | ms/image, batch 1 | images/s, batch 16 | `predict()` images/s | batch 16 vs PyTorch |")
    print("|---|---|---|---|---|")
    for k, b1, b16, pr in rows:
        print(f"| {k} | {b1:.1f} | {b16:.1f} | {pr:.2f} | {b16 / ref[2]:.2f}x |")


if __name__ == "__main__":
    main()
