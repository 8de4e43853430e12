"""Dual encoder (spec §4.1) and SIAM (spec §4.3): unit outputs, gradients, text guidance, known-answer modulation."""
import math

import pytest
import torch
from torch import nn

from models.matching.dual_encoder import DualEncoder
from models.encoders import LSTMTextEncoder
from models.matching.siam import SIAM, map_regions

B, D, V = 4, 8, 10


def tiny_de(with_map: bool = True) -> DualEncoder:
    torch.manual_seed(0)
    image_tower = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6))
    text_tower = LSTMTextEncoder(V, 4, 5, 7, dropout=0.0)
    map_tower = nn.Conv2d(3, 5, 3, stride=2, padding=1) if with_map else None
    return DualEncoder(image_tower, text_tower, image_dim=6, text_dim=7, dim=D, map_tower=map_tower)


def batch():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, 3, 4, 4, generator=g), torch.randint(0, V, (B, 5), generator=g),
            torch.tensor([5, 3, 1, 2]))


def test_dual_encoder_unit_vectors_and_map():
    de = tiny_de()
    images, tokens, lengths = batch()
    v, u = de(images, tokens, lengths)
    assert v.shape == (B, D) and u.shape == (B, D)
    assert torch.allclose(v.norm(dim=1), torch.ones(B), atol=1e-6)
    assert torch.allclose(u.norm(dim=1), torch.ones(B), atol=1e-6)
    assert torch.allclose(v, de.encode_image(images)) and torch.allclose(u, de.encode_text(tokens, lengths))
    assert de.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=1e-6)
    assert de.image_map(images).shape == (B, 5, 2, 2)
    with pytest.raises(ValueError, match="map_tower"):
        tiny_de(with_map=False).image_map(images)


def test_dual_encoder_gradients_reach_both_projections():
    de = tiny_de()
    images, tokens, lengths = batch()
    v, u = de(images, tokens, lengths)
    de.loss(v, u, torch.tensor([0, 0, 1, 2])).backward()  # faithful NCE, tau = 1
    for proj in (de.image_projection, de.text_projection):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert de.logit_scale.grad is None  # only the symmetric option reads it
    de.zero_grad()
    v, u = de(images, tokens, lengths)
    de.loss(v, u, torch.tensor([0, 0, 1, 2]), symmetric=True).backward()
    assert de.logit_scale.grad is not None and de.logit_scale.grad.abs() > 0


def tiny_siam() -> SIAM:
    torch.manual_seed(0)
    return SIAM(region_dim=5, map_channels=5, map_size=(2, 2), dim=D)


def test_siam_shape_unit_norm_and_text_guidance():
    siam = tiny_siam()
    g = torch.Generator().manual_seed(2)
    fmap = torch.randn(B, 5, 2, 2, generator=g)
    regions = map_regions(fmap)
    assert regions.shape == (B, 4, 5)
    assert torch.equal(regions[1, 1 * 2 + 0], fmap[1, :, 1, 0])  # cell (row 1, col 0) is region 2, row-major
    text_a, text_b = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    out_a, out_b = siam(regions, fmap, text_a), siam(regions, fmap, text_b)
    assert out_a.shape == (B, D)
    assert torch.allclose(out_a.norm(dim=1), torch.ones(B), atol=1e-6)
    assert (out_a - out_b).abs().max() > 1e-4  # the image feature depends on the query text
    with pytest.raises(ValueError, match="built for"):
        siam(regions, torch.randn(B, 5, 3, 3), text_a)


def test_siam_aggregate_has_no_softmax():
    siam = SIAM(region_dim=2, map_channels=1, map_size=(2, 2), dim=2)
    with torch.no_grad():
        siam.roi_linear.weight.copy_(torch.eye(2))
        siam.roi_linear.bias.zero_()
    regions = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # r_1 = (1, 0), r_2 -> L2norm (0, 2) = (0, 1)
    text = torch.tensor([[0.6, -0.8]])  # w = (.6, -.8): a negative weight survives (a softmax would not allow it)
    # a = .6 (1, 0) - .8 (0, 1) = (.6, -.8)
    assert torch.allclose(siam.aggregate(regions, text), torch.tensor([[0.6, -0.8]]), atol=1e-6)


def test_siam_modulation_known_answer():
    siam = SIAM(region_dim=2, map_channels=1, map_size=(2, 2), dim=2)
    with torch.no_grad():
        for lin, bias in ((siam.alpha_linear, [0.5, -1.0]), (siam.beta_linear, [2.0, 0.0]),
                          (siam.gamma_linear, [0.1])):
            lin.weight.zero_()  # alpha, beta, gamma = the biases whatever a is
            lin.bias.copy_(torch.tensor(bias))
        siam.image_linear.weight.copy_(torch.tensor([[3.0], [4.0]]))
        siam.image_linear.bias.zero_()
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # 1 channel, 2 x 2
    regions, text = torch.randn(1, 3, 2), torch.randn(1, 2)
    # X'[r, c] = X[r, c] (1 + alpha_r + beta_c + gamma), alpha = (.5, -1) rows, beta = (2, 0) cols, gamma = .1
    # (0,0): 1 * 3.6 = 3.6   (0,1): 2 * 1.6 = 3.2   (1,0): 3 * 2.1 = 6.3   (1,1): 4 * .1 = .4
    expected = torch.tensor([[[[3.6, 3.2], [6.3, 0.4]]]])
    assert torch.allclose(siam.modulated_map(regions, x, text), expected, atol=1e-6)
    # avg-pool 3.375 -> L2norm of a 1-vector = 1 -> Linear: (3, 4) -> L2norm (.6, .8)
    assert torch.allclose(siam(regions, x, text), torch.tensor([[0.6, 0.8]]), atol=1e-6)


def test_siam_rerank_scores_are_cosines_with_the_text():
    siam = tiny_siam()
    g = torch.Generator().manual_seed(4)
    n = 6
    maps = torch.randn(n, 5, 2, 2, generator=g)
    text = torch.randn(D, generator=g)
    scores = siam.rerank_scores(map_regions(maps), maps, text)
    assert scores.shape == (n,)
    unit = text / text.norm()
    feats = siam(map_regions(maps), maps, unit.expand(n, D))
    assert torch.allclose(scores, feats @ unit, atol=1e-6)
    assert scores.abs().max() <= 1 + 1e-6
    # only SIAM's own layers learn from the scores
    scores.sum().backward()
    names = {name for name, p in siam.named_parameters() if p.grad is not None}
    assert {"roi_linear.weight", "alpha_linear.weight", "beta_linear.weight", "gamma_linear.weight",
            "image_linear.weight"} <= names
