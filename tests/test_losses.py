import torch

from grdnet.config import TrainConfig
from grdnet.losses import (adversarial_loss, contextual_loss, discriminator_loss, latent_loss,
                           segmentation_loss)

CFG = TrainConfig()


def test_contextual_loss_zero_for_identical_and_positive_otherwise():
    x = torch.rand(2, 3, 32, 32)
    assert contextual_loss(x, x, CFG).item() < 1e-6  # L1 = 0 and SSIM = 1
    assert contextual_loss(x, x.flip(-1), CFG).item() > 0.1


def test_ssim_of_identical_images_is_one():
    from kornia.metrics import ssim

    x = torch.rand(1, 1, 32, 32)
    assert torch.allclose(ssim(x, x, 11).mean(), torch.tensor(1.0), atol=1e-5)


def test_feature_matching_and_latent_losses():
    f = torch.randn(2, 8, 4, 4)
    assert adversarial_loss(f, f).item() == 0.0
    assert adversarial_loss(f, f + 1).item() == 1.0
    assert latent_loss(f, f + 2).item() == 4.0


def test_discriminator_loss_small_when_right_large_when_wrong():
    right = discriminator_loss(torch.full((4,), 10.0), torch.full((4,), -10.0))
    wrong = discriminator_loss(torch.full((4,), -10.0), torch.full((4,), 10.0))
    assert right.item() < 1e-3 and wrong.item() > 10


def _logits_for(prob_map):
    """Two-class logits whose softmax channel 1 equals prob_map."""
    p = prob_map.clamp(1e-6, 1 - 1e-6)
    return torch.cat([torch.zeros_like(p), torch.log(p / (1 - p))], dim=1)


def test_focal_loss_of_perfect_prediction_is_about_zero():
    mask = (torch.rand(2, 1, 16, 16) > 0.7).float()
    perfect = segmentation_loss(_logits_for(mask), mask, None, CFG)
    wrong = segmentation_loss(_logits_for(1 - mask), mask, None, CFG)
    assert perfect.item() < 1e-6 and wrong.item() > 1.0


def test_roi_target_mode_penalises_detection_outside_roi_prediction_mode_does_not():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :, :4] = 1  # a synthetic defect covering the left half
    roi = torch.zeros(1, 1, 8, 8)
    roi[..., :, 4:] = 1  # only the right half matters
    fires_on_defect = _logits_for(mask)  # detects the defect, which lies outside the ROI
    silent = _logits_for(torch.zeros_like(mask))
    target = lambda lg: segmentation_loss(lg, mask, roi, CFG, mode="target").item()  # noqa: E731
    pred = lambda lg: segmentation_loss(lg, mask, roi, CFG, mode="prediction").item()  # noqa: E731
    none = lambda lg: segmentation_loss(lg, mask, roi, CFG, mode="none").item()  # noqa: E731
    assert target(fires_on_defect) > 1.0 and target(silent) < 1e-6  # taught to stay silent outside
    assert pred(fires_on_defect) < 1e-6 and pred(silent) < 1e-6  # no signal outside the ROI
    assert none(fires_on_defect) < 1e-6 and none(silent) > 1.0  # ROI ignored
