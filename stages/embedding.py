"""Embed gallery images and queries of a split with a trained model (used by `mine` and `evaluate`)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from models.tirg import TIRG
from stages import shards
from stages.loaders import batched, decode_image
from stages.modeling import load_model
from stages.training import autocast, place_model, to_device
from stages.vocab import Vocab

QueryMode = Literal["composed", "image_only", "text_only"]


def load_for_embedding(checkpoint: Path, device: torch.device) -> tuple[TIRG, Vocab]:
    """A trained model in eval mode on `device`, with the vocabulary it was trained with."""
    model, _, words, _ = load_model(checkpoint)
    return place_model(model, device), Vocab(words)


@torch.no_grad()
def embed_gallery(model: TIRG, shard_dir: Path, split: str, batch_size: int, device: torch.device):
    """(image ids in shard order, L2-normalised features N x d on the CPU)."""
    ids, features = [], []
    for chunk in batched(shards.iter_gallery(shard_dir, split), batch_size):
        images = to_device(torch.stack([decode_image(data) for _, _, data in chunk]), device)
        with autocast(device):
            features.append(model.encode_image(images).float().cpu())
        ids += [image_id for image_id, _, _ in chunk]
    return ids, F.normalize(torch.cat(features), dim=1)


@torch.no_grad()
def embed_queries(model: TIRG, vocab: Vocab, shard_dir: Path, split: str, batch_size: int,
                  device: torch.device, modes: tuple[QueryMode, ...] = ("composed",)):
    """(query records without image bytes, {mode: L2-normalised features Q x d}).

    composed: TIRG's f(φ_x, φ_t); image_only: φ_x of the reference (ignores the text);
    text_only: f(0, φ_t), the composition with the image feature zeroed (ignores the image).
    """
    records, features = [], {mode: [] for mode in modes}
    for chunk in batched(shards.iter_queries(shard_dir, split), batch_size):
        images = to_device(torch.stack([decode_image(q["ref"]) for q in chunk]), device)
        tokens, lengths = vocab.batch([q["text"] for q in chunk])
        with autocast(device):
            phi_x = model.encode_image(images)
            phi_t = model.encode_text(tokens.to(device), lengths.to(device))
            outputs = {"composed": lambda: model.compose(phi_x, phi_t), "image_only": lambda: phi_x,
                       "text_only": lambda: model.compose(torch.zeros_like(phi_x), phi_t)}
            for mode in modes:
                features[mode].append(outputs[mode]().float().cpu())
        records += [{k: q[k] for k in ("query_id", "reference_id", "target_id", "text")} for q in chunk]
    return records, {mode: F.normalize(torch.cat(f), dim=1) for mode, f in features.items()}
