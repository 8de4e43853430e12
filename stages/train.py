"""Stage `train`: the final model, fine-tuned from the pretrained one.

task composed: with `train.offline_negatives` the loss adds a hinge against hard negatives drawn from the
mined candidates of each query (`stages.mine`), on top of the in-batch metric loss.
task matching: with `train.offline_negatives` the loss is AOQ's (offline quintuplet + adaptive online terms,
`loss.aoq_*`) on the mined candidate lists; without, `loss.name` on the in-batch negatives.

python -m stages.train --init data/pretrain/model.pt --shards data/shards \
    --mined data/mined --out data/train
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from typing_extensions import Annotated

from models.losses import LOSSES
from models.losses.metric import offline_negative_hinge
from stages.common import distributed
from stages.shards import store
from stages.common.atomic import write_json
from stages.common.provenance import provenance
from stages.common.errors import StageError, run_stage
from stages.shards.loaders import decode_image, matching_batches
from stages.shards.pairs import check_pair_sampling, query_batches
from stages.training.aoq import AOQNegatives, aoq_batch_loss
from stages.retrieval.rerank import SIAM_FILE
from stages.training.siam import build_siam, save_siam, siam_step
from stages.retrieval.offline_candidates import CANDIDATES_FILE
from stages.retrieval.negatives import NEGATIVES_FILE, read_negatives
from stages.modeling.factory import ModelConfig, as_vector, load_model, save_model
from stages.training.objectives import (
    GAConfig,
    LossConfig,
    check_ga_task,
    isotropic_noise,
    matching_loss,
    random_streams,
    training_loss,
)
from stages.common.params import PARAMS_FILE, ParamsError, load, read_task, section
from stages.modeling.text import tokenizer_from_state
from stages.training.loop import LoopConfig, compile_model, file_digest, fingerprint, fit, output_dir, seed_everything
from stages.training.selection import check_selection, validator
from stages.common.device import autocast, pick_device, place_model, to_device
from stages.common.cli import stage_parser
from stages.common.validation import check_from


@section
class TrainConfig(LoopConfig):
    # the loss this stage trains with: same = loss.name, or another registered one (e.g. pretrain with info_nce as a
    # stand-in for pretrained features, then fine-tune with vse as VSE++ and AOQ do)
    loss_name: Literal[("same", *LOSSES)]
    offline_negatives: bool
    negatives_per_query: Annotated[int, Field(gt=0)]
    margin: Annotated[float, Field(ge=0)]
    negatives_weight: Annotated[float, Field(ge=0)]
    aoq_candidate_range: Annotated[int, Field(gt=0)]
    siam_steps: Annotated[int, Field(ge=0)]
    siam_lr: Annotated[float, Field(gt=0)]


class NegativeSampler:
    """Draws `per_query` of each query's mined candidates and decodes their images."""

    def __init__(self, candidates: dict[str, list[str]], images: dict[str, bytes], per_query: int, seed: int):
        self.candidates, self.images, self.per_query = candidates, images, per_query
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, query_ids: list[str]) -> torch.Tensor:
        """B x per_query x 3 x H x W."""
        picked = []
        for query_id in query_ids:
            pool = self.candidates.get(query_id)
            if not pool:
                raise StageError(f"no mined negatives for training query {query_id!r} (re-run `mine`?)")
            choice = torch.randint(len(pool), (self.per_query,), generator=self.generator).tolist()
            picked.append(torch.stack([decode_image(self.images[pool[i]]) for i in choice]))
        return torch.stack(picked)


def check_params(path, declared: dict | None = None) -> tuple[str, LossConfig]:
    """Every `train` param and how they fit the `model` and `loss` params (also run by the stages before it); returns
    the task and the loss config with `auto` resolved from the dataset's declaration."""
    cfg, loss_cfg = load(TrainConfig, "train", path), load(LossConfig, "loss", path)
    ga, task = load(GAConfig, "ga", path), read_task(path, declared)
    loss_cfg = loss_cfg.for_task(task)
    if cfg.loss_name != "same":
        loss_cfg = dataclasses.replace(loss_cfg, name=cfg.loss_name)
    check_ga_task(ga, task)
    check_pair_sampling(cfg, task, "train")
    check_selection(cfg.selection, task, "train")
    loss_cfg.check_model(load(ModelConfig, "model", path).for_task(task).name, cfg.batch_size, "train")
    if cfg.siam_steps and cfg.distributed.nproc_per_node > 1:
        raise ParamsError(f"{path}: train.siam_steps: SIAM trains in one process; "
                          "set train.distributed.nproc_per_node to 1 or train.siam_steps to 0")
    return task, loss_cfg


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "python -m stages.train --init data/pretrain/model.pt --shards data/shards "
                          "--mined data/mined --out data/train --metrics metrics/train.json",
                          "output directory: model.pt (+ siam.pt)")
    parser.add_argument("--init", type=Path, required=True, help="the pretrained checkpoint to fine-tune")
    parser.add_argument("--shards", type=store.location, required=True, help=store.LOCATION_HELP)
    parser.add_argument("--mined", type=Path, required=True, help="the `mine` stage's folder")
    parser.add_argument("--metrics", type=Path, help="where to write the run's steps and seconds (JSON)")
    parser.add_argument("--live", type=Path, help="dvclive folder, written as training goes (default: live/ in the "
                        "output, which appears only at the end)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    declared = store.read_evaluation(args.shards)
    check_from("train", args.params, declared)
    task, loss_cfg = check_params(args.params, declared)
    cfg, ga = load(TrainConfig, "train", args.params), load(GAConfig, "ga", args.params)
    if (code := distributed.relaunch_under_torchrun(cfg.distributed, "stages.train", argv)) is not None:
        sys.exit(code)

    seed_everything(cfg.seed)
    world = distributed.world_from_env()
    device = distributed.start(world, cfg.distributed, pick_device(cfg.device))
    model, model_cfg, text_state, image_size = load_model(args.init)
    model_cfg.check_task(task)
    loss_cfg.check_model(model_cfg.name, cfg.batch_size, "train")
    model, tokenizer = place_model(model, device), tokenizer_from_state(text_state)
    if cfg.compile:
        compile_model(model)
    mined = args.mined / (CANDIDATES_FILE if task == "matching" else NEGATIVES_FILE)
    validate = validator(cfg, task, "train", tokenizer, args.shards, device, declared)
    if task == "matching":
        train_matching(model, model_cfg, text_state, image_size, tokenizer, cfg, loss_cfg, ga, args, mined, device,
                       world, validate)
        return distributed.stop()
    sampler = None
    if cfg.offline_negatives:
        images = {image_id: data for image_id, _, data in store.iter_gallery(args.shards, "train")}
        sampler = NegativeSampler(read_negatives(mined), images, cfg.negatives_per_query, cfg.seed)

    def step(model, batch):
        loss, q, t, logs = training_loss(model, loss_cfg, tokenizer, batch, device, ga)
        logs["metric_loss"] = loss.item()
        if sampler is not None:
            negatives = sampler(batch["query_id"])
            b, k = negatives.shape[:2]
            with autocast(device):
                n = as_vector(model.encode_image(to_device(negatives.flatten(0, 1), device))).float().view(b, k, -1)
            hinge = offline_negative_hinge(q, t, n, cfg.margin)
            loss = loss + cfg.negatives_weight * hinge
            logs["negatives_hinge"] = hinge.item()
        return loss, logs

    mined_digest = file_digest(mined) if cfg.offline_negatives else None  # without: `mine` wrote nothing to read
    key = fingerprint(cfg, loss_cfg, ga, file_digest(args.init), mined_digest, store.index_digest(args.shards))
    with output_dir(args.out, key, world) as work:
        batches = query_batches(args.shards, task, distributed.local_batch(cfg.batch_size, "train"), cfg,
                                pin_memory=device.type == "cuda")
        noise = isotropic_noise(ga, cfg.seed)
        summary = fit(model, batches, step, cfg, work, "train", noise, validate, args.live,
                      generators=random_streams(isotropic_noise=noise, offline_negatives=sampler))
        resumed_from = summary.pop("resumed_from_step")
        if world.main:
            save_model(work / "model.pt", model.cpu(), model_cfg, text_state, image_size)
            if args.metrics:
                write_json(args.metrics, {**summary, "cuda": int(device.type == "cuda"), "processes": world.size,
                                          "provenance": provenance(device, world.size, resumed_from, training=True,
                                                                   model=work / "model.pt")})
    distributed.stop()
    if not world.main:
        return
    negatives = f"{cfg.negatives_per_query} mined negatives/query" if sampler else "no mined negatives"
    print(f"train: {summary['steps']} steps in {summary['seconds']} s ({summary['steps_per_s']} steps/s) "
          f"on {device}, {negatives} -> {args.out / 'model.pt'}")


def train_matching(model, model_cfg, text_state, image_size, tokenizer, cfg, loss_cfg, ga, args, mined, device,
                   world, validate):
    negatives = AOQNegatives(mined, args.shards, cfg.aoq_candidate_range, cfg.seed) if cfg.offline_negatives else None

    def step(model, batch):
        if negatives is not None:
            return aoq_batch_loss(model, negatives, loss_cfg, tokenizer, batch, device)
        return matching_loss(model, loss_cfg, tokenizer, batch, device)

    key = fingerprint("matching", cfg, loss_cfg, ga, file_digest(args.init),
                      file_digest(mined) if cfg.offline_negatives else None,
                      store.index_digest(args.shards))
    with output_dir(args.out, key, world) as work:
        loaded = (work / "model.pt").is_file()
        if loaded:  # a crash during SIAM training: the dual encoder is done
            model.load_state_dict(torch.load(work / "model.pt", map_location=device, weights_only=True)["model"])
            summary = json.loads((work / "summary.json").read_text())
        else:
            batches = matching_batches(args.shards, "train", distributed.local_batch(cfg.batch_size, "train"),
                                       cfg.shuffle_buffer, cfg.seed, cfg.workers, pin_memory=device.type == "cuda")
            noise = isotropic_noise(ga, cfg.seed)
            summary = fit(model, batches, step, cfg, work, "train", noise, validate, args.live,
                          generators=random_streams(isotropic_noise=noise, aoq_negatives=negatives))
            if not world.main:
                return
            write_json(work / "summary.json", summary)
            save_model(work / "model.pt", model, model_cfg, text_state, image_size)
        resumed_from = summary.pop("resumed_from_step")
        if loaded:
            resumed_from = cfg.steps
        if cfg.siam_steps:
            summary["siam_seconds"], siam_from = train_siam(model, tokenizer, image_size, cfg, loss_cfg, args.shards,
                                                            work, device)
            if siam_from is not None:  # SIAM's steps count on from the dual encoder's
                resumed_from = cfg.steps + siam_from
        if args.metrics:
            files = {"model": work / "model.pt", **({"siam": work / SIAM_FILE} if cfg.siam_steps else {})}
            write_json(args.metrics, {**summary, "cuda": int(device.type == "cuda"), "processes": world.size,
                                      "provenance": provenance(device, world.size, resumed_from, training=True,
                                                               **files)})
    loss = f"AOQ {loss_cfg.aoq_variant} (offline range {cfg.aoq_candidate_range})" if negatives else loss_cfg.name
    siam = f", SIAM {cfg.siam_steps} steps" if cfg.siam_steps else ""
    print(f"train: matching, {loss}, {summary['steps']} steps in {summary['seconds']} s "
          f"({summary['steps_per_s']} steps/s) on {device}{siam} -> {args.out / 'model.pt'}")


def train_siam(model, tokenizer, image_size: int, cfg: TrainConfig, loss_cfg, shard_dir: Path, work: Path,
               device) -> tuple[float, int | None]:
    """SIAM on the frozen dual encoder (the release's optimiser: Adam, weight decay 1e-4) -> work/siam.pt;
    (seconds, the SIAM step it resumed from or None)."""
    model.requires_grad_(False).eval()
    seed_everything(cfg.seed + 1)  # SIAM's init and stream: a function of the seed, whether or not the DE run resumed
    siam = build_siam(model, image_size, device)
    siam_cfg = dataclasses.replace(cfg, steps=cfg.siam_steps, lr=cfg.siam_lr, optimizer="adam", weight_decay=1e-4,
                                   lr_decay_every=0, lr_schedule="step", selection="last", eval_every=0, ema_decay=0.0,
                                   ema_as_released_every=0)
    batches = matching_batches(shard_dir, "train", cfg.batch_size, cfg.shuffle_buffer, cfg.seed + 1, cfg.workers)
    (work / "siam").mkdir(exist_ok=True)
    summary = fit(siam, batches, lambda s, b: siam_step(model, s, tokenizer, loss_cfg.nce_tau, b, device), siam_cfg,
                  work / "siam", "siam")
    save_siam(work / SIAM_FILE, siam.cpu())
    return summary["seconds"], summary["resumed_from_step"]


if __name__ == "__main__":
    run_stage(main)
