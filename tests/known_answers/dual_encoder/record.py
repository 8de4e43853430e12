"""Records the known answers of guided image retrieval's dual encoder and NCE from the released code.

    /work/releases/venv-gir/bin/python tests/known_answers/dual_encoder/record.py --release /work/releases/gir

--release: a copy of sibasmarak/guided-image-retrieval@59f935a (outside this repository); run it with a Python
that has the release's imports (timm 0.4.12, pytorch-lightning 1.5.10, torchmetrics 0.7.2, pytorch-metric-learning
1.2.0) beside cirflow's own packages (PROVENANCE.md). Writes expected.pt beside this file; inputs.json is its input.

cirflow's dual encoder is built from the seed (tests/test_known_answer_dual_encoder.build_cirflow), its weights go
to the release's DualEncoder through the `dual_encoder` release layout, and the release's own forward,
`training_step` and ContrastiveLoss compute the answers. The release's text model is an HF BERT
(AutoModel.from_pretrained('./pretrained/bert-base-uncased')) that cannot be had here: the recorder puts a
parameter-free stand-in in its place whose pooler_output is a fixed table of text features (cirflow's LSTM tower
output for the batch; row i for input_ids[i, 0] = i), so the release's language_model.dense runs on the same
features as cirflow's text_projection.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from known_answers.layouts import LAYOUTS  # noqa: E402
from test_known_answer_dual_encoder import TRUNK_GRADS, build_cirflow, image_ids, make_batch, make_nce_features  # noqa: E402

GRADS = (*(f"vision_model.model.backbone.{k}" for k in TRUNK_GRADS), "vision_model.model.dense.weight",
         "vision_model.model.dense.bias", "language_model.dense.weight", "language_model.dense.bias")


class FixedTextFeatures(nn.Module):
    """Stands in for the release's BERT: pooler_output = features[input_ids[:, 0]] (no parameters)."""

    def __init__(self, features: torch.Tensor):
        super().__init__()
        self.features = [features]  # not a buffer: nothing enters the release's state_dict

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return SimpleNamespace(pooler_output=self.features[0][input_ids[:, 0]])


def import_release(release: Path):
    sys.path.insert(0, str(release))
    import src.model as released  # the release's module: ResNet, VisionModel, LanguageModel, DualEncoder, SIAM
    from utils.loss import ContrastiveLoss
    return released, ContrastiveLoss


def release_dual_encoder(released, model, inputs: dict, text_features: torch.Tensor):
    """The release's DualEncoder (run.py's defaults: resnet50, bert) with cirflow's weights; its BERT replaced by
    FixedTextFeatures; language_input_size = d, the width of the features it is given."""
    stand_in = SimpleNamespace(from_pretrained=lambda path: FixedTextFeatures(text_features))
    saved, released.AutoModel = released.AutoModel, stand_in
    try:
        de = released.DualEncoder("resnet50", "bert", language_input_size=model.dim, vision_hidden_size=2048,
                                  output_size=model.dim, vision_pretrained=False)
    finally:
        released.AutoModel = saved
    de.load_state_dict(LAYOUTS["dual_encoder"].release_state(model.state_dict()), strict=True)
    return de


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--release", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    released, ContrastiveLoss = import_release(args.release.resolve())
    inputs = json.loads((HERE / "inputs.json").read_text())

    model = build_cirflow(inputs)  # training mode, as the release's training_step runs
    batch = make_batch(inputs)
    with torch.no_grad():
        tower = model.text_tower(batch["tokens"], batch["lengths"]).detach()
    de = release_dual_encoder(released, model, inputs, tower).train()
    b = len(batch["text"])
    release_batch = {"images": batch["image"], "caption_input_ids": torch.arange(b)[:, None],
                     "caption_attention_masks": None, "caption_token_type_ids": None,
                     "image_ids": image_ids(batch["image_id"])}
    with torch.no_grad():
        image_features, text_features = de(release_batch["images"], release_batch["caption_input_ids"])
    de.configure_optimizers()  # training_step steps the two cosine schedulers it creates
    loss = de.training_step(release_batch, 0, 0)
    de.zero_grad()
    loss.backward()
    params = dict(de.named_parameters())
    release_grads = {k: params[k].grad.detach().clone() for k in GRADS}

    spec = inputs["nce"]
    v, u, ids = make_nce_features(spec)
    v.requires_grad_(True)
    u.requires_grad_(True)
    nce = ContrastiveLoss(temperature=0.07)(v, u, ids)
    nce.backward()
    nce_unit = ContrastiveLoss(temperature=1.0)(v.detach(), u.detach(), ids)

    expected = {
        "text_tower_features": tower.clone(),
        "release_image_features": image_features.detach().clone(),
        "release_text_features": text_features.detach().clone(),
        "loss": loss.detach().clone(),
        "release_grads": release_grads,
        "nce": {"loss_temperature_0.07": nce.detach().clone(), "loss_temperature_1.0": nce_unit.detach().clone(),
                "grad_image": v.grad.clone(), "grad_text": u.grad.clone()},
    }
    torch.save(expected, HERE / "expected.pt")
    print(f"loss {loss.item():.6f}, NCE on given features {nce.item():.6f} -> {HERE / 'expected.pt'}")


if __name__ == "__main__":
    main()
