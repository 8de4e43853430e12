"""TIRG's and TIRG-LastConv's released parameter layouts (google/tirg@c58daa0, and fuxianghuang1/GA@f808df1 which
keeps google/tirg's module names).

Both releases hold a torchvision ResNet-18 as `img_model` (its `fc` a Sequential around one Linear, so
`img_model.fc.0.*`), the TextLSTMModel as `text_model` (`embedding_layer`, a time-major `lstm` whose gate order
(i, f, g, o) is PyTorch's, as cirflow's, and `fc_output` = Dropout, Linear), the learnable scale
`normalization_layer.norm_s` stored with shape (1,) (cirflow: a 0-d tensor) and the composition weights `a`.

    tirg           models/composed/tirg.py           the releases' `TIRG` (vector composition)
    tirg_lastconv  models/composed/tirg_lastconv.py  the releases' `TIRGLastConv` (composition on layer4's map);
                                                     GA's `--model tirg` builds this one
Checkpoints: google/tirg and GA save `{'model_state_dict': model.state_dict(), ...}`; the state_dict inside is what
these layouts read.
"""
from __future__ import annotations

from known_answers.layouts import ReleaseLayout, register

TIRG_RELEASE = "google/tirg@c58daa066d8af1a5b3de1a0ef6d112519ddda611"
GA_RELEASE = "fuxianghuang1/GA@f808df1df9e9b32a580aaa4455fb76567d5e98de"

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{suffix}" for suffix in _BN]


def _resnet18_trunk_keys() -> list[str]:
    """torchvision ResNet-18's state_dict keys from conv1 to layer4 (no fc): 2 BasicBlocks per stage, a
    downsample (1x1 conv + BN) on the first block of layers 2-4."""
    keys = ["conv1.weight", *_bn("bn1")]
    for stage in range(1, 5):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            keys += [f"{prefix}.conv1.weight", *_bn(f"{prefix}.bn1"), f"{prefix}.conv2.weight", *_bn(f"{prefix}.bn2")]
            if stage > 1 and block == 0:
                keys += [f"{prefix}.downsample.0.weight", *_bn(f"{prefix}.downsample.1")]
    return keys


_TEXT = {
    "text_encoder.embedding.weight": "text_model.embedding_layer.weight",
    **{f"text_encoder.lstm.{k}_l0": f"text_model.lstm.{k}_l0"
       for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")},
    "text_encoder.head.1.weight": "text_model.fc_output.1.weight",
    "text_encoder.head.1.bias": "text_model.fc_output.1.bias",
}


def _to_release_scale(scale):
    return scale.reshape(1)


def _to_cirflow_scale(norm_s):
    return norm_s.reshape(())


_SCALE = {"to_release": {"normalize.scale": _to_release_scale}, "to_cirflow": {"normalize.scale": _to_cirflow_scale}}


def _linear(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.weight": f"{theirs}.weight", f"{ours}.bias": f"{theirs}.bias"}


def _same_suffixes(ours: str, theirs: str, suffixes) -> dict[str, str]:
    return {f"{ours}.{s}": f"{theirs}.{s}" for s in suffixes}


TIRG_LAYOUT = register(ReleaseLayout(
    name="tirg",
    repository=TIRG_RELEASE,
    names={
        "a": "a",
        **{f"image_encoder.backbone.{k}": f"img_model.{k}" for k in _resnet18_trunk_keys()},
        **_linear("image_encoder.backbone.fc", "img_model.fc.0"),
        **_TEXT,
        # gated_feature_composer = ConCatModule, BN1d, ReLU, Linear; cirflow's gate = BN1d, ReLU, Linear
        **_same_suffixes("gate.0", "gated_feature_composer.1", _BN),
        **_linear("gate.2", "gated_feature_composer.3"),
        # res_info_composer = ConCatModule, BN1d, ReLU, Linear, ReLU, Linear
        **_same_suffixes("residual.0", "res_info_composer.1", _BN),
        **_linear("residual.2", "res_info_composer.3"),
        **_linear("residual.4", "res_info_composer.5"),
        "normalize.scale": "normalization_layer.norm_s",
    },
    **_SCALE,
))

TIRG_LASTCONV_LAYOUT = register(ReleaseLayout(
    name="tirg_lastconv",
    repository=GA_RELEASE,  # google/tirg's TIRGLastConv has the same names (with fc 512 -> embed_dim)
    names={
        "a": "a",
        **{f"feature_extractor.{k}": f"img_model.{k}" for k in _resnet18_trunk_keys()},
        **_linear("image_fc", "img_model.fc.0"),
        **_TEXT,
        # mod2d / mod2d_gate = BN2d, Conv3x3, ReLU, Conv3x3: the same indices as cirflow's residual / gate
        **_same_suffixes("residual.0", "mod2d.0", _BN),
        **_linear("residual.1", "mod2d.1"),
        **_linear("residual.3", "mod2d.3"),
        **_same_suffixes("gate.0", "mod2d_gate.0", _BN),
        **_linear("gate.1", "mod2d_gate.1"),
        **_linear("gate.3", "mod2d_gate.3"),
        "normalize.scale": "normalization_layer.norm_s",
    },
    **_SCALE,
))
