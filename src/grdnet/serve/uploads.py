"""Uploaded bytes -> image, for untrusted input: sniff the format from the bytes (never trust the
declared content type or file name), check the declared size before decoding anything, and turn
every decoder failure into an `UploadError` with an HTTP status and a one-line message."""
from __future__ import annotations

import io
import re
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from ..data import to_8bit
from ..errors import GRDNetError

# Only the formats the rest of grdnet reads (data.IMAGE_EXTENSIONS). Restricting Pillow's plugins
# also keeps untrusted bytes away from decoders that shell out (EPS -> Ghostscript) or are rarely
# exercised.
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
ACCEPTED_TEXT = "PNG, JPEG, BMP, TIFF or WebP"


@dataclass
class Upload:
    """One uploaded file, not yet decoded."""

    name: str
    data: bytes
    roi: "Upload | None" = None  # its ROI mask, not yet decoded either (see `rois.decode_roi`)


class UploadError(GRDNetError):
    """An upload the service refuses: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_upload(upload: Upload, max_pixels: int) -> Image.Image:
    """Decode an upload fully. 415: not an accepted image; 413: more pixels than `max_pixels`
    (checked from the header, before decoding); 422: an image that cannot be decoded."""
    name = upload.name
    if not upload.data:
        raise UploadError(415, f"{name}: empty file, not an image")
    try:
        img = Image.open(io.BytesIO(upload.data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        kind = _signature(upload.data)
        if kind:  # the right magic bytes, but Pillow could not make sense of the header
            raise UploadError(422, f"{name}: invalid {kind} header") from None
        raise UploadError(415, f"{name}: not an image (accepted formats: {ACCEPTED_TEXT})") from None
    except Image.DecompressionBombError as e:  # Pillow's own, coarser limit fired first
        raise UploadError(413, _over_limit(name, max_pixels, e)) from None
    except Exception as e:  # a header broken in a way the plugin did not anticipate
        raise UploadError(422, f"{name}: cannot read image header ({_short(e)})") from None
    with img:
        w, h = img.size
        if w * h > max_pixels:
            raise UploadError(413, f"{name}: {w}x{h} image ({w * h} pixels) is over the limit of "
                                   f"{max_pixels} pixels")
        if w == 0 or h == 0:
            raise UploadError(422, f"{name}: image has no pixels ({w}x{h})")
        try:
            img.load()
            return to_8bit(img)
        except Image.DecompressionBombError as e:
            raise UploadError(413, _over_limit(name, max_pixels, e)) from None
        except Exception as e:  # decoders raise many types on corrupt data; all mean "undecodable"
            raise UploadError(422, f"{name}: cannot decode {img.format} image ({_short(e)})") from None


def _over_limit(name: str, max_pixels: int, e: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(e))
    size = f" ({found.group(1)} pixels)" if found else ""
    return f"{name}: image{size} is over the limit of {max_pixels} pixels"


def _signature(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "TIFF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None  # BMP's two-byte "BM" is too weak a signature to claim a broken BMP


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]
