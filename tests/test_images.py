"""Full-resolution image reading: real DICOM (pydicom-data's chest X-ray, MONOCHROME1 15-bit, JPEG 2000)."""

from __future__ import annotations

import numpy as np
import pytest
from tests.helpers import rg1_dicom

from medbridge.data.images import ImageReadError, read_image


def test_monochrome1_is_inverted_and_scaled():
    import pydicom

    img = read_image(rg1_dicom("UNCR"))
    raw = pydicom.dcmread(rg1_dicom("UNCR")).pixel_array.astype(np.float64)
    assert img.shape == raw.shape == (1955, 1841) and img.dtype == np.float32
    assert img.min() == 0.0 and img.max() == 1.0
    assert np.corrcoef(img.ravel()[::97], raw.ravel()[::97])[0, 1] < -0.9  # MONOCHROME1: high raw = dark


def test_jpeg2000_lossless_equals_uncompressed():
    np.testing.assert_array_equal(read_image(rg1_dicom("J2KR")), read_image(rg1_dicom("UNCR")))
    lossy, exact = read_image(rg1_dicom("J2KI")), read_image(rg1_dicom("UNCI"))
    assert np.abs(lossy - exact).mean() < 0.01


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "nope.png")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ImageReadError, match="broken.png"):
        read_image(bad)


def test_16bit_png_keeps_depth(tmp_path):
    from PIL import Image

    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "x.png")
    img = read_image(tmp_path / "x.png")
    assert len(np.unique(img)) > 256  # more levels than 8 bits could hold
    np.testing.assert_allclose(img, arr / 65535.0, atol=1e-6)
