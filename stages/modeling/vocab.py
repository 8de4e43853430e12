"""Word vocabularies of the LSTM text encoders; id 0 = <UNK>.

Two tokenisers:
  * "tirg" (TIRG, GA, ComposeAE, AMC): ASCII-only, lower-case, `string.punctuation` stripped,
    whitespace split.
  * "nltk" (VAL, `SimpleVocab(use_nltk=True)`): `nltk.tokenize.word_tokenize(text.lower())`. The real
    `word_tokenize` first splits sentences with the Punkt model, which is nltk *data* (punkt_tab) that
    is not available offline here, so this uses `NLTKWordTokenizer().tokenize` on the whole text: the
    same Treebank-style word tokenizer `word_tokenize` applies to each sentence, needing no data. The
    only difference is a "." that ends a sentence inside the text: word_tokenize splits it off
    ("revealing. has" -> revealing . has), this keeps it on the word ("revealing." has); a "." at the
    end of the text, "!" and "?" are split the same. VAL's own datasets replace "." by "dotmark" (and
    "?" by "questionmark") before tokenising, so on its texts the two agree.

VAL's rare-word quirk: training keeps every word, but at test time (feature extraction with
`--remove_rare_words=True`) words seen fewer than 2 times in the training texts map to <UNK>:
`encode(text, drop_rare_below=2)`. That needs the word counts, which `Vocab.build` records.
"""
from __future__ import annotations

import functools
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch

Tokenizer = Literal["tirg", "nltk"]
TOKENIZERS: tuple[str, ...] = ("tirg", "nltk")
UNK_WORD = "<UNK>"

_STRIP_PUNCT = str.maketrans("", "", string.punctuation)


@functools.cache
def _nltk_word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def tokenize(text: str, tokenizer: Tokenizer = "tirg") -> list[str]:
    """The words of `text` under one of TOKENIZERS (see the module doc)."""
    if tokenizer == "tirg":
        ascii_text = text.encode("ascii", "ignore").decode("ascii")
        return ascii_text.lower().translate(_STRIP_PUNCT).split()
    if tokenizer == "nltk":
        return _nltk_word_tokenizer().tokenize(text.lower())
    raise ValueError(f"unknown tokenizer {tokenizer!r} (have {', '.join(TOKENIZERS)})")


class Vocab:
    """Words -> ids (0 = <UNK>, then `words` in the given order); optional training counts per word."""

    UNK = 0

    def __init__(self, words: Sequence[str], tokenizer: Tokenizer = "tirg", counts: Sequence[int] | None = None):
        if tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {tokenizer!r} (have {', '.join(TOKENIZERS)})")
        words = list(words)
        if counts is not None and len(counts) != len(words):
            raise ValueError(f"{len(counts)} counts for {len(words)} words")
        self.tokenizer = tokenizer
        self.words = [UNK_WORD, *words]
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("vocabulary words must be distinct and not <UNK>")
        self.counts = None if counts is None else [int(c) for c in counts]  # aligned with words[1:]

    @classmethod
    def build(cls, texts: Iterable[str], tokenizer: Tokenizer = "tirg") -> Vocab:
        """Every word of `texts` (sorted, so the ids do not depend on text order), with its count."""
        counter: Counter[str] = Counter()
        for text in texts:
            counter.update(tokenize(text, tokenizer))
        words = sorted(counter)
        return cls(words, tokenizer, [counter[w] for w in words])

    @classmethod
    def from_state(cls, state: dict[str, Any] | list[str]) -> Vocab:
        """Inverse of `state_dict`; also reads the plain word list of older checkpoints (tokenizer "tirg").

        Extra keys (e.g. the summary the `vocabulary` stage writes beside the state) are ignored.
        """
        if isinstance(state, list):
            return cls(state)
        if not isinstance(state, dict) or not isinstance(state.get("words"), list):
            raise ValueError("a vocabulary state is a list of words or a dict with 'words'")
        return cls(state["words"], state.get("tokenizer", "tirg"), state.get("counts"))

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: {"tokenizer", "words" (without <UNK>), "counts" (aligned with words, or None)}."""
        return {"tokenizer": self.tokenizer, "words": self.words[1:], "counts": self.counts}

    def __len__(self) -> int:
        return len(self.words)

    def _id(self, word: str, drop_rare_below: int) -> int:
        i = self.index.get(word, self.UNK)
        if drop_rare_below and i != self.UNK and self.counts[i - 1] < drop_rare_below:
            return self.UNK
        return i

    def encode(self, text: str, drop_rare_below: int = 0) -> list[int]:
        """Word ids of `text`; with `drop_rare_below` = n > 0, words counted fewer than n times are <UNK>."""
        if drop_rare_below and self.counts is None:
            raise ValueError("drop_rare_below needs word counts; this vocabulary has none (an old checkpoint?)")
        ids = [self._id(w, drop_rare_below) for w in tokenize(text, self.tokenizer)]
        return ids or [self.UNK]  # an empty text still has one step for the LSTM to read

    def batch(self, texts: list[str], drop_rare_below: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens B x L padded with 0, lengths B)."""
        ids = [self.encode(t, drop_rare_below) for t in texts]
        lengths = torch.tensor([len(x) for x in ids])
        tokens = torch.zeros(len(ids), int(lengths.max()), dtype=torch.long)
        for row, x in enumerate(ids):
            tokens[row, : len(x)] = torch.tensor(x)
        return tokens, lengths

VOCAB_FILE, VECTORS_FILE = "vocab.json", "word_vectors.npy"
