"""Full-resolution image reading (PNG/JPEG 8/16-bit, DICOM) and conversion to backbone input tensors.

Images are returned as float32 arrays scaled to [0, 1] at their original resolution: H x W for grayscale
(radiographs) and H x W x 3 for colour. Conversion to 3 channels happens only at the backbone boundary
(:func:`to_model_input`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.base import PreprocessConfig

DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}


class ImageReadError(RuntimeError):
    """An image file is missing, unreadable or of an unsupported form; the message names the file."""


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_dicom(path: Path) -> np.ndarray:
    """Read a DICOM image as float32 in [0, 1]: rescale slope/intercept, VOI LUT/window, MONOCHROME1 inverted."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds:
        raise ImageReadError(f"{path}: DICOM file has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # missing codec etc.
        raise ImageReadError(f"{path}: cannot decode DICOM pixel data "
                             f"(transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')}): {exc}") from exc
    if arr.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        arr = arr[0]  # multi-frame: first frame
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("MONOCHROME"):
        arr = apply_modality_lut(arr, ds)
        if "WindowCenter" in ds or "VOILUTSequence" in ds:
            arr = apply_voi_lut(arr, ds, index=0)
        arr = arr.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        if photometric == "MONOCHROME1":
            arr = 1.0 - arr
        return arr
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422"):
        if photometric != "RGB":
            from pydicom.pixels import convert_color_space

            arr = convert_color_space(arr, photometric, "RGB")
        return arr.astype(np.float32) / float(np.iinfo(arr.dtype).max if arr.dtype.kind == "u" else 255)
    raise ImageReadError(f"{path}: unsupported DICOM PhotometricInterpretation {photometric}")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image at full resolution as float32 in [0, 1] (H x W grayscale or H x W x 3 colour)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    if _is_dicom(path):
        return read_dicom(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                maxval = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
                return np.clip(arr / maxval, 0.0, 1.0)
            if mode in ("L", "P", "1", "LA"):
                return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageReadError(f"{path}: unreadable or corrupt image ({exc})") from exc
    if np.allclose(rgb[..., 0], rgb[..., 1]) and np.allclose(rgb[..., 0], rgb[..., 2]):
        return rgb[..., 0].copy()  # grey stored as RGB(A): keep one channel
    return rgb


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
