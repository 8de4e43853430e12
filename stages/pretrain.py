"""Stage `pretrain`: the model named by `model.name`, trained from scratch on the train split with `loss` (and
`ga` when switched on): on the query shards (task composed) or on every (image, caption) pair (task matching).

python -m stages.pretrain --shards data/shards --vocab data/vocab --out data/pretrain
"""
from __future__ import annotations

import sys
from pathlib import Path

from stages.common import distributed
from stages.shards import store
from stages.common.atomic import write_json
from stages.common.provenance import provenance
from stages.common.errors import run_stage
from stages.shards.loaders import decode_image
from stages.shards.pairs import check_pair_sampling, query_batches
from stages.modeling.factory import ModelConfig, build_model, save_model
from stages.training.objectives import (
    GAConfig,
    LossConfig,
    check_ga_task,
    isotropic_noise,
    matching_loss,
    random_streams,
    training_loss,
)
from stages.common.params import ParamsError, load, read_task
from stages.modeling.text import training_text
from stages.training.loop import LoopConfig, compile_model, fingerprint, fit, output_dir, seed_everything
from stages.training.selection import check_selection, validator
from stages.common.device import pick_device, place_model
from stages.common.cli import stage_parser
from stages.common.validation import check_from


def image_size_of(shard_dir: Path, split: str) -> int:
    first = next(store.iter_gallery(shard_dir, split))
    return decode_image(first[2]).shape[-1]


def check_params(path, declared: dict | None = None) -> tuple[str, ModelConfig, LossConfig]:
    """Every `pretrain` param and how they fit together (also run by the stages before it); returns the task and
    the model and loss configs with `auto` resolved from the dataset's declaration."""
    model_cfg, cfg = load(ModelConfig, "model", path), load(LoopConfig, "pretrain", path)
    loss_cfg, ga, task = load(LossConfig, "loss", path), load(GAConfig, "ga", path), read_task(path, declared)
    model_cfg, loss_cfg = model_cfg.for_task(task), loss_cfg.for_task(task)
    loss_cfg.check_model(model_cfg.name, cfg.batch_size, "pretrain")
    check_ga_task(ga, task)
    check_pair_sampling(cfg, task, "pretrain")
    check_selection(cfg.selection, task, "pretrain")
    if cfg.steps == 0:
        raise ParamsError(f"{path}: pretrain.steps: must be > 0 (train.steps may be 0)")
    return task, model_cfg, loss_cfg


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, "python -m stages.pretrain --shards data/shards --vocab data/vocab "
                          "--out data/pretrain --metrics metrics/pretrain.json",
                          "output directory: model.pt")
    parser.add_argument("--shards", type=store.location, required=True, help=store.LOCATION_HELP)
    parser.add_argument("--vocab", type=Path, required=True, help="the `vocabulary` stage's folder")
    parser.add_argument("--metrics", type=Path, help="where to write the run's steps and seconds (JSON)")
    parser.add_argument("--live", type=Path, help="dvclive folder, written as training goes (default: live/ in the "
                        "output, which appears only at the end)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    declared = store.read_evaluation(args.shards)
    check_from("pretrain", args.params, declared)
    task, model_cfg, loss_cfg = check_params(args.params, declared)
    cfg = load(LoopConfig, "pretrain", args.params)
    if (code := distributed.relaunch_under_torchrun(cfg.distributed, "stages.pretrain", argv)) is not None:
        sys.exit(code)
    ga = load(GAConfig, "ga", args.params)

    store.read_index(args.shards)
    seed_everything(cfg.seed)
    tokenizer, word_vectors = training_text(model_cfg.text.encoder, args.vocab)
    image_size = image_size_of(args.shards, "train")
    world = distributed.world_from_env()
    device = distributed.start(world, cfg.distributed, pick_device(cfg.device))
    batch_size = distributed.local_batch(cfg.batch_size, "pretrain")
    model = place_model(build_model(model_cfg, len(tokenizer), image_size, word_vectors=word_vectors), device)
    if cfg.compile:
        compile_model(model)

    def step(model, batch):
        if task == "matching":
            return matching_loss(model, loss_cfg, tokenizer, batch, device)
        loss, _, _, logs = training_loss(model, loss_cfg, tokenizer, batch, device, ga)
        return loss, logs

    validate = validator(cfg, task, "pretrain", tokenizer, args.shards, device, declared)
    key = fingerprint(task, model_cfg, cfg, loss_cfg, ga, store.index_digest(args.shards),
                      tokenizer.state_dict())
    with output_dir(args.out, key, world) as work:
        batches = query_batches(args.shards, task, batch_size, cfg, pin_memory=device.type == "cuda")
        noise = isotropic_noise(ga, cfg.seed)
        summary = fit(model, batches, step, cfg, work, "pretrain", noise, validate, args.live if world.main else None,
                      generators=random_streams(isotropic_noise=noise))
        resumed_from = summary.pop("resumed_from_step")
        if world.main:
            save_model(work / "model.pt", model.cpu(), model_cfg, tokenizer.state_dict(), image_size)
            if args.metrics:
                write_json(args.metrics, {**summary, "cuda": int(device.type == "cuda"), "processes": world.size,
                                          "provenance": provenance(device, world.size, resumed_from, training=True,
                                                                   model=work / "model.pt")})
    distributed.stop()
    if not world.main:
        return
    print(f"pretrain: {model_cfg.name} ({loss_cfg.name}) {summary['steps']} steps in {summary['seconds']} s "
          f"({summary['steps_per_s']} steps/s) on {world.size} x {device}, vocab {len(tokenizer)}, image {image_size}px "
          f"-> {args.out / 'model.pt'}")


if __name__ == "__main__":
    run_stage(main)
