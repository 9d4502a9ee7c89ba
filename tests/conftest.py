from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NIH_SAMPLE = Path(os.environ.get("MEDBRIDGE_NIH_SAMPLE", REPO.parent / "shared" / "data" / "nih-cxr14-sample"))


@pytest.fixture(scope="session")
def nih_sample() -> Path:
    if not (NIH_SAMPLE / "Data_Entry_2017.csv").is_file():
        pytest.skip(f"NIH sample not found at {NIH_SAMPLE}")
    return NIH_SAMPLE


@pytest.fixture(scope="session")
def bundled_backbone():
    from medbridge import create_backbone

    return create_backbone("dinov2-small+minilm-l6")
