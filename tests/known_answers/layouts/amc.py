"""AMC's release (KevinLight831/AMC@313511a): the parameter names of `model.collative_model` with a ResNet-50 trunk
and the LSTM text model (train.py defaults: --img_encoder resnet50 --text_encoder LSTM).

    cirflow (models/composed/amc.py)           release (model.py, img_model.py, text_model.py, router.py, cells.py)
    text_encoder.embedding / .lstm             text_model.embedding_layer / .lstm (same LSTM storage and gate order)
    image_trunk.<conv1 ... layer4>             img_model.resnet.<conv1 ... layer4>
    proj                                       img_model.img1x1conv
    layers.{0,1}                               fusion_add.dynamic_itr_l{0,1}
      .router.mlp                                .router.mlp
      .experts.1 (CRN) .fuse / .block.{q,k,v}    .glo.linear / .glo.SA.att_layer.linears.{0,1,2}
               .block.norm{1,2} / .block.ffn     .glo.SA.norm{1,2} / .glo.SA.feed_forward_layer.fc{1,2}
      .experts.2 (GTN) .gamma / .beta            .sty.fc_gamma.0 / .sty.fc_beta.0
      .experts.0 (NIN)                           .ric (no parameters: LayerNorm without affine)

The release registers the trunk twice: as `img_model.resnet` and again through the Sequential views `img_model.base`
(conv1, bn1, relu, maxpool, layer1-3) and `img_model.top` (layer4) that its forward uses, so its state_dict holds every
trunk tensor under both names. `release_state` writes both (the release loads it strictly but for the unused
`img_model.resnet.fc`); `cirflow_state` reads the `resnet` names and leaves the views out (`release_only`).
cirflow's `normalize.scale` (a constant 1.0 buffer, AMC has no learned scale) has no release counterpart: it is left
out on the way to the release and set to 1.0 on the way back (`cirflow_only`).
Only the LSTM text encoder is mapped (model.text.encoder: lstm); MiniLM has no release counterpart.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from known_answers.layouts import ReleaseLayout, Tensor, register

REPOSITORY = "KevinLight831/AMC@313511ad1c9530456c9f41cba6e0d98f217bf1f0"
RESNET50_BLOCKS = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
# the release's Sequential views of its ResNet (img_model.py resnet_backbone._init_modules)
VIEWS = {"conv1": "base.0", "bn1": "base.1", "layer1": "base.4", "layer2": "base.5", "layer3": "base.6",
         "layer4": "top.0"}


@dataclass(frozen=True)
class AMCReleaseLayout(ReleaseLayout):
    """A ReleaseLayout with the release's duplicate trunk names (`aliases`: release key -> its view's key, written
    beside it) and cirflow's constant buffers that the release lacks (`cirflow_only`: key -> its value)."""
    aliases: dict[str, str] = field(default_factory=dict)
    cirflow_only: dict[str, Callable[[], Tensor]] = field(default_factory=dict)

    def release_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = sorted(set(self.cirflow_only) - set(state))
        if missing:
            raise KeyError(f"{self.name} ({self.repository}): cirflow's model lacks {missing[0]!r}")
        out = super().release_state({k: v for k, v in state.items() if k not in self.cirflow_only})
        out.update({alias: out[key] for key, alias in self.aliases.items()})
        return out

    def cirflow_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        out = super().cirflow_state(state)
        out.update({k: make() for k, make in self.cirflow_only.items()})
        return out


def _trunk_names() -> dict[str, str]:
    """image_trunk.* -> img_model.resnet.* for ResNet-50 conv1 ... layer4 (torchvision's module names on both sides)."""
    tensors = {"conv": ("weight",), "bn": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    keys = [f"conv1.{t}" for t in tensors["conv"]] + [f"bn1.{t}" for t in tensors["bn"]]
    for layer, blocks in RESNET50_BLOCKS.items():
        for b in range(blocks):
            for i in (1, 2, 3):
                keys += [f"{layer}.{b}.conv{i}.{t}" for t in tensors["conv"]]
                keys += [f"{layer}.{b}.bn{i}.{t}" for t in tensors["bn"]]
            if b == 0:  # every ResNet-50 stage's first block projects its shortcut
                keys += [f"{layer}.{b}.downsample.0.{t}" for t in tensors["conv"]]
                keys += [f"{layer}.{b}.downsample.1.{t}" for t in tensors["bn"]]
    return {f"image_trunk.{k}": f"img_model.resnet.{k}" for k in keys}


def _layer_names(i: int) -> dict[str, str]:
    ours, theirs = f"layers.{i}", f"fusion_add.dynamic_itr_l{i}"
    pairs = {"router.mlp.0.weight": "router.mlp.0.weight", "router.mlp.1.weight": "router.mlp.1.weight",
             "router.mlp.1.bias": "router.mlp.1.bias", "router.mlp.3.weight": "router.mlp.3.weight"}
    crn = {"fuse": "glo.linear", "block.q": "glo.SA.att_layer.linears.0", "block.k": "glo.SA.att_layer.linears.1",
           "block.v": "glo.SA.att_layer.linears.2", "block.norm1": "glo.SA.norm1", "block.norm2": "glo.SA.norm2",
           "block.ffn.0": "glo.SA.feed_forward_layer.fc1", "block.ffn.2": "glo.SA.feed_forward_layer.fc2"}
    gtn = {"gamma": "sty.fc_gamma.0", "beta": "sty.fc_beta.0"}
    for module, table in ((1, crn), (2, gtn)):  # experts.1: CRN, experts.2: GTN
        for a, b in table.items():
            for t in ("weight", "bias"):
                pairs[f"experts.{module}.{a}.{t}"] = f"{b}.{t}"
    return {f"{ours}.{a}": f"{theirs}.{b}" for a, b in pairs.items()}


def _names() -> dict[str, str]:
    names = {"text_encoder.embedding.weight": "text_model.embedding_layer.weight",
             **{f"text_encoder.lstm.{t}_l0": f"text_model.lstm.{t}_l0"
                for t in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
             "proj.weight": "img_model.img1x1conv.weight"}
    names.update(_trunk_names())
    for i in range(2):
        names.update(_layer_names(i))
    return names


def _aliases(names: dict[str, str]) -> dict[str, str]:
    prefix = "img_model.resnet."
    out = {}
    for release in names.values():
        if release.startswith(prefix):
            head, _, rest = release[len(prefix):].partition(".")
            out[release] = f"img_model.{VIEWS[head]}.{rest}"
    return out


_NAMES = _names()
_ALIASES = _aliases(_NAMES)

AMC = register(AMCReleaseLayout(
    name="amc", repository=REPOSITORY, names=_NAMES,
    release_only=tuple(_ALIASES.values()) + ("img_model.resnet.fc.weight", "img_model.resnet.fc.bias"),
    aliases=_ALIASES,
    cirflow_only={"normalize.scale": lambda: torch.tensor(1.0)},
))
