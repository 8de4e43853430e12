"""AOQ's offline negatives for a batch of training (image, caption) pairs (Chen et al. 2020; sunnychencool/AOQ@5bfe620 dataAOQ.py, modelAOQ.py).

The `mine` stage wrote the candidate lists (stages.retrieval.offline_candidates); this module draws, per pair, the
offline hard negative caption T⁻ and image I⁻ and their partners I⁻⁺ (the image of T⁻) and T⁻⁺ (a caption of
I⁻), encodes them with the model being trained, and returns the AOQ loss of the batch.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.losses.matching import aoq_loss, same_image_mask, sample_offline_negatives
from stages.shards import store
from stages.common.errors import StageError
from stages.common.distributed import across_ranks, gather_objects
from stages.shards.loaders import decode_image
from stages.retrieval.offline_candidates import read_candidates
from stages.common.device import autocast, to_device


class AOQNegatives:
    """Candidate lists + the train images and captions they index, with the release's caption layout:
    caption row r belongs to image row r // captions_per_image (every image has the same number)."""

    def __init__(self, candidates_file: Path, shard_dir: Path, candidate_range: int, seed: int):
        self.i2t, self.t2i, self.image_ids, self.caption_ids = read_candidates(candidates_file)
        self.image_row = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self.caption_row = {caption_id: i for i, caption_id in enumerate(self.caption_ids)}
        captions = {caption_id: (image_id, text) for caption_id, image_id, text in store.iter_captions(shard_dir, "train")}
        missing = [c for c in self.caption_ids if c not in captions]
        if missing:
            raise StageError(f"{candidates_file}: caption {missing[0]!r} is not in the train shards (re-run `mine`)")
        self.texts = [captions[c][1] for c in self.caption_ids]
        self.cpi = len(self.caption_ids) // len(self.image_ids)
        layout = [self.image_row.get(captions[c][0]) for c in self.caption_ids]
        if self.cpi * len(self.image_ids) != len(self.caption_ids) or layout != [r // self.cpi for r in range(len(layout))]:
            raise StageError(f"{candidates_file}: AOQ needs the same number of captions for every train image, "
                             f"listed image by image ({len(self.caption_ids)} captions, {len(self.image_ids)} images)")
        self.images = {image_id: data for image_id, _, data in store.iter_gallery(shard_dir, "train")}
        self.candidate_range = candidate_range
        self.generator = torch.Generator().manual_seed(seed)

    def draw(self, image_ids: list[str], caption_ids: list[str]):
        """(I⁻ images, I⁻⁺ images, T⁻ texts, T⁻⁺ texts) of one batch."""
        picked = sample_offline_negatives(
            self.i2t, self.t2i, torch.tensor([self.image_row[i] for i in image_ids]),
            torch.tensor([self.caption_row[c] for c in caption_ids]), self.cpi, self.candidate_range, self.generator)

        def images(rows: torch.Tensor) -> torch.Tensor:
            return torch.stack([decode_image(self.images[self.image_ids[r]]) for r in rows.tolist()])

        return (images(picked.image), images(picked.image_partner),
                [self.texts[r] for r in picked.caption.tolist()], [self.texts[r] for r in picked.caption_partner.tolist()])


def aoq_batch_loss(model: nn.Module, negatives: AOQNegatives, loss_cfg, tokenizer, batch: dict, device: torch.device):
    """(L_AOQ, per-term logs) of a batch of pairs: in-batch online hardest negatives plus the offline ones."""
    neg_images, partner_images, neg_texts, partner_texts = negatives.draw(batch["image_id"], batch["caption_id"])
    b = len(batch["text"])
    tokens, lengths = tokenizer.batch([*batch["text"], *neg_texts, *partner_texts])
    with autocast(device):
        v_all = model.encode_image(to_device(torch.cat([batch["image"], neg_images, partner_images]), device)).float()
        u_all = model.encode_text(tokens.to(device), lengths.to(device)).float()
    v, v_neg, v_partner = v_all.split(b)
    u, u_neg, u_partner = u_all.split(b)
    names = gather_objects(list(batch["image_id"]))  # every rank's, when training on several processes
    ids = {image_id: i for i, image_id in enumerate(dict.fromkeys(names))}
    same = same_image_mask(torch.tensor([ids[i] for i in names], device=device))
    terms = {}

    def loss_fn(v, u, s_off_caption, s_off_image, s_off_pair, s_off_partners):
        loss, parts = aoq_loss(v @ u.T, s_off_caption, s_off_image, s_off_pair, s_off_partners,
                               loss_cfg.aoq_margin_online, loss_cfg.aoq_margin_offline, loss_cfg.aoq_alpha,
                               loss_cfg.aoq_beta, loss_cfg.aoq_variant, same)
        terms.update(parts)
        return loss

    loss = across_ranks(loss_fn, v, u, (v * u_neg).sum(1), (v_neg * u).sum(1), (v_neg * u_neg).sum(1),
                        (v_partner * u_partner).sum(1))
    return loss, {f"aoq_{k}": float(v.detach()) for k, v in terms.items()}
