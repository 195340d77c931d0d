"""One inference thread fed by a bounded queue: bounded concurrency for the service.

Requests put jobs (one or more uploads) on the queue; when the queue is full they are refused
(the service answers 503) instead of piling up threads or memory. The worker takes a job, then
every job already waiting, up to `max_batch` images, and runs them through the predictor as one
batch: requests that arrive together share a forward pass, and a lone request never waits for
company. Decoding happens in the worker too, so at most one batch of decoded images is in
memory at a time.
"""
from __future__ import annotations

import base64
import io
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..data import pil_to_array
from ..visualize import overlay as make_overlay
from .rois import decode_roi
from .uploads import Upload, UploadError, decode_upload

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The inference queue is full: the caller should answer 503."""


@dataclass
class Scored:
    """The outcome for one upload that was scored."""

    prediction: object  # a grdnet Prediction (or anything with .score and .anomaly_map)
    width: int
    height: int
    overlay_png: str | None  # base64
    roi: dict | None = None  # about the request's ROI mask, when it sent one (`rois.decode_roi`)


@dataclass
class JobResult:
    items: list  # per upload: Scored or UploadError
    timings_ms: dict
    batch_images: int  # images in the forward pass this job was part of


@dataclass
class _Job:
    uploads: list[Upload]
    overlay: bool
    threshold: float | None = None  # the request's thresholds, for its decisions, regions and contours
    pixel_threshold: float | None = None
    future: Future = field(default_factory=Future)
    submitted: float = field(default_factory=time.perf_counter)
    # filled by the worker
    items: list = field(default_factory=list)
    arrays: list = field(default_factory=list)  # (upload index, model-channel uint8 array)
    rois: dict = field(default_factory=dict)  # upload index -> (bool mask at its image's size, info)
    decode_ms: float = 0.0
    started: float = 0.0


_STOP = object()


class MicroBatcher:
    """Runs `predictor.predict(list_of_arrays)` on a single worker thread (see module doc)."""

    def __init__(self, predictor, max_batch: int = 8, queue_size: int = 32, max_pixels: int = 40_000_000):
        self.predictor, self.max_batch, self.max_pixels = predictor, max_batch, max_pixels
        self.queue_size = queue_size
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._carry: _Job | None = None

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the batch being run)."""
        return self._queue.qsize()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="grdnet-inference", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 30.0) -> None:
        """Finish the jobs already queued, then stop the worker."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None or not thread.is_alive():
            return
        self._queue.put(_STOP)
        thread.join(timeout)

    def submit(self, uploads: list[Upload], overlay: bool = False, threshold: float | None = None,
               pixel_threshold: float | None = None) -> Future:
        """Queue a job; the future resolves to a `JobResult`. Raises `QueueFull`."""
        self.start()
        job = _Job(list(uploads), overlay, threshold, pixel_threshold)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job.future

    def _run(self) -> None:
        while True:
            job = self._carry or self._queue.get()
            self._carry = None
            if job is _STOP:
                return
            jobs, n = [job], len(job.uploads)
            stop = False
            while n < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                if n + len(nxt.uploads) > self.max_batch:
                    self._carry = nxt
                    break
                jobs.append(nxt)
                n += len(nxt.uploads)
            self._safe_process(jobs)
            if stop:  # a job taken before the stop sentinel is done; a carried one never precedes it
                return

    def _safe_process(self, jobs: list[_Job]) -> None:
        try:
            self._process(jobs)
        except Exception as e:  # never let the worker die with requests waiting on it
            log.exception("inference failed")
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)

    def _process(self, jobs: list[_Job]) -> None:
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # skip abandoned requests
        for j in live:
            self._decode(j)
        try:
            self._forward(live)
        except Exception:
            if len(live) == 1:
                raise
            log.exception("batched inference failed; retrying its %d requests one by one", len(live))
            for j in live:  # one request's failure must not fail the others
                try:
                    self._forward([j])
                except Exception as e:
                    j.future.set_exception(e)

    def _decode(self, job: _Job) -> None:
        t0 = time.perf_counter()
        job.started = t0
        channels = self.predictor.cfg.channels
        job.items, job.arrays, job.rois = [None] * len(job.uploads), [], {}
        for i, up in enumerate(job.uploads):
            try:
                img = decode_upload(up, self.max_pixels)
                try:
                    arr = pil_to_array(img, channels)
                except Exception as e:  # exotic modes Pillow cannot convert
                    raise UploadError(422, f"{up.name}: cannot convert {img.mode} image ({e})") from None
                if up.roi is not None:  # decoded here too, so its memory is bounded like the images'
                    job.rois[i] = decode_roi(up.roi, arr.shape[:2], self.max_pixels)
            except UploadError as e:
                job.items[i] = e
                continue
            job.arrays.append((i, arr))
        job.decode_ms = (time.perf_counter() - t0) * 1000

    def _forward(self, jobs: list[_Job]) -> None:
        arrays = [a for j in jobs for _, a in j.arrays]
        t0 = time.perf_counter()
        rois = [j.rois[i][0] if i in j.rois else None for j in jobs for i, _ in j.arrays]
        # `roi` only when a request sent one: duck-typed predictors need not take it otherwise
        extra = {"roi": rois} if any(r is not None for r in rois) else {}
        preds = list(self.predictor.predict(arrays, **extra)) if arrays else []
        infer_ms = (time.perf_counter() - t0) * 1000
        if len(preds) != len(arrays):
            raise RuntimeError(f"predictor returned {len(preds)} results for {len(arrays)} images")
        results, k = [], 0
        for j in jobs:
            items = list(j.items)
            t1 = time.perf_counter()
            for i, arr in j.arrays:
                p = preds[k]
                k += 1
                _request_thresholds(p, j, self.predictor)
                png = _overlay_png(arr, p.anomaly_map, getattr(p, "defect_mask", None)) if j.overlay else None
                items[i] = Scored(p, arr.shape[1], arr.shape[0], png, j.rois[i][1] if i in j.rois else None)
            timings = {"queue": (j.started - j.submitted) * 1000, "decode": j.decode_ms, "inference": infer_ms,
                       "overlay": (time.perf_counter() - t1) * 1000}
            results.append((j, JobResult(items, {k_: round(v, 2) for k_, v in timings.items()}, len(arrays))))
        for j, r in results:  # only once everything succeeded, so a retry never sees a done future
            j.future.set_result(r)


def _request_thresholds(p, job: _Job, predictor) -> None:
    """Apply a request's thresholds to a prediction the batch made with the model's, before its
    regions are drawn, by the rule of `BasePredictor.pixel_threshold_for`."""
    if not hasattr(p, "pixel_threshold"):  # a predictor without regions
        return
    if job.threshold is not None:
        p.threshold, p.is_anomalous = job.threshold, bool(p.score >= job.threshold)
    if hasattr(predictor, "pixel_threshold_for"):  # duck-typed predictors keep their predictions' own
        p.pixel_threshold = predictor.pixel_threshold_for(job.threshold, job.pixel_threshold)
    elif job.pixel_threshold is not None:
        p.pixel_threshold = job.pixel_threshold


def _overlay_png(image: np.ndarray, anomaly_map: np.ndarray, defects: np.ndarray | None = None) -> str:
    buf = io.BytesIO()
    Image.fromarray(make_overlay(image, np.asarray(anomaly_map), defects=defects)).save(buf, "PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")
