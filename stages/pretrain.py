"""Stage `pretrain`: the baseline TIRG model, trained on the train-split query shards.

python -m stages.pretrain --shards data/shards --out data/pretrain
"""
from __future__ import annotations

import argparse
from pathlib import Path

from stages import shards
from stages.atomic import staged_dir
from stages.cli import run_stage
from stages.loaders import decode_image, texts, training_batches
from stages.modeling import ModelConfig, build_model, save_model
from stages.objectives import GAConfig, composed_and_target, isotropic_noise, metric_loss, with_ga
from stages.params import load
from stages.training import LoopConfig, file_digest, fingerprint, fit, pick_device, place_model, seed_everything
from stages.vocab import Vocab


def image_size_of(shard_dir: Path, split: str) -> int:
    first = next(shards.iter_gallery(shard_dir, split))
    return decode_image(first[2]).shape[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    model_cfg, cfg, ga = load(ModelConfig, "model"), load(LoopConfig, "pretrain"), load(GAConfig, "ga")

    shards.read_index(args.shards)
    seed_everything(cfg.seed)
    vocab = Vocab.build(texts(args.shards, "train"))
    image_size = image_size_of(args.shards, "train")
    device = pick_device(cfg.device)
    model = place_model(build_model(model_cfg, len(vocab), image_size), device)

    def step(model, batch):
        q, t = composed_and_target(model, vocab, batch, device)
        return metric_loss(cfg.loss, q, t), {"scale": model.normalize.scale.item()}

    key = fingerprint(model_cfg, cfg, ga, file_digest(args.shards / "index.json"))
    with staged_dir(args.out, resume_key=key) as work:
        batches = training_batches(args.shards, "train", cfg.batch_size, cfg.shuffle_buffer, cfg.seed, cfg.workers)
        summary = fit(model, batches, with_ga(step, ga), cfg, work, "pretrain", isotropic_noise(ga, cfg.seed))
        save_model(work / "model.pt", model.cpu(), model_cfg, vocab.state_dict(), image_size)
    print(f"pretrain: {summary['steps']} steps in {summary['seconds']} s ({summary['steps_per_s']} steps/s) "
          f"on {device}, vocab {len(vocab)}, image {image_size}px -> {args.out / 'model.pt'}")


if __name__ == "__main__":
    run_stage(main)
