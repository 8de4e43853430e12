"""ComposeAE's released parameter layout (fuxianghuang1/GA and ecom-research/ComposeAE, img_text_composition_models.py
class ComposeAE; both releases name the tensors alike) against cirflow's models/composed/composeae.py.

The release's state_dict holds:
* `a`, `normalization_layer.norm_s` (shape (1,); cirflow's `normalize.scale` is a 0-d tensor),
* `img_model.*`: torchvision ResNet-18 with `fc` = Sequential(Linear) (`img_model.fc.0.*`),
* `text_model.*`: its TextLSTMModel (embedding, LSTM, Dropout + Linear), built even with `--use_bert`, where the text
  features come from a bert-as-service server and the LSTM is never called: `release_only` (7 tensors, never loaded),
* `encoderLinear.0.{bert_features,image_features}` (ComplexProjectionModule: γ, η), `encoderLinear.1.mapping` (ρ),
* `encoderWithConv.0.*` (the second γ, η), `encoderWithConv.1.mapping` (ρ_conv's head), `encoderWithConv.1.conv`,
* `decoder.*`, `txtdecoder.*`.
The Sequential indices of every block are the same on both sides (BN 0, Linear 1, ... as in models/composed/composeae.py).

cirflow's ComposeAE runs the release's recipe with a frozen sentence encoder (model.text.encoder: minilm, the
release's frozen BERT's stand-in); its tensors (`text_encoder.*`) have no counterpart in a release checkpoint
(the release never stored BERT): `composition_state` leaves them out before `release_state`, and loading a release
checkpoint keeps the freshly built model's MiniLM. Only the released dimensions run in the release (d = 512: its
LinearMapping()/ConvMapping() are built with their 512 defaults); the names hold for any d.
"""
from __future__ import annotations

import torch

from . import ReleaseLayout, register

REPOSITORY = "fuxianghuang1/GA@f808df1df9e9b32a580aaa4455fb76567d5e98de"
UPSTREAM = "ecom-research/ComposeAE@f5ea4ffee06447532c69bd393fce0b2c1cfdea30"  # same tensor names
FROZEN_TEXT_PREFIX = "text_encoder."  # cirflow's frozen MiniLM (no trainable head for ComposeAE)

RELEASE_TEXT_MODEL = ("text_model.embedding_layer.weight", "text_model.lstm.weight_ih_l0",
                      "text_model.lstm.weight_hh_l0", "text_model.lstm.bias_ih_l0", "text_model.lstm.bias_hh_l0",
                      "text_model.fc_output.1.weight", "text_model.fc_output.1.bias")

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _resnet18_keys() -> list[str]:
    """torchvision resnet18's state_dict keys below `fc`, in its order."""
    keys = ["conv1.weight", *(f"bn1.{s}" for s in _BN)]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys += [f"{p}.conv1.weight", *(f"{p}.bn1.{s}" for s in _BN),
                     f"{p}.conv2.weight", *(f"{p}.bn2.{s}" for s in _BN)]
            if layer > 1 and block == 0:
                keys += [f"{p}.downsample.0.weight", *(f"{p}.downsample.1.{s}" for s in _BN)]
    return keys


def _mlp(ours: str, theirs: str, bn_at: int, linears: tuple[int, ...]) -> dict[str, str]:
    names = {f"{ours}.{bn_at}.{s}": f"{theirs}.{bn_at}.{s}" for s in _BN}
    for i in linears:
        names.update({f"{ours}.{i}.{s}": f"{theirs}.{i}.{s}" for s in ("weight", "bias")})
    return names


def _names() -> dict[str, str]:
    names = {"a": "a", "normalize.scale": "normalization_layer.norm_s"}
    names.update({f"image_encoder.backbone.{k}": f"img_model.{k}" for k in _resnet18_keys()})
    names.update({"image_encoder.backbone.fc.weight": "img_model.fc.0.weight",
                  "image_encoder.backbone.fc.bias": "img_model.fc.0.bias"})
    for ours, theirs in (("projection_linear", "encoderLinear.0"), ("projection_conv", "encoderWithConv.0")):
        names.update(_mlp(f"{ours}.gamma", f"{theirs}.bert_features", 0, (1, 3)))  # BN, Linear, ReLU, Linear
        names.update(_mlp(f"{ours}.eta", f"{theirs}.image_features", 0, (1, 4)))  # BN, Linear, Dropout, ReLU, Linear
    names.update(_mlp("rho", "encoderLinear.1.mapping", 0, (2, 4)))  # BN, ReLU, Linear, ReLU, Linear
    names.update(_mlp("rho_conv_head", "encoderWithConv.1.mapping", 0, (2, 4)))
    names.update({"conv.weight": "encoderWithConv.1.conv.weight", "conv.bias": "encoderWithConv.1.conv.bias"})
    names.update(_mlp("image_decoder", "decoder", 0, (2, 4)))
    names.update(_mlp("text_decoder", "txtdecoder", 0, (2, 4)))
    return names


def composition_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """cirflow's ComposeAE state_dict without the frozen text encoder, which no release checkpoint holds."""
    return {k: v for k, v in state.items() if not k.startswith(FROZEN_TEXT_PREFIX)}


LAYOUT = register(ReleaseLayout(
    name="composeae",
    repository=REPOSITORY,
    names=_names(),
    to_release={"normalize.scale": lambda s: s.reshape(1)},
    to_cirflow={"normalize.scale": lambda s: s.reshape(())},
    release_only=RELEASE_TEXT_MODEL,
))
