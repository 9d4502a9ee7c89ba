"""Uploaded image bytes -> a [0, 1] float image, entirely in memory, with the upload checked before decoding.

The format is sniffed from the first bytes (PNG signature, JPEG SOI marker, DICOM preamble + ``DICM``), never taken
from a file name or a client's content type. Size is limited twice: in bytes (before anything is parsed) and in
pixels (from the header, before the pixel data is decoded), so a small file that would expand into a huge image
(a decompression bomb) is refused without being decoded. Error messages name the upload and what was wrong, never a
header value (DICOM headers carry patient data).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np

from ..data.focal import MAX_ASPECT, MAX_VIEWS, FocalConfig, view_bounds_problem

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_MAGIC_OFFSET = 128
ACCEPTED = "PNG (8/16-bit), JPEG or DICOM (Part 10 file with the DICM preamble)"


class UploadError(ValueError):
    """A client error in an upload: ``status`` is the HTTP status to answer with (413 too large, 415 unsupported
    type, 422 unreadable content)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    """Per-upload limits: ``max_bytes`` of one request body, ``max_pixels`` of one decoded image (rows x columns; the
    first frame of a multi-frame DICOM), ``max_images`` per request; the work they cause: ``max_aspect`` (long side
    / short side) and ``max_views`` (focal views) per image, ``max_request_pixels`` and ``max_request_views`` over
    a request's images, ``max_explain_maps`` heat maps per request (see :mod:`medbridge.serve.limits`)."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 16
    max_aspect: float = MAX_ASPECT
    max_views: int = MAX_VIEWS
    max_request_pixels: int = 80_000_000
    max_request_views: int = 512
    max_explain_maps: int = 32

    def __post_init__(self) -> None:
        bad = [k for k, v in vars(self).items() if not (isinstance(v, (int, float)) and v > 0)]
        if bad:
            raise ValueError(f"upload limits must be > 0: {', '.join(f'{k}={getattr(self, k)}' for k in bad)}")


def sniff_format(data: bytes) -> str | None:
    """'png', 'jpeg', 'dicom' or None, from the content's first bytes."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    return None


def _check_pixels(name: str, rows: int, cols: int, frames: int, limits: UploadLimits, focal: FocalConfig | None,
                  budget=None) -> None:
    """Size checks from the header, before any pixel is decoded: pixels, aspect ratio and views of this image
    (views with the model's ``focal`` settings), then the request's ``budget``
    (:class:`medbridge.serve.limits.RequestBudget`)."""
    if rows <= 0 or cols <= 0:
        raise UploadError(f"{name}: image has no pixels ({rows} x {cols})")
    total = rows * cols * max(frames, 1)
    if total > limits.max_pixels:
        raise UploadError(f"{name}: image of {cols} x {rows}" + (f" x {frames} frames" if frames > 1 else "")
                          + f" = {total:,} pixels exceeds the limit of {limits.max_pixels:,} pixels", status=413)
    focal = focal or FocalConfig(num_crops=0)
    problem = view_bounds_problem(rows, cols, focal, limits.max_aspect, limits.max_views)
    if problem:
        raise UploadError(f"{name}: {problem}", status=422 if "aspect" in problem else 413)
    if budget is not None:
        budget.charge(name, rows * cols, focal.max_views(rows, cols))


def _decode_pil(data: bytes, name: str, fmt: str, limits: UploadLimits, focal=None, budget=None,
                check_only: bool = False) -> np.ndarray | None:
    from PIL import Image

    from ..data.images import pil_to_array

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own pixel limit applies
            with Image.open(io.BytesIO(data), formats=[fmt.upper()]) as im:
                _check_pixels(name, im.height, im.width, 1, limits, focal, budget)
                if check_only:
                    return None
                im.load()
                return pil_to_array(im)  # the CLI's conversion
    except UploadError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own guard, before ours, at > 2 x its MAX_IMAGE_PIXELS
        raise UploadError(f"{name}: image exceeds the limit of {limits.max_pixels:,} pixels (refused as a "
                          "decompression bomb before decoding)", status=413) from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        raise UploadError(f"{name}: unreadable or corrupt {fmt.upper()} data ({type(exc).__name__})") from exc


def _decode_dicom(data: bytes, name: str, limits: UploadLimits, focal=None, budget=None,
                  check_only: bool = False) -> np.ndarray | None:
    """Parse in memory, check the declared size, then :func:`medbridge.data.images.dicom_to_array` (the CLI's
    conversion: modality LUT, VOI LUT/window, MONOCHROME1 inverted, colour to luminance, first frame)."""
    import pydicom

    from ..data.images import ImageReadError, dicom_to_array

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        raise UploadError(f"{name}: unreadable DICOM ({type(exc).__name__})") from exc
    if "PixelData" not in ds:
        raise UploadError(f"{name}: DICOM file has no pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise UploadError(f"{name}: DICOM file lacks valid Rows/Columns") from exc
    _check_pixels(name, rows, cols, 1, limits, focal, budget)  # only the first frame is decoded
    if check_only:
        return None
    try:
        return dicom_to_array(ds, name)
    except ImageReadError as exc:
        raise UploadError(str(exc), status=415 if "unsupported" in str(exc) else 422) from exc


def decode_upload(data: bytes, name: str = "image", limits: UploadLimits | None = None,
                  focal: FocalConfig | None = None, budget=None, check_only: bool = False) -> np.ndarray | None:
    """Bytes of one uploaded image -> float32 in [0, 1] (H x W grey or H x W x 3, EXIF orientation applied),
    refusing what is too large (also in views with the model's ``focal`` settings, and against the request's
    ``budget``), of an unaccepted type or corrupt with an :class:`UploadError` naming ``name`` and the problem.
    ``check_only``: the checks from the header alone, nothing decoded (returns None)."""
    limits = limits or UploadLimits()
    if not data:
        raise UploadError(f"{name}: empty upload (0 bytes)", status=400)
    if len(data) > limits.max_bytes:
        raise UploadError(f"{name}: {len(data):,} bytes exceeds the limit of {limits.max_bytes:,} bytes", status=413)
    fmt = sniff_format(data)
    if fmt is None:
        raise UploadError(f"{name}: not a PNG, JPEG or DICOM file by its content (expected {ACCEPTED})", status=415)
    image = (_decode_dicom(data, name, limits, focal, budget, check_only) if fmt == "dicom"
             else _decode_pil(data, name, fmt, limits, focal, budget, check_only))
    if image is None:
        return None
    if not np.isfinite(image).all():
        raise UploadError(f"{name}: decoded pixels are not finite")
    return image
