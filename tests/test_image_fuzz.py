"""Hostile and broken image files: decompression bombs and a bounded hypothesis fuzz of the image/DICOM reader.

Whatever the bytes, :func:`read_image` either returns a finite float32 image in [0, 1] or raises
:class:`ImageReadError` naming the file; no other exception escapes. The fuzz runs are derandomized (the same
examples on every run, so CI is stable) and bounded by ``max_examples``."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers import rg1_dicom

from medbridge.data.images import ImageReadError, read_image

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom and Pillow warn about the malformed input on purpose

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _png(width: int, height: int) -> bytes:
    """A valid 8-bit grey PNG of zeros, written row by row (a 20000 x 20000 one is 389 kB)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(9)
    block_rows = 100
    block = (b"\x00" * (width + 1)) * block_rows
    parts = [comp.compress(block) for _ in range(height // block_rows)]
    parts += [comp.compress(b"\x00" * (width + 1) * (height % block_rows)), comp.flush()]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _assert_image_or_read_error(path: Path) -> None:
    try:
        img = read_image(path)
    except ImageReadError as exc:
        assert path.name in str(exc), f"error does not name the file: {exc}"
        return
    assert isinstance(img, np.ndarray) and img.dtype == np.float32, type(img)
    assert img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3), img.shape
    assert img.size and np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0


# -- decompression bombs (issue 18, item 9) ------------------------------------------------------------------------

@pytest.mark.slow
def test_decompression_bomb_png_is_an_unreadable_image(tmp_path, nih_sample):
    import pandas as pd

    from medbridge.backbones.base import PreprocessConfig
    from medbridge.data.focal import FocalConfig
    from medbridge.data.loader import ViewDataset
    from medbridge.data.table import ImageTable

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png(20000, 20000))
    assert bomb.stat().st_size < 400_000  # 400 megapixels in a small file
    with pytest.raises(ImageReadError, match=r"bomb\.png: image of 400,000,000 pixels exceeds .*MEDBRIDGE_MAX"):
        read_image(bomb)
    # data.skip_unreadable skips it like any unreadable image, and reads the real image beside it
    real = sorted((nih_sample / "images").glob("*.jpg"))[0]
    meta = pd.DataFrame({"path": [str(bomb), str(real)], "patient_id": ["1", "2"], "view": [None, None],
                         "split": [None, None], "report": [None, None]})
    table = ImageTable(name="t", root=tmp_path, labels=("x",), meta=meta, targets=np.zeros((2, 1), np.float32))
    ds = ViewDataset(table, FocalConfig(),
                     [PreprocessConfig(32, (0.5,) * 3, (0.5,) * 3)], skip_unreadable=True)
    assert ds[0] is None and ds[1] is not None


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    import medbridge.data.images as images

    path = tmp_path / "small.png"
    path.write_bytes(_png(300, 200))
    monkeypatch.setenv("MEDBRIDGE_MAX_IMAGE_PIXELS", "59999")
    with pytest.raises(ImageReadError, match=r"small\.png: image of 300 x 200 = 60,000 pixels exceeds the limit "
                                             r"of 59,999 pixels"):
        read_image(path)
    monkeypatch.setenv("MEDBRIDGE_MAX_IMAGE_PIXELS", "60000")
    assert read_image(path).shape == (200, 300)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)  # the module setting wins over the environment
    with pytest.raises(ImageReadError, match="limit of 1,000 pixels"):
        read_image(path)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setenv("MEDBRIDGE_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="MEDBRIDGE_MAX_IMAGE_PIXELS must be a positive whole number"):
        read_image(path)


# -- fuzz: random bytes --------------------------------------------------------------------------------------------

MAGIC = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\x00" * 128 + b"DICM", b"II*\x00", b"MM\x00*", b"BM",
         b"\x08\x00\x05\x00CS\x0a\x00"]  # the last: an ACR-NEMA-style element, no preamble


@settings(FUZZ, max_examples=300)
@given(magic=st.sampled_from(MAGIC), body=st.binary(max_size=2048),
       suffix=st.sampled_from([".png", ".jpg", ".dcm", ".tif", ".bmp", ""]))
def test_fuzz_random_bytes(tmp_path_factory, magic, body, suffix):
    path = tmp_path_factory.getbasetemp() / f"random{suffix}"
    path.write_bytes(magic + body)
    _assert_image_or_read_error(path)


# -- fuzz: mutated real files --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_files(nih_sample, tmp_path_factory) -> dict[str, tuple[bytes, int]]:
    """Real images as bytes with the size of the region worth mutating most (headers): an NIH JPEG, the same
    NIH radiograph losslessly re-encoded as PNG, and pydicom-data's RG1 chest X-ray DICOM (uncompressed)."""
    from PIL import Image

    jpg = sorted((nih_sample / "images").glob("*.jpg"))[0].read_bytes()
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpg)).save(buf, format="PNG")
    dcm_path = rg1_dicom("UNCR")
    dcm = dcm_path.read_bytes()
    import pydicom

    pixel_offset = dcm.index(b"\xe0\x7f\x10\x00") + 12  # (7FE0,0010) Pixel Data, explicit VR OW header
    assert pydicom.dcmread(io.BytesIO(dcm)).Rows == 1955
    return {".jpg": (jpg, 1024), ".png": (buf.getvalue(), 256), ".dcm": (dcm, pixel_offset)}


def _mutations(max_header: int = 4096):
    anywhere = st.floats(0.0, 1.0)  # a fraction of the file
    position = st.one_of(st.integers(0, max_header), anywhere, anywhere)  # header bytes 1 in 3, else anywhere
    flip = st.tuples(st.just("flip"), position, st.integers(1, 255))
    overwrite = st.tuples(st.just("set"), position, st.binary(min_size=1, max_size=8))
    delete = st.tuples(st.just("delete"), position, st.integers(1, 64))
    truncate = st.tuples(st.integers(0, 3), st.floats(0.0, 1.0)).map(lambda t: t[1] if t[0] == 0 else None)
    return st.tuples(st.lists(st.one_of(flip, overwrite, delete), min_size=1, max_size=4), truncate)  # 1 in 4


def _mutate(data: bytes, header: int, ops, truncate) -> bytes:
    out = bytearray(data)
    for kind, pos, arg in ops:
        if not out:
            break
        at = min(pos if isinstance(pos, int) and pos < header else int(float(pos) % 1.0 * len(out)), len(out) - 1)
        if kind == "flip":
            out[at] ^= arg
        elif kind == "set":
            out[at:at + len(arg)] = arg
        else:
            del out[at:at + arg]
    if truncate is not None:
        del out[int(truncate * len(out)):]
    return bytes(out)


@settings(FUZZ, max_examples=150)
@given(suffix=st.sampled_from([".jpg", ".png"]), mutation=_mutations())
def test_fuzz_mutated_nih_radiograph(real_files, tmp_path_factory, suffix, mutation):
    data, header = real_files[suffix]
    path = tmp_path_factory.getbasetemp() / f"mutated{suffix}"
    path.write_bytes(_mutate(data, header, *mutation))
    _assert_image_or_read_error(path)


@pytest.mark.slow
@settings(FUZZ, max_examples=80)
@given(mutation=_mutations(), suffix=st.sampled_from([".dcm", ""]))
def test_fuzz_mutated_rg1_dicom(real_files, tmp_path_factory, mutation, suffix):
    data, header = real_files[".dcm"]
    path = tmp_path_factory.getbasetemp() / f"mutated_rg1{suffix}"
    path.write_bytes(_mutate(data, header, *mutation))
    _assert_image_or_read_error(path)
