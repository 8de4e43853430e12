"""One batch -> the training loss of the chosen model (the `loss` params section, a loss of models/losses/),
plus the optional Gradient Augmentation regularisers (GA, Huang et al. TMM 2022; the `ga` params section).

loss.name (models/losses/__init__.py lists them)
    bbc            TIRG's batch-based classification on s-normalised vectors (any composed model)
    soft_triplet   TIRG's soft triplet (any composed model)
    val_matching   VAL's bidirectional semi-hard triplet, summed over levels (model val)
    amc            AMC's L_BBC (scale 10) + λ L_BSC over the expert layers (model amc)
A model with auxiliary_losses (ComposeAE: reconstruction, rotational symmetry) adds them to bbc / soft_triplet.
Image-text matching (model dual_encoder):
    nce            guided-image-retrieval's caption -> image NCE, other captions of the image masked, τ = nce_tau
    info_nce       symmetric InfoNCE with the model's learned temperature
    vse            VSE++ hinge with the hardest in-batch negative, both directions
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from typing_extensions import Annotated

from models.losses import LOSSES
from models.losses.composeae import total_loss
from models.losses.ga import adversarial_penalty, isotropic_gradient_noise
from models.losses.metric import metric_loss
from stages.common.device import autocast, to_device
from stages.common.distributed import across_ranks, gather_objects
from stages.common.params import PARAMS_FILE, ParamsError, require, section
from stages.modeling.factory import MATCHING_MODELS, ModelName, as_vector

NonNegative = Annotated[float, Field(ge=0)]
# loss.name: auto. Matching: InfoNCE with a learned temperature learns from scratch at the embedded data's budget
# (README, "Image-text matching"); the papers' own losses are the recipes' (pipelines/recipes/).
DEFAULT_LOSSES = {"composed": "bbc", "matching": "info_nce"}


@section
class LossConfig:
    name: Literal[("auto", *LOSSES)]  # auto: the task's default (DEFAULT_LOSSES); an unknown name lists these
    soft_triplet_half_gradient: bool   # quirk: google/tirg's hand-written backward halves the gradient
    ga_mse_weight: NonNegative         # quirk: the GA repo adds w·mean((q̂ - t̂)²) to bbc/soft_triplet (0.001)
    composeae_weights: list[NonNegative]  # (L_base, L_RI, L_RT, L_RS)
    val_margin: NonNegative
    val_semi_hard_mode: Literal["row", "as_released"]  # as_released: TF broadcasting compares d_ij to d⁺_j
    amc_scale: Annotated[float, Field(gt=0)]  # the fixed BBC temperature
    amc_sim_weight: NonNegative               # λ of L_BSC
    nce_tau: Annotated[float, Field(gt=0)]    # matching nce (the release: 1)
    vse_margin: NonNegative
    aoq_variant: Literal["triplet", "quintuplet", "adaptive_quintuplet"]  # OffTri | OffQuin | AdapOffQuin
    aoq_margin_online: NonNegative
    aoq_margin_offline: NonNegative
    aoq_alpha: Annotated[float, Field(gt=0)]
    aoq_beta: float

    def __post_init__(self):
        require(len(self.composeae_weights) == 4, "composeae_weights", "needs 4 weights (base, RI, RT, RS)")

    def for_task(self, task: str) -> "LossConfig":
        """This config with `auto` resolved to the task's default loss."""
        return self if self.name != "auto" else dataclasses.replace(self, name=DEFAULT_LOSSES[task])

    def check_model(self, model_name: ModelName, batch_size: int, loop_section: str) -> None:
        """Raise a ParamsError naming the keys when this loss cannot train this model or batch size."""
        if "auto" in (self.name, model_name):
            raise ValueError("loss.name / model.name auto: resolve them with for_task(task) first")
        entry = LOSSES[self.name]
        if entry.task == "composed" and model_name in MATCHING_MODELS:
            matching = ", ".join(name for name, e in LOSSES.items() if e.task == "matching")
            raise ParamsError(f"{PARAMS_FILE}: loss.name: '{self.name}' trains composed-retrieval models, "
                              f"model.name is '{model_name}' (use {matching})")
        if entry.model is not None and entry.model != model_name:
            raise ParamsError(f"{PARAMS_FILE}: loss.name: '{self.name}' trains the {entry.model} model only, "
                              f"model.name is '{model_name}'")
        if entry.task == "matching" and model_name not in MATCHING_MODELS:
            raise ParamsError(f"{PARAMS_FILE}: loss.name: '{self.name}' trains image-text matching models, "
                              f"model.name is '{model_name}'")
        if self.name == "soft_triplet" and batch_size > 333:
            raise ParamsError(f"{PARAMS_FILE}: {loop_section}.batch_size: soft_triplet keeps 3 triplets per anchor "
                              "and asserts fewer than 2000 (batch <= 333)")


@section
class GAConfig:
    adversarial: bool                                  # R_adv: input-gradient penalty on the reference image
    adversarial_lambda: Annotated[float, Field(ge=0)]  # λ (GA code: 1e-6)
    adversarial_q: Annotated[float, Field(ge=1)]       # the q-norm (GA code: 1)
    isotropic: bool                                    # Gaussian noise added to every gradient
    isotropic_weight: Annotated[float, Field(ge=0)]    # GA code: 0.01
    isotropic_mode: Literal["clean", "as_released"]    # as_released: the code's cumulative weights (P-k+1)


def model_inputs(tokenizer, batch: dict, device: torch.device):
    tokens, lengths = tokenizer.batch(batch["text"])
    return to_device(batch["ref"], device), tokens.to(device), lengths.to(device)


def _floats(x):
    return [level.float() for level in x] if isinstance(x, (list, tuple)) else x.float()


def _loggable(logs: dict) -> dict[str, float]:
    return {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in logs.items()}


def training_loss(model: nn.Module, cfg: LossConfig, tokenizer, batch: dict, device: torch.device,
                  ga: GAConfig | None = None):
    """(loss, q̂, t̂, logs) of one batch; q̂, t̂ are what the offline-negative hinge of `train` reuses.

    With `ga.adversarial`, GA's R_adv is the input gradient of the main metric loss alone, as main.py's
    `gPenalty(img1, loss_value)` is: not of a model's auxiliary terms nor of anything the caller adds later."""
    entry = LOSSES[cfg.name]
    adversarial = ga is not None and ga.adversarial
    if adversarial:
        batch = {**batch, "ref": batch["ref"].clone().requires_grad_(True)}
    images, tokens, lengths = model_inputs(tokenizer, batch, device)
    targets = to_device(batch["tgt"], device)
    with autocast(device):
        reference, text = model.encode_reference(images), model.encode_text(tokens, lengths)
        if entry.reads == "layers":
            layers = model.compose_layers(reference, text)
            target = model.encode_image(targets)
            query = layers[-1]
        else:
            query, target = model.compose(reference, text), model.encode_image(targets)
    q_hat, t_hat = model.normalize(as_vector(query)), model.normalize(as_vector(target))
    inputs = {"vectors": lambda: (q_hat, t_hat), "outputs": lambda: (_floats(query), _floats(target)),
              "layers": lambda: (_floats(layers), target.float())}[entry.reads]()
    logs: dict = {}

    def compute(*tensors):
        loss, terms = entry.compute(cfg, *tensors)
        logs.update(terms)
        return loss

    # in-batch losses over the global batch when training on several processes (stages.common.distributed)
    loss = across_ranks(compute, *inputs)
    logs = _loggable(logs)
    if adversarial:
        # on W processes the loss is over the global batch W·B and its gradient is already scaled by W
        # (stages.common.distributed.across_ranks), so this rank's B gives the paper's global-batch B·∇L
        penalty = adversarial_penalty(loss, batch["ref"], batch["ref"].shape[0], ga.adversarial_lambda,
                                      ga.adversarial_q)
        loss = loss + penalty
        logs["ga_adversarial"] = penalty.item()
    if hasattr(model, "auxiliary_losses"):
        logs["main_loss"] = loss.item()
        with autocast(device):
            aux = model.auxiliary_losses(reference, text, query, model.encode_image(targets),
                                         lambda q, t: across_ranks(partial(metric_loss, cfg), q, t))
        loss = total_loss(loss, aux, cfg.composeae_weights)
        logs.update({k: v.item() for k, v in aux.items()})
    if hasattr(model, "normalize") and isinstance(getattr(model.normalize, "scale", None), nn.Parameter):
        logs["scale"] = model.normalize.scale.item()
    return loss, q_hat, t_hat, logs


def matching_loss(model: nn.Module, cfg: LossConfig, tokenizer, batch: dict, device: torch.device):
    """(loss, logs) of one batch of (image, caption) pairs; pairs of one image are not each other's negatives."""
    tokens, lengths = tokenizer.batch(batch["text"])
    names = gather_objects(list(batch["image_id"]))  # every rank's, when training on several processes
    ids = {image_id: i for i, image_id in enumerate(dict.fromkeys(names))}
    image_ids = torch.tensor([ids[i] for i in names], device=device)
    with autocast(device):
        v = model.encode_image(to_device(batch["image"], device)).float()
        u = model.encode_text(tokens.to(device), lengths.to(device)).float()
    logs: dict = {}

    def compute(v, u):
        loss, terms = LOSSES[cfg.name].compute(cfg, model, v, u, image_ids)
        logs.update(terms)
        return loss

    loss = across_ranks(compute, v, u)
    return loss, _loggable(logs)


def check_ga_task(ga: GAConfig, task: str) -> None:
    if ga.adversarial and task != "composed":
        raise ParamsError(f"{PARAMS_FILE}: ga.adversarial: perturbs the reference image of composed retrieval; "
                          f"task is '{task}' (ga.isotropic works for any task)")


class IsotropicNoise:
    """The `after_backward` hook adding GA's isotropic gradient noise; `generator` is its random stream (a
    checkpoint saves its state)."""

    def __init__(self, ga: GAConfig, seed: int):
        self.ga, self.generator = ga, torch.Generator().manual_seed(seed)

    def __call__(self, model: torch.nn.Module) -> None:
        isotropic_gradient_noise(model, self.ga.isotropic_weight, self.ga.isotropic_mode, self.generator)


def isotropic_noise(ga: GAConfig, seed: int) -> IsotropicNoise | None:
    """GA's isotropic noise hook, or None when it is off."""
    return IsotropicNoise(ga, seed) if ga.isotropic else None


def random_streams(**owners) -> dict[str, torch.Generator]:
    """{name: owner.generator} of the owners that are not None: the side streams (GA's noise, drawn negatives) a
    training checkpoint saves beside the global RNGs."""
    return {name: owner.generator for name, owner in owners.items() if owner is not None}
