"""ComposeAE (Anwaar, Labintcev, Kleinsteuber, WACV 2021), as in ecom-research/ComposeAE.

Paper names (equation numbers UNVERIFIED, not checked against the PDF):

    z = η(φ_x),  δ = γ(φ_t)                                  image / text projections
    φ = z ⊙ e^{jδ}:  re = z ⊙ cos δ,  im = c · z ⊙ sin δ      complex rotation, c = ±1
    θ = a1 · ρ([re; im]) + a0 · ρ_conv(z, δ, φ_x, re, im)     composed query, 10·ρ + ρ_conv at init
    L = L_base + λ1 · L_RI + λ2 · L_RT + μ · L_RS              L_RI/L_RT: MSE reconstructions of φ_x/φ_t
                                                               from θ; L_RS: rotational symmetry

Released-code details kept here:
* ρ and ρ_conv each own a separate ComplexProjection (two `ComplexProjectionModule()` instances),
  so η and γ are learnt twice, once per mapping.
* η has Dropout(0.5) after its first Linear, before the ReLU; γ has none.
* The conv branch flattens 64 channels x 16 pooled positions = 1024 before its MLP, whatever d is.
* The released conjugate vector is a fixed 32 x 1 tensor sliced to the batch; that limit is
  reproduced only with `as_released_conjugate_batch_limit=True`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .tirg import NormalizationLayer

RELEASED_CONJUGATE_ROWS = 32
CONV_CHANNELS, CONV_POSITIONS = 64, 16


def complex_rotation(z: torch.Tensor, delta: torch.Tensor,
                     conjugate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of z ⊙ e^{±jδ}: (z cos δ, c · z sin δ), c = -1 if conjugate else +1."""
    c = -1.0 if conjugate else 1.0
    return z * torch.cos(delta), c * z * torch.sin(delta)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """BN -> ReLU -> Linear -> ReLU -> Linear: the released form of ρ, ρ_conv's head and both decoders."""
    return nn.Sequential(
        nn.BatchNorm1d(in_dim), nn.ReLU(), nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, out_dim)
    )


class ComplexProjection(nn.Module):
    """z = η(φ_x), δ = γ(φ_t), then the complex rotation of z by δ."""

    def __init__(self, embed_dim: int, text_dim: int):
        super().__init__()
        d = embed_dim
        self.eta = nn.Sequential(  # η: image -> complex amplitude
            nn.BatchNorm1d(d), nn.Linear(d, d), nn.Dropout(0.5), nn.ReLU(), nn.Linear(d, d)
        )
        self.gamma = nn.Sequential(  # γ: text -> rotation angle
            nn.BatchNorm1d(text_dim), nn.Linear(text_dim, d), nn.ReLU(), nn.Linear(d, d)
        )

    def forward(self, phi_x: torch.Tensor, phi_t: torch.Tensor, conjugate: bool = False) -> dict[str, torch.Tensor]:
        z, delta = self.eta(phi_x), self.gamma(phi_t)
        re, im = complex_rotation(z, delta, conjugate)
        return {"z": z, "delta": delta, "re": re, "im": im}


class ComposeAE(nn.Module):
    # The release's named_parameters() order (GA img_text_composition_models.py ComposeAE): its own `a` first (PyTorch
    # yields a module's own parameters before its children's), then normalization_layer, img_model, text_model,
    # encoderLinear (ComplexProjectionModule: bert_features = γ, then image_features = η;
    # LinearMapping = ρ), encoderWithConv (γ, η; ConvMapping: mapping = ρ_conv's head, then conv), decoder, txtdecoder.
    RELEASED_PARAMETER_ORDER = ("a", "normalize", "image_encoder", "text_encoder", "projection_linear.gamma",
                                "projection_linear.eta", "rho", "projection_conv.gamma", "projection_conv.eta",
                                "rho_conv_head", "conv", "image_decoder", "text_decoder")

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, embed_dim: int, text_dim: int,
                 norm_scale: float, as_released_conjugate_batch_limit: bool = False):
        super().__init__()
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        d = embed_dim
        self.as_released_conjugate_batch_limit = as_released_conjugate_batch_limit
        self.a = nn.Parameter(torch.tensor([1.0, 10.0, 1.0, 1.0]))  # only a0, a1 are used
        self.projection_linear = ComplexProjection(d, text_dim)
        self.projection_conv = ComplexProjection(d, text_dim)
        self.rho = _mlp(2 * d, d, d)
        self.conv = nn.Conv1d(5, CONV_CHANNELS, kernel_size=3, padding=1)
        self.pool = nn.AdaptiveMaxPool1d(CONV_POSITIONS)
        self.rho_conv_head = _mlp(CONV_CHANNELS * CONV_POSITIONS, d, d)
        self.image_decoder = _mlp(d, d, d)
        self.text_decoder = _mlp(d, text_dim, text_dim)
        self.normalize = NormalizationLayer(norm_scale)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """φ_x: the target/gallery side, un-normalised."""
        return self.image_encoder(images)

    encode_reference = encode_image  # the query side reads the same φ_x

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """φ_t."""
        return self.text_encoder(tokens, lengths)

    def rho_linear(self, phi_x: torch.Tensor, phi_t: torch.Tensor, conjugate: bool = False) -> torch.Tensor:
        """ρ([re; im])."""
        p = self.projection_linear(phi_x, phi_t, conjugate)
        return self.rho(torch.cat([p["re"], p["im"]], dim=1))

    def rho_convolutional(self, phi_x: torch.Tensor, phi_t: torch.Tensor, conjugate: bool = False) -> torch.Tensor:
        """ρ_conv over the 5-channel sequence (z, δ, φ_x, re, im)."""
        p = self.projection_conv(phi_x, phi_t, conjugate)
        x = torch.stack([p["z"], p["delta"], phi_x, p["re"], p["im"]], dim=1)  # B x 5 x d
        return self.rho_conv_head(self.pool(self.conv(x)).flatten(1))

    def compose(self, phi_x: torch.Tensor, phi_t: torch.Tensor, conjugate: bool = False) -> torch.Tensor:
        """θ = a1 · ρ + a0 · ρ_conv (un-normalised)."""
        if self.as_released_conjugate_batch_limit and phi_x.shape[0] > RELEASED_CONJUGATE_ROWS:
            raise ValueError(
                f"batch {phi_x.shape[0]} > {RELEASED_CONJUGATE_ROWS}: the released ComposeAE slices a fixed "
                f"{RELEASED_CONJUGATE_ROWS}-row conjugate vector; use as_released_conjugate_batch_limit=False"
            )
        return self.a[1] * self.rho_linear(phi_x, phi_t, conjugate) + self.a[0] * self.rho_convolutional(
            phi_x, phi_t, conjugate
        )

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The composed query θ (un-normalised)."""
        return self.compose(self.encode_image(images), self.encode_text(tokens, lengths))

    def auxiliary_losses(self, phi_x: torch.Tensor, phi_t: torch.Tensor, theta: torch.Tensor,
                         phi_target: torch.Tensor,
                         metric_loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         ) -> dict[str, torch.Tensor]:
        """L_RI, L_RT (decoders on θ) and L_RS (target rotated by the conjugate must match the source)."""
        rotated_target = self.compose(phi_target, phi_t, conjugate=True)
        return {
            "reconstruction_image": F.mse_loss(self.image_decoder(theta), phi_x),
            "reconstruction_text": F.mse_loss(self.text_decoder(theta), phi_t),
            "rotational_symmetry": metric_loss_fn(self.normalize(rotated_target), self.normalize(phi_x)),
        }


def build(parts) -> ComposeAE:
    """models/registry.py: ComposeAE on the image vector and a text vector. With a frozen sentence encoder
    (model.text.encoder: minilm) the text vector is its features as they come, 384-d, no trainable projection:
    the release feeds frozen BERT features straight into γ and reconstructs those features (L_RT)."""
    d = parts.embed_dim
    image = parts.vector_encoder()
    frozen = parts.cfg.text.encoder == "minilm"
    text = parts.text_encoder(None if frozen else d)
    return ComposeAE(image, text, d, text.out_dim if frozen else d, parts.norm_scale,
                     parts.cfg.composeae.as_released_conjugate_batch_limit)
