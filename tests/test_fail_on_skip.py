"""The skip policy: without ../shared/fixtures the tests that need them skip with the missing path; under
CIRFLOW_FAIL_ON_SKIP=1 (.ci/run) any skip fails the run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import shared_fixtures

TESTS = Path(__file__).resolve().parent


def run_pytest(tmp_path, env_value, *options):
    (tmp_path / "test_one.py").write_text("import pytest\n\ndef test_ok():\n    pass\n\n"
                                          "def test_skipped():\n    pytest.skip('no data here')\n")
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    env.pop("CIRFLOW_FAIL_ON_SKIP", None)
    if env_value is not None:
        env["CIRFLOW_FAIL_ON_SKIP"] = env_value
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "fail_on_skip", "-p", "no:cacheprovider",
                           *options, str(tmp_path / "test_one.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True)


def test_a_skip_passes_a_plain_run_and_fails_under_ci(tmp_path):
    plain = run_pytest(tmp_path, None)
    assert plain.returncode == 0, plain.stdout
    ci = run_pytest(tmp_path, "1")
    assert ci.returncode == 1, ci.stdout
    assert "CIRFLOW_FAIL_ON_SKIP=1: 1 skipped test(s) fail this run" in ci.stdout
    assert "test_one.py::test_skipped" in ci.stdout and "no data here" in ci.stdout


def test_a_skip_fails_a_ci_run_on_several_workers(tmp_path):
    """The suite runs under pytest-xdist (pyproject.toml's -n auto): the workers' skips reach the controller."""
    plain = run_pytest(tmp_path, None, "-n", "2")
    assert plain.returncode == 0 and "1 passed, 1 skipped" in plain.stdout, plain.stdout
    ci = run_pytest(tmp_path, "1", "-n", "2")
    assert ci.returncode == 1, ci.stdout
    assert "CIRFLOW_FAIL_ON_SKIP=1: 1 skipped test(s) fail this run" in ci.stdout
    assert "test_one.py::test_skipped" in ci.stdout and "no data here" in ci.stdout


def test_a_missing_fixture_skips_naming_the_path(monkeypatch, tmp_path):
    monkeypatch.setattr(shared_fixtures, "FIXTURES", tmp_path / "absent")
    with pytest.raises(pytest.skip.Exception, match=r"needs .*absent/shoes: the shared fixtures beside the checkout"):
        shared_fixtures.fixture("shoes")
