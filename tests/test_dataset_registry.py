"""The dataset registry: built-in formats, detection order, errors, ``medbridge list datasets``, a dataset's default
preset, plugins, and docs/adding-a-dataset.md's example run end to end through the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from tests.helpers import nih_subset_csv, save_tiny_clip

from medbridge.cli.main import build_parser, main
from medbridge.data import DatasetError, detect_format, get_dataset, list_datasets, load_dataset, register_dataset
from medbridge.data.datasets import registry
from medbridge.data.datasets.registry import detection_order

REPO = Path(__file__).resolve().parents[1]
BUILTIN = ["nih", "mimic-cxr", "chexpert", "chexpert-plus", "rsna", "covidx", "covid-chestxray", "odir", "csv",
           "folder"]


def example_code() -> str:
    text = (REPO / "docs" / "adding-a-dataset.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)[-1]  # the example (the first block is the signature)


def test_the_documented_example_is_short():
    code = [line for line in example_code().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(code) <= 35


@pytest.fixture
def forget_format():
    """Formats a test registers are removed afterwards (the registry is process-wide)."""
    names: list[str] = []
    yield names
    for name in names:
        registry._REGISTRY.pop(name, None)


def test_every_builtin_format_is_registered_with_its_files_and_citation():
    assert list_datasets()[:len(BUILTIN)] == BUILTIN
    for name in BUILTIN:
        spec = get_dataset(name)
        assert spec.name == name and spec.description and spec.files and callable(spec.load)
        assert spec.citation or name in ("csv", "folder")
    order = [s.name for s in detection_order()]
    assert order[0] == "csv" and order[-1] == "folder"  # a file given first; one folder per class last
    assert order.index("chexpert-plus") < order.index("chexpert")
    assert get_dataset("odir").preset == "odir" and not [n for n in BUILTIN if n != "odir" and get_dataset(n).preset]


def test_detection_prefers_chexpert_plus_and_falls_back_to_folders(tmp_path):
    (tmp_path / "train.csv").write_text("Path\n")
    assert detect_format(tmp_path) == "chexpert"
    (tmp_path / "df_chexpert_plus_240401.csv").write_text("path_to_image\n")
    assert detect_format(tmp_path) == "chexpert-plus"
    (tmp_path / "classes" / "a").mkdir(parents=True)
    assert detect_format(tmp_path / "classes") == "folder"
    assert detect_format(tmp_path / "train.csv") == "csv"
    with pytest.raises(DatasetError, match=r"cannot tell the dataset layout .*covid-chestxray, odir"):
        detect_format(tmp_path / "classes" / "a")


def test_an_unknown_format_is_one_line_with_close_matches(tmp_path, capsys):
    with pytest.raises(DatasetError, match=r"unknown dataset format 'odri'; did you mean odir"):
        get_dataset("odri")
    with pytest.raises(DatasetError, match="unknown dataset format 'nhi'; did you mean nih"):
        load_dataset("nhi", tmp_path)
    (tmp_path / "d").mkdir()
    assert main(["train", "--data", str(tmp_path / "d"), "--format", "chexpert_plus", "--out",
                 str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean chexpert-plus" in err[0] and "covid-chestxray" in err[0]
    assert not (tmp_path / "run").exists()


def test_register_dataset_refuses_a_second_format_of_the_same_name(tmp_path, forget_format):
    forget_format.append("twice")
    register_dataset("twice", lambda path: None, description="one")
    with pytest.raises(ValueError, match="'twice' is registered already"):
        register_dataset("twice", lambda path: None, description="two")
    assert register_dataset("twice", load_dataset, description="two", replace=True).description == "two"
    for bad in ("", "auto"):
        with pytest.raises(ValueError, match="not a usable format name"):
            register_dataset(bad, load_dataset)
    assert get_dataset("twice").detect is None and "twice" not in [s.name for s in detection_order()]


def test_list_datasets_prints_every_format(capsys):
    assert main(["list", "datasets"]) == 0
    out = capsys.readouterr().out
    for name in BUILTIN:
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), name
    assert "Cohen J. P." in out and "default preset: odir" in out and "Data_Entry_2017.csv" in out
    assert main(["list", "datasets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["odir"]["preset"] == "odir" and rows["covid-chestxray"]["files"][0].startswith("metadata.csv")


def _run_config(argv: list[str]):
    from medbridge.cli.run_commands import build_run_config

    return build_run_config(build_parser().parse_args(argv))


def test_odir_data_without_a_preset_uses_the_odir_preset(odir_sample, tmp_path, capsys):
    base = ["train", "--data", str(odir_sample), "--out", str(tmp_path / "run")]
    implied = _run_config(base)
    assert capsys.readouterr().err.strip() == ("medbridge: odir data: using the dataset's default preset 'odir' "
                                               "(--preset or --config chooses another)")
    explicit = _run_config([*base, "--preset", "odir"])
    assert implied.to_dict() == explicit.to_dict()
    assert implied.data.unit == "case" and implied.focal["num_crops"] == 0
    assert implied.method_options["medbridge"]["template"] == "a colour fundus photograph with {}."
    assert capsys.readouterr().err == ""
    other = _run_config([*base, "--preset", "linear-probe"])  # an explicit preset or config wins
    assert other.data.unit == "auto" and capsys.readouterr().err == ""
    (tmp_path / "mine.yaml").write_text("train: {epochs: 1}\n")
    assert _run_config([*base, "--config", str(tmp_path / "mine.yaml")]).data.unit == "auto"
    assert _run_config(["benchmark", "--data", str(odir_sample), "--out", str(tmp_path / "b")]).to_dict() == \
        implied.to_dict()


def test_other_data_keeps_the_configuration_it_had(nih_sample, tmp_path, capsys):
    from medbridge.engine.config import load_config

    cfg = _run_config(["train", "--data", str(nih_sample), "--out", str(tmp_path / "run")])
    assert cfg.to_dict() == load_config(None, None, [f"data.path={nih_sample}"]).to_dict()
    assert capsys.readouterr().err == ""
    missing = _run_config(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    assert missing.data.path == str(tmp_path / "nowhere")  # the loader reports it, as before


def test_a_plugin_that_registers_only_a_dataset_is_listed(tmp_path):
    (tmp_path / "my_datasets.py").write_text(example_code())
    env = {**os.environ, "MEDBRIDGE_PLUGINS": "my_datasets:register",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO / "src")])}
    done = subprocess.run([sys.executable, "-m", "medbridge", "list", "datasets"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^my-xrays\s+our chest X-ray export", done.stdout, re.M)


def my_xrays_folder(nih_sample: Path, root: Path, n: int = 40) -> Path:
    """The first ``n`` NIH sample images laid out as the guide's format: images/ (links) + my_labels.csv."""
    frame = pd.read_csv(nih_subset_csv(nih_sample, root.parent / "subset.csv", n=n))
    (root / "images").mkdir(parents=True)
    for path in frame["path"]:
        (root / "images" / Path(path).name).symlink_to(path)
    labels = [c for c in frame.columns if c not in ("path", "patient_id", "view")]
    pd.DataFrame({"image": [Path(p).name for p in frame["path"]], "patient": frame["patient_id"],
                  "findings": ["|".join(lab for lab in labels if row[lab] == 1) for _, row in frame.iterrows()]}
                 ).to_csv(root / "my_labels.csv", index=False)
    return root


def test_the_documented_example_dataset_trains_end_to_end_through_the_cli(tmp_path, nih_sample, capsys,
                                                                         monkeypatch, forget_format):
    from medbridge.methods import registry as methods

    (tmp_path / "my_datasets.py").write_text(example_code())
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_datasets", raising=False)
    forget_format.append("my-xrays")
    data = my_xrays_folder(nih_sample, tmp_path / "export")
    assert detect_format(data) == "folder"  # unregistered, images/ would pass for a class
    methods.load_plugins("my_datasets:register")  # what MEDBRIDGE_PLUGINS=my_datasets:register does
    assert detect_format(data) == "my-xrays"
    table = load_dataset("auto", data)
    assert table.labels == ("Effusion", "Infiltration", "Pneumonia") and len(table) == 40
    assert table.citation == get_dataset("my-xrays").citation
    assert main(["list", "datasets"]) == 0 and "my-xrays" in capsys.readouterr().out

    vision = save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "run"
    common = ["--set", "train.workers=0", "--set", f"train.cache_dir={tmp_path / 'cache'}"]
    assert main(["train", "--data", str(data), "--backbone", vision, "--method", "linear-probe", "--out", str(out),
                 "--quiet", "--n-boot", "20", "--set", "data.fractions=[0.5,0.2,0.3]", *common]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"linear-probe"}
    split = json.loads((out / "split.json").read_text())
    assert split["dataset"] == "my-xrays" and sum(len(split[k]) for k in ("train", "val", "test")) == 40
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(data), "--json", "--workers", "0",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["macro"]["auroc"] == metrics["methods"]["linear-probe"]["macro"]["auroc"]
