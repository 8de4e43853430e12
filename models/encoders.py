"""Image and text encoders of TIRG (Vo et al., CVPR 2019) as released in google/tirg."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torchvision
from torch import nn


class SmallCNN(nn.Module):
    """A few conv-BN-ReLU-maxpool stages, flattened (not pooled) so the grid position survives.

    Sized for the embedded `shapes` scenes, where "top-left" vs "centre" is part of the query.
    """

    def __init__(self, channels: list[int], image_size: int, out_dim: int):
        super().__init__()
        layers, c_in = [], 3
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(channels)} pooling stages")
        self.fc = nn.Linear(c_in * side * side, out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images).flatten(1))


class SmallCNNMaps(nn.Module):
    """The conv stages of a SmallCNN without its fc: images -> the maps of the last `levels` stages.

    The map trunk of the composition models that read feature maps (TIRG-LastConv, VAL, AMC) on `shapes`.
    """

    def __init__(self, channels: list[int], levels: int):
        super().__init__()
        if not 0 < levels <= len(channels):
            raise ValueError(f"levels {levels} must be in 1..{len(channels)} (the conv stages)")
        stages, c_in = [], 3
        for c_out in channels:
            stages.append(nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                        nn.ReLU(inplace=True), nn.MaxPool2d(2)))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.levels = levels
        self.channels = list(channels[-levels:])

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        maps, x = [], images
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps[-self.levels:]


class ResNetEncoder(nn.Module):
    """torchvision ResNet-18/50, adaptive average pool to 1x1, `fc` replaced by Linear(512|2048 -> d)."""

    def __init__(self, out_dim: int, state_dict: dict[str, torch.Tensor] | None = None, depth: int = 18):
        super().__init__()
        builders = {18: (torchvision.models.resnet18, 512), 50: (torchvision.models.resnet50, 2048)}
        if depth not in builders:
            raise ValueError(f"depth must be 18 or 50, got {depth}")
        build, width = builders[depth]
        self.backbone = build(weights=None)
        if state_dict is not None:  # ImageNet weights, read from a local file by the caller
            self.backbone.load_state_dict(state_dict)
        self.backbone.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.backbone.fc = nn.Linear(width, out_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


class LSTMTextEncoder(nn.Module):
    """Embedding -> 1-layer LSTM -> output at the last real token -> Dropout -> Linear."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.lstm(self.embedding(tokens))  # zero initial state
        last = outputs[torch.arange(tokens.shape[0], device=tokens.device), lengths - 1]
        return self.head(last)


def resnet_last_map(depth: int = 18, state_dict: dict[str, torch.Tensor] | None = None) -> tuple[nn.Sequential, int]:
    """torchvision ResNet-{18,50} from conv1 up to layer4 (no pool, no fc) and its output channels.

    `state_dict`: ImageNet weights with torchvision's key names, read from a local file by the caller.
    """
    builders = {18: (torchvision.models.resnet18, 512), 50: (torchvision.models.resnet50, 2048)}
    if depth not in builders:
        raise ValueError(f"depth must be 18 or 50, got {depth}")
    build, channels = builders[depth]
    net = build(weights=None)
    if state_dict is not None:
        net.load_state_dict(state_dict)
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names)), channels


class ConvMap(nn.Module):
    """The spatial map of a vector encoder before it pools or flattens (SmallCNN's conv stages, ResNet's layer4):
    SIAM's guide map. It shares the encoder's weights, so the encoder is held outside the module tree (it is
    registered once, as the image tower)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self._encoder = [encoder]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        encoder = self._encoder[0]
        if isinstance(encoder, SmallCNN):
            return encoder.features(images)
        net = encoder.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))
