"""Full-resolution image reading (PNG/JPEG 8/16-bit, DICOM) and conversion to backbone input tensors.

Images are returned as float32 arrays scaled to [0, 1] at their original resolution: H x W for grayscale
(radiographs, and every DICOM image: colour DICOM is reduced to its luminance) and H x W x 3 for colour PNG/JPEG.
Conversion to 3 channels happens only at the backbone boundary (:func:`to_model_input`).

Every failure to read a file is an :class:`ImageReadError` naming the file and what is wrong or unsupported.
Images larger than :func:`max_image_pixels` (``MEDBRIDGE_MAX_IMAGE_PIXELS``) are refused before decoding.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.base import PreprocessConfig

log = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
"""Default pixel limit (10000 x 10000; over 4x the largest mammogram; 400 MB as float32)."""
MAX_PIXELS_ENV = "MEDBRIDGE_MAX_IMAGE_PIXELS"
MAX_IMAGE_PIXELS: int | None = None
"""Pixel limit set in code; ``None`` (default): the ``MEDBRIDGE_MAX_IMAGE_PIXELS`` environment variable, else
:data:`DEFAULT_MAX_IMAGE_PIXELS`. The environment variable also reaches DataLoader worker processes."""

LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luma weights: the Y of DICOM's YBR_FULL, used to reduce colour DICOM to one channel."""


class ImageReadError(RuntimeError):
    """An image file is missing, unreadable or of an unsupported form; the message names the file."""


def max_image_pixels() -> int:
    """The largest width x height (DICOM: rows x columns) read; larger images raise :class:`ImageReadError`."""
    if MAX_IMAGE_PIXELS is not None:
        return int(MAX_IMAGE_PIXELS)
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_PIXELS_ENV} must be a positive whole number of pixels, got {raw!r}")
    return value


def _check_pixel_count(path: Path, width: int, height: int, limit: int | None = None) -> None:
    limit = max_image_pixels() if limit is None else limit
    if width * height > limit:
        raise ImageReadError(
            f"{path}: image of {width} x {height} = {width * height:,} pixels exceeds the limit of {limit:,} pixels "
            f"(a decompression bomb or an image too large to read; raise the limit with {MAX_PIXELS_ENV})")


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


# Transfer syntax -> decoder packages pydicom can use for it: (module to import, pip package [licence note]).
_PYLIBJPEG_LIBJPEG = ("libjpeg", "pylibjpeg-libjpeg (GPL-3.0, optional: pip install 'medbridge[dicom-gpl]')")
_GDCM = ("gdcm", "python-gdcm")
_DICOM_DECODERS: dict[str, tuple[tuple[str, str], ...]] = {
    "1.2.840.10008.1.2.4.50": (("PIL", "pillow"), _GDCM),  # JPEG Baseline 8-bit
    "1.2.840.10008.1.2.4.51": (("PIL", "pillow"), _GDCM),  # JPEG Extended; 12-bit: see _dicom_decoder_hint
    "1.2.840.10008.1.2.4.57": (_GDCM, _PYLIBJPEG_LIBJPEG),  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": (_GDCM, _PYLIBJPEG_LIBJPEG),  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": (("jpeg_ls", "pyjpegls"), _GDCM),  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": (("jpeg_ls", "pyjpegls"), _GDCM),  # JPEG-LS near-lossless
    **{uid: (("openjpeg", "pylibjpeg-openjpeg"), _GDCM)
       for uid in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")},  # JPEG 2000
    **{uid: (("openjpeg", "pylibjpeg-openjpeg"),)
       for uid in ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203")},  # HTJ2K
}


def _dicom_decoder_hint(ds, tsyntax: str) -> str:
    """What it takes to decode this transfer syntax: missing packages, or '' when a decoder is installed."""
    decoders = _DICOM_DECODERS.get(tsyntax)
    if tsyntax == "1.2.840.10008.1.2.4.51" and int(ds.get("BitsStored", 8) or 8) > 8:
        decoders = (_PYLIBJPEG_LIBJPEG,)  # 12-bit JPEG Extended: only libjpeg (pydicom refuses GDCM/Pillow)
    if decoders is None:
        return ""
    if any(_installed(module) for module, _ in decoders):
        return ""
    hint = "needs package " + " or ".join(package for _, package in decoders)
    if any(module in ("gdcm", "jpeg_ls", "openjpeg") for module, _ in decoders):
        hint += " (all in the medbridge[dicom] extra: pip install 'medbridge[dicom]')"
    return hint


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (blocked)
        return False


def _transfer_syntax(ds) -> str:
    """The dataset's transfer syntax; for files without one (no preamble/file meta, ACR-NEMA style) inferred
    from how the file parsed, which is exact for uncompressed pixel data."""
    from pydicom import uid

    tsyntax = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
    if tsyntax:
        return str(tsyntax)
    implicit, little = ds.original_encoding
    if implicit is None or ds["PixelData"].is_undefined_length:
        raise ImageReadError("no transfer syntax in the file and the pixel data is compressed (cannot tell how)")
    inferred = (uid.ImplicitVRLittleEndian if implicit else
                uid.ExplicitVRLittleEndian if little else uid.ExplicitVRBigEndian)
    ds.file_meta.TransferSyntaxUID = inferred
    return str(inferred)


def _read_dicom_dataset(path: Path):
    """(pydicom's dataset, None); a file pydicom finds invalid (no 128-byte preamble/'DICM' prefix, no file meta)
    is read again with ``force=True``: (dataset, pydicom's reason)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(path)), None
    except InvalidDicomError as exc:
        reason = " ".join(str(exc).split())
    return pydicom.dcmread(str(path), force=True), reason


def read_dicom(path: str | Path) -> np.ndarray:
    """Read a DICOM image as float32 in [0, 1], one channel (see :func:`dicom_to_array`). Files without the
    preamble/'DICM' prefix (older ACR-NEMA-style exports) are read when they parse as DICOM with pixel data."""
    path = Path(path)
    try:
        ds, forced = _read_dicom_dataset(path)
    except Exception as exc:  # pydicom raises many kinds on malformed files
        raise ImageReadError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        what = (f"not a DICOM file ({forced.rstrip('.')}; no pixel data when read without that check)" if forced
                else "DICOM file has no pixel data (PixelData element)")
        raise ImageReadError(f"{path}: {what}")
    return dicom_to_array(ds, path)


def dicom_to_array(ds, path: str | Path = "<dataset>") -> np.ndarray:
    """A pydicom dataset's pixel data as float32 H x W in [0, 1].

    Monochrome: Modality LUT (rescale slope/intercept), VOI LUT or window (the first), min-max scaled,
    MONOCHROME1 inverted. Colour (RGB, YBR_* converted to RGB by pydicom, PALETTE COLOR through its LUT): the
    BT.601 luminance over the nominal range. Multi-frame files: the first frame only (medbridge classifies 2-D
    images). Errors name the file and what is unsupported."""
    from pydicom.pixels import apply_color_lut

    missing = [k for k in ("Rows", "Columns", "BitsAllocated") if k not in ds]
    if missing:
        raise ImageReadError(f"{path}: DICOM pixel data without the required element(s) {', '.join(missing)}")
    try:
        tsyntax = _transfer_syntax(ds)
        rows, cols = int(ds.Rows), int(ds.Columns)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    except ImageReadError as exc:
        raise ImageReadError(f"{path}: {exc}") from None
    except Exception as exc:
        raise ImageReadError(f"{path}: invalid DICOM image header ({type(exc).__name__}: {exc})") from exc
    _check_pixel_count(Path(path), cols, rows)
    try:
        ts_name = f"{_uid_name(tsyntax)} ({tsyntax})"
        ds.pixel_array_options(index=0)  # first frame only; YBR_FULL/_422 -> RGB (pydicom's default, raw=False)
        arr = ds.pixel_array
    except Exception as exc:
        hint = _dicom_decoder_hint(ds, tsyntax)
        detail = hint or f"decoder error: {' '.join(str(exc).split())[:400] or type(exc).__name__}"
        raise ImageReadError(f"{path}: cannot decode DICOM pixel data, transfer syntax {ts_name}: {detail}") from exc
    try:
        if photometric.startswith("MONOCHROME"):
            return _monochrome(arr, ds, photometric, Path(path))
        if photometric == "PALETTE COLOR":
            rgb = apply_color_lut(arr, ds)
            maxval = float(np.iinfo(rgb.dtype).max)
        elif arr.ndim == 3 and arr.shape[-1] == 3:  # RGB and YBR_* (already RGB), incl. J2K's YBR_ICT/YBR_RCT
            rgb = arr
            maxval = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
        else:
            raise ImageReadError(f"{path}: unsupported DICOM PhotometricInterpretation {photometric!r} "
                                 f"with {int(ds.get('SamplesPerPixel', 1) or 1)} sample(s) per pixel")
        rgb = np.asarray(rgb, dtype=np.float32)
        luma = rgb @ np.asarray(LUMINANCE_WEIGHTS, dtype=np.float32)
        return np.clip(luma / maxval, 0.0, 1.0).astype(np.float32)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(f"{path}: cannot convert DICOM {photometric} pixel data "
                             f"({type(exc).__name__}: {exc})") from exc


def _monochrome(arr: np.ndarray, ds, photometric: str, path: Path) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    if arr.ndim != 2:
        raise ImageReadError(f"{path}: {photometric} pixel data of shape {arr.shape} (expected rows x columns)")
    arr = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        arr = apply_voi_lut(arr, ds, index=0)
    arr = np.asarray(arr, dtype=np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ImageReadError(f"{path}: {photometric} pixel data holds non-finite values")
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return 1.0 - arr if photometric == "MONOCHROME1" else arr


def _uid_name(tsyntax: str) -> str:
    from pydicom.uid import UID

    name = UID(tsyntax).name
    return name if name != tsyntax else "unknown transfer syntax"


def read_image(path: str | Path) -> np.ndarray:
    """Read an image at full resolution as float32 in [0, 1] (H x W grayscale or H x W x 3 colour).

    DICOM is recognised by its suffix or 'DICM' prefix, and a file Pillow cannot identify is tried as DICOM
    without a preamble. Raises :class:`ImageReadError` (and nothing else) for any file that cannot be read."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    if _is_dicom(path):
        return read_dicom(path)
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # medbridge's own limit applies
            im = Image.open(path)
        with im:
            _check_pixel_count(path, *im.size, limit)
            im.load()
            return pil_to_array(im)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own check (2 x PIL.Image.MAX_IMAGE_PIXELS) came first
        size = re.search(r"\((\d+) pixels\)", str(exc))
        what = f"image of {int(size.group(1)):,} pixels" if size else "image"
        raise ImageReadError(f"{path}: {what} exceeds Pillow's decompression-bomb limit ({exc}); medbridge's limit "
                             f"is {limit:,} pixels ({MAX_PIXELS_ENV})") from exc
    except UnidentifiedImageError as exc:
        dicom = _headerless_dicom(path)
        if dicom is not None:
            return dicom_to_array(dicom, path)
        raise ImageReadError(f"{path}: unreadable or corrupt image (not a format Pillow or pydicom reads)") from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ... on corrupt files
        raise ImageReadError(f"{path}: unreadable or corrupt image ({type(exc).__name__}: {exc})") from exc


EXIF_ORIENTATION = 0x0112


def exif_orientation(im) -> int:
    """The EXIF orientation of a Pillow image (1 = stored upright; also for files without EXIF)."""
    try:
        value = im.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: the pixels are still read as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(im):
    """The image as a viewer shows it: rotated/flipped by its EXIF orientation tag (a JPEG stored sideways with
    orientation 6 is scored upright)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(im) if exif_orientation(im) != 1 else im


def pil_to_array(im) -> np.ndarray:
    """A loaded Pillow image as float32 in [0, 1]: 16-bit and 8-bit grey as H x W, colour as H x W x 3 (grey
    stored as RGB(A) keeps one channel). An EXIF orientation tag is applied, as image viewers do."""
    im = upright(im)
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32)
        maxval = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        return np.clip(arr / maxval, 0.0, 1.0)
    if mode in ("L", "P", "1", "LA"):
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    if np.allclose(rgb[..., 0], rgb[..., 1]) and np.allclose(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0].copy()
    return rgb


def _headerless_dicom(path: Path):
    """The dataset of a DICOM file without preamble/'DICM' prefix and without a DICOM suffix, or None."""
    try:
        ds, _ = _read_dicom_dataset(path)
        return ds if "PixelData" in ds and "Rows" in ds and "Columns" in ds else None
    except Exception:
        return None


def check_image_array(image: np.ndarray, where: str = "image") -> np.ndarray:
    """Validate an image array (H x W or H x W x 1/3, numeric); return it as float32 in [0, 1]."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{where}: expected a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"{where}: expected shape H x W or H x W x 3, got {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if image.dtype.kind == "f":
        if image.size and (float(image.min()) < -1e-6 or float(image.max()) > 1 + 1e-6):
            raise ValueError(f"{where}: float images must lie in [0, 1] (got {image.min():.3g}..{image.max():.3g})")
        return image.astype(np.float32, copy=False)
    raise TypeError(f"{where}: unsupported dtype {image.dtype} (expected uint8, uint16 or float in [0, 1])")


def to_model_input(image: np.ndarray | torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """Resize a [0, 1] image (H x W or H x W x 3) to cfg.image_size square, 3 channels, normalised: [3, S, S]."""
    t = torch.as_tensor(image, dtype=torch.float32)
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    t = t.expand(3, -1, -1) if t.shape[0] == 1 else t
    size = cfg.image_size
    if t.shape[1:] != (size, size):
        mode = "bicubic" if cfg.interpolation == "bicubic" else "bilinear"
        t = F.interpolate(t.unsqueeze(0), size=(size, size), mode=mode, align_corners=False,
                          antialias=True).squeeze(0).clamp(0, 1)
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    return (t - mean) / std
