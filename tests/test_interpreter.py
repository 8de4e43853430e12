"""Issue 23, item 5: `.venv/bin/dvc repro` without the environment activated runs a stage's `python -m stages.x`
with the `python` first on PATH. stages/__init__.py (stages/common/interpreter.py) switches the stage to the Python
dvc runs on, or, with no dvc Python above it, stops with a message before the stage writes anything.

The real thing, in a tiny DVC repository: its `stages` package is this repository's stages/__init__.py and
stages/common/interpreter.py plus a probe stage that imports torch and writes the prefix it ran under; the `python`
first on PATH is a bare venv (no torch, another prefix) and the environment is otherwise empty (`env -i`)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from import_closure import REPO
from stages.common.interpreter import dvc_python_of, environment_prefix, main_module, same_environment

VENV_BIN = Path(sys.executable).parent  # the project's environment: the one running these tests (and its dvc)
PROBE = """import sys

import torch  # the stage needs the project's packages

with open(sys.argv[1], "w") as out:
    out.write(sys.prefix + "\\n" + torch.__file__ + "\\n")
"""
DVC_YAML = """stages:
  probe:
    cmd: python -m stages.probe probe.txt
    outs: [probe.txt]
  nested:
    cmd: sh -c "python -u -m stages.probe nested.txt"
    outs: [nested.txt]
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A DVC repository (no git) whose two stages run `python -m stages.probe`, and a bare venv at repo/bare."""
    root = tmp_path_factory.mktemp("interpreter")
    for name in ("stages/__init__.py", "stages/common/__init__.py", "stages/common/interpreter.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    (root / "stages" / "probe.py").write_text(PROBE)
    (root / "dvc.yaml").write_text(DVC_YAML)
    # the bare Python: a venv of the interpreter the project's venv was made from, without any package
    subprocess.run([os.path.realpath(sys.executable), "-m", "venv", "--without-pip", str(root / "bare")], check=True)
    subprocess.run([str(VENV_BIN / "dvc"), "init", "--no-scm", "-q"], cwd=root, env=clean_env(root), check=True)
    return root


def clean_env(root: Path, **extra: str) -> dict[str, str]:
    """`env -i` plus: PATH with the bare venv first (its `python`), a private HOME and DVC config and cache dirs."""
    home = root / "home"
    home.mkdir(exist_ok=True)
    return {"PATH": f"{root / 'bare' / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(home),
            "DVC_NO_ANALYTICS": "1", "DVC_GLOBAL_CONFIG_DIR": str(home / "global"),
            "DVC_SYSTEM_CONFIG_DIR": str(home / "system"), "DVC_SITE_CACHE_DIR": str(home / "site"), **extra}


def run(cmd: list[str], root: Path, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=root, env=clean_env(root, **extra), capture_output=True, text=True, timeout=120)


def test_outside_dvc_the_python_on_path_is_the_bare_one_and_nothing_intervenes(repo):
    """The control: the `python` DVC's shell finds is not the project's (the failure of the issue), and without
    DVC_STAGE stages/__init__.py leaves it alone: the stage's own import fails, no message, no switch."""
    assert shutil.which("python", path=clean_env(repo)["PATH"]) == str(repo / "bare" / "bin" / "python")
    result = run(["python", "-m", "stages.probe", "outside.txt"], repo)
    assert result.returncode == 1
    assert "No module named 'torch'" in result.stderr
    assert "lacks the project's packages" not in result.stderr and "running the stage with" not in result.stderr
    assert not (repo / "outside.txt").exists()


@pytest.mark.parametrize("launch", [["{bin}/dvc"], ["{bin}/python", "-m", "dvc"]],
                         ids=["console-script", "python-m-dvc"])
def test_dvc_repro_without_the_environment_activated_runs_the_stages_with_dvcs_python(repo, launch):
    cmd = [part.format(bin=VENV_BIN) for part in launch] + ["repro", "--force"]
    for out in ("probe.txt", "nested.txt"):
        (repo / out).unlink(missing_ok=True)
    result = run(cmd, repo)
    assert result.returncode == 0, result.stdout + result.stderr
    for out in ("probe.txt", "nested.txt"):  # dvc is the grandparent of `probe`, further up for `nested`
        prefix, torch_file = (repo / out).read_text().splitlines()
        assert os.path.realpath(prefix) == os.path.realpath(sys.prefix)
        assert Path(torch_file).is_relative_to(sys.prefix)
    switched = [line for line in result.stderr.splitlines() if "running the stage with" in line]
    assert len(switched) == 2, result.stderr
    assert f"`python` is {repo / 'bare' / 'bin' / 'python'}" in switched[0]
    assert f"running the stage with {VENV_BIN / 'python'} instead" in switched[0]


def test_with_no_dvc_python_above_a_python_lacking_the_packages_stops_before_the_stage_runs(repo):
    """What a stage does where no dvc Python can be found (not Linux, a standalone dvc binary): the bare python,
    started as DVC starts a stage, exits 2 with the message at once; the stage's output is not touched."""
    (repo / "kept.txt").write_text("old\n")
    result = run(["python", "-m", "stages.probe", "kept.txt"], repo, DVC_STAGE="probe", DVC_ROOT=str(repo))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"stages.probe (DVC stage probe): this python ({repo / 'bare' / 'bin' / 'python'}) lacks the project's "
        f"packages (torch, yaml); DVC ran the stage with the `python` first on PATH. Activate the project's "
        f"environment (`source .venv/bin/activate`) and run dvc again; no output of the stage was written."]
    assert (repo / "kept.txt").read_text() == "old\n"


def test_with_no_dvc_python_above_the_projects_python_runs_the_stage_as_it_is(repo):
    result = run([str(VENV_BIN / "python"), "-m", "stages.probe", "direct.txt"], repo, DVC_STAGE="probe")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert os.path.realpath((repo / "direct.txt").read_text().splitlines()[0]) == os.path.realpath(sys.prefix)


def test_the_dvc_process_is_recognised_by_its_command_line():
    assert dvc_python_of(["/e/bin/python3.11", "/e/bin/dvc", "repro"]) == ("python", "/e/bin/python3.11")
    assert dvc_python_of(["python", "-X", "dev", "-m", "dvc", "exp", "run"]) == ("python", "python")
    assert dvc_python_of(["/e/bin/python", "-m", "dvc.cli", "repro"]) == ("python", "/e/bin/python")
    assert dvc_python_of(["/usr/local/bin/dvc", "repro"]) == ("binary", None)  # a standalone (PyInstaller) dvc
    assert dvc_python_of(["/e/bin/python", "-m", "pipelines.repro"]) is None
    assert dvc_python_of(["/e/bin/python", "-c", "import dvc"]) is None
    assert dvc_python_of(["/bin/sh", "-c", "python -m stages.probe"]) is None
    assert dvc_python_of(["/e/bin/python", "/e/bin/pytest"]) is None


def test_the_stage_module_is_read_from_the_interpreters_arguments():
    assert main_module(["python", "-m", "stages.train", "--out", "x", "-m", "y"]) == "stages.train"
    assert main_module(["python", "-u", "-X", "dev", "-W", "ignore", "-m", "stages.pretrain"]) == "stages.pretrain"
    assert main_module(["python", "-um", "stages.index"]) == "stages.index"
    assert main_module(["python", "-c", "import stages"]) is None
    assert main_module(["python", "stages/prepare.py"]) is None


def test_an_environment_is_its_prefix_not_its_binary(repo):
    """A venv's python is a symlink to its base Python: the same binary, another environment."""
    bare = repo / "bare" / "bin" / "python"
    assert os.path.realpath(bare) == os.path.realpath(sys.executable)
    assert environment_prefix(str(bare)) == str(repo / "bare")
    assert same_environment(sys.executable)
    assert not same_environment(str(bare))
