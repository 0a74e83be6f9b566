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

from kernels.tiles import interpreter_rounds_bf16  # noqa: E402

interpreter_rounds_bf16()  # bf16 stores round as on a GPU (the interpreter alone truncates)

# Real third-party data lives beside the repository, never inside it (see shared/data/README.md).
SHARED_DATA = ROOT.parent / "shared" / "data"


def flags_without_default(help_text: str) -> list:
    """The flags of an argparse --help text whose entry does not state a default."""
    entries, current = [], None
    for line in help_text.split("options:", 1)[-1].splitlines():
        if line.startswith("  -"):
            current = [line]
            entries.append(current)
        elif current is not None:
            current.append(line)
    flags = [(e[0].split()[0].rstrip(","), " ".join(e)) for e in entries]
    return [f for f, text in flags if f not in ("-h", "--help") and "default" not in text]


@pytest.fixture
def help_lacks_defaults():
    """Fixture form of flags_without_default, for the tests of each command line."""
    return flags_without_default


@pytest.fixture
def shared_data() -> Path:
    """Path to ../shared/data; the test is skipped cleanly when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


def _write_csv_as_a_spreadsheet(path, rows) -> Path:
    """Rows as a spreadsheet saves them: a UTF-8 byte-order mark, CRLF line ends, every field
    quoted (so commas, quotes and newlines inside fields are written as such)."""
    import csv
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\r\n").writerows(rows)
    return Path(path)


@pytest.fixture
def spreadsheet_csv():
    """The writer of CSVs as spreadsheets save them (see _write_csv_as_a_spreadsheet)."""
    return _write_csv_as_a_spreadsheet
