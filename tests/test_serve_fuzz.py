"""Fuzzing `/predict` with hostile uploads: random bytes, truncated and bit-flipped PNGs/JPEGs,
headers declaring huge images, and wrong content types. The service must answer every one with
a JSON client error (or a score), never a 500, and stay up."""
import io
import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

import grdnet
from grdnet.serve import ServeSettings, create_app

CLIENT_ERRORS = {400, 413, 415, 422}
# Pillow warns about corrupt metadata and about images between its own two size limits: expected
# here, and the service answers those uploads with 422 or 413 anyway.
pytestmark = [pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning:PIL")]


def _encode(fmt: str, size=(24, 20), mode="RGB") -> bytes:
    a = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, fmt)
    return buf.getvalue()


VALID = {"png": _encode("PNG"), "jpeg": _encode("JPEG"), "png_gray": _encode("PNG", mode="L"),
         "bmp": _encode("BMP"), "tiff": _encode("TIFF"), "webp": _encode("WEBP")}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@st.composite
def huge_png(draw):
    w = draw(st.integers(1, 2 ** 31 - 1))
    h = draw(st.integers(1, 2 ** 31 - 1))
    color = draw(st.sampled_from([0, 2, 3, 4, 6]))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    idat = zlib.compress(b"\x00" * draw(st.integers(0, 20000)))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@st.composite
def huge_jpeg(draw):
    data = bytearray(VALID["jpeg"])
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", draw(st.integers(0, 65535)), draw(st.integers(0, 65535)))
    return bytes(data)


@st.composite
def truncated(draw):
    data = VALID[draw(st.sampled_from(sorted(VALID)))]
    return data[:draw(st.integers(0, len(data) - 1))]


@st.composite
def mutated(draw):
    data = bytearray(VALID[draw(st.sampled_from(sorted(VALID)))])
    for _ in range(draw(st.integers(1, 8))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    return bytes(data)


payloads = st.one_of(st.binary(max_size=4096), truncated(), mutated(), huge_png(), huge_jpeg(),
                     st.sampled_from(list(VALID.values())))
content_types = st.one_of(
    st.sampled_from(["image/png", "image/jpeg", "text/plain", "application/octet-stream", "application/json",
                     "image/svg+xml", "multipart/form-data", ""]),
    st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40))
filenames = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF, exclude_categories=("Cs",)),
                    max_size=60)


@pytest.fixture(scope="module")
def client(trained_tiny):
    app = create_app(grdnet.load(trained_tiny[0]), ServeSettings(max_pixels=1_000_000, max_upload_mb=1))
    # raise_server_exceptions=False: a bug must show up as a 500 answer here, not as an exception
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _check(resp):
    event(f"status {resp.status_code}")  # see the spread with --hypothesis-show-statistics
    assert resp.status_code == 200 or resp.status_code in CLIENT_ERRORS, (resp.status_code, resp.text)
    body = resp.json()
    if resp.status_code == 200:
        assert 0.0 <= body["score"] <= 1.0 and body["label"] in ("good", "defective")
    else:
        assert body["status"] == resp.status_code and body["error"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=payloads, ctype=content_types, name=filenames, overlay=st.booleans())
def test_fuzz_uploads(client, data, ctype, name, overlay):
    _check(client.post("/predict", params={"overlay": overlay}, files={"file": (name, data, ctype)}))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=payloads, ctype=content_types)
def test_fuzz_whole_request_bodies(client, data, ctype):
    """The raw body is the image (not multipart), under any declared content type."""
    _check(client.post("/predict", content=data, headers={"content-type": ctype} if ctype else {}))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.tuples(payloads, content_types), min_size=1, max_size=4))
def test_fuzz_batches(client, parts):
    files = [("files", (f"f{i}", d, c)) for i, (d, c) in enumerate(parts)]
    resp = client.post("/predict/batch", files=files)
    assert resp.status_code in {200} | CLIENT_ERRORS, (resp.status_code, resp.text)
    if resp.status_code == 200:
        results = resp.json()["results"]
        assert len(results) == len(parts)
        assert all(r.get("status", 200) in CLIENT_ERRORS or 0 <= r["score"] <= 1 for r in results)


def test_still_healthy_after_fuzzing(client):
    """Runs after the fuzz tests (pytest keeps file order): the server is up and still scores."""
    assert client.get("/health").json()["status"] == "ok"
    r = client.post("/predict", files={"file": ("ok.png", VALID["png"], "image/png")})
    assert r.status_code == 200 and 0 <= r.json()["score"] <= 1
