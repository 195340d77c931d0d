"""Datasets in the MVTec AD layout, image loading and validation.

A category folder holds `train/good/*`, `test/<type>/*` and `ground_truth/<type>/<stem>_mask.*`
(or `<stem>.*`). Images may be grayscale or RGB, of any size and any common format: the network
sees them resized to the model size, and maps are resized back to each image's own size.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import GRDNetError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
Image.MAX_IMAGE_PIXELS = 200_000_000  # refuse decompression bombs, allow large line-scan images


def list_images(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def open_image(path) -> Image.Image:
    """Decode an image fully, turning every decoding failure into a one-line user error."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return to_8bit(img)
    except FileNotFoundError:
        raise GRDNetError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise GRDNetError(f"{path}: not an image (unrecognised format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise GRDNetError(f"{path}: cannot decode image ({e})") from None


HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")  # one integer channel, more than 8 bits
_CAMERA_BITS = (8, 10, 12, 14, 16)


def to_8bit(img: Image.Image) -> Image.Image:
    """A decoded image with 8 bits per channel; images that already have them come back as a copy.

    Integer grayscale ("I;16*" and 32-bit "I") images are scaled by their bit depth, which the
    files do not declare (a 12-bit camera writes 16-bit PNGs and TIFFs), so it is inferred from
    the image's maximum: the smallest of 8, 10, 12, 14 and 16 bits that holds it, i.e. a maximum
    below 256 is 8-bit data (divided by 255), below 1024 10-bit (1023), below 4096 12-bit (4095),
    below 16384 14-bit (16383), else 16-bit (65535); a 32-bit "I" image above 65535 uses the bit
    count of its maximum. Values map linearly onto 0..255, rounded; negative values become 0.
    The image is not stretched to its own maximum: images from one camera share a depth and keep
    their relative brightness (only an image darker than the next smaller depth, e.g. a 12-bit
    image whose maximum is under 1024, is brightened).

    Float ("F") images whose values all lie in [0, 1] are normalised intensities, scaled by 255;
    other float images are kept as they are (their values, clipped to 0..255, are the 8-bit
    values, as Pillow converts them).
    """
    if img.mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        if a.size and a.max() <= 1.0:
            return Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8))
        return img.copy()
    if img.mode not in HIGH_BIT_DEPTH_MODES:
        return img.copy()
    a = np.asarray(img).astype(np.float64)
    top = int(a.max()) if a.size else 0
    bits = next((b for b in _CAMERA_BITS if top < 2 ** b), top.bit_length())
    return Image.fromarray(np.clip(a / (2 ** bits - 1) * 255.0 + 0.5, 0, 255).astype(np.uint8))


def pil_to_array(img: Image.Image, channels: int) -> np.ndarray:
    """uint8 (H, W, C) with the model's channel count."""
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):  # composite transparency onto black, as the camera would not see it
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img.convert("RGBA"))
    img = img.convert("L" if channels == 1 else "RGB")
    a = np.asarray(img, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


def array_to_tensor(a: np.ndarray, size: int | None) -> torch.Tensor:
    """(H, W, C) uint8 or float in [0, 1] -> (C, size, size) float in [0, 1]; `size=None` keeps
    the image's own size (tiles, crops)."""
    t = torch.from_numpy(np.array(a, copy=True))
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    t = t.permute(2, 0, 1).clamp(0, 1)
    return t if size is None else resize_to(t, (size, size))


def load_image(path, channels: int, size: int | None) -> torch.Tensor:
    return array_to_tensor(pil_to_array(open_image(path), channels), size)


def short_side_size(hw: tuple[int, int], short: int) -> tuple[int, int]:
    """(H, W) scaled so that the shorter side is `short`, aspect ratio kept."""
    h, w = hw
    f = short / min(h, w)
    return max(short, round(h * f)), max(short, round(w * f))


def resize_to(t: torch.Tensor, hw: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """(C, H, W) float -> (C, *hw); antialiased when shrinking an image, `mode="nearest"` for masks."""
    if tuple(t.shape[-2:]) == tuple(hw):
        return t
    if mode == "nearest":
        return F.interpolate(t[None], size=tuple(hw), mode="nearest")[0]
    return F.interpolate(t[None], size=tuple(hw), mode=mode, antialias=True, align_corners=False)[0].clamp(0, 1)


def load_mask(path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Binary mask (H, W) bool; `expected_size` is the image's (width, height)."""
    img = open_image(path)
    if expected_size is not None and img.size != tuple(expected_size):
        raise GRDNetError(f"{path}: mask is {img.size[0]}x{img.size[1]} but its image is "
                          f"{expected_size[0]}x{expected_size[1]}")
    return mask_from_image(img)


def mask_from_image(img: Image.Image) -> np.ndarray:
    """A decoded 8-bit mask image -> (H, W) bool: the rule of every mask and ROI file (also the
    service's ROI uploads)."""
    if img.mode == "P":  # palette masks (lossless): any non-black colour is defect, e.g. red index 1
        return np.asarray(img.convert("RGB")).max(axis=2) > 0
    # The brightest channel, not luminance, so that coloured masks (pure red, blue) are not lost.
    a = np.asarray(img.convert("RGB")).max(axis=2) if img.mode not in ("L", "1") else np.asarray(img.convert("L"))
    return a > 127 if a.max() > 1 else a > 0


def image_size_of(path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, UnidentifiedImageError) as e:
        raise GRDNetError(f"{path}: cannot read image ({e})") from None


# Resizing an image this many times larger than the model shrinks a defect to a third of its width
# or less: a crack a few pixels wide, or a board's small defects, fall below the score box.
CROP_FACTOR = 3.0


def choose_crops(paths: list[Path], size: int) -> tuple[bool, str]:
    """The `train_crops="auto"` rule: native-resolution crops (and tiled scoring) when the median
    shorter side of the training images is at least `CROP_FACTOR` times the model size, else whole
    images resized to it. Returns the choice and a line saying why."""
    short = float(np.median([min(image_size_of(p)) for p in paths]))
    factor = short / size
    crops = factor >= CROP_FACTOR
    how = f"native {size} px crops, tiled scoring" if crops else f"whole images resized to {size} px"
    return crops, (f"train_crops auto: {how} (the images' median shorter side is {short:g} px, {factor:.1f} times "
                   f"the model's; crops from {CROP_FACTOR:g} times)")


@dataclass
class TestSample:
    path: Path
    defect_type: str  # "good" or the test sub-folder name
    mask_path: Path | None

    @property
    def label(self) -> int:
        return 0 if self.defect_type == "good" else 1


def train_images(root) -> list[Path]:
    root = Path(root)
    folder = root / "train" / "good"
    if not folder.is_dir():
        raise GRDNetError(f"{root}: not a dataset in MVTec AD layout (no train/good folder)")
    paths = list_images(folder)
    if not paths:
        raise GRDNetError(f"{folder}: no images found")
    return paths


def category_dirs(root, marker: str) -> list[Path]:
    """The sub-folders of a multi-category root (MVTec AD: one folder per category) that hold
    `marker` ("train/good" to train, "test" to evaluate), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / marker).is_dir())


def test_samples(root, allow_missing_masks: bool = False) -> list[TestSample]:
    """Every test image with its defect type and mask. A defective image without a mask is an
    error (or, with `allow_missing_masks`, kept for image metrics with a warning)."""
    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        raise GRDNetError(f"{root}: no test folder")
    samples, missing = [], []
    for folder in sorted(p for p in test.iterdir() if p.is_dir()):
        mask_index = {}
        gt = root / "ground_truth" / folder.name
        for m in list_images(gt):
            key = m.stem[:-5] if m.stem.endswith("_mask") else m.stem
            mask_index.setdefault(key, m)
        used = set()
        for img in list_images(folder):
            mask = None
            if folder.name != "good":
                mask = mask_index.get(img.stem)
                if mask is None and gt.is_dir():
                    missing.append(img)
                used.add(img.stem)
            samples.append(TestSample(img, folder.name, mask))
        orphans = sorted(set(mask_index) - used)
        if orphans:
            log.warning("%s: %d mask(s) without an image, e.g. %s", gt, len(orphans), mask_index[orphans[0]].name)
    if missing and not allow_missing_masks:
        names = ", ".join(str(p) for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise GRDNetError(f"{len(missing)} defective test image(s) without a mask: {names} "
                          "(use --allow-missing-masks to evaluate them on image metrics only)")
    for p in missing:
        log.warning("%s: no mask; used for image metrics only", p)
    if not samples:
        raise GRDNetError(f"{test}: no test images found")
    return samples


class ImageDataset(torch.utils.data.Dataset):
    """Training images at model size, with an optional ROI per image (1, S, S) in {0, 1}.

    `crop=True` keeps each image at its own resolution and returns a random model-size crop
    (ROI cropped alike) instead of the whole image resized: the model then sees defects at their
    real pixel size, and tiled inference (`predict(..., tile=True)`) matches it. Images smaller
    than the model size are padded by repeating their edge. `keep_aspect=True` (a model with
    `ModelConfig.aspect` "keep") first resizes each image so that its shorter side is the model
    size, then crops: the image is scaled alike in both directions, never squeezed. `crop="both"`
    returns, for each sample with even odds, the whole image resized or a native crop.

    Small datasets are decoded once and kept in memory as uint8 (the usual case on one machine);
    large ones are decoded on demand in the loader's workers.
    """

    CACHE_BYTES = 2 * 1024 ** 3

    def __init__(self, paths: list[Path], channels: int, size: int, rois: list[Path | None] | None = None,
                 crop: bool | str = False, keep_aspect: bool = False):
        if crop not in (False, True, "both"):
            raise ValueError(f"crop must be False, True or \"both\" (resolve \"auto\" first), got {crop!r}")
        self.paths, self.channels, self.size = list(paths), channels, size
        self.rois, self.keep_aspect = rois, keep_aspect
        self.whole_too = crop == "both" and not keep_aspect
        self.crop = bool(crop) or keep_aspect
        self.cache = None
        if keep_aspect:
            pixels = sum(math.prod(short_side_size(wh[::-1], size)) for wh in map(image_size_of, self.paths))
        elif crop:
            pixels = sum(max(w, size) * max(h, size) for w, h in map(image_size_of, self.paths))
        else:
            pixels = len(self.paths) * size * size
        if pixels * channels < self.CACHE_BYTES:
            self.cache = [self._decode(i) for i in range(len(self.paths))]

    def _decode(self, i: int) -> torch.Tensor:
        """(C + 1, H, W) uint8: the image then its ROI; H = W = size unless cropping."""
        size = None if self.crop else self.size
        img = load_image(self.paths[i], self.channels, size)
        roi = torch.ones(1, *img.shape[1:])
        if self.rois is not None and self.rois[i] is not None:
            roi = load_roi(self.rois[i], size, image_path=self.paths[i])
        if self.keep_aspect:
            hw = short_side_size(img.shape[1:], self.size)
            img, roi = resize_to(img, hw), resize_to(roi, hw, mode="nearest")
        item = (torch.cat([img, roi]) * 255).round().to(torch.uint8)
        h, w = item.shape[1:]
        if self.crop and (h < self.size or w < self.size):
            pad = (0, max(0, self.size - w), 0, max(0, self.size - h))
            item = F.pad(item[None].float(), pad, mode="replicate")[0].to(torch.uint8)
        return item

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        """(C + 1, S, S) float: image channels then the ROI channel."""
        item = self.cache[i] if self.cache is not None else self._decode(i)
        if self.whole_too and bool(torch.randint(2, ())):
            item = item.float() / 255.0
            c = self.channels
            return torch.cat([resize_to(item[:c], (self.size, self.size)),
                              resize_to(item[c:], (self.size, self.size), mode="nearest")])
        if self.crop:
            h, w = item.shape[1:]
            y = int(torch.randint(h - self.size + 1, ()))
            x = int(torch.randint(w - self.size + 1, ()))
            item = item[:, y:y + self.size, x:x + self.size]
        return item.float() / 255.0


def load_roi(path, size: int | None, image_path=None) -> torch.Tensor:
    """ROI mask resized to the model size, (1, S, S) in {0, 1} (`size=None`: at the image's own
    size, which it must have). An all-zero ROI is an error."""
    mask = load_mask(path, None if size is not None or image_path is None else image_size_of(image_path))
    if not mask.any():
        raise GRDNetError(f"{path}: ROI mask is empty (all zero): nothing to learn for "
                          f"{image_path or 'this image'}")
    t = torch.from_numpy(mask.astype(np.float32))[None]
    return t if size is None else resize_to(t, (size, size), mode="nearest")


def infer_channels(paths: list[Path], sample: int = 16) -> int:
    """1 if the (first few) images are grayscale, else 3."""
    for p in paths[:sample]:
        img = open_image(p)
        if img.mode not in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "F"):
            if img.mode == "P" or img.mode.startswith("RGB"):
                a = np.asarray(img.convert("RGB"), dtype=np.int16)
                if np.abs(a[..., 0] - a[..., 1]).max() > 2 or np.abs(a[..., 1] - a[..., 2]).max() > 2:
                    return 3
            else:
                return 3
    return 1
