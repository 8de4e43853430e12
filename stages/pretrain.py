"""Stage `pretrain`: the model named by `model.name`, trained from scratch on the train split with `loss` (and
`ga` when switched on): on the query shards (task composed) or on every (image, caption) pair (task matching).

python -m stages.pretrain --shards data/shards --vocab data/vocab --out data/pretrain
"""
from __future__ import annotations

import argparse
from pathlib import Path

from stages import shards
from stages.atomic import staged_dir, write_json
from stages.cli import run_stage
from stages.loaders import decode_image, matching_batches, training_batches
from stages.modeling import ModelConfig, build_model, save_model
from stages.objectives import (GAConfig, LossConfig, check_ga_task, isotropic_noise, matching_loss, training_loss,
                               with_ga)
from stages.params import load, read_task
from stages.text import training_text
from stages.training import LoopConfig, file_digest, fingerprint, fit, pick_device, place_model, seed_everything


def image_size_of(shard_dir: Path, split: str) -> int:
    first = next(shards.iter_gallery(shard_dir, split))
    return decode_image(first[2]).shape[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--vocab", type=Path, required=True, help="the `vocabulary` stage's folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, help="where to write the run's steps and seconds (JSON)")
    args = parser.parse_args(argv)
    model_cfg, cfg = load(ModelConfig, "model"), load(LoopConfig, "pretrain")
    loss_cfg, ga, task = load(LossConfig, "loss"), load(GAConfig, "ga"), read_task()
    model_cfg.check_task(task)
    loss_cfg.check_model(model_cfg.name, cfg.batch_size, "pretrain")
    check_ga_task(ga, task)

    shards.read_index(args.shards)
    seed_everything(cfg.seed)
    tokenizer, word_vectors = training_text(model_cfg.text.encoder, args.vocab)
    image_size = image_size_of(args.shards, "train")
    device = pick_device(cfg.device)
    model = place_model(build_model(model_cfg, len(tokenizer), image_size, word_vectors=word_vectors), device)

    def step(model, batch):
        if task == "matching":
            return matching_loss(model, loss_cfg, tokenizer, batch, device)
        loss, _, _, logs = training_loss(model, loss_cfg, tokenizer, batch, device)
        return loss, logs

    key = fingerprint(task, model_cfg, cfg, loss_cfg, ga, file_digest(args.shards / "index.json"),
                      tokenizer.state_dict())
    with staged_dir(args.out, resume_key=key) as work:
        batches = (matching_batches if task == "matching" else training_batches)(
            args.shards, "train", cfg.batch_size, cfg.shuffle_buffer, cfg.seed, cfg.workers)
        summary = fit(model, batches, with_ga(step, ga), cfg, work, "pretrain", isotropic_noise(ga, cfg.seed))
        if args.metrics:
            write_json(args.metrics, {**summary, "cuda": int(device.type == "cuda")})
        save_model(work / "model.pt", model.cpu(), model_cfg, tokenizer.state_dict(), image_size)
    print(f"pretrain: {model_cfg.name} ({loss_cfg.name}) {summary['steps']} steps in {summary['seconds']} s "
          f"({summary['steps_per_s']} steps/s) on {device}, vocab {len(tokenizer)}, image {image_size}px "
          f"-> {args.out / 'model.pt'}")


if __name__ == "__main__":
    run_stage(main)
