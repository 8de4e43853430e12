"""Embed gallery images and queries (or captions) of a split with a trained model (`mine`, `evaluate`, selection)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from torch import nn

from stages.common.errors import StageError
from stages.shards import store
from stages.shards.loaders import batched, decode_image
from stages.modeling.factory import as_vector, load_model, zeros_like
from stages.modeling.text import tokenizer_from_state
from stages.common.device import autocast, place_model, to_device

QueryMode = Literal["composed", "image_only", "text_only"]


def load_for_embedding(checkpoint: Path, device: torch.device):
    """(a trained model in eval mode on `device`, the tokenizer it was trained with)."""
    model, _, text_state, _ = load_model(checkpoint)
    return place_model(model, device), tokenizer_from_state(text_state)


@torch.no_grad()
def embed_gallery(model: nn.Module, shard_dir: Path, split: str, batch_size: int, device: torch.device):
    """(image ids in shard order, their captions, L2-normalised features N x d on the CPU)."""
    ids, captions, features = [], [], []
    for chunk in _progress(batched(store.iter_gallery(shard_dir, split), batch_size), shard_dir, split, "gallery",
                           batch_size, f"embed {split} images"):
        images = to_device(torch.stack([decode_image(data) for _, _, data in chunk]), device)
        with autocast(device):
            features.append(as_vector(model.encode_image(images)).float().cpu())
        ids += [image_id for image_id, _, _ in chunk]
        captions += [caption for _, caption, _ in chunk]
    return ids, captions, F.normalize(torch.cat(features), dim=1)


@torch.no_grad()
def embed_queries(model: nn.Module, tokenizer, shard_dir: Path, split: str, batch_size: int,
                  device: torch.device, modes: tuple[QueryMode, ...] = ("composed",), drop_rare_below: int = 0):
    """(query records without image bytes, {mode: L2-normalised features Q x d}).

    composed: the model's composition f(ref, text); image_only: the reference encoded as a gallery image
    (ignores the text); text_only: f(0, text), the composition with the reference representation zeroed
    (ignores the image). drop_rare_below > 0: words seen fewer times in training read as <UNK> (VAL's test-time
    vocabulary quirk).
    """
    records, features = [], {mode: [] for mode in modes}
    for chunk in _progress(batched(store.iter_queries(shard_dir, split), batch_size), shard_dir, split, "queries",
                           batch_size, f"embed {split} queries"):
        images = to_device(torch.stack([decode_image(q["ref"]) for q in chunk]), device)
        texts = [q["text"] for q in chunk]
        tokens, lengths = tokenizer.batch(texts, drop_rare_below) if drop_rare_below else tokenizer.batch(texts)
        with autocast(device):
            reference = model.encode_reference(images)
            text = model.encode_text(tokens.to(device), lengths.to(device))
            outputs = {"composed": lambda: model.compose(reference, text),
                       "image_only": lambda: model.encode_image(images),
                       "text_only": lambda: model.compose(zeros_like(reference), text)}
            for mode in modes:
                features[mode].append(as_vector(outputs[mode]()).float().cpu())
        records += [{k: q[k] for k in ("query_id", "reference_id", "target_id", "text")} for q in chunk]
    return records, {mode: F.normalize(torch.cat(f), dim=1) for mode, f in features.items()}


@torch.no_grad()
def embed_captions(model: nn.Module, tokenizer, shard_dir: Path, split: str, batch_size: int, device: torch.device):
    """(caption ids, their image ids, L2-normalised text features M x d on the CPU) of every caption of a split."""
    caption_ids, image_ids, features = [], [], []
    for chunk in tqdm(batched(store.iter_captions(shard_dir, split), batch_size), desc=f"embed {split} captions",
                      unit="batch", mininterval=2):
        tokens, lengths = tokenizer.batch([text for _, _, text in chunk])
        with autocast(device):
            features.append(model.encode_text(tokens.to(device), lengths.to(device)).float().cpu())
        caption_ids += [caption_id for caption_id, _, _ in chunk]
        image_ids += [image_id for _, image_id, _ in chunk]
    return caption_ids, image_ids, F.normalize(torch.cat(features), dim=1)



def _progress(chunks, shard_dir: Path, split: str, kind: str, batch_size: int, desc: str):
    """A progress bar (stderr) over the batches of one split and kind, its length from the shard index."""
    total = sum(store.shard_counts(shard_dir, split, kind).values())
    return tqdm(chunks, desc=desc, total=-(-total // batch_size), unit="batch", mininterval=2)


def embed_matching_split(model: nn.Module, tokenizer, shard_dir: Path, split: str, batch_size: int,
                         device: torch.device):
    """(image ids, image features N x d, caption ids, caption features M x d, the image row of every caption (M,))
    of one split, as i2t / t2i recall takes them."""
    image_ids, _, images = embed_gallery(model, shard_dir, split, batch_size, device)
    caption_ids, caption_images, texts = embed_captions(model, tokenizer, shard_dir, split, batch_size, device)
    row = {image_id: i for i, image_id in enumerate(image_ids)}
    missing = [image_id for image_id in caption_images if image_id not in row]
    if missing:
        raise StageError(f"{shard_dir} split '{split}': captions of image {missing[0]!r}, which is not in the gallery")
    return image_ids, images, caption_ids, texts, torch.tensor([row[image_id] for image_id in caption_images])
