"""One query at a time against an index of features (stages.search, stages.app): a text, an image, or a composed
query (a reference image and a modification text), encoded as the model encodes its evaluation queries, and its
top-k rows by cosine."""
from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from stages.common.device import autocast, to_device
from stages.modeling.factory import as_vector
from stages.retrieval.feature_index import SplitIndex
from stages.retrieval.topk import chunked_topk
from stages.shards.loaders import decode_image


def fit_image(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A decoded image -> the normalised 3 x H x W tensor the image tower reads: resized so it covers the gallery
    size (width, height), centre-cropped to it, then normalised by decode_image (as the `resize` stage and the
    loaders treated the gallery)."""
    width, height = size
    fit = v2.Compose([v2.Resize(max(width, height)), v2.CenterCrop((height, width))])
    resized = fit(img.convert("RGB"))
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG")  # lossless: decode_image sees exactly the resized pixels
    return decode_image(buffer.getvalue())


def image_query_tensor(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    """Image file bytes -> `fit_image` of them."""
    with Image.open(io.BytesIO(data)) as img:
        return fit_image(img, size)


@torch.no_grad()
def encode_text_query(model: nn.Module, tokenizer, text: str, device: torch.device) -> torch.Tensor:
    """The L2-normalised d-vector of one text (image-text matching), on the CPU."""
    tokens, lengths = tokenizer.batch([text])
    with autocast(device):
        feature = model.encode_text(tokens.to(device), lengths.to(device))
    return F.normalize(feature.float().cpu(), dim=1)[0]


@torch.no_grad()
def encode_image_query(model: nn.Module, image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The L2-normalised d-vector of one 3 x H x W image tensor through the gallery side, on the CPU."""
    with autocast(device):
        feature = as_vector(model.encode_image(to_device(image[None], device)))
    return F.normalize(feature.float().cpu(), dim=1)[0]


@torch.no_grad()
def encode_composed_query(model: nn.Module, tokenizer, reference: torch.Tensor, text: str,
                          device: torch.device) -> torch.Tensor:
    """The L2-normalised composed query f(reference, text) of one 3 x H x W reference tensor, on the CPU: what
    stages.retrieval.embedding.embed_queries computes for a query of the shards."""
    tokens, lengths = tokenizer.batch([text])
    with autocast(device):
        composed = model.compose(model.encode_reference(to_device(reference[None], device)),
                                 model.encode_text(tokens.to(device), lengths.to(device)))
        feature = as_vector(composed)
    return F.normalize(feature.float().cpu(), dim=1)[0]


def top_k(query: torch.Tensor, features: torch.Tensor, k: int, exclude_row: int | None = None) -> list[tuple[int, float]]:
    """(row, cosine) of the k best rows of `features`, best first (both sides are unit vectors; equal scores by
    row); `exclude_row` (a composed query's own reference, as the protocols do) is never returned. Fewer than k
    when fewer rows are left."""
    exclude = None if exclude_row is None else torch.tensor([[exclude_row]])
    k = min(k, features.shape[0])
    scores, indices = chunked_topk(query[None], features, k, exclude=exclude)
    return [(int(i), float(s)) for i, s in zip(indices[0], scores[0]) if i >= 0]


def rank_split(model: nn.Module, tokenizer, task: str, index: SplitIndex, k: int, device: torch.device,
               text: str | None = None, image: torch.Tensor | None = None,
               exclude_id: str | None = None) -> tuple[str, list[tuple[int, float]]]:
    """("images" or "captions", the k best (row, cosine) of that side of the split's index) for one query.

    composed: the reference `image` (a 3 x H x W tensor) and `text` rank the gallery images, leaving out the
    gallery image `exclude_id` (the reference, as the protocols do); matching: a `text` ranks the gallery images,
    an `image` the captions."""
    if task == "composed":
        vector = encode_composed_query(model, tokenizer, image, text, device)
        exclude = None if exclude_id is None else index.rows[exclude_id]
        return "images", top_k(vector, index.gallery, k, exclude)
    if image is None:
        return "images", top_k(encode_text_query(model, tokenizer, text, device), index.gallery, k)
    return "captions", top_k(encode_image_query(model, image, device), index.caption_features, k)
