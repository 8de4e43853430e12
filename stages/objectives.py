"""One batch -> the metric loss of the composed query against its target (TIRG §1.3), plus the
optional Gradient Augmentation regularisers (GA, Huang et al. TMM 2022; the `ga` params section)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field
from typing_extensions import Annotated

from models.ga import adversarial_penalty, isotropic_gradient_noise
from models.losses import batch_based_classification, soft_triplet
from models.tirg import TIRG
from stages.params import section
from stages.training import autocast, to_device
from stages.vocab import Vocab


@section
class GAConfig:
    adversarial: bool                                  # R_adv: input-gradient penalty on the reference image
    adversarial_lambda: Annotated[float, Field(ge=0)]  # λ (GA code: 1e-6)
    adversarial_q: Annotated[float, Field(ge=1)]       # the q-norm (GA code: 1)
    isotropic: bool                                    # Gaussian noise added to every gradient
    isotropic_weight: Annotated[float, Field(ge=0)]    # GA code: 0.01
    isotropic_mode: Literal["clean", "as_released"]    # as_released: the code's cumulative weights (P-k+1)


def composed_and_target(model: TIRG, vocab: Vocab, batch: dict, device: torch.device):
    """(q̂, t̂): normalised composed queries and normalised targets, float32."""
    tokens, lengths = vocab.batch(batch["text"])
    with autocast(device):
        query = model(to_device(batch["ref"], device), tokens.to(device), lengths.to(device))
        target = model.encode_image(to_device(batch["tgt"], device))
    return model.normalize(query), model.normalize(target)


def metric_loss(name: str, q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if name == "bbc":
        return batch_based_classification(q, t)
    return soft_triplet(q, t)


def with_ga(loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]], ga: GAConfig):
    """Wrap a step's loss with GA's adversarial term R_adv (one extra double-backprop pass per step)."""
    if not ga.adversarial:
        return loss_fn

    def step(model, batch):
        batch = {**batch, "ref": batch["ref"].clone().requires_grad_(True)}
        loss, logs = loss_fn(model, batch)
        penalty = adversarial_penalty(loss, batch["ref"], batch["ref"].shape[0], ga.adversarial_lambda, ga.adversarial_q)
        return loss + penalty, {**logs, "ga_adversarial": penalty.item()}

    return step


def isotropic_noise(ga: GAConfig, seed: int) -> Callable[[torch.nn.Module], None] | None:
    """The `after_backward` hook adding GA's isotropic gradient noise, or None when it is off."""
    if not ga.isotropic:
        return None
    generator = torch.Generator().manual_seed(seed)
    return lambda model: isotropic_gradient_noise(model, ga.isotropic_weight, ga.isotropic_mode, generator)
