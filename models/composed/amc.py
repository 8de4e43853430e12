"""AMC: Adaptive Multi-expert Collaborative network (Zhu, Wei, Zhao, Zhang, Huang; ACM TOMM 2023),
as released in KevinLight831/AMC (model.py, router.py, cells.py, img_model.py, text_model.py, utils.py).

Names follow the paper figure (AMC_PICTURES/AMC.png): φ_r / φ_t visual tokens of the reference / target image,
ψ_m = s the modification-text sentence vector, W its word features, α^l the router weights of layer l,
R^l the output tokens of dynamic layer l, f_q the composed query, f_t the target, G_q / G_t similarity graphs.
The paper PDF could not be read: every "(eq. …)" below is a label for the formula, its number is UNVERIFIED.

    φ = Conv1x1(ResNet(I)) ∈ R^{K×d}                                   (visual encoder)
    W = LSTM(GloVe(T_m)), s = maxpool_valid(W)                          (textual encoder)
    α^l = σ(W₂ ReLU(LN(W₁ mean_k [R_k ; s])))                           (router, eq. UNVERIFIED)
    E_NIN = LN(R)                                                        (no-interaction expert)
    E_GTN = LN(R ⊙ (W_γ s + b_γ) + (W_β s + b_β))                        (global text-modulation expert)
    E_CRN = LN(SA-block(W_c [R_k ; s]))                                  (cross-modal reasoning expert)
    R^l = Σ_k α_k^l E_k(R^{l-1}, s),  R^0 = φ_r,  l = 1, 2               (dynamic layer)
    f_q = mean_k R²,  f_t = mean_k φ_t                                   (query / target)
    L = L_BBC + λ L_BSC,  λ = 1                                          (objective, models/losses/amc.py)

Expert names NIN/GTN/CRN are code comments; their expansions are UNVERIFIED.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------- encoders



class AMCTextEncoder(nn.Module):
    """Embedding(V, 300) -> 1-layer LSTM(300 -> d), zero initial state; returns (W, s).

    s is the max over time of W with padded steps filled with 0 *before* the max, as the release does
    (text_model.py): for a caption shorter than the batch maximum, s = max(max_valid W, 0) element-wise.
    GloVe initialisation: pass the rows as `word_vectors` (V × 300); reading GloVe is the caller's job.
    """

    def __init__(self, vocab_size: int, word_dim: int, hidden_dim: int, word_vectors: torch.Tensor | None = None):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, word_dim)
        if word_vectors is not None:
            self.embedding.weight.data.copy_(word_vectors)
        self.lstm = nn.LSTM(word_dim, hidden_dim, batch_first=True)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        words, _ = self.lstm(self.embedding(tokens))  # B × L × d, not packed (causal, so valid steps are exact)
        steps = torch.arange(tokens.shape[1], device=tokens.device)
        valid = steps[None, :] < lengths.to(tokens.device)[:, None]
        sentence = words.masked_fill(~valid[..., None], 0.0).max(dim=1).values
        return words, sentence


# ---------------------------------------------------------------------------------------------- router + experts


class Router(nn.Module):
    """α = σ(W₂ ReLU(LN₅₁₂(W₁ mean_k [R_k ; s]))) (cells.py Router).

    Independent sigmoid gates per expert, NOT a softmax: the weights do not sum to 1.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden, bias=False), nn.LayerNorm(hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_experts, bias=False))

    def forward(self, tokens: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        path_in = torch.cat([tokens, sentence[:, None, :].expand_as(tokens)], dim=-1)  # B × K × 2d
        return torch.sigmoid(self.mlp(path_in.mean(dim=1)))  # B × num_experts (router eq.)


class NIN(nn.Module):
    """E_NIN = LN(R): image path, no text interaction (code: Rescell)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, tokens: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        return self.norm(tokens)


class GTN(nn.Module):
    """E_GTN = LN(R ⊙ γ(s) + β(s)), γ, β affine maps of s (FiLM-like; code: StyleCell)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma, self.beta = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, tokens: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        return self.norm(tokens * self.gamma(sentence)[:, None, :] + self.beta(sentence)[:, None, :])


class SelfAttentionBlock(nn.Module):
    """Pre-LN block of cells.py SelfAttentionCell: A = MHSA(LN(H)); O = A + FFN(LN(A)).

    No residual from H to A, no output projection after the heads, no dropout (faithful to the release).
    """

    def __init__(self, dim: int, heads: int, ffn_ratio: float):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, int(dim * ffn_ratio)), nn.ReLU(), nn.Linear(int(dim * ffn_ratio), dim))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, k, d = x.shape
        q, key, v = (lin(x).view(b, k, self.heads, d // self.heads).transpose(1, 2) for lin in (self.q, self.k, self.v))
        p = torch.softmax(q @ key.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        return (p @ v).transpose(1, 2).reshape(b, k, d)  # heads concatenated, no W_o

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.attention(self.norm1(h))
        return a + self.ffn(self.norm2(a))


class CRN(nn.Module):
    """E_CRN = LN(SA-block(W_c [R_k ; s])) (code: GlobalCell)."""

    def __init__(self, dim: int, heads: int, ffn_ratio: float):
        super().__init__()
        self.fuse = nn.Linear(2 * dim, dim)
        self.block = SelfAttentionBlock(dim, heads, ffn_ratio)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, tokens: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        h = self.fuse(torch.cat([tokens, sentence[:, None, :].expand_as(tokens)], dim=-1))
        return self.norm(self.block(h))


class DynamicExpertLayer(nn.Module):
    """R' = Σ_k α_k E_k(R, s). Expert order is the release's [NIN, CRN, GTN] (router outputs 0, 1, 2)."""

    EXPERTS = ("NIN", "CRN", "GTN")

    def __init__(self, dim: int, router_hidden: int, heads: int, ffn_ratio: float):
        super().__init__()
        self.router = Router(dim, router_hidden, len(self.EXPERTS))
        self.experts = nn.ModuleList([NIN(dim), CRN(dim, heads, ffn_ratio), GTN(dim)])

    def expert_outputs(self, tokens: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        return torch.stack([e(tokens, sentence) for e in self.experts], dim=1)  # B × 3 × K × d

    def forward(self, tokens: torch.Tensor, sentence: torch.Tensor,
                alpha: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (R', α). `alpha` (B × 3) overrides the router, for tests and ablations."""
        if alpha is None:
            alpha = self.router(tokens, sentence)
        out = (alpha[:, :, None, None] * self.expert_outputs(tokens, sentence)).sum(dim=1)  # layer eq.
        return out, alpha


# ---------------------------------------------------------------------------------------------- model


class L2Normalization(nn.Module):
    """x -> x / |x| (AMC has no learned scale; the BBC temperature 10 is a constant in the loss)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x.float(), dim=-1)


class AMC(nn.Module):
    """image_trunk: images -> B × C × h × w feature map (ResNet-50 layer4 in the paper, C = 2048);
    text_encoder: (tokens, lengths) -> (W: B × L × d, s: B × d) (AMCTextEncoder, d = embed_dim).
    """

    def __init__(self, image_trunk: nn.Module, trunk_channels: int, text_encoder: nn.Module, embed_dim: int = 1024,
                 router_hidden: int = 512, heads: int = 8, ffn_ratio: float = 0.5, num_layers: int = 2,
                 freeze_trunk_bn: bool = True):
        super().__init__()
        self.image_trunk, self.text_encoder = image_trunk, text_encoder
        self.proj = nn.Conv2d(trunk_channels, embed_dim, kernel_size=1, bias=False)  # img1x1conv
        self.layers = nn.ModuleList(
            [DynamicExpertLayer(embed_dim, router_hidden, heads, ffn_ratio) for _ in range(num_layers)])
        self.freeze_trunk_bn = freeze_trunk_bn
        self.normalize = L2Normalization()

    def train(self, mode: bool = True) -> "AMC":
        """Every BatchNorm of the trunk stays in eval mode (running statistics frozen), as img_model.py does."""
        super().train(mode)
        if mode and self.freeze_trunk_bn:
            for m in self.image_trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """φ ∈ R^{B×K×d}, K = h·w (49 at 224 px)."""
        return self.proj(self.image_trunk(images)).flatten(2).transpose(1, 2)

    encode_reference = image_tokens  # φ_r: the experts read the reference's tokens

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """f_t = mean_k φ_t: the target/gallery side, un-normalised (no experts)."""
        return self.image_tokens(images).mean(dim=1)

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, s = ψ_m). W is carried but unused by the experts, as in the release."""
        return self.text_encoder(tokens, lengths)

    def expert_layers(self, phi_r: torch.Tensor, sentence: torch.Tensor,
                      alphas: Sequence[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """[R¹, R², …] and [α¹, α², …]; `alphas` forces the router outputs layer by layer."""
        outs, gates, r = [], [], phi_r
        for i, layer in enumerate(self.layers):
            r, alpha = layer(r, sentence, None if alphas is None else alphas[i])
            outs.append(r)
            gates.append(alpha)
        return outs, gates

    def routing_weights(self, phi_r: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """α^l for every layer: B × num_layers × 3, each entry in (0, 1), rows NOT normalised to 1."""
        return torch.stack(self.expert_layers(phi_r, sentence)[1], dim=1)

    def compose_layers(self, phi_r: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        """[mean_k R¹, mean_k R², …] (each B × d) from reference tokens φ_r (B × K × d) and text = encode_text(...);
        the last is f_q, all of them feed L_BSC (models.losses.amc)."""
        return [r.mean(dim=1) for r in self.expert_layers(phi_r, text[1])[0]]

    def compose(self, phi_r: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """f_q = mean_k R^L."""
        return self.compose_layers(phi_r, text)[-1]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The composed query f_q (un-normalised)."""
        return self.compose(self.image_tokens(images), self.encode_text(tokens, lengths))


# ---------------------------------------------------------------------------------------------- evaluation


def ensemble_similarity(queries: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """test_ensemble.py: concat the L2-normalised vectors of each model, re-normalise, cosine.

    With M models this equals the mean of the M cosine matrices. Not checked against the release's test_ensemble.py line by line.
    """
    q = F.normalize(torch.cat([F.normalize(x, dim=-1) for x in queries], dim=-1), dim=-1)
    t = F.normalize(torch.cat([F.normalize(x, dim=-1) for x in targets], dim=-1), dim=-1)
    return q @ t.T


def build(parts) -> AMC:
    """models/registry.py: AMC's dynamic expert layers on the last conv map, its own LSTM (words, sentence)."""
    d, options = parts.embed_dim, parts.cfg.amc
    trunk, channels = parts.last_map_trunk()
    text = parts.text_encoder(d, own_lstm=lambda t: AMCTextEncoder(parts.vocab_size, t.embed_dim, d),
                              words_and_sentence=True)
    return AMC(trunk, channels, text, d, options.router_hidden, options.heads, options.ffn_ratio, options.layers,
               options.freeze_trunk_bn)
