"""SIAM re-ranking of the dual encoder's caption -> image results (sibasmarak/guided-image-retrieval@59f935a src/model.py).

`train` (task matching, `train.siam_steps` > 0) fits SIAM on the frozen dual encoder (stages.training.siam).
`evaluate` then re-scores each caption's DE top-`evaluate.rerank_k` images with SIAM and reports t2i recall
before and after. SIAM's image feature depends on the query text, so it cannot be indexed: it only re-ranks.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.matching.siam import SIAM, map_regions
from stages.retrieval.topk import chunked_topk
from stages.common.device import autocast, to_device

SIAM_FILE = "siam.pt"


def load_siam(path: Path, device: torch.device) -> SIAM | None:
    """The SIAM saved beside a checkpoint, or None when it was trained without one."""
    if not Path(path).is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    siam = SIAM(state["region_dim"], state["channels"], tuple(state["map_size"]), state["dim"])
    siam.load_state_dict(state["model"])
    return siam.to(device).eval()


@torch.no_grad()
def gallery_maps(model: nn.Module, shard_dir: Path, split: str, batch_size: int, device: torch.device) -> torch.Tensor:
    """The guide maps of a split's gallery images, in shard order (N × C × h × w, on the CPU)."""
    from stages.shards import store
    from stages.shards.loaders import batched, decode_image

    maps = []
    for chunk in batched(store.iter_gallery(shard_dir, split), batch_size):
        images = to_device(torch.stack([decode_image(data) for _, _, data in chunk]), device)
        with autocast(device):
            maps.append(model.image_map(images).float().cpu())
    return torch.cat(maps)


@torch.no_grad()
def rerank_t2i(siam: SIAM, maps: torch.Tensor, images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor,
               k: int, ks: list[int], query_chunk: int = 64) -> dict[str, float]:
    """t2i recall@K (percent) after re-scoring each caption's DE top-k images with SIAM.

    maps: N × C × h × w guide maps of the gallery; images / texts: L2-normalised DE features (N × d, M × d);
    text_image: the gallery row of each caption. A caption whose image is outside its top-k stays a miss.
    """
    if max(ks) > k:
        raise ValueError(f"evaluate.rerank_k: {k} re-ranked candidates cannot give recall@{max(ks)}")
    _, candidates = chunked_topk(texts, images, k)
    hits = torch.empty(texts.shape[0], dtype=torch.long)
    for q0 in range(0, texts.shape[0], query_chunk):
        rows = candidates[q0: q0 + query_chunk]                                   # Bq × k
        candidate_maps = maps[rows.flatten()]                                     # Bq·k × C × h × w
        text = texts[q0: q0 + query_chunk].repeat_interleave(k, dim=0)            # Bq·k × d
        scores = siam.rerank_scores(map_regions(candidate_maps), candidate_maps, text).view(-1, k)
        order = rows.gather(1, scores.argsort(dim=1, descending=True, stable=True))  # ties keep the DE order
        found = order == text_image[q0: q0 + query_chunk, None]
        hits[q0: q0 + rows.shape[0]] = torch.where(found.any(1), found.float().argmax(1), torch.full_like(rows[:, 0], k))
    return {f"r{kk}": round(100 * float((hits < kk).float().mean()), 2) for kk in ks}
