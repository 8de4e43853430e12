import math

import pytest
import torch
from torch import nn

from models.composed.val import (
    VAL,
    CompositeTransformer,
    VALTextEncoder,
    level_map_sizes,
    resnet_levels,
    scaled_dot_attention,
)
from models.losses.val import bidirectional_matching_loss, val_loss

# the full-map spatial-gate kernel is even-sized; torch warns that SAME padding then copies the input
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


class TinyTrunk(nn.Module):
    """Three conv stages (stride 2 each) -> maps of 4, 6, 8 channels."""

    channels = [4, 6, 8]

    def __init__(self):
        super().__init__()
        c_in, self.stages = 3, nn.ModuleList()
        for c in self.channels:
            self.stages.append(nn.Sequential(nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.ReLU()))
            c_in = c

    def forward(self, x):
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps


def tiny_val(image_size=32, text_dim=10):
    torch.manual_seed(0)
    trunk = TinyTrunk()
    text = VALTextEncoder(vocab_size=20, word_dim=5, hidden_dim=12, out_dim=text_dim)
    return VAL(trunk, TinyTrunk.channels, text, text_dim, level_map_sizes(trunk, image_size))


def batch(b=4, image_size=32, n=5):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(b, 3, image_size, image_size, generator=g)
    tokens = torch.randint(1, 20, (b, n), generator=g)
    lengths = torch.tensor([5, 3, 4, 1][:b])
    return images, tokens, lengths


def test_shapes_per_level():
    model = tiny_val()
    images, tokens, lengths = batch()
    assert level_map_sizes(model.trunk, 32) == [(16, 16), (8, 8), (4, 4)]
    maps = model.composite_maps(model.encode_reference(images), model.encode_text(tokens, lengths))
    for y, x, c in zip(maps, model.trunk(images), TinyTrunk.channels):
        assert y.shape == x.shape == (4, c, y.shape[2], y.shape[3])
    f, g = model(images, tokens, lengths), model.encode_image(images)
    assert [v.shape for v in f] == [v.shape for v in g] == [(4, 4), (4, 6), (4, 8)]
    for v in f + g:
        torch.testing.assert_close(v.norm(dim=-1), torch.ones(4))
    s = model.similarity(f, g)
    assert s.shape == (4, 4) and s.max() <= 3 + 1e-5


def test_composite_keeps_shape_and_initial_output_is_gated_x():
    torch.manual_seed(0)
    ct = CompositeTransformer(channels=6, text_dim=3, map_size=(5, 7))
    x, t = torch.randn(2, 6, 5, 7), torch.randn(2, 3)
    y = ct(x, t)
    assert y.shape == x.shape
    # w_s = 0 at init: y = A ⊙ x with A ∈ (0, 1)
    a = ct.joint_attention(ct.fuse(torch.cat([x, t[:, :, None, None].expand(-1, -1, 5, 7)], 1)))
    torch.testing.assert_close(y, a * x)
    assert (a > 0).all() and (a < 1).all()


def test_scaled_dot_attention_known_answer():
    q = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    k = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    v = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]]])
    # row 0: q·k = [2, 0, 1] / √2; row 1: [0, 2, 2] / √2
    expected = []
    for logits in ([2, 0, 1], [0, 2, 2]):
        w = torch.softmax(torch.tensor(logits, dtype=torch.float) / math.sqrt(2), 0)
        expected.append(w @ v[0])
    torch.testing.assert_close(scaled_dot_attention(q, k, v), torch.stack(expected)[None])


def test_self_attention_with_identity_projections_known_answer():
    torch.manual_seed(0)
    ct = CompositeTransformer(channels=4, text_dim=2, map_size=(1, 2), num_heads=2).eval()
    for proj in (*ct.query, *ct.key, *ct.value):
        nn.init.eye_(proj.weight)
    ct.merge = nn.Identity()
    # v: 1×4×1×2; head 0 = channels 0-1, head 1 = channels 2-3; positions p0, p1
    v = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]], [[2.0, 0.0]], [[0.0, 0.0]]]])
    out = ct.self_attention(v)
    # head 0: z = [[1,0],[0,1]] -> S = softmax(I/√2) rows; o = S z = S
    a = math.exp(1 / math.sqrt(2))
    s0 = torch.tensor([[a, 1.0], [1.0, a]]) / (a + 1)
    # head 1: z = [[2,0],[0,0]] -> logits [[4/√2, 0],[0, 0]]; o = S z -> first column S[:,0]*2
    e = math.exp(4 / math.sqrt(2))
    s1 = torch.tensor([[e / (e + 1), 1 / (e + 1)], [0.5, 0.5]])
    z1 = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    expected = torch.cat([s0 @ torch.eye(2), s1 @ z1], dim=1)  # N×C
    torch.testing.assert_close(out[0, :, 0, :].T, expected)


def test_gradients_reach_every_parameter():
    model = tiny_val().train()
    for ct in model.transformers:  # w_s = 0 at init blocks the self-attention path's gradient
        nn.init.constant_(ct.w_self, 0.5)
    images, tokens, lengths = batch()
    targets = torch.randn_like(images)
    loss = val_loss(model(images, tokens, lengths), model.encode_image(targets), margin=4.0, semi_hard=False)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing


def test_matching_loss_hand_values():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # d⁺ = [0, 0.4]; d(f0,g1) = 0.8, d(f1,g0) = 2; no semi-hard mask: L₁ = mean(relu(0-0.8+.2), relu(.4-2+.2)) = 0
    # g→f: d(g0,f1) = 2, d(g1,f0) = 0.8 -> mean(0, relu(.4-.8+.2)) = 0
    assert bidirectional_matching_loss(f, g, semi_hard=False).item() == pytest.approx(0.0)
    assert bidirectional_matching_loss(f, g, margin=1.0, semi_hard=False).item() == pytest.approx(
        (0.2 + 0.0) / 2 + (0.0 + 0.6) / 2)
    # identical pairs: every negative with d_ij >= d⁺ = 0 is kept, same as without semi-hard
    torch.testing.assert_close(bidirectional_matching_loss(f, f, margin=1.5), bidirectional_matching_loss(f, f, margin=1.5, semi_hard=False))


def test_semi_hard_modes_differ_as_documented():
    # row 0 negative d(f0,g1)=0.8 is < d⁺_1 = 3.6 (column rule drops it) but > d⁺_0 = 0 (row rule keeps it)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    g = torch.tensor([[1.0, 0.0], [0.6, -0.8]])
    d_pos1 = ((f[1] - g[1]) ** 2).sum().item()
    assert d_pos1 == pytest.approx(3.6)
    row = bidirectional_matching_loss(f, g, margin=1.0, semi_hard_mode="row")
    released = bidirectional_matching_loss(f, g, margin=1.0, semi_hard_mode="as_released")
    assert row.item() != pytest.approx(released.item())
    with pytest.raises(ValueError):
        bidirectional_matching_loss(f, g, semi_hard_mode="nope")


def test_resnet18_levels_at_64px():
    trunk, channels = resnet_levels(18)
    assert channels == [128, 256, 512]
    maps = trunk(torch.randn(2, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]


def test_text_encoder_max_pools_valid_steps_only():
    torch.manual_seed(0)
    enc = VALTextEncoder(vocab_size=10, word_dim=4, hidden_dim=6, out_dim=3).eval()
    tokens = torch.tensor([[1, 2, 3], [1, 2, 9]])
    out = enc(tokens, torch.tensor([2, 2]))
    torch.testing.assert_close(out[0], out[1])  # padding position ignored
