"""Fuzz tests of every table parser: mutated cells, rows and headers of the real NIH sample's CSV and of small
fixtures in each official layout, byte-level damage and random bytes. Whatever the input, a loader returns a
table whose images all lie inside the dataset folder (official layouts) or raises DatasetError; never a raw
pandas/json/unicode/key error. Bounded and derandomized (fixed examples) so CI is stable; set
MEDBRIDGE_FUZZ_EXAMPLES=2000 (and MEDBRIDGE_FUZZ_RANDOM=1 for fresh random draws) for a longer hunt."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tests.test_data_reliability import make_covidx, make_rsna
from tests.test_datasets import make_chexpert, make_chexpert_plus, make_mimic, make_nih, sample_images

from medbridge.data import DatasetError, load_dataset, load_split, make_split, save_split

EXAMPLES = int(os.environ.get("MEDBRIDGE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("MEDBRIDGE_FUZZ_RANDOM"),
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Cell values that have broken parsers before or probe a rule: blanks, NaN spellings, odd numbers, path escapes,
#: separators, quotes, NUL, non-ASCII, label syntax.
NASTY = ["", " ", "", "nan", "NaN", "None", "null", "NA", "-1", "2", "1.0", "1e309", "-inf", "True", "0x1", "1" * 30,
         "..", "../../etc/passwd", "/etc/passwd", "/etc/passwd", "../" * 12 + "etc/passwd", "a/../../b.png",
         "./x.png", "\x00", '"', "'", ",", "\t", "\n", "\r\n", "|", "||", "No Finding|Pneumonia", "Pnuemonia",
         "\u00e9", "\u2028", "patient1", "p10", "validate", "Frontal", "Lateral", "PA", "positive", "negative",
         "[1]", "{}", "Edema", "Path", "path_to_image", "split", "dicom_id", "subject_id", "study_id", "patientId",
         "Target", "Image Index", "Finding Labels"]


# --------------------------------------------------------------------------- mutations
def _rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def _text(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


cells = st.one_of(st.sampled_from(NASTY), st.text(max_size=12))
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)


def mutate_csv(data, text: str, focus: tuple[str, ...] = ()) -> bytes:
    """One to three structural edits of a CSV: a cell (half the time in one of the ``focus`` columns the parser
    interprets; a nasty value, random text, or another row's value: duplicates), a header name, a row
    (drop/duplicate/append/truncate), a column (drop/duplicate), or a byte-level edit."""
    rows = _rows(text)
    header = rows[0] if rows else []
    focus_idx = [header.index(f) for f in focus if f in header]
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        kind = data.draw(st.sampled_from(["cell", "cell", "cell", "header", "drop_row", "dup_row", "add_row",
                                          "truncate", "drop_col", "dup_col", "bytes"]), label="kind")
        if not rows:
            rows = [[]]
        r = data.draw(st.integers(0, len(rows) - 1), label="row")
        width = max(len(x) for x in rows) or 1
        if focus_idx and data.draw(st.booleans(), label="focus"):
            c = data.draw(st.sampled_from(focus_idx), label="col")
        else:
            c = data.draw(st.integers(0, width - 1), label="col")
        if kind == "cell":
            r = max(r, 1) if len(rows) > 1 else r
            if c < len(rows[r]):
                column = [x[c] for x in rows[1:] if c < len(x)] or [""]
                rows[r][c] = data.draw(cells | st.sampled_from(column), label="value")
        elif kind == "header" and rows[0]:
            rows[0][min(c, len(rows[0]) - 1)] = data.draw(cells, label="name")
        elif kind == "drop_row":
            del rows[r]
        elif kind == "dup_row":
            rows.insert(data.draw(st.integers(0, len(rows)), label="at"), list(rows[r]))
        elif kind == "add_row":
            rows.append(data.draw(st.lists(cells, max_size=width + 2), label="new row"))
        elif kind == "truncate":
            rows = rows[:r]
        elif kind == "drop_col":
            rows = [x[:c] + x[c + 1:] for x in rows]
        elif kind == "dup_col":
            rows = [x[:c + 1] + x[c:] for x in rows]
        elif kind == "bytes":
            return mutate_bytes(data, _text(rows).encode())
    return _text(rows).encode()


def mutate_bytes(data, raw: bytes) -> bytes:
    """Flip, insert or delete a few bytes, or truncate."""
    buf = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4), label="byte edits")):
        i = data.draw(st.integers(0, max(len(buf) - 1, 0)), label="at")
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]), label="op")
        if op == "flip" and buf:
            buf[i] = data.draw(st.integers(0, 255), label="byte")
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=4), label="bytes")
        elif op == "delete" and buf:
            del buf[i]
        elif op == "truncate":
            del buf[i:]
    return bytes(buf)


def any_damage(data, raw: bytes, table: bool = True, focus: tuple[str, ...] = ()) -> bytes:
    """A mutated table (cells/rows/headers), byte damage, or random bytes in place of the file."""
    how = data.draw(st.sampled_from(["table", "table", "bytes", "random"] if table else ["bytes", "random"]),
                    label="damage")
    if how == "table":
        return mutate_csv(data, raw.decode(), focus)
    if how == "bytes":
        return mutate_bytes(data, raw)
    return data.draw(st.binary(max_size=300), label="random bytes")


def check_loads_or_dataset_error(fmt: str, root: Path, contained: bool = True, **options) -> None:
    """The property: a table (every image path inside ``root`` for official layouts) or a DatasetError."""
    try:
        table = load_dataset(fmt, root, **options)
    except DatasetError as exc:
        assert str(exc)
        event("DatasetError")  # --hypothesis-show-statistics: how often inputs load vs are refused
        return
    event("loaded")
    assert table.targets.shape == (len(table), len(table.labels))
    assert np.isin(table.targets[~np.isnan(table.targets)], [0.0, 1.0]).all()
    if contained:
        root_abs = os.path.abspath(table.root)  # independent of the code under test: lexical containment
        outside = [p for p in table.paths if os.path.commonpath([root_abs, os.path.abspath(p)]) != root_abs]
        assert not outside, f"{fmt}: images outside {table.root}: {outside[:3]}"


# --------------------------------------------------------------------------- layouts (built once)
@pytest.fixture(scope="module")
def layouts(tmp_path_factory, nih_sample) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("fuzz")
    imgs = sample_images(nih_sample, 7)
    real = base / "nih-real"
    real.mkdir()
    os.symlink(nih_sample / "images", real / "images")
    shutil.copy(nih_sample / "Data_Entry_2017.csv", real / "Data_Entry_2017.csv")
    return {"nih-real": real, "nih": make_nih(base / "nih", imgs[:6]), "mimic-cxr": make_mimic(base / "mimic", imgs),
            "chexpert": make_chexpert(base / "chexpert", imgs), "rsna": make_rsna(base / "rsna"),
            "chexpert-plus": make_chexpert_plus(base / "plus", imgs), "covidx": make_covidx(base / "covidx", imgs[:4])}


class Swap:
    """Put mutated bytes in place of one file for the duration of one example."""

    def __init__(self, path: Path, gz: bool = False) -> None:
        self.path, self.gz = path, gz
        self.original = path.read_bytes()

    def plain(self) -> bytes:
        return gzip.decompress(self.original) if self.gz else self.original

    def __call__(self, content: bytes, compress: bool | None = None):
        self.path.write_bytes(gzip.compress(content) if (self.gz if compress is None else compress) else content)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.path.write_bytes(self.original)


# --------------------------------------------------------------------------- one test per parser and file
@FUZZ
@given(data=st.data())
def test_fuzz_nih_real_sample_csv(layouts, data):
    swap = Swap(layouts["nih-real"] / "Data_Entry_2017.csv")
    focus = ("Image Index", "Finding Labels", "Patient ID", "View Position", "Patient Age")
    with swap(any_damage(data, swap.plain(), focus=focus)):
        check_loads_or_dataset_error("nih", layouts["nih-real"])


@FUZZ
@given(data=st.data())
def test_fuzz_nih_split_lists(layouts, data):
    name = data.draw(st.sampled_from(["train_val_list.txt", "test_list.txt"]), label="file")
    swap = Swap(layouts["nih"] / name)
    with swap(any_damage(data, swap.plain(), table=False)):
        check_loads_or_dataset_error("nih", layouts["nih"])


@FUZZ
@given(data=st.data())
def test_fuzz_mimic_tables(layouts, data):
    stem = data.draw(st.sampled_from(["metadata", "split", "chexpert"]), label="file")
    swap = Swap(layouts["mimic-cxr"] / f"mimic-cxr-2.0.0-{stem}.csv.gz", gz=True)
    focus = {"metadata": ("dicom_id", "subject_id", "study_id", "ViewPosition"), "split": ("dicom_id", "split"),
             "chexpert": ("subject_id", "study_id", "Edema", "No Finding")}[stem]
    damaged = any_damage(data, swap.plain(), focus=focus)
    with swap(damaged, compress=data.draw(st.sampled_from([True, True, True, False]), label="gzip")):
        check_loads_or_dataset_error("mimic-cxr", layouts["mimic-cxr"])


@FUZZ
@given(data=st.data())
def test_fuzz_chexpert_tables(layouts, data):
    swap = Swap(layouts["chexpert"] / data.draw(st.sampled_from(["train.csv", "valid.csv"]), label="file"))
    with swap(any_damage(data, swap.plain(), focus=("Path", "Frontal/Lateral", "AP/PA", "Edema"))):
        check_loads_or_dataset_error("chexpert", layouts["chexpert"])


@FUZZ
@given(data=st.data())
def test_fuzz_chexpert_plus_csv_and_json_lines(layouts, data):
    root = layouts["chexpert-plus"]
    which = data.draw(st.sampled_from(["csv", "json"]), label="file")
    if which == "csv":
        swap = Swap(root / "df_chexpert_plus_240401.csv")
        content = any_damage(data, swap.plain(), focus=("path_to_image", "deid_patient_id", "split", "ap_pa",
                                                        "section_findings"))
    else:
        swap = Swap(root / "chexbert_labels" / "impression_fixed.json")
        lines = swap.plain().decode().splitlines()
        how = data.draw(st.sampled_from(["value", "line", "bytes"]), label="damage")
        if how == "value":  # one field of one object replaced by any JSON value
            i = data.draw(st.integers(0, len(lines) - 1), label="line")
            obj = json.loads(lines[i])
            key = data.draw(st.sampled_from([*obj, "path_to_image"]), label="key")
            obj[key] = data.draw(json_values, label="value")
            lines[i] = json.dumps(obj)
            content = "\n".join(lines).encode()
        elif how == "line":
            lines.insert(data.draw(st.integers(0, len(lines)), label="at"), data.draw(st.text(max_size=20)))
            content = "\n".join(lines).encode()
        else:
            content = any_damage(data, swap.plain(), table=False)
    with swap(content):
        check_loads_or_dataset_error("chexpert-plus", root)


@FUZZ
@given(data=st.data())
def test_fuzz_rsna_csv(layouts, data):
    swap = Swap(layouts["rsna"] / "stage_2_train_labels.csv")
    with swap(any_damage(data, swap.plain(), focus=("patientId", "Target"))):
        check_loads_or_dataset_error("rsna", layouts["rsna"])


@FUZZ
@given(data=st.data())
def test_fuzz_covidx_lists(layouts, data):
    swap = Swap(layouts["covidx"] / data.draw(st.sampled_from(["train.txt", "test.txt"]), label="file"))
    how = data.draw(st.sampled_from(["field", "bytes"]), label="damage")
    if how == "field":  # one whitespace-separated field replaced
        lines = [ln.split(" ") for ln in swap.plain().decode().splitlines()]
        i = data.draw(st.integers(0, len(lines) - 1), label="line")
        j = data.draw(st.integers(0, len(lines[i]) - 1), label="field")
        lines[i][j] = data.draw(cells, label="value")
        content = "\n".join(" ".join(x) for x in lines).encode()
    else:
        content = any_damage(data, swap.plain(), table=False)
    with swap(content):
        check_loads_or_dataset_error("covidx", layouts["covidx"])


@FUZZ
@given(data=st.data())
def test_fuzz_generic_csv(layouts, data):
    folder = layouts["nih"] / "images_001" / "images"
    names = sorted(p.name for p in folder.glob("*.png"))
    original = _text([["path", "patient_id", "view", "split", "report", "Effusion", "Mass"],
                      *[[n, str(k // 2), "PA", ["train", "val", "test"][k % 3], "r", str(k % 2), ["", "-1", "1"][k % 3]]
                        for k, n in enumerate(names)]]).encode()
    suffix = data.draw(st.sampled_from([".csv", ".tsv"]), label="suffix")
    table_file = folder / f"labels{suffix}"
    table_file.write_bytes(original)
    options = data.draw(st.sampled_from([{}, {"labels_column": "report"}, {"blank": "zeros"},
                                         {"restrict_paths": True}, {"image_column": "view"}]), label="options")
    damaged = any_damage(data, original, focus=("path", "patient_id", "view", "split", "Effusion"))
    with Swap(table_file)(damaged.replace(b",", b"\t") if suffix == ".tsv" else damaged):
        check_loads_or_dataset_error("csv", table_file, contained=bool(options.get("restrict_paths")), **options)


@pytest.fixture(scope="module")
def nih_with_split(nih_sample, tmp_path_factory):
    table = load_dataset("nih", nih_sample)
    path = save_split(make_split(table, seed=0), table, tmp_path_factory.mktemp("split") / "split.json")
    return table, path


@FUZZ
@given(data=st.data())
def test_fuzz_split_file(nih_with_split, data):
    table, path = nih_with_split
    swap = Swap(path)
    how = data.draw(st.sampled_from(["value", "bytes", "random"]), label="damage")
    if how == "value":  # a top-level key set to any JSON value, or a path in a part replaced
        doc = json.loads(swap.plain())
        key = data.draw(st.sampled_from([*doc, "extra"]), label="key")
        if isinstance(doc.get(key), list) and doc[key] and data.draw(st.booleans(), label="item"):
            doc[key][data.draw(st.integers(0, len(doc[key]) - 1))] = data.draw(json_values | cells, label="item")
        else:
            doc[key] = data.draw(json_values, label="value")
        content = json.dumps(doc).encode()
    else:
        content = any_damage(data, swap.plain(), table=False)
    with swap(content):
        try:
            split = load_split(path, table)
        except DatasetError as exc:
            assert str(exc)
            return
        every = np.concatenate([split.train, split.val, split.test])
        assert len(np.unique(every)) == len(every) and (every < len(table)).all()


# --------------------------------------------------------------------------- containment of image names
#: Names built to escape: an absolute or deeply '..'-prefixed path to a file that exists (/etc/passwd), walks
#: that leave and re-enter the folder, and plain names.
escape_names = st.builds(
    lambda lead, middle, target: lead + "/".join([*middle, target]),
    st.sampled_from(["", "/", "../", "../../", "../" * 12, "./"]),
    st.lists(st.sampled_from(["..", ".", "images", "train", "files", "PNG", "patient00001", "sub"]), max_size=4),
    st.sampled_from(["etc/passwd", "passwd", "x.png", "view1_frontal.png", "00000061_012.jpg"]))

#: format -> (files holding the image name, the name as written there, suffix the loader appends)
NAME_SITES = {
    "nih-real": (["Data_Entry_2017.csv"], "00000061_012.jpg"),
    "chexpert": (["train.csv"], "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"),
    "chexpert-plus": (["df_chexpert_plus_240401.csv", "chexbert_labels/impression_fixed.json"],
                      "train/patient00002/study1/view1_frontal.jpg"),
    "mimic-cxr": (["mimic-cxr-2.0.0-metadata.csv.gz", "mimic-cxr-2.0.0-split.csv.gz"],
                  "00000000-1a2b3c4d-5e6f7a8b-9c0d1e2f-3a4b5c6d"),
    "rsna": (["stage_2_train_labels.csv"], "00313ee0-9eaa-42f4-b0ab-c148ed3241cd"),
    "covidx": (["train.txt"], "MIDRC-RICORD-1C-41961-46647-0.png"),
}


@pytest.mark.parametrize("fmt", list(NAME_SITES))
def test_fuzz_image_names_stay_inside_official_folders(layouts, fmt):
    """Any image name in an official table either resolves inside the dataset folder or is refused, whether or not
    the file it names exists (``check_files=False``)."""
    files, name = NAME_SITES[fmt]
    root = layouts[fmt]
    swaps = [Swap(root / f, gz=f.endswith(".gz")) for f in files]
    assert all(name in s.plain().decode() for s in swaps)

    @FUZZ
    @given(new=escape_names)
    def check(new):
        try:
            for s in swaps:
                s(s.plain().decode().replace(name, new).encode())
            check_loads_or_dataset_error("nih" if fmt == "nih-real" else fmt, root, check_files=False)
        finally:
            for s in swaps:
                s.__exit__()

    check()
