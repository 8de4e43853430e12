"""AOQ offline candidate lists (sunnychencool/AOQ@5bfe620 tools/geti2toffcandi.py, tools/gett2ioffcandi.py), over the whole training set.

* i2t: for every image, the `i2t_k` captions most similar to it, none of them its own
  (AOQ: top 2,000 of 5n captions, own captions 5i..5i+4 masked);
* t2i: for every caption, the `t2i_k` images most similar to it, not its own image (AOQ: top 400).

Here an image may have any number of captions; text_image gives each caption's image row.
Similarity is the dot product (cosine on L2-normalised embeddings), computed in
(query_chunk x gallery_chunk) blocks by `stages.retrieval.chunked_topk`.

Order and tie rule: best first; candidates with exactly equal scores are ordered by lower gallery
row first, and when equal scores straddle the k-th place the lower rows are the ones kept. (chunked_topk
promises the order but not which of the rows tied at the k-th place it keeps, so rows with a tie there are
recomputed.)

Stored as one .npz: i2t (n x i2t_k, int32 caption rows), t2i (m x t2i_k, int32 image rows),
image_ids (n,), caption_ids (m,): rows refer to positions in those id lists.
"""
from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from stages.common.atomic import atomic_path
from stages.common.errors import StageError
from stages.retrieval.matching_metrics import check_pairing
from stages.retrieval.topk import GALLERY_CHUNK, QUERY_CHUNK, block_scores, chunked_topk

CANDIDATES_FILE = "candidates.npz"

ARRAYS = ("i2t", "t2i", "image_ids", "caption_ids")


def mine_candidates(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: torch.Tensor,
    i2t_k: int,
    t2i_k: int,
    query_chunk: int = QUERY_CHUNK,
    gallery_chunk: int = GALLERY_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t: n x i2t_k caption rows, t2i: m x t2i_k image rows), LongTensors, best first.

    i2t excludes all of the image's own captions, t2i the caption's own image. Raises StageError
    (a ValueError) naming mine.aoq_i2t_k / mine.aoq_t2i_k when a k is larger than the candidates
    available: i2t_k <= m - (most captions of one image), t2i_k <= n - 1.
    """
    text_image = _check_inputs(image_emb, text_emb, text_image)
    n, m = image_emb.shape[0], text_emb.shape[0]
    counts = torch.bincount(text_image, minlength=n)
    most_own = int(counts.max())
    if not 1 <= i2t_k <= m - most_own:
        raise StageError(f"mine.aoq_i2t_k={i2t_k} must be in 1..{m - most_own}: {m} captions, "
                         f"up to {most_own} of them an image's own")
    if not 1 <= t2i_k <= n - 1:
        raise StageError(f"mine.aoq_t2i_k={t2i_k} must be in 1..{n - 1} ({n} images, one of them the caption's own)")

    # own captions per image, padded with -1 to the most captions of one image
    order = torch.argsort(text_image, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(m) - starts[text_image[order]]
    own_captions = torch.full((n, most_own), -1, dtype=torch.long)
    own_captions[text_image[order], slot] = order

    i2t = _topk_lower_row_on_ties(image_emb, text_emb, i2t_k, own_captions, query_chunk, gallery_chunk)
    t2i = _topk_lower_row_on_ties(text_emb, image_emb, t2i_k, text_image[:, None], query_chunk, gallery_chunk)
    return i2t, t2i


def _topk_lower_row_on_ties(queries, gallery, k, exclude, query_chunk, gallery_chunk) -> torch.Tensor:
    """chunked_topk with the tie rule of the module docstring. k < gallery rows (checked above)."""
    scores, rows = chunked_topk(queries, gallery, k + 1, exclude=exclude,
                                query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    # a tie at the k-th place: the (k+1)-th candidate scores as high as the k-th (and is not excluded)
    straddling = torch.nonzero((scores[:, k] == scores[:, k - 1]) & torch.isfinite(scores[:, k])).flatten()
    del scores
    rows = rows[:, :k]  # best first, equal scores by row (chunked_topk's order); a view, not a copy
    if len(straddling):
        # recompute those queries over full score rows, a chunk's worth of memory at a time
        per_batch = max(1, query_chunk * gallery_chunk // gallery.shape[0])
        for b0 in range(0, len(straddling), per_batch):
            which = straddling[b0 : b0 + per_batch]
            full = torch.cat([block_scores(queries[which].float(), gallery[g0 : g0 + gallery_chunk].float())
                              for g0 in range(0, gallery.shape[0], gallery_chunk)], dim=1)
            own = exclude[which]
            valid = own >= 0
            full[torch.arange(len(which))[:, None].expand_as(own)[valid], own[valid]] = float("-inf")
            rows[which] = torch.sort(full, dim=1, descending=True, stable=True).indices[:, :k]
    return rows


def write_candidates(
    path: Path | str,
    i2t: torch.Tensor,
    t2i: torch.Tensor,
    image_ids: Sequence[str],
    caption_ids: Sequence[str],
) -> None:
    """Write the candidate lists and the ids their rows refer to as one .npz (int32 arrays), atomically."""
    path = Path(path)
    image_ids, caption_ids = [str(i) for i in image_ids], [str(c) for c in caption_ids]
    i2t_np, t2i_np = np.asarray(torch.as_tensor(i2t).cpu()), np.asarray(torch.as_tensor(t2i).cpu())
    _check_arrays(f"{path} (not written)", i2t_np, t2i_np, image_ids, caption_ids)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
        np.savez(f, i2t=i2t_np.astype(np.int32), t2i=t2i_np.astype(np.int32),
                 image_ids=np.array(image_ids, dtype=str), caption_ids=np.array(caption_ids, dtype=str))


def read_candidates(path: Path | str) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """(i2t, t2i, image_ids, caption_ids) from `write_candidates`' file; StageError naming the file
    when it is unreadable (e.g. truncated) or inconsistent. i2t/t2i come back as LongTensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such candidates file")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in ARRAYS if name not in data.files]
            if missing:
                raise StageError(f"{path}: not a candidates file, array {missing[0]!r} is missing")
            i2t, t2i = data["i2t"], data["t2i"]
            image_ids, caption_ids = data["image_ids"].tolist(), data["caption_ids"].tolist()
    except StageError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise StageError(f"{path}: unreadable candidates file (truncated or corrupt?): {err}") from None
    _check_arrays(str(path), i2t, t2i, image_ids, caption_ids)
    return torch.from_numpy(i2t.astype(np.int64)), torch.from_numpy(t2i.astype(np.int64)), image_ids, caption_ids


def _check_arrays(where: str, i2t: np.ndarray, t2i: np.ndarray, image_ids: list, caption_ids: list) -> None:
    n, m = len(image_ids), len(caption_ids)
    for name, array, rows, bound, target in (("i2t", i2t, n, m, "caption"), ("t2i", t2i, m, n, "image")):
        if array.dtype.kind not in "iu":
            raise StageError(f"{where}: {name} has dtype {array.dtype}, expected integers")
        if array.ndim != 2 or array.shape[0] != rows or array.shape[1] < 1:
            raise StageError(f"{where}: {name} has shape {array.shape}, expected ({rows}, k >= 1)")
        if array.size and (int(array.min()) < 0 or int(array.max()) >= bound):
            raise StageError(f"{where}: {name} has {target} rows outside 0..{bound - 1}")
    for name, ids in (("image_ids", image_ids), ("caption_ids", caption_ids)):
        if len(set(ids)) != len(ids):
            raise StageError(f"{where}: {name} has duplicates")


def _check_inputs(image_emb, text_emb, text_image) -> torch.Tensor:
    text_image = check_pairing(image_emb, text_emb, text_image).cpu()
    n, m = image_emb.shape[0], text_emb.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"need at least 2 images and 2 captions, got {n} and {m}")
    return text_image
