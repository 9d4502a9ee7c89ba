"""Regression tests for issue 18's data-table items: containment of image names, exact duplicate rows, JSON and
text errors that name the file and line, broken symbolic links reported, split files that cannot leak."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tests.helpers import rg1_dicom
from tests.test_datasets import make_chexpert, make_chexpert_plus, make_mimic, make_nih, sample_images

from medbridge.data import DatasetError, load_dataset, load_split, make_split, save_split
from medbridge.engine.evaluate import collect_images


def make_rsna(root: Path, ids=("0004cfab-14fd-4e49-80ba-63a80b6bddd6", "00313ee0-9eaa-42f4-b0ab-c148ed3241cd")) -> Path:
    """RSNA Pneumonia layout with pydicom-data's real chest X-ray DICOM as each image."""
    (root / "stage_2_train_images").mkdir(parents=True)
    for i in ids:
        shutil.copy(rg1_dicom(), root / "stage_2_train_images" / f"{i}.dcm")
    (root / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\n"
        f"{ids[0]},,,,,0\n{ids[1]},264.0,152.0,213.0,379.0,1\n{ids[1]},562.0,152.0,256.0,453.0,1\n")
    return root


def make_covidx(root: Path, images: list[Path]) -> Path:
    """COVIDx CXR-4 layout: train.txt / test.txt (no header) and train/ test/ folders."""
    lines = {"train": [], "test": []}
    for k, src in enumerate(images):
        part = "train" if k < len(images) - 1 else "test"
        (root / part).mkdir(parents=True, exist_ok=True)
        name = f"MIDRC-RICORD-1C-4196{k}-46647-0.png"
        shutil.copy(src, root / part / name)
        lines[part].append(f"4196{k} {name} {'positive' if k % 2 == 0 else 'negative'} ricord")
    for part, ls in lines.items():
        (root / f"{part}.txt").write_text("\n".join(ls) + "\n")
    return root


def plant(target: Path, src: Path) -> Path:
    """A real image at ``target`` (outside the dataset folder): today's loaders would open it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, target)
    return target


# --------------------------------------------------------------------------- item 8: containment
@pytest.mark.parametrize("escape", ["../../outside.png", "ABSOLUTE"])
def test_nih_image_index_cannot_leave_the_dataset_folder(tmp_path, nih_sample, escape):
    imgs = sample_images(nih_sample, 3)
    root = make_nih(tmp_path / "nih", imgs[:2])
    outside = plant(tmp_path / "outside.png", imgs[2])
    name = str(outside) if escape == "ABSOLUTE" else escape
    csv = root / "Data_Entry_2017.csv"
    lines = csv.read_text().splitlines()
    lines[2] = name + lines[2][lines[2].index(","):]
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"Data_Entry_2017\.csv: row 3 column 'Image Index': image name "
                                           + re.escape(repr(name)) + r".*outside the dataset folder"):
        load_dataset("nih", root)


def test_chexpert_path_cannot_leave_the_dataset_folder(tmp_path, nih_sample):
    imgs = sample_images(nih_sample, 7)
    root = make_chexpert(tmp_path / "CheXpert-v1.0-small", imgs)
    plant(tmp_path / "elsewhere" / "patient00009" / "x.jpg", imgs[6])
    frame = pd.read_csv(root / "valid.csv", dtype=str)
    frame.loc[1, "Path"] = "CheXpert-v1.0-small/../elsewhere/patient00009/x.jpg"
    frame.to_csv(root / "valid.csv", index=False)
    with pytest.raises(DatasetError, match=r"valid\.csv: row 3 column 'Path': image name '\.\./elsewhere/patient"
                                           r"00009/x\.jpg' resolves to .*elsewhere.*outside the dataset folder"):
        load_dataset("chexpert", root)


def test_chexpert_plus_path_cannot_leave_the_dataset_folder(tmp_path, nih_sample):
    imgs = sample_images(nih_sample, 5)
    root = make_chexpert_plus(tmp_path / "plus", imgs)
    plant(tmp_path / "stolen.png", imgs[4])
    escape = "../../../stolen.jpg"  # .jpg names map to .png; PNG/PNG/../../../ is the dataset's parent
    csv = root / "df_chexpert_plus_240401.csv"
    csv.write_text(csv.read_text().replace("train/patient00002/study1/view1_frontal.jpg", escape, 1))
    lab = root / "chexbert_labels" / "impression_fixed.json"
    lab.write_text(lab.read_text().replace("train/patient00002/study1/view1_frontal.jpg", escape, 1))
    with pytest.raises(DatasetError, match=r"df_chexpert_plus_240401\.csv: row 3 column 'path_to_image'.*"
                                           r"stolen\.png.*outside the dataset folder"):
        load_dataset("chexpert-plus", root)


def test_mimic_dicom_id_cannot_leave_the_dataset_folder(tmp_path, nih_sample):
    imgs = sample_images(nih_sample, 5)
    root = make_mimic(tmp_path / "mimic", imgs)
    plant(tmp_path / "loot.jpg", imgs[4])
    for stem in ("metadata", "split"):
        f = root / f"mimic-cxr-2.0.0-{stem}.csv.gz"
        frame = pd.read_csv(f, dtype=str)
        frame.loc[1, "dicom_id"] = "../../../../../loot"  # files/p10/p10000032/s53189527/ -> 5 levels up
        frame.to_csv(f, index=False, compression="gzip")
    with pytest.raises(DatasetError, match=r"metadata\.csv\.gz: row 3 column 'dicom_id'.*loot.*outside the dataset"):
        load_dataset("mimic-cxr", root)


def test_mimic_ids_must_be_numeric(tmp_path, nih_sample):
    root = make_mimic(tmp_path / "mimic", sample_images(nih_sample, 4))
    f = root / "mimic-cxr-2.0.0-metadata.csv.gz"
    frame = pd.read_csv(f, dtype=str)
    frame.loc[2, "study_id"] = "../s1"
    frame.to_csv(f, index=False, compression="gzip")
    with pytest.raises(DatasetError, match=r"row 4 column 'study_id': '\.\./s1' is not a numeric id"):
        load_dataset("mimic-cxr", root)


def test_rsna_patient_id_cannot_leave_the_dataset_folder(tmp_path):
    root = make_rsna(tmp_path / "rsna")
    plant(tmp_path / "secret.dcm", rg1_dicom())
    csv = root / "stage_2_train_labels.csv"
    csv.write_text(csv.read_text() + "../../secret,,,,,0\n")
    with pytest.raises(DatasetError, match=r"stage_2_train_labels\.csv: row 5 column 'patientId': image name "
                                           r"'\.\./\.\./secret\.dcm'.*outside the dataset folder"):
        load_dataset("rsna", root)


def test_covidx_filename_cannot_leave_the_dataset_folder(tmp_path, nih_sample):
    imgs = sample_images(nih_sample, 4)
    root = make_covidx(tmp_path / "covidx", imgs[:3])
    outside = plant(tmp_path / "x.png", imgs[3])
    (root / "test.txt").write_text((root / "test.txt").read_text() + f"7 {outside} negative rsna\n")
    with pytest.raises(DatasetError, match=r"test\.txt: row 2 column 'filename': image name '/.*x\.png'.*outside"):
        load_dataset("covidx", root)
    (root / "test.txt").write_text((root / "test.txt").read_text().replace(str(outside), "../../x.png"))
    with pytest.raises(DatasetError, match=r"test\.txt: row 2 column 'filename': image name '\.\./\.\./x\.png'"):
        load_dataset("covidx", root)


def test_names_inside_the_folder_and_owner_symlinks_still_load(tmp_path, nih_sample):
    """'..' that stays inside the root is fine, and a symlinked image folder (the owner's choice) is followed."""
    imgs = sample_images(nih_sample, 4)
    store = tmp_path / "store"
    root = make_covidx(store, imgs[:3])
    link = tmp_path / "linked"
    link.mkdir()
    for name in ("train", "test", "train.txt", "test.txt"):
        os.symlink(store / name, link / name)
    (link / "test.txt").unlink()
    name = next((root / "test").iterdir()).name
    (link / "test.txt").write_text(f"1 ../test/{name} positive x\n")
    t = load_dataset("covidx", link)
    assert len(t) == 3 and t.paths[-1] == link / "test" / name


def test_generic_csv_reports_dotdot_escapes_and_can_refuse_them(tmp_path, nih_sample, caplog):
    imgs = sample_images(nih_sample, 3)
    sub = tmp_path / "labels"
    sub.mkdir()
    shutil.copy(imgs[1], tmp_path / "b.jpg")
    frame = pd.DataFrame({"path": [str(imgs[0]), "../b.jpg", "../b.jpg"], "X": ["1", "0", "1"]})
    frame.iloc[[0, 1]].to_csv(sub / "ok.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="medbridge.data"):
        t = load_dataset("csv", sub / "ok.csv")  # absolute paths and '..' stay allowed ...
    assert len(t) == 2 and t.paths[1] == tmp_path / "b.jpg"
    assert t.notes["outside_image_root"] == [3]  # ... but the escape is reported, naming the row
    warned = [r.getMessage() for r in caplog.records if "leave the image root" in r.getMessage()]
    assert len(warned) == 1 and "rows [3]" in warned[0] and "'../b.jpg'" in warned[0]
    with pytest.raises(DatasetError, match=r"ok\.csv: row 2 column 'path': image name '/.*' resolves to"):
        load_dataset("csv", sub / "ok.csv", restrict_paths=True)
    frame.iloc[[0, 1]].assign(path=[str(imgs[0]), "b.jpg"]).to_csv(tmp_path / "ok2.csv", index=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="medbridge.data"):
        t2 = load_dataset("csv", tmp_path / "ok2.csv")  # the same files without '..': nothing to report
    assert t2.paths == t.paths and "outside_image_root" not in t2.notes and not caplog.records


# --------------------------------------------------------------------------- item 12: messages and links
def test_duplicate_message_lists_exactly_the_duplicated_rows(tmp_path, nih_sample):
    imgs = sample_images(nih_sample, 3)
    paths = [str(imgs[0]), str(imgs[1]), str(imgs[2]), str(imgs[1]), str(imgs[0]), str(imgs[1])]
    pd.DataFrame({"path": paths, "X": ["1"] * 6}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(DatasetError) as err:
        load_dataset("csv", tmp_path / "d.csv")
    msg = str(err.value)
    assert f"image {imgs[0]} is listed more than once (rows [2, 6] of" in msg, msg  # not imgs[1]'s rows 3, 5, 7


def test_duplicate_across_chexpert_files_names_each_file(tmp_path, nih_sample):
    root = make_chexpert(tmp_path / "CheXpert-v1.0-small", sample_images(nih_sample, 6))
    train = pd.read_csv(root / "train.csv", dtype=str)
    valid = pd.read_csv(root / "valid.csv", dtype=str)
    pd.concat([valid, train.iloc[[2]]]).to_csv(root / "valid.csv", index=False)
    with pytest.raises(DatasetError, match=r"listed more than once \(.*train\.csv row 4, .*valid\.csv row 5 "):
        load_dataset("chexpert", root)


def test_chexpert_plus_bad_json_lines_name_file_and_line(tmp_path, nih_sample):
    root = make_chexpert_plus(tmp_path / "plus", sample_images(nih_sample, 4))
    lab = root / "chexbert_labels" / "impression_fixed.json"
    good = lab.read_bytes().split(b"\n")
    lab.write_bytes(b"\n".join(good[:2] + [b'{"path_to_image": "caf\xe9.jpg"}'] + good[2:]))
    with pytest.raises(DatasetError, match=r"impression_fixed\.json line 3: not UTF-8"):
        load_dataset("chexpert-plus", root)
    lab.write_bytes(b"\n".join(good[:1] + [b"[1, 2]"] + good[1:]))
    with pytest.raises(DatasetError, match=r"impression_fixed\.json: line 2: expected a JSON object"):
        load_dataset("chexpert-plus", root)
    lab.write_bytes(b"\n".join([good[0].replace(b'"path_to_image": "', b'"path_to_image": 7, "x": "')] + good[1:]))
    with pytest.raises(DatasetError, match=r"impression_fixed\.json: line 1: path_to_image 7 is not a string"):
        load_dataset("chexpert-plus", root)


def test_split_file_errors_name_file_and_line(tmp_path, nih_sample):
    t = load_dataset("nih", nih_sample)
    path = save_split(make_split(t, seed=0), t, tmp_path / "split.json")
    text = path.read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(text.replace('"train": [', '"train": [,', 1))
    line = text[:text.index('"train": [')].count("\n") + 1
    with pytest.raises(DatasetError, match=rf"split file .*bad\.json: line {line} column \d+: invalid JSON"):
        load_split(bad, t)
    bad.write_bytes(b'{"format": "medbridge-split/1", "train": ["\xff"]}')
    with pytest.raises(DatasetError, match=r"split file: .*bad\.json line 1: not UTF-8"):
        load_split(bad, t)
    bad_docs = [([], "format 'list'"), ({"format": "medbridge-split/1", "train": [["a"]]}, "'train' must be a list")]
    for doc, what in bad_docs:
        bad.write_text(json.dumps(doc))
        with pytest.raises(DatasetError, match=rf"bad\.json: {what}"):
            load_split(bad, t)


def test_split_file_cannot_put_an_image_in_two_parts(tmp_path, nih_sample):
    t = load_dataset("nih", nih_sample)
    path = save_split(make_split(t, seed=0), t, tmp_path / "split.json")
    doc = json.loads(path.read_text())
    doc["test"].append(doc["train"][5])
    path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match=r"image images/.* is listed more than once \(in \['train', 'test'\]\)"):
        load_split(path, t)


def test_blank_patient_id_is_an_error_not_one_patient(tmp_path, nih_sample):
    imgs = sample_images(nih_sample, 3)
    pd.DataFrame({"path": [str(p) for p in imgs], "patient_id": ["a", "", "b"], "X": ["1", "0", "1"]}).to_csv(
        tmp_path / "p.csv", index=False)
    with pytest.raises(DatasetError, match=r"p\.csv row 3: empty patient id"):
        load_dataset("csv", tmp_path / "p.csv")


def test_broken_symlinks_are_reported_by_folder_loader_and_predict_inputs(tmp_path, nih_sample, caplog):
    imgs = sample_images(nih_sample, 2)
    for k, cls in enumerate(["normal", "pneumonia"]):
        (tmp_path / "ds" / cls).mkdir(parents=True)
        shutil.copy(imgs[k], tmp_path / "ds" / cls / imgs[k].name)
    gone = tmp_path / "ds" / "pneumonia" / "gone.png"
    os.symlink(tmp_path / "nowhere" / "gone.png", gone)
    with caplog.at_level(logging.WARNING):
        t = load_dataset("folder", tmp_path / "ds")
        files = collect_images([tmp_path / "ds"])
    assert len(t) == 2 and t.notes["broken_links"] == [str(gone)]
    assert len(files) == 2
    warned = [r.getMessage() for r in caplog.records if "broken symbolic link" in r.getMessage()]
    assert len(warned) == 2 and all("1 broken symbolic link(s) skipped" in w and str(gone) in w for w in warned)
    with pytest.raises(FileNotFoundError, match=r"gone\.png is a broken symbolic link"):
        collect_images([gone])


def test_split_file_write_is_atomic(tmp_path, nih_sample, monkeypatch):
    """A write that fails half-way (disk full at fsync) leaves the previous split.json intact and no temp file."""
    t = load_dataset("nih", nih_sample)
    path = save_split(make_split(t, seed=0), t, tmp_path / "split.json")
    before = path.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left") as err:
        save_split(make_split(t, seed=1), t, path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["split.json"]
    from medbridge.cli.main import error_message  # issue 27: the one-line message names the file

    assert error_message(err.value) == (f"no space left on the device writing {path}: free disk space or point the "
                                        "output/cache elsewhere")


# --------------------------------------------------------------------------- issue 27: generic CSV header and cells
def _nih_images(nih_sample, n: int):
    return sorted((nih_sample / "images").glob("*.jpg"))[:n]


def test_generic_csv_header_is_read_as_written(tmp_path, nih_sample):
    """``path,Edema,Edema`` used to load a label ``Edema.1``; a trailing comma a label ``Unnamed: 2``."""

    imgs = _nih_images(nih_sample, 3)
    rows = "".join(f"{p},1,0\n" for p in imgs)
    (tmp_path / "twice.csv").write_text("path,Edema,Edema\n" + rows)
    with pytest.raises(DatasetError, match=r"twice.csv: column 'Edema' appears more than once in the header "
                                           r"\(columns 2 and 3\)"):
        load_dataset("csv", tmp_path / "twice.csv")
    (tmp_path / "trail.csv").write_text("path,Edema,\n" + "".join(f"{p},1,\n" for p in imgs))
    assert load_dataset("csv", tmp_path / "trail.csv").labels == ("Edema",)
    (tmp_path / "unnamed.csv").write_text("path,Edema,\n" + rows)
    with pytest.raises(DatasetError, match=r"column 3 has no name in the header but a value in row 2"):
        load_dataset("csv", tmp_path / "unnamed.csv")


def test_label_cells_follow_one_rule_and_long_values_are_shortened(tmp_path, nih_sample):
    """Only a blank label cell is unknown: NA/None/null used to become unknown while TRUE was refused. A 100k-
    character cell is not echoed whole, and a 100k-character image path is a not-found row, not an OSError."""

    imgs = _nih_images(nih_sample, 3)
    for cell in ("NA", "None", "null", "TRUE", "x" * 100_000):
        (tmp_path / "c.csv").write_text(f"path,Edema\n{imgs[0]},1\n{imgs[1]},{cell}\n{imgs[2]},\n")
        with pytest.raises(DatasetError, match=r"row 3 column 'Edema': label value") as err:
            load_dataset("csv", tmp_path / "c.csv")
        assert len(str(err.value)) < 400
    (tmp_path / "c.csv").write_text(f"path,Edema\n{imgs[0]},1\n{imgs[1]},0\n{imgs[2]},\n")
    assert np.isnan(load_dataset("csv", tmp_path / "c.csv").targets[2, 0])
    (tmp_path / "p.csv").write_text(f"path,Edema\n{imgs[0]},1\n{'y' * 100_000}.png,0\n")
    with pytest.raises(DatasetError, match=r"1 image file\(s\) listed in .* not found, e\.g\. .*characters\)") as err:
        load_dataset("csv", tmp_path / "p.csv")
    assert len(str(err.value)) < 1000
