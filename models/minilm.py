"""A frozen all-MiniLM-L6-v2 sentence encoder as a text encoder of the composition models.

sentence-transformers/all-MiniLM-L6-v2 is BertModel (6 layers, hidden 384) -> mean pooling over the
tokens the attention mask keeps ([CLS] and [SEP] included) -> L2 normalisation (its modules.json:
Transformer, Pooling(mean), Normalize). This module reproduces that on an already-loaded backbone
(stages.modeling.sentence_encoder.load_minilm reads the weights) and adds an optional trainable linear head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MiniLMTextEncoder(nn.Module):
    """forward(tokens B x L, lengths B) -> B x out_dim (or B x hidden_dim without a head).

    `backbone(input_ids=..., attention_mask=...)` must return the token states B x L x hidden_dim
    (first element of its output, as a Hugging Face BertModel does). It is frozen: no gradients,
    and kept in eval mode (no dropout) even when the encoder is put in train mode; it runs under
    no_grad. `tokens` are wordpiece ids padded after `lengths` real tokens (special tokens included).

    With `return_tokens`, forward returns (per-token features B x L x d, sentence B x d): the head
    applied to each token state, zero at padded positions (for models that attend over words).
    """

    def __init__(self, backbone: nn.Module, out_dim: int | None = None, hidden_dim: int = 384,
                 normalize: bool = True, return_tokens: bool = False):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.hidden_dim, self.normalize, self.return_tokens = hidden_dim, normalize, return_tokens
        self.head = nn.Linear(hidden_dim, out_dim) if out_dim is not None else nn.Identity()
        self.out_dim = out_dim if out_dim is not None else hidden_dim

    def train(self, mode: bool = True) -> MiniLMTextEncoder:
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor):
        steps = torch.arange(tokens.shape[1], device=tokens.device)
        mask = steps[None, :] < lengths.to(tokens.device)[:, None]  # B x L
        with torch.no_grad():
            out = self.backbone(input_ids=tokens, attention_mask=mask.long())
            states = out if isinstance(out, torch.Tensor) else out[0]  # B x L x hidden
            keep = mask[..., None].to(states.dtype)
            sentence = (states * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)  # sentence-transformers' mean
            if self.normalize:
                sentence = F.normalize(sentence, p=2, dim=1)
        sentence = self.head(sentence)
        if not self.return_tokens:
            return sentence
        words = self.head(states) * keep
        return words, sentence
