"""Tests of the scripts under bench/ (their CPU modes and their pure parts)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_module(name: str):
    """Import bench/<name>.py (bench/ is not a package: its scripts import each other by file name)."""
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))
