"""Issue 27 item 2: a serve request's work is bounded by stated limits (pixels, aspect ratio, views per image and
per request, heat maps), checked from the header before decoding; the Host header is checked; a 500 logs no
traceback; the same bounds and EXIF orientation apply to ``medbridge predict``. Each test failed on 3ec5e49."""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers import save_tiny_clip

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from medbridge.cli.main import main  # noqa: E402
from medbridge.data.focal import FocalConfig  # noqa: E402
from medbridge.methods import create_method, save_method  # noqa: E402
from medbridge.serve.app import create_app  # noqa: E402
from medbridge.serve.decode import UploadError, UploadLimits, decode_upload  # noqa: E402
from medbridge.serve.limits import RequestBudget, host_name  # noqa: E402

LOCAL = "http://127.0.0.1"
LABELS = ["Atelectasis", "Pneumonia", "Effusion"]


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """An (untrained) linear probe with the default focal views (512 px windows), saved like a trained one."""
    root = tmp_path_factory.mktemp("probe")
    method = create_method("linear-probe", {"C": [0.1]}, backbones=[save_tiny_clip(root / "clip")], labels=LABELS,
                           focal={})
    return save_method(method, root / "linear_probe")


@pytest.fixture(scope="module")
def client(probe):
    with TestClient(create_app(probe), base_url=LOCAL) as c:
        yield c


def header_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (8-bit grey) with a few bytes of pixel data: what an attacker
    sends; the limits must refuse it from the header, before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def real_png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, format="PNG")
    return buf.getvalue()


class Decoded(BaseException):
    """Raised where pixels would be decoded (a BaseException: no decoder's error handling turns it into a 422)."""


@pytest.fixture
def no_decoding(monkeypatch):
    """Any attempt to decode pixel data raises :class:`Decoded`."""
    from PIL import ImageFile

    def refuse(self, *a, **k):
        raise Decoded("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_the_32x16000_png_is_refused_before_any_work(client, no_decoding):
    """655 bytes that cost 228 s of CPU and 6.7 GB (1,000 focal crops) before: now 422 from the header."""
    data = real_png(32, 16000)
    assert len(data) < 2000
    r = client.post("/v1/predict", content=data)
    assert r.status_code == 422
    assert "aspect ratio of 500.0, above the limit of 10" in r.json()["error"]
    r = client.post("/v1/predict", content=header_png(2, 20_000_000))  # 20 million crops before (MemoryError)
    assert r.status_code == 422 and "aspect ratio" in r.json()["error"]


def test_views_pixels_and_heat_maps_per_request_are_bounded(probe, client, no_decoding):
    r = client.post("/v1/predict", content=header_png(6300, 6300))  # 39.7 MP: 577 views of 512 px
    assert r.status_code == 413 and "gives 577 views" in r.json()["error"] and "limit of 256" in r.json()["error"]
    small = UploadLimits(max_request_pixels=3_000_000, max_explain_maps=4)
    with TestClient(create_app(probe, limits=small), base_url=LOCAL) as c:
        files = [("files", (f"x{i}.png", header_png(1200, 1200))) for i in range(3)]
        r = c.post("/v1/predict", files=files)
        assert r.status_code == 413 and r.json()["error"].startswith("x2.png: the request's images hold 4,320,000")
        r = c.post("/v1/predict?explain=all", files=files[:2])
        assert r.status_code == 413 and "3 heat map(s) x 2 image(s) = 6 maps, above the limit of 4" in r.json()[
            "error"]
        limits = c.get("/v1/model").json()["limits"]
        assert limits["max_explain_maps"] == 4 and limits["max_views"] == 256 and limits["max_aspect"] == 10
    budget = RequestBudget(UploadLimits(max_request_views=10))
    budget.charge("a", 100, 6)
    with pytest.raises(UploadError, match="b: the request's images give 12 views in all, above the limit of 10"):
        budget.charge("b", 100, 6)


def test_repeated_explain_labels_are_explained_once():
    from medbridge.serve.predictor import parse_explain

    assert parse_explain("Pneumonia,Pneumonia,Effusion,Pneumonia", LABELS) == [1, 2]


def test_only_bound_host_names_are_answered(probe):
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil.example."""
    with TestClient(create_app(probe), base_url=LOCAL) as c:
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
            r = c.get("/v1/model", headers={"host": host})
            assert r.status_code == 400 and "Host header not accepted" in r.json()["error"], host
        for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:8000"):
            assert c.get("/v1/model", headers={"host": host}).status_code == 200, host
    with TestClient(create_app(probe, token="t0ken-long-enough", host="0.0.0.0"), base_url="http://evil.example") as c:
        assert c.get("/v1/model", headers={"Authorization": "Bearer t0ken-long-enough"}).status_code == 200
    assert host_name("[::1]:80") == "::1" and host_name("::1") == "::1" and host_name("a.b:9") == "a.b"


def test_a_500_logs_the_type_only_and_never_raises_out(probe, caplog, nih_sample):
    app = create_app(probe)
    with TestClient(app, base_url=LOCAL) as c:  # raise_server_exceptions: an escaping exception fails here

        def boom(jobs):
            raise RuntimeError("secret patient detail")

        app.state.batcher.fn = boom
        caplog.set_level(logging.DEBUG)
        r = c.post("/v1/predict", content=sorted((nih_sample / "images").glob("*.jpg"))[0].read_bytes())
    assert r.status_code == 500 and "internal error" in r.json()["error"]
    assert "internal error on POST /v1/predict: RuntimeError" in caplog.text
    assert "secret patient detail" not in caplog.text and not any(rec.exc_info for rec in caplog.records)


def test_unterminated_multipart_and_bad_limits_are_refused(client, probe, capsys):
    body = b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + real_png(8, 8)
    r = client.post("/v1/predict", content=body, headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 400 and "closing boundary" in r.json()["error"]
    for option in ("--max-upload-mb", "--max-megapixels"):
        for value in ("-1", "0", "nan"):
            assert main(["serve", str(probe), option, value]) == 2
            assert f"{option} must be a number > 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="upload limits must be > 0: max_views=0"):
        UploadLimits(max_views=0)


def rotated_copy(src: Path, out: Path) -> Path:
    """A real X-ray stored turned 90 degrees with EXIF orientation 6 ("rotate 90 CW to view"), as phones and some
    scanners write it: a viewer shows it upright."""
    from PIL import Image

    with Image.open(src) as im:
        exif = Image.Exif()
        exif[0x0112] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(out, quality=100, exif=exif.tobytes())
    return out


def test_exif_orientation_is_applied_in_serve_and_predict(probe, tmp_path, nih_sample, capsys):
    from medbridge.data.images import read_image

    src = sorted((nih_sample / "images").glob("*.jpg"))[0]
    rotated = rotated_copy(src, tmp_path / "rotated.jpg")
    upright, turned = read_image(src), read_image(rotated)
    assert turned.shape == upright.shape  # stored 90 degrees off, read upright
    assert np.abs(turned - upright).mean() < 0.02  # JPEG re-encoding only
    served = decode_upload(rotated.read_bytes(), "rotated.jpg")
    np.testing.assert_array_equal(served, turned)
    (tmp_path / "in").mkdir()
    for p in (src, rotated):
        (tmp_path / "in" / p.name).write_bytes(p.read_bytes())
    assert main(["predict", str(probe), str(tmp_path / "in"), "--json"]) == 0
    rows = {Path(r["image"]).name: r["probabilities"] for r in json.loads(capsys.readouterr().out)}
    for lab in LABELS:
        assert abs(rows["rotated.jpg"][lab] - rows[src.name][lab]) < 0.02


def test_predict_applies_the_same_bounds_and_keeps_overlays_out_of_its_inputs(probe, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "strip.png").write_bytes(real_png(32, 16000))
    assert main(["predict", str(probe), str(tmp_path / "in")]) == 2
    assert "aspect ratio of 500.0, above the limit of 10" in capsys.readouterr().err
    (tmp_path / "in" / "strip.png").write_bytes(real_png(64, 64))
    for inside in ("in", "in/maps"):
        assert main(["predict", str(probe), str(tmp_path / "in"), "--explain", str(tmp_path / inside)]) == 2
        assert "inside the input folder" in capsys.readouterr().err
    assert main(["predict", str(probe), "y" * 100_000 + ".png"]) == 2  # was a raw "File name too long" with it
    err = capsys.readouterr().err
    assert "cannot be looked up (File name too long)" in err and len(err) < 400


@settings(max_examples=60, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(1, 2**31 - 1) | st.integers(1, 5000), height=st.integers(1, 2**31 - 1) | st.integers(1, 5000),
       region=st.sampled_from([512, 64, 0.25, 1.0]), stride=st.sampled_from([None, 0.5, 8]))
def test_fuzz_image_shapes_are_bounded_before_decoding(no_decoding, width, height, region, stride):
    """Any declared PNG shape with any focal settings: refused (413/422) from the header, or within every limit
    (then decoding is reached, which the fixture turns into :class:`Decoded`)."""
    focal = FocalConfig(region_size=region, stride=stride)
    limits = UploadLimits()
    try:
        decode_upload(header_png(width, height), "x.png", limits, focal, RequestBudget(limits))
    except UploadError as exc:
        assert exc.status in (413, 422) and "limit" in str(exc)
        return
    except Decoded:
        pass
    assert width * height <= limits.max_pixels
    assert max(width, height) / min(width, height) <= limits.max_aspect
    assert focal.max_views(height, width) <= limits.max_views
