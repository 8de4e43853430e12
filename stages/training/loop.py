"""The training loop shared by `pretrain` and `train`: device, optimiser, resumable checkpoints, logging.

Data (stages.shards.loaders) and models (models/) stay out of this file; a stage hands in a `step_fn`
that turns one batch into a loss.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
import time
import warnings
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

from torch.nn.parallel import DistributedDataParallel

from stages.training.ema import EMA
from stages.training.selection import SELECTIONS
from stages.common import distributed
from stages.common.atomic import atomic_path, partial_dir, staged_dir
from stages.common.distributed import DistributedConfig
from stages.common.errors import StageError
from stages.common.device import DeviceName
from stages.common.params import ParamsError, require, section

PositiveInt = Annotated[int, Field(gt=0)]


@section
class LoopConfig:
    seed: int
    steps: Annotated[int, Field(ge=0)]  # train: 0 = no fine-tuning, the pretrained weights are the model
    batch_size: Annotated[int, Field(gt=1)]
    lr: Annotated[float, Field(gt=0)]
    momentum: Annotated[float, Field(ge=0, lt=1)]
    weight_decay: Annotated[float, Field(ge=0)]
    lr_decay_every: Annotated[int, Field(ge=0)]
    lr_decay: Annotated[float, Field(gt=0, le=1)]
    # adam: VAL, AMC, VSE++, AOQ (momentum unused) | adam_two_towers: guided image retrieval's DE, one Adam per tower
    # (image tower at lr, text tower at text_lr), each stepped in its own pass over the batch (the release's
    # PyTorch Lightning 1.5 loop with two optimisers: pass 1 steps the image tower, pass 2 the text tower)
    optimizer: Literal["sgd", "adam", "adam_two_towers"]
    text_lr: Annotated[float, Field(ge=0)]  # adam_two_towers: the text tower's learning rate
    # step: x lr_decay every lr_decay_every steps | cosine_per_pass: CosineAnnealingLR(T_max=cosine_t_max) of every
    # optimiser stepped on every pass, before its backward (the DE release calls scheduler.step() in training_step)
    # cosine: from lr to 0 over the run, stepped once per step (CosineAnnealingLR, T_max = steps)
    lr_schedule: Literal["step", "cosine", "cosine_per_pass"]
    cosine_t_max: Annotated[int, Field(gt=0)]
    clip_grad_norm: Annotated[float, Field(ge=0)]  # clip the stepped parameters' gradient norm to this; 0 = off
    # validation recall on validation_split every eval_every steps and at the end, logged as metrics and plots
    # (stages.training.selection); 0 = none
    eval_every: Annotated[int, Field(ge=0)]
    # last: the last weights are the model | a validation metric: the weights with its best value (composed:
    # val_r1, val_r5, val_r10, val_r50, val_r10_r50; matching: val_rsum, val_r1_r5)
    selection: Literal[SELECTIONS]
    validation_split: str  # auto: the split the dataset declares for validation (shapes, shapes_captions: val)
    ema_decay: Annotated[float, Field(ge=0, lt=1)]  # EMA of the weights, saved as the model; 0 = off
    ema_as_released_every: Annotated[int, Field(ge=0)]  # AMC quirk: every N steps train on from the EMA weights
    shuffle_buffer: Annotated[int, Field(ge=0)]
    # shuffled: the manifest's queries, shuffled | per_iteration: drawn afresh each step, two edits per reference,
    # as TIRG's CSS3D / MIT-States loaders do (stages.shards.pairs)
    pair_sampling: Literal["shuffled", "per_iteration"]
    workers: Annotated[int, Field(ge=0)]
    device: DeviceName
    checkpoint_every: PositiveInt
    log_every: PositiveInt
    distributed: DistributedConfig  # processes (torchrun); batch_size is the global batch
    compile: bool  # torch.compile each part of the model (encoders, composition): slower start, faster steps

    def __post_init__(self):
        require(self.ema_as_released_every == 0 or self.ema_decay > 0, "ema_as_released_every",
                "needs ema_decay > 0")
        require(self.selection == "last" or self.eval_every > 0, "selection",
                f"{self.selection} keeps the best validated weights: set eval_every > 0")
        require(self.selection == "last" or self.ema_decay == 0, "selection",
                f"{self.selection} picks among the trained weights; it cannot be combined with ema_decay > 0")


def compile_model(model: torch.nn.Module, **options) -> torch.nn.Module:
    """torch.compile every part of the model in place (through ModuleList / ModuleDict, which are never
    called). The models are called through encode_* and compose, which never run the model's own forward,
    so compiling the top module would do nothing."""
    for child in model.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            compile_model(child, **options)
        else:
            child.compile(**options)
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def random_state(generators: dict[str, torch.Generator]) -> dict:
    """Every random stream of this process a training step can draw from: python's, numpy's, torch's (CPU and each
    CUDA device) global RNGs and the stage's own generators (GA's noise, drawn negatives)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": position,
                      "has_gauss": has_gauss, "cached": cached},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "generators": {name: g.get_state() for name, g in generators.items()}}


def restore_random_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    """The streams as random_state saw them; a generator the checkpoint lacks (or has in excess) is an error."""
    if set(state["generators"]) != set(generators):
        raise ValueError(f"the checkpoint's random streams {sorted(state['generators'])} are not this run's "
                         f"{sorted(generators)}")
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])


def fingerprint(*parts: object) -> str:
    """A short hash of everything a run depends on, naming its resumable work directory."""
    text = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_optimizer(model: torch.nn.Module, cfg: LoopConfig):
    """(optimiser, scheduler) of a one-optimiser config (sgd | adam); see make_optimizers."""
    pairs = make_optimizers(model, cfg)
    if len(pairs) != 1:
        raise ValueError(f"optimizer {cfg.optimizer!r} has {len(pairs)} optimisers; use make_optimizers")
    return pairs[0]


def make_optimizers(model: torch.nn.Module, cfg: LoopConfig,
                    section: str = "pretrain") -> list[tuple[torch.optim.Optimizer, object]]:
    """[(optimiser, scheduler)], one pair per pass over each batch: one for sgd / adam, two for adam_two_towers."""
    params = [p for p in model.parameters() if p.requires_grad]  # frozen encoders (MiniLM) stay out
    if cfg.optimizer == "adam_two_towers":
        if not hasattr(model, "tower_parameters"):
            raise ParamsError(f"{section}.optimizer: adam_two_towers needs a model with an image and a text tower "
                              f"(dual_encoder), not {type(model).__name__}")
        image, text = model.tower_parameters()
        groups = [(image, cfg.lr), (text, cfg.text_lr)]
        optimizers = [torch.optim.Adam([p for p in group if p.requires_grad], lr=lr, weight_decay=cfg.weight_decay)
                      for group, lr in groups]
    elif cfg.optimizer == "adam":
        optimizers = [torch.optim.Adam(params, lr=cfg.lr, eps=1e-8, weight_decay=cfg.weight_decay)]
    else:
        optimizers = [torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)]
    if cfg.lr_schedule == "cosine_per_pass":
        return [(o, torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=cfg.cosine_t_max)) for o in optimizers]
    if cfg.lr_schedule == "cosine":
        return [(o, torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(cfg.steps, 1))) for o in optimizers]
    step_size = cfg.lr_decay_every or cfg.steps + 1  # 0 = constant learning rate
    return [(o, torch.optim.lr_scheduler.StepLR(o, step_size=step_size, gamma=cfg.lr_decay)) for o in optimizers]


def output_dir(out: Path, key: str, world: distributed.World):
    """A training stage's resumable output directory (stages.common.atomic.staged_dir); on several processes only
    rank 0 writes (output, checkpoints, logs, metrics), the others are handed the same path."""
    return staged_dir(out, resume_key=key) if world.main else contextlib.nullcontext(partial_dir(out, key))


def saved_curves(live_dir: Path) -> dict[str, str]:
    """The dvclive folder's files (curves and their summary), by path relative to it: kept in each checkpoint."""
    return {path.relative_to(live_dir).as_posix(): path.read_text()
            for path in sorted(live_dir.rglob("*")) if path.is_file()} if live_dir.exists() else {}


def restore_curves(live_dir: Path, curves: dict[str, str]) -> None:
    """The live folder as it was at the checkpoint: DVC removes a stage's outputs before it runs the stage again
    (the folder is a cached output so that the run-cache and `dvc pull` restore it), and rows a crashed run
    logged after its checkpoint are redone by the resumed run."""
    if live_dir.exists():
        shutil.rmtree(live_dir)
    for relative, text in curves.items():
        (live_dir / relative).parent.mkdir(parents=True, exist_ok=True)
        (live_dir / relative).write_text(text)


class _Step(torch.nn.Module):
    """The step function as a module's forward, so that DistributedDataParallel sees the forward pass
    (the models are called through encode_*/compose, not through their own forward)."""

    def __init__(self, model: torch.nn.Module, step_fn):
        super().__init__()
        self.model, self.step_fn = model, step_fn

    def forward(self, batch: dict):
        return self.step_fn(self.model, batch)


def data_parallel(model: torch.nn.Module, step_fn) -> Callable[[dict], tuple[torch.Tensor, dict[str, float]]]:
    """batch -> (loss, logs); on several processes the gradients are averaged over them by DDP."""
    if distributed.size() == 1:
        return lambda batch: step_fn(model, batch)
    device = next(model.parameters()).device
    # find_unused_parameters: a model may leave parts unused in a step (e.g. a loss that skips a decoder)
    ddp = DistributedDataParallel(_Step(model, step_fn), device_ids=[device] if device.type == "cuda" else None,
                                  find_unused_parameters=True)
    return ddp


def fit(
    model: torch.nn.Module,
    batches: Iterator[dict],
    step_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]],
    cfg: LoopConfig,
    work_dir: Path,
    name: str,
    after_backward: Callable[[torch.nn.Module], None] | None = None,
    validate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    live_dir: Path | None = None,
    generators: dict[str, torch.Generator] | None = None,
) -> dict[str, float]:
    """Run cfg.steps optimiser steps; resume from `work_dir/resume.pt` when a crashed run left one.

    A resumed run ends with the same bytes as an uninterrupted one: the checkpoint holds the weights, optimisers,
    schedulers, EMA, selection, curves, the running loss, every random stream of every process (random_state, with
    `generators`, the stage's own: GA's noise, drawn negatives) and the position of `batches`.
    `batches` is a stream with state_dict / load_state_dict (stages.shards.resumable), or a plain iterator that the
    caller has already placed at the checkpoint's step (tests).
    Logs loss, learning rate and validation scores with dvclive under `live_dir` (default `work_dir/live`), as they
    come: a stage gives a folder outside its staged output, so `dvc plots show` reads the curves while it runs; a
    fresh run starts the folder anew, a resumed one continues the curves its checkpoint holds.
    Returns a one-line summary (steps run here, seconds, the last validation, resumed_from_step: None or the
    checkpoint's step).
    `after_backward(model)` runs between backward and the optimiser step (e.g. GA's isotropic noise).
    `validate(model)` (None: no validation) scores the weights every cfg.eval_every steps and at the end,
    {metric: score}, higher is better; with cfg.selection other than "last", the weights with the best score of
    that name are the model at the end.
    """
    if cfg.selection != "last" and validate is None:
        raise ValueError(f"selection {cfg.selection!r} needs a validate function")
    if cfg.eval_every == 0 and validate is not None:
        raise ValueError("eval_every 0: validate would never be called")
    live_dir = Path(live_dir) if live_dir is not None else work_dir / "live"
    optimizers = make_optimizers(model, cfg, name)
    optimizer = optimizers[0][0]
    selected = {"score": float("-inf"), "step": 0, "weights": None}
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    main = distributed.rank() == 0
    resume_file = work_dir / "resume.pt"
    start, loss_count, scores = 0, 0, {}
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64)
    # rank 0 reads the checkpoint and hands it to the others; each takes its own streams from it
    state = torch.load(resume_file, map_location="cpu", weights_only=True) if main and resume_file.exists() else None
    state = distributed.broadcast(state)
    generators = dict(generators or {})
    if state is not None:
        if "ranks" not in state:  # written by cirflow before checkpoints held every stream
            raise StageError(f"{resume_file}: a checkpoint of an older cirflow (no data position or random streams): "
                             f"its run cannot go on as an uninterrupted one would; delete {work_dir} to start afresh")
        if len(state["ranks"]) != distributed.size():
            raise StageError(f"{resume_file}: a checkpoint of a run on {len(state['ranks'])} process(es), resumed "
                             f"on {distributed.size()}: each process's data and random streams are its own")
        model.load_state_dict(state["model"])
        for (o, sched), o_state, s_state in zip(optimizers, state["optimizers"], state["schedulers"]):
            o.load_state_dict(o_state)
            sched.load_state_dict(s_state)
        selected = state["selected"]
        if ema is not None:
            ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
        start = state["step"]
        mine = state["ranks"][distributed.rank()]
        restore_random_state(mine["random"], generators)
        if hasattr(batches, "load_state_dict"):
            batches.load_state_dict(mine["data"])
        loss_sum, loss_count, scores = state["loss_sum"], state["loss_count"], state["scores"]
        if main:
            restore_curves(live_dir, state["curves"])
            print(f"{name}: resuming at step {start} from {resume_file}")
    if main and start == 0 and live_dir.exists():  # a new run: the curves of an earlier one go
        shutil.rmtree(live_dir)
    live = Live(dir=str(live_dir), resume=start > 0, dvcyaml=False, save_dvc_exp=False, report=None) if main else None
    if main:  # the stage's declared plots folder exists even when nothing is logged (train.steps 0)
        (live_dir / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
    model.train()
    step_once = data_parallel(model, step_fn)
    # the running loss stays on the device and is read at log and checkpoint steps only: reading it
    # every step would make the host wait for the GPU each step
    began, loss_sum = time.time(), loss_sum.to(device)
    progress = tqdm(range(start, cfg.steps), desc=name, initial=start, total=cfg.steps, mininterval=2, disable=not main)
    for step in progress:
        batch = next(batches)
        for i, (stepped, _) in enumerate(optimizers):  # one pass per optimiser, on the same batch
            pass_loss, pass_logs = step_once(batch)
            if cfg.lr_schedule == "cosine_per_pass":
                with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": the release's order
                    warnings.simplefilter("ignore", UserWarning)
                    for _, sched in optimizers:
                        sched.step()
            model.zero_grad(set_to_none=True)
            pass_loss.backward()
            if after_backward is not None:
                after_backward(model)
            if cfg.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for g in stepped.param_groups for p in g["params"]], cfg.clip_grad_norm)
            stepped.step()
            if i == 0:
                loss, logs = pass_loss, pass_logs  # logged: the loss before this step's updates
        if cfg.lr_schedule in ("step", "cosine"):
            for _, sched in optimizers:
                sched.step()
        if ema is not None:
            ema.update()
            if cfg.ema_as_released_every and (step + 1) % cfg.ema_as_released_every == 0:
                ema.apply_shadow()  # and never restore(): the release's per-epoch behaviour
                ema.backup = {}
        loss_sum, loss_count = loss_sum + loss.detach().double(), loss_count + 1
        log_now = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        checkpoint_now = (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps
        if validate is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            model.eval()
            scores = distributed.broadcast(validate(model) if main else None)
            model.train()
            if cfg.selection != "last" and scores[cfg.selection] > selected["score"]:
                selected = {"score": scores[cfg.selection], "step": step + 1,
                            "weights": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
            if main:
                live.step = step + 1
                for metric, value in scores.items():
                    live.log_metric(metric, value)
                tqdm.write(f"{name}: step {step + 1} " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
        if not (log_now or checkpoint_now):
            continue
        if not torch.isfinite(loss_sum):  # before a checkpoint or the saved model can hold it
            raise FloatingPointError(f"{name}: loss became {loss_sum.item()} by step {step + 1} "
                                     f"(checked every log_every / checkpoint_every steps; lower the learning rate?)")
        if log_now:
            mean_loss = distributed.mean_over_ranks(loss_sum.item() / loss_count)
            if main:
                live.step = step + 1
                live.log_metric("loss", mean_loss)
                live.log_metric("lr", optimizer.param_groups[0]["lr"])
                for key, value in logs.items():
                    live.log_metric(key, value)
                live.next_step()
                progress.set_postfix(loss=f"{mean_loss:.3f}")
            loss_sum, loss_count = torch.zeros_like(loss_sum), 0
        if checkpoint_now:  # every process's streams, gathered in rank order (a collective: all ranks are here)
            ranks = distributed.gather_objects([{"random": random_state(generators),
                                                 "data": batches.state_dict() if hasattr(batches, "state_dict") else None}])
        if main and checkpoint_now:
            with atomic_path(resume_file) as tmp:
                torch.save({"model": model.state_dict(), "optimizers": [o.state_dict() for o, _ in optimizers],
                            "schedulers": [sched.state_dict() for _, sched in optimizers],
                            "step": step + 1, "selected": selected, "ema": ema.shadow if ema is not None else None,
                            "curves": saved_curves(live_dir), "loss_sum": loss_sum.cpu(), "loss_count": loss_count,
                            "scores": scores, "ranks": ranks}, tmp)
    if main:
        live.end()
    if ema is not None:  # the averaged weights are the model that is saved and evaluated
        ema.apply_shadow()
        ema.backup = {}
    if selected["weights"] is not None:
        model.load_state_dict(selected["weights"])
    if main and resume_file.exists():
        resume_file.unlink()
    seconds = time.time() - began
    summary = {"steps": cfg.steps - start, "seconds": round(seconds, 1),
               "steps_per_s": round((cfg.steps - start) / max(seconds, 1e-9), 2),
               "resumed_from_step": start or None}
    summary.update({metric: round(value, 2) for metric, value in scores.items()})  # the last validation
    if cfg.selection != "last":
        summary.update(selected_step=selected["step"], **{f"selected_{cfg.selection}": round(selected["score"], 2)})
    return summary
