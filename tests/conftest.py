import os
import warnings

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("LITLOGGER_DISABLE", "1")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def write_dataset(root, n_train=12, n_good=4, n_bad=4, size=(40, 48), channels=3, seed=0):
    """A small MVTec-layout dataset: noise textures; defective test images get a dark square."""
    rng = np.random.default_rng(seed)
    shape = size + ((channels,) if channels == 3 else ())

    def img():
        return (rng.random(shape) * 80 + 100).astype(np.uint8)

    for sub in ("train/good", "test/good", "test/hole", "ground_truth/hole"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        Image.fromarray(img()).save(root / "train/good" / f"{i:03d}.png")
    for i in range(n_good):
        Image.fromarray(img()).save(root / "test/good" / f"{i:03d}.png")
    for i in range(n_bad):
        a = img()
        a[10:20, 12:22] = 0
        m = np.zeros(size, np.uint8)
        m[10:20, 12:22] = 255
        Image.fromarray(a).save(root / "test/hole" / f"{i:03d}.png")
        Image.fromarray(m).save(root / "ground_truth/hole" / f"{i:03d}_mask.png")
    return root


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory):
    """One tiny model trained once for the tests that only need a model."""
    import grdnet

    root = tmp_path_factory.mktemp("trained")
    data = write_dataset(root / "data")
    grdnet.train(data, root / "run", preset="tiny", epochs=2, progress=False)
    return root / "run", data
