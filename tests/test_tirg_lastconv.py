"""TIRG-LastConv (models/composed/tirg_lastconv.py): gated residual on the last conv map."""
import pytest
import torch
from torch import nn

from models.encoders import LSTMTextEncoder
from models.losses.metric import batch_based_classification
from models.composed.tirg_lastconv import TIRGLastConv
from models.encoders import resnet_last_map

VOCAB, B = 20, 3


def _model(channels=8, text_dim=5, out_dim=6, extractor=None):
    extractor = extractor or nn.Sequential(nn.Conv2d(3, channels, 3, stride=4, padding=1), nn.ReLU())
    text = LSTMTextEncoder(VOCAB, embed_dim=8, hidden_dim=8, out_dim=text_dim, dropout=0.1)
    return TIRGLastConv(extractor, nn.Linear(channels, out_dim), text, channels, text_dim, norm_scale=4.0)


def _text(b=B, length=4):
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, VOCAB, (b, length), generator=g), torch.tensor([4, 2, 1][:b])


def test_shapes_with_a_tiny_extractor():
    torch.manual_seed(0)
    m = _model()
    images = torch.randn(B, 3, 32, 32)
    tokens, lengths = _text()
    x = m.feature_extractor(images)
    assert x.shape == (B, 8, 8, 8)
    assert m.compose_maps(x, m.encode_text(tokens, lengths)).shape == x.shape
    q, t = m(images, tokens, lengths), m.encode_image(images)
    assert q.shape == t.shape == (B, 6)
    assert torch.allclose(m.normalize(q).norm(dim=1), torch.full((B,), 4.0))


def test_shapes_with_the_resnet18_trunk():
    torch.manual_seed(0)
    trunk, channels = resnet_last_map(18)
    assert channels == 512
    m = _model(channels=channels, text_dim=16, out_dim=32, extractor=trunk)
    images = torch.randn(2, 3, 64, 64)
    tokens, lengths = _text(2)
    assert trunk(images).shape == (2, 512, 2, 2)
    assert m(images, tokens, lengths).shape == m.encode_image(images).shape == (2, 32)


def test_resnet_trunk_keeps_torchvision_key_names():
    trunk, channels = resnet_last_map(50)
    assert channels == 2048
    assert {"conv1.weight", "bn1.weight", "layer4.2.conv3.weight"} <= set(trunk.state_dict())
    with pytest.raises(ValueError):
        resnet_last_map(34)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = _model()
    tokens, lengths = _text()
    q = m.normalize(m(torch.randn(B, 3, 32, 32), tokens, lengths))
    t = m.normalize(m.encode_image(torch.randn(B, 3, 32, 32)))
    batch_based_classification(q, t).backward()
    for name, p in m.named_parameters():
        if name == "a":
            assert p.grad[:2].abs().min() > 0 and (p.grad[2:] == 0).all()  # only a0, a1 are used
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_composition_known_answer():
    """Gate = zero weights + bias b_g ⇒ T_g ≡ b_g; residual = centre-tap identities ⇒ R = ReLU(BN(T)) = ReLU(φ_t)/√(1+ε).

    Then X' = a0·σ(b_g)⊙X + a1·ReLU(φ_t)/√(1+ε) (eq. 1), tiled over h×w; f = FC(mean_hw X').
    """
    c = 4
    m = _model(channels=c, text_dim=c, out_dim=3).eval()  # BN2d with running stats (0, 1)
    b_g = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    with torch.no_grad():
        m.a.copy_(torch.tensor([1.5, 10.0, 9.0, 9.0]))
        for conv in (m.gate[1], m.gate[3], m.residual[1], m.residual[3]):
            conv.weight.zero_()
            conv.bias.zero_()
        m.gate[3].bias.copy_(b_g)
        res_conv1, res_conv2 = m.residual[1], m.residual[3]
        res_conv1.weight[:, :, 1, 1] = torch.eye(2 * c)  # identity on Z = [X; T]
        res_conv2.weight[:, c:, 1, 1] = torch.eye(c)  # pick the text half
        x = torch.randn(B, c, 3, 5)
        phi_t = torch.randn(B, c)
        out = m.compose_maps(x, phi_t)
        eps = m.residual[0].eps
        res = torch.relu(phi_t)[:, :, None, None] / (1 + eps) ** 0.5
        expected = 1.5 * torch.sigmoid(b_g)[None, :, None, None] * x + 10.0 * res
        assert torch.allclose(out, expected, atol=1e-6)
        f = m.pool_fc(out)
        assert torch.allclose(f, m.image_fc(expected.mean(dim=(2, 3))), atol=1e-6)
