from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NIH_SAMPLE = Path(os.environ.get("MEDBRIDGE_NIH_SAMPLE", REPO.parent / "shared" / "data" / "nih-cxr14-sample"))
ODIR_SAMPLE = Path(os.environ.get("MEDBRIDGE_ODIR_SAMPLE", REPO.parent / "shared" / "data" / "odir5k-sample"))


@pytest.fixture(scope="session")
def nih_sample() -> Path:
    if not (NIH_SAMPLE / "Data_Entry_2017.csv").is_file():
        pytest.skip(f"NIH sample not found at {NIH_SAMPLE}")
    return NIH_SAMPLE


@pytest.fixture(scope="session")
def odir_sample() -> Path:
    if not (ODIR_SAMPLE / "ODIR-5K" / "ODIR-5K_Training_Annotations(Updated)_V2.xlsx").is_file():
        pytest.skip(f"ODIR-5K sample not found at {ODIR_SAMPLE}")
    return ODIR_SAMPLE


@pytest.fixture(scope="session")
def bundled_backbone():
    from medbridge import create_backbone

    return create_backbone("dinov2-small+minilm-l6")
