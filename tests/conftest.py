"""Shared test set-up.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so that the kernels in
kernels/ run on the CPU through Triton's interpreter and the dispatch in cmki.py takes the fused path.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests import the top-level modules (model, cmki, data, ...)

# Real third-party data lives beside the repository, never inside it (see shared/data/README.md).
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """Path to ../shared/data; the test is skipped cleanly when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA
