"""ODIR-5K and cases of several images: the loader on the real sample (keyword map vs the official patient labels,
bad input), the case machinery for every method rule (a case of one image == the image; image order does not
matter; a missing image), RGB colour end to end, the fundus border crop, the ODIR challenge score, the CLI on real
fundus photographs (per patient by default, per eye on request, predict --case) and a MIMIC-CXR layout per study."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tests.helpers import cached, odir_subset, random_targets, save_tiny_clip

from medbridge.backbones.tiny import tiny_open_clip
from medbridge.cli.main import main
from medbridge.data import load_dataset
from medbridge.data.cases import CaseTable, mean_logit, to_cases
from medbridge.data.datasets import detect_format
from medbridge.data.datasets.odir import LABELS, eye_labels, patient_from_eyes, split_keywords
from medbridge.data.focal import FocalConfig, crop_to_content, focal_views
from medbridge.data.images import read_image
from medbridge.data.table import DatasetError, build_table
from medbridge.engine.cases import CaseCache, case_scores, training_data
from medbridge.engine.challenge import odir_score
from medbridge.methods import create_method

SHEET = "ODIR-5K_Training_Annotations(Updated)_V2.xlsx"


@pytest.fixture(scope="module")
def odir_table(odir_sample):
    return load_dataset(None, odir_sample)


# ------------------------------------------------------------------------------------------------ the loader
def test_the_real_sample_loads_one_row_per_eye_with_patients_as_cases(odir_sample, odir_table):
    t = odir_table
    assert detect_format(odir_sample) == "odir" and t.name == "odir" and t.labels == LABELS
    assert len(t) == 4372 and t.meta["patient_id"].nunique() == 2186
    assert (t.meta["eye"].value_counts() == 2186).all()
    assert t.meta["sex"].isin(["Female", "Male"]).all() and t.meta["age"].between(0, 110).all()
    first = t.meta.iloc[0]
    assert Path(first["path"]).name == f"{first['patient_id']}_left.jpg" and first["case_id"] == first["patient_id"]
    cases = to_cases(t)
    assert len(cases) == 2186 and cases.members.shape == (2186, 2)
    counts = dict(zip(LABELS, np.nansum(cases.targets, axis=0).astype(int)))
    assert counts == {"N": 732, "D": 726, "G": 105, "C": 132, "A": 102, "H": 71, "M": 96, "O": 491}  # README


def test_the_keyword_map_reproduces_every_official_patient_label(odir_table):
    """The OR of a patient's two derived eye labels (N: both eyes normal) against the official labels, per label;
    docs/datasets.md reports the agreement (100.0% for each of the 8 labels on the sample)."""
    cases = to_cases(odir_table)
    derived = patient_from_eyes(odir_table.targets[cases.members])
    for j, lab in enumerate(LABELS):
        agree = float((derived[:, j] == cases.targets[:, j]).mean())
        assert agree == 1.0, f"{lab}: {agree:.4f}"


def test_keywords_map_to_labels_and_unknown_keywords_are_refused():
    assert split_keywords("moderate non proliferative retinopathy，lens dust") == [
        "moderate non proliferative retinopathy", "lens dust"]
    np.testing.assert_array_equal(eye_labels(["normal fundus", "lens dust"], "x"), [1, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(eye_labels(["glaucoma", "drusen"], "x"), [0, 0, 1, 0, 0, 0, 0, 1])
    assert np.isnan(eye_labels(["low image quality"], "x")).all()  # nothing known about that eye
    with pytest.raises(DatasetError, match=r"row 7 .*unknown diagnostic keyword 'glaucomaa'.*did you mean 'glaucoma'"):
        eye_labels(["glaucomaa"], "sheet.xlsx: row 7 column 'Left-Diagnostic Keywords'")


def _edit_sheet(root: Path, cell: str, value) -> None:
    import openpyxl

    path = root / "ODIR-5K" / SHEET
    book = openpyxl.load_workbook(path)
    book.active[cell] = value
    book.save(path)


@pytest.mark.parametrize("cell,value,message", [
    ("A3", 0, r"patient ID '0' is listed more than once \(rows \[2, 3\]\)"),
    ("I4", 2, r"row 4 column 'D': label value '2' is not one of \[1, 0\]"),
    ("F5", "glaucoma，unknown thing", r"row 5 column 'Left-Diagnostic Keywords': unknown diagnostic keyword"),
])
def test_bad_sheets_are_named_by_file_row_and_column(odir_sample, tmp_path, cell, value, message):
    root = odir_subset(odir_sample, tmp_path / "odir", n=6)
    _edit_sheet(root, cell, value)
    with pytest.raises(DatasetError, match=message):
        load_dataset("odir", root)


def test_a_missing_photograph_and_an_unreadable_sheet_are_named(odir_sample, tmp_path):
    root = odir_subset(odir_sample, tmp_path / "odir", n=6)
    first = sorted((root / "ODIR-5K" / "Training Images").iterdir())[0]
    first.unlink()
    with pytest.raises(DatasetError, match=rf"not found, e\.g\. .*{first.name} \(.*{SHEET[:20]}.* row \d+\)"):
        load_dataset("odir", root)
    (root / "ODIR-5K" / SHEET).write_bytes(b"not a zip archive")
    with pytest.raises(DatasetError, match=r"cannot read .*\.xlsx as an xlsx sheet"):
        load_dataset("odir", root)


def test_kaggle_full_df_csv_gives_the_same_table(odir_sample, tmp_path, odir_table):
    root = tmp_path / "kaggle"
    (root / "preprocessed_images").mkdir(parents=True)
    sheet = pd.read_excel(odir_sample / "ODIR-5K" / SHEET, dtype=str).iloc[:10]
    rows = []
    for _, r in sheet.iterrows():
        for side in ("Left", "Right"):  # Kaggle: one row per eye, the patient's columns repeated
            name = r[f"{side}-Fundus"]
            (root / "preprocessed_images" / name).symlink_to(
                (odir_sample / "ODIR-5K" / "Training Images" / name).resolve())
            rows.append({**r.to_dict(), "filename": name, "target": "[0, 0, 0, 0, 0, 0, 0, 0]"})
    pd.DataFrame(rows).to_csv(root / "full_df.csv", index=False)
    t = load_dataset(None, root)
    assert detect_format(root) == "odir" and len(t) == 20
    np.testing.assert_array_equal(t.targets, odir_table.targets[:20])
    np.testing.assert_array_equal(to_cases(t).targets, to_cases(odir_table).targets[:10])


# ------------------------------------------------------------------------------------------------ cases, any method
@pytest.fixture(scope="module")
def clip():
    return tiny_open_clip("ViT-B-16-quickgelu", layers=12, seed=3)


def image_table(n: int, case_of: list[str]) -> object:
    meta = pd.DataFrame({"path": [f"/x/{i}.png" for i in range(n)], "patient_id": [f"p{c}" for c in case_of],
                         "case_id": case_of})
    return build_table("t", Path("/x"), ["a", "b", "c"], meta, random_targets(n, 3), check_files=False)


@pytest.mark.parametrize("name,options", [
    ("medbridge", {"num_queries": 2, "t1": 6}),  # views of all images pooled by the view attention
    ("medbridge", {"num_queries": 2, "t1": 6, "case_views": False}),  # image by image, mean of the logits
    ("linear-probe", {"C": [0.1]}),
])
def test_a_case_of_one_image_equals_the_image_and_image_order_does_not_matter(clip, name, options):
    method = create_method(name, options, backbones=[clip], labels=["a", "b", "c"], prompt_names=["a", "b", "c"],
                           focal={"num_crops": 0})
    assert method.case_views is options.get("case_views", name == "medbridge")
    if name == "linear-probe":  # a fitted probe (the untrained one scores 0.5 everywhere)
        method.weight.normal_(generator=torch.Generator().manual_seed(0))
    cache = cached(method, n=6)
    cache.done = lambda: np.ones(6, dtype=bool)
    per_image = method.scores_cached(cache, np.arange(6))
    singles = to_cases(image_table(6, [str(i) for i in range(6)]))
    np.testing.assert_allclose(case_scores(method, singles, cache, np.arange(6)), per_image, atol=1e-6)
    pairs = to_cases(image_table(6, ["0", "0", "1", "1", "2", "2"]))
    swapped = CaseTable(pairs.images, pairs.meta, pairs.targets, pairs.members[:, ::-1].copy())
    a = case_scores(method, pairs, cache, np.arange(3))
    np.testing.assert_allclose(case_scores(method, swapped, cache, np.arange(3)), a, atol=1e-5)
    assert not np.allclose(a, per_image[::2], atol=1e-4)  # the second image counts
    if not method.case_views:  # the documented rule: sigmoid of the mean of the images' logits
        np.testing.assert_allclose(a[0], mean_logit(per_image[:2]), atol=1e-6)


def test_a_case_with_a_missing_image_equals_its_present_image(clip):
    method = create_method("medbridge", {"num_queries": 2, "t1": 6}, backbones=[clip], labels=["a", "b", "c"],
                           prompt_names=["a", "b", "c"], focal={"num_crops": 0})
    cache = cached(method, n=5)
    cache.done = lambda: np.array([True, True, True, False, True])  # image 3 unreadable
    cases = to_cases(image_table(5, ["0", "0", "1", "2", "2"]))  # case 1 has one image; case 2 lost one
    scores = case_scores(method, cases, cache, np.arange(3))
    alone = method.scores_cached(cache, np.array([2, 4]))
    np.testing.assert_allclose(scores[1:], alone, atol=1e-6)
    assert CaseCache(cache, cases).read(np.arange(3))["e0.frozen"].shape[:2] == (3, 2)


def test_case_training_data_follows_the_method_rule(clip):
    images = image_table(6, ["0", "0", "1", "1", "2", "2"])
    cases, own = to_cases(images), to_cases(images, "own")
    assert not np.array_equal(images.targets[0], images.targets[1])  # the two images of case 0 differ
    for name, options, unit_rows in (("medbridge", None, [0, 1]), ("medbridge", {"case_views": False}, [0, 1, 2, 3]),
                                     ("linear-probe", None, [0, 1, 2, 3])):
        method = create_method(name, options, backbones=[clip], labels=["a", "b", "c"],
                               prompt_names=["a", "b", "c"], focal={"num_crops": 0})
        cache = cached(method, n=6)
        cache.done = lambda: np.ones(6, dtype=bool)
        data = training_data(method, cases, cache, np.array([0, 1]), np.array([2]))
        assert data.train_rows.tolist() == unit_rows
        if not method.case_views:  # each image is trained with its case's labels, or its own on request
            np.testing.assert_array_equal(data.targets[[0, 1]], cases.targets[[0, 0]])
            mine = training_data(method, own, cache, np.array([0, 1]), np.array([2]))
            np.testing.assert_array_equal(mine.targets[:4], images.targets[:4])
            assert mine.train_rows.tolist() == unit_rows
    with pytest.raises(DatasetError, match="case_image_labels must be one of"):
        to_cases(images, "eye")


def test_the_case_views_option_survives_saving_and_sets_how_predict_scores_a_case(clip, tmp_path):
    from medbridge.methods.registry import load_method, save_method

    method = create_method("medbridge", {"num_queries": 2, "t1": 6, "case_views": False}, backbones=[clip],
                           labels=["a", "b", "c"], prompt_names=["a", "b", "c"], focal={"num_crops": 0})
    loaded = load_method(save_method(method, tmp_path / "m"), [clip])
    assert loaded.case_views is False and loaded.options.case_views is False
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    alone = [loaded.predict_case([x]) for x in photos]
    np.testing.assert_allclose(loaded.predict_case(photos), mean_logit(np.stack(alone)), atol=1e-5)
    default = create_method("medbridge", {"num_queries": 2, "t1": 6}, backbones=[clip], labels=["a", "b", "c"],
                            prompt_names=["a", "b", "c"], focal={"num_crops": 0})
    assert default.case_views is True


# ------------------------------------------------------------------------------------------------ colour, border
def test_fundus_photographs_stay_rgb_and_radiographs_unchanged(odir_table, nih_sample, clip):
    fundus = read_image(odir_table.paths[0])
    assert fundus.ndim == 3 and fundus.shape[-1] == 3
    px = focal_views(fundus, FocalConfig(num_crops=0), clip.vision.preprocess).pixels[0]
    assert not torch.allclose(px[0], px[1], atol=1e-3)  # red and green differ in the model input
    xray = read_image(load_dataset("nih", nih_sample).paths[0])
    assert xray.ndim == 2
    grey = focal_views(xray, FocalConfig(num_crops=0), clip.vision.preprocess).pixels[0]
    as_rgb = focal_views(np.repeat(xray[..., None], 3, -1), FocalConfig(num_crops=0), clip.vision.preprocess).pixels[0]
    torch.testing.assert_close(grey, as_rgb)  # a grey radiograph gives what it always gave
    assert FocalConfig().to_dict() == FocalConfig(crop_border=False).to_dict() and "crop_border" not in \
        FocalConfig().to_dict()  # cache keys and saved files of existing runs unchanged


def test_the_black_border_around_the_fundus_is_cropped_on_request():
    image = np.zeros((100, 160, 3), dtype=np.float32)
    yy, xx = np.mgrid[:100, :160]
    image[(yy - 50) ** 2 + (xx - 80) ** 2 < 45 ** 2] = 0.6  # a disc of radius 45 centred in a black frame
    cropped, _ = crop_to_content(image)
    assert cropped.shape[:2] == (89, 89)
    _, full = crop_to_content(image[::2, ::2], (160, 100))  # a reduced decode keeps original-pixel sizes
    assert full == (90, 90)
    views = focal_views(image, FocalConfig(num_crops=0, crop_border=True), _pre())
    plain = focal_views(cropped, FocalConfig(num_crops=0), _pre())
    torch.testing.assert_close(views.pixels, plain.pixels)
    assert np.array_equal(crop_to_content(np.zeros((5, 5)))[0], np.zeros((5, 5)))  # nothing bright: unchanged


def _pre():
    from medbridge.backbones.base import PreprocessConfig

    return PreprocessConfig(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


# ------------------------------------------------------------------------------------------------ challenge score
def test_the_odir_challenge_score_follows_the_organisers_script():
    from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    y = (rng.random((60, 8)) < 0.3).astype(float)
    s = np.clip(y * 0.4 + rng.random((60, 8)) * 0.6, 0, 1)
    r = odir_score(y, s, [str(i // 2) for i in range(60)], n_boot=50)
    gt, pr = y.flatten(), s.flatten()
    kappa, f1 = cohen_kappa_score(gt, pr > 0.5), f1_score(gt, pr > 0.5, average="micro")
    auc = roc_auc_score(gt, pr)
    assert r["kappa"]["value"] == pytest.approx(kappa) and r["f1"]["value"] == pytest.approx(f1)
    assert r["final"]["value"] == pytest.approx((kappa + f1 + auc) / 3)
    lo, hi = r["final"]["ci"]
    assert lo < r["final"]["value"] < hi
    assert odir_score(y, y)["final"]["value"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def odir_run(tmp_path_factory, odir_sample):
    root = tmp_path_factory.mktemp("odir-cli")
    data = odir_subset(odir_sample, root / "odir", n=40)
    backbone = save_tiny_clip(root / "tiny-clip")
    common = ["--backbone", backbone, "--with-probe", "--quiet", "--set", "train.epochs=1", "--set",
              f"train.cache_dir={root / 'cache'}", "--set", "train.workers=0", "--set", "data.fractions=[0.5,0.2,0.3]"]
    assert main(["train", "--data", str(data), "--out", str(root / "patients"), *common]) == 0
    assert main(["train", "--data", str(data), "--out", str(root / "eyes"), *common, "--set", "data.unit=image"]) == 0
    return {"root": root, "data": data, "backbone": backbone}


@pytest.mark.slow
def test_train_on_odir_defaults_to_patients_with_the_challenge_score(odir_run):
    out = odir_run["root"] / "patients"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unit"] == "case" and metrics["n_cases"] == 40 and metrics["n_images"] == 80
    preds = pd.read_csv(out / "predictions_medbridge.csv")
    assert len(preds) == metrics["split"]["test"] == 12
    assert all(p.count(" + ") == 1 and "_left.jpg" in p and "_right.jpg" in p for p in preds["image"])
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 40
    for m in ("medbridge", "linear-probe"):
        assert 0 <= metrics["challenge"][m]["final"]["value"] <= 1
    assert "ODIR challenge score" in (out / "report.md").read_text()
    eyes = json.loads((odir_run["root"] / "eyes" / "metrics.json").read_text())
    assert eyes["unit"] == "image" and sum(eyes["split"].values()) == 80


@pytest.mark.slow
def test_predict_takes_a_case_and_a_case_of_one_image_equals_the_image(odir_run, capsys):
    out = odir_run["root"] / "patients"
    images = sorted((odir_run["data"] / "ODIR-5K" / "Training Images").iterdir())[:2]
    assert main(["predict", str(out), str(images[0]), "--json"]) == 0
    single = json.loads(capsys.readouterr().out)[0]["probabilities"]
    assert main(["predict", str(out), str(images[0]), "--case", "--json"]) == 0
    as_case = json.loads(capsys.readouterr().out)[0]["probabilities"]
    assert as_case == pytest.approx(single, abs=1e-5)
    assert main(["predict", str(out), str(images[0]), str(images[1]), "--case", "--json"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert len(both) == 1 and " + " in both[0]["image"]
    assert main(["predict", str(out), str(images[1]), str(images[0]), "--case", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["probabilities"] == pytest.approx(both[0]["probabilities"],
                                                                                   abs=1e-5)


@pytest.mark.slow
def test_eval_of_a_case_run_reproduces_its_metrics(odir_run, capsys):
    out = odir_run["root"] / "patients"
    assert main(["eval", str(out), "--data", str(odir_run["data"]), "--json", "--workers", "0", "--cache-dir",
                 str(odir_run["root"] / "cache")]) == 0
    res = json.loads(capsys.readouterr().out)
    run = json.loads((out / "metrics.json").read_text())["methods"]["medbridge"]
    assert res["n"] == run["n"] == 12
    assert res["macro"]["auroc"] == pytest.approx(run["macro"]["auroc"], abs=1e-9)


# ------------------------------------------------------------------------------------------------ MIMIC per study
def mimic_fixture(root: Path, nih_sample: Path) -> Path:
    """A MIMIC-CXR-JPG layout (official CSVs; images = real NIH sample PNGs under files/pXX/pID/sSTUDY/) with
    studies of one and of two images."""
    pngs = load_dataset("nih", nih_sample).paths[:30]
    meta, split, labels = [], [], []
    for i, png in enumerate(pngs):
        subject, study = f"1{i // 3:07d}", f"5{i // 2:07d}"  # 2 images per study, 3 per subject: studies vary
        dicom = f"{i:08x}-aaaa"
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{dicom}.jpg").symlink_to(png.resolve())
        meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                     "ViewPosition": "PA" if i % 2 == 0 else "LATERAL"})
        split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": "train"})
    from medbridge.data.labels import CHEXPERT_LABELS

    rng = np.random.default_rng(0)
    for (subject, study), _ in pd.DataFrame(meta).groupby(["subject_id", "study_id"], sort=False):
        labels.append({"subject_id": subject, "study_id": study,
                       **{lab: float(rng.random() < 0.4) for lab in CHEXPERT_LABELS}})
    pd.DataFrame(meta).to_csv(root / "mimic-cxr-2.0.0-metadata.csv", index=False)
    pd.DataFrame(split).to_csv(root / "mimic-cxr-2.0.0-split.csv", index=False)
    pd.DataFrame(labels).to_csv(root / "mimic-cxr-2.0.0-chexpert.csv", index=False)
    return root


@pytest.mark.slow
def test_a_mimic_cxr_layout_is_read_and_trained_per_study(tmp_path, nih_sample):
    root = mimic_fixture(tmp_path / "mimic", nih_sample)
    table = load_dataset("mimic-cxr", root)
    cases = to_cases(table)
    sizes = (cases.members >= 0).sum(axis=1)
    assert len(table) == 30 and len(cases) == 20 and sorted(set(sizes)) == [1, 2]  # studies split across subjects
    assert (cases.meta["patient_id"].str.len() == 8).all()
    for c in range(len(cases)):  # a study's labels are those of its images
        for r in cases.members[c][cases.members[c] >= 0]:
            np.testing.assert_array_equal(table.targets[r], cases.targets[c])
    backbone = save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--backbone", backbone, "--out", str(out), "--quiet", "--set",
                 "data.unit=case", "--set", "train.epochs=1", "--set", "train.workers=0", "--set",
                 f"train.cache_dir={tmp_path / 'cache'}", "--set", "data.split=patient", "--set",
                 "data.options.uncertain=zeros", "--n-boot", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["unit"] == "case" and metrics["n_cases"] == 20
    preds = pd.read_csv(out / "predictions_medbridge.csv")
    assert len(preds) == metrics["split"]["test"] and preds["image"].str.contains("files/p").all()
    shutil.rmtree(out)
