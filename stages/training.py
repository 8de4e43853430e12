"""The training loop shared by `pretrain` and `train`: device, optimiser, resumable checkpoints, logging.

Data (stages.loaders) and models (models/) stay out of this file; a stage hands in a `step_fn`
that turns one batch into a loss.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from dvclive import Live
from pydantic import Field
from tqdm import tqdm
from typing_extensions import Annotated

from models.amc import EMA
from stages.atomic import atomic_path
from stages.params import require, section

PositiveInt = Annotated[int, Field(gt=0)]
DeviceName = Literal["auto", "cpu", "cuda"]


@section
class LoopConfig:
    seed: int
    steps: PositiveInt
    batch_size: Annotated[int, Field(gt=1)]
    lr: Annotated[float, Field(gt=0)]
    momentum: Annotated[float, Field(ge=0, lt=1)]
    weight_decay: Annotated[float, Field(ge=0)]
    lr_decay_every: Annotated[int, Field(ge=0)]
    lr_decay: Annotated[float, Field(gt=0, le=1)]
    optimizer: Literal["sgd", "adam"]  # adam: VAL and AMC (momentum unused)
    ema_decay: Annotated[float, Field(ge=0, lt=1)]  # EMA of the weights, saved as the model; 0 = off
    ema_as_released_every: Annotated[int, Field(ge=0)]  # AMC quirk: every N steps train on from the EMA weights
    shuffle_buffer: Annotated[int, Field(ge=0)]
    workers: Annotated[int, Field(ge=0)]
    device: DeviceName
    checkpoint_every: PositiveInt
    log_every: PositiveInt

    def __post_init__(self):
        require(self.ema_as_released_every == 0 or self.ema_decay > 0, "ema_as_released_every",
                "needs ema_decay > 0")


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but torch sees no CUDA device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


def place_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fingerprint(*parts: object) -> str:
    """A short hash of everything a run depends on, naming its resumable work directory."""
    text = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig):
    params = [p for p in model.parameters() if p.requires_grad]  # frozen encoders (MiniLM) stay out
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=cfg.lr, eps=1e-8, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    step_size = cfg.lr_decay_every or cfg.steps + 1  # 0 = constant learning rate
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=cfg.lr_decay)
    return optimizer, scheduler


def save_checkpoint(path: Path, model: torch.nn.Module, extra: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), **extra}, tmp)


def forget_logs_after(live_dir: Path, step: int) -> None:
    """Drop the dvclive rows a crashed run logged after its last checkpoint; the resumed run redoes them."""
    for tsv in (live_dir / "plots" / "metrics").glob("**/*.tsv"):
        header, *rows = tsv.read_text().splitlines()
        kept = [row for row in rows if int(row.split("\t")[0]) <= step]
        with atomic_path(tsv) as tmp:
            tmp.write_text("\n".join([header, *kept]) + "\n")


def fit(
    model: torch.nn.Module,
    batches: Iterator[dict],
    step_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]],
    cfg: LoopConfig,
    work_dir: Path,
    name: str,
    after_backward: Callable[[torch.nn.Module], None] | None = None,
) -> dict[str, float]:
    """Run cfg.steps optimiser steps; resume from `work_dir/resume.pt` when a crashed run left one.

    Logs loss and learning rate with dvclive under `work_dir/live`; returns a one-line summary.
    `after_backward(model)` runs between backward and the optimiser step (e.g. GA's isotropic noise).
    """
    optimizer, scheduler = make_optimizer(model, cfg)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    resume_file = work_dir / "resume.pt"
    start = 0
    if resume_file.exists():
        state = torch.load(resume_file, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.shadow = {k: v.to(next(model.parameters()).device) for k, v in state["ema"].items()}
        torch.set_rng_state(state["rng"])
        start = state["step"]
        forget_logs_after(work_dir / "live", start)
        print(f"{name}: resuming at step {start} from {resume_file}")
    live = Live(dir=str(work_dir / "live"), resume=start > 0, dvcyaml=False, save_dvc_exp=False, report=None)
    model.train()
    began, loss_sum, loss_count = time.time(), 0.0, 0
    progress = tqdm(range(start, cfg.steps), desc=name, initial=start, total=cfg.steps, mininterval=2)
    for step in progress:
        loss, logs = step_fn(model, next(batches))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss became {loss.item()} at step {step} (lower the learning rate?)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update()
            if cfg.ema_as_released_every and (step + 1) % cfg.ema_as_released_every == 0:
                ema.apply_shadow()  # and never restore(): the release's per-epoch behaviour
                ema.backup = {}
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            live.step = step + 1
            live.log_metric("loss", loss_sum / loss_count)
            live.log_metric("lr", optimizer.param_groups[0]["lr"])
            for key, value in logs.items():
                live.log_metric(key, value)
            live.next_step()
            progress.set_postfix(loss=f"{loss_sum / loss_count:.3f}")
            loss_sum, loss_count = 0.0, 0
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            with atomic_path(resume_file) as tmp:
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": step + 1,
                            "ema": ema.shadow if ema is not None else None}, tmp)
    live.end()
    if ema is not None:  # the averaged weights are the model that is saved and evaluated
        ema.apply_shadow()
        ema.backup = {}
    if resume_file.exists():
        resume_file.unlink()
    seconds = time.time() - began
    return {"steps": cfg.steps - start, "seconds": round(seconds, 1),
            "steps_per_s": round((cfg.steps - start) / max(seconds, 1e-9), 2)}
