"""Issue 27 item 3/5: training on nothing is one error, a run folder is locked while a run trains into it, and a
failure while writing the outputs leaves no metrics.json (a complete-looking run). Each test failed on 3ec5e49."""

from __future__ import annotations

import pytest
from tests.helpers import nih_subset_csv, save_tiny_clip

from medbridge.cli.main import main
from medbridge.engine.runlock import run_lock


@pytest.fixture(scope="module")
def setup(tmp_path_factory, nih_sample):
    root = tmp_path_factory.mktemp("runrel")
    data = nih_subset_csv(nih_sample, root / "data" / "labels.csv", n=24)
    common = ["--backbone", save_tiny_clip(root / "clip"), "--quiet", "--method", "linear-probe",
              "--set", f"train.cache_dir={root / 'cache'}", "--set", "train.workers=0",
              "--set", "focal.num_crops=0", "--set", "data.fractions=[0.5,0.2,0.3]"]
    return {"root": root, "data": data, "common": common}


def test_training_on_unreadable_images_is_one_error(setup, tmp_path, capsys):
    """A folder of unreadable images with data.skip_unreadable=true exited 0 with NaN weights and "auroc": NaN."""
    import pandas as pd

    frame = pd.read_csv(setup["data"])
    (tmp_path / "img").mkdir()
    for k in range(len(frame)):
        (tmp_path / "img" / f"{k}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * k)
    frame["path"] = [str(tmp_path / "img" / f"{k}.png") for k in range(len(frame))]
    frame.to_csv(tmp_path / "bad.csv", index=False)
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "bad.csv"), *setup["common"], "--out", str(out),
                 "--set", "data.skip_unreadable=true"]) == 2
    err = capsys.readouterr().err
    assert "none of the 12 training image(s) could be read (24 unreadable image(s) skipped" in err
    assert not (out / "metrics.json").exists() and not any(out.rglob("*.safetensors"))


def test_a_run_folder_in_use_is_refused(setup, tmp_path, capsys):
    """A second ``train --overwrite`` into a folder another process trains in mixed the two runs' files."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".medbridge-run").write_text("medbridge run folder\n")
    (out / "config.yaml").write_text("method: medbridge\n")
    with run_lock(out):  # the other process (flock: a second open of the folder conflicts even in one process)
        assert main(["train", "--data", str(setup["data"]), *setup["common"], "--out", str(out), "--overwrite"]) == 2
        assert "is in use: another medbridge process is training into it" in capsys.readouterr().err
        assert (out / "config.yaml").read_text() == "method: medbridge\n"
    with run_lock(out):  # released when the holder ends
        pass


def test_a_failure_while_writing_outputs_leaves_no_metrics(setup, tmp_path, monkeypatch, capsys):
    import medbridge.engine.run as run

    def broken_plot(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(run, "plot_roc", broken_plot)
    out = tmp_path / "run"
    argv = ["train", "--data", str(setup["data"]), *setup["common"], "--out", str(out)]
    assert main(argv) == 2
    assert "plotting failed" in capsys.readouterr().err
    assert not (out / "metrics.json").exists()  # the folder does not look like a finished run
    monkeypatch.undo()
    assert main(argv + (["--resume"] if out.is_dir() and any(out.iterdir()) else [])) == 0
    assert (out / "metrics.json").is_file() and (out / "roc_curves.png").is_file()
