"""AMC (Zhu et al., TOMM 2023): shapes, router, expert combination, losses, ensemble, EMA."""
import torch
import torch.nn.functional as F
from torch import nn

from models.composed.amc import AMC, AMCTextEncoder, DynamicExpertLayer, ensemble_similarity
from stages.training.ema import EMA
from models.losses.amc import amc_loss, bbc_loss, bsc_loss

D, B, V = 16, 4, 12


def tiny_trunk() -> nn.Module:
    # 32 px -> 4 × 4 grid, 8 channels, with a BatchNorm to check the frozen-BN rule
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=4, padding=1))


def tiny_model() -> AMC:
    torch.manual_seed(0)
    return AMC(tiny_trunk(), 8, AMCTextEncoder(V, 6, D), embed_dim=D, router_hidden=8, heads=4)


def batch():
    g = torch.Generator().manual_seed(1)
    images, targets = torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g)
    tokens, lengths = torch.randint(0, V, (B, 5), generator=g), torch.tensor([5, 3, 1, 2])
    return images, tokens, lengths, targets


def test_shapes_and_interface():
    model = tiny_model().eval()
    images, tokens, lengths, targets = batch()
    phi = model.image_tokens(images)
    assert phi.shape == (B, 16, D)
    words, s = model.encode_text(tokens, lengths)
    assert words.shape == (B, 5, D) and s.shape == (B, D)
    assert model(images, tokens, lengths).shape == (B, D)
    assert torch.allclose(model.compose(phi, (words, s)), model(images, tokens, lengths))
    assert torch.allclose(model.encode_image(targets), model.image_tokens(targets).mean(1))
    assert torch.allclose(model.normalize(model(images, tokens, lengths)).norm(dim=1), torch.ones(B))


def test_sentence_is_release_max_pool_with_zero_padding():
    enc = AMCTextEncoder(V, 6, D)
    tokens, lengths = torch.randint(0, V, (2, 4)), torch.tensor([4, 2])
    words, s = enc(tokens, lengths)
    assert torch.allclose(s[0], words[0].max(0).values)
    assert torch.allclose(s[1], words[1, :2].max(0).values.clamp(min=0))  # padded steps count as 0


def test_routing_weights_are_per_sample_independent_sigmoid_gates():
    model = tiny_model().eval()
    images, tokens, lengths, _ = batch()
    alpha = model.routing_weights(model.image_tokens(images), model.encode_text(tokens, lengths)[1])
    assert alpha.shape == (B, 2, 3)
    assert ((alpha > 0) & (alpha < 1)).all()
    assert not torch.allclose(alpha[0], alpha[1])  # per sample
    # sigmoid gates (release), not a softmax: rows need not sum to 1
    assert not torch.allclose(alpha.sum(-1), torch.ones(B, 2))
    layer, phi, s = model.layers[0], model.image_tokens(images), model.encode_text(tokens, lengths)[1]
    pooled = torch.cat([phi.mean(1), s], -1)
    assert torch.allclose(alpha[:, 0], torch.sigmoid(layer.router.mlp(pooled)), atol=1e-6)


def test_expert_combination_known_answer():
    torch.manual_seed(0)
    layer = DynamicExpertLayer(D, 8, heads=4, ffn_ratio=0.5)
    tokens, s = torch.randn(2, 5, D), torch.randn(2, D)
    alpha = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3]])
    out, used = layer(tokens, s, alpha)
    assert used is alpha
    nin = F.layer_norm(tokens, (D,))
    gtn_mod = layer.experts[2]
    gtn = F.layer_norm(tokens * gtn_mod.gamma(s)[:, None] + gtn_mod.beta(s)[:, None], (D,))
    crn = layer.experts[1](tokens, s)
    assert torch.allclose(out[0], nin[0], atol=1e-6)  # only NIN switched on
    assert torch.allclose(out[1], 0.2 * nin[1] + 0.5 * crn[1] + 0.3 * gtn[1], atol=1e-6)
    # CRN by hand: pre-LN attention (no W_o, no residual from H), FFN residual, final LN without affine
    crn_mod = layer.experts[1]
    blk = crn_mod.block
    h = crn_mod.fuse(torch.cat([tokens, s[:, None].expand_as(tokens)], -1))
    x = blk.norm1(h)
    heads = lambda t: t.view(2, 5, 4, D // 4).transpose(1, 2)
    q, k, v = heads(blk.q(x)), heads(blk.k(x)), heads(blk.v(x))
    a = (torch.softmax(q @ k.transpose(-1, -2) / (D // 4) ** 0.5, -1) @ v).transpose(1, 2).reshape(2, 5, D)
    assert torch.allclose(crn, F.layer_norm(a + blk.ffn(blk.norm2(a)), (D,)), atol=1e-5)
    # forced gates in a stacked model propagate layer by layer
    model = tiny_model().eval()
    phi = torch.randn(2, 16, D)
    ones = torch.tensor([[1.0, 0.0, 0.0]] * 2)
    outs, _ = model.expert_layers(phi, torch.randn(2, D), [ones, ones])
    assert torch.allclose(outs[1], F.layer_norm(F.layer_norm(phi, (D,)), (D,)), atol=1e-5)


def test_losses_equal_their_formulas():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    t = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    qn, tn = q / q.norm(dim=1, keepdim=True), t / t.norm(dim=1, keepdim=True)
    logits = 10 * qn @ tn.T
    expected = -sum(torch.log_softmax(logits[i], 0)[i] for i in range(3)) / 3
    assert torch.allclose(bbc_loss(q, t), expected)
    gq, gt = qn @ qn.T, tn @ tn.T
    assert torch.allclose(bsc_loss(q, t), ((gq - gt) ** 2).sum() / 9)
    r1, r2 = torch.randn(3, 2), q
    total, terms = amc_loss([r1, r2], t, sim_weight=0.5)
    assert torch.allclose(terms["bbc"], expected)
    assert torch.allclose(terms["bsc"], bsc_loss(torch.cat([r1, r2], 1), t))
    assert torch.allclose(total, terms["bbc"] + 0.5 * terms["bsc"])


def test_gradients_reach_every_parameter_and_trunk_bn_is_frozen():
    model = tiny_model().train()
    bn = model.image_trunk[1]
    assert not bn.training and model.layers[0].router.training
    before = bn.running_mean.clone()
    images, tokens, lengths, targets = batch()
    layers = model.compose_layers(model.encode_reference(images), model.encode_text(tokens, lengths))
    total, terms = amc_loss(layers, model.encode_image(targets))  # the training path (models.losses LOSSES['amc'])
    assert set(terms) == {"bbc", "bsc"} and torch.isfinite(total)
    total.backward()
    assert torch.equal(bn.running_mean, before)
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_ensemble_is_the_mean_of_cosines():
    g = torch.Generator().manual_seed(2)
    q1, q2, t1, t2 = (torch.randn(3, 5, generator=g) for _ in range(4))
    cos = lambda a, b: F.normalize(a, dim=1) @ F.normalize(b, dim=1).T
    assert torch.allclose(ensemble_similarity([q1, q2], [t1, t2]), (cos(q1, t1) + cos(q2, t2)) / 2, atol=1e-6)
    assert torch.allclose(ensemble_similarity([q1], [t1]), cos(q1, t1), atol=1e-6)


def test_ema_average_and_restore_flag():
    net = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(net.weight)
    ema = EMA(net, decay=0.5)
    with torch.no_grad():
        net.weight.fill_(4.0)
    ema.update()  # shadow = 0.5·0 + 0.5·4 = 2
    with ema.average_for_eval() as m:
        assert torch.allclose(m.weight, torch.full((1, 2), 2.0))
    assert torch.allclose(net.weight, torch.full((1, 2), 4.0))  # restored (default)
    with ema.average_for_eval(restore=False):
        pass
    assert torch.allclose(net.weight, torch.full((1, 2), 2.0))  # release quirk: training continues from EMA
