import math

import pytest
import torch
import torch.nn.functional as F

from models.encoders import LSTMTextEncoder, SmallCNN
from models.losses.metric import batch_based_classification, offline_negative_hinge, soft_triplet
from models.composed.tirg import TIRG
from stages.modeling.factory import ModelConfig, build_model
from tiny_repo import model_params
from stages.common.params import ParamsError, parse
from stages.modeling.vocab import Vocab, tokenize

MODEL = model_params(**{"name": "tirg", "embed_dim": 32, "norm_scale": 4.0,
    "image": {"encoder": "small_cnn", "weights": None, "channels": [8, 16]},
    "text": {"embed_dim": 16, "hidden_dim": 24, "dropout": 0.1},
})


def test_tokenizer_and_vocab_follow_tirg():
    assert tokenize("Add a RED circle, at top-left!") == ["add", "a", "red", "circle", "at", "topleft"]
    vocab = Vocab.build(["make it red", "make it blue"])
    assert vocab.words[0] == "<UNK>" and len(vocab) == 5
    tokens, lengths = vocab.batch(["make it red", "purple", "it"])
    assert lengths.tolist() == [3, 1, 1]
    assert tokens[1, 0] == Vocab.UNK and tokens.shape == (3, 3)


def test_tirg_composition_is_the_gated_residual_of_eq_1():
    model = build_model(parse(ModelConfig, "model", MODEL), vocab_size=10, image_size=32).eval()
    phi_x, phi_t = torch.randn(4, 32), torch.randn(4, 32)
    u = torch.cat([phi_x, phi_t], 1)
    expected = 1.0 * torch.sigmoid(model.gate(u)) * phi_x + 10.0 * model.residual(u)
    assert torch.allclose(model.compose(phi_x, phi_t), expected)
    images, tokens, lengths = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4, 5)), torch.tensor([5, 3, 1, 2])
    assert model(images, tokens, lengths).shape == (4, 32)
    q = model.normalize(model(images, tokens, lengths))
    assert torch.allclose(q.norm(dim=1), torch.full((4,), 4.0))


def test_text_encoder_reads_the_last_real_token():
    enc = LSTMTextEncoder(10, 8, 8, 8, dropout=0.0).eval()
    tokens = torch.tensor([[1, 2, 0, 0], [1, 2, 3, 4]])
    out = enc(tokens, torch.tensor([2, 4]))
    alone = enc(torch.tensor([[1, 2]]), torch.tensor([2]))
    assert torch.allclose(out[0], alone[0], atol=1e-6)


def test_small_cnn_rejects_too_many_pooling_stages():
    with pytest.raises(ValueError, match="too small"):
        SmallCNN([8, 8, 8], image_size=4, out_dim=4)


def test_bbc_loss_matches_its_definition():
    q, t = torch.randn(5, 8), torch.randn(5, 8)
    logits = q @ t.T
    expected = -sum(math.log(torch.softmax(logits[i], 0)[i].item()) for i in range(5)) / 5
    assert batch_based_classification(q, t).item() == pytest.approx(expected, rel=1e-5)


def test_soft_triplet_matches_its_definition_when_every_negative_is_kept():
    # B = 2: each anchor of Z = [q1, q2, t1, t2] has exactly 2 negatives, so sampling is exhaustive
    q, t = torch.randn(2, 3), torch.randn(2, 3)
    z, partner, label = torch.cat([q, t]), [2, 3, 0, 1], [0, 1, 0, 1]
    d = lambda a, b: (z[a] - z[b]).pow(2).sum()
    terms = [F.softplus(d(a, partner[a]) - d(a, n)) for a in range(4) for n in range(4) if label[n] != label[a]]
    loss = soft_triplet(q, t, torch.Generator().manual_seed(0), negatives_per_anchor=2)
    assert loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_soft_triplet_prefers_matched_pairs():
    t = F.normalize(torch.randn(16, 8), dim=1) * 4
    matched = soft_triplet(t.clone(), t, torch.Generator().manual_seed(0))
    shuffled = soft_triplet(t.roll(1, 0), t, torch.Generator().manual_seed(0))
    assert matched < shuffled


def test_offline_negative_hinge():
    q = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0]])
    easy = torch.tensor([[[0.0, 1.0]]])   # cos 0: margin satisfied -> 0 loss
    hard = torch.tensor([[[1.0, 0.1]]])   # cos ~0.995 > 1 - 0.2 -> positive loss
    assert offline_negative_hinge(q, t, easy, 0.2).item() == 0.0
    assert offline_negative_hinge(q, t, hard, 0.2).item() == pytest.approx(0.2 - 1 + 1 / math.sqrt(1.01), rel=1e-4)


def test_model_params_errors_name_the_key():
    with pytest.raises(ParamsError, match=r"model\.image\.encoder"):
        parse(ModelConfig, "model", {**MODEL, "image": {**MODEL["image"], "encoder": "vgg"}})
    with pytest.raises(ParamsError, match=r"model\.colour: unknown key"):
        parse(ModelConfig, "model", {**MODEL, "colour": 1})
    with pytest.raises(ParamsError, match=r"model\.embed_dim"):
        parse(ModelConfig, "model", {**MODEL, "embed_dim": "32"})
    with pytest.raises(ParamsError, match=r"image\.weights"):
        parse(ModelConfig, "model", {**MODEL, "image": {**MODEL["image"], "weights": "x.pt"}})


def test_resnet18_weights_are_read_from_a_local_file(tmp_path):
    cfg = parse(ModelConfig, "model", {**MODEL, "image": {"encoder": "resnet18", "weights": str(tmp_path / "no.pt"), "channels": [1]}})
    with pytest.raises(FileNotFoundError, match="no.pt does not exist"):
        build_model(cfg, 10, 64)
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pt")
    cfg = parse(ModelConfig, "model", {**MODEL, "image": {"encoder": "resnet18", "weights": str(tmp_path / "r18.pt"), "channels": [1]}})
    model = build_model(cfg, 10, 64)
    assert model.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 32)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_a_checkpoint_cannot_run_code_when_opened(tmp_path):
    from stages.modeling.factory import load_model
    from stages.retrieval.rerank import load_siam

    marker = tmp_path / "code-ran"
    for name in ("model.pt", "siam.pt"):
        torch.save({"model": {}, "model_config": _RunsCodeWhenUnpickled(str(marker))}, tmp_path / name)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_model(tmp_path / "model.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_siam(tmp_path / "siam.pt", torch.device("cpu"))
    assert not marker.exists()
