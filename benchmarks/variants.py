"""Try a training variant that is not (yet) a package option, then evaluate the model at one and
at two scales (a model whose `ModelConfig.aspect` is not "squeeze": `grdnet test`'s figures only).
An experiment harness for docs/EXPERIMENTS.md: a variant that pays off becomes a `TrainConfig`
option; one that does not stays here, so that the recorded run can be repeated.

    python benchmarks/variants.py ../shared/data/magnetic_tile --out /tmp/v/zoom --variant zoom \
        --max-minutes 20 [--config overrides.json]
    python benchmarks/variants.py ../shared/data/magnetic_tile --evaluate /tmp/run/model [--variant noxhat]

Variants (default: none, the preset as it is):
- `zoom`: half the training images are seen whole (as always), half as a random model-size crop of
  the image resized to twice the model size: the model learns the surface at 2x detail too.
- `selfscale`: the `self` anomaly source takes the other image's texture magnified 1-3x (and
  transposed for 30% of samples): a patch whose texture has another scale or direction.
- `jitter`: brightness and contrast of each whole training image scaled by e**U(-0.3, 0.3) each
  (lighting changes are normal).
- `blur`: a share of the anomaly sources (`--blur-share`, default a quarter) replaced by the image
  itself, Gaussian-blurred (sigma uniform in `--blur-sigma`, default 1-3 px): the texture gone,
  the tone kept (a worn, polished or smeared patch).
- `strokeblur`: the same blurred source, but only inside stroke masks (`TrainConfig.line_masks`),
  for `--blur-share` of them: a thin line whose texture is smoothed away, never a smooth blob.
- `grain`: a share of the anomaly sources (`--grain-share`, default a quarter) replaced by the
  image with its fine texture amplified or damped (gain in `--grain-gain`, default 1.5-4), the
  local tone kept: a patch ground or polished differently (streaks stronger or fainter).
- `selfshade`: the `self` source also darkened or brightened by e**U(-g, g) (`--self-log-gain`,
  default 0.5): another finish at another tone, as a region ground differently is.
- `mixaspect`: a share of the training samples (`--aspect-share`, default half) are random
  model-size crops of the image resized with its aspect ratio kept (shorter side = model size),
  the rest the whole image squeezed as usual: both views that `aspect` "both" scores, in training.
- `poolgan`: with `ModelConfig.unshuffle` f > 1, only the segmenter pixel-unshuffles its input; the
  generator and the discriminator see the image average-pooled by f (the GAN at image_size / f, as
  a model of that size would be) and the generator's output is upsampled back: the GAN of the
  smaller model, the segmenter with every pixel of the larger one.
- `noxhat`: the segmenter is shown the input in place of the reconstruction (`(x, x)` instead of
  `(x_hat, x)`), in training and at inference: does the map lean on a reconstruction that undoes
  synthetic defects but not real ones?
- `detach`: the segmenter sees the reconstruction as usual, but its loss does not reach the
  generator (`x_hat.detach()`): is it the input or the gradient that `noxhat` takes away?
- `segonly`: `noxhat` without the GAN's cost, as run 78 did it: the package's model without the GAN
  (`ModelConfig.gan` False, forced by this variant), but its segmenter shown `(x, x)` with 2C input
  channels, as a GAN model's segmenter is, instead of `x` alone. (Run 78's code built the unused
  GAN networks first, so its initial segmenter weights were other draws of the same seed.)
- `halfplane`: half of the band masks are half-planes instead (the region on one side of a
  straight line, up to half the image): a region of another finish that reaches the part's edge.

Evaluation prints image / pixel AUROC / AUPRO for four maps: `whole` (the model's own map),
`zoom` (the image resized to twice the model size, scored as overlapping tiles), and their
pixel-wise `mean` and `max`, at twice the model resolution (image score: the model's box-filter
rule on the map pooled back to model resolution).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import grdnet
import grdnet.defects
import grdnet.training
from grdnet.config import file_section
from grdnet.data import image_size_of, load_image, load_mask, resize_to, test_samples
from grdnet.evaluation import run_test
from grdnet.metrics import evaluate
from grdnet.scoring import image_scores, resize_map


def use_zoom() -> None:
    class ZoomDataset(grdnet.training.ImageDataset):
        def __init__(self, paths, channels, size, rois=None, crop=False, keep_aspect=False):
            if rois is not None or crop or keep_aspect:
                raise SystemExit("the zoom variant supports neither ROIs nor train_crops nor aspect 'keep'")
            self.paths, self.size = list(paths), size
            self.cache = [(load_image(p, channels, 2 * size) * 255).round().to(torch.uint8) for p in self.paths]

        def __getitem__(self, i):
            big, s = self.cache[i].float() / 255.0, self.size
            if float(torch.rand(())) < 0.5:
                img = F.avg_pool2d(big[None], 2)[0]
            else:
                y, x = (int(v) for v in torch.randint(s + 1, (2,)))
                img = big[:, y:y + s, x:x + s]
            return torch.cat([img, torch.ones(1, s, s)])

    grdnet.training.ImageDataset = ZoomDataset


def use_mixed_aspect(share: float) -> None:
    class MixedAspectDataset(grdnet.training.ImageDataset):
        """A `share` of samples a random model-size crop of the aspect-kept image (shorter side =
        model size), the rest the whole image squeezed into the square, as usual."""

        def __init__(self, paths, channels, size, rois=None, crop=False, keep_aspect=False):
            if rois is not None or crop or keep_aspect:
                raise SystemExit("the mixaspect variant supports neither ROIs nor train_crops nor aspect 'keep'")
            super().__init__(paths, channels, size, keep_aspect=True)

        def __getitem__(self, i):
            item = super().__getitem__(i)  # a random crop of the aspect-kept image
            if float(torch.rand(())) >= share:
                s = self.size
                img = (self.cache[i] if self.cache is not None else self._decode(i))[:-1].float() / 255.0
                item = torch.cat([resize_to(img, (s, s)), torch.ones(1, s, s)])
            return item

    grdnet.training.ImageDataset = MixedAspectDataset


def use_selfscale() -> None:
    def self_source(self, x, gen=None):
        b, _, size, _ = x.shape
        other = x[torch.randperm(b, generator=gen, device=x.device)] if b > 1 else x
        zoom = float(torch.empty(()).uniform_(1.0, 3.0, generator=gen))
        w = max(4, int(round(size / zoom)))
        y0, x0 = (int(v) for v in torch.randint(size - w + 1, (2,), generator=gen))
        o = F.interpolate(other[:, :, y0:y0 + w, x0:x0 + w], size=(size, size), mode="bilinear", align_corners=False)
        if bool(torch.rand(1, generator=gen) < 0.3):
            o = o.transpose(-1, -2)
        dy, dx = (int(v) for v in torch.randint(size // 4, 3 * size // 4, (2,), generator=gen))
        return torch.roll(o, (dy, dx), dims=(-2, -1))

    grdnet.defects.DefectSynthesizer._self_source = self_source


def use_jitter() -> None:
    geometric = grdnet.training.GRDNetModule._augment

    def augment(self, batch, batch_idx):
        b = geometric(self, batch, batch_idx)
        c, n = self.model_cfg.channels, len(batch)
        g = torch.Generator().manual_seed(self._step_seed(batch_idx, 7))
        x = b[:, :c]
        gain, contrast = torch.exp(torch.empty(2, n, 1, 1, 1).uniform_(-0.3, 0.3, generator=g))
        mean = x.mean((1, 2, 3), keepdim=True)
        return torch.cat([((mean + (x - mean) * contrast) * gain).clamp(0, 1), b[:, c:]], 1)

    grdnet.training.GRDNetModule._augment = augment


def _blurred(x, sigma_range: tuple[float, float], gen=None):
    """The batch Gaussian-blurred with one sigma drawn uniformly from `sigma_range` (pixels)."""
    import kornia

    sigma = float(torch.empty(()).uniform_(*sigma_range, generator=gen))
    k = 2 * int(3 * sigma) + 1
    return kornia.filters.gaussian_blur2d(x.float(), (k, k), (sigma, sigma), border_type="reflect")


def use_blur(share: float = 0.25, sigma_range: tuple[float, float] = (1.0, 3.0)) -> None:
    """A fourth anomaly source: the image itself blurred (texture gone, tone kept: worn, polished
    or smeared surface), for `share` of the samples, sigma uniform in `sigma_range` (pixels)."""
    three = grdnet.defects.DefectSynthesizer.sources

    def sources(self, x, gen=None):
        out = three(self, x, gen)
        blurred = _blurred(x, sigma_range, gen)  # before `pick`: the random order of runs 25-27
        pick = torch.rand(x.shape[0], generator=gen, device=x.device) < share
        out[pick] = blurred[pick].to(out.dtype)
        return out

    grdnet.defects.DefectSynthesizer.sources = sources


def use_grain(share: float, gain_range: tuple[float, float]) -> None:
    """A fourth anomaly source: the image with its fine texture (what a 1.5 px Gaussian removes)
    scaled by a gain e**U(log(gain_range)), the local tone kept: a patch ground, brushed or
    polished differently, whose streaks are stronger (gain > 1) or fainter (< 1) than around it.
    For `share` of the samples."""
    three = grdnet.defects.DefectSynthesizer.sources

    def sources(self, x, gen=None):
        out = three(self, x, gen)
        b = x.shape[0]
        base = _blurred(x, (1.5, 1.5), gen)
        lo, hi = (math.log(g) for g in gain_range)
        gain = torch.exp(torch.empty(b, 1, 1, 1, device=x.device).uniform_(lo, hi, generator=gen))
        grain = (base + gain * (x.float() - base)).clamp(0, 1)
        pick = torch.rand(b, generator=gen, device=x.device) < share
        out[pick] = grain[pick].to(out.dtype)
        return out

    grdnet.defects.DefectSynthesizer.sources = sources


def use_self_shade(log_gain: float) -> None:
    """The `self` source (another tile's texture, shifted) also darkened or brightened by a gain
    e**U(-log_gain, log_gain): material of another finish *and* tone, as a region ground
    differently is both (the plain `self` source pastes a similar finish at a similar tone)."""
    plain = grdnet.defects.DefectSynthesizer._self_source

    def self_source(self, x, gen=None):
        other = plain(self, x, gen)
        g = torch.empty(x.shape[0], 1, 1, 1, device=x.device).uniform_(-log_gain, log_gain, generator=gen)
        return (other * torch.exp(g)).clamp(0, 1)

    grdnet.defects.DefectSynthesizer._self_source = self_source


def use_stroke_blur(share: float, sigma_range: tuple[float, float]) -> None:
    """The blurred-image source only inside stroke masks, for `share` of the strokes: a thin line
    where the texture is smoothed away (cracks and scratches at low resolution), never a smooth
    blob, so that smooth good regions are not taught as defects."""
    masks, three = grdnet.defects.DefectSynthesizer.masks, grdnet.defects.DefectSynthesizer.sources

    def recording_masks(self, batch, size, gen=None, device=None):
        # masks() draws each sample's shape first; replay that draw to know which got strokes
        replay = None
        if gen is not None:
            replay = torch.Generator(device=gen.device)
            replay.set_state(gen.get_state())
        self._strokes = torch.rand(batch, generator=replay, device=device) < self.cfg.line_masks
        return masks(self, batch, size, gen, device)

    def sources(self, x, gen=None):
        out = three(self, x, gen)
        blurred = _blurred(x, sigma_range, gen)
        pick = self._strokes & (torch.rand(x.shape[0], generator=gen, device=x.device) < share)
        out[pick] = blurred[pick].to(out.dtype)
        return out

    grdnet.defects.DefectSynthesizer.masks = recording_masks
    grdnet.defects.DefectSynthesizer.sources = sources


def use_half_planes() -> None:
    """Half of the band masks become half-planes: everything on one side of a straight line, the
    smaller side (up to half the image), so that one border of the region is the image's own
    edge, as a region ground or coated differently reaches the edge of the part."""
    bands = grdnet.defects.band_masks

    def masks(batch, size, generator=None, device=None):
        out = bands(batch, size, generator, device)
        theta = torch.rand(batch, 1, 1, generator=generator, device=device) * math.pi
        point = torch.rand(batch, 2, 1, 1, generator=generator, device=device) * size
        coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5
        y, x = coords[None, :, None] - point[:, 0], coords[None, None, :] - point[:, 1]
        half = (y * torch.cos(theta) - x * torch.sin(theta) < 0).float()
        half = torch.where(half.mean((1, 2), keepdim=True) > 0.5, 1 - half, half)
        pick = torch.rand(batch, generator=generator, device=device) < 0.5
        out[pick] = half[pick]
        return out

    grdnet.defects.band_masks = masks


def use_pooled_gan() -> None:
    from grdnet.model import generator as gen_module
    encoder_init, decoder_init = gen_module.ResEncoder.__init__, gen_module.Decoder.__init__

    def encoder(self, channels, widths, latent_channels, unshuffle=1):
        encoder_init(self, channels, widths, latent_channels, 1)
        if unshuffle > 1:
            self.unshuffle = torch.nn.AvgPool2d(unshuffle)

    def decoder(self, channels, widths, latent_channels, unshuffle=1):
        decoder_init(self, channels, widths, latent_channels, 1)
        if unshuffle > 1:  # upsample the logits; the decoder's sigmoid follows
            self.out.append(torch.nn.Upsample(scale_factor=unshuffle, mode="bilinear", align_corners=False))

    gen_module.ResEncoder.__init__, gen_module.Decoder.__init__ = encoder, decoder


def use_segmenter_input(variant: str) -> None:
    """`noxhat`: the input in place of the reconstruction; `detach`: the reconstruction, no gradient."""
    from grdnet.model import Segmenter
    forward = Segmenter.forward
    if variant == "noxhat":
        Segmenter.forward = lambda self, x_hat, x: forward(self, x, x)
    else:
        Segmenter.forward = lambda self, x_hat, x: forward(self, x_hat.detach(), x)


def use_segmenter_only() -> None:
    """With `ModelConfig.gan` False: the segmenter built and fed as a GAN model's, on `(x, x)`."""
    from grdnet.model import Segmenter
    init = Segmenter.__init__
    Segmenter.__init__ = lambda self, cfg: init(self, dataclasses.replace(cfg, gan=True))
    use_segmenter_input("noxhat")


def two_scale_report(model, data) -> dict:
    p = grdnet.load(model)
    if p.cfg.aspect != "squeeze":  # its map is not one square view: only `grdnet test`'s own figures
        o = run_test(p, data)["metrics"]
        out = {"whole": {k: round(o[k], 3) for k in ("image_auroc", "pixel_auroc", "aupro")}}
        print(json.dumps({"map": "whole", **out["whole"]}), flush=True)
        return out
    s, c = p.cfg.image_size, p.cfg.channels
    samples = test_samples(data)
    whole, zoom = [], []
    for i in range(0, len(samples), 32):
        chunk = samples[i:i + 32]
        whole.append(p.maps(torch.stack([load_image(t.path, c, s) for t in chunk])))
        # the image at twice the model size, scored as overlapping model-size tiles
        big = [load_image(t.path, c, 2 * s).permute(1, 2, 0).numpy() for t in chunk]
        zoom += [torch.from_numpy(r.anomaly_map)[None] for r in p.predict(big, tile=True)]
    whole = F.interpolate(torch.cat(whole), size=(2 * s, 2 * s), mode="bilinear", align_corners=False)
    zoom = torch.stack(zoom)
    masks = [None if t.mask_path is None else load_mask(t.mask_path, image_size_of(t.path)) for t in samples]
    out = {}
    for name, maps in [("whole", whole), ("zoom", zoom), ("mean", (whole + zoom) / 2),
                       ("max", torch.maximum(whole, zoom))]:
        scores = image_scores(F.avg_pool2d(maps, 2), p.cfg)

        def records():
            for t, m, score, mask in zip(samples, maps, scores, masks):
                w, h = image_size_of(t.path)
                yield {"score": float(score), "label": t.label, "defect_type": t.defect_type,
                       "map": resize_map(m, (h, w)), "mask": np.zeros((h, w), bool) if mask is None else mask}

        r = evaluate(records())
        o = r["overall"]
        out[name] = {"image_auroc": round(o["image_auroc"], 3), "pixel_auroc": round(o["pixel_auroc"], 3),
                     "aupro": round(o["aupro"], 3),
                     "per_type_image_pixel": {k: [round(v["image_auroc"], 2), round(v["pixel_auroc"], 2)]
                                              for k, v in r["per_type"].items()}}
        print(json.dumps({"map": name, **out[name]}), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--out")
    ap.add_argument("--variant", default="none",
                    choices=["none", "zoom", "selfscale", "jitter", "blur", "strokeblur", "halfplane", "grain",
                             "selfshade", "mixaspect", "poolgan", "noxhat", "detach", "segonly"])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--max-minutes", type=float, default=20)
    ap.add_argument("--config", help="JSON file with model/train overrides")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blur-share", type=float, default=0.25)
    ap.add_argument("--blur-sigma", type=float, nargs=2, default=(1.0, 3.0))
    ap.add_argument("--grain-share", type=float, default=0.25)
    ap.add_argument("--grain-gain", type=float, nargs=2, default=(1.5, 4.0))
    ap.add_argument("--self-log-gain", type=float, default=0.5)
    ap.add_argument("--aspect-share", type=float, default=0.5)
    ap.add_argument("--evaluate", metavar="MODEL", help="only evaluate this model")
    a = ap.parse_args()
    # also with --evaluate: `poolgan` and `noxhat` change the networks the saved model is rebuilt into
    {"none": lambda: None, "zoom": use_zoom, "selfscale": use_selfscale, "jitter": use_jitter,
     "blur": lambda: use_blur(a.blur_share, tuple(a.blur_sigma)),
     "strokeblur": lambda: use_stroke_blur(a.blur_share, tuple(a.blur_sigma)),
     "halfplane": use_half_planes,
     "grain": lambda: use_grain(a.grain_share, tuple(a.grain_gain)),
     "selfshade": lambda: use_self_shade(a.self_log_gain),
     "mixaspect": lambda: use_mixed_aspect(a.aspect_share), "poolgan": use_pooled_gan,
     "noxhat": lambda: use_segmenter_input("noxhat"), "detach": lambda: use_segmenter_input("detach"),
     "segonly": use_segmenter_only}[a.variant]()
    model = a.evaluate
    if model is None:
        if not a.out:
            ap.error("--out is needed to train")
        t0 = time.time()
        model = grdnet.train(a.data, a.out, preset=a.preset, max_minutes=a.max_minutes,
                             model={**file_section(a.config, "model"), **({"gan": False} if a.variant == "segonly" else {})},
                             train={**file_section(a.config, "train"), "seed": a.seed}, progress=False)
        info = json.loads((model / "config.json").read_text())["training"]
        print(json.dumps({"variant": a.variant, "minutes": round((time.time() - t0) / 60, 1),
                          "epochs": info["epochs"], "steps": info["steps"], "precision": info["precision"]}),
              flush=True)
    two_scale_report(model, a.data)


if __name__ == "__main__":
    main()
