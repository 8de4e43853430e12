"""VAL: Visiolinguistic Attention Learning (Chen, Gong, Bazzani, CVPR 2020), ported from yanbeic/VAL.

Per level ℓ ∈ {low, mid, high} a composite transformer reads the reference map x^ℓ (h×w×C) and the
sentence vector t and writes a composite map y^ℓ of the same shape (nets/attention.py attention_model):

    v   = conv1×1_C([x ; tile_{h×w}(t)])                                 (fusion)
    A   = σ(conv1×1_C(GAP(v))) ⊙ σ(conv_{h×w→1}(mean_C(v)))              (joint attention, "preservation")
    o   = conv1×1_C(concat_heads softmax(Q Kᵀ / √(C/2)) V)                (self-attention, "transformation")
    y   = w_j · (A ⊙ x) + w_s · o,      w_j = 1, w_s = 0 at init           (composite output)
    f^ℓ = L2norm(GAP(y^ℓ)),  g^ℓ = L2norm(GAP(x_target^ℓ))                 (level descriptors)

Loss (model.py bidirectional_matching_loss): per level a bidirectional semi-hard triplet loss on squared
Euclidean distances, margin 0.2, summed over the three levels (models/losses/val.py).
Paper equation numbers are UNVERIFIED (the paper PDF was not read); the comments name the release's steps.
Every "conv" is a slim conv2d = conv (no bias) + BatchNorm + ReLU (ResNet scope) / ReLU6 (MobileNet scope).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn


def slim_conv(c_in: int, c_out: int, kernel_size: int | tuple[int, int] = 1, activation: str = "relu") -> nn.Sequential:
    """slim.conv2d under the ResNet/MobileNet arg scopes: conv (bias-free, SAME padding) + BN + ReLU/ReLU6."""
    act = {"relu": nn.ReLU, "relu6": nn.ReLU6}[activation]
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size, padding="same", bias=False), nn.BatchNorm2d(c_out), act())


def scaled_dot_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: nn.Module | None = None) -> torch.Tensor:
    """softmax(Q Kᵀ / √d) V over N positions; q, k, v: B×N×d. Dropout (keep 0.9 in the release) acts on S."""
    s = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
    if dropout is not None:
        s = dropout(s)
    return s @ v


class CompositeTransformer(nn.Module):
    """One level's composite transformer: (x: B×C×h×w, t: B×D) -> y: B×C×h×w.

    The spatial-attention kernel covers the whole map, so (h, w) is fixed at construction.
    The release names the three projections "keys, values, queries" and computes softmax(keys·valuesᵀ)·queries;
    here they are called query/key/value (same computation, renamed).
    """

    def __init__(self, channels: int, text_dim: int, map_size: tuple[int, int], num_heads: int = 2,
                 attention_dropout: float = 0.1, activation: str = "relu"):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
        c, hidden = channels, channels // num_heads
        self.num_heads, self.map_size = num_heads, tuple(map_size)
        self.fuse = slim_conv(c + text_dim, c, 1, activation)                # v
        self.channel_gate = slim_conv(c, c, 1, activation)                   # a_ch (on GAP(v))
        self.spatial_gate = slim_conv(1, 1, self.map_size, activation)       # a_sp (full-map kernel, SAME)
        self.query = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(num_heads))
        self.key = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(num_heads))
        self.value = nn.ModuleList(nn.Linear(hidden, hidden, bias=False) for _ in range(num_heads))
        self.attention_dropout = nn.Dropout(attention_dropout)
        self.merge = slim_conv(c, c, 1, activation)                          # conv1×1_C after concat heads
        self.w_joint = nn.Parameter(torch.tensor(1.0))                       # 'r_weight'
        self.w_self = nn.Parameter(torch.tensor(0.0))                        # 'weight'

    def joint_attention(self, v: torch.Tensor) -> torch.Tensor:
        """A = σ(a_ch) ⊙ σ(a_sp), B×C×h×w (sigmoid on top of the conv's own BN+ReLU, as released)."""
        a_ch = self.channel_gate(v.mean(dim=(2, 3), keepdim=True))           # B×C×1×1
        a_sp = self.spatial_gate(v.mean(dim=1, keepdim=True))                # B×1×h×w
        return torch.sigmoid(a_ch) * torch.sigmoid(a_sp)

    def self_attention(self, v: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over the h·w positions, heads = channel chunks of v; B×C×h×w."""
        b, c, h, w = v.shape
        heads = []
        for i, chunk in enumerate(v.chunk(self.num_heads, dim=1)):
            z = chunk.flatten(2).transpose(1, 2)                             # B×N×(C/heads)
            o = scaled_dot_attention(self.query[i](z), self.key[i](z), self.value[i](z), self.attention_dropout)
            heads.append(o.transpose(1, 2).reshape(b, -1, h, w))
        return self.merge(torch.cat(heads, dim=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.map_size:
            raise ValueError(f"map size {tuple(x.shape[2:])} != constructed {self.map_size}")
        tiled = t[:, :, None, None].expand(-1, -1, *x.shape[2:])
        v = self.fuse(torch.cat([x, tiled], dim=1))                          # fusion
        return self.w_joint * self.joint_attention(v) * x + self.w_self * self.self_attention(v)  # A ⊙ x, not v


class ResNetLevels(nn.Module):
    """torchvision ResNet trunk returning [layer2, layer3, layer4] maps (low, mid, high).

    Differs from the release's slim ResNet-v2-50 in stride placement: slim strides in the *last* unit of a
    block, so its block2/3/4 maps are at strides 16/32/32 (16×16, 8×8, 8×8 at 256 px) while torchvision's
    layer2/3/4 are at strides 8/16/32. Channels match for depth 50 (512/1024/2048). torchvision is ResNet-v1
    (post-activation), so the release's extra BN+ReLU after block2/block3 has no counterpart here.
    """

    def __init__(self, depth: int = 18, state_dict: dict[str, torch.Tensor] | None = None):
        super().__init__()
        ctor = {18: torchvision.models.resnet18, 50: torchvision.models.resnet50}[depth]
        net = ctor(weights=None)
        if state_dict is not None:  # ImageNet weights, read from a local file by the caller
            net.load_state_dict(state_dict)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
        self.layer2, self.layer3, self.layer4 = net.layer2, net.layer3, net.layer4
        self.channels = [128, 256, 512] if depth == 18 else [512, 1024, 2048]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        low = self.layer2(self.stem(images))
        mid = self.layer3(low)
        return [low, mid, self.layer4(mid)]


def resnet_levels(depth: int = 18, state_dict: dict[str, torch.Tensor] | None = None,
                  ) -> tuple[ResNetLevels, list[int]]:
    """(trunk, channel counts) for ResNet-18/50; the trunk returns [layer2, layer3, layer4] maps."""
    trunk = ResNetLevels(depth, state_dict)
    return trunk, list(trunk.channels)


@torch.no_grad()
def level_map_sizes(trunk: nn.Module, image_size: int) -> list[tuple[int, int]]:
    """Spatial (h, w) of each level for square inputs of `image_size` px (one dummy forward in eval mode)."""
    was_training = trunk.training
    trunk.eval()
    device = next(trunk.parameters()).device
    maps = trunk(torch.zeros(1, 3, image_size, image_size, device=device))
    trunk.train(was_training)
    return [tuple(m.shape[2:]) for m in maps]


class VALTextEncoder(nn.Module):
    """Embedding (GloVe-initialised by the caller) -> 1-layer LSTM with learned initial state -> max-pool over
    the valid time steps -> Dropout(0.1) -> linear projection to `out_dim` + BatchNorm (slim 1×1 conv, no act)."""

    def __init__(self, vocab_size: int, word_dim: int = 300, hidden_dim: int = 1024, out_dim: int = 512,
                 dropout: float = 0.1):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, word_dim)
        self.lstm = nn.LSTM(word_dim, hidden_dim, batch_first=True)
        self.h0 = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.c0 = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.dropout = nn.Dropout(dropout)
        self.project = nn.Linear(hidden_dim, out_dim, bias=False)
        self.norm = nn.BatchNorm1d(out_dim)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b, n = tokens.shape
        state = (self.h0.expand(-1, b, -1).contiguous(), self.c0.expand(-1, b, -1).contiguous())
        outputs, _ = self.lstm(self.embedding(tokens), state)
        valid = torch.arange(n, device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None]
        pooled = outputs.masked_fill(~valid[:, :, None], float("-inf")).amax(dim=1)
        return self.norm(self.project(self.dropout(pooled)))


class VAL(nn.Module):
    """Hierarchical composition: one CompositeTransformer per trunk level, one shared sentence vector.

    trunk(images) -> list of L maps with `channels[ℓ]` channels and spatial size `map_sizes[ℓ]`; the same
    trunk encodes reference and target images. text_encoder(tokens, lengths) -> B×text_dim.
    All per-level vectors are L2-normalised (no learned scale, unlike TIRG's NormalizationLayer).
    """

    def __init__(self, trunk: nn.Module, channels: list[int], text_encoder: nn.Module, text_dim: int,
                 map_sizes: list[tuple[int, int]], num_heads: int = 2, attention_dropout: float = 0.1,
                 activation: str = "relu"):
        super().__init__()
        if len(channels) != len(map_sizes):
            raise ValueError("channels and map_sizes must list the same levels")
        self.trunk, self.text_encoder = trunk, text_encoder
        self.transformers = nn.ModuleList(
            CompositeTransformer(c, text_dim, s, num_heads, attention_dropout, activation)
            for c, s in zip(channels, map_sizes)
        )

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=-1)

    def encode_image(self, images: torch.Tensor) -> list[torch.Tensor]:
        """g^ℓ = L2norm(GAP(x^ℓ)) per level: the target / gallery side."""
        return [self.normalize(x.mean(dim=(2, 3))) for x in self.trunk(images)]

    def encode_text(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(tokens, lengths)

    def encode_reference(self, images: torch.Tensor) -> list[torch.Tensor]:
        """x^ℓ per level: the reference maps the composite transformers read."""
        return self.trunk(images)

    def composite_maps(self, maps: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
        """y^ℓ per level, each the shape of the reference map x^ℓ."""
        return [ct(x, t) for ct, x in zip(self.transformers, maps)]

    def compose(self, maps: list[torch.Tensor], t: torch.Tensor) -> list[torch.Tensor]:
        """f^ℓ = L2norm(GAP(y^ℓ)) per level: the composed query."""
        return [self.normalize(y.mean(dim=(2, 3))) for y in self.composite_maps(maps, t)]

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        return self.compose(self.encode_reference(images), self.encode_text(tokens, lengths))

    def similarity(self, queries_levels: list[torch.Tensor], targets_levels: list[torch.Tensor]) -> torch.Tensor:
        """Σ_ℓ cos(f^ℓ_i, g^ℓ_j), Q×G. The release ranks by squared L2 between the concatenated unit vectors,
        ‖[f]−[g]‖² = 2L − 2 Σ_ℓ cos, so ranking by this similarity (descending) gives the same order."""
        return sum(self.normalize(q) @ self.normalize(g).T for q, g in zip(queries_levels, targets_levels))


def build(parts) -> VAL:
    """models/registry.py: VAL's composite transformers on the last `model.val.levels` maps, its own LSTM."""
    d, options = parts.embed_dim, parts.cfg.val
    trunk, channels = parts.map_trunk(options.levels)
    text = parts.text_encoder(d, own_lstm=lambda t: VALTextEncoder(parts.vocab_size, t.embed_dim, t.hidden_dim, d,
                                                                   t.dropout))
    return VAL(trunk, channels, text, d, level_map_sizes(trunk, parts.image_size), options.num_heads,
               options.attention_dropout)
