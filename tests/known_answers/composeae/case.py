"""cirflow's side of the ComposeAE known answer, shared by record.py (which gives these weights and inputs to the
release) and tests/test_known_answer_composeae.py: the model from a seed through cirflow's own builder, the fixed
inputs, and the training step through cirflow's own loss code (stages.training.objectives.training_loss)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import yaml
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
INPUTS = json.loads((HERE / "inputs.json").read_text())


class FixedTextEncoder(nn.Module):
    """Stands in for the frozen MiniLM (and the release's frozen BERT): token [i] -> the i-th fixed text vector."""

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.register_buffer("vectors", vectors, persistent=False)
        self.out_dim = vectors.shape[1]

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.vectors[tokens[:, 0]]


class IndexTokenizer:
    """`tokenizer.batch(texts)` for the texts of inputs.json: "query i" -> token [i], length 1."""

    def __init__(self, texts: list[str]):
        self.index = {t: i for i, t in enumerate(texts)}

    def batch(self, texts):
        tokens = torch.tensor([[self.index[t]] for t in texts])
        return tokens, torch.ones(len(texts), dtype=torch.long)


def text_vectors(inputs=INPUTS) -> torch.Tensor:
    g = torch.Generator().manual_seed(inputs["text_seed"])
    return F.normalize(torch.randn(inputs["batch_size"], inputs["text_dim"], generator=g), dim=1)


def images(inputs=INPUTS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(inputs["image_seed"])
    shape = (inputs["batch_size"], 3, inputs["image_size"], inputs["image_size"])
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def build_model(inputs=INPUTS) -> nn.Module:
    """cirflow's ComposeAE from weights_seed (stages.modeling.factory.build_model), its MiniLM replaced by the fixed
    text vectors."""
    from stages.common.params import parse
    from stages.modeling.factory import ModelConfig, build_model as build

    cfg = parse(ModelConfig, "model", inputs["model"])
    torch.manual_seed(inputs["weights_seed"])
    model = build(cfg, vocab_size=1, image_size=inputs["image_size"])
    assert model.text_encoder.out_dim == inputs["text_dim"]
    model.text_encoder = FixedTextEncoder(text_vectors(inputs))
    return model


def loss_config(ga_mse_weight: float, inputs=INPUTS):
    from stages.common.params import parse
    from stages.training.objectives import LossConfig

    raw = yaml.safe_load((REPO / "params.yaml").read_text())["loss"]
    return parse(LossConfig, "loss", {**raw, **inputs["loss"], "ga_mse_weight": ga_mse_weight})


def ga_config(adversarial: bool, isotropic: bool, inputs=INPUTS):
    from stages.common.params import parse
    from stages.training.objectives import GAConfig

    return parse(GAConfig, "ga", {**inputs["ga"], "adversarial": adversarial, "isotropic": isotropic})


def batch(inputs=INPUTS) -> dict:
    ref, tgt = images(inputs)
    return {"ref": ref, "tgt": tgt, "text": list(inputs["texts"])}


@torch.no_grad()
def eval_features(model: nn.Module, inputs=INPUTS) -> dict[str, torch.Tensor]:
    """Inference features (eval mode), as the release's test_retrieval reads them before its L2 normalisation:
    the composed query θ of (reference, text) and the target's φ."""
    model.eval()
    ref, tgt = images(inputs)
    tokens, lengths = IndexTokenizer(inputs["texts"]).batch(inputs["texts"])
    q = model.compose(model.encode_reference(ref), model.encode_text(tokens, lengths))
    return {"eval_query": q, "eval_target": model.encode_image(tgt)}


def training_step(model: nn.Module, ga_mse_weight: float, adversarial: bool = False, inputs=INPUTS):
    """One training forward through cirflow's training_loss (train mode, RNG at forward_seed): (loss, q̂, t̂, logs).
    Composition terms are read back by a hook on model.normalize (q̂, t̂, rotated target, source in call order)."""
    from stages.training.objectives import training_loss

    model.train()
    seen: list[torch.Tensor] = []
    hook = model.normalize.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    torch.manual_seed(inputs["forward_seed"])
    try:
        loss, q, t, logs = training_loss(model, loss_config(ga_mse_weight, inputs), IndexTokenizer(inputs["texts"]),
                                         batch(inputs), torch.device("cpu"),
                                         ga_config(adversarial, False, inputs) if adversarial else None)
    finally:
        hook.remove()
    return SimpleNamespace(loss=loss, query=q, target=t, logs=logs, normalized=seen)
