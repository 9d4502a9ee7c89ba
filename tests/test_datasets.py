"""Dataset loaders on the real NIH sample and on tiny fixtures in each dataset's official layout."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tests.helpers import rg1_dicom

from medbridge.backbones.base import PreprocessConfig
from medbridge.data import (
    DatasetError,
    ViewDataset,
    collate_views,
    detect_format,
    label_fraction,
    load_dataset,
    load_split,
    make_split,
    patient_split,
    save_split,
)
from medbridge.data.focal import FocalConfig
from medbridge.data.labels import apply_uncertainty

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


def sample_images(nih_sample: Path, n: int) -> list[Path]:
    return sorted((nih_sample / "images").glob("*.jpg"))[:n]


# --------------------------------------------------------------------------- NIH
def test_nih_real_sample_loads_as_is(nih_sample):
    t = load_dataset("auto", nih_sample)
    assert detect_format(nih_sample) == "nih"
    assert len(t) == 760 and t.meta["patient_id"].nunique() == 512
    assert t.targets.shape == (760, 14) and not np.isnan(t.targets).any()
    counts = dict(zip(t.labels, t.targets.sum(0).astype(int)))
    assert counts["Pneumonia"] == 371 and counts["Effusion"] == 63 and counts["Hernia"] == 3
    assert (t.targets.sum(1) == 0).sum() == 389  # "No Finding" rows
    assert set(t.meta["view"]) <= {"PA", "AP"}
    assert t.prompt_names[t.labels.index("Pleural_Thickening")] == "pleural thickening"


def make_nih(root: Path, images: list[Path]) -> Path:
    """Official layout with Kaggle's nesting, the 2017 header quirk and trailing comma, and the split lists."""
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True)
    rows = []
    labels = ["Effusion|Infiltration", "No Finding", "Pneumonia", "No Finding", "Mass|Nodule", "Hernia"]
    for k, src in enumerate(images):
        name = f"{k // 2 + 1:08d}_{k % 2:03d}.png"
        from PIL import Image

        Image.open(src).convert("L").resize((256, 256)).save(folder / name)
        rows.append(f"{name},{labels[k % len(labels)]},{k % 2},{k // 2 + 1},{50 + k}Y,M,{'PA' if k % 3 else 'AP'},"
                    "1024,1024,0.14,0.14,")
    (root / "Data_Entry_2017.csv").write_text(NIH_HEADER + "\n" + "\n".join(rows) + "\n")
    names = [r.split(",")[0] for r in rows]
    (root / "train_val_list.txt").write_text("\n".join(names[:4]) + "\n")
    (root / "test_list.txt").write_text("\n".join(names[4:]) + "\n")
    return root


def test_nih_official_layout_with_split_lists(tmp_path, nih_sample):
    root = make_nih(tmp_path / "nih", sample_images(nih_sample, 6))
    digest = tree_digest(root)
    t = load_dataset("nih", root, include_no_finding=True)
    assert t.labels[-1] == "No Finding" and len(t) == 6
    assert t.targets[0, t.labels.index("Effusion")] == 1 and t.targets[0, t.labels.index("Infiltration")] == 1
    assert t.targets[1, -1] == 1 and t.targets[1, :-1].sum() == 0
    assert list(t.meta["split"]) == ["train"] * 4 + ["test"] * 2
    assert t.meta["age"].tolist()[:2] == [50, 51]  # "Y" suffix stripped
    split = make_split(t, seed=0)  # official; val carved from train by patient
    assert len(split.test) == 2 and len(split.train) + len(split.val) == 4
    assert not set(t.patient_ids[split.val]) & set(t.patient_ids[split.train])
    assert len(t.filter_views("PA")) == 4
    save_split(split, t, tmp_path / "split.json")
    assert tree_digest(root) == digest  # nothing written into the data folder


def test_nih_unknown_finding_names_row(tmp_path, nih_sample):
    root = make_nih(tmp_path / "nih", sample_images(nih_sample, 2))
    csv = root / "Data_Entry_2017.csv"
    csv.write_text(csv.read_text().replace("No Finding", "Pnuemonia"))
    with pytest.raises(DatasetError, match=r"row 3 column 'Finding Labels'.*'Pnuemonia'"):
        load_dataset("nih", root)


# --------------------------------------------------------------------------- MIMIC-CXR-JPG
def _write_gz(path: Path, frame: pd.DataFrame) -> None:
    with gzip.open(path, "wt") as f:
        frame.to_csv(f, index=False)


def make_mimic(root: Path, images: list[Path]) -> Path:
    from medbridge.data.labels import CHEXPERT_LABELS

    meta, split, labels = [], [], []
    subjects = ["10000032", "10000032", "10000764", "11000011"]
    studies = ["50414267", "53189527", "57375967", "51234567"]
    for k, src in enumerate(images[:4]):
        sid, st = subjects[k], studies[k]
        dicom = f"{k:08x}-1a2b3c4d-5e6f7a8b-9c0d1e2f-3a4b5c6d"
        folder = root / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{st}"
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, folder / f"{dicom}.jpg")
        meta.append({"dicom_id": dicom, "subject_id": sid, "study_id": st, "PerformedProcedureStepDescription":
                     "CHEST (PA AND LAT)", "ViewPosition": ["PA", "AP", "LATERAL", "PA"][k], "Rows": 1024,
                     "Columns": 1024, "StudyDate": 21800506, "StudyTime": 213014.531})
        split.append({"dicom_id": dicom, "study_id": st, "subject_id": sid,
                      "split": ["train", "validate", "train", "test"][k]})
    for sid, st in list(dict.fromkeys(zip(subjects, studies)))[:3]:  # the 4th study has no label row
        row = {"subject_id": sid, "study_id": st, **{lab: np.nan for lab in CHEXPERT_LABELS}}
        row["Pleural Effusion"], row["Edema"], row["Cardiomegaly"] = 1.0, -1.0, 0.0
        labels.append(row)
    _write_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", pd.DataFrame(meta))
    _write_gz(root / "mimic-cxr-2.0.0-split.csv.gz", pd.DataFrame(split))
    _write_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", pd.DataFrame(labels))
    report = (" FINAL REPORT\n EXAMINATION:  CHEST (PA AND LAT)\n \n INDICATION:  ___F with cough\n \n"
              " FINDINGS: \n \n There is a small left pleural effusion.  No pneumothorax.\n \n"
              " IMPRESSION: \n \n Small left effusion.\n")
    (root / "files" / "p10" / "p10000032" / "s50414267.txt").write_text(report)
    return root


def test_mimic_official_layout(tmp_path, nih_sample):
    root = make_mimic(tmp_path / "mimic", sample_images(nih_sample, 4))
    t = load_dataset("auto", root)
    assert t.name == "mimic-cxr" and len(t) == 3  # unlabelled study dropped
    eff, edema, card, frac = (t.labels.index(x) for x in ("Pleural Effusion", "Edema", "Cardiomegaly", "Fracture"))
    assert (t.targets[:, eff] == 1).all() and np.isnan(t.targets[:, edema]).all()
    assert (t.targets[:, card] == 0).all() and (t.targets[:, frac] == 0).all()  # blank -> 0 by default
    assert list(t.meta["split"]) == ["train", "val", "train"]
    assert t.reports[0] == "There is a small left pleural effusion. No pneumothorax. Small left effusion."
    assert t.reports[2] is None
    assert len(t.filter_views("frontal")) == 2
    ones = load_dataset("mimic-cxr", root, uncertain="ones", blank="ignore", drop_unlabeled=False)
    assert len(ones) == 4 and (ones.targets[:3, edema] == 1).all() and np.isnan(ones.targets[:3, frac]).all()


def test_mimic_bad_label_value(tmp_path, nih_sample):
    root = make_mimic(tmp_path / "mimic", sample_images(nih_sample, 4))
    frame = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", dtype=str)
    frame.loc[1, "Edema"] = "2.0"
    _write_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", frame)
    with pytest.raises(DatasetError, match=r"row 3 column 'Edema': label value '2.0'"):
        load_dataset("mimic-cxr", root)


# --------------------------------------------------------------------------- CheXpert / CheXpert Plus
def make_chexpert(root: Path, images: list[Path]) -> Path:
    from medbridge.data.labels import CHEXPERT_LABELS

    for fname, part, k0 in (("train.csv", "train", 0), ("valid.csv", "valid", 3)):
        rows = []
        for k in range(k0, k0 + 3):
            view = "view1_frontal.jpg" if k % 3 != 2 else "view2_lateral.jpg"
            rel = f"{part}/patient{k // 2 + 1:05d}/study{k + 1}/{view}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(images[k], root / rel)
            row = {"Path": f"CheXpert-v1.0-small/{rel}", "Sex": "Female", "Age": 60,
                   "Frontal/Lateral": "Lateral" if "lateral" in view else "Frontal",
                   "AP/PA": "" if "lateral" in view else "AP", **{lab: "" for lab in CHEXPERT_LABELS}}
            row["Pleural Effusion"], row["Atelectasis"] = "1.0", "-1.0"
            rows.append(row)
        pd.DataFrame(rows).to_csv(root / fname, index=False)
    return root


def test_chexpert_v1_small(tmp_path, nih_sample):
    root = make_chexpert(tmp_path / "CheXpert-v1.0-small", sample_images(nih_sample, 6))
    t = load_dataset("auto", root, uncertain="zeros")
    assert detect_format(root) == "chexpert" and len(t) == 6
    assert list(t.meta["split"]) == ["train"] * 3 + ["val"] * 3
    assert (t.targets[:, t.labels.index("Atelectasis")] == 0).all()
    assert t.meta["patient_id"].tolist()[:2] == ["patient00001", "patient00001"]
    assert t.filter_views("lateral").meta["view"].tolist() == ["LATERAL", "LATERAL"]


def make_chexpert_plus(root: Path, images: list[Path]) -> Path:
    from medbridge.data.labels import CHEXPERT_LABELS

    rows, labels = [], []
    for k, src in enumerate(images[:4]):
        part = "train" if k < 3 else "valid"
        rel = f"{part}/patient{k + 1:05d}/study1/view1_frontal.jpg"
        png = root / "PNG" / "PNG" / rel.replace(".jpg", ".png")
        png.parent.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.open(src).convert("L").resize((128, 128)).save(png)
        rows.append({"path_to_image": rel, "path_to_dcm": rel.replace(".jpg", ".dcm"), "frontal_lateral": "Frontal",
                     "ap_pa": "PA", "deid_patient_id": f"patient{k + 1}", "patient_report_date_order": 1,
                     "report": "...", "section_findings": "Clear lungs." if k else None,
                     "section_impression": "No acute process.", "split": part})
        lab = {"path_to_image": rel, **{c: None for c in CHEXPERT_LABELS}}
        lab["No Finding"] = 1.0
        labels.append(json.dumps(lab))
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "df_chexpert_plus_240401.csv", index=False)
    (root / "chexbert_labels").mkdir()
    (root / "chexbert_labels" / "impression_fixed.json").write_text("\n".join(labels) + "\n")
    return root


def test_chexpert_plus(tmp_path, nih_sample):
    root = make_chexpert_plus(tmp_path / "chexpert_plus", sample_images(nih_sample, 4))
    t = load_dataset("auto", root)
    assert t.name == "chexpert-plus" and len(t) == 4
    assert t.paths[0].suffix == ".png" and t.paths[0].is_file()
    assert t.reports[0] == "No acute process." and t.reports[1] == "Clear lungs. No acute process."
    assert list(t.meta["split"]) == ["train"] * 3 + ["val"]
    assert (t.targets[:, 0] == 1).all() and (t.targets[:, 1:] == 0).all()


# --------------------------------------------------------------------------- RSNA (real DICOM), COVIDx
def test_rsna_boxes_aggregate_and_dicom_reads(tmp_path):
    dcm = rg1_dicom()
    root = tmp_path / "rsna"
    (root / "stage_2_train_images").mkdir(parents=True)
    ids = ["0004cfab-14fd-4e49-80ba-63a80b6bddd6", "00313ee0-9eaa-42f4-b0ab-c148ed3241cd"]
    for i in ids:
        shutil.copy(dcm, root / "stage_2_train_images" / f"{i}.dcm")
    (root / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\n"
        f"{ids[0]},,,,,0\n{ids[1]},264.0,152.0,213.0,379.0,1\n{ids[1]},562.0,152.0,256.0,453.0,1\n")
    t = load_dataset("auto", root)
    assert t.labels == ("Pneumonia",) and t.targets[:, 0].tolist() == [0.0, 1.0]
    assert t.meta["boxes"].tolist() == [0, 2]
    ds = ViewDataset(t, FocalConfig(region_size=0.5, num_crops=2), [PreprocessConfig(56, (0.5,) * 3, (0.5,) * 3)])
    item = ds[1]
    assert item["pixels"][0].shape == (3, 3, 56, 56) and torch_isfinite(item["pixels"][0])


def torch_isfinite(x) -> bool:
    import torch

    return bool(torch.isfinite(x).all())


def test_covidx(tmp_path, nih_sample):
    root = tmp_path / "covidx"
    imgs = sample_images(nih_sample, 3)
    lines = {"train": [], "test": []}
    for k, src in enumerate(imgs):
        part = "train" if k < 2 else "test"
        (root / part).mkdir(parents=True, exist_ok=True)
        name = f"MIDRC-RICORD-1C-4196{k}-46647-0.{'png' if k else 'JPG'}"
        shutil.copy(src, root / part / name)
        lines[part].append(f"4196{k} {name} {'positive' if k != 1 else 'negative'} ricord")
    for part, ls in lines.items():
        (root / f"{part}.txt").write_text("\n".join(ls) + "\n")
    t = load_dataset("auto", root)
    assert t.labels == ("COVID-19",) and t.targets[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert t.meta["split"].tolist() == ["train", "train", "test"]
    (root / "val.txt").write_text("1 x.png maybe rsna\n")
    with pytest.raises(DatasetError, match=r"val.txt: line 1: class 'maybe'"):
        load_dataset("covidx", root)


# --------------------------------------------------------------------------- generic
def test_generic_csv_columns_and_delimited(tmp_path, nih_sample):
    imgs = sample_images(nih_sample, 4)
    frame = pd.DataFrame({"image": [str(p) for p in imgs], "patient_id": ["a", "a", "b", "c"],
                          "Diabetes": ["1", "0", "", "-1"], "Glaucoma": ["0", "1", "0", "1"],
                          "report": ["r1", "", "r3", "r4"]})
    frame.to_csv(tmp_path / "labels.csv", index=False)
    t = load_dataset("auto", tmp_path / "labels.csv")
    assert t.labels == ("Diabetes", "Glaucoma")
    np.testing.assert_array_equal(np.isnan(t.targets[:, 0]), [False, False, True, True])  # blank + -1 unknown
    assert t.reports == ["r1", None, "r3", "r4"]
    frame2 = pd.DataFrame({"path": [p.name for p in imgs], "findings": ["N|D", "", "G", "D"]})
    frame2.to_csv(tmp_path / "d.tsv", sep="\t", index=False)
    t2 = load_dataset("csv", tmp_path / "d.tsv", labels_column="findings", image_root=imgs[0].parent)
    assert t2.labels == ("D", "G", "N") and t2.targets.tolist()[0] == [1, 0, 1] and t2.targets[1].sum() == 0


def test_folder_per_class(tmp_path, nih_sample):
    imgs = sample_images(nih_sample, 3)
    for k, cls in enumerate(["normal", "normal", "pneumonia"]):
        (tmp_path / "ds" / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(imgs[k], tmp_path / "ds" / cls / imgs[k].name)
    t = load_dataset("folder", tmp_path / "ds")
    assert t.labels == ("normal", "pneumonia") and t.targets.tolist() == [[1, 0], [1, 0], [0, 1]]


# --------------------------------------------------------------------------- bad input
def test_bad_input_messages(tmp_path, nih_sample):
    imgs = sample_images(nih_sample, 3)
    good = pd.DataFrame({"path": [str(p) for p in imgs], "Effusion": ["1", "0", "0"]})
    good.to_csv(tmp_path / "ok.csv", index=False)
    good.assign(path=[str(imgs[0]), str(tmp_path / "gone.png"), str(imgs[2])]).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(DatasetError, match=r"not found, e\.g\. .*gone\.png"):
        load_dataset("csv", tmp_path / "m.csv")
    pd.concat([good, good.iloc[[1]]]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(DatasetError, match=r"listed more than once \(rows \[3, 5\]"):
        load_dataset("csv", tmp_path / "dup.csv")
    good.assign(Effusion=["1", "yes", "0"]).to_csv(tmp_path / "val.csv", index=False)
    with pytest.raises(DatasetError, match=r"row 3 column 'Effusion': label value 'yes'"):
        load_dataset("csv", tmp_path / "val.csv")
    with pytest.raises(DatasetError, match=r"missing required column\(s\) \['pid'\]"):
        load_dataset("csv", tmp_path / "ok.csv", patient_column="pid")
    t = load_dataset("csv", tmp_path / "ok.csv")
    with pytest.raises(DatasetError, match=r"no images left after keeping views \['LATERAL'"):
        t.filter_views("LATERAL")
    with pytest.raises(DatasetError, match="unknown dataset format 'nhi'"):
        load_dataset("nhi", tmp_path)
    with pytest.raises(DatasetError, match="Data_Entry_2017"):
        load_dataset("nih", tmp_path)


def test_unreadable_image_raises_or_is_skipped(tmp_path, nih_sample):
    imgs = sample_images(nih_sample, 2)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    pd.DataFrame({"path": [str(imgs[0]), str(bad), str(imgs[1])], "X": [1, 0, 1]}).to_csv(tmp_path / "c.csv",
                                                                                           index=False)
    t = load_dataset("csv", tmp_path / "c.csv")
    args = (t, FocalConfig(num_crops=0), [PreprocessConfig(32, (0.5,) * 3, (0.5,) * 3)])
    with pytest.raises(Exception, match="corrupt.png"):
        ViewDataset(*args)[1]
    ds = ViewDataset(*args, skip_unreadable=True)
    batch = collate_views([ds[i] for i in range(3)])
    assert batch["skipped"] == 1 and batch["index"].tolist() == [0, 2]
    assert batch["pixels"][0].shape == (2, 1, 3, 32, 32)


# --------------------------------------------------------------------------- splits, fractions, labels
def test_patient_split_fractions_and_split_file(tmp_path, nih_sample):
    t = load_dataset("nih", nih_sample)
    s = patient_split(t, (0.7, 0.1, 0.2), seed=3)
    parts = [set(t.patient_ids[getattr(s, k)]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert len(s.train) + len(s.val) + len(s.test) == 760
    assert abs(len(s.train) / 760 - 0.7) < 0.02 and abs(len(s.test) / 760 - 0.2) < 0.02
    assert np.array_equal(patient_split(t, seed=3).test, s.test)
    assert not np.array_equal(patient_split(t, seed=4).test, s.test)
    fr = {f: label_fraction(t, s.train, f, seed=1) for f in (0.01, 0.1, 0.5, 1.0)}
    assert set(fr[0.01]) <= set(fr[0.1]) <= set(fr[0.5]) <= set(fr[1.0]) == set(s.train)
    assert abs(len(fr[0.1]) - 0.1 * len(s.train)) <= 4
    assert np.array_equal(fr[0.1], label_fraction(t, s.train, 0.1, seed=1))
    split = make_split(t, seed=3, label_frac=0.5)
    assert split.info["label_fraction"] == 0.5 and set(split.train) <= set(s.train)
    path = save_split(split, t, tmp_path / "split.json")
    again = load_split(path, t)
    assert all(np.array_equal(getattr(split, k), getattr(again, k)) for k in ("train", "val", "test"))
    small = t.subset(np.arange(10))
    with pytest.raises(DatasetError, match="not in dataset nih"):
        load_split(path, small)


def test_uncertainty_policies_and_alignment_are_pure(nih_sample):
    raw = np.array([[1, 0, -1, np.nan]], dtype=np.float32)
    assert np.array_equal(apply_uncertainty(raw, "ignore", "ignore"), [[1, 0, np.nan, np.nan]], equal_nan=True)
    assert apply_uncertainty(raw, "ones", "zeros").tolist() == [[1, 0, 1, 0]]
    assert apply_uncertainty(raw, "zeros", "zeros").tolist() == [[1, 0, 0, 0]]
    assert np.isnan(raw[0, 3]) and raw[0, 2] == -1  # input untouched
    with pytest.raises(ValueError, match="uncertain policy"):
        apply_uncertainty(raw, "maybe")
    t = load_dataset("nih", nih_sample)
    before = t.targets.copy()
    a, al = t.align(["Pleural Effusion", "Lung Lesion", "Fracture", "Pneumonia"], approximate=True)
    assert np.array_equal(t.targets, before) and t.labels[4] == "Effusion"  # original unchanged
    assert al.sources["Pleural Effusion"] == ("Effusion",) and al.sources["Lung Lesion"] == ("Mass", "Nodule")
    assert al.missing == ["Fracture"] and np.isnan(a.targets[:, 2]).all()
    lesion = np.maximum(before[:, t.labels.index("Mass")], before[:, t.labels.index("Nodule")])
    assert np.array_equal(a.targets[:, 1], lesion)
    strict, al2 = t.align(["Pleural Effusion", "Lung Lesion"])
    assert al2.missing == ["Lung Lesion"] and a.prompt_names[0] == "pleural effusion"
