"""Shared fixtures: tiny configs and models (compiled once per test module)."""
import os
import sys

import numpy as np
import pytest

# With libtpu installed (the `tpu` extra, for the planner tests) every JAX process probes for a
# TPU: the tests run on the CPU, and several pytest-xdist workers may load libtpu at once.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def np_rng():
    return np.random.default_rng(0)
