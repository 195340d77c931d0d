"""Defect regions: the anomaly map at a pixel threshold, as a binary mask and a list of regions.

GRD-Net's argument is that its map replaces hand-tuned blob analysis; this module is the last
step of that: the pixels whose map value reaches the pixel threshold form the defect mask (inside
the ROI when one is given), and each 8-connected group of them is a region with its bounding box,
area and scores. The pixel threshold is calibrated at training time without test data (see
`calibration.held_out_threshold`): good images should show no region.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

_EIGHT = np.ones((3, 3), bool)  # diagonal neighbours belong to the same region


@dataclass(frozen=True)
class Region:
    """One connected group of defect pixels; coordinates in pixels of the input image."""

    x: int  # bounding box: left column
    y: int  # top row
    width: int
    height: int
    area: int  # defect pixels in the region
    peak: float  # the largest map value in it
    mean: float  # the mean map value over its pixels

    def to_dict(self) -> dict:
        return asdict(self)


def defect_mask(anomaly_map: np.ndarray, pixel_threshold: float, roi: np.ndarray | None = None) -> np.ndarray:
    """(H, W) bool: map >= `pixel_threshold`, and inside `roi` when one is given."""
    mask = np.asarray(anomaly_map) >= pixel_threshold
    return mask & np.asarray(roi, bool) if roi is not None else mask


def find_regions(anomaly_map: np.ndarray, mask: np.ndarray) -> list[Region]:
    """The 8-connected regions of `mask`, the highest peak first."""
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index)
    peaks = ndimage.maximum(anomaly_map, labels, index)
    means = ndimage.mean(anomaly_map, labels, index)
    regions = [Region(int(sl[1].start), int(sl[0].start), int(sl[1].stop - sl[1].start),
                      int(sl[0].stop - sl[0].start), int(a), float(p), float(m))
               for sl, a, p, m in zip(ndimage.find_objects(labels), areas, peaks, means)]
    return sorted(regions, key=lambda r: -r.peak)


class RegionTally:
    """Region-level figures over a test split, one image at a time (nothing is kept but counts).

    A ground-truth region (8-connected component of a defect mask) is *found* when at least one
    pixel of the predicted defect mask falls on it; a predicted region is *false* when none of its
    pixels touch a ground-truth defect. Good images have no ground truth: every region on them is
    false.
    """

    def __init__(self):
        self.gt_regions = self.gt_found = 0
        self.good_images = self.good_false = self.good_with_region = 0
        self.defective_images = self.defective_false = 0

    def add(self, predicted: np.ndarray, truth: np.ndarray) -> None:
        """`predicted`, `truth`: (H, W) bool masks of one image (truth all False for a good image)."""
        pred_labels, n_pred = ndimage.label(predicted, structure=_EIGHT)
        false = n_pred - len(np.setdiff1d(np.unique(pred_labels[truth]), [0])) if n_pred else 0
        if truth.any():
            gt_labels, n_gt = ndimage.label(truth, structure=_EIGHT)
            self.gt_regions += n_gt
            self.gt_found += len(np.setdiff1d(np.unique(gt_labels[predicted]), [0]))
            self.defective_images += 1
            self.defective_false += false
        else:
            self.good_images += 1
            self.good_false += false
            self.good_with_region += int(n_pred > 0)

    def figures(self) -> dict:
        def ratio(a, b):
            return a / b if b else None

        return {"gt_regions": self.gt_regions, "gt_regions_found": self.gt_found,
                "gt_region_recall": ratio(self.gt_found, self.gt_regions),
                "false_regions_per_good_image": ratio(self.good_false, self.good_images),
                "good_images_with_a_region": ratio(self.good_with_region, self.good_images),
                "false_regions_per_defective_image": ratio(self.defective_false, self.defective_images)}
