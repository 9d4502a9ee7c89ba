"""Focal sampling: the whole image plus regions cut from the FULL-RESOLUTION image, each resized to the input size.

Region size is in pixels (``region_size > 1``, paper: 512) or a fraction of the short side (``0 < region_size <=
1``), so datasets of different resolution get comparable windows. Sliding windows start at 0 and step by
``stride``; the last window is aligned to the image edge so the whole image is covered. On a 1024 px image,
512 px regions at stride 256 give a 3 x 3 grid.

Images smaller than the region: the region shrinks to the short side (one window along that side); the view is
then an upscaled crop, never padding.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from ..backbones.base import PreprocessConfig
from .images import check_image_array, exif_orientation, read_image, to_model_input


@dataclass(frozen=True)
class FocalConfig:
    """How to cut views from an image (help text in each field's comment)."""

    region_size: float = 512  # region side: pixels (> 1) or fraction of the short side (0 < x <= 1)
    stride: float | None = None  # step between windows: pixels (> 1) or fraction of the region; None = region/2
    num_crops: int | None = None  # regions per image; None = every sliding window (random mode: required)
    mode: str = "sliding"  # "sliding" windows or "random" positions
    include_whole: bool = True  # view 0 = the whole image resized
    # crop to the bounding box of the content before cutting views: the black border around a fundus photograph's
    # circle (what fundus papers do); off by default (radiographs have none)
    crop_border: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("sliding", "random"):
            raise ValueError(f"focal mode must be 'sliding' or 'random', got {self.mode!r}")
        if self.region_size <= 0:
            raise ValueError(f"focal region_size must be > 0 (pixels or fraction), got {self.region_size}")
        if self.stride is not None and self.stride <= 0:
            raise ValueError(f"focal stride must be > 0, got {self.stride}")
        if self.num_crops is not None and self.num_crops < 0:
            raise ValueError(f"focal num_crops must be >= 0, got {self.num_crops}")
        if self.mode == "random" and self.num_crops is None:
            raise ValueError("focal mode 'random' needs num_crops")
        if not self.include_whole and self.num_crops == 0:
            raise ValueError("focal views: no whole image and no crops leaves no view")

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["crop_border"]:  # off: the same dict (and cache keys, saved files) as before the option existed
            del d["crop_border"]
        return d

    @classmethod
    def from_dict(cls, values: object, where: str = "focal") -> FocalConfig:
        """A config from a saved dict: anything but an object with known keys and valid values is one
        ``ValueError`` naming ``where`` (never a ``TypeError``)."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: expected an object of focal settings, got {type(values).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in values if k not in known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {known}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from exc

    def region_pixels(self, height: int, width: int) -> int:
        short = min(height, width)
        size = self.region_size * short if self.region_size <= 1 else self.region_size
        return int(max(1, min(round(size), short)))

    def stride_pixels(self, region: int) -> int:
        if self.stride is None:
            return max(1, region // 2)
        return int(max(1, round(self.stride * region if self.stride <= 1 else self.stride)))

    def max_views(self, height: int, width: int) -> int:
        """Number of views produced for an image of this size."""
        region = self.region_pixels(height, width)
        stride = self.stride_pixels(region)
        n = _count_positions(height, region, stride) * _count_positions(width, region, stride)  # without listing
        crops = n if self.num_crops is None else (self.num_crops if self.mode == "random" else min(n, self.num_crops))
        return crops + int(self.include_whole)


def _count_positions(length: int, region: int, stride: int) -> int:
    """``len(_positions(length, region, stride))`` in constant time."""
    if region >= length:
        return 1
    n = (length - region) // stride + 1
    return n + int((n - 1) * stride != length - region)


#: default bounds on the work one image may cause (``serve`` and ``predict``): long side / short side, views
MAX_ASPECT = 10.0
MAX_VIEWS = 256


def view_bounds_problem(height: int, width: int, cfg: FocalConfig, max_aspect: float = MAX_ASPECT,
                        max_views: int = MAX_VIEWS) -> str | None:
    """Why an image of this size would cost too much (a 32 x 16000 strip gives 1,000 focal crops), or None.
    Checked from the header's size, before decoding."""
    if height <= 0 or width <= 0:
        return f"image has no pixels ({width} x {height})"
    aspect = max(height, width) / min(height, width)
    if aspect > max_aspect:
        return (f"image of {width} x {height} pixels has an aspect ratio of {aspect:,.1f}, above the limit of "
                f"{max_aspect:g}")
    views = cfg.max_views(height, width)
    if views > max_views:
        return (f"image of {width} x {height} pixels gives {views:,} views with this model's focal settings, above "
                f"the limit of {max_views:,}")
    return None


def _positions(length: int, region: int, stride: int) -> list[int]:
    if region >= length:
        return [0]
    pos = list(range(0, length - region + 1, stride))
    if pos[-1] != length - region:
        pos.append(length - region)
    return pos


def sliding_boxes(height: int, width: int, region: int, stride: int) -> list[tuple[int, int, int, int]]:
    """Window boxes (x0, y0, x1, y1) in row-major order, covering the whole image."""
    return [(x, y, x + min(region, width), y + min(region, height))
            for y in _positions(height, region, stride) for x in _positions(width, region, stride)]


def select_boxes(height: int, width: int, cfg: FocalConfig, train: bool,
                 rng: np.random.Generator | None = None) -> list[tuple[int, int, int, int]]:
    """The crop boxes for one image: all windows, a random subset (training) or a fixed subset (evaluation).
    Random mode at evaluation uses ``rng`` when given (:func:`focal_views` seeds it from the image content), else
    a generator fixed per image size."""
    region = cfg.region_pixels(height, width)
    if cfg.mode == "random" and not train and rng is None:
        rng = np.random.default_rng(height * 100003 + width)
    rng = rng if rng is not None else np.random.default_rng(0)
    if cfg.mode == "random":
        ys = rng.integers(0, height - min(region, height) + 1, size=cfg.num_crops)
        xs = rng.integers(0, width - min(region, width) + 1, size=cfg.num_crops)
        return [(int(x), int(y), int(x) + min(region, width), int(y) + min(region, height)) for x, y in zip(xs, ys)]
    boxes = sliding_boxes(height, width, region, cfg.stride_pixels(region))
    k = cfg.num_crops
    if k is None or k >= len(boxes):
        return boxes
    if train:
        return [boxes[i] for i in sorted(rng.choice(len(boxes), size=k, replace=False))]
    return [boxes[i] for i in np.linspace(0, len(boxes) - 1, k).round().astype(int)]


@dataclass
class FocalViews:
    """Views of one image for one backbone: ``pixels`` [N, 3, S, S] and their ``boxes`` [N, 4] (x0, y0, x1, y1)
    in original-image pixels (the whole image is (0, 0, W, H))."""

    pixels: torch.Tensor
    boxes: torch.Tensor


def focal_views(image: np.ndarray, cfg: FocalConfig, preprocess: PreprocessConfig | list[PreprocessConfig],
                train: bool = False, rng: np.random.Generator | None = None,
                full_size: tuple[int, int] | None = None) -> FocalViews | list[FocalViews]:
    """Cut the views of one full-resolution image; with several preprocess configs (one per expert) the same
    boxes are used for each. ``full_size``: the original (W, H) when ``image`` is a reduced decode
    (:func:`read_view_image`): boxes are placed and reported in original pixels, cut at the decoded scale."""
    image = check_image_array(image)
    if cfg.crop_border:
        image, full_size = crop_to_content(image, full_size)
    h, w = image.shape[:2]
    fw, fh = full_size or (w, h)
    if cfg.mode == "random" and not train and rng is None:  # fixed per image, different between images
        rng = np.random.default_rng(int.from_bytes(hashlib.blake2b(image.tobytes(), digest_size=8).digest(), "big"))
    boxes = ([(0, 0, fw, fh)] if cfg.include_whole else []) + select_boxes(fh, fw, cfg, train, rng)
    sx, sy = w / fw, h / fh
    crops = [image[round(y0 * sy):round(y1 * sy), round(x0 * sx):round(x1 * sx)] for x0, y0, x1, y1 in boxes]
    box_t = torch.tensor(boxes, dtype=torch.long)
    cfgs = preprocess if isinstance(preprocess, list) else [preprocess]
    out = [FocalViews(torch.stack([to_model_input(c, pc) for c in crops]), box_t) for pc in cfgs]
    return out if isinstance(preprocess, list) else out[0]


BORDER_LEVEL = 10 / 255  # pixels at or below this (mean over channels) are border


def crop_to_content(image: np.ndarray, full_size: tuple[int, int] | None = None
                    ) -> tuple[np.ndarray, tuple[int, int] | None]:
    """The bounding box of pixels brighter than :data:`BORDER_LEVEL` (the fundus circle inside its black frame);
    the whole image when nothing is brighter. ``full_size`` (a reduced decode's original W, H) is scaled along."""
    level = image.mean(axis=-1) if image.ndim == 3 else image
    rows, cols = np.flatnonzero((level > BORDER_LEVEL).any(axis=1)), np.flatnonzero((level > BORDER_LEVEL).any(axis=0))
    if len(rows) == 0 or len(cols) == 0:
        return image, full_size
    h, w = image.shape[:2]
    cropped = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    if full_size is not None:
        full_size = (max(1, round(cropped.shape[1] * full_size[0] / w)),
                     max(1, round(cropped.shape[0] * full_size[1] / h)))
    return cropped, full_size


REDUCED_DECODE_MARGIN = 2  # a reduced decode keeps >= this many decoded pixels per input pixel in every view


def read_reduced_jpeg(path, cfg: FocalConfig, preprocess: PreprocessConfig | list[PreprocessConfig],
                      margin: int = REDUCED_DECODE_MARGIN) -> tuple[np.ndarray, tuple[int, int]] | None:
    """Decode an 8-bit JPEG once for all its views at the coarsest scale the JPEG decoder offers (DCT scaling
    by 1/2, 1/4, 1/8 through Pillow's ``Image.draft``) at which every view, the whole image and each region,
    still has ``margin`` x the largest input size per side; every view is then resized from that. Returns
    (image in [0, 1], full (width, height)), or None where no reduction applies (not a JPEG, a region too
    small, ...): decode at full resolution."""
    from PIL import Image

    side = margin * max(p.image_size for p in (preprocess if isinstance(preprocess, list) else [preprocess]))
    try:
        with Image.open(path) as im:
            if im.format != "JPEG" or im.mode not in ("L", "RGB") or exif_orientation(im) != 1:
                return None  # rotated by EXIF: the full-resolution reader turns it upright
            width, height = im.size
            smallest = min(width, height)
            if cfg.num_crops != 0:
                smallest = min(smallest, cfg.region_pixels(height, width))
            scale = next((s for s in (8, 4, 2) if smallest // s >= side), 1)
            if scale == 1:
                return None
            im.draft(im.mode, (width // scale, height // scale))
            if im.size == (width, height):
                return None
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except Exception:  # unreadable: the full-resolution reader reports it properly
        return None
    if arr.ndim == 3 and np.allclose(arr[..., 0], arr[..., 1]) and np.allclose(arr[..., 0], arr[..., 2]):
        arr = arr[..., 0].copy()  # grey stored as RGB: one channel, as read_image does
    return arr, (width, height)


def read_view_image(path, cfg: FocalConfig, preprocess: PreprocessConfig | list[PreprocessConfig]
                    ) -> tuple[np.ndarray, tuple[int, int] | None]:
    """The image the views of ``path`` are cut from, and its full (W, H) when it is a reduced decode
    (:func:`read_reduced_jpeg`), else None (full resolution, :func:`read_image`)."""
    reduced = read_reduced_jpeg(path, cfg, preprocess)
    return reduced if reduced is not None else (read_image(path), None)
