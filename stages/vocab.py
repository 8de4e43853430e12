"""TIRG's text vocabulary: ASCII-only, lower-case, punctuation stripped, whitespace split; id 0 = <UNK>."""
from __future__ import annotations

import string
from collections.abc import Iterable

import torch

_STRIP_PUNCT = str.maketrans("", "", string.punctuation)


def tokenize(text: str) -> list[str]:
    ascii_text = text.encode("ascii", "ignore").decode("ascii")
    return ascii_text.lower().translate(_STRIP_PUNCT).split()


class Vocab:
    UNK = 0

    def __init__(self, words: list[str]):
        self.words = ["<UNK>", *words]
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> Vocab:
        return cls(sorted({w for text in texts for w in tokenize(text)}))

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        ids = [self.index.get(w, self.UNK) for w in tokenize(text)]
        return ids or [self.UNK]  # an empty text still has one step for the LSTM to read

    def batch(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens B x L padded with 0, lengths B)."""
        ids = [self.encode(t) for t in texts]
        lengths = torch.tensor([len(x) for x in ids])
        tokens = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
        for row, x in enumerate(ids):
            tokens[row, : len(x)] = torch.tensor(x)
        return tokens, lengths

    def state_dict(self) -> list[str]:
        return self.words[1:]
