import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from evalhelpers import ConvStandIn  # noqa: E402


@pytest.fixture
def standin() -> ConvStandIn:
    return ConvStandIn().eval()
