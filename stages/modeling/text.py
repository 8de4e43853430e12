"""The text side of a model: the tokenizer it reads with and, for LSTM encoders, GloVe word vectors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from stages.modeling.vocab import Vocab
from stages.modeling.vocab import VECTORS_FILE, VOCAB_FILE


def tokenizer_from_state(state):
    """The tokenizer a checkpoint was trained with (a Vocab, or the MiniLM wordpiece tokenizer)."""
    if isinstance(state, dict) and state.get("tokenizer") == "minilm":
        from stages.modeling.sentence_encoder import MiniLMTokenizer

        return MiniLMTokenizer()
    return Vocab.from_state(state)


def training_text(text_encoder: str, vocab_dir: Path):
    """(tokenizer, word vectors or None) for a new model: the `vocabulary` stage's output for the LSTM
    encoders (with GloVe rows when it wrote them), MiniLM's own wordpiece tokenizer for `minilm`."""
    if text_encoder == "minilm":
        from stages.modeling.sentence_encoder import MiniLMTokenizer

        return MiniLMTokenizer(), None
    vocab_file = Path(vocab_dir) / VOCAB_FILE
    if not vocab_file.is_file():
        raise FileNotFoundError(f"{vocab_file}: missing (run the `vocabulary` stage)")
    vocab = Vocab.from_state(json.loads(vocab_file.read_text()))
    vectors_file = Path(vocab_dir) / VECTORS_FILE
    vectors = torch.from_numpy(np.load(vectors_file)) if vectors_file.is_file() else None
    if vectors is not None and vectors.shape[0] != len(vocab):
        raise ValueError(f"{vectors_file}: {vectors.shape[0]} rows for a vocabulary of {len(vocab)} ({vocab_file})")
    return vocab, vectors


def minilm_text_encoder(out_dim: int | None, amc_pair: bool = False):
    """The frozen all-MiniLM-L6-v2 encoder with a trainable Linear(384 -> out_dim) head; for AMC it returns
    (word features, sentence vector) as AMC's own text encoder does."""
    from models.minilm import MiniLMTextEncoder
    from stages.modeling.sentence_encoder import load_minilm

    backbone, _ = load_minilm()
    return MiniLMTextEncoder(backbone, out_dim, return_tokens=amc_pair)
