"""grdnet.anomalib: GRD-Net fitted, tested, predicted and exported through anomalib's Engine.

Skipped where anomalib does not import (it needs torchvision; CI runs this file in a venv of its
own, see .ci/run). One tiny model is fitted once for the module (a few steps, CPU)."""
import math
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

anomalib = pytest.importorskip("anomalib")

from anomalib.data import Folder, MVTecAD  # noqa: E402
from anomalib.engine import Engine  # noqa: E402

import grdnet  # noqa: E402
import grdnet.training  # noqa: E402
from grdnet.anomalib import GRDNet, RoiImageBatch, attach_roi  # noqa: E402

from conftest import write_dataset  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
STEPS = 4  # tiny preset: batch 4 of 32 px


def _engine(root):
    return Engine(accelerator="cpu", devices=1, default_root_dir=root, logger=False, enable_progress_bar=False,
                  enable_model_summary=False)


def _mvtec(root):
    return MVTecAD(root=root, category="tile", train_batch_size=4, eval_batch_size=4, num_workers=0)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(engine, model, datamodule, root, losses' ROIs): fitted on MVTec-layout data, no ROI."""
    root = tmp_path_factory.mktemp("anomalib")
    write_dataset(root / "tile")
    dm = _mvtec(root)
    model = GRDNet("tiny", train={"steps": STEPS})
    engine = _engine(root / "results")
    rois = _record_rois(lambda: engine.fit(model, datamodule=dm))
    return engine, model, dm, root, rois


def _record_rois(run) -> list:
    """The ROIs the segmentation loss saw while `run()` trained."""
    seen, real = [], grdnet.training.segmentation_loss

    def spy(logits, mask, roi, cfg, *args, **kwargs):
        seen.append(roi.detach().clone())
        return real(logits, mask, roi, cfg, *args, **kwargs)

    grdnet.training.segmentation_loss = spy
    try:
        run()
    finally:
        grdnet.training.segmentation_loss = real
    return seen


def test_fit_test_predict(fitted):
    engine, model, dm, _, rois = fitted
    assert model.batches_trained == STEPS and engine.trainer.global_step == 2 * STEPS  # the GAN: two optimisers
    assert len(rois) == STEPS and all(bool((r == 1).all()) for r in rois)  # no ROI field: the whole image

    (metrics,) = engine.test(model, datamodule=dm)
    for name in ("image_AUROC", "pixel_AUROC"):
        assert 0.0 <= metrics[name] <= 1.0

    batches = engine.predict(model, datamodule=dm, return_predictions=True)
    assert sum(len(b) for b in batches) == 8
    for b in batches:
        s = model.model_cfg.image_size
        assert b.anomaly_map.shape == (len(b), s, s)
        assert torch.isfinite(b.pred_score).all() and torch.isfinite(b.anomaly_map).all()
        assert b.pred_label is not None and b.pred_mask is not None  # anomalib's post-processing ran


def test_roi_field_restricts_training_and_maps(fitted, tmp_path):
    _, model, _, root, _ = fitted
    roi = np.zeros((40, 48), np.uint8)
    roi[:, :24] = 255  # the left half matters
    Image.fromarray(roi).save(tmp_path / "roi.png")

    s = model.model_cfg.image_size
    plain = _engine(tmp_path / "plain").predict(model, datamodule=_mvtec(root), return_predictions=True)
    dm = attach_roi(_mvtec(root), tmp_path / "roi.png")
    preds = _engine(tmp_path / "results").predict(model, datamodule=dm, return_predictions=True)
    for b, p in zip(preds, plain):
        # anomalib's datasets resize to the model's input (its Resize joins their augmentations),
        # and the ROI is resized to the image as the dataset hands it over.
        assert isinstance(b, RoiImageBatch) and b.roi.shape == (len(b), s, s)
        # Outside the ROI the raw map is zeroed: after anomalib's normalisation, each image's
        # lowest value, never above the threshold. Without a ROI the whole image is mapped.
        outside, lowest = b.anomaly_map[..., s // 2:], b.anomaly_map.amin(dim=(-2, -1))[:, None, None]
        assert torch.equal(outside, lowest.expand_as(outside)) and not b.pred_mask[..., s // 2:].any()
        assert (p.anomaly_map[..., s // 2:].flatten(1).std(1) > 0).all()
        assert torch.equal(b.anomaly_map[..., : s // 2], p.anomaly_map[..., : s // 2])

    # Training: the loss sees the ROI (moved by the augmentation, so some zeros and some ones).
    fresh = GRDNet("tiny", train={"steps": 2})
    rois = _record_rois(lambda: _engine(tmp_path / "fit").fit(fresh, datamodule=attach_roi(_mvtec(root),
                                                                                            tmp_path / "roi.png")))
    assert len(rois) == 2
    for r in rois:
        assert r.shape[1:] == (1, 32, 32) and 0 < float(r.mean()) < 1


def test_roi_folder_and_folder_datamodule(tmp_path):
    data = write_dataset(tmp_path / "data", n_train=4, n_good=2, n_bad=2)
    rois = tmp_path / "rois"
    for img in sorted(data.rglob("*.png")):
        if "ground_truth" in img.parts:
            continue
        rel = img.relative_to(data)
        (rois / rel.parent).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 48), 255, np.uint8)).save(rois / rel)
    def folder():
        return Folder(name="tile", root=data, normal_dir="train/good", abnormal_dir="test/hole",
                      normal_test_dir="test/good", mask_dir="ground_truth/hole", train_batch_size=4,
                      eval_batch_size=4, num_workers=0, val_split_mode="same_as_test")

    dm = attach_roi(folder(), rois)
    model = GRDNet("tiny", train={"steps": 1})
    engine = _engine(tmp_path / "results")
    engine.fit(model, datamodule=dm)
    (metrics,) = engine.test(model, datamodule=dm)
    assert math.isfinite(metrics["image_AUROC"])

    missing = tmp_path / "partial"
    (missing / "train" / "good").mkdir(parents=True)
    dm = attach_roi(folder(), missing)
    dm.setup("fit")
    with pytest.raises(grdnet.GRDNetError, match="no ROI for 4 image"):
        next(iter(dm.train_dataloader()))


def test_checkpoint_torch_export_and_grdnet_model(fitted, tmp_path):
    engine, model, _, _, _ = fitted
    ckpt = engine.trainer.checkpoint_callback.best_model_path
    again = GRDNet.load_from_checkpoint(ckpt)  # weights_only=True: plain hyperparameters only
    assert again.model_cfg == model.model_cfg and again.train_cfg == model.train_cfg
    assert engine.export(model, "torch", export_root=tmp_path).is_file()

    # The same networks as a grdnet model folder: grdnet's own predictor gives the same raw maps.
    x = torch.rand(2, 3, 32, 32)
    folder = model.save_grdnet_model(tmp_path / "grdnet-model")
    with torch.no_grad():
        raw = model.eval().model(x)
    np.testing.assert_allclose(grdnet.load(folder).maps(x).numpy(), raw.anomaly_map.numpy(), atol=1e-4)


@pytest.mark.skipif(not os.environ.get("GRDNET_ANOMALIB_ONNX"),
                    reason="about 30 s of CPU (torch.onnx's dynamo export); set GRDNET_ANOMALIB_ONNX=1")
def test_onnx_export_matches(fitted, tmp_path):
    engine, model, _, _, _ = fitted
    model.eval()
    x = torch.rand(2, 3, 40, 48)
    with torch.no_grad():
        ref = model(x)  # pre-processing, networks, anomalib's post-processing
    onnx_path = engine.export(model, "onnx", export_root=tmp_path, onnx_kwargs={"opset_version": 18})
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path))
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"input": x.numpy()})))
    np.testing.assert_allclose(out["anomaly_map"].reshape(2, -1), ref.anomaly_map.reshape(2, -1).numpy(), atol=1e-4)
    # Scores within the resize's difference (the exported Resize does not antialias), which
    # anomalib's normalisation magnifies by 1 / (score range) on this barely trained model.
    np.testing.assert_allclose(out["pred_score"], ref.pred_score.numpy(), atol=5e-3)


def test_config_errors():
    with pytest.raises(grdnet.GRDNetError, match="unknown preset"):
        GRDNet("fast")
    with pytest.raises(grdnet.GRDNetError, match="no such ROI"):
        attach_roi(_mvtec("/nonexistent"), "/nonexistent/roi.png")
