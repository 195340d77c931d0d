"""Speed benchmarks: one run, one machine, figures as JSON lines on stdout.

    PYTHONPATH=src python benchmarks/speed.py                 # everything (long on a CPU)
    PYTHONPATH=src python benchmarks/speed.py --quick         # smaller sizes, fewer repeats
    PYTHONPATH=src python benchmarks/speed.py --only inference,tiling --presets cpu
    python benchmarks/speed.py --table speed.jsonl            # a saved run as Markdown tables

Parts (each measured in its own subprocess so that peak memory is per measurement):
  matmul     the machine's limit: fp32 FLOP/s of a large matrix product on all cores (first and
             last, the summary takes the better: other load on a shared machine lowers it)
  train      training images/s, achieved FLOP/s (FlopCounterMode over one training step of
             GRDNetModule), peak RSS; synthetic defects and augmentation time per batch
  inference  ms/image at batch 1 and images/s at batch B, PyTorch eager and ONNX Runtime,
             achieved FLOP/s, and end-to-end `predict()` on uint8 images
  tiling     a large image scored as tiles vs resized whole, and the stitching overhead
  variants   inference-path options at one preset: channels-last, conv+BN folding, torch.compile,
             ONNX Runtime
The last line ("kind": "summary") sets the ratios against the targets side by side.
`--profile` adds the top operators (torch.profiler; ONNX Runtime's own profiler) per part.
`--device cuda --precision bf16-mixed` measures on a GPU (see benchmarks/gpu.sh).
`--table FILE.jsonl` measures nothing: it prints a saved run's JSON lines as Markdown tables
(for docs/PERFORMANCE.md).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

PARTS = ("matmul", "train", "inference", "tiling", "variants")


def emit(kind: str, **fields):
    print(json.dumps({"kind": kind, **fields}, default=lambda v: round(v, 6) if isinstance(v, float) else str(v)),
          flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, reps: int, warmup: int = 1, device: str = "cpu") -> list[float]:
    """Seconds per call, `reps` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t)
    return out


def stats(ts: list[float]) -> dict:
    return {"best_s": min(ts), "median_s": statistics.median(ts), "reps": len(ts)}


def machine_info() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"date": dt.datetime.now().isoformat(timespec="seconds"), "host": platform.node(), "cpu": cpu,
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "loadavg": os.getloadavg(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------------------------------------- parts


def part_matmul(a):
    import torch

    n = 2048 if a.quick else 4096
    dev = a.device
    torch.backends.cuda.matmul.allow_tf32 = False
    dtypes = [torch.float32] + ([torch.bfloat16] if dev.startswith("cuda") else [])
    for dtype in dtypes:
        x, y = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
        ts = timeit(lambda: torch.mm(x, y), reps=5 if a.quick else 10, warmup=2, device=dev)
        emit("matmul", n=n, dtype=str(dtype).replace("torch.", ""), threads=torch.get_num_threads(),
             flops_per_s=2 * n ** 3 / min(ts), **stats(ts))


def _model_cfgs(preset: str, batch: int | None, model: str | None = None):
    from grdnet.config import build_config

    m, t = build_config(preset, model=json.loads(model) if model else None)
    if batch:
        t.batch_size = batch
    return m, t


def part_train(a, preset: str):
    import lightning as L
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from grdnet.engine import resolve_precision, use_cpu_layout
    from grdnet.training import GRDNetModule

    m, t = _model_cfgs(preset, a.train_batch or (2 if a.quick and preset == "paper" else None))
    accelerator = "cpu" if a.device == "cpu" else "gpu"
    precision = resolve_precision(a.precision, accelerator)  # grdnet train's default
    warmup, steps = (1, 2) if a.quick else (2, 6)
    if preset == "paper" and a.device == "cpu":
        steps = 1 if a.quick else 3
    elif a.device.startswith("cuda"):
        warmup, steps = (2, 5) if a.quick else (5, 30)
    b, s, c = t.batch_size, m.image_size, m.channels
    data = torch.rand((warmup + 1 + steps) * b, c + 1, s, s)
    data[:, c] = 1.0  # ROI channel: everything
    loader = torch.utils.data.DataLoader(data, batch_size=b, shuffle=False, drop_last=True)

    class Clock(L.Callback):
        """Times every step; counts FLOPs on the step just before the timed ones."""

        def __init__(self):
            self.times, self.flops, self.counter, self.t0 = [], None, None, 0.0

        def on_train_batch_start(self, trainer, module, batch, idx):
            if idx == warmup:
                self.counter = FlopCounterMode(display=False)
                self.counter.__enter__()
            _sync(a.device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, idx):
            _sync(a.device)
            dt_ = time.perf_counter() - self.t0
            if idx == warmup:
                self.counter.__exit__(None, None, None)
                self.flops = self.counter.get_total_flops()
            elif idx > warmup:
                self.times.append(dt_)

    torch.manual_seed(0)
    module = GRDNetModule(m, t)
    use_cpu_layout(module, accelerator)  # as `grdnet train` does
    clock = Clock()
    trainer = L.Trainer(accelerator="cpu" if a.device == "cpu" else "gpu", devices=1,
                        precision=precision, max_epochs=1, logger=False,  # one epoch = the batches above
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[clock])
    trainer.fit(module, loader)
    step = statistics.median(clock.times)
    fields = dict(preset=preset, image_size=s, batch=b, precision=precision,
                  images_per_s=b / step, step_s=step, best_step_s=min(clock.times), steps=len(clock.times),
                  flops_per_step=clock.flops, flops_per_s=clock.flops / step)

    # Synthetic defects and augmentation alone, on the same batch, as fractions of a step.
    dev = module.device
    x = torch.rand(b, c, s, s, device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    d = timeit(lambda: module.defects(x, gen), reps=5 if a.quick else 20, warmup=2, device=a.device)
    xa = torch.rand(b, c + 1, s, s, device=dev)
    aug = timeit(lambda: module.augment(xa), reps=5 if a.quick else 20, warmup=2, device=a.device)
    fields.update(defects_s=statistics.median(d), defects_fraction=statistics.median(d) / step,
                  augment_s=statistics.median(aug), augment_fraction=statistics.median(aug) / step)
    fields["peak_rss_mb"] = peak_rss_mb()
    if a.device.startswith("cuda"):
        fields["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    emit("train", **fields)

    if a.profile:
        # Two more steps of the same module under the profiler (a fresh fit: new optimiser state).
        with torch.profiler.profile(activities=_activities(a.device)) as prof:
            L.Trainer(accelerator="cpu" if a.device == "cpu" else "gpu", devices=1,
                      precision=precision, max_epochs=1, limit_train_batches=2, logger=False,
                      enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False).fit(module, loader)
        _emit_profile(prof, f"train/{preset}", a.device)


def _activities(device: str):
    import torch

    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def _emit_profile(prof, where: str, device: str, top: int = 15):
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1.0
    emit("profile", where=where, by=key, ops=[
        {"op": e.key, "share": getattr(e, key) / total, "ms": getattr(e, key) / 1000, "calls": e.count}
        for e in events[:top]])


def _ort_profile(onnx_file: Path, x, where: str, reps: int, top: int = 12):
    """ONNX Runtime's own profiler: time per operator type."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / "grdnet_ort_profile")
    sess = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
    for _ in range(reps):
        sess.run(None, {"image": x})
    trace_file = Path(sess.end_profiling())
    trace = json.loads(trace_file.read_text())
    trace_file.unlink()
    by_op: dict[str, float] = {}
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + ev.get("dur", 0)
    total = sum(by_op.values()) or 1.0
    emit("profile", where=where, by="onnxruntime kernel time", ops=[
        {"op": k, "share": v / total, "ms": v / 1000 / reps} for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]])


def _inference_model(a, preset: str, folder: Path, onnx: bool):
    """A randomly initialised model at a preset, saved as a model folder (and exported)."""
    import torch

    from grdnet.modelfile import save_model
    from grdnet.model import GRDNet

    m, _ = _model_cfgs(preset, None, a.model)
    torch.manual_seed(0)
    model_dir = save_model(folder / f"model-{preset}", GRDNet(m), m, {"threshold": 0.5})
    onnx_file = None
    if onnx:
        from grdnet.export import export_onnx

        t = time.perf_counter()
        onnx_file = export_onnx(model_dir)
        emit("export", preset=preset, seconds=time.perf_counter() - t, mb=onnx_file.stat().st_size / 2 ** 20)
    return model_dir, onnx_file, m


def _forward_flops(net, x) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        net(x)
    return fc.get_total_flops()


def part_inference(a, preset: str):
    import numpy as np
    import torch

    import grdnet
    from grdnet.export import OnnxPredictor

    use_onnx = a.device == "cpu" and not a.no_onnx
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, onnx_file, m = _inference_model(a, preset, Path(tmp), use_onnx)
        torch_p = grdnet.Predictor.load(model_dir, device=a.device)
        s, c, big_b = m.image_size, m.channels, a.infer_batch
        flops_per_image = _forward_flops(torch_p.net, torch.rand(1, c, s, s, device=a.device))
        reps1 = 5 if a.quick else 30
        repsb = 2 if a.quick else 8
        if preset == "paper" and a.device == "cpu":
            reps1, repsb = (2, 1) if a.quick else (8, 3)
        backends = {"torch": torch_p}
        if use_onnx:
            backends["onnxruntime"] = OnnxPredictor.load(onnx_file)
        autocast = a.precision and "bf16" in a.precision and a.device.startswith("cuda")
        for name, p in backends.items():
            def run(b, p=p, name=name):
                x = torch.rand(b, c, s, s, device=a.device if name == "torch" else "cpu")
                if autocast and name == "torch":
                    def f():
                        with torch.autocast("cuda", dtype=torch.bfloat16):
                            return p.maps(x)
                    return f
                return lambda: p.maps(x)
            t1 = timeit(run(1), reps=reps1, warmup=2, device=a.device)
            tb = timeit(run(big_b), reps=repsb, warmup=1, device=a.device)
            rng = np.random.default_rng(0)
            images = [rng.integers(0, 256, (s, s, 3), dtype=np.uint8) for _ in range(big_b)]
            te = timeit(lambda: p.predict(images, batch_size=big_b), reps=repsb, warmup=1, device=a.device)
            ips = big_b / statistics.median(tb)
            emit("inference", preset=preset, backend=name, device=a.device, image_size=s,
                 bf16_autocast=bool(autocast and name == "torch"),
                 ms_per_image_b1=1000 * statistics.median(t1), best_ms_b1=1000 * min(t1),
                 batch=big_b, images_per_s=ips, best_images_per_s=big_b / min(tb),
                 flops_per_image=flops_per_image, flops_per_s=flops_per_image * ips,
                 flops_per_s_b1=flops_per_image / statistics.median(t1),
                 predict_images_per_s=big_b / statistics.median(te), peak_rss_mb=peak_rss_mb())
        if a.profile:
            x = torch.rand(big_b, c, s, s, device=a.device)
            with torch.profiler.profile(activities=_activities(a.device)) as prof, torch.inference_mode():
                for _ in range(2):
                    torch_p.net(x)
            _emit_profile(prof, f"inference/torch/{preset}", a.device)
            if use_onnx:
                _ort_profile(onnx_file, x.cpu().numpy(), f"inference/onnxruntime/{preset}", reps=2)


def part_tiling(a, preset: str):
    import numpy as np
    import torch

    import grdnet
    from grdnet.export import OnnxPredictor
    from grdnet.scoring import tile_starts

    side = 512 if a.quick else 1024
    use_onnx = a.device == "cpu" and not a.no_onnx
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, onnx_file, m = _inference_model(a, preset, Path(tmp), use_onnx)
        backends = {"torch": grdnet.Predictor.load(model_dir, device=a.device)}
        if use_onnx:
            backends["onnxruntime"] = OnnxPredictor.load(onnx_file)
        s = m.image_size
        img = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
        n_tiles = len(tile_starts(side, s, 0.25)) ** 2
        reps = 2 if a.quick else 5
        for name, p in backends.items():
            tiled = timeit(lambda: p.predict(img, tile=True, batch_size=a.infer_batch), reps=reps, device=a.device)
            whole = timeit(lambda: p.predict(img, tile=False), reps=reps, device=a.device)
            x = torch.rand(a.infer_batch, m.channels, s, s)
            net = timeit(lambda: p.maps(x), reps=reps, device=a.device)
            net_only = n_tiles * statistics.median(net) / a.infer_batch
            emit("tiling", preset=preset, backend=name, image=f"{side}x{side}", tiles=n_tiles, overlap=0.25,
                 tiled_ms=1000 * statistics.median(tiled), whole_resized_ms=1000 * statistics.median(whole),
                 network_ms_for_tiles=1000 * net_only,
                 overhead_fraction=(statistics.median(tiled) - net_only) / statistics.median(tiled),
                 tiled_vs_whole=statistics.median(tiled) / statistics.median(whole), peak_rss_mb=peak_rss_mb())


def part_variants(a, preset: str):
    """Inference-path options on one preset, measured interleaved so load changes hit all alike."""
    import copy

    import torch

    from grdnet.export import OnnxPredictor

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, onnx_file, m = _inference_model(a, preset, Path(tmp), onnx=not a.no_onnx)
        from grdnet.modelfile import load_model
        from grdnet.scoring import cpu_inference_net

        base = load_model(model_dir)[0]
        s, c = m.image_size, m.channels
        for b in (1, a.infer_batch):
            x = torch.rand(b, c, s, s)
            xcl = x.contiguous(memory_format=torch.channels_last)
            nets = {"eager": (base, x),
                    "channels_last": (copy.deepcopy(base).to(memory_format=torch.channels_last), xcl),
                    "channels_last+fold_batch_norms": (cpu_inference_net(base), xcl)}  # what Predictor runs
            if not a.no_compile:
                for name, freeze in (("compile", False), ("compile_freezing", True)):
                    import torch._inductor.config as inductor_config

                    inductor_config.freezing = freeze
                    torch._dynamo.reset()
                    compiled = torch.compile(copy.deepcopy(base))
                    t = time.perf_counter()
                    try:
                        with torch.inference_mode():
                            compiled(x)
                    except Exception as e:  # no C++ compiler, unsupported platform, ...
                        emit("variant_error", variant=name, error=str(e).splitlines()[0][:200])
                        continue
                    emit("compile", variant=name, batch=b, seconds=time.perf_counter() - t)
                    nets[name] = (compiled, x)
            runners = {k: (lambda f=f, inp=inp: f(inp)) for k, (f, inp) in nets.items()}
            if onnx_file is not None:
                sess = OnnxPredictor.load(onnx_file)
                runners["onnxruntime"] = lambda: sess.maps(x)
            times = {k: [] for k in runners}
            with torch.inference_mode():
                for k, f in runners.items():
                    f()
                for _ in range(3 if a.quick else 10):
                    for k, f in runners.items():
                        t = time.perf_counter()
                        f()
                        times[k].append(time.perf_counter() - t)
            ref = statistics.median(times["eager"])
            for k, ts in times.items():
                emit("variant", preset=preset, variant=k, batch=b, images_per_s=b / statistics.median(ts),
                     best_images_per_s=b / min(ts), speedup_vs_eager=ref / statistics.median(ts))


# ---------------------------------------------------------------------------------------------- tables


def fmt(v):
    """Readable number: 3 significant digits, SI suffix for large values."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, (int, float)):
        for div, suffix in ((1e12, " T"), (1e9, " G"), (1e6, " M")):
            if abs(v) >= div:
                return f"{v / div:.3g}{suffix}"
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def table(rows, cols):
    out = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r.get(k)) if not callable(k) else fmt(k(r)) for _, k in cols) + " |" for r in rows]
    return "\n".join(out)


def print_tables(path):
    recs = [json.loads(line) for line in open(path) if line.startswith("{")]
    kind = lambda k: [r for r in recs if r["kind"] == k]  # noqa: E731
    m = kind("machine")[0]
    end = (kind("machine_end") or [{}])[0]
    print(f"Run {m['date']} on `{m['host']}`: {m['cpu']}, {m['cpus']} CPUs, torch {m['torch']} "
          f"({m['torch_threads']} threads), onnxruntime {m.get('onnxruntime', '–')}, OMP_WAIT_POLICY "
          f"{m.get('omp_wait_policy', 'default')}; load average {m['loadavg'][0]:.1f} at the start, "
          f"{end.get('loadavg', [float('nan')])[0]:.1f} at the end.\n\nCommand: `{m['command']}`\n")
    s = (kind("summary") or [{}])[0]
    targets = [dict(name=k, **v) for k, v in s.items() if isinstance(v, dict)]
    if targets:
        print(f"Machine limit (best fp32 matmul of the run): {fmt(s.get('matmul_flops_per_s'))}FLOP/s\n")
        print(table(targets, [("ratio", "name"), ("measured", "value"), ("target", "target"), ("met", "met")]) + "\n")
    if kind("matmul"):
        print(table(kind("matmul"), [("matmul n", "n"), ("dtype", "dtype"), ("threads", "threads"),
                                     ("FLOP/s", "flops_per_s")]) + "\n")
    if kind("train"):
        print(table(kind("train"), [("train preset", "preset"), ("px", "image_size"), ("batch", "batch"),
                                    ("precision", "precision"), ("images/s", "images_per_s"), ("s/step", "step_s"),
                                    ("FLOP/step", "flops_per_step"), ("FLOP/s", "flops_per_s"),
                                    ("defects s", "defects_s"), ("defects/step", "defects_fraction"),
                                    ("augment/step", "augment_fraction"), ("peak RSS MB", "peak_rss_mb")]) + "\n")
    if kind("inference"):
        print(table(kind("inference"), [("inference preset", "preset"), ("backend", "backend"), ("px", "image_size"),
                                        ("ms/image b1", "ms_per_image_b1"), ("batch", "batch"),
                                        ("images/s", "images_per_s"), ("predict() images/s", "predict_images_per_s"),
                                        ("FLOP/image", "flops_per_image"), ("FLOP/s", "flops_per_s"),
                                        ("peak RSS MB", "peak_rss_mb")]) + "\n")
    if kind("tiling"):
        print(table(kind("tiling"), [("tiling", "backend"), ("image", "image"), ("tiles", "tiles"),
                                     ("tiled ms", "tiled_ms"), ("resized ms", "whole_resized_ms"),
                                     ("network ms", "network_ms_for_tiles"), ("overhead", "overhead_fraction")]) + "\n")
    if kind("variant"):
        compile_s = {(r["variant"], r["batch"]): r["seconds"] for r in kind("compile")}
        print(table(kind("variant"), [("variant", "variant"), ("batch", "batch"), ("images/s", "images_per_s"),
                                      ("vs eager", "speedup_vs_eager"),
                                      ("compile s", lambda r: compile_s.get((r["variant"], r["batch"])))]) + "\n")
    for p in kind("profile"):
        print(f"Profile `{p['where']}` ({p['by']}): " +
              ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in p["ops"][:8]) + "\n")



# ---------------------------------------------------------------------------------------------- driver


def worker(a):
    import torch

    warnings.filterwarnings("ignore")
    os.environ.setdefault("LITLOGGER_DISABLE", "1")
    import logging

    logging.disable(logging.WARNING)
    if a.threads:
        torch.set_num_threads(a.threads)
    fn = {"matmul": part_matmul, "train": part_train, "inference": part_inference, "tiling": part_tiling,
          "variants": part_variants}[a.worker]
    fn(a) if a.worker == "matmul" else fn(a, a.preset)


def summary(records: list[dict]):
    """Ratios in this run against the targets (set for a 2-core CPU)."""
    def find(kind, **kw):
        return next((r for r in records if r["kind"] == kind and all(r.get(k) == v for k, v in kw.items())), None)

    mms = [r for r in records if r["kind"] == "matmul" and r["dtype"] == "float32"]
    mm = max(mms, key=lambda r: r["flops_per_s"]) if mms else None
    out = {"matmul_flops_per_s": mm["flops_per_s"]} if mm else {}
    tr = find("train", preset="cpu")
    if tr:
        out["defects_fraction_of_train_step"] = {"value": tr["defects_fraction"], "target": "<= 0.10",
                                                 "met": tr["defects_fraction"] <= 0.10}
    if mm:
        peak = mm["flops_per_s"]
        ort_ = find("inference", preset="cpu", backend="onnxruntime")
        if ort_:
            v = ort_["flops_per_s"] / peak
            out["onnxruntime_inference_cpu_vs_matmul"] = {"value": v, "target": ">= 0.50", "met": v >= 0.5}
        if tr:
            v = tr["flops_per_s"] / peak
            out["training_cpu_vs_matmul"] = {"value": v, "target": ">= 0.35", "met": v >= 0.35}
    emit("summary", **out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(PARTS[:4]),
                   help=f"comma-separated parts: {', '.join(PARTS)} (default: all but variants)")
    p.add_argument("--presets", default="cpu,paper", help="presets for train/inference (default: cpu,paper)")
    p.add_argument("--variants-preset", default="cpu", help="preset for the variants part")
    p.add_argument("--tiling-preset", default="cpu")
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (checks the script)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--precision", help="training precision (Lightning); default: grdnet train's (fp32, or "
                                       "bf16-mixed on CPUs with native bf16); bf16 also turns on autocast "
                                       "for GPU inference")
    p.add_argument("--train-batch", type=int, help="training batch (default: the preset's)")
    p.add_argument("--infer-batch", type=int, default=16)
    p.add_argument("--model", help='inference: ModelConfig overrides as JSON, e.g. \'{"flip_average": false}\'')
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, = physical cores)")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--no-compile", action="store_true", help="variants: skip torch.compile")
    p.add_argument("--profile", action="store_true", help="also print the top operators per part")
    p.add_argument("--table", metavar="FILE.jsonl", help="print a saved run as Markdown tables; measure nothing")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.table:
        return print_tables(a.table)
    if a.worker:
        return worker(a)

    parts = [x for x in a.only.split(",") if x]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    jobs = []
    for part in PARTS:
        if part not in parts:
            continue
        if part == "matmul":
            jobs.append((part, None))
        elif part == "variants":
            jobs.append((part, a.variants_preset))
        elif part == "tiling":
            jobs.append((part, a.tiling_preset))
        else:
            jobs.extend((part, preset) for preset in a.presets.split(","))
    if "matmul" in parts:  # again at the end: on a shared machine the limit is the better of the two
        jobs.append(("matmul", None))
    emit("machine", **machine_info(), command=" ".join([Path(sys.executable).name] + sys.argv))
    passthrough = [x for x in (sys.argv[1:] if argv is None else argv)]
    records = []
    for part, preset in jobs:
        cmd = [sys.executable, __file__, *passthrough, "--worker", part] + (["--preset", preset] if preset else [])
        t = time.perf_counter()
        res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        for line in res.stdout.splitlines():
            try:
                records.append(json.loads(line))
                print(line, flush=True)
            except json.JSONDecodeError:  # library chatter (profiler banners): keep stdout JSON only
                print(line, file=sys.stderr, flush=True)
        if res.returncode != 0:
            emit("error", part=part, preset=preset, returncode=res.returncode)
        emit("part_done", part=part, preset=preset, seconds=time.perf_counter() - t)
    summary(records)
    emit("machine_end", loadavg=os.getloadavg(), date=dt.datetime.now().isoformat(timespec="seconds"))


if __name__ == "__main__":
    main()
