"""Other anomaly maps from one trained model, no retraining: is the heatmap the limit?

    python benchmarks/map_variants.py MODEL ../shared/data/magnetic_tile

Prints image AUROC, pixel AUROC and AUPRO (overall; image/pixel AUROC for each defect type) for:
- `model`: the model's own map (what `grdnet test` measures);
- `smooth S`: that map Gaussian-smoothed with sigma S model pixels for the pixel metrics, the
  image score still from the unsmoothed map (smoothing the heatmap is common practice);
- `residual S`: the generator's reconstruction error |X - X_hat|, smoothed with sigma S, as the map
  (and its image score);
- `fused W`: the segmenter's map plus W times the residual (sigma 2), each divided by its 99th
  percentile on every eighth good training image, so neither scale is chosen on the test split;
- `at 48 px`, `mean 64+48`, `max 64+48`, `mean 64+48+32` (for a 64 px model): the map of the
  image downscaled from the model size to 3/4 and 1/2 of it (resized back), alone and combined
  with the model-size map.
All views are flip-averaged as the model's own map is when its config says so.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d

from grdnet.data import load_image, load_mask, test_samples, train_images
from grdnet.metrics import evaluate
from grdnet.modelfile import load_model
from grdnet.scoring import image_scores, resize_map


def blur(m: torch.Tensor, sigma: float) -> torch.Tensor:
    k = int(2 * round(3 * sigma) + 1)
    return gaussian_blur2d(m, (k, k), (sigma, sigma), border_type="reflect")


def views(x: torch.Tensor, flip: bool) -> torch.Tensor:
    return torch.cat([x, x.flip(-1), x.flip(-2), x.flip(-2, -1)]) if flip else x


def unviews(t: torch.Tensor, b: int, flip: bool) -> torch.Tensor:
    if not flip:
        return t
    return (t[:b] + t[b:2 * b].flip(-1) + t[2 * b:3 * b].flip(-2) + t[3 * b:].flip(-2, -1)) / 4


@torch.no_grad()
def maps(net, cfg, paths, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Segmenter maps and reconstruction residuals (N, 1, S, S) of the images seen at `size`."""
    s, out_m, out_r = cfg.image_size, [], []
    for i in range(0, len(paths), 32):
        x = torch.stack([load_image(p, cfg.channels, s) for p in paths[i:i + 32]])
        if size != s:
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        v = views(x, cfg.flip_average)
        x_hat = net.decoder(net.encoder(v)).float()
        m = torch.softmax(net.segmenter(x_hat, v), 1)[:, 1:2].float()
        r = (v - x_hat).abs().mean(1, keepdim=True)
        m, r = unviews(m, len(x), cfg.flip_average), unviews(r, len(x), cfg.flip_average)
        if size != s:
            m, r = (F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False) for t in (m, r))
        out_m.append(m)
        out_r.append(r)
    return torch.cat(out_m), torch.cat(out_r)


def main():
    model, data = sys.argv[1], sys.argv[2]
    net, cfg, _ = load_model(model)
    if not cfg.gan:
        raise SystemExit(f"{model}: a model without the GAN has no reconstruction to compare its map with")
    samples = test_samples(data)
    masks = [load_mask(t.mask_path) if t.mask_path else None for t in samples]
    shapes = [m.shape if m is not None else tuple(load_image(t.path, 1, None).shape[-2:])
              for t, m in zip(samples, masks)]

    def report(name: str, pixel_maps: torch.Tensor, score_maps: torch.Tensor) -> None:
        scores = image_scores(score_maps, cfg).numpy()

        def records():
            for t, m, score, mask, hw in zip(samples, pixel_maps, scores, masks, shapes):
                yield {"score": float(score), "label": t.label, "defect_type": t.defect_type,
                       "map": resize_map(m, hw), "mask": np.zeros(hw, bool) if mask is None else mask}

        r = evaluate(records())
        o = r["overall"]
        print(json.dumps({"map": name, "image_auroc": round(o["image_auroc"], 3),
                          "pixel_auroc": round(o["pixel_auroc"], 3), "aupro": round(o["aupro"], 3),
                          "per_type_image_pixel": {k: [round(v["image_auroc"], 2), round(v["pixel_auroc"], 2)]
                                                   for k, v in r["per_type"].items()}}), flush=True)

    paths = [t.path for t in samples]
    m, r = maps(net, cfg, paths, cfg.image_size)
    good_m, good_r = maps(net, cfg, train_images(data)[::8], cfg.image_size)
    report("model", m, m)
    for s in (0.5, 1, 2, 3):
        report(f"smooth {s}", blur(m, s), m)
    for s in (1, 2):
        rs = blur(r, s) / torch.quantile(blur(good_r, s).flatten(), 0.99)
        report(f"residual {s}", rs, rs)
    rs = blur(r, 2) / torch.quantile(blur(good_r, 2).flatten(), 0.99)
    for w in (0.25, 0.5, 1.0):
        f = m / torch.quantile(good_m.flatten(), 0.99) + w * rs
        report(f"fused {w}", f, f)
    a, b = cfg.image_size, 3 * cfg.image_size // 4
    m_b, _ = maps(net, cfg, paths, b)
    m_c, _ = maps(net, cfg, paths, a // 2)
    report(f"at {b} px", m_b, m_b)
    for name, f in ((f"mean {a}+{b}", (m + m_b) / 2), (f"max {a}+{b}", torch.maximum(m, m_b)),
                    (f"mean {a}+{b}+{a // 2}", (m + m_b + m_c) / 3)):
        report(name, f, f)


if __name__ == "__main__":
    main()
