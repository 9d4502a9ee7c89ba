"""The COVID-19 Image Data Collection loader on the real sample, its hierarchy, both finding spellings, the
torchxrayvision cross-check, bad input, and report supervision on its clinical notes (chunked, not truncated)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from medbridge.data import load_dataset
from medbridge.data.datasets.covid_chestxray import PARENT, finding_path, load_covid_chestxray
from medbridge.data.table import DatasetError

REPO = Path(__file__).resolve().parents[1]
COVID_SAMPLE = Path(os.environ.get("MEDBRIDGE_COVID_SAMPLE",
                                   REPO.parent / "shared" / "data" / "covid-chestxray-sample"))


@pytest.fixture(scope="module")
def covid_sample() -> Path:
    if not (COVID_SAMPLE / "metadata.csv").is_file():
        pytest.skip(f"COVID-19 Image Data Collection sample not found at {COVID_SAMPLE}")
    return COVID_SAMPLE


def copy_layout(sample: Path, folder: Path, frame: pd.DataFrame) -> Path:
    """A dataset folder with ``frame`` as its metadata.csv and the sample's images linked in."""
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / "metadata.csv", index=False, quoting=csv.QUOTE_MINIMAL)
    if not (folder / "images").exists():
        (folder / "images").symlink_to(sample / "images", target_is_directory=True)
    return folder


def metadata(sample: Path) -> pd.DataFrame:
    return pd.read_csv(sample / "metadata.csv", dtype=str, keep_default_na=False)


def path_spelling(frame: pd.DataFrame) -> pd.DataFrame:
    """The newer upstream spelling: each comma-separated finding written as its path in the hierarchy."""
    out = frame.copy()
    out["finding"] = [", ".join(finding_path(f.strip()) for f in cell.split(",")) for cell in frame["finding"]]
    return out


# --------------------------------------------------------------------------- the real sample
def test_sample_loads_with_hierarchy_views_reports_licence(covid_sample):
    t = load_dataset("auto", covid_sample)
    assert t.name == "covid-chestxray" and t.citation.startswith("Cohen")
    raw = metadata(covid_sample)
    frontal = raw[raw["view"] != "L"].drop_duplicates("filename")
    assert len(t) == len(frontal) and set(t.meta["view"]) == {"PA", "AP"}  # AP Supine is AP, laterals left out
    assert t.notes["left_out_views"] == (raw.drop_duplicates("filename")["view"] == "L").sum() > 0
    assert t.meta["patient_id"].nunique() == frontal["patientid"].nunique()
    for j, lab in enumerate(t.labels):  # a parent is positive whenever a child is
        parent = PARENT[lab]
        if parent is not None:
            assert np.all(t.targets[t.targets[:, j] == 1, t.labels.index(parent)] == 1), lab
    covid = t.targets[:, t.labels.index("COVID-19")]
    assert (covid == 1).sum() == frontal["finding"].str.contains("COVID-19").sum()
    # a pneumonia given without its type says nothing about the sub-types
    plain = (t.meta["finding"] == "Pneumonia").to_numpy()
    assert plain.any() and np.isnan(covid[plain]).all() and (t.targets[plain, t.labels.index("Pneumonia")] == 1).all()
    assert "Mycoplasma" in t.labels and "Mycoplasma Bacterial Pneumonia" not in t.labels
    assert t.prompt_names[t.labels.index("Streptococcus")] == "streptococcus pneumonia"
    notes = frontal.set_index("filename")["clinical_notes"].str.strip()
    assert sum(r is not None for r in t.reports) == (notes != "").sum()
    assert t.reports[0] == notes[Path(t.meta["path"][0]).name]
    assert t.meta["license"].str.startswith("CC BY").all() and t.notes["prediction_columns"] == ("license",)

    every = load_covid_chestxray(covid_sample, views="all")
    lateral = load_covid_chestxray(covid_sample, views="lateral")
    assert len(every) == len(t) + len(lateral) and set(lateral.meta["view"]) == {"LATERAL"}
    assert every.labels == t.labels  # the vocabulary does not depend on the views kept
    assert len(load_covid_chestxray(covid_sample, views=["PA"])) == (t.meta["view"] == "PA").sum()
    binary = load_covid_chestxray(covid_sample, labels=["COVID-19"])  # the COVIDx-style task
    assert binary.labels == ("COVID-19",)
    np.testing.assert_array_equal(binary.targets[:, 0], covid)


def test_path_spelling_gives_the_same_table(covid_sample, tmp_path):
    comma = load_covid_chestxray(covid_sample, views="all")
    folder = copy_layout(covid_sample, tmp_path / "paths", path_spelling(metadata(covid_sample)))
    assert "Pneumonia/Viral/COVID-19" in (folder / "metadata.csv").read_text()
    assert len(load_dataset("auto", folder)) < len(comma)  # detected; laterals left out by default
    paths = load_covid_chestxray(folder, views="all")
    assert paths.labels == comma.labels
    np.testing.assert_array_equal(paths.targets, comma.targets)  # NaN in the same places
    assert paths.meta["patient_id"].tolist() == comma.meta["patient_id"].tolist()


def test_same_label_matrix_as_torchxrayvision(covid_sample, tmp_path):
    """torchxrayvision's COVID19_Dataset reads upstream's path spelling: on the same file, every label both define
    has the same values (ours leaves the sub-types of an untyped finding unknown, where it says 0)."""
    xrv = pytest.importorskip("torchxrayvision", reason="torchxrayvision (dev extra) not installed")
    folder = copy_layout(covid_sample, tmp_path / "upstream", path_spelling(metadata(covid_sample)))
    views = ["PA", "AP", "AP Supine", "L"]
    peer = xrv.datasets.COVID19_Dataset(imgpath=str(folder / "images"), csvpath=str(folder / "metadata.csv"),
                                        views=views)
    ours = load_covid_chestxray(folder, views="all")
    common = [lab for lab in ours.labels if lab in peer.pathologies]
    assert len(common) == len(ours.labels)  # every label of ours is one of theirs
    theirs = pd.DataFrame(peer.labels, columns=peer.pathologies)
    theirs["filename"] = peer.csv["filename"].to_numpy()
    theirs = theirs.drop_duplicates("filename").set_index("filename")  # upstream repeats two images
    names = [Path(p).name for p in ours.meta["path"]]
    assert sorted(names) == sorted(theirs.index)
    peer_matrix = theirs.loc[names, common].to_numpy(dtype=np.float32)
    mine = ours.targets[:, [ours.labels.index(lab) for lab in common]]
    known = ~np.isnan(mine)
    np.testing.assert_array_equal(mine[known], peer_matrix[known])
    unknown_rows = np.flatnonzero((~known).any(axis=1))
    assert set(ours.meta["finding"][unknown_rows]) == {"Pneumonia", "Pneumonia/Bacterial"}  # untyped findings
    assert (peer_matrix[~known] == 0).all()


# --------------------------------------------------------------------------- hierarchy and bad input
@pytest.fixture()
def small(covid_sample, tmp_path):
    """Five real rows of the sample, to edit."""
    frame = metadata(covid_sample)
    rows = frame[frame["view"] != "L"].drop_duplicates("filename").iloc[:5].copy()
    return lambda edit=None: copy_layout(covid_sample, tmp_path / "small", edit(rows.copy()) if edit else rows)


def set_cell(row: int, column: str, value: str):
    def edit(frame):
        frame.iloc[row, frame.columns.get_loc(column)] = value
        return frame
    return edit


def test_hierarchy_targets(small):
    cells = ["COVID-19, ARDS", "Pneumonia", "Bacterial", "No Finding", "Pneumonia/Fungal/Pneumocystis"]

    def edit(frame):
        frame["finding"] = cells
        return frame
    t = load_covid_chestxray(small(edit))
    assert t.labels == ("Pneumonia", "Viral", "COVID-19", "Bacterial", "Fungal", "Pneumocystis", "ARDS",
                        "No Finding")
    nan = np.nan
    expected = [[1, 1, 1, 0, 0, 0, 1, 0],
                [1, nan, nan, nan, nan, nan, 0, 0],
                [1, 0, 0, 1, 0, 0, 0, 0],
                [0, 0, 0, 0, 0, 0, 0, 1],
                [1, 0, 0, 0, 1, 1, 0, 0]]
    np.testing.assert_array_equal(t.targets, np.array(expected, dtype=np.float32))


@pytest.mark.parametrize("edit, message", [
    (set_cell(2, "finding", "Covid"), r"metadata.csv: row 4 column 'finding': unknown finding 'Covid'"),
    (set_cell(0, "finding", "Pneumonia/Bacterial/COVID-19"),
     r"row 2 column 'finding': path 'Pneumonia/Bacterial/COVID-19' does not follow the hierarchy: COVID-19 is "
     r"Pneumonia/Viral/COVID-19"),
    (set_cell(1, "finding", "No Finding, COVID-19"), r"row 3 column 'finding': 'No Finding' combined"),
    (set_cell(1, "finding", "COVID-19,"), r"row 3 column 'finding': empty finding"),
    (set_cell(3, "patientid", ""), r"row 5 column 'patientid': empty value"),
    (set_cell(4, "view", "Axial"), r"row 6 column 'view': 'Axial' is not an X-ray view"),
    (set_cell(0, "filename", "missing.jpg"), r"1 image file\(s\) listed in .*metadata.csv not found, .*row 2\)"),
    (set_cell(1, "filename", "../../x.jpg"), r"metadata.csv: row 3 column 'filename': .* outside the dataset folder"),
    (lambda f: f.drop(columns="finding"), r"missing required column\(s\) \['finding'\]"),
    (lambda f: pd.concat([f, f.iloc[[0]].assign(finding="Streptococcus")]),
     r"rows 2 and 7 list image .* with different findings"),
])
def test_bad_input_names_file_row_column(small, edit, message):
    with pytest.raises(DatasetError, match=message):
        load_covid_chestxray(small(edit))


def test_missing_file_and_views_option(small, tmp_path):
    with pytest.raises(DatasetError, match=r"expected .*metadata.csv not found"):
        load_covid_chestxray(tmp_path)
    with pytest.raises(DatasetError, match=r"'Oblique' is not frontal, lateral, all or one of"):
        load_covid_chestxray(small(), views="PA,Oblique")
    with pytest.raises(DatasetError, match=r"labels=\['Covid'\]: \['Covid'\] not among this file's labels"):
        load_covid_chestxray(small(), labels=["Covid"])
    with pytest.raises(DatasetError, match=r"no images left after keeping views 'lateral'"):
        load_covid_chestxray(small(), views="lateral")


# --------------------------------------------------------------------------- long notes: chunked, not truncated
@pytest.mark.slow
def test_long_notes_are_chunked_not_truncated(covid_sample):
    from medbridge.backbones.tiny import tiny_bert_text_tower
    from medbridge.methods.medbridge.text_head import LabelTextHead, text_capacity, token_count

    tower = tiny_bert_text_tower()
    head = LabelTextHead(tower, 32)
    capacity = text_capacity(tower)
    reports = [r for r in load_covid_chestxray(covid_sample).reports if r]
    long = max(reports, key=len)
    short = "Bilateral ground-glass opacities."
    assert token_count(tower, long) == capacity  # the tower alone would cut this note
    pieces = head.report_chunks(long)
    assert len(pieces) > 1 and all(token_count(tower, p) < capacity for p in pieces)
    assert " ".join(pieces).split() == long.split()  # every word kept, in order
    with torch.no_grad():
        got = head.encode_uncached([long, short])
        each = head.proj(tower.encode_text(pieces).pooled).mean(0)
        truncated = head.proj(tower.encode_text([long]).pooled)[0]
        torch.testing.assert_close(got[0], each)  # the mean of its pieces (the projection is linear)
        torch.testing.assert_close(got[1], head.proj(tower.encode_text([short]).pooled)[0])  # short: unchanged
        assert not torch.allclose(got[0], truncated, atol=1e-4)
    assert head.report_chunks(short) == [short]


@pytest.mark.slow
def test_train_with_report_loss_writes_licence_into_predictions(covid_sample, tmp_path):
    """``medbridge train`` on the collection's layout with no format flag, the report loss on its notes, and
    the per-image licence in the prediction file."""
    from tests.helpers import save_tiny_clip

    from medbridge.cli.main import main

    frame = metadata(covid_sample)
    folder = copy_layout(covid_sample, tmp_path / "data", frame[frame["patientid"].isin(
        frame["patientid"].drop_duplicates().iloc[:30])])
    out = tmp_path / "run"
    argv = ["train", "--data", str(folder), "--backbone", save_tiny_clip(tmp_path / "clip"), "--out", str(out),
            "--quiet", "--set", "train.epochs=1", "--set", f"train.cache_dir={tmp_path / 'cache'}",
            "--set", "train.workers=0", "--set", "method_options.medbridge.report_weight=1.0"]
    assert main(argv) == 0  # no focal setting: the collection's image sizes differ, the whole image is used
    assert json.loads((out / "metrics.json").read_text())["dataset"] == "covid-chestxray"
    assert json.loads((out / "medbridge" / "adapter.json").read_text())["focal"]["num_crops"] == 0
    pred = pd.read_csv(out / "predictions_medbridge.csv")
    lic = metadata(covid_sample).drop_duplicates("filename").set_index("filename")["license"]
    assert pred["license"].tolist() == [lic[Path(p).name] for p in pred["image"]]
