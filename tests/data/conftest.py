import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datahelpers import CAMVID_ROOT  # noqa: E402


@pytest.fixture
def camvid_root() -> Path:
    if not (CAMVID_ROOT / "train" / "images").is_dir():
        pytest.skip(f"real CamVid not available at {CAMVID_ROOT}")
    return CAMVID_ROOT
