"""Guided image retrieval's released parameter layouts (sibasmarak/guided-image-retrieval@59f935a src/model.py):
the dual encoder (class DualEncoder) and SIAM (class SpatialInformationAggregatorModule) against cirflow's
models/matching/dual_encoder.py and models/matching/siam.py.

    cirflow DualEncoder (image.encoder resnet50)    release DualEncoder (--vision_model_name resnet50)
    image_tower.backbone.<conv1 ... layer4>         vision_model.model.backbone.<conv1 ... layer4>  (timm ResNet-50,
                                                    torchvision's tensor names)
    image_tower.backbone.fc, image_projection       vision_model.model.dense       (see `merged` below)
    text_projection                                 language_model.dense
    text_tower.* (LSTM or MiniLM)                   language_model.model.*         (HF BERT: no counterpart)
    logit_scale                                     -                              (the symmetric option only)

The image side is not one tensor per tensor: cirflow's ResNetEncoder ends in its own Linear(2048 -> d) (`fc`) and
the DualEncoder adds `image_projection` Linear(d -> d) on top, with nothing between them; the release has one
Linear(2048 -> D). Both compute an affine map of the pooled 2048-d feature, so `release_state` writes the product
W = W_proj W_fc, b = W_proj b_fc + b_proj, and `cirflow_state` reads the release's dense into `fc` with an identity
projection: the features agree both ways, but cirflow -> release -> cirflow gives other (equivalent) tensors, and
the two parameterisations train differently (two factors under Adam and weight decay instead of one matrix).

The text towers have no common tensors (an LSTM or a frozen MiniLM here, BERT in the release): `release_state` leaves
`text_tower.*` out and a release checkpoint's BERT (`language_model.model.*`) is not read; `cirflow_state` returns
no `text_tower.*` tensors, so a release checkpoint loads over a freshly built model (the text tower keeps its own
weights). `text_projection` takes the release's `language_model.dense` only when the text tower's width equals the
release's input (768 for BERT; the known answers build the release with language_input_size = d).

SIAM: its five trainable Linear layers have the same names on both sides. The release module also holds its frozen
Faster R-CNN (`object_detection_model.*`), the dual encoder it was built on (`dual_encoder.*`) and its guide
ResNet-101 (`guide_vision_model.*`); cirflow keeps the dual encoder apart and takes the guide map and the regions from
the DE's image tower, so those tensors are not read.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from known_answers.layouts import ReleaseLayout, Tensor, register

REPOSITORY = "sibasmarak/guided-image-retrieval@59f935a2f395173ca98c8336557b5c5a054d88f0"
RESNET50_BLOCKS = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class MergedLinear:
    """cirflow's two Linear layers `first` then `second` (no non-linearity between) as the release's one `release`."""
    first: str
    second: str
    release: str

    def cirflow_keys(self) -> tuple[str, ...]:
        return tuple(f"{m}.{t}" for m in (self.first, self.second) for t in ("weight", "bias"))

    def release_keys(self) -> tuple[str, ...]:
        return f"{self.release}.weight", f"{self.release}.bias"

    def to_release(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        w1, b1 = state[f"{self.first}.weight"], state[f"{self.first}.bias"]
        w2, b2 = state[f"{self.second}.weight"], state[f"{self.second}.bias"]
        return {f"{self.release}.weight": w2 @ w1, f"{self.release}.bias": w2 @ b1 + b2}

    def to_cirflow(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        w, b = state[f"{self.release}.weight"], state[f"{self.release}.bias"]
        out = w.shape[0]
        return {f"{self.first}.weight": w.clone(), f"{self.first}.bias": b.clone(),
                f"{self.second}.weight": torch.eye(out, dtype=w.dtype, device=w.device),
                f"{self.second}.bias": torch.zeros(out, dtype=b.dtype, device=b.device)}


@dataclass(frozen=True)
class GuidedRetrievalLayout(ReleaseLayout):
    """A ReleaseLayout with cirflow's consecutive Linear pairs that are one Linear in the release (`merged`),
    cirflow's tensors the release lacks (`cirflow_only`: key -> its value on the way back;
    `cirflow_only_prefixes`: left out both ways) and whole release modules cirflow does not read
    (`release_only_prefixes`)."""
    merged: tuple[MergedLinear, ...] = ()
    cirflow_only: dict[str, Callable[[], Tensor]] = field(default_factory=dict)
    cirflow_only_prefixes: tuple[str, ...] = ()
    release_only_prefixes: tuple[str, ...] = ()

    def release_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        needed = [*self.cirflow_only, *(k for m in self.merged for k in m.cirflow_keys())]
        if missing := sorted(set(needed) - set(state)):
            raise KeyError(f"{self.name} ({self.repository}): cirflow's model lacks {missing[0]!r}")
        skip = set(needed)
        rest = {k: v for k, v in state.items() if k not in skip and not k.startswith(self.cirflow_only_prefixes)}
        out = super().release_state(rest)
        for m in self.merged:
            out.update(m.to_release(state))
        return out

    def cirflow_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        state = {k: v for k, v in state.items() if not k.startswith(self.release_only_prefixes)}
        merged = [k for m in self.merged for k in m.release_keys()]
        if missing := sorted(set(merged) - set(state)):
            raise KeyError(f"{self.name} ({self.repository}): the release checkpoint lacks {missing[0]!r}")
        out = super().cirflow_state({k: v for k, v in state.items() if k not in set(merged)})
        for m in self.merged:
            out.update(m.to_cirflow(state))
        out.update({k: make() for k, make in self.cirflow_only.items()})
        return out


def _resnet50_trunk_keys() -> list[str]:
    """torchvision's (and timm's) ResNet-50 state_dict keys from conv1 to layer4 (no fc)."""
    keys = ["conv1.weight", *(f"bn1.{s}" for s in _BN)]
    for layer, blocks in RESNET50_BLOCKS.items():
        for b in range(blocks):
            for i in (1, 2, 3):
                keys += [f"{layer}.{b}.conv{i}.weight", *(f"{layer}.{b}.bn{i}.{s}" for s in _BN)]
            if b == 0:  # every ResNet-50 stage's first block projects its shortcut
                keys += [f"{layer}.{b}.downsample.0.weight", *(f"{layer}.{b}.downsample.1.{s}" for s in _BN)]
    return keys


def _linear(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.weight": f"{theirs}.weight", f"{ours}.bias": f"{theirs}.bias"}


def _logit_scale() -> Tensor:
    return torch.tensor(math.log(1 / 0.07))  # DualEncoder's init (read only by the symmetric InfoNCE option)


DUAL_ENCODER = register(GuidedRetrievalLayout(
    name="dual_encoder",
    repository=REPOSITORY,
    names={
        **{f"image_tower.backbone.{k}": f"vision_model.model.backbone.{k}" for k in _resnet50_trunk_keys()},
        **_linear("text_projection", "language_model.dense"),
    },
    merged=(MergedLinear("image_tower.backbone.fc", "image_projection", "vision_model.model.dense"),),
    cirflow_only={"logit_scale": _logit_scale},
    cirflow_only_prefixes=("text_tower.",),
    release_only_prefixes=("language_model.model.",),
))

SIAM_LINEARS = ("roi_linear", "alpha_linear", "beta_linear", "gamma_linear", "image_linear")

SIAM = register(GuidedRetrievalLayout(
    name="siam",
    repository=REPOSITORY,
    names={k: v for m in SIAM_LINEARS for k, v in _linear(m, m).items()},
    release_only_prefixes=("object_detection_model.", "dual_encoder.", "guide_vision_model."),
))
