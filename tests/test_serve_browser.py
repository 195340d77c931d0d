"""The operator's page in a real headless Chromium (Debian's `chromium` + `chromium-driver`,
driven by Selenium) against a real uvicorn server on 127.0.0.1: upload images, see scores and
heatmaps, move the threshold slider and see the labels change without the model running again.

Skips when no browser is installed. `GRDNET_SCREENSHOT_MODEL=<model folder>` also refreshes
docs/serve_screenshot.png with that model (the tiny test model's heatmaps show little).
"""
import base64
import contextlib
import io
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
    from selenium.webdriver.common.action_chains import ActionChains
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

    def predict(self, images, threshold=None, **kw):
        self.calls += 1
        return self.inner.predict(images, threshold=threshold, **kw)


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


# ---- the ROI editor --------------------------------------------------------------------------

def _open_roi_editor(browser, url, sample):
    browser.get(url)
    browser.find_element(By.CSS_SELECTOR, "#roi-panel summary").click()
    browser.find_element(By.ID, "roi-file").send_keys(str(sample))
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "roi-work").is_displayed())
    return browser.find_element(By.ID, "roi-canvas")


def _at(browser, canvas, x, y, size=(48, 40)):
    """Selenium's offset (from the element's centre, CSS pixels) of image pixel (x, y)'s centre.
    Selenium measures from the centre of the element's visible part: the canvas must be in view."""
    w, h, top, bottom, view = browser.execute_script(
        "arguments[0].scrollIntoView({block: 'center'}); const r = arguments[0].getBoundingClientRect();"
        "return [r.width, r.height, r.top, r.bottom, innerHeight]", canvas)
    assert top >= 0 and bottom <= view
    assert w > 4 * size[0]  # the 48 px sample is shown enlarged, so each pixel is several CSS pixels wide
    return round((x + 0.5) * w / size[0] - w / 2), round((y + 0.5) * h / size[1] - h / 2)


def _mask_shown(browser):
    """The mask the page holds (the download link's target), as an array, and the PNG's mode.
    Read from the page's blob itself: the page's CSP (connect-src 'self') forbids fetching blob: URLs."""
    assert browser.execute_script("return document.getElementById('roi-download').href === roi.maskUrl")
    b64 = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "roi.maskBlob.arrayBuffer().then(b => {"
        "  let s = ''; new Uint8Array(b).forEach(c => s += String.fromCharCode(c)); done(btoa(s));"
        "}).catch(e => done('error: ' + e))")
    assert not b64.startswith("error"), b64
    png = Image.open(io.BytesIO(base64.b64decode(b64)))
    return np.asarray(png), png.mode


def _cli_roi(tmp_path, sample, *args) -> Path:
    from grdnet.cli import main

    out = tmp_path / "cli" / "roi.png"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["roi", "--like", str(sample), *args, "--out", str(out)]) == 0
    return out


def test_roi_editor_rectangle_downloads_what_grdnet_roi_writes(browser, live_server, trained_tiny, tmp_path):
    url, _ = live_server
    sample = _images(tmp_path, trained_tiny[1])[1]
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    canvas = _open_roi_editor(browser, url, sample)
    wait = WebDriverWait(browser, 30)
    ActionChains(browser).move_to_element_with_offset(canvas, *_at(browser, canvas, 30, 25)).click_and_hold() \
        .move_to_element_with_offset(canvas, *_at(browser, canvas, 20, 20)) \
        .move_to_element_with_offset(canvas, *_at(browser, canvas, 5, 6)).release().perform()
    command = browser.find_element(By.ID, "roi-command")
    wait.until(lambda d: command.text)
    assert command.text == "grdnet roi --like part_hole.png --rect 5,6,30,25 --out part_hole_roi.png"
    link = browser.find_element(By.ID, "roi-download")
    wait.until(lambda d: link.get_attribute("href") and "disabled" not in link.get_attribute("class"))
    wait.until(lambda d: d.execute_script("const i = document.getElementById('roi-mask');"
                                          "return !i.hidden && i.complete && i.naturalWidth === 48"))
    assert "27.1 % of the 48×40 image" in browser.find_element(By.ID, "roi-status").text  # 26 x 20 pixels

    link.click()  # a real download, into the folder set above
    got = downloads / "part_hole_roi.png"
    wait.until(lambda d: got.is_file() and not list(downloads.glob("*.crdownload")))
    expected = _cli_roi(tmp_path, sample, "--rect", "5,6,30,25")
    assert got.read_bytes() == expected.read_bytes()  # the same file as the command line's
    mask = Image.open(got)
    assert mask.mode == "L" and mask.size == (48, 40)
    inside = np.zeros((40, 48), bool)
    inside[6:26, 5:31] = True  # both corner pixels belong to the rectangle
    np.testing.assert_array_equal(np.asarray(mask), np.where(inside, 255, 0))
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_roi_editor_polygon_undo_and_heatmap_in_the_roi(browser, live_server, trained_tiny, tmp_path):
    url, predictor = live_server
    sample = _images(tmp_path, trained_tiny[1])[1]
    canvas = _open_roi_editor(browser, url, sample)
    wait = WebDriverWait(browser, 30)
    browser.find_element(By.ID, "roi-mode-poly").click()
    actions = ActionChains(browser)
    for x, y in ((4, 3), (40, 8), (30, 36)):
        actions.move_to_element_with_offset(canvas, *_at(browser, canvas, x, y)).click()
    actions.move_to_element_with_offset(canvas, *_at(browser, canvas, 6, 30)).double_click().perform()
    command = browser.find_element(By.ID, "roi-command")
    wait.until(lambda d: "--polygon 4,3,40,8,30,36,6,30 " in command.text)
    status = browser.find_element(By.ID, "roi-status")
    wait.until(lambda d: "1 shape(s)" in status.text)
    polygon, mode = _mask_shown(browser)
    expected = np.asarray(Image.open(_cli_roi(tmp_path, sample, "--polygon", "4,3,40,8,30,36,6,30")))
    assert mode == "L"
    np.testing.assert_array_equal(polygon, expected)

    # a rectangle, then undo: back to the polygon alone
    browser.find_element(By.ID, "roi-mode-rect").click()
    ActionChains(browser).move_to_element_with_offset(canvas, *_at(browser, canvas, 40, 30)).click_and_hold() \
        .move_to_element_with_offset(canvas, *_at(browser, canvas, 46, 38)).release().perform()
    wait.until(lambda d: "2 shape(s)" in status.text and "--rect 40,30,46,38" in command.text)
    browser.find_element(By.ID, "roi-undo").click()
    wait.until(lambda d: "1 shape(s)" in status.text and "--rect" not in command.text)
    np.testing.assert_array_equal(_mask_shown(browser)[0], expected)

    # the current model's heatmap for the sample, restricted to the ROI
    browser.find_element(By.ID, "roi-inspect").click()
    wait.until(lambda d: d.find_element(By.ID, "roi-result").is_displayed() and d.execute_script(
        "const i = document.getElementById('roi-heatmap'); return i.complete && i.naturalWidth === 48"))
    image = np.asarray(Image.open(sample).convert("RGB"))
    in_roi = predictor.inner.predict(image, roi=expected > 0)
    assert browser.find_element(By.ID, "roi-score").text == f"{in_roi.score:.4f}"
    assert browser.find_element(By.ID, "roi-label").text.lower() == in_roi.label
    src = browser.find_element(By.ID, "roi-heatmap").get_attribute("src")
    heatmap = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    outside = expected == 0
    np.testing.assert_array_equal(heatmap[outside], image[outside])  # no heat outside the ROI
    assert not in_roi.anomaly_map[outside].any()

    # the ROI applied to ordinary uploads
    browser.find_element(By.ID, "roi-apply").click()
    browser.find_element(By.ID, "file-input").send_keys(str(sample))
    wait.until(lambda d: "in ROI" in d.find_element(By.CSS_SELECTOR, ".card .timing").text)
    assert browser.find_element(By.CSS_SELECTOR, ".card .score").text == f"{in_roi.score:.4f}"
    browser.find_element(By.ID, "roi-clear").click()
    wait.until(lambda d: "no shapes yet" in status.text)
    link = browser.find_element(By.ID, "roi-download")
    assert link.get_attribute("href") is None and not browser.find_element(By.ID, "roi-apply").is_enabled()
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_roi_editor_takes_the_stored_size_of_an_exif_rotated_image(browser, live_server, tmp_path):
    """Browsers apply a JPEG's EXIF orientation to naturalWidth/Height; the service (like the
    model) reads the pixels as stored, so the editor must draw on those."""
    url, _ = live_server
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    sample = tmp_path / "turned.jpg"
    Image.fromarray((np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)).save(
        sample, exif=exif.tobytes())
    _open_roi_editor(browser, url, sample)
    assert browser.execute_script("const i = document.getElementById('roi-image');"
                                  "return [i.naturalWidth, i.naturalHeight, roi.width, roi.height]") == [40, 48, 48, 40]


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
