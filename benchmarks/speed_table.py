"""Markdown tables from the JSON lines of benchmarks/speed.py (for docs/PERFORMANCE.md).

    PYTHONPATH=src python benchmarks/speed.py > speed.jsonl
    python benchmarks/speed_table.py speed.jsonl
"""
import json
import sys


def g(v):
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
    out += ["| " + " | ".join(g(r.get(k)) if not callable(k) else g(k(r)) for _, k in cols) + " |" for r in rows]
    return "\n".join(out)


def main(path):
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
        print(f"Machine limit (best fp32 matmul of the run): {g(s.get('matmul_flops_per_s'))}FLOP/s\n")
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


if __name__ == "__main__":
    main(sys.argv[1])
