"""Checkpoint files: written atomically, so a crash never leaves a half file that a later stage loads."""
from __future__ import annotations

from pathlib import Path

import torch

from stages.common.atomic import atomic_path


def save_checkpoint(path: Path, model: torch.nn.Module, extra: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), **extra}, tmp)
