"""Shared fixtures: tiny configs and models (compiled once per test module)."""
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def np_rng():
    return np.random.default_rng(0)
