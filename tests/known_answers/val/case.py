"""cirflow's side of the VAL known answer, shared by record.py (which hands these weights and inputs to the
release, yanbeic/VAL@8d12749, through TensorFlow's compat.v1) and tests/test_known_answer_val.py: the model from a
seed through cirflow's own builder, the fixed inputs, and the training step through cirflow's own loss code
(stages.training.objectives.training_loss with loss.name val_matching).

The release's slim ResNet-v2-50 is not cirflow's trunk (models/composed/val.py ResNetLevels), so the comparison
starts at the trunk's maps: cirflow's small-CNN trunk computes them from seeded images, the release's composite
transformers, text model, projection and loss read the same maps. Dropout is kept at its rate on both sides with
masks drawn here and given to both (TF and torch draw different random streams).
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
INPUTS_FILE = HERE / "inputs.json"


def in_cirflow_names(release_named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors named and laid out as the release's TF variables (values, gradients, moving averages) in cirflow's
    names and layout, through the layout (tests/known_answers/layouts/val.py). BasicLSTMCell's kernel is split into
    its input and hidden rows; its bias (= b_ih + b_hh − forget_bias on the forget block) gives its gradient to
    both b_ih and b_hh -- this helper is for gradients and for tensors with no LSTM entry."""
    from known_answers.layouts.val import LSTM, VAL_LAYOUT

    named = dict(release_named)
    if f"{LSTM}/kernel" in named:
        kernel, bias = named.pop(f"{LSTM}/kernel"), named.pop(f"{LSTM}/bias")
        hidden = bias.shape[0] // 4
        named.update({f"{LSTM}/kernel#input": kernel[:-hidden], f"{LSTM}/kernel#hidden": kernel[-hidden:],
                      f"{LSTM}/bias#ih": bias, f"{LSTM}/bias#hh": bias})
    ours = {theirs: k for k, theirs in VAL_LAYOUT.names.items()}
    return {ours[k]: VAL_LAYOUT.to_cirflow.get(ours[k], lambda x: x)(v) for k, v in named.items()}


def load_inputs() -> dict:
    return json.loads(INPUTS_FILE.read_text())


def build_model(inputs: dict) -> nn.Module:
    """torch.manual_seed(weights_seed) then stages.modeling.factory.build_model; then, from a generator seeded
    tweak_seed, every non-trunk BatchNorm's weight/bias/running stats, h0/c0 and w_self are moved off their
    constant initial values (so that a swapped name in the layout shows), w_self to 0.5 (w_s = 0 at init would
    block the self-attention path's gradient)."""
    from stages.common.params import parse
    from stages.modeling.factory import ModelConfig, build_model as build

    cfg = parse(ModelConfig, "model", inputs["model"])
    torch.manual_seed(inputs["weights_seed"])
    model = build(cfg, vocab_size=inputs["vocab_size"], image_size=inputs["image_size"], load_weights=False)
    g = torch.Generator().manual_seed(inputs["tweak_seed"])
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not name.startswith("trunk."):
                n = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                module.bias.copy_(0.2 * torch.randn(n, generator=g))
                module.running_mean.copy_(0.3 * torch.randn(n, generator=g))
                module.running_var.copy_(0.5 + torch.rand(n, generator=g))
        model.text_encoder.h0.copy_(0.3 * torch.randn(model.text_encoder.h0.shape, generator=g))
        model.text_encoder.c0.copy_(0.3 * torch.randn(model.text_encoder.c0.shape, generator=g))
        for ct in model.transformers:
            ct.w_self.fill_(inputs["w_self"])
    return model


def images(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(inputs["image_seed"])
    shape = (inputs["batch_size"], 3, inputs["image_size"], inputs["image_size"])
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def tokens(inputs: dict, case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B x max-length token ids padded with 0 past each caption's end, as both Vocab.batch and the release's
    vocabulary.encode_text2id_batch pad, lengths)."""
    g = torch.Generator().manual_seed(inputs["token_seed"])
    lengths = torch.tensor(inputs["cases"][case]["lengths"])
    ids = torch.randint(1, inputs["vocab_size"], (len(lengths), int(lengths.max())), generator=g)
    return ids * (torch.arange(ids.shape[1])[None] < lengths[:, None]), lengths


def dropout_masks(inputs: dict, model: nn.Module, case: str) -> dict:
    """Keep-masks (1 = kept) from a generator seeded dropout_seed (+ the case's index): the text projection's
    (B x hidden) and, per level, one B x N x N mask per head for the attention matrix."""
    g = torch.Generator().manual_seed(inputs["dropout_seed"] + list(inputs["cases"]).index(case))
    keep = 1 - inputs["dropout_rate"]
    b, hidden = inputs["batch_size"], inputs["model"]["text"]["hidden_dim"]
    text = torch.bernoulli(torch.full((b, hidden), keep), generator=g)
    attention = []
    for ct in model.transformers:
        n = ct.map_size[0] * ct.map_size[1]
        attention.append([torch.bernoulli(torch.full((b, n, n), keep), generator=g) for _ in range(ct.num_heads)])
    return {"text": text, "attention": attention}


class MaskDropout(nn.Module):
    """nn.Dropout(p) with given keep-masks, used in call order: x * mask / (1 - p), p the replaced module's."""

    def __init__(self, masks: list[torch.Tensor], p: float):
        super().__init__()
        self.masks, self.p = list(masks), p

    def forward(self, x):
        if not self.training:
            return x
        return x * self.masks.pop(0) / (1 - self.p)


def use_masks(model: nn.Module, masks: dict) -> None:
    model.text_encoder.dropout = MaskDropout([masks["text"]], model.text_encoder.dropout.p)
    for ct, level in zip(model.transformers, masks["attention"]):
        ct.attention_dropout = MaskDropout(level, ct.attention_dropout.p)


class RecordingTrunk(nn.Module):
    """The model's trunk, its maps handed on as leaves (so their gradients are those of the loss through the
    composition and the target descriptors only, as at the release's map placeholders, not also through the
    trunk's later stages); keeps each call's maps (call 0: reference, 1: target)."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.inner, self.calls = trunk, []

    def forward(self, x):
        maps = [m.detach().requires_grad_() for m in self.inner(x)]
        self.calls.append(maps)
        return maps


class FixedTokenizer:
    def __init__(self, ids: torch.Tensor, lengths: torch.Tensor):
        self.ids, self.lengths = ids, lengths

    def batch(self, texts):
        assert len(texts) == len(self.ids)
        return self.ids, self.lengths


def loss_config(inputs: dict):
    from stages.common.params import parse
    from stages.training.objectives import LossConfig

    raw = yaml.safe_load((REPO / "params.yaml").read_text())["loss"]
    return parse(LossConfig, "loss", {**raw, **inputs["loss"]})


@torch.no_grad()
def trunk_maps(model: nn.Module, inputs: dict, train: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The trunk's (reference, target) maps as training (train mode, reference then target pass, as
    training_loss calls it) or inference (eval mode) computes them; NCHW."""
    model.train(train)
    ref, tgt = images(inputs)
    return [m.clone() for m in model.trunk(ref)], [m.clone() for m in model.trunk(tgt)]


def release_pooling_forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """VALTextEncoder.forward with the release's sentence vector: tf.nn.dynamic_rnn writes zeros past each
    caption's end and tf.reduce_max runs over all steps of the batch's longest caption, so those zeros count
    (yanbeic/VAL nets/rnn.py l.92-99); cirflow takes the max over each caption's valid steps only."""
    b, n = tokens.shape
    state = (self.h0.expand(-1, b, -1).contiguous(), self.c0.expand(-1, b, -1).contiguous())
    outputs, _ = self.lstm(self.embedding(tokens), state)
    valid = torch.arange(n, device=tokens.device)[None, :] < lengths.to(tokens.device)[:, None]
    pooled = (outputs * valid[:, :, None]).amax(dim=1)
    return self.norm(self.project(self.dropout(pooled)))


def sentence_vector(model: nn.Module, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The text encoder's max-pooled LSTM output (what enters its dropout and projection)."""
    seen = []
    hook = model.text_encoder.dropout.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            model.text_encoder(ids, lengths)
    finally:
        hook.remove()
    return seen[0]


def training_step(model: nn.Module, inputs: dict, case: str, semi_hard_mode: str | None = None,
                  release_pooling: bool = False):
    """One training forward + backward through cirflow's training_loss (train mode) with the case's captions and
    dropout masks. Returns the loss, the per-level query/target outputs (f, g), the composite maps y, the
    sentence vector (the LSTM max-pool, before dropout) and the text feature t, and the gradients of the loss
    w.r.t. every parameter and w.r.t. the trunk's reference and target maps."""
    from stages.training.objectives import training_loss

    cfg = loss_config(inputs)
    if semi_hard_mode is not None:
        cfg = type(cfg)(**{**cfg.__dict__, "val_semi_hard_mode": semi_hard_mode})
    model.train()
    use_masks(model, dropout_masks(inputs, model, case))
    if release_pooling:  # an instance attribute shadows VALTextEncoder.forward for this model
        model.text_encoder.forward = release_pooling_forward.__get__(model.text_encoder)
    inner = model.trunk
    model.trunk = RecordingTrunk(inner)
    seen: dict = {}
    compose, encode_image = model.compose, model.encode_image
    model.compose = lambda r, t: seen.setdefault("query", compose(r, t))      # instance attributes shadow the
    model.encode_image = lambda x: seen.setdefault("target", encode_image(x))  # methods while training_loss runs
    hooks = [model.text_encoder.dropout.register_forward_pre_hook(lambda m, a: seen.setdefault("sentence", a[0])),
             model.text_encoder.register_forward_hook(lambda m, a, o: seen.setdefault("text", o))]
    for level, ct in enumerate(model.transformers):
        hooks.append(ct.register_forward_hook(lambda m, a, o, level=level: seen.setdefault(f"composite{level}", o)))
    ids, lengths = tokens(inputs, case)
    ref, tgt = images(inputs)
    model.zero_grad(set_to_none=True)
    try:
        loss, _, _, _ = training_loss(model, cfg, FixedTokenizer(ids, lengths),
                                      {"ref": ref, "tgt": tgt, "text": ["?"] * len(ids)}, torch.device("cpu"))
        loss.backward()
        calls = model.trunk.calls
    finally:
        for h in hooks:
            h.remove()
        del model.compose, model.encode_image
        model.text_encoder.__dict__.pop("forward", None)
        model.trunk = inner
    levels = len(model.transformers)
    return SimpleNamespace(
        loss=loss.detach(), sentence=seen["sentence"].detach(), text=seen["text"].detach(),
        query=[f.detach() for f in seen["query"]], target=[g.detach() for g in seen["target"]],
        composite=[seen[f"composite{i}"].detach() for i in range(levels)],
        grads={k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
        map_grads={"reference": [m.grad.clone() for m in calls[0]], "target": [m.grad.clone() for m in calls[1]]},
        maps={"reference": [m.detach() for m in calls[0]], "target": [m.detach() for m in calls[1]]})


@torch.no_grad()
def eval_features(model: nn.Module, inputs: dict, case: str) -> list[torch.Tensor]:
    """Inference (eval mode) composed queries f^l per level, each query on its own (the release extracts with
    batch size 1, its caption padded to its own length)."""
    model.eval()
    ids, lengths = tokens(inputs, case)
    ref, _ = images(inputs)
    rows = []
    for i in range(len(ids)):
        n = int(lengths[i])
        rows.append(model.compose(model.encode_reference(ref[i:i + 1]), model.encode_text(ids[i:i + 1, :n],
                                                                                         lengths[i:i + 1])))
    return [torch.cat([r[level] for r in rows]) for level in range(len(rows[0]))]
