"""medbridge serve: the API through an in-process client on a run trained here (tiny CLIP, real NIH images), the
in-memory decoder against the file reader on real files, every refused upload, the token, explanations."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from tests.helpers import nih_subset_csv, rg1_dicom, save_tiny_clip

from medbridge.cli.main import main

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from medbridge.serve.app import create_app  # noqa: E402
from medbridge.serve.decode import UploadLimits, decode_upload, sniff_format  # noqa: E402

LOCAL = "http://127.0.0.1"  # a Host name the service answers to (the test client's default, testserver, is not)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, nih_sample):
    """A MedBridge run with a linear probe and a CLIP-Adapter baseline, trained on 48 real NIH images with a tiny
    CLIP; 512 px focal crops so MedBridge has 5 views."""
    root = tmp_path_factory.mktemp("serve")
    data = nih_subset_csv(nih_sample, root / "data" / "labels.csv", n=48)
    backbone = save_tiny_clip(root / "tiny-clip")
    common = ["--data", str(data), "--backbone", backbone, "--quiet", "--set", "train.epochs=1",
              "--set", f"train.cache_dir={root / 'cache'}", "--set", "train.workers=0",
              "--set", "focal.region_size=512", "--set", "focal.stride=512",
              "--set", "data.fractions=[0.5,0.2,0.3]"]
    assert main(["train", *common, "--out", str(root / "run"), "--with-probe"]) == 0
    assert main(["train", *common, "--out", str(root / "adapter-run"), "--method", "clip-adapter"]) == 0
    return {"root": root, "run": root / "run", "baseline": root / "adapter-run", "nih": nih_sample}


@pytest.fixture(scope="module")
def client(tiny_run):
    with TestClient(create_app(tiny_run["run"]), base_url=LOCAL) as c:
        yield c


def nih_jpeg(nih_sample: Path, k: int = 0) -> Path:
    return sorted((nih_sample / "images").glob("*.jpg"))[k]


def png16(tmp_path: Path, nih_sample: Path) -> Path:
    """A real NIH image stored as a 16-bit greyscale PNG."""
    from PIL import Image

    from medbridge.data.images import read_image

    arr = (read_image(nih_jpeg(nih_sample, 1)) * 65535).round().astype(np.uint16)
    out = tmp_path / "xray16.png"
    Image.fromarray(arr).save(out)
    assert Image.open(out).mode.startswith("I;16")
    return out


def upload(client, paths: list[Path], query: str = "") -> dict:
    r = client.post("/v1/predict" + query, files=[("files", (p.name, p.read_bytes(), "application/octet-stream"))
                                                  for p in paths])
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("kind", ["UNCR", "J2KR", "J2KI"])
def test_in_memory_dicom_decoding_equals_the_file_reader(kind):
    from medbridge.data.images import read_image

    path = rg1_dicom(kind)  # real chest X-ray, MONOCHROME1; JPEG 2000 lossless / lossy
    data = path.read_bytes()
    assert sniff_format(data) == "dicom"
    np.testing.assert_allclose(decode_upload(data, path.name), read_image(path), atol=1e-6)


def test_in_memory_png_jpeg_decoding_equals_the_file_reader(tmp_path, nih_sample):
    from medbridge.data.images import read_image

    for path in (nih_jpeg(nih_sample), png16(tmp_path, nih_sample)):
        got = decode_upload(path.read_bytes(), path.name)
        np.testing.assert_allclose(got, read_image(path), atol=1e-6)
    assert sniff_format(nih_jpeg(nih_sample).read_bytes()) == "jpeg"


def test_monochrome1_is_inverted_relative_to_monochrome2():
    import pydicom

    ds = pydicom.dcmread(rg1_dicom("UNCR"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    as_m1 = decode_upload(rg1_dicom("UNCR").read_bytes())
    ds.PhotometricInterpretation = "MONOCHROME2"
    buf = io.BytesIO()
    ds.save_as(buf)
    np.testing.assert_allclose(decode_upload(buf.getvalue()), 1.0 - as_m1, atol=1e-6)


# ---------------------------------------------------------------------------------------------- endpoints

def test_healthz_model_docs_and_page(client, tiny_run):
    assert client.get("/healthz").json() == {"status": "ok", "method": "medbridge"}
    info = client.get("/v1/model").json()
    metrics = json.loads((tiny_run["run"] / "metrics.json").read_text())["methods"]["medbridge"]
    assert info["method"] == "medbridge" and info["labels"] == ["Pneumonia", "Infiltration", "Effusion"]
    assert info["backbones"][0].startswith("local-dir:")
    assert info["thresholds"] == pytest.approx(metrics["thresholds"])
    assert info["metrics"]["macro"]["auroc"] == pytest.approx(metrics["macro"]["auroc"])
    assert info["training_data"]["fractions"] == [0.5, 0.2, 0.3]
    docs = client.get("/docs").text
    assert "/docs-assets/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    page = client.get("/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/app.css"):
        assert client.get(asset).status_code == 200
    assert "http" not in page.text.replace("http://www.w3.org", "")  # no external asset


def test_predict_equals_the_method_on_the_files_for_every_format(client, tiny_run, tmp_path):
    """JPEG, 16-bit PNG, uncompressed and JPEG 2000 DICOM in one request: the same probabilities, gate and views
    as the method applied to the files read from disk at full resolution, and the run's thresholds."""
    import torch

    from medbridge.data.focal import focal_views
    from medbridge.data.images import read_image
    from medbridge.engine.evaluate import run_thresholds
    from medbridge.methods import load_method

    paths = [nih_jpeg(tiny_run["nih"]), png16(tmp_path, tiny_run["nih"]), rg1_dicom("UNCR"), rg1_dicom("J2KR")]
    res = upload(client, paths)["results"]
    method = load_method(tiny_run["run"])
    thresholds = run_thresholds(tiny_run["run"], "medbridge")
    assert [r["image"] for r in res] == [p.name for p in paths]
    for got, path in zip(res, paths):
        views = focal_views(read_image(path), method.focal, method.preprocess)
        probs, details = method.scores_views([v.pixels.unsqueeze(0) for v in views])
        got_probs = [p["probability"] for p in got["predictions"]]
        assert [p["label"] for p in got["predictions"]] == method.labels
        np.testing.assert_allclose(got_probs, probs[0], atol=1e-5)
        assert [p["positive"] for p in got["predictions"]] == [bool(probs[0, c] >= thresholds[lab])
                                                                for c, lab in enumerate(method.labels)]
        assert all(p["threshold"] == pytest.approx(thresholds[p["label"]]) for p in got["predictions"])
        np.testing.assert_allclose(got["gate"], details["gate"][0], atol=1e-4)
        assert [v["box"] for v in got["views"]] == views[0].boxes.tolist()
        np.testing.assert_allclose([v["vote"] for v in got["views"]],
                                   torch.as_tensor(details["view_votes"][0]).mean(0).numpy(), atol=1e-4)
    assert len(res[0]["views"]) == 5 and len(res[2]["views"]) == 17  # 1024 px NIH vs 1841 x 1955 RG1
    assert (res[2]["width"], res[2]["height"]) == (1841, 1955)


def test_raw_body_upload_and_explanation_maps(client, tiny_run):
    from PIL import Image

    r = client.post("/v1/predict?explain=all&preview=true", content=rg1_dicom("J2KI").read_bytes(),
                    headers={"content-type": "application/dicom"})
    assert r.status_code == 200, r.text
    row = r.json()["results"][0]
    ex = row["explanation"]
    assert set(ex["maps"]) == {"Pneumonia", "Infiltration", "Effusion"}
    for url in ex["maps"].values():
        im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        arr = np.asarray(im)
        assert arr.shape == (ex["height"], ex["width"]) and arr.max() == 255 and arr.std() > 0
    assert ex["height"] == 128 and ex["width"] == round(128 * 1841 / 1955)
    preview = Image.open(io.BytesIO(base64.b64decode(row["preview"].split(",", 1)[1])))
    assert max(preview.size) == 1024


@pytest.mark.parametrize("which", ["run/linear_probe", "baseline"])
def test_probe_and_baseline_are_served_with_explanations(tiny_run, which):
    folder = tiny_run["run"] / "linear_probe" if which == "run/linear_probe" else tiny_run["baseline"]
    with TestClient(create_app(folder), base_url=LOCAL) as c:
        info = c.get("/v1/model").json()
        assert info["method"] == ("linear-probe" if which == "run/linear_probe" else "clip-adapter")
        row = upload(c, [nih_jpeg(tiny_run["nih"])], "?explain=top2")["results"][0]
        one = upload(c, [nih_jpeg(tiny_run["nih"])], "?explain=Effusion")["results"][0]["explanation"]["maps"]
    assert "gate" not in row and one.keys() == {"Effusion"}
    ranked = [p["label"] for p in sorted(row["predictions"], key=lambda p: -p["probability"])]
    assert list(row["explanation"]["maps"]) == ranked[:2]
    assert row["threshold_source"] == "validation split of the training run"


def test_concurrent_requests_share_model_batches(tiny_run):
    import httpx

    app = create_app(tiny_run["run"] / "linear_probe", max_wait_s=0.05)
    data = nih_jpeg(tiny_run["nih"]).read_bytes()

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL) as c:
            rs = await asyncio.gather(*(c.post("/v1/predict", content=data) for _ in range(6)))
            return rs, (await c.get("/v1/model")).json()["service"]

    rs, service = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs)
    probs = [r.json()["results"][0]["predictions"][0]["probability"] for r in rs]
    assert max(probs) - min(probs) < 1e-6
    assert service["requests"] == 6 and service["images"] == 6 and service["batches"] < 6


def test_full_queue_answers_503(tiny_run):
    with TestClient(create_app(tiny_run["run"] / "linear_probe", max_pending=1), base_url=LOCAL) as c:
        paths = [nih_jpeg(tiny_run["nih"], 0), nih_jpeg(tiny_run["nih"], 1)]
        r = c.post("/v1/predict", files=[("files", (p.name, p.read_bytes())) for p in paths])
    assert r.status_code == 503 and "busy" in r.json()["error"] and r.headers["retry-after"] == "1"


# ---------------------------------------------------------------------------------------------- bad input

def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose data is a few compressed bytes (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


def dicom_variant(**changes) -> bytes:
    import pydicom

    ds = pydicom.dcmread(rg1_dicom("UNCR"))
    for key, value in changes.items():
        if value is None:
            del ds[key]
        else:
            setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


BAD_UPLOADS = {
    "empty": (b"", 400, "empty upload"),
    "text named .png": (b"just some text, not an image" * 10, 415, "not a PNG, JPEG or DICOM"),
    "truncated png": (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 422, "unreadable or corrupt PNG"),
    "truncated jpeg": (b"\xff\xd8\xff\xe0" + b"\0" * 40, 422, "unreadable or corrupt JPEG"),
    "png bomb": (png_header_only(9000, 9000), 413, "9000 x 9000 = 81,000,000 pixels exceeds the limit of 40,000,000"),
    "huge png bomb": (png_header_only(30000, 30000), 413, "exceeds the limit of 40,000,000 pixels"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_4xx_json_naming_the_problem(client, case):
    data, status, words = BAD_UPLOADS[case]
    r = client.post("/v1/predict", files=[("files", ("scan.png", data, "image/png"))])
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and words in r.json()["error"]
    if data:
        assert r.json()["error"].startswith("scan.png:")


@pytest.mark.parametrize("case", ["bomb", "no pixels", "no preamble"])
def test_bad_dicom_uploads(client, case):
    if case == "bomb":
        data, status, words = dicom_variant(Rows=40000, Columns=40000), 413, "exceeds the limit"
    elif case == "no pixels":
        data, status, words = dicom_variant(PixelData=None), 422, "no pixel data"
    else:
        data, status, words = rg1_dicom("UNCR").read_bytes()[132:], 415, "not a PNG, JPEG or DICOM"
    r = client.post("/v1/predict", content=data, headers={"content-type": "application/dicom"})
    assert r.status_code == status and words in r.json()["error"], r.text


def test_request_shape_errors(tiny_run, client):
    small = UploadLimits(max_bytes=100_000, max_pixels=40_000_000, max_images=2)
    big = rg1_dicom("J2KI").read_bytes()
    with TestClient(create_app(tiny_run["run"] / "linear_probe", limits=small), base_url=LOCAL) as c:
        r = c.post("/v1/predict", content=big)
        assert r.status_code == 413 and "exceeds the limit of 100,000 bytes" in r.json()["error"]
        three = [("files", (f"a{i}.png", b"x")) for i in range(3)]
        r = c.post("/v1/predict", files=three)
        assert r.status_code == 413 and "3 images in one request; the limit is 2" in r.json()["error"]
    r = client.post("/v1/predict", files=[("scan", ("a.png", b"x"))])
    assert r.status_code == 400 and "unexpected form field 'scan'" in r.json()["error"]
    r = client.post("/v1/predict", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["error"]
    r = client.post("/v1/predict?explain=Pneumonia,Cardiomegaly", content=b"x")
    assert r.status_code == 422 and "unknown label(s) ['Cardiomegaly']" in r.json()["error"]
    r = client.post("/v1/predict?preview=maybe", content=b"x")
    assert r.status_code == 422 and "preview" in r.json()["error"]
    r = client.post("/v1/predict")
    assert r.status_code == 400 and "empty request" in r.json()["error"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}


def test_uploads_never_touch_disk_or_logs(client, monkeypatch, caplog):
    """A 7 MB DICOM (above Starlette's 1 MiB spooling size) is answered without any temporary file, and nothing of
    its header (patient name/id) reaches the log."""
    import tempfile

    def refuse(*args, **kwargs):
        raise AssertionError("an upload was about to be written to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    caplog.set_level("DEBUG")
    data = rg1_dicom("UNCR").read_bytes()
    assert len(data) > 4 * 1024 * 1024
    r = client.post("/v1/predict", files=[("files", ("study.dcm", data, "application/dicom"))])
    assert r.status_code == 200, r.text
    bad = client.post("/v1/predict", content=dicom_variant(PixelData=None))
    assert bad.status_code == 422
    for secret in ("CompressedSamples", "9RG1"):
        assert secret not in caplog.text and secret not in bad.text


# ---------------------------------------------------------------------------------------------- security

def test_token_required_off_loopback(tiny_run):
    from medbridge.serve.app import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    with pytest.raises(ValueError, match="pass --token"):
        create_app(tiny_run["run"] / "linear_probe", host="0.0.0.0")
    with TestClient(create_app(tiny_run["run"] / "linear_probe", token="s3cret-token", host="0.0.0.0")) as c:
        assert c.get("/healthz").status_code == 200
        data = nih_jpeg(tiny_run["nih"]).read_bytes()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
            for r in (c.get("/v1/model", headers=headers), c.post("/v1/predict", content=data, headers=headers)):
                assert r.status_code == 401 and "bearer token" in r.json()["error"]
                assert r.headers["www-authenticate"] == "Bearer"
        ok = {"Authorization": "Bearer s3cret-token"}
        assert c.get("/v1/model", headers=ok).status_code == 200
        assert c.post("/v1/predict", content=data, headers=ok).status_code == 200


def test_serve_command_refuses_public_bind_without_token(tiny_run, capsys):
    assert main(["serve", str(tiny_run["run"]), "--host", "0.0.0.0"]) == 2
    assert "pass --token" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- explanations

def test_predict_explain_writes_overlays(tiny_run, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "overlays"
    args = ["predict", str(tiny_run["run"]), str(nih_jpeg(tiny_run["nih"])), str(rg1_dicom("J2KI")), "--explain",
            str(out), "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    files = sorted(out.glob("*.png"))
    expected = sum(len(set(r["labels"]) | set(sorted(r["probabilities"], key=lambda k: -r["probabilities"][k])[:3]))
                   for r in rows)
    assert len(files) == expected and files[0].name.startswith("0000_")
    im = Image.open(out / "0001_RG1_J2KI_Effusion.png")
    assert im.size == (round(1024 * 1841 / 1955), 1024) and im.mode == "RGB"
    assert main(args) == 2  # the overlays exist: refused without --overwrite
    assert "exists" in capsys.readouterr().err


def test_heat_maps_follow_the_method_and_the_hottest_box():
    import torch

    from medbridge.serve.explain import hottest_box

    heat = np.zeros((60, 80))
    heat[40:50, 10:20] = 1.0
    assert hottest_box(heat, 10) == (10, 40, 20, 50)
    assert hottest_box(torch.rand(30, 30).numpy(), 50) == (0, 0, 30, 30)


@pytest.mark.parametrize("which", ["medbridge", "linear_probe", "baseline"])
def test_explanation_forward_reproduces_the_method(tiny_run, which):
    """The differentiable forward the heat maps use gives the method's own probabilities (MedBridge through
    forward_cached from recomputed frozen states, probe, baseline)."""
    from medbridge.data.focal import focal_views
    from medbridge.data.images import read_image
    from medbridge.methods import load_method
    from medbridge.serve.explain import token_relevance

    folder = {"medbridge": tiny_run["run"], "linear_probe": tiny_run["run"] / "linear_probe",
              "baseline": tiny_run["baseline"]}[which]
    method = load_method(folder)
    views = focal_views(read_image(nih_jpeg(tiny_run["nih"], 2)), method.focal, method.preprocess)
    pixels = [v.pixels.unsqueeze(0) for v in views]
    want = method.scores_views(pixels)[0][0]
    for layer in (0, 2):
        probs, maps = token_relevance(method, pixels, [2, 0], layer)
        np.testing.assert_allclose(probs, want[[2, 0]], atol=1e-5)
        assert maps[0].shape[:2] == (2, pixels[0].shape[1]) and (maps[0] >= 0).all() and maps[0].max() > 0


# ---------------------------------------------------------------------------------------------- the page

PAGE_TIMEOUT_MS = 600_000  # scoring + one heat map with the bundled backbone on 2 busy cores can take minutes
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    import shutil

    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine (scripts/setup.sh installs Debian's chromium where apt can)")


@pytest.fixture
def live_server(tiny_run):
    """The app on a free loopback port in a uvicorn thread: the run from MEDBRIDGE_SERVE_BROWSER_RUN if set (e.g.
    a demo run with the bundled backbone, for the docs' screenshot), else the tiny run."""
    import os
    import socket
    import threading
    import time

    import uvicorn

    run = os.environ.get("MEDBRIDGE_SERVE_BROWSER_RUN") or tiny_run["run"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(run), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.mark.slow
def test_page_in_headless_chromium(live_server, tiny_run, tmp_path):
    """Debian's Chromium driven by Playwright: upload the real RG1 DICOM (MONOCHROME1, JPEG 2000) and a real NIH
    image, wait for the label table, check the heat-map canvas has coloured pixels, use the keyboard to pick
    another label and the opacity slider, save a screenshot."""
    import os
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python client is not installed")
    executable = chromium_path()
    def drawn(label: str) -> str:  # the overlay canvas once the label's heat map is drawn on it
        return f"#overlay[data-label={json.dumps(label)}]"

    overlay_pixels = ("() => { const c = document.getElementById('overlay'); if (!c.width) return 0;"
                      " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;"
                      " for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }")
    with sync_api.sync_playwright() as pw:
        try:
            context = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=executable,
                                                            headless=True, args=CHROMIUM_ARGS,
                                                            viewport={"width": 1280, "height": 900})
        except Exception as exc:  # e.g. a Chromium that cannot start in this container
            pytest.skip(f"Chromium at {executable} did not start: {str(exc).splitlines()[0]}")
        try:
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.goto(live_server + "/")
            # waits use selectors: the page's Content-Security-Policy forbids the eval behind wait_for_function
            page.locator("#model-info", has_text="labels").wait_for()
            notice = page.locator("#notice")
            assert notice.is_visible() and "Research use only — not for diagnosis" in notice.inner_text()
            assert "calibrated" in page.locator("#calibration-info").inner_text()
            assert "validation part" in page.locator("th abbr").first.get_attribute("title")
            for path in (rg1_dicom("J2KR"), nih_jpeg(tiny_run["nih"])):
                page.set_input_files("#file", str(path))
                page.locator("#status", has_text=f"Scored {path.name}").wait_for(timeout=PAGE_TIMEOUT_MS)
                rows = page.locator("#labels tbody tr")
                assert rows.count() >= 3
                # every decision says why in plain words; a label without a threshold says what that means
                reasons = rows.locator("td:nth-child(4) .reason").all_inner_texts()
                assert len(reasons) == rows.count() and all(
                    r.startswith(("no threshold: this label was never positive in validation", "flagged because"))
                    or " the validation threshold" in r or " this label's validation threshold" in r
                    for r in reasons), reasons
                probs = [float(t.rstrip("%")) for t in rows.locator("td:nth-child(2)").all_inner_texts()]
                assert probs == sorted(probs, reverse=True)
                first = rows.nth(0).get_attribute("data-label")
                page.wait_for_selector(drawn(first), state="attached", timeout=PAGE_TIMEOUT_MS)
                assert page.evaluate(overlay_pixels) > 100
                assert page.locator("#xray").evaluate("img => img.naturalWidth") > 0
            # keyboard: the first label's button, ArrowDown selects the next label and draws its heat map
            second = rows.nth(1).get_attribute("data-label")
            rows.nth(0).locator("button").focus()
            page.keyboard.press("ArrowDown")
            assert rows.nth(1).locator("button").get_attribute("aria-pressed") == "true"
            page.wait_for_selector(drawn(second), state="attached", timeout=PAGE_TIMEOUT_MS)
            assert page.evaluate(overlay_pixels) > 100
            page.locator("#opacity").focus()
            for _ in range(10):
                page.keyboard.press("ArrowRight")
            assert page.locator("#overlay").evaluate("c => c.style.opacity") == "0.7"
            shot = tmp_path / "serve_page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("MEDBRIDGE_SCREENSHOT"):
                shutil.copyfile(shot, os.environ["MEDBRIDGE_SCREENSHOT"])
            assert not errors, errors
        finally:
            context.close()


def test_deleting_the_hottest_region_lowers_the_score_more_than_a_random_one(tiny_run):
    """Faithfulness on real NIH test images: over each image's 3 most probable labels, filling the square where the
    label's heat map is hottest lowers that label's probability more, on average, than filling random squares of
    the same area (docs/serve.md has the numbers with the bundled backbone)."""
    from medbridge.data import load_dataset, load_split
    from medbridge.data.images import read_image
    from medbridge.methods import load_method
    from medbridge.serve.explain import deletion_test

    run = tiny_run["run"]
    table = load_dataset("csv", tiny_run["root"] / "data" / "labels.csv")
    rows = load_split(run / "split.json", table).test[:6]
    images = [read_image(p) for p in table.meta["path"].iloc[rows]]
    res = deletion_test(load_method(run), images, labels_per_image=3, n_random=3)
    assert len(res) == 18
    drop_hot = np.mean([r["p"] - r["p_hot"] for r in res])
    drop_random = np.mean([r["p"] - r["p_random"] for r in res])
    assert drop_hot > drop_random, (drop_hot, drop_random)


def test_a_label_without_validation_positives_has_no_threshold(tiny_run, tmp_path):
    """metrics.json stores an infinite threshold for a label with no positive in the validation split: the API
    answers null (valid JSON) and never calls it positive."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run, ignore=shutil.ignore_patterns("checkpoint.pt", "predictions_*"))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["methods"]["medbridge"]["thresholds"]["Effusion"] = float("inf")
    (run / "metrics.json").write_text(json.dumps(metrics))
    with TestClient(create_app(run), base_url=LOCAL) as c:
        assert c.get("/v1/model").json()["thresholds"]["Effusion"] is None
        row = upload(c, [nih_jpeg(tiny_run["nih"])])["results"][0]
    effusion = next(p for p in row["predictions"] if p["label"] == "Effusion")
    assert effusion["threshold"] is None and effusion["positive"] is False
    assert effusion["decision"] == "probability only"
    assert effusion["reason"].startswith("no threshold: this label was never positive in validation")


def test_a_cross_validation_run_serves_its_first_fold(tiny_run, tmp_path):
    """``medbridge demo`` and ``train --cv K`` write fold-<f>/ run folders under one CV folder: serving the CV folder
    serves fold-0's model with that fold's thresholds, and /v1/model adds the cross-validated metrics."""
    import shutil

    cv = tmp_path / "cv"
    for f in (0, 1):
        shutil.copytree(tiny_run["run"], cv / f"fold-{f}", ignore=shutil.ignore_patterns("checkpoint.pt"))
    fold_metrics = json.loads((cv / "fold-0" / "metrics.json").read_text())["methods"]["medbridge"]
    (cv / "metrics.json").write_text(json.dumps({"protocol": "cv", "folds": 2, "methods": {
        "medbridge": {"macro": {"auroc": 0.61, "auroc_ci": [0.5, 0.7]}}}}))
    with TestClient(create_app(cv), base_url=LOCAL) as c:
        info = c.get("/v1/model").json()
        row = upload(c, [nih_jpeg(tiny_run["nih"])])["results"][0]
    assert info["cross_validation"] == {"folder": str(cv), "served_fold": "fold-0", "folds": 2,
                                        "metrics": {"macro": {"auroc": 0.61, "auroc_ci": [0.5, 0.7]}}}
    assert info["thresholds"] == pytest.approx(fold_metrics["thresholds"])
    assert row["threshold_source"] == "validation split of the training run"
