import sys
from pathlib import Path

import pytest
import torch

# `from reference import ...` in tests, wherever pytest is started from.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _two_threads():
    # The reference vectors were produced with 2 intra-op threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)
