"""Fixtures of the cluster tests."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir under /tmp: Ray's unix socket paths must stay under ~107 characters."""
    path = Path(tempfile.mkdtemp(prefix="rfray-t-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
