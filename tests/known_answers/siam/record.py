"""Records the known answers of SIAM (guided image retrieval's re-ranker) from the released code.

    /work/releases/venv-gir/bin/python tests/known_answers/siam/record.py --release /work/releases/gir

--release: a copy of sibasmarak/guided-image-retrieval@59f935a (outside this repository), run with the Python of
tests/known_answers/dual_encoder/record.py. Writes expected.pt beside this file; inputs.json is its input.

The release's SpatialInformationAggregatorModule is built by its own __init__ with three things it cannot have here
replaced, at run time (no file of the release copy is edited; PROVENANCE.md):
* torchvision's fasterrcnn_resnet50_fpn -> CellDetector: a module with the attributes SIAM reads
  (roi_heads.box_predictor.cls_score.in_features, roi_heads.box_head.fc7 for the release's forward hook) whose
  "proposals" are the h·w cells of the guide ResNet's layer4 map, from a frozen eval-mode copy of the guide (cirflow's
  regions: models/matching/siam.py map_regions); rpn_post_nms_top_n_test = h·w so the release's hook reshapes them
  to B × h·w × 2048.
* the module's resnet101 -> its own resnet50 (the same ResNet class and modulating _forward_impl), holding the trunk
  of cirflow's DE image tower (cirflow's guide map is that tower's layer4).
* the DE's BERT -> fixed text-tower features (as in the dual encoder's recorder).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from known_answers.layouts import LAYOUTS  # noqa: E402
from test_known_answer_dual_encoder import image_ids, make_batch  # noqa: E402
from test_known_answer_siam import LINEARS, TRAIN_GRADS, build_both  # noqa: E402


def _load_de_recorder():
    spec = importlib.util.spec_from_file_location("de_record", HERE.parent / "dual_encoder" / "record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CellDetector(nn.Module):
    """Stands in for the release's Faster R-CNN: each image's regions are the cells of a frozen trunk's map."""

    def __init__(self, region_dim: int):
        super().__init__()
        self.roi_heads = nn.Module()
        self.roi_heads.box_head = nn.Module()
        self.roi_heads.box_head.fc7 = nn.Identity()  # the release hooks this module's output
        self.roi_heads.box_predictor = nn.Module()
        self.roi_heads.box_predictor.cls_score = nn.Linear(region_dim, 1)  # SIAM reads its in_features
        self.trunk = []  # set after the guide ResNet exists; not a submodule

    def forward(self, images):
        net = self.trunk[0]
        with torch.no_grad():
            x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
            x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        self.roi_heads.box_head.fc7(x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1]))  # B·h·w × C, row-major
        return []


def release_siam(released, de, model, siam, inputs: dict):
    h, w = siam.map_size
    channels = siam.gamma_linear.out_features
    saved = (torchvision.models.detection.fasterrcnn_resnet50_fpn, released.resnet101)
    torchvision.models.detection.fasterrcnn_resnet50_fpn = lambda **kwargs: CellDetector(channels)
    released.resnet101 = released.resnet50
    try:
        module = released.SpatialInformationAggregatorModule(
            de, height=h, width=w, num_channels=channels, output_size=model.dim, pretrained=False,
            rpn_post_nms_top_n_test=h * w)
    finally:
        torchvision.models.detection.fasterrcnn_resnet50_fpn, released.resnet101 = saved
    # the guide ResNet <- cirflow's DE image tower trunk (its `fc`, unused by _forward_impl, keeps its init)
    prefix = "vision_model.model.backbone."
    trunk = {k[len(prefix):]: v for k, v in LAYOUTS["dual_encoder"].release_state(model.state_dict()).items()
             if k.startswith(prefix)}
    missing, unexpected = module.guide_vision_model.load_state_dict(trunk, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected, (missing, unexpected)
    missing, unexpected = module.load_state_dict(LAYOUTS["siam"].release_state(siam.state_dict()), strict=False)
    layout = LAYOUTS["siam"]
    assert not unexpected and all(k.startswith(layout.release_only_prefixes) for k in missing), (missing, unexpected)
    module.object_detection_model.trunk.append(copy.deepcopy(module.guide_vision_model).eval())
    return module


def record(module, release_batch, mode: str, keep) -> dict:
    """The release's features, loss and the gradients named in `keep` (its guide ResNet is not frozen, so its
    parameters get gradients too, though no optimiser steps them)."""
    if mode == "train":
        module.train()
        module.on_epoch_start()  # the release's own hook: DE and detector back to eval, the guide ResNet stays in train
        step = module.training_step
    else:
        module.eval()
        step = module.validation_step
    with torch.no_grad():
        image_features, text_features = module(release_batch["images"], release_batch["caption_input_ids"])
    loss = step(release_batch, 0)
    module.zero_grad()
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in module.named_parameters()
             if p.grad is not None and k in keep}
    return {"release_image_features": image_features.detach().clone(),
            "release_text_features": text_features.detach().clone(), "loss": loss.detach().clone(),
            "release_grads": grads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--release", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    de_record = _load_de_recorder()
    released, _ = de_record.import_release(args.release.resolve())
    inputs = json.loads((HERE / "inputs.json").read_text())

    model, siam = build_both(inputs)
    batch = make_batch(inputs)
    with torch.no_grad():
        tower = model.text_tower(batch["tokens"], batch["lengths"]).detach()
    de = de_record.release_dual_encoder(released, model, inputs, tower)
    module = release_siam(released, de, model, siam, inputs)
    b = len(batch["text"])
    release_batch = {"images": batch["image"], "caption_input_ids": torch.arange(b)[:, None],
                     "caption_attention_masks": None, "caption_token_type_ids": None,
                     "image_ids": image_ids(batch["image_id"])}
    linears = [f"{m}.{t}" for m in LINEARS for t in ("weight", "bias")]
    expected = {"eval": record(module, release_batch, "eval", keep=linears),
                "train": record(module, release_batch, "train", keep=TRAIN_GRADS)}
    torch.save(expected, HERE / "expected.pt")
    print(f"loss eval {expected['eval']['loss'].item():.6f}, train {expected['train']['loss'].item():.6f} "
          f"-> {HERE / 'expected.pt'}")


if __name__ == "__main__":
    main()
