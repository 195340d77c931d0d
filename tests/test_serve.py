"""The inspection service: every endpoint and every error path, with FastAPI's test client over
the tiny trained model (and duck-typed fake predictors for the concurrency and failure paths)."""
import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import grdnet
from grdnet.config import PRESETS, ModelConfig
from grdnet.errors import GRDNetError
from grdnet.scoring import Prediction
from grdnet.serve import ServeSettings, create_app
from grdnet.visualize import overlay as make_overlay


# ---- helpers -----------------------------------------------------------------------------------

def encode(arr, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def noise(h=40, w=48, c=3, seed=0):
    shape = (h, w, c) if c > 1 else (h, w)
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def png_header(width, height, color_type=2) -> bytes:
    """A PNG signature and IHDR declaring any size, followed by the start of a zero IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def post(client, data, name="part.png", ctype="image/png", **params):
    return client.post("/predict", params=params, files={"file": (name, data, ctype)})


def assert_error(resp, status, *fragments):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "status"} and body["status"] == status
    for f in fragments:
        assert f in body["error"], body["error"]
    return body["error"]


@pytest.fixture(scope="module")
def predictor(trained_tiny):
    return grdnet.load(trained_tiny[0])


@pytest.fixture(scope="module")
def client(predictor):
    with TestClient(create_app(predictor, ServeSettings(max_pixels=2_000_000, max_files=4))) as c:
        yield c


@pytest.fixture(scope="module")
def part(trained_tiny):
    """A defective test image of the tiny dataset: (path, bytes, array)."""
    path = trained_tiny[1] / "test" / "hole" / "000.png"
    return path, path.read_bytes(), np.asarray(Image.open(path).convert("RGB"))


# ---- the endpoints -----------------------------------------------------------------------------

def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and len(body["model_id"]) == 12
    assert body["queue"] == {"waiting": 0, "capacity": 32}


def test_model_metadata(client, predictor):
    m = client.get("/model").json()
    assert m["image_size"] == 32 and m["channels"] == 3 and m["config"]["gen_widths"] == [8, 16]
    assert m["threshold"] == pytest.approx(predictor.threshold)
    assert "quantile" in m["threshold_rule"]
    assert m["training"]["n_train"] == 9 and m["training"]["steps"] == 5  # 2 epochs of 9 images in batches of 4
    assert m["training"]["data"] == "data"  # the folder's name, not the server's path
    assert m["limits"]["max_pixels"] == 2_000_000 and m["limits"]["max_files"] == 4
    assert m["model_id"] == client.get("/health").json()["model_id"]
    # the id is derived from the model, so a second app over the same model agrees
    with TestClient(create_app(predictor)) as other:
        assert other.get("/model").json()["model_id"] == m["model_id"]


def test_predict_matches_the_predictor(client, predictor, part):
    _, data, arr = part
    r = post(client, data)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = predictor.predict(arr)
    assert body["score"] == pytest.approx(expected.score, abs=1e-6)
    assert body["label"] == expected.label and body["is_anomalous"] == expected.is_anomalous
    assert body["threshold"] == pytest.approx(predictor.threshold) and body["threshold_source"] == "model"
    assert (body["width"], body["height"], body["filename"]) == (48, 40, "part.png")
    assert body["overlay_png"] is None and body["batch_images"] == 1
    assert set(body["timings_ms"]) == {"queue", "decode", "inference", "overlay", "total"}
    assert body["timings_ms"]["total"] >= body["timings_ms"]["inference"] > 0


def test_overlay_is_the_heatmap_over_the_image(client, predictor, part):
    _, data, arr = part
    body = post(client, data, overlay="true").json()
    png = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert png.format == "PNG" and png.size == (48, 40)
    expected = make_overlay(arr, predictor.predict(arr).anomaly_map)
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), expected)


def test_threshold_override_relabels(client, part):
    data = part[1]
    s = post(client, data).json()["score"]
    at = post(client, data, threshold=s).json()
    assert at["label"] == "defective" and at["threshold_source"] == "request" and at["threshold"] == s
    if s < 1:
        above = post(client, data, threshold=min(1.0, s + 1e-4)).json()
        assert above["label"] == "good" and above["is_anomalous"] is False
    assert post(client, data, threshold=0).json()["label"] == "defective"


@pytest.mark.parametrize("kind", ["L", "RGBA", "I16", "JPEG", "BMP", "TIFF", "WEBP"])
def test_accepted_formats_and_modes(client, kind):
    if kind == "L":
        data = encode(noise(c=1))
    elif kind == "RGBA":
        data = encode(np.dstack([noise(), np.full((40, 48), 200, np.uint8)]))
    elif kind == "I16":
        data = encode((noise(c=1).astype(np.uint16) * 257))
        assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    else:
        data = encode(noise(), kind)
    r = post(client, data, name=f"x.{kind.lower()}")
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (48, 40)


def test_format_is_sniffed_not_taken_from_the_request(client, part):
    assert post(client, part[1], name="notes.txt", ctype="text/plain").status_code == 200
    assert_error(post(client, b"hello, I am text", name="part.png", ctype="image/png"), 415,
                 "part.png", "not an image", "PNG, JPEG")


def test_not_an_accepted_image_is_415(client):
    gif = encode(noise(c=1), "GIF")
    assert_error(post(client, gif, name="anim.gif", ctype="image/gif"), 415, "anim.gif", "not an image")
    assert_error(post(client, b"", name="empty.png"), 415, "empty.png", "empty file")
    assert_error(post(client, b"%PDF-1.4\n" + b"x" * 100, name="doc.pdf"), 415, "doc.pdf")


def test_corrupt_image_is_422(client, part):
    assert_error(post(client, part[1][:300], name="cut.png"), 422, "cut.png", "cannot decode PNG")
    jpeg = encode(noise(), "JPEG")
    assert_error(post(client, jpeg[: len(jpeg) // 3], name="cut.jpg"), 422, "cut.jpg", "cannot")
    assert_error(post(client, png_header(0, 10), name="zero.png"), 422, "zero.png")


def test_declared_dimensions_are_checked_before_decoding(client):
    assert_error(post(client, png_header(100_000, 100_000), name="huge.png"), 413, "huge.png",
                 "10000000000 pixels", "over the limit of 2000000 pixels")
    assert_error(post(client, png_header(3000, 1000), name="big.png"), 413, "3000x1000", "3000000 pixels")
    # a real decompression bomb: 6000 x 6000 zero pixels compress to ~40 kB
    comp = zlib.compressobj(9)
    row = b"\x00" * (6000 + 1)
    idat = b"".join(comp.compress(row) for _ in range(6000)) + comp.flush()
    bomb = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 6000, 6000, 8, 0, 0, 0, 0))
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    assert len(bomb) < 100_000
    assert_error(post(client, bomb, name="bomb.png"), 413, "6000x6000", "36000000 pixels")
    # a JPEG whose frame header was edited to claim 60000 x 60000
    jpeg = bytearray(encode(noise(), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    assert_error(post(client, bytes(jpeg), name="big.jpg"), 413, "3600000000 pixels")
    jpeg[sof + 5:sof + 9] = struct.pack(">HH", 2000, 2000)
    assert_error(post(client, bytes(jpeg), name="big2.jpg"), 413, "2000x2000")


def test_request_body_over_the_limit_is_413(predictor, part):
    app = create_app(predictor, ServeSettings(max_upload_mb=0.01))
    big = encode(noise(80, 80, seed=3))  # ~19 kB of noise: over 10 kB
    with TestClient(app) as c:
        assert_error(post(c, big), 413, "upload limit of 0.01 MB")
        # without a Content-Length (chunked): counted while streaming
        body = b"".join([b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
                         b"Content-Type: image/png\r\n\r\n", big, b"\r\n--b--\r\n"])
        r = c.post("/predict", content=iter([body[i:i + 4096] for i in range(0, len(body), 4096)]),
                   headers={"content-type": "multipart/form-data; boundary=b"})
        assert "content-length" not in r.request.headers
        assert_error(r, 413, "upload limit")
        assert post(c, part[1]).status_code == 200  # a small one still goes through


def test_image_over_the_pixel_limit_is_413(predictor, part):
    with TestClient(create_app(predictor, ServeSettings(max_pixels=1000))) as c:
        assert_error(post(c, part[1]), 413, "48x40", "1920 pixels", "limit of 1000 pixels")


def test_malformed_requests(client, part):
    assert_error(client.post("/predict", json={"image": "x"}), 415, "multipart/form-data", "'file'",
                 "application/json")
    assert_error(client.post("/predict", content=part[1], headers={"content-type": "image/png"}), 415,
                 "multipart/form-data")
    assert_error(client.post("/predict/batch", content=b"x"), 415, "'files'")
    assert_error(client.post("/predict", files={"image": ("a.png", part[1], "image/png")}), 422,
                 "file: Field required")
    assert_error(client.post("/predict", data={"file": "not a file"}), 415, "x-www-form-urlencoded")
    assert_error(client.post("/predict", data={"file": "not a file"}, files={"other": ("o.png", b"1")}), 422,
                 "file")
    r = client.post("/predict", content=b"--zz\r\ngarbage",
                    headers={"content-type": "multipart/form-data; boundary=zz"})
    assert r.status_code in (400, 422) and "error" in r.json()
    for bad in ("abc", "-0.1", "1.5", "nan", "inf"):
        assert_error(post(client, part[1], threshold=bad), 422, "threshold")


def test_unknown_routes_and_methods(client):
    assert_error(client.get("/nope"), 404, "no such endpoint: /nope")
    assert_error(client.get("/predict"), 405, "GET is not allowed on /predict")
    assert_error(client.get("/static/nothing.js"), 404, "nothing.js")
    assert_error(client.get("/static/..%2Fapp.py"), 404)


def test_batch(client, predictor, part):
    files = [("files", ("a.png", part[1], "image/png")), ("files", ("junk.bin", b"\x00\x01junk", "image/png")),
             ("files", ("b.jpg", encode(noise(seed=5), "JPEG"), "image/jpeg"))]
    r = client.post("/predict/batch", files=files, params={"overlay": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["n_images"] == 3 and body["n_errors"] == 1 and body["batch_images"] == 2
    a, junk, b = body["results"]
    assert [a["filename"], junk["filename"], b["filename"]] == ["a.png", "junk.bin", "b.jpg"]
    assert junk["status"] == 415 and "junk.bin" in junk["error"]
    assert a["score"] == pytest.approx(predictor.predict(part[2]).score, abs=1e-6)
    assert a["overlay_png"] and b["overlay_png"] and b["label"] in ("good", "defective")
    assert body["threshold_source"] == "model"
    assert client.post("/predict/batch", files=files[:1], params={"threshold": 0}).json()["results"][0][
        "label"] == "defective"


def test_batch_limits(client, part):
    five = [("files", (f"{i}.png", part[1], "image/png")) for i in range(5)]
    assert_error(client.post("/predict/batch", files=five), 413, "5 files", "limit is 4")
    assert_error(client.post("/predict/batch", files={"file": ("a.png", part[1])}), 422, "files: Field required")


# ---- regions of interest -----------------------------------------------------------------------

SHAPES = {"rects": [[3, 4, 20, 15]], "polygons": [[30, 5, 45, 10, 38, 35]]}


def roi_of(client, width=48, height=40, shapes=SHAPES, **kw):
    data = {"width": str(width), "height": str(height),
            "shapes": shapes if isinstance(shapes, str) else json.dumps(shapes)}
    # files={} forces multipart/form-data, as the page sends it
    return client.post("/roi", data=data, files=kw.pop("files", {"_": ("", b"")}), **kw)


def test_roi_endpoint_writes_what_grdnet_roi_writes(client, part, tmp_path, capsys):
    from grdnet.cli import main

    r = roi_of(client)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and 'filename="roi.png"' in r.headers["content-disposition"]
    out = tmp_path / "roi.png"
    assert main(["roi", "--like", str(part[0]), "--rect", "3,4,20,15", "--polygon", "30,5,45,10,38,35",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert r.content == out.read_bytes()  # the same file, byte for byte
    png = Image.open(io.BytesIO(r.content))
    assert png.mode == "L" and png.size == (48, 40)
    mask = np.asarray(png)
    assert set(np.unique(mask)) == {0, 255} and mask[4:16, 3:21].all() and not mask[0:4].any()
    assert float(r.headers["x-roi-coverage"]) == pytest.approx((mask > 0).mean(), abs=1e-6)
    assert "/roi" in client.get("/openapi.json").json()["paths"]


def test_roi_endpoint_refuses_bad_shapes(client, predictor):
    assert_error(roi_of(client, shapes={"rects": []}), 422, "the ROI is empty")
    assert_error(roi_of(client, shapes={"rects": [[-9, -9, -5, -5]]}), 422, "the ROI is empty")  # all outside
    assert_error(roi_of(client, shapes="{not json"), 422, "shapes: not valid JSON")
    assert_error(roi_of(client, shapes="[" * 100_000), 422, "shapes: not valid JSON")
    assert_error(roi_of(client, shapes='{"rects": [[0, 0, NaN, 4]]}'), 422, "finite numbers")
    assert_error(roi_of(client, shapes={"rects": [[0, 0, 10 ** 40, 4]]}), 422, "finite numbers")
    assert_error(roi_of(client, shapes={"rects": [[0, 0, 4]]}), 422, "x0,y0,x1,y1")
    assert_error(roi_of(client, shapes={"polygons": [[0, 0, 4, 4]]}), 422, "at least 3")
    assert_error(roi_of(client, shapes={"circles": []}), 422, '"rects"')
    assert_error(roi_of(client, shapes={"rects": [[0, 0, 1, 1]] * 1001}), 413, "1001 shapes")
    assert_error(roi_of(client, width=2000, height=2000), 413, "2000x2000", "2000000 pixels")
    assert_error(roi_of(client, width=0), 422, "width")
    assert_error(client.post("/roi", data={"width": "4", "height": "4"}, files={"_": ("", b"")}), 422,
                 "shapes: Field required")
    assert_error(client.post("/roi", json={"width": 4}), 415, "'width', 'height' and 'shapes'")
    with TestClient(create_app(predictor, ServeSettings(api_key="s3cret"))) as c:
        assert_error(roi_of(c), 401, "API key")
        assert roi_of(c, headers={"X-API-Key": "s3cret"}).status_code == 200


def roi_mask(shape=(40, 48), box=(5, 8, 30, 40)):
    m = np.zeros(shape, np.uint8)
    m[box[0]:box[2], box[1]:box[3]] = 255
    return m


def test_predict_with_a_roi_restricts_the_map_and_the_score(client, predictor, part):
    _, data, arr = part
    mask = roi_mask()
    r = client.post("/predict", params={"overlay": "true"},
                    files={"file": ("part.png", data), "roi": ("roi.png", encode(mask))})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = predictor.predict(arr, roi=mask > 0)
    assert body["score"] == pytest.approx(expected.score, abs=1e-6)
    assert body["roi"] == {"filename": "roi.png", "coverage": pytest.approx((mask > 0).mean()),
                           "resized_from": None}
    assert not expected.anomaly_map[mask == 0].any()
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))).convert("RGB"))
    np.testing.assert_array_equal(shown[mask == 0], arr[mask == 0])  # no heat outside the ROI
    assert post(client, data).json()["roi"] is None  # without a ROI: as before

    # a ROI drawn at another resolution is resized to the image (nearest neighbour), as --roi files are
    big = np.kron(mask, np.ones((2, 2), np.uint8))
    r2 = client.post("/predict", files={"file": ("part.png", data), "roi": ("big.png", encode(big))}).json()
    assert r2["roi"]["resized_from"] == [96, 80] and r2["score"] == pytest.approx(body["score"], abs=1e-6)


def test_bad_roi_uploads_are_refused(client, part):
    data = part[1]

    def with_roi(roi_bytes, name="roi.png"):
        return client.post("/predict", files={"file": ("part.png", data), "roi": (name, roi_bytes)})

    assert_error(with_roi(encode(np.zeros((40, 48), np.uint8))), 422, "ROI roi.png: the mask is all black")
    assert_error(with_roi(b"not a mask", "notes.txt"), 415, "ROI notes.txt: not an image")
    assert_error(with_roi(png_header(5000, 5000, 0)), 413, "ROI roi.png", "over the limit")
    thin = np.zeros((400, 480), np.uint8)
    thin[3, :] = 255  # one row, lost when shrunk ten times
    assert_error(with_roi(encode(thin)), 422, "empty once resized")


def test_batch_with_one_roi_for_every_image(client, predictor, part):
    files = [("files", ("a.png", part[1])), ("files", ("b.png", encode(noise(seed=3))))]
    body = client.post("/predict/batch", files=files + [("roi", ("roi.png", encode(roi_mask())))]).json()
    assert body["n_errors"] == 0 and all(it["roi"]["coverage"] > 0 for it in body["results"])
    assert body["results"][0]["score"] == pytest.approx(predictor.predict(part[2], roi=roi_mask() > 0).score,
                                                        abs=1e-6)
    black = encode(np.zeros((40, 48), np.uint8))
    body = client.post("/predict/batch", files=files + [("roi", ("roi.png", black))]).json()
    assert body["n_errors"] == 2 and {it["status"] for it in body["results"]} == {422}


def test_page_and_docs(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert '<script src="/static/app.js"' in r.text and 'id="threshold"' in r.text
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        s = client.get(f"/static/{name}")
        assert s.status_code == 200 and s.headers["content-type"].startswith(ctype)
    for name in ("index.html", "app.js", "style.css"):  # works offline: nothing loaded from elsewhere
        text = client.get(f"/static/{name}").text
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/predict/batch", "/health", "/model"} <= set(spec["paths"])
    assert "X-API-Key" in json.dumps(spec["components"]["securitySchemes"])
    assert client.get("/docs").status_code == 200


def test_api_key(predictor, part):
    with TestClient(create_app(predictor, ServeSettings(api_key="s3cret"))) as c:
        assert_error(post(c, part[1]), 401, "API key", "X-API-Key")
        assert_error(c.post("/predict", files={"file": ("a.png", part[1])}, headers={"X-API-Key": "wrong"}), 401)
        assert_error(c.get("/model"), 401)
        assert_error(c.post("/predict/batch", files=[("files", ("a.png", part[1]))]), 401)
        ok = {"X-API-Key": "s3cret"}
        assert c.post("/predict", files={"file": ("a.png", part[1])}, headers=ok).status_code == 200
        assert c.get("/model", headers=ok).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # open


def test_settings_are_validated():
    with pytest.raises(GRDNetError, match="max-batch must be positive"):
        ServeSettings(max_batch=0)
    assert ServeSettings(api_key="").api_key is None


# ---- concurrency and failures, with duck-typed fake predictors ---------------------------------

class FakePredictor:
    """The interface the service needs, nothing more: what an exported model also offers."""

    def __init__(self, channels=3, block=False, fail_if=None, score=0.3):
        self.cfg = ModelConfig(**{**PRESETS["tiny"][0], "channels": channels})
        self.threshold, self.meta = 0.5, {"threshold_rule": "fixed for the test"}
        self.batches, self.shapes = [], []
        self.entered, self.release = threading.Event(), threading.Event()
        self.block, self.fail_if, self.score = block, fail_if, score

    def predict(self, images, threshold=None):
        self.batches.append(len(images))
        self.shapes.extend(a.shape for a in images)
        self.entered.set()
        if self.block:
            assert self.release.wait(30)
        if self.fail_if is not None and any(self.fail_if(a) for a in images):
            raise RuntimeError("simulated inference failure")
        return [Prediction(self.score, self.score >= self.threshold, self.threshold,
                           np.zeros(a.shape[:2], np.float32)) for a in images]


def wait_until(cond, timeout=10.0):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end, "timed out"
        time.sleep(0.01)


def test_queue_full_is_503_and_waiting_requests_share_a_forward_pass():
    fake = FakePredictor(block=True)
    app = create_app(fake, ServeSettings(queue_size=2))
    img = encode(noise())
    with TestClient(app) as c, ThreadPoolExecutor(4) as pool:
        first = pool.submit(post, c, img)
        assert fake.entered.wait(10)  # the worker holds the first request
        queued = [pool.submit(post, c, img) for _ in range(2)]
        wait_until(lambda: app.state.batcher.depth == 2)
        r = post(c, img)
        assert_error(r, 503, "queue is full", "retry")
        assert r.headers["retry-after"] == "1"
        assert c.get("/health").json()["queue"] == {"waiting": 2, "capacity": 2}
        fake.release.set()
        assert first.result().status_code == 200
        second = [q.result() for q in queued]
        assert [x.status_code for x in second] == [200, 200]
        assert [x.json()["batch_images"] for x in second] == [2, 2]
    assert fake.batches == [1, 2]  # the two waiting requests went through one forward pass


def test_micro_batches_are_capped_at_max_batch():
    fake = FakePredictor(block=True)
    app = create_app(fake, ServeSettings(max_batch=2, queue_size=8))
    img = encode(noise())
    with TestClient(app) as c, ThreadPoolExecutor(4) as pool:
        first = pool.submit(post, c, img)
        assert fake.entered.wait(10)
        rest = [pool.submit(post, c, img) for _ in range(3)]
        wait_until(lambda: app.state.batcher.depth == 3)
        fake.release.set()
        assert all(f.result().status_code == 200 for f in [first, *rest])
    assert fake.batches == [1, 2, 1]


def test_inference_failure_is_a_json_500_and_spares_the_others():
    fake = FakePredictor(block=True, fail_if=lambda a: a.mean() > 250)
    app = create_app(fake, ServeSettings())
    good, poison = encode(noise()), encode(np.full((40, 48, 3), 255, np.uint8))
    with TestClient(app) as c, ThreadPoolExecutor(4) as pool:
        first = pool.submit(post, c, good)
        assert fake.entered.wait(10)
        together = [pool.submit(post, c, good), pool.submit(post, c, poison)]
        wait_until(lambda: app.state.batcher.depth == 2)
        fake.release.set()
        assert first.result().status_code == 200
        ok, bad = (f.result() for f in together)
        assert ok.status_code == 200
        assert_error(bad, 500, "inference failed")
        assert c.get("/health").json()["status"] == "ok"
        assert post(c, good).status_code == 200  # the worker is still alive
    assert fake.batches == [1, 2, 1, 1, 1]  # the failed batch of two was retried one by one


def test_non_finite_score_is_a_json_500():
    with TestClient(create_app(FakePredictor(score=float("nan")))) as c:
        assert_error(post(c, encode(noise())), 500, "non-finite score")


def test_grayscale_model_gets_one_channel_arrays():
    fake = FakePredictor(channels=1)
    with TestClient(create_app(fake)) as c:
        assert post(c, encode(noise())).status_code == 200
        assert post(c, encode(noise(c=1))).status_code == 200
    assert fake.shapes == [(40, 48, 1), (40, 48, 1)]


# ---- the command ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_runs_a_real_server(trained_tiny, part):
    port = free_port()
    env = {**os.environ, "GRDNET_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, "-m", "grdnet.cli", "serve", str(trained_tiny[0]), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.3)
        assert httpx.get(base + "/model").status_code == 401  # the key came from the environment
        r = httpx.post(base + "/predict", files={"file": ("a.png", part[1])}, headers={"X-API-Key": "k3y"})
        assert r.status_code == 200 and 0 <= r.json()["score"] <= 1
        assert httpx.get(base + "/model", headers={"X-API-Key": "k3y"}).json()["name"] == trained_tiny[0].name
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"serving {trained_tiny[0]} on http://127.0.0.1:{port}/" in out
    assert "Traceback" not in out


def test_cli_serve_errors(trained_tiny, tmp_path, capsys):
    from grdnet.cli import main

    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "no such model folder" in capsys.readouterr().err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(trained_tiny[0]), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", str(trained_tiny[0]), "--max-batch", "0"]) == 2
    assert "max-batch must be positive" in capsys.readouterr().err


def test_worker_process_factory(trained_tiny, part, monkeypatch):
    """What each process of `grdnet serve --workers N` runs: the app built from the environment."""
    import torch

    from grdnet.serve.app import ENV_CONFIG, app_from_env

    monkeypatch.setenv(ENV_CONFIG, json.dumps({"model": str(trained_tiny[0]), "workers": 2,
                                               "settings": {"max_files": 3, "api_key": "k"}}))
    threads = torch.get_num_threads()
    try:
        app = app_from_env()
        assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)
    finally:
        torch.set_num_threads(threads)
    with TestClient(app) as c:
        assert c.get("/model", headers={"X-API-Key": "k"}).json()["limits"]["max_files"] == 3
        assert c.post("/predict", files={"file": ("a.png", part[1])}, headers={"X-API-Key": "k"}).status_code == 200
