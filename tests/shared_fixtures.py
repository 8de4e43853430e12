"""The real-format excerpts in ../shared/fixtures, read in place (beside the checkout, as in CI).

A public clone has no ../shared: the tests that need it are skipped, each with the missing path as its reason.
`.ci/run` sets CIRFLOW_FAIL_ON_SKIP=1, under which any skip fails the run (tests/conftest.py), so CI, which has
the fixtures, runs every test."""
from __future__ import annotations

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def fixture(relative: str) -> Path:
    """FIXTURES / relative, or skip the test when it is absent."""
    path = FIXTURES / relative
    if not path.exists():
        pytest.skip(f"needs {path}: the shared fixtures beside the checkout (CI has them)")
    return path
