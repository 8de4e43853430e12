"""Every model cirflow builds, by `model.name`: the task it serves and the function that builds it.

A model is a module under models/composed/ (reference image + text -> image) or models/matching/ (caption <-> image)
holding its paper's equations and a `build(parts)` function; `parts` (stages.modeling.factory.Parts) hands it the
encoders the `model` params section describes. Adding a model is its file plus one line here.

A composed model offers encode_reference, encode_text, compose, encode_image and normalize (stages.modeling.factory);
one that adds training terms of its own offers auxiliary_losses (ComposeAE), one whose loss reads every layer
offers compose_layers (AMC). A matching model offers encode_image, encode_text and loss (models.matching.dual_encoder).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from models.composed import amc, composeae, tirg, tirg_lastconv, val
from models.matching import dual_encoder


@dataclass(frozen=True)
class ModelEntry:
    task: Literal["composed", "matching"]
    build: Callable[[Any], nn.Module]


MODELS: dict[str, ModelEntry] = {
    "tirg": ModelEntry("composed", tirg.build),
    "tirg_lastconv": ModelEntry("composed", tirg_lastconv.build),
    "composeae": ModelEntry("composed", composeae.build),
    "val": ModelEntry("composed", val.build),
    "amc": ModelEntry("composed", amc.build),
    "dual_encoder": ModelEntry("matching", dual_encoder.build),
}
