"""Every training loss, by `loss.name`: the task it trains, the one model whose outputs it needs (if any),
what it reads, and how it computes (loss, logs). Adding a loss is a file in this folder plus one entry here.

`cfg` is the `loss` params section (stages.training.objectives.LossConfig). A composed-retrieval loss reads
    vectors   (cfg, q̂, t̂): the normalised composed queries and targets, B x d
    outputs   (cfg, query, target): the model's own outputs (VAL: one B x d tensor per level)
    layers    (cfg, layers, target): every layer's composed output and the target (the model's compose_layers)
a matching loss reads (cfg, model, v, u, image_ids): image and caption embeddings, and which image each caption is of.
The stages compute these over the global batch when training on several processes.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Optional

from models.losses.amc import amc_loss
from models.losses.matching import same_image_mask, vse_max_violation
from models.losses.metric import metric_loss
from models.losses.val import val_loss


@dataclass(frozen=True)
class LossEntry:
    task: Literal["composed", "matching"]
    compute: Callable[..., tuple]  # -> (loss, {name: tensor} logged beside it)
    reads: Literal["vectors", "outputs", "layers", "embeddings"]
    model: Optional[str] = None    # the one model.name it trains; None: any model of its task


def _metric(cfg, q, t):
    return metric_loss(cfg, q, t), {}


def _val(cfg, queries, targets):
    return val_loss(queries, targets, cfg.val_margin, True, cfg.val_semi_hard_mode), {}


def _amc(cfg, layers, target):
    loss, terms = amc_loss(layers, target, cfg.amc_sim_weight, cfg.amc_scale)
    return loss, {f"amc_{k}": v for k, v in terms.items()}


def _nce(cfg, model, v, u, image_ids):
    return model.loss(v, u, image_ids, cfg.nce_tau, False), {}


def _info_nce(cfg, model, v, u, image_ids):
    return model.loss(v, u, image_ids, cfg.nce_tau, True), {"temperature": 1 / model.logit_scale.exp().item()}


def _vse(cfg, model, v, u, image_ids):
    return vse_max_violation(v @ u.T, cfg.vse_margin, same_image_mask(image_ids)), {}


LOSSES: dict[str, LossEntry] = {
    "bbc": LossEntry("composed", _metric, "vectors"),           # TIRG's batch-based classification
    "soft_triplet": LossEntry("composed", _metric, "vectors"),  # TIRG's soft triplet
    "val_matching": LossEntry("composed", _val, "outputs", model="val"),  # VAL's semi-hard triplet over levels
    "amc": LossEntry("composed", _amc, "layers", model="amc"),  # AMC's L_BBC (scale) + λ L_BSC
    "nce": LossEntry("matching", _nce, "embeddings"),           # guided image retrieval's caption -> image NCE
    "info_nce": LossEntry("matching", _info_nce, "embeddings"),  # symmetric, learned temperature
    "vse": LossEntry("matching", _vse, "embeddings"),           # VSE++ hinge, hardest in-batch negative
}
