"""Record TIRG's known answers from the released code (google/tirg@c58daa0, TIRG with its BBC and soft-triplet
losses) on cirflow's weights: tests/known_answers/tirg/{inputs.json,expected.pt}.

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python tests/known_answers/tirg/record.py --release /work/releases/tirg

The release copy is google/tirg at the commit below with release.patch applied (CPU and Python 3 only, see
PROVENANCE.md). cirflow's model is built from a seed by its own builder, exported to the release's parameter names
through tests/known_answers/layouts/tirg.py, loaded into the release's model (strict), and the release's own
training_1_iter (main.py) runs one step on fixed inputs; its normalised query / target features, loss and
gradients are recorded.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1])]  # the repository root (stages, models), tests/
sys.path.insert(0, str(HERE))

import tirg_family_cirflow as cs  # noqa: E402
from tirg_family_release import ReleaseRun  # noqa: E402

SPEC = {
    "method": "tirg",
    "release": "google/tirg@c58daa066d8af1a5b3de1a0ef6d112519ddda611",
    "release_class": "img_text_composition_models.TIRG (main.py --model tirg)",
    "layout": "tirg",
    "seeds": {"model": 0, "inputs": 1, "forward": 2, "numpy": 3},
    "batch_size": 4,
    "image_size": 64,
    "texts": ["w03 w11 w07", "w01", "w19 w02 w05 w08 w13", "w04 w04"],
    "model": {"name": "tirg", "embed_dim": 32, "norm_scale": 4.0,
              "image": {"encoder": "resnet18", "weights": None},
              "text": {"encoder": "lstm", "embed_dim": 32, "hidden_dim": 32, "dropout": 0.1}},
    "runs": {
        "bbc": {"release_opt": {"loss": "batch_based_classification"},
                "loss": {"name": "bbc", "ga_mse_weight": 0.0, "soft_triplet_half_gradient": False}},
        # google/tirg's hand-written backward halves the gradient: cirflow's soft_triplet_half_gradient switch
        "soft_triplet": {"release_opt": {"loss": "soft_triplet"},
                         "loss": {"name": "soft_triplet", "ga_mse_weight": 0.0, "soft_triplet_half_gradient": True}},
    },
    "params": ["a", "normalize.scale", "image_encoder.backbone.conv1.weight", "image_encoder.backbone.bn1.weight",
               "image_encoder.backbone.layer4.1.conv2.weight", "image_encoder.backbone.layer4.1.bn2.bias",
               "image_encoder.backbone.fc.weight", "image_encoder.backbone.fc.bias",
               "text_encoder.embedding.weight", "text_encoder.lstm.weight_ih_l0", "text_encoder.lstm.bias_hh_l0",
               "text_encoder.head.1.weight", "gate.0.weight", "gate.2.weight", "residual.0.bias",
               "residual.2.weight", "residual.4.bias"],
}


def release_opt(spec: dict, run: dict) -> argparse.Namespace:
    return argparse.Namespace(model="tirg", embed_dim=spec["model"]["embed_dim"], dataset="css3d",
                              learning_rate=1e-2, weight_decay=1e-6, **run["release_opt"])


def release_data(batch: dict) -> list[dict]:
    """training_1_iter's `data`: what the release's datasets yield per sample."""
    return [{"source_img_data": batch["ref"][i].numpy(), "target_img_data": batch["tgt"][i].numpy(),
             "mod": {"str": text}} for i, text in enumerate(batch["text"])]


def load_release_model(release: ReleaseRun, spec: dict, opt, state: dict) -> torch.nn.Module:
    model = release.build_model(opt, cs.release_vocab_texts())
    vocab = model.text_model.vocab.word2id
    assert vocab == {w: i for i, w in enumerate(cs.vocab().words)}, vocab
    model.load_state_dict(state, strict=True)
    return model


def to_cirflow_grads(spec: dict, grads: dict) -> dict:
    layout = cs.layout(spec)
    ours = {release: name for name, release in layout.names.items()}
    out = {}
    for release_name, g in grads.items():
        name = ours[release_name]
        out[name] = layout.to_cirflow.get(name, lambda t: t)(g) if g is not None else None
    return out


def record_run(release: ReleaseRun, spec: dict, run_name: str, run: dict, opt, cirflow_model, state: dict,
               noise_seed: int | None = None) -> dict:
    model = load_release_model(release, spec, opt, state)
    out = release.training_step(model, opt, release_data(cs.inputs(spec)), spec["seeds"]["forward"],
                                spec["seeds"]["numpy"], noise_seed)
    grads = to_cirflow_grads(spec, out["grads"])
    q, t = out["normalized"][:2]
    rec = {"q": q, "t": t, "loss": float(out["losses"][opt.loss]),
           "total": float(out["losses"]["total training loss"]),
           "grads": {p: cs.summarize(grads[p]) for p in spec["params"]}}
    if out["triplets"]:
        rec["triplets"] = torch.tensor(out["triplets"][0])
    if out["penalties"]:
        rec["penalty"] = float(out["penalties"][0])
    if out["noise"]:  # GA's random_grad: how many ξ_k it drew, and the first two (for `a` and the scale)
        rec["noise_draws"] = len(out["noise"])
        rec["noise_first"] = torch.cat([xi.flatten() for xi in out["noise"][:2]])
    # the same step through cirflow, for the recorder's log only (the tests assert it)
    cirflow_model.load_state_dict(layout_back(spec, state))
    ours = cs.step(cirflow_model, spec, run["loss"], run.get("ga"), noise_seed,
                   rec["triplets"].tolist() if "triplets" in rec else None)
    diffs = {"q": cs.max_abs_diff(ours["q"], q), "t": cs.max_abs_diff(ours["t"], t),
             "loss": abs(ours["loss"] - rec["loss"])}  # both with R_adv when on; the release's also with GA's
                                                         # isotropic terms' values when random_grad is on
    diffs["grads (max rel. to the tensor's max)"] = max(
        cs.max_abs_diff(cs.summarize(ours["grads"][p])["head"], rec["grads"][p]["head"])
        / max(float(rec["grads"][p]["head"].abs().max()), 1e-30) for p in spec["params"])
    if "penalty" in rec:
        diffs["penalty (rel.)"] = abs(ours["logs"]["ga_adversarial"] - rec["penalty"]) / rec["penalty"]
    print(f"{spec['method']}/{run_name}: release loss {rec['loss']:.6f}; cirflow vs release {diffs}")
    return rec


def layout_back(spec: dict, state: dict) -> dict:
    return cs.layout(spec).cirflow_state(state)


def release_parameter_order(spec: dict, model: torch.nn.Module) -> list[str]:
    """The release's named_parameters() order, in cirflow's names."""
    ours = {release: name for name, release in cs.layout(spec).names.items()}
    return [ours[name] for name, _ in model.named_parameters()]


def main(spec: dict = SPEC, flavour: str = "tirg", opt_of=release_opt, extra=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", type=Path, required=True, help="the patched release copy's folder")
    parser.add_argument("--out", type=Path, default=None, help="default: tests/known_answers/<method>/")
    args = parser.parse_args()
    out_dir = args.out or HERE.parent / spec["method"]
    torch.set_num_threads(1)
    release = ReleaseRun(args.release, flavour)
    cirflow_model = cs.build(spec)
    state = cs.layout(spec).release_state(cirflow_model.state_dict())
    expected = {"runs": {}}
    for run_name, run in spec["runs"].items():
        opt = opt_of(spec, run)
        expected["runs"][run_name] = record_run(release, spec, run_name, run, opt, cirflow_model, state,
                                                run.get("noise_seed"))
    if extra is not None:
        extra(release, spec, state, cirflow_model, expected)
    release_model = load_release_model(release, spec, opt_of(spec, next(iter(spec["runs"].values()))), state)
    expected["release_shapes"] = {k: list(v.shape) for k, v in release_model.state_dict().items()}
    expected["torch"] = str(torch.__version__)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "inputs.json").write_text(json.dumps(spec, indent=1) + "\n")
    torch.save(expected, out_dir / "expected.pt")
    print(f"wrote {out_dir / 'inputs.json'} and {out_dir / 'expected.pt'} "
          f"({(out_dir / 'expected.pt').stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
