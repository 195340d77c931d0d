"""A derived copy of an MVTec-layout dataset whose images carry a fine-texture channel
(docs/EXPERIMENTS.md run 64): RGB = (grey, local fine-texture energy at native resolution, grey).

    python benchmarks/energy_channel.py ../shared/data/magnetic_tile /tmp/mt_energy
    python benchmarks/variants.py /tmp/mt_energy --out /tmp/run --max-minutes 20

Energy: the square root of the Gaussian-smoothed (sigma 3 px) square of the image minus its
sigma 1.5 px blur, divided by its 99.5th percentile over the training images, so that the model
input, however small, still says how streaky or smooth each place is at full resolution.
Masks are copied as they are.
"""
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from grdnet.data import load_image, test_samples, train_images


def grey(path: Path) -> np.ndarray:
    return load_image(path, 1, None)[0].numpy()


def energy(a: np.ndarray) -> np.ndarray:
    detail = a - gaussian_filter(a, 1.5)
    return np.sqrt(gaussian_filter(detail * detail, 3.0))


def main():
    src, dst = Path(sys.argv[1]), Path(sys.argv[2])
    train = train_images(src)
    images = train + [t.path for t in test_samples(src)]
    scale = np.percentile(np.concatenate([energy(grey(p)).ravel()[::97] for p in train[::4]]), 99.5)
    for p in images:
        a = grey(p)
        rgb = np.stack([a, np.clip(energy(a) / scale, 0, 1), a], -1)
        out = dst / p.relative_to(src).with_suffix(".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)).save(out)
    shutil.copytree(src / "ground_truth", dst / "ground_truth", dirs_exist_ok=True)
    print(f"{len(images)} images written to {dst} (energy scale {scale:.4f})")


if __name__ == "__main__":
    main()
