"""DICOM as hospital archives hold it, on a corpus nobody here wrote: pydicom's own test files plus pydicom-data
(compressed syntaxes, colour, palette, multi-frame, files without a preamble, broken files)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import rg1_dicom

from medbridge.data.images import ImageReadError, read_image

pydicom = pytest.importorskip("pydicom")


def _testdata(name: str) -> Path:
    """One file of pydicom's test corpus (pydicom's own files or pydicom-data's); skips when absent."""
    from pydicom.data import get_testdata_file

    try:
        path = get_testdata_file(name)
    except Exception:  # pydicom may try a download for a file it knows of but does not hold
        path = None
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return Path(path)


def _pydicom_decodes(path: str) -> tuple[bool, bool]:
    """(parses with pixel data, pydicom's own ``pixel_array`` decodes it) with the installed plugins."""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception:
        return False, False
    if "PixelData" not in ds:
        return False, False
    try:
        ds.pixel_array  # noqa: B018 - decoding is the point
    except Exception:
        return True, False
    return True, True


@pytest.mark.slow
def test_reads_every_file_pydicom_decodes_and_raises_only_image_read_error(capsys):
    from pydicom.data import get_testdata_files

    files = sorted(get_testdata_files())
    assert files, "pydicom's test corpus is empty"
    pixel_bearing = decoded_by_pydicom = read = 0
    not_read, foreign = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns at length about the malformed files on purpose
        for f in files:
            has_pixels, pydicom_ok = _pydicom_decodes(f)
            pixel_bearing += has_pixels
            decoded_by_pydicom += pydicom_ok
            try:
                img = read_image(f)
            except ImageReadError as exc:
                assert Path(f).name in str(exc), f"error message does not name the file: {exc}"
                if pydicom_ok:
                    not_read.append(f"{f}: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - any other type is the failure being tested
                foreign.append(f"{f}: {type(exc).__name__}: {exc}")
                continue
            read += 1
            assert img.dtype == np.float32 and img.ndim == 2, f"{f}: {img.dtype} {img.shape}"
            assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0, f
    with capsys.disabled():
        print(f"\nmedbridge reads {read} of {pixel_bearing} pixel-bearing files of pydicom's test corpus "
              f"(pydicom itself decodes {decoded_by_pydicom}; {len(files)} files walked)")
    assert not foreign, "exceptions other than ImageReadError:\n" + "\n".join(foreign)
    assert not not_read, "pydicom decodes these but medbridge does not:\n" + "\n".join(not_read)
    assert read >= decoded_by_pydicom > 0


def _normalised(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float64)
    return (arr - arr.min()) / (arr.max() - arr.min())


def test_jpeg_lossless_and_jpeg_ls_equal_uncompressed():
    # Process 14 SV1 (1.2.840.10008.1.2.4.70, via GDCM) and JPEG-LS lossless (via pyjpegls): bit-exact.
    np.testing.assert_array_equal(read_image(_testdata("SC_rgb_jpeg_gdcm.dcm")), read_image(_testdata("SC_rgb.dcm")))
    np.testing.assert_array_equal(read_image(_testdata("MR_small_jpeg_ls_lossless.dcm")),
                                  read_image(_testdata("MR_small.dcm")))
    lossy = read_image(_testdata("JPEGLSNearLossless_16.dcm"))
    assert lossy.shape == (int(pydicom.dcmread(_testdata("JPEGLSNearLossless_16.dcm")).Rows),) + lossy.shape[1:]


def test_multiframe_reads_the_first_frame():
    reference = pydicom.dcmread(_testdata("emri_small.dcm")).pixel_array  # 10 frames, uncompressed
    assert reference.shape[0] == 10 and not np.array_equal(reference[0], reference[1])
    img = read_image(_testdata("emri_small_jpeg_ls_lossless.dcm"))  # the same frames, JPEG-LS
    np.testing.assert_allclose(img, _normalised(reference[0]), atol=1e-6)
    np.testing.assert_array_equal(read_image(_testdata("SC_rgb_rle_2frame.dcm")), read_image(_testdata("SC_rgb.dcm")))


def test_colour_photometrics_reduce_to_bt601_luminance():
    rgb = pydicom.dcmread(_testdata("SC_rgb.dcm")).pixel_array.astype(np.float64)
    expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    img = read_image(_testdata("SC_rgb.dcm"))
    assert img.shape == rgb.shape[:2] and img.dtype == np.float32
    np.testing.assert_allclose(img, expected, atol=1e-6)
    # YBR_FULL -> RGB -> luminance is the Y plane itself (DICOM's YBR_FULL uses the same BT.601 weights), up to
    # 8-bit rounding and RGB clipping of saturated colours (< 2 grey levels)
    ybr = pydicom.dcmread(_testdata("SC_ybr_full_uncompressed.dcm"))
    ybr.pixel_array_options(raw=True)
    y_plane = ybr.pixel_array[..., 0] / 255.0
    np.testing.assert_allclose(read_image(_testdata("SC_ybr_full_uncompressed.dcm")), y_plane, atol=2 / 255)
    for name in ("SC_ybr_full_422_uncompressed.dcm", "SC_rgb_16bit.dcm", "SC_rgb_rle.dcm", "SC_rgb_expb.dcm"):
        np.testing.assert_allclose(read_image(_testdata(name)), img, atol=2 / 255, err_msg=name)
    # JPEG 2000 with its reversible colour transform (YBR_RCT) equals the uncompressed RGB original
    np.testing.assert_array_equal(read_image(_testdata("US1_J2KR.dcm")), read_image(_testdata("US1_UNCR.dcm")))


def test_palette_colour_goes_through_its_lut():
    ds = pydicom.dcmread(_testdata("OBXXXX1A.dcm"))
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    img = read_image(_testdata("OBXXXX1A.dcm"))
    indices = ds.pixel_array
    n_entries, first, bits = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
    dtype = np.dtype("<u2") if bits == 16 else np.uint8
    luts = [np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, dtype=dtype).astype(np.float64)
            for c in ("Red", "Green", "Blue")]
    rows, cols = np.nonzero(indices >= first)
    for r, c in list(zip(rows, cols))[:: max(1, len(rows) // 50)]:
        k = min(int(indices[r, c]) - first, (n_entries or 65536) - 1)
        expected = (0.299 * luts[0][k] + 0.587 * luts[1][k] + 0.114 * luts[2][k]) / (2 ** bits - 1)
        assert abs(float(img[r, c]) - expected) < 1e-5
    assert img.std() > 0.05  # not a flat image: the LUT gave it its grey levels
    np.testing.assert_array_equal(read_image(_testdata("OBXXXX1A_rle.dcm")), img)


def test_files_without_preamble_are_read_when_they_parse_as_dicom(tmp_path):
    source = _testdata("OT-PAL-8-face.dcm")  # no preamble, no 'DICM', no file meta (ACR-NEMA style)
    with open(source, "rb") as f:
        assert f.read(132)[128:] != b"DICM"
    img = read_image(source)
    assert img.shape == (480, 640) and img.std() > 0.05
    renamed = tmp_path / "FACE0001"  # no suffix either: found after Pillow does not recognise it
    shutil.copyfile(source, renamed)
    np.testing.assert_array_equal(read_image(renamed), img)


def test_unsupported_and_broken_files_name_the_file_and_the_reason(tmp_path):
    with pytest.raises(ImageReadError, match=r"MR_truncated\.dcm.*less than expected"):
        read_image(_testdata("MR_truncated.dcm"))
    with pytest.raises(ImageReadError, match=r"rtplan\.dcm: DICOM file has no pixel data"):
        read_image(_testdata("rtplan.dcm"))
    text = tmp_path / "notes.dcm"
    text.write_text("not an image at all\n")
    with pytest.raises(ImageReadError, match=r"notes\.dcm: not a DICOM file"):
        read_image(text)


@pytest.mark.slow
def test_missing_decoder_names_the_transfer_syntax_and_the_package():
    import subprocess
    import sys

    path = _testdata("SC_rgb_jpeg_gdcm.dcm")  # JPEG Lossless SV1: only GDCM (or GPL libjpeg) decodes it
    hide = "import sys; sys.modules['gdcm'] = sys.modules['libjpeg'] = None\n"  # as if not installed
    code = hide + f"from medbridge.data.images import read_image\nread_image({str(path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("medbridge.data.images.ImageReadError: "), proc.stderr[-2000:]
    assert "SC_rgb_jpeg_gdcm.dcm: cannot decode DICOM pixel data, transfer syntax JPEG Lossless" in last
    assert "(1.2.840.10008.1.2.4.70): needs package python-gdcm or pylibjpeg-libjpeg (GPL-3.0" in last


def test_12bit_jpeg_extended_names_the_optional_gpl_plugin():
    import importlib.util

    path = _testdata("JPGExtended.dcm")
    if importlib.util.find_spec("libjpeg") is not None:  # the optional GPL plugin is installed: it must decode
        assert read_image(path).ndim == 2
        return
    with pytest.raises(ImageReadError, match=r"JPGExtended\.dcm: .*JPEG Extended.*needs package pylibjpeg-libjpeg "
                                             r"\(GPL-3\.0"):
        read_image(path)


def test_dicom_pixel_limit_applies_to_rows_times_columns(monkeypatch):
    path = rg1_dicom("UNCR")  # 1955 x 1841
    monkeypatch.setenv("MEDBRIDGE_MAX_IMAGE_PIXELS", str(1955 * 1841 - 1))
    with pytest.raises(ImageReadError, match=r"RG1_UNCR\.dcm: image of 1841 x 1955 = 3,599,155 pixels exceeds"):
        read_image(path)
    monkeypatch.setenv("MEDBRIDGE_MAX_IMAGE_PIXELS", str(1955 * 1841))
    assert read_image(path).shape == (1955, 1841)
