"""The operator's page in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by Selenium) against a real uvicorn server on 127.0.0.1: upload images, see scores and
heatmaps, move the threshold slider and see the labels change without the model running again.

Skips when no browser is installed. `GRDNET_SCREENSHOT_MODEL=<model folder>` also refreshes
docs/serve_screenshot.png with that model (the tiny test model's heatmaps show little).
"""
import contextlib
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import grdnet
from grdnet.serve import create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "serve_screenshot.png"

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - depends on the machine
    webdriver = None


class CountingPredictor:
    """Wraps the real predictor and counts forward passes (the page must not cause any when
    the slider moves)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.cfg, self.threshold, self.meta = inner.cfg, inner.threshold, inner.meta

    def predict(self, images, threshold=None):
        self.calls += 1
        return self.inner.predict(images, threshold=threshold)


@contextlib.contextmanager
def serving(predictor):
    """A real uvicorn server for `predictor` on a free loopback port, in a thread."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(predictor), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def live_server(trained_tiny):
    predictor = CountingPredictor(grdnet.load(trained_tiny[0]))
    with serving(predictor) as url:
        yield url, predictor


@pytest.fixture
def browser():
    if webdriver is None:
        pytest.skip("selenium is not installed (pip install selenium)")
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("no headless browser: apt-get install chromium chromium-driver")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,860", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _images(tmp_path, data) -> list[Path]:
    """A good and a defective test image of the tiny dataset, under names an operator would see."""
    out = []
    for src, name in ((data / "test" / "good" / "000.png", "part_good.png"),
                      (data / "test" / "hole" / "001.png", "part_hole.png")):
        dst = tmp_path / name
        shutil.copy(src, dst)
        out.append(dst)
    return out


def test_page_scores_uploads_and_relabels_with_the_slider(browser, live_server, trained_tiny, tmp_path):
    url, predictor = live_server
    wait = WebDriverWait(browser, 60)
    browser.get(url)
    model_id = grdnet_model_id(url)
    wait.until(lambda d: d.find_element(By.ID, "model-id").text == model_id)
    slider = browser.find_element(By.ID, "threshold")
    assert float(slider.get_attribute("value")) == pytest.approx(predictor.threshold, abs=1e-4)

    paths = _images(tmp_path, trained_tiny[1])
    browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in paths))

    def scored(d):
        cards = d.find_elements(By.CSS_SELECTOR, ".card")
        return len(cards) == 2 and all(c.find_element(By.CSS_SELECTOR, ".score").text != "–" for c in cards)

    wait.until(scored)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('.card img.overlay')].every(i => i.complete && i.naturalWidth > 0)"))
    cards = {c.find_element(By.CSS_SELECTOR, ".name").text: c for c in browser.find_elements(By.CSS_SELECTOR, ".card")}
    assert set(cards) == {"part_good.png", "part_hole.png"}
    overlay_size = browser.execute_script(
        "const i = document.querySelector('.card img.overlay'); return [i.naturalWidth, i.naturalHeight]")
    assert overlay_size == [48, 40]  # the heatmap comes back at the image's own size

    def labels():
        return {n: c.find_element(By.CSS_SELECTOR, ".badge").text.lower() for n, c in cards.items()}

    scores = {n: float(c.find_element(By.CSS_SELECTOR, ".score").text) for n, c in cards.items()}
    expected = {n: "defective" if s >= predictor.threshold else "good" for n, s in scores.items()}
    # The shown score is rounded to 4 digits; the label is computed from the exact one.
    assert {n: lbl for n, lbl in labels().items() if abs(scores[n] - predictor.threshold) > 1e-4} == \
        {n: lbl for n, lbl in expected.items() if abs(scores[n] - predictor.threshold) > 1e-4}
    calls = predictor.calls

    slider.send_keys(Keys.HOME)  # threshold 0: every part is defective
    wait.until(lambda d: set(labels().values()) == {"defective"})
    assert browser.find_element(By.ID, "threshold-value").get_attribute("value") == "0.0000"
    assert "2 defective, 0 good" in browser.find_element(By.ID, "summary").text
    slider.send_keys(Keys.END)  # threshold 1: every part is good
    wait.until(lambda d: set(labels().values()) == {"good"})
    assert "0 defective, 2 good" in browser.find_element(By.ID, "summary").text
    assert predictor.calls == calls  # relabelled in the page, not by running the model again

    browser.find_element(By.ID, "threshold-reset").click()
    wait.until(lambda d: float(d.find_element(By.ID, "threshold").get_attribute("value")) ==
               pytest.approx(predictor.threshold, abs=1e-4))
    shot = tmp_path / "serve_screenshot.png"
    assert browser.save_screenshot(str(shot))
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] > 400 and img.std() > 10  # a rendered page, not a blank one

    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors  # no script errors, no blocked (CSP) or failed requests


def test_page_reports_a_refused_upload(browser, live_server, tmp_path):
    url, _ = live_server
    bad = tmp_path / "notes.png"
    bad.write_text("not an image at all")
    browser.get(url)
    browser.find_element(By.ID, "file-input").send_keys(str(bad))
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".card .error").text)
    card = browser.find_element(By.CSS_SELECTOR, ".card")
    assert "notes.png: not an image" in card.find_element(By.CSS_SELECTOR, ".error").text
    assert card.find_element(By.CSS_SELECTOR, ".badge").text.lower() == "error"


def grdnet_model_id(url: str) -> str:
    import httpx

    return httpx.get(url + "/model").json()["model_id"]


@pytest.mark.skipif(not os.environ.get("GRDNET_SCREENSHOT_MODEL"),
                    reason="set GRDNET_SCREENSHOT_MODEL=<model folder> to refresh docs/serve_screenshot.png")
def test_docs_screenshot(browser, tmp_path):
    """The README's screenshot: demo surface parts, good and defective, scored by a real model."""
    from grdnet.demo_data import surface_sample

    paths = []
    for seed, kind in ((11, None), (12, "scratch"), (13, "dent"), (14, "stain")):
        path = tmp_path / f"part_{seed:03d}_{kind or 'good'}.png"
        sample = surface_sample(seed, 128, 3, defect_type=kind, level="normal" if kind else None)
        Image.fromarray(sample.image).save(path)
        paths.append(path)
    browser.set_window_size(1280, 1180)
    with serving(grdnet.load(os.environ["GRDNET_SCREENSHOT_MODEL"])) as url:
        browser.get(url)
        browser.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in paths))
        WebDriverWait(browser, 120).until(lambda d: d.execute_script(
            "const i = [...document.querySelectorAll('.card img.overlay')];"
            "return i.length === 4 && i.every(x => x.complete && x.naturalWidth > 0)"))
        time.sleep(0.5)
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(DOCS_SCREENSHOT))
