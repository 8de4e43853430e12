"""One batch -> the training loss of the chosen model (the `loss` params section), plus the optional
Gradient Augmentation regularisers (GA, Huang et al. TMM 2022; the `ga` params section).

loss.name
    bbc            TIRG's batch-based classification on s-normalised vectors (any model)
    soft_triplet   TIRG's soft triplet (any model)
    val_matching   VAL's bidirectional semi-hard triplet, summed over levels (model val)
    amc            AMC's L_BBC (scale 10) + λ L_BSC over the expert layers (model amc)
ComposeAE adds its reconstruction and rotational-symmetry terms to bbc / soft_triplet.
Image-text matching (model dual_encoder):
    nce            guided-image-retrieval's caption -> image NCE, other captions of the image masked, τ = nce_tau
    info_nce       symmetric InfoNCE with the model's learned temperature
    vse            VSE++ hinge with the hardest in-batch negative, both directions
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from typing_extensions import Annotated

from models.amc import AMC, amc_loss
from models.composeae import ComposeAE
from models.ga import adversarial_penalty, isotropic_gradient_noise
from models.losses import batch_based_classification, soft_triplet
from models.matching_losses import same_image_mask, vse_max_violation
from models.val import VAL, val_loss
from stages.distributed import across_ranks, gather_objects
from stages.modeling import MATCHING_MODELS, ModelName, as_vector
from stages.params import PARAMS_FILE, ParamsError, require, section
from stages.training import autocast, to_device

NonNegative = Annotated[float, Field(ge=0)]
LOSS_OF_MODEL = {"val_matching": "val", "amc": "amc",  # losses that need one model's internals
                 "nce": "dual_encoder", "info_nce": "dual_encoder", "vse": "dual_encoder"}


@section
class LossConfig:
    name: Literal["bbc", "soft_triplet", "val_matching", "amc", "nce", "info_nce", "vse"]
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

    def check_model(self, model_name: ModelName, batch_size: int, loop_section: str) -> None:
        """Raise a ParamsError naming the keys when this loss cannot train this model or batch size."""
        needs = LOSS_OF_MODEL.get(self.name)
        if needs is None and model_name in MATCHING_MODELS:
            raise ParamsError(f"{PARAMS_FILE}: loss.name: '{self.name}' trains composed-retrieval models, "
                              f"model.name is '{model_name}' (use nce, info_nce or vse)")
        if needs is not None and needs != model_name:
            raise ParamsError(f"{PARAMS_FILE}: loss.name: '{self.name}' trains the {needs} model only, "
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


class _HalfGradient(torch.autograd.Function):
    """Identity forward, gradient × 0.5 backward (google/tirg's soft-triplet backward, spec §1.3)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return 0.5 * grad


def metric_loss(cfg: LossConfig, q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """bbc or soft_triplet on normalised q̂, t̂, with the GA repo's MSE term when ga_mse_weight > 0."""
    if cfg.name == "bbc":
        loss = batch_based_classification(q, t)
    else:
        loss = soft_triplet(q, t)
        if cfg.soft_triplet_half_gradient:
            loss = _HalfGradient.apply(loss)
    if cfg.ga_mse_weight:
        loss = loss + cfg.ga_mse_weight * F.mse_loss(q, t)
    return loss


def model_inputs(tokenizer, batch: dict, device: torch.device):
    tokens, lengths = tokenizer.batch(batch["text"])
    return to_device(batch["ref"], device), tokens.to(device), lengths.to(device)


def training_loss(model: nn.Module, cfg: LossConfig, tokenizer, batch: dict, device: torch.device):
    """(loss, q̂, t̂, logs) of one batch; q̂, t̂ are what the offline-negative hinge of `train` reuses."""
    images, tokens, lengths = model_inputs(tokenizer, batch, device)
    targets = to_device(batch["tgt"], device)
    with autocast(device):
        reference, text = model.encode_reference(images), model.encode_text(tokens, lengths)
        if isinstance(model, AMC):
            layers, _ = model.expert_layers(reference, text[1])
            pooled = [r.mean(dim=1) for r in layers]
            target = model.encode_image(targets)
            query = pooled[-1]
        else:
            query, target = model.compose(reference, text), model.encode_image(targets)
    logs: dict[str, float] = {}
    q_hat, t_hat = model.normalize(as_vector(query)), model.normalize(as_vector(target))
    # in-batch losses over the global batch when training on several processes (stages.distributed)
    if cfg.name == "val_matching":
        loss = across_ranks(lambda qs, ts: val_loss(qs, ts, cfg.val_margin, True, cfg.val_semi_hard_mode),
                            [q.float() for q in query], [t.float() for t in target])
    elif cfg.name == "amc":
        terms = {}

        def amc(layers, target):
            loss, parts = amc_loss(layers, target, cfg.amc_sim_weight, cfg.amc_scale)
            terms.update(parts)
            return loss

        loss = across_ranks(amc, [p.float() for p in pooled], target.float())
        logs.update({f"amc_{k}": v.item() for k, v in terms.items()})
    else:
        loss = across_ranks(partial(metric_loss, cfg), q_hat, t_hat)
    if isinstance(model, ComposeAE):
        logs["main_loss"] = loss.item()
        with autocast(device):
            aux = model.auxiliary_losses(reference, text, query, model.encode_image(targets),
                                         lambda q, t: across_ranks(partial(metric_loss, cfg), q, t))
        w = cfg.composeae_weights
        loss = (w[0] * loss + w[1] * aux["reconstruction_image"].float() + w[2] * aux["reconstruction_text"].float()
                + w[3] * aux["rotational_symmetry"].float())
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
    if cfg.name == "vse":
        return across_ranks(lambda v, u: vse_max_violation(v @ u.T, cfg.vse_margin, same_image_mask(image_ids)), v, u), {}
    symmetric = cfg.name == "info_nce"
    logs = {"temperature": 1 / model.logit_scale.exp().item()} if symmetric else {}
    return across_ranks(lambda v, u: model.loss(v, u, image_ids, cfg.nce_tau, symmetric), v, u), logs


def check_ga_task(ga: GAConfig, task: str) -> None:
    if ga.adversarial and task != "composed":
        raise ParamsError(f"{PARAMS_FILE}: ga.adversarial: perturbs the reference image of composed retrieval; "
                          f"task is '{task}' (ga.isotropic works for any task)")


def with_ga(loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]], ga: GAConfig):
    """Wrap a step's loss with GA's adversarial term R_adv (one extra double-backprop pass per step)."""
    if not ga.adversarial:
        return loss_fn

    def step(model, batch):
        batch = {**batch, "ref": batch["ref"].clone().requires_grad_(True)}
        loss, logs = loss_fn(model, batch)
        # on W processes the loss is over the global batch W·B and its gradient is already scaled by W
        # (stages.distributed.across_ranks), so this rank's B gives the paper's global-batch B·∇L
        penalty = adversarial_penalty(loss, batch["ref"], batch["ref"].shape[0], ga.adversarial_lambda, ga.adversarial_q)
        return loss + penalty, {**logs, "ga_adversarial": penalty.item()}

    return step


def isotropic_noise(ga: GAConfig, seed: int) -> Callable[[torch.nn.Module], None] | None:
    """The `after_backward` hook adding GA's isotropic gradient noise, or None when it is off."""
    if not ga.isotropic:
        return None
    generator = torch.Generator().manual_seed(seed)
    return lambda model: isotropic_gradient_noise(model, ga.isotropic_weight, ga.isotropic_mode, generator)
