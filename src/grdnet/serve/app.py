"""The inspection service: a thin FastAPI layer over a predictor.

The predictor is anything with `.predict(images)` (returning objects with `.score` and
`.anomaly_map`; called with `roi=` too for requests that send a ROI mask), `.cfg` (a
`ModelConfig`), `.threshold` and `.meta`: what `grdnet.load` returns for a model folder (or an
exported model). All inference runs on one worker thread behind a bounded queue (see
`batcher`); every error is answered as JSON `{"error": ..., "status": ...}`.
"""
# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations, which
# refer to objects local to the functions that register the endpoints.
import asyncio
import base64
import dataclasses
import inspect
import io
import ipaddress
import json
import logging
import math
import os
import secrets
import socket
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..describe import describe_model
from ..errors import GRDNetError
from ..version import __version__
from .batcher import MicroBatcher, QueueFull, Scored
from .rois import roi_png
from .uploads import ACCEPTED_TEXT, Upload, UploadError

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
ENV_CONFIG = "GRDNET_SERVE_CONFIG"  # how `serve` hands its arguments to worker processes


@dataclass
class ServeSettings:
    """Limits and options of the service (the `grdnet serve` options)."""

    max_upload_mb: float = 32.0  # per request body
    max_pixels: int = 40_000_000  # per image, read from the header before decoding
    max_files: int = 16  # per /predict/batch request
    max_batch: int = 8  # images per forward pass
    queue_size: int = 32  # requests waiting for the worker; beyond that: 503
    api_key: str | None = None  # required in X-API-Key for /predict* and /model when set
    model_name: str | None = None  # shown in /model; defaults to the model folder's name

    def __post_init__(self):
        for name in ("max_upload_mb", "max_pixels", "max_files", "max_batch", "queue_size"):
            if not getattr(self, name) > 0:
                raise GRDNetError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        self.api_key = self.api_key or None


# ---- response bodies (for the OpenAPI docs; handlers return plain dicts) -----------------------

class Timings(BaseModel):
    queue: float = Field(description="waiting for the inference worker, ms")
    decode: float = Field(description="decoding this request's images, ms")
    inference: float = Field(description="the forward pass this request was part of, ms")
    overlay: float = Field(description="rendering overlays, ms")
    total: float = Field(description="in the service, after the upload was received, ms")


class RegionResult(BaseModel):
    x: int = Field(description="bounding box: left column, pixels of the image")
    y: int = Field(description="bounding box: top row")
    width: int
    height: int
    area: int = Field(description="defect pixels in the region")
    peak: float = Field(description="the largest map value in the region")
    mean: float = Field(description="the mean map value over the region's pixels")


class RoiResult(BaseModel):
    filename: str = Field(description="the ROI upload's name")
    coverage: float = Field(description="fraction of the image inside the ROI")
    resized_from: list[int] | None = Field(description="[width, height] of a ROI of another size than the "
                                                       "image, resized to it (nearest neighbour)")


class ItemResult(BaseModel):
    filename: str
    width: int
    height: int
    score: float = Field(description="image anomaly score in [0, 1]")
    label: Literal["good", "defective"] | None = Field(description="null when there is no threshold")
    is_anomalous: bool | None
    roi: RoiResult | None = Field(None, description="the ROI the map and score were restricted to (with a roi upload)")
    pixel_threshold: float | None = Field(None, description="the map value at which a pixel is a defect pixel")
    regions: list[RegionResult] = Field([], description="8-connected groups of defect pixels, highest peak first")
    overlay_png: str | None = Field(None, description="heatmap overlay with region contours, base64 PNG "
                                                      "(with ?overlay=true)")
    defect_mask_png: str | None = Field(None, description="binary defect mask (255: defect), base64 PNG of the "
                                                          "image's size (with ?mask=true)")


class ItemError(BaseModel):
    filename: str
    error: str
    status: int


class PredictResponse(ItemResult):
    model_config = ConfigDict(protected_namespaces=())  # `model_id` is ours (pydantic < 2.10 warns)
    threshold: float | None
    threshold_source: Literal["model", "request", "none"]
    model_id: str
    batch_images: int = Field(description="images in the forward pass this request shared")
    timings_ms: Timings


class BatchResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model_id: str
    threshold: float | None
    threshold_source: Literal["model", "request", "none"]
    n_images: int
    n_errors: int
    batch_images: int
    timings_ms: Timings
    results: list[Union[ItemResult, ItemError]]


class ErrorBody(BaseModel):
    error: str = Field(description="what went wrong, in one line")
    status: int


def _errors(*codes: int) -> dict:
    return {c: {"model": ErrorBody} for c in codes}


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


# ---- model metadata ----------------------------------------------------------------------------

def _public_description(predictor, name: str | None) -> dict:
    """What `GET /model` shows: the model's description (`describe_model`) without server paths:
    no model folder, and of the training data folder only its name."""
    info = {**describe_model(predictor), "name": name}
    del info["path"]
    training = info.get("training")
    if isinstance(training, dict) and training.get("data"):
        training["data"] = Path(str(training["data"])).name
    if info["trained_on"]:
        info["trained_on"] = Path(str(info["trained_on"])).name
    return info


# ---- limits ------------------------------------------------------------------------------------

class BodyLimit:
    """Refuse request bodies over `max_bytes` (413) by Content-Length before reading them, and
    while streaming when there is none, so an upload never fills memory or the temp folder."""

    def __init__(self, app, max_bytes: int, max_mb: float):
        self.app, self.max_bytes, self.max_mb = app, max_bytes, max_mb

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body is over the upload limit of {self.max_mb:g} MB"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(413, message)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, message)  # FastAPI re-raises these from body parsing
            return msg

        await self.app(scope, limited, send)


# ---- the app -----------------------------------------------------------------------------------

def create_app(predictor, settings: ServeSettings | None = None) -> FastAPI:
    """The service for one loaded model (see the module doc for what `predictor` must offer)."""
    settings = settings or ServeSettings()
    info = _public_description(predictor, settings.model_name)
    info["limits"] = {"max_upload_mb": settings.max_upload_mb, "max_pixels": settings.max_pixels,
                      "max_files": settings.max_files, "max_batch": settings.max_batch,
                      "queue_size": settings.queue_size, "formats": ACCEPTED_TEXT}
    batcher = MicroBatcher(predictor, settings.max_batch, settings.queue_size, settings.max_pixels)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(
        title="grdnet inspection service", version=__version__, lifespan=lifespan,
        description=("Anomaly scores, decisions and heatmaps from a trained GRD-Net model. Upload images "
                     f"as multipart/form-data ({ACCEPTED_TEXT}). Errors are JSON: "
                     '`{"error": "...", "status": N}`.'))
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_upload_mb * 2 ** 20), max_mb=settings.max_upload_mb)
    require_key = _key_check(settings.api_key)
    _add_error_handlers(app)
    _add_inference_routes(app, predictor, batcher, settings, info["model_id"], require_key)
    _add_roi_route(app, settings, require_key)
    _add_status_routes(app, batcher, settings, info, require_key)
    _add_page_routes(app)
    return app


def _key_check(api_key: str | None):
    """The dependency that guards /predict* and /model: 401 unless X-API-Key is `api_key` (when set)."""
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="required when the service was started with an API key")

    def require_key(key: Annotated[str | None, Security(key_header)] = None):
        if api_key is None:
            return
        if key is None or not secrets.compare_digest(key.encode(), api_key.encode()):
            raise HTTPException(401, "missing or wrong API key (send it in the X-API-Key header)")

    return require_key


# ---- errors: always JSON, never a stack trace --------------------------------------------------

def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no such endpoint: {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 400 and message == "There was an error parsing the body":
            message = "malformed multipart/form-data body"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        ctype = request.headers.get("content-type", "")
        if request.method == "POST" and not ctype.lower().startswith("multipart/form-data"):
            if request.url.path == "/roi":
                what = "the form fields 'width', 'height' and 'shapes'"
            else:
                field = "files" if request.url.path.endswith("/batch") else "file"
                what = f"the image(s) in the form field '{field}'"
            return _error(415, f"expected a multipart/form-data upload with {what}, got content type "
                               f"'{ctype or 'none'}'")
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return _error(500, "internal error (see the server log)")


# ---- inference ---------------------------------------------------------------------------------

async def _infer(batcher: MicroBatcher, queue_size: int, uploads: list[Upload], overlay: bool,
                 threshold: float | None = None, pixel_threshold: float | None = None):
    """Score `uploads` on the worker: (the batch result, this request's timings in ms)."""
    t0 = time.perf_counter()
    try:
        future = batcher.submit(uploads, overlay, threshold, pixel_threshold)
    except QueueFull:
        raise HTTPException(503, f"busy: the inference queue is full ({queue_size} requests "
                                 "waiting); retry shortly", headers={"Retry-After": "1"}) from None
    try:
        result = await asyncio.wrap_future(future)
    except Exception:
        log.exception("inference failed")
        raise HTTPException(500, "inference failed (see the server log)") from None
    timings = {**result.timings_ms, "total": round((time.perf_counter() - t0) * 1000, 2)}
    return result, timings


def _threshold_used(predictor, override: float | None):
    """(threshold, where it came from): the request's, else the model's, else none."""
    if override is not None:
        return override, "request"
    if predictor.threshold is not None:
        return float(predictor.threshold), "model"
    return None, "none"


def _item_json(name: str, item, thr: float | None, mask: bool = False) -> dict:
    """One image's result (`ItemResult`), or its error (`ItemError`)."""
    if not isinstance(item, Scored):
        return {"filename": name, "error": str(item), "status": item.status}
    score = float(item.prediction.score)
    if not math.isfinite(score):
        return {"filename": name, "error": f"{name}: the model produced a non-finite score", "status": 500}
    flagged = None if thr is None else score >= thr
    p = item.prediction
    out = {"filename": name, "width": item.width, "height": item.height, "score": score,
           "label": None if flagged is None else ("defective" if flagged else "good"),
           "is_anomalous": flagged, "pixel_threshold": getattr(p, "pixel_threshold", None),
           "regions": [r.to_dict() for r in getattr(p, "regions", [])]}
    if item.overlay_png is not None:
        out["overlay_png"] = item.overlay_png
    if getattr(item, "roi", None) is not None:
        out["roi"] = item.roi
    if mask and getattr(p, "defect_mask", None) is not None:
        buf = io.BytesIO()
        Image.fromarray(p.defect_mask.astype(np.uint8) * 255).save(buf, "PNG")
        out["defect_mask_png"] = base64.b64encode(buf.getvalue()).decode("ascii")
    return out


def _add_inference_routes(app: FastAPI, predictor, batcher: MicroBatcher, settings: ServeSettings,
                          model_id: str, require_key) -> None:
    """POST /predict and /predict/batch."""
    threshold_q = Query(ge=0.0, le=1.0, description="override the model's threshold for this request")
    overlay_q = Query(description="also return the heatmap overlay as a base64 PNG")
    roi_f = File(description="optional ROI mask (white: inspect): the map is zeroed outside it and the score "
                             "computed inside it; resized to the image if its size differs")
    pixel_q = Query(ge=0.0, le=1.0, description="override the model's pixel threshold (defect mask, regions)")
    mask_q = Query(description="also return the binary defect mask as a base64 PNG")

    @app.post("/predict", response_model=PredictResponse, response_model_exclude_none=False,
              dependencies=[Depends(require_key)], responses=_errors(401, 413, 415, 422, 503),
              summary="Score one image")
    async def predict(file: Annotated[UploadFile, File(description=f"the image ({ACCEPTED_TEXT})")],
                      roi: Annotated[UploadFile | None, roi_f] = None,
                      threshold: Annotated[float | None, threshold_q] = None,
                      overlay: Annotated[bool, overlay_q] = False,
                      pixel_threshold: Annotated[float | None, pixel_q] = None,
                      mask: Annotated[bool, mask_q] = False):
        name = _name(file.filename, 0)
        upload = Upload(name, await file.read(), await _roi_upload(roi))
        result, timings = await _infer(batcher, settings.queue_size, [upload], overlay, threshold,
                                       pixel_threshold)
        thr, source = _threshold_used(predictor, threshold)
        item = _item_json(name, result.items[0], thr, mask)
        if "error" in item:
            raise HTTPException(item["status"], item["error"])
        return {**item, "threshold": thr, "threshold_source": source, "model_id": model_id,
                "batch_images": result.batch_images, "timings_ms": timings}

    @app.post("/predict/batch", response_model=BatchResponse, dependencies=[Depends(require_key)],
              responses=_errors(401, 413, 415, 422, 503), summary="Score several images",
              description="One result per file, in order. A file that cannot be scored gets "
                          "`{filename, error, status}` in its place; the others are still scored.")
    async def predict_batch(files: Annotated[list[UploadFile], File(description="the images")],
                            roi: Annotated[UploadFile | None, roi_f] = None,
                            threshold: Annotated[float | None, threshold_q] = None,
                            overlay: Annotated[bool, overlay_q] = False,
                            pixel_threshold: Annotated[float | None, pixel_q] = None,
                            mask: Annotated[bool, mask_q] = False):
        if len(files) > settings.max_files:
            raise HTTPException(413, f"{len(files)} files in one request; the limit is {settings.max_files}")
        shared_roi = await _roi_upload(roi)  # one ROI for every image (a fixed camera), as `--roi FILE`
        uploads = [Upload(_name(f.filename, i), await f.read(), shared_roi) for i, f in enumerate(files)]
        result, timings = await _infer(batcher, settings.queue_size, uploads, overlay, threshold, pixel_threshold)
        thr, source = _threshold_used(predictor, threshold)
        items = [_item_json(u.name, it, thr, mask) for u, it in zip(uploads, result.items)]
        return {"model_id": model_id, "threshold": thr, "threshold_source": source, "n_images": len(items),
                "n_errors": sum("error" in it for it in items), "batch_images": result.batch_images,
                "timings_ms": timings, "results": items}


async def _roi_upload(roi: UploadFile | None) -> Upload | None:
    return None if roi is None else Upload(_name(roi.filename, 0), await roi.read())


def _add_roi_route(app: FastAPI, settings: ServeSettings, require_key) -> None:
    """POST /roi: the mask of the page's ROI editor, made and written as `grdnet roi` does."""
    drawing = asyncio.Semaphore(2)  # a mask can be --max-pixels large: bound how many are in memory
    shapes_f = Form(description='JSON in image pixels, as `grdnet roi --shapes`: {"rects": [[x0, y0, x1, y1], '
                                '...], "polygons": [[x, y, x, y, x, y, ...], ...]}')

    @app.post("/roi", dependencies=[Depends(require_key)], response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "the ROI mask: 8-bit grayscale PNG, "
                                                                           "255 inside, 0 outside"},
                         **_errors(401, 413, 415, 422)},
              summary="Make a ROI mask from rectangles and polygons (what `grdnet roi` writes)")
    async def roi(width: Annotated[int, Form(ge=1, description="the mask's width: the image's, pixels")],
                  height: Annotated[int, Form(ge=1, description="the mask's height")],
                  shapes: Annotated[str, shapes_f]):
        async with drawing:
            try:
                png, coverage = await asyncio.to_thread(roi_png, width, height, shapes, settings.max_pixels)
            except UploadError as e:
                raise HTTPException(e.status, str(e)) from None
        return Response(png, media_type="image/png",
                        headers={"Content-Disposition": 'attachment; filename="roi.png"',
                                 "X-ROI-Coverage": f"{coverage:.6f}"})


def _add_status_routes(app: FastAPI, batcher: MicroBatcher, settings: ServeSettings, info: dict,
                       require_key) -> None:
    """GET /health and /model."""
    started = time.time()

    @app.get("/health", summary="Liveness and queue depth (no API key needed)")
    async def health():
        return {"status": "ok", "model_id": info["model_id"], "queue": {"waiting": batcher.depth,
                                                                        "capacity": settings.queue_size},
                "uptime_s": round(time.time() - started, 1), "version": __version__}

    @app.get("/model", dependencies=[Depends(require_key)], responses=_errors(401),
             summary="Model metadata: config, image size, threshold and its rule, training summary")
    async def model():
        return info


# ---- the operator's page: fixed files, same-origin only (works offline) ------------------------

_PAGE_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
             "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _add_page_routes(app: FastAPI) -> None:
    """GET / and /static/{name}: the files in `STATIC`, listed once (nothing else is served)."""
    page_files = {p.name: p for p in STATIC.iterdir() if p.is_file()} if STATIC.is_dir() else {}

    def page_file(name: str) -> Response:
        path = page_files.get(name)
        if path is None:
            raise HTTPException(404, f"no such file: {name}")
        return Response(path.read_bytes(), media_type=_PAGE_TYPES.get(path.suffix, "application/octet-stream"),
                        headers={"Content-Security-Policy": _PAGE_CSP, "X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    async def index():
        return page_file("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        return page_file(name)


def _name(filename: str | None, i: int) -> str:
    """A display name for an upload: the base name the client sent, bounded."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
    return (base or f"upload-{i}")[:200]


# ---- running it --------------------------------------------------------------------------------

def app_from_env() -> FastAPI:
    """Factory for uvicorn worker processes (`serve(..., workers > 1)`): each loads the model."""
    import torch

    from ..api import load

    conf = json.loads(os.environ[ENV_CONFIG])
    # N processes share the cores instead of each starting a thread per core.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // conf["workers"]))
    predictor = load(conf["model"])
    warm_up(predictor)
    return create_app(predictor, ServeSettings(**conf["settings"]))


def warm_up(predictor) -> None:
    """One throw-away forward pass, so the first part on the line is not the slow one."""
    import numpy as np

    size, channels = predictor.cfg.image_size, predictor.cfg.channels
    predictor.predict([np.zeros((size, size, channels), np.uint8)])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(model, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          settings: ServeSettings | None = None, log_level: str = "info") -> None:
    """Load `model` and serve it with uvicorn until interrupted."""
    import uvicorn

    from ..api import load

    settings = settings or ServeSettings()
    if workers < 1:
        raise GRDNetError(f"workers must be at least 1, got {workers}")
    predictor = load(model)  # a bad model is a one-line error now, not in a worker process
    if settings.model_name is None:
        settings.model_name = Path(model).name
    _check_port(host, port)
    if not is_loopback(host) and settings.api_key is None:
        log.warning("serving on %s without an API key: anyone who can reach port %d can use the model "
                    "(set GRDNET_API_KEY or --api-key)", host, port)
    print(f"serving {model} on http://{host}:{port}/ (API docs at /docs)", flush=True)
    if workers == 1:
        warm_up(predictor)
        uvicorn.run(create_app(predictor, settings), host=host, port=port, log_level=log_level)
        return
    del predictor
    os.environ[ENV_CONFIG] = json.dumps({"model": str(model), "workers": workers,
                                         "settings": dataclasses.asdict(settings)})
    extra = {}
    if "timeout_worker_healthcheck" in inspect.signature(uvicorn.Config).parameters:
        # loading torch and the model can outlast uvicorn's 5 s liveness check on a busy machine
        extra["timeout_worker_healthcheck"] = 120
    uvicorn.run("grdnet.serve.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                log_level=log_level, **extra)


def _check_port(host: str, port: int) -> None:
    """A clear error for a port in use or an address not on this machine (uvicorn only logs)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise GRDNetError(f"cannot resolve host {host!r} ({e})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise GRDNetError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
