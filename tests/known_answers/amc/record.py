"""Record AMC's known answers from its release (KevinLight831/AMC@313511a) on cirflow's weights.

    nice -n 15 env OMP_NUM_THREADS=1 <python with einops> tests/known_answers/amc/record.py --release /work/releases/AMC

cirflow's model is built from a seed with a tiny config (tests/test_known_answer_amc.py build_cirflow), its
state_dict is written in the release's names through tests/known_answers/layouts/amc.py and loaded into the release's
`model.collative_model` (ResNet-50 trunk, LSTM text model); the release's own code then computes, on fixed inputs:
  - eval mode: query_eval / target_eval features, the layer-1 pooled query, the sentence vector, both layers' gates
  - train mode (train.py train()): compute_loss -> class_weight·class + sim_weight·sim_MSE, backward, the gradients,
    optimizer.step() (train.py create_model_and_optimizer's Adam), ema.update() (utils.EMA, decay 0.999)
  - train_and_evaluate's ema.apply_shadow() (never restored), then one more train step and ema.update().
Writes expected.pt and inputs.json beside this file (or --out). The release copy must be patched for the CPU and
a current Python/PyTorch only (PROVENANCE.md lists the patch).
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import test_known_answer_amc as ka  # noqa: E402  (cirflow's side: the same builders the test uses)
from known_answers.layouts import LAYOUTS  # noqa: E402

SPEC = {
    "seed_weights": 0,
    "seed_inputs": 1,
    "batch": 4,
    "image_size": 64,          # ResNet-50 layer4: 2 x 2 map -> K = 4 tokens
    "max_len": 6,
    "vocab_size": 20,
    "first_word_id": 4,        # ids 0-3 are the release's <UNK> <AND> <BOS> <EOS>; captions use w4 ... w19
    "bn_calibration": {"seed": 2, "batch": 16},  # the trunk's BatchNorm statistics (test build_cirflow says why)
    "dtype": "float64",        # weights, inputs and both computations (test default_dtype says why)
    # the release fixes 8 heads, FFN ratio 0.5 and two dynamic layers (cells.py, router.py)
    "model": {"name": "amc", "embed_dim": 64,
              "image": {"encoder": "resnet50", "weights": None, "channels": [8]},
              "text": {"encoder": "lstm", "embed_dim": 16, "hidden_dim": 64},
              "amc": {"router_hidden": 16, "heads": 8, "ffn_ratio": 0.5, "layers": 2, "freeze_trunk_bn": True}},
    "loss_weights": {"class_weight": 1.0, "sim_weight": 1.0},       # train.py defaults
    "optimizer": {"lr": 1e-4, "eps": 1e-8, "weight_decay": 1e-6},    # train.py defaults (Adam)
    "ema_decay": 0.999,                                              # train.py utils.EMA(model, 0.999)
    "grad_params": [
        "text_encoder.embedding.weight",
        "text_encoder.lstm.bias_ih_l0",
        "image_trunk.layer4.2.bn3.weight",
        "image_trunk.layer4.2.bn3.bias",
        "layers.0.router.mlp.0.weight",
        "layers.0.router.mlp.1.weight",
        "layers.1.router.mlp.3.weight",
        "layers.0.experts.1.fuse.bias",
        "layers.1.experts.1.block.q.weight",
        "layers.0.experts.1.block.ffn.2.bias",
        "layers.1.experts.2.gamma.weight",
        "layers.0.experts.2.beta.bias",
    ],
    # weights and EMA shadows recorded after the Adam steps: tensors whose every entry has |g + wd·θ| >= 5e-6, since
    # Adam's first step lr·g/(|g| + eps) turns a rounding-level change of a gradient entry near eps = 1e-8 into a
    # visible change of the step (up to 2·lr for a sign flip). Such flips do happen among the 23M trunk weights,
    # so the weights the second step starts from differ by ~1e-7 (0.001 x 2 lr) between any two runs, and the
    # random trunk's gradients there differ by up to a few %: none of the trunk's tensors is recorded after step 2.
    "ema_params": [
        "text_encoder.lstm.bias_ih_l0",
        "layers.0.experts.1.fuse.bias",
        "layers.0.experts.2.beta.bias",
        "layers.1.experts.1.block.v.bias",
        "layers.1.experts.2.gamma.bias",
    ],
}


def release_model(release: Path, spec: dict):
    sys.path.insert(0, str(release))
    import model as amc_model  # the release's model.py (and through it cells.py, router.py, img_model.py, ...)
    import utils as amc_utils

    m = spec["model"]
    assert (m["amc"]["heads"], m["amc"]["ffn_ratio"], m["amc"]["layers"]) == (8, 0.5, 2), "fixed in the release"
    opt = types.SimpleNamespace(embed_size=m["embed_dim"], hid_router=m["amc"]["router_hidden"],
                                img_encoder="resnet50", text_encoder="LSTM")
    words = " ".join(f"w{i}" for i in range(spec["first_word_id"], spec["vocab_size"]))
    net = amc_model.collative_model(opt, [words], word_dim=m["text"]["embed_dim"], lstm_dim=m["embed_dim"])
    assert all(net.text_model.vocab.word2id[f"w{i}"] == i for i in range(spec["first_word_id"], spec["vocab_size"]))
    assert net.text_model.vocab.get_size() == spec["vocab_size"]
    return net, amc_utils


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--release", type=Path, required=True, help="the patched copy of KevinLight831/AMC@313511a")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with ka.default_dtype(SPEC):  # the release's tensors (its LSTM state, eye, lengths) follow the default dtype
        record(args, SPEC)


def record(args: argparse.Namespace, spec: dict) -> None:
    ours = ka.build_cirflow(spec)
    x = ka.make_inputs(spec)
    layout = LAYOUTS["amc"]
    net, amc_utils = release_model(args.release, spec)
    loaded = net.load_state_dict(layout.release_state(ours.state_dict()), strict=False)
    assert sorted(loaded.missing_keys) == ["img_model.resnet.fc.bias", "img_model.resnet.fc.weight"], loaded
    assert not loaded.unexpected_keys, loaded
    params = dict(net.named_parameters())  # the trunk's first names are img_model.resnet.* (registered first)
    name = layout.names  # cirflow name -> release name
    images, targets, texts = x["images"], x["targets"], x["texts"]
    out: dict = {}

    net.eval()
    with torch.no_grad():
        query_tensor = net.img_model.forward(images)
        wrd, stc, cap_len = net.text_model(texts)
        q1, q2, gates1, gates2 = net.compose_fusion(query_tensor, wrd, stc, cap_len)
        out["query"] = net.query_eval(images, texts)
        assert out["query"].dtype == getattr(torch, spec["dtype"]), out["query"].dtype
        assert torch.equal(out["query"], q2.mean(1))
        out["query_layer1"] = q1.mean(1)
        out["target"] = net.target_eval(targets)
        out["sentence"] = stc
        out["gates"] = torch.stack([gates1, gates2], dim=1)  # B x layers x [ric (NIN), glo (CRN), sty (GTN)]

    # train.py: create_model_and_optimizer, then train_and_evaluate's EMA, then train()'s step
    optimizer = torch.optim.Adam(filter(lambda p: p.requires_grad, net.parameters()), lr=spec["optimizer"]["lr"],
                                 eps=spec["optimizer"]["eps"], weight_decay=spec["optimizer"]["weight_decay"])
    ema = amc_utils.EMA(net, spec["ema_decay"])
    ema.register()
    w = spec["loss_weights"]

    def step() -> dict:
        net.train()
        optimizer.zero_grad()
        loss = net.compute_loss(images, texts, targets)
        total = w["class_weight"] * loss["class"] + w["sim_weight"] * loss["sim_MSE"]
        total.backward()
        optimizer.step()
        ema.update()
        return {"total": total.item(), "class": loss["class"].item(), "sim_MSE": loss["sim_MSE"].item()}

    net.train()
    optimizer.zero_grad()
    loss = net.compute_loss(images, texts, targets)
    total = w["class_weight"] * loss["class"] + w["sim_weight"] * loss["sim_MSE"]
    out["loss"], out["loss_bbc"], out["loss_bsc"] = total.item(), loss["class"].item(), loss["sim_MSE"].item()
    total.backward()
    out["grad"] = {n: params[name[n]].grad.clone() for n in spec["grad_params"]}
    out["grad_norm"] = {n: params[name[n]].grad.norm().item() for n, _ in ours.named_parameters()}
    optimizer.step()
    ema.update()
    out["param_step1"] = {n: params[name[n]].detach().clone() for n in spec["ema_params"]}
    out["shadow_step1"] = {n: ema.shadow[name[n]].clone() for n in spec["ema_params"]}

    shadow1 = {k: v.clone() for k, v in ema.shadow.items()}
    ema.apply_shadow()  # train_and_evaluate, after each epoch; restore() is never called
    second = step()
    # the aliasing over every parameter: the release's shadow is θ₂, a copying EMA's S₁ + (1 - d)(θ₂ - S₁)
    effect = [spec["ema_decay"] * (ema.shadow[k] - shadow1[k]).abs() for k in shadow1]
    assert all(torch.allclose(ema.shadow[k], params[k].detach(), rtol=1e-6, atol=1e-9) for k in shadow1)
    count = sum(e.numel() for e in effect)
    print(f"aliasing, all {count} weights: max |d(θ₂ - S₁)| = {max(e.max().item() for e in effect):.4g}, "
          f"mean {sum(e.sum().item() for e in effect) / count:.4g}")
    out["loss_step2"] = second["total"]
    out["param_step2"] = {n: params[name[n]].detach().clone() for n in spec["ema_params"]}
    out["shadow_step2"] = {n: ema.shadow[name[n]].clone() for n in spec["ema_params"]}

    # what the aliasing changes, against cirflow's EMA on the same trajectory (printed for the report only)
    mine = ka.run_cirflow(spec)
    mine.update(ka.run_cirflow_after_apply_shadow(spec, mine))
    alias = max((mine["shadow_step2"][n] - out["shadow_step2"][n]).abs().max().item() for n in spec["ema_params"])
    print(f"loss {out['loss']:.6f} (bbc {out['loss_bbc']:.6f}, bsc {out['loss_bsc']:.6f}); "
          f"step 2 {out['loss_step2']:.6f}")
    print(f"max |shadow_cirflow - shadow_release| after apply_shadow + one step: {alias:.3g}")
    for key in ("query", "query_layer1", "target", "sentence", "gates"):
        print(f"{key}: max |cirflow - release| = {(mine[key] - out[key]).abs().max().item():.3g}")
    print("grads: max |cirflow - release| / max |release| =",
          max(((mine["grad"][n] - out["grad"][n]).abs().max() / out["grad"][n].abs().max()).item()
              for n in spec["grad_params"]))
    print("grad norms: max relative difference =",
          max(abs(mine["grad_norm"][n] - v) / v for n, v in out["grad_norm"].items()))
    for key in ("param_step1", "shadow_step1", "param_step2"):
        print(f"{key}: max |cirflow - release| =",
              max((mine[key][n] - out[key][n]).abs().max().item() for n in spec["ema_params"]))
    print("loss, bbc, bsc, step 2: |cirflow - release| =",
          [abs(mine[k] - out[k]) for k in ("loss", "loss_bbc", "loss_bsc", "loss_step2")])

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(out, args.out / "expected.pt")
    shapes = {k: list(v.shape) for k, v in out.items() if isinstance(v, torch.Tensor)}
    shapes.update({f"{k}.{n}": list(t.shape) for k in ("grad", "param_step1", "shadow_step1", "param_step2",
                                                       "shadow_step2") for n, t in out[k].items()})
    (args.out / "inputs.json").write_text(json.dumps(
        {**spec, "texts": x["texts"], "lengths": x["lengths"].tolist(), "shapes": shapes,
         "release_options": {"embed_size": spec["model"]["embed_dim"],
                             "hid_router": spec["model"]["amc"]["router_hidden"],
                             "img_encoder": "resnet50", "text_encoder": "LSTM",
                             "word_dim": spec["model"]["text"]["embed_dim"], "lstm_dim": spec["model"]["embed_dim"]}},
        indent=1) + "\n")


if __name__ == "__main__":
    main()
