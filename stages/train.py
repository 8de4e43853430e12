"""Stage `train`: the final model, fine-tuned from the pretrained one.

With `train.offline_negatives` the loss adds a hinge against hard negatives drawn from the mined
candidates of each query (`stages.mine`), on top of the in-batch metric loss.

python -m stages.train --init data/pretrain/model.pt --shards data/shards \
    --negatives data/mined/negatives.parquet --out data/train
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from pydantic import Field
from typing_extensions import Annotated

from models.losses import offline_negative_hinge
from stages import shards
from stages.atomic import staged_dir, write_json
from stages.cli import StageError, run_stage
from stages.loaders import decode_image, training_batches
from stages.mine import read_negatives
from stages.modeling import as_vector, load_model, save_model
from stages.objectives import GAConfig, LossConfig, isotropic_noise, training_loss, with_ga
from stages.params import load, section
from stages.text import tokenizer_from_state
from stages.training import (LoopConfig, autocast, file_digest, fingerprint, fit, pick_device, place_model,
                             seed_everything, to_device)


@section
class TrainConfig(LoopConfig):
    offline_negatives: bool
    negatives_per_query: Annotated[int, Field(gt=0)]
    margin: Annotated[float, Field(ge=0)]
    negatives_weight: Annotated[float, Field(ge=0)]


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", type=Path, required=True, help="pretrained checkpoint")
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--negatives", type=Path, required=True, help="mined candidates (Parquet)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, help="where to write the run's steps and seconds (JSON)")
    args = parser.parse_args(argv)
    cfg, loss_cfg, ga = load(TrainConfig, "train"), load(LossConfig, "loss"), load(GAConfig, "ga")

    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model, model_cfg, text_state, image_size = load_model(args.init)
    loss_cfg.check_model(model_cfg.name, cfg.batch_size, "train")
    model, tokenizer = place_model(model, device), tokenizer_from_state(text_state)
    sampler = None
    if cfg.offline_negatives:
        images = {image_id: data for image_id, _, data in shards.iter_gallery(args.shards, "train")}
        sampler = NegativeSampler(read_negatives(args.negatives), images, cfg.negatives_per_query, cfg.seed)

    def step(model, batch):
        loss, q, t, logs = training_loss(model, loss_cfg, tokenizer, batch, device)
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

    key = fingerprint(cfg, loss_cfg, ga, file_digest(args.init), file_digest(args.negatives), file_digest(args.shards / "index.json"))
    with staged_dir(args.out, resume_key=key) as work:
        batches = training_batches(args.shards, "train", cfg.batch_size, cfg.shuffle_buffer, cfg.seed, cfg.workers)
        summary = fit(model, batches, with_ga(step, ga), cfg, work, "train", isotropic_noise(ga, cfg.seed))
        if args.metrics:
            write_json(args.metrics, {**summary, "cuda": int(device.type == "cuda")})
        save_model(work / "model.pt", model.cpu(), model_cfg, text_state, image_size)
    negatives = f"{cfg.negatives_per_query} mined negatives/query" if sampler else "no mined negatives"
    print(f"train: {summary['steps']} steps in {summary['seconds']} s ({summary['steps_per_s']} steps/s) "
          f"on {device}, {negatives} -> {args.out / 'model.pt'}")


if __name__ == "__main__":
    run_stage(main)
