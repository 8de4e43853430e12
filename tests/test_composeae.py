import pytest
import torch
from torch import nn

from models.composed.composeae import ComposeAE, complex_rotation
from models.losses.composeae import RELEASED_WEIGHTS, total_loss
from models.losses.metric import batch_based_classification

D, TEXT_DIM, VOCAB = 16, 24, 10


class TinyText(nn.Module):
    """Mean of the embeddings of the real tokens."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, TEXT_DIM)

    def forward(self, tokens, lengths):
        mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).float()
        return (self.embedding(tokens) * mask[..., None]).sum(1) / lengths[:, None].float()


def make_model(**kwargs):
    torch.manual_seed(0)
    image_encoder = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, D))
    return ComposeAE(image_encoder, TinyText(), embed_dim=D, text_dim=TEXT_DIM, norm_scale=4.0, **kwargs)


def batch(b=4):
    return torch.randn(b, 3, 8, 8), torch.randint(0, VOCAB, (b, 5)), torch.randint(1, 6, (b,))


def test_shapes():
    model = make_model()
    images, tokens, lengths = batch()
    phi_x, phi_t = model.encode_image(images), model.encode_text(tokens, lengths)
    assert phi_x.shape == (4, D) and phi_t.shape == (4, TEXT_DIM)
    theta = model(images, tokens, lengths)
    assert theta.shape == (4, D)
    assert model.compose(phi_x, phi_t, conjugate=True).shape == (4, D)
    assert model.image_decoder(theta).shape == (4, D) and model.text_decoder(theta).shape == (4, TEXT_DIM)
    assert torch.allclose(model.normalize(theta).norm(dim=1), torch.full((4,), 4.0))


def test_gradients_reach_every_parameter_through_total_loss():
    model = make_model()
    images, tokens, lengths = batch()
    phi_x, phi_t, phi_target = model.encode_image(images), model.encode_text(tokens, lengths), model.encode_image(
        torch.randn(4, 3, 8, 8))
    theta = model.compose(phi_x, phi_t)
    main = batch_based_classification(model.normalize(theta), model.normalize(phi_target))
    aux = model.auxiliary_losses(phi_x, phi_t, theta, phi_target, batch_based_classification)
    assert set(aux) == {"reconstruction_image", "reconstruction_text", "rotational_symmetry"}
    loss = total_loss(main, aux)
    expected = main + 0.1 * aux["reconstruction_image"] + 0.1 * aux["reconstruction_text"] + 0.01 * aux[
        "rotational_symmetry"]
    assert RELEASED_WEIGHTS == (1.0, 0.1, 0.1, 0.01) and torch.allclose(loss, expected)
    loss.backward()
    for name, p in model.named_parameters():
        if name == "a":  # only a0, a1 are used, as in the released code
            assert p.grad[:2].abs().min() > 0 and p.grad[2:].abs().max() == 0
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_complex_rotation_known_answer_and_conjugate():
    z = torch.tensor([[2.0, -1.0, 3.0]])
    delta = torch.tensor([[0.0, torch.pi / 2, torch.pi / 3]])
    re, im = complex_rotation(z, delta)
    assert torch.allclose(re, torch.tensor([[2.0, 0.0, 1.5]]), atol=1e-6)
    assert torch.allclose(im, torch.tensor([[0.0, -1.0, 3.0 * 3 ** 0.5 / 2]]), atol=1e-6)
    re_c, im_c = complex_rotation(z, delta, conjugate=True)
    assert torch.equal(re_c, re) and torch.equal(im_c, -im)


def test_conjugate_flips_only_the_imaginary_part_in_the_model():
    model = make_model().eval()
    phi_x, phi_t = torch.randn(4, D), torch.randn(4, TEXT_DIM)
    p, p_c = model.projection_linear(phi_x, phi_t), model.projection_linear(phi_x, phi_t, conjugate=True)
    assert torch.equal(p["re"], p_c["re"]) and torch.equal(p["im"], -p_c["im"])
    assert torch.allclose(p["re"], p["z"] * torch.cos(p["delta"])) and torch.allclose(
        p["im"], p["z"] * torch.sin(p["delta"]))


def test_theta_at_init_is_ten_rho_linear_plus_rho_conv():
    model = make_model().eval()
    phi_x, phi_t = torch.randn(4, D), torch.randn(4, TEXT_DIM)
    expected = 10.0 * model.rho_linear(phi_x, phi_t) + 1.0 * model.rho_convolutional(phi_x, phi_t)
    assert torch.equal(model.compose(phi_x, phi_t), expected)


def test_as_released_conjugate_batch_limit():
    phi_x, phi_t = torch.randn(33, D), torch.randn(33, TEXT_DIM)
    assert make_model().compose(phi_x, phi_t, conjugate=True).shape == (33, D)  # no limit by default
    released = make_model(as_released_conjugate_batch_limit=True)
    assert released.compose(phi_x[:32], phi_t[:32]).shape == (32, D)
    with pytest.raises(ValueError, match="batch 33 > 32"):
        released.compose(phi_x, phi_t, conjugate=True)
