"""Where a metrics file's numbers come from: code, library versions, machine, threads, and for a training stage whether
it resumed. Bit-exact reproduction holds for the same code, versions, CPU (or GPU) and thread count; this block says
which those were."""
from __future__ import annotations

import hashlib
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

# written by DVC and the stages themselves: a run that rewrote them ran the committed code all the same
_OUTPUT_PATHS = ("dvc.lock", "metrics/")
_PACKAGES = ("torch", "torchvision", "numpy", "dvc", "webdataset", "torchdata")


def code_state(root: Path | str = ".") -> dict:
    """{commit, dirty}: HEAD of the git checkout at `root`, and whether a tracked file other than DVC's outputs
    differs from it (params.yaml counts: DVC records the params, but a changed file is still not the commit)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": any(not path.startswith(_OUTPUT_PATHS) for path in changed)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def provenance(device: torch.device, processes: int = 1, resumed_from_step: int | None = None,
               training: bool = False, **files: Path) -> dict:
    """The `provenance` block of a stage's metrics. `training`: the block says whether the run resumed (and from
    which step). `files`: {name: path} whose sha256 it records (e.g. model=data/train/model.pt)."""
    block = {
        "code": code_state(),
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in _PACKAGES}},
        "device": device_name(device),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "processes": processes,
        "platform": f"{platform.system()} {platform.machine()}",
    }
    if training:
        block["resumed"] = resumed_from_step is not None
        block["resumed_from_step"] = resumed_from_step
    block.update({f"{name}_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest() for name, path in files.items()})
    return block
