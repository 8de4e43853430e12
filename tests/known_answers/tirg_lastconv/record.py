"""Record TIRG-LastConv's known answers from the released code (fuxianghuang1/GA@f808df1 `--model tirg`, i.e.
TIRGLastConv, with the GA repo's BBC / soft triplet + 0.001 MSE) on cirflow's weights:
tests/known_answers/tirg_lastconv/{inputs.json,expected.pt}.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python tests/known_answers/tirg_lastconv/record.py --release /work/releases/GA

The release copy is GA at the commit below with release.patch applied (CPU and Python 3 only, see PROVENANCE.md);
the harness is tests/known_answers/tirg/{tirg_family_release,tirg_family_cirflow,record}.py. GA's main.py fixes
the text width at 512 and TIRGLastConv's FC is Linear(image_embed_dim, image_embed_dim) on ResNet-18's 512 channels, so
the dims are 512 (the release allows nothing smaller).
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("tirg_record", Path(__file__).resolve().parents[1] / "tirg" / "record.py")
tirg_record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tirg_record)

SPEC = {
    "method": "tirg_lastconv",
    "release": "fuxianghuang1/GA@f808df1df9e9b32a580aaa4455fb76567d5e98de",
    "release_class": "img_text_composition_models.TIRGLastConv (main.py --model tirg)",
    "layout": "tirg_lastconv",
    "seeds": {"model": 10, "inputs": 11, "forward": 12, "numpy": 13},
    "batch_size": 4,
    "image_size": 64,
    "texts": ["w05 w12", "w17 w01 w09 w09", "w02", "w08 w14 w03"],
    "model": {"name": "tirg_lastconv", "embed_dim": 512, "norm_scale": 4.0,
              "image": {"encoder": "resnet18", "weights": None},
              "text": {"encoder": "lstm", "embed_dim": 512, "hidden_dim": 512, "dropout": 0.1}},
    "runs": {
        # GA's default loss; compute_batch_based_classification_loss_ adds 0.001 * mean((q̂ - t̂)²)
        "bbc": {"release_opt": {"loss": "batch_based_classification"},
                "loss": {"name": "bbc", "ga_mse_weight": 0.001, "soft_triplet_half_gradient": False}},
        "soft_triplet": {"release_opt": {"loss": "soft_triplet"},
                         "loss": {"name": "soft_triplet", "ga_mse_weight": 0.001, "soft_triplet_half_gradient": True}},
    },
    "params": ["a", "normalize.scale", "feature_extractor.conv1.weight", "feature_extractor.bn1.weight",
               "feature_extractor.layer4.1.conv2.weight", "feature_extractor.layer4.1.bn2.bias",
               "image_fc.weight", "image_fc.bias", "text_encoder.embedding.weight", "text_encoder.lstm.bias_hh_l0",
               # not text_encoder.head.1.bias: BatchNorm2d over [X; tiled φ_t] removes a per-channel shift, so its
               # gradient is 0 up to rounding on both sides
               "text_encoder.lstm.weight_hh_l0", "text_encoder.head.1.weight", "residual.0.weight", "residual.1.weight",
               "residual.3.bias", "gate.0.bias", "gate.1.weight", "gate.3.bias"],
}


def release_opt(spec: dict, run: dict) -> argparse.Namespace:
    """GA main.py's options for `--model tirg` (text width 512: use_bert False)."""
    flags = {"use_gPenalty": False, "random_grad": False, **run["release_opt"]}
    return argparse.Namespace(model="tirg", image_embed_dim=spec["model"]["embed_dim"], use_bert=False,
                              use_complete_text_query=False, dataset="css3d", learning_rate=1e-2,
                              weight_decay=1e-6, **flags)


if __name__ == "__main__":
    tirg_record.main(SPEC, "ga", release_opt)
