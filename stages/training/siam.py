"""Fitting SIAM (guided image retrieval's text-guided re-ranker; sibasmarak/guided-image-retrieval@59f935a src/model.py) on the frozen dual encoder.

For each (image, caption) pair of a batch: SIAM's text-guided image feature of the image against the DE text
features of the batch, with the dual encoder's NCE. `stages.retrieval.rerank` uses the fitted SIAM."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.losses.matching import nce_loss
from models.matching.siam import SIAM, map_regions
from stages.common.checkpoints import save_checkpoint
from stages.common.device import autocast, to_device


def build_siam(model: nn.Module, image_size: int, device: torch.device) -> SIAM:
    """A SIAM sized by the model's guide map (one dummy forward)."""
    with torch.no_grad():
        channels, h, w = model.image_map(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:]
    return SIAM(channels, channels, (h, w), model.dim).to(device)


def siam_step(model: nn.Module, siam: SIAM, tokenizer, tau: float, batch: dict, device: torch.device):
    """(NCE of SIAM image features against the frozen DE text features, logs)."""
    tokens, lengths = tokenizer.batch(batch["text"])
    ids = {image_id: i for i, image_id in enumerate(dict.fromkeys(batch["image_id"]))}
    image_ids = torch.tensor([ids[i] for i in batch["image_id"]], device=device)
    with torch.no_grad(), autocast(device):
        maps = model.image_map(to_device(batch["image"], device)).float()
        text = model.encode_text(tokens.to(device), lengths.to(device)).float()
    return nce_loss(siam(map_regions(maps), maps, text), text, image_ids, tau), {}


def save_siam(path: Path, siam: SIAM) -> None:
    h, w = siam.alpha_linear.out_features, siam.beta_linear.out_features
    save_checkpoint(path, siam, {"region_dim": siam.roi_linear.in_features, "channels": siam.gamma_linear.out_features,
                                 "map_size": (h, w), "dim": siam.roi_linear.out_features})
