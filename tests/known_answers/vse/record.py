"""Record VSE++'s known answers from the released code: the hardest-negative hinge as sunnychencool/AOQ@5bfe620 uses
it (modelAOQ.py ContrastiveLoss, max_violation=True, marginonline 0.2; VSE++'s own lines, fartashf/vsepp, kept
inside AOQ's loss).

    cd /work/main && nice -n 15 env OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES= .venv/bin/python \
        tests/known_answers/vse/record.py --release /work/releases/AOQ

The release has no VSE++-only loss: ContrastiveLoss always adds AOQ's offline terms and adaptive weights. They are
switched off through its constructor, not by editing it: alpha = inf, beta = 1 make the weights exactly 1
(1 − x/inf), and marginoffline = −10 with all-zero offline features makes terms (3)–(6) relu(−10 − pos) = 0 (pos is
a cosine, ≥ −1). The recorder checks the result equals terms (1) + (2) of the same code read off its `.sum()`s.
Release copy, its patches and the import stubs: tests/known_answers/aoq/ (record.py, PROVENANCE.md).
Writes expected.pt and inputs.json beside this file.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("aoq_known_answer_record", HERE.parent / "aoq" / "record.py")
aoq_record = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aoq_record)  # also puts tests/ on sys.path
from test_known_answer_aoq import make_features  # noqa: E402

REPOSITORY = aoq_record.REPOSITORY
DIM = 8
BATCHES = {"unique": {"seed": 22, "b": 4},
           "duplicate": {"seed": 14, "b": 4, "image_ids": [0, 0, 1, 2]}}  # items 0, 1: two captions of one image


def record(model_mod, feats: dict) -> dict:
    zeros = torch.zeros_like(feats["im"])
    inputs = {"im": feats["im"], "s": feats["s"], "imhnoff": zeros, "shnoff": zeros, "imhnoff2": zeros,
              "shnoff2": zeros}
    criterion, loss, sums, leaves, hyper = aoq_record.run_release_loss(model_mod, inputs, marginoffline=-10.0,
                                                                        alpha=math.inf, beta=1.0)
    assert all(s.item() == 0.0 for s in sums[2:]), "offline terms not switched off"
    assert math.isclose(loss.item(), (sums[0] + sums[1]).item(), rel_tol=1e-7)
    grad_im, grad_s = torch.autograd.grad(loss, [leaves["im"], leaves["s"]])
    return {"loss": loss.detach(), "caption_retrieval": sums[0].detach(), "image_retrieval": sums[1].detach(),
            "grad": {"im": grad_im, "s": grad_s}, "margin": float(criterion.marginonline)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True, help="the patched copy of sunnychencool/AOQ@5bfe620")
    args = parser.parse_args()
    torch.set_num_threads(1)
    (model_mod,) = aoq_record.load_release(args.release, "modelAOQ.py")
    feats = {name: make_features(spec["seed"], spec["b"], DIM, spec.get("image_ids")) for name, spec in BATCHES.items()}
    release = {name: record(model_mod, f) for name, f in feats.items()}
    default = model_mod.ContrastiveLoss()
    expected = {"inputs": {k: {"im": f["im"], "s": f["s"]} for k, f in feats.items()}, "release": release,
                "release_default_margin": float(default.marginonline), "repository": REPOSITORY}
    torch.save(expected, HERE / "expected.pt")
    inputs = {"repository": REPOSITORY, "dim": DIM, "batches": BATCHES, "torch": torch.__version__,
              "note": "features: tests/test_known_answer_aoq.py make_features(seed, b, dim, image_ids), its im and s"}
    (HERE / "inputs.json").write_text(json.dumps(inputs, indent=1) + "\n")
    for name, r in release.items():
        print(f"{name:9s} loss {r['loss'].item():.6f} (caption retrieval {r['caption_retrieval'].item():.6f}, "
              f"image retrieval {r['image_retrieval'].item():.6f})")


if __name__ == "__main__":
    main()
