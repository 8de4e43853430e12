"""One batch -> the metric loss of the composed query against its target (TIRG §1.3)."""
from __future__ import annotations

import torch

from models.losses import batch_based_classification, soft_triplet
from models.tirg import TIRG
from stages.training import autocast, to_device
from stages.vocab import Vocab


def composed_and_target(model: TIRG, vocab: Vocab, batch: dict, device: torch.device):
    """(q̂, t̂): normalised composed queries and normalised targets, float32."""
    tokens, lengths = vocab.batch(batch["text"])
    with autocast(device):
        query = model(to_device(batch["ref"], device), tokens.to(device), lengths.to(device))
        target = model.encode_image(to_device(batch["tgt"], device))
    return model.normalize(query), model.normalize(target)


def metric_loss(name: str, q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if name == "bbc":
        return batch_based_classification(q, t)
    return soft_triplet(q, t)
