"""Record ComposeAE's known answer from the released code (run by hand; the test never imports a release).

    nice -n 15 env OMP_NUM_THREADS=1 .venv/bin/python tests/known_answers/composeae/record.py \
        --release-ga /work/releases/composeae/GA-patched --release-composeae /work/releases/composeae/ComposeAE-patched

cirflow's model is built from inputs.json's seed (case.py), exported to the release's names through
tests/known_answers/layouts/composeae.py and loaded (strict) into each release's ComposeAE; the release's unused LSTM
text model gets zeros. The release's own training step runs: `train_loop`'s nested `training_1_iter` (and GA's
`gPenalty`) are taken from its main.py by `ast` and executed as written, with `bc` (bert-as-service) answering
with the fixed text vectors. Writes expected.pt and release_parameters.json beside this file.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
torch.set_num_threads(1)

_spec = importlib.util.spec_from_file_location("ka_composeae_case", HERE / "case.py")
case = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(case)

from known_answers.layouts.composeae import LAYOUT, RELEASE_TEXT_MODEL, composition_state  # noqa: E402

RELEASE_MODULES = ("img_text_composition_models", "text_model", "torch_functions")
TERMS = {"main": "batch_based_classification", "reconstruction_image": "L2_loss",
         "reconstruction_text": "L2_loss_text", "rotational_symmetry": "rot_sym_loss", "total": "total training loss"}
# gradients recorded per run (release names); conv1's only where the input gradient matters (GA's R_adv)
GRADS = ("a", "normalization_layer.norm_s", "img_model.bn1.weight", "img_model.layer4.1.bn2.bias", "img_model.fc.0.bias",
         "encoderLinear.0.bert_features.1.bias", "encoderLinear.0.image_features.4.bias",
         "encoderLinear.1.mapping.4.bias", "encoderWithConv.0.bert_features.0.weight", "encoderWithConv.1.conv.weight",
         "encoderWithConv.1.conv.bias", "encoderWithConv.1.mapping.0.weight", "decoder.4.bias", "txtdecoder.4.bias")
BIG_GRADS = ("img_model.conv1.weight",)
RUNNING_STATS = ("img_model.bn1", "img_model.layer4.1.bn2", "encoderLinear.0.bert_features.0", "decoder.0",
                 "txtdecoder.0")


def fake_bert(vectors: torch.Tensor, texts: list[str]) -> None:
    """bert_serving.client.BertClient whose encode(texts) returns the fixed text vectors (float32 numpy)."""
    rows = {t: vectors[i].numpy().astype(np.float32) for i, t in enumerate(texts)}

    class BertClient:
        def encode(self, query):
            return np.stack([rows[t] for t in query])

    client = types.ModuleType("bert_serving.client")
    client.BertClient = BertClient
    sys.modules["bert_serving"] = types.ModuleType("bert_serving")
    sys.modules["bert_serving.client"] = client


def import_release(path: Path):
    for name in RELEASE_MODULES:
        sys.modules.pop(name, None)
    sys.path.insert(0, str(path))
    try:
        return importlib.import_module("img_text_composition_models")
    finally:
        sys.path.remove(str(path))


def main_py_parts(path: Path) -> dict:
    """train_loop's nested training_1_iter / gPenalty and its `l2_loss = ...`, main()'s loss_weights, from main.py."""
    tree = ast.parse((path / "main.py").read_text())
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    train_loop = funcs["train_loop"]
    nested = {n.name: n for n in ast.walk(train_loop) if isinstance(n, ast.FunctionDef) and n is not train_loop}
    l2 = next(n for n in train_loop.body if isinstance(n, ast.Assign)
              and getattr(n.targets[0], "id", None) == "l2_loss")
    weights = next(n for n in ast.walk(funcs["main"]) if isinstance(n, ast.Assign)
                   and getattr(n.targets[0], "id", None) == "loss_weights")
    return {"functions": [nested[k] for k in ("gPenalty", "training_1_iter") if k in nested], "l2": l2,
            "loss_weights": ast.literal_eval(weights.value)}


class NoStepOptimizer:
    """main.py's optimizer.zero_grad() / step(): gradients cleared before backward, kept after (no update)."""

    def __init__(self, model):
        self.model = model

    def zero_grad(self):
        self.model.zero_grad(set_to_none=True)

    def step(self):
        pass


def build_release(module, texts, text_dim, state=None):
    model = module.ComposeAE(texts, image_embed_dim=512, text_embed_dim=text_dim, use_bert=True, name="composeAE")
    if state is not None:
        full = dict(state)
        for key in RELEASE_TEXT_MODEL:  # the unused LSTM: zeros, so GA's isotropic r_k of its tensors is 0
            full[key] = torch.zeros_like(model.state_dict()[key])
        model.load_state_dict(full, strict=True)
    return model


def run_step(module, parts, state, data, texts, text_dim, use_g_penalty, random_grad, seed):
    model = build_release(module, texts, text_dim, state)
    model.train()
    opt = types.SimpleNamespace(use_complete_text_query=False, dataset="fashion200k",
                                loss="batch_based_classification", model="composeAE",
                                use_gPenalty=use_g_penalty, random_grad=random_grad)
    ns = {"np": np, "torch": torch, "sys": sys, "math": math, "grad": torch.autograd.grad,
          "Variable": torch.autograd.Variable, "opt": opt, "model": model, "losses_tracking": {},
          "loss_weights": parts["loss_weights"], "optimizer": NoStepOptimizer(model)}
    exec(compile(ast.Module(body=[parts["l2"], *parts["functions"]], type_ignores=[]), "main.py", "exec"), ns)
    penalty = []
    if "gPenalty" in ns:
        g_penalty = ns["gPenalty"]
        ns["gPenalty"] = lambda *a, **k: penalty.append(g_penalty(*a, **k)) or penalty[-1]
    normalized, dct = [], {}
    hook = model.normalization_layer.register_forward_hook(lambda m, i, o: normalized.append(o.detach().clone()))
    compute_loss = model.compute_loss

    def recording_compute_loss(*a, **k):
        loss, d = compute_loss(*a, **k)
        dct.update(d)
        return loss, d

    model.compute_loss = recording_compute_loss
    torch.manual_seed(seed)
    ns["training_1_iter"](data)
    hook.remove()
    losses = {ours: float(ns["losses_tracking"][theirs][0]) for ours, theirs in TERMS.items()}
    grads = {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
             for n, p in model.named_parameters()}
    stats = {f"{m}.{s}": model.state_dict()[f"{m}.{s}"].clone() for m in RUNNING_STATS
             for s in ("running_mean", "running_var", "num_batches_tracked")}
    out = {"losses": losses, "grads": grads, "normalized": normalized, "running_stats": stats,
           "theta": dct["repres"].detach().clone(), "phi_x": dct["img_features"].detach().clone()}
    if penalty:
        out["adversarial_penalty"] = float(penalty[0])
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--release-ga", type=Path, required=True, help="patched copy of fuxianghuang1/GA@f808df1")
    parser.add_argument("--release-composeae", type=Path, required=True,
                        help="patched copy of ecom-research/ComposeAE@f5ea4ff")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()

    inputs = case.INPUTS
    texts, text_dim, seed = list(inputs["texts"]), inputs["text_dim"], inputs["forward_seed"]
    cirflow = case.build_model(inputs)
    state = LAYOUT.release_state(composition_state(cirflow.state_dict()))
    vectors = case.text_vectors(inputs)
    fake_bert(vectors, texts)
    ref, tgt = case.images(inputs)
    data = [{"source_img_data": ref[i].numpy(), "target_img_data": tgt[i].numpy(), "mod": {"str": texts[i]},
             "target_caption": texts[i]} for i in range(len(texts))]

    expected: dict = {"text_vectors": vectors}
    listing = {}
    for key, path in (("ga", args.release_ga), ("composeae", args.release_composeae)):
        module = import_release(path)
        parts = main_py_parts(path)
        assert parts["loss_weights"] == [1.0, 0.1, 0.1, 0.01], parts["loss_weights"]
        if key == "ga":
            # named_parameters() as main.py builds it with --use_bert (text_embed_dim 768), and as run here (384)
            released = build_release(module, texts, 768)
            run = build_release(module, texts, text_dim)
            listing = {
                "repository": LAYOUT.repository,
                "built_as": "ComposeAE(texts, image_embed_dim=512, text_embed_dim=768, use_bert=True, "
                            "name='composeAE') (main.py create_model_and_optimizer with --model composeAE --use_bert)",
                "count": len(list(released.named_parameters())),
                "parameters": [[n, list(p.shape)] for n, p in released.named_parameters()],
                "count_as_run": len(list(run.named_parameters())),
                "parameters_as_run": [[n, list(p.shape)] for n, p in run.named_parameters()],
                "state_dict_keys": list(run.state_dict()),
            }
            assert [n for n, _ in listing["parameters"]] == [n for n, _ in listing["parameters_as_run"]]
        model = build_release(module, texts, text_dim, state)
        model.eval()
        with torch.no_grad():
            features = {"eval_query": model.compose_img_text(ref, texts)["repres"].clone(),
                        "eval_target": model.extract_img_feature(tgt).clone()}
        runs = {"base": (False, False)}
        if key == "ga":
            runs.update({"adversarial": (True, False), "adversarial_isotropic": (True, True)})
        for run_name, (adv, iso) in runs.items():
            out = run_step(module, parts, state, data, texts, text_dim, adv, iso, seed)
            prefix = f"{key}.{run_name}"
            for term, value in out["losses"].items():
                expected[f"{prefix}.loss.{term}"] = value
            if "adversarial_penalty" in out:
                expected[f"{prefix}.adversarial_penalty"] = out["adversarial_penalty"]
            names = GRADS + (BIG_GRADS if prefix in ("ga.base", "ga.adversarial") else ())
            for n in names:
                expected[f"{prefix}.grad.{n}"] = out["grads"][n]
            expected[f"{prefix}.grad_norms"] = torch.stack([g.norm() for g in out["grads"].values()])
            if run_name == "base":
                features.update({name: out["normalized"][i] for i, name in
                                 enumerate(("query", "target", "rotated_target", "source"))})
                features["theta"] = out["theta"]
                features.update({f"after_step.{n}": v for n, v in out["running_stats"].items()})
            print(prefix, {k: round(v, 6) for k, v in out["losses"].items()}, out.get("adversarial_penalty"))
        if key == "ga":
            expected.update(features)  # the forward: one recording for both releases
        else:  # the releases' ComposeAE forward is the same code: the same bits
            assert all(torch.equal(v, expected[k]) for k, v in features.items()), "the releases' forwards differ"
    expected["grad_norm_names"] = [n for n, _ in listing["parameters_as_run"]]
    torch.save(expected, args.out / "expected.pt")
    (args.out / "release_parameters.json").write_text(json.dumps(listing, indent=1) + "\n")
    print("wrote", args.out / "expected.pt", (args.out / "expected.pt").stat().st_size, "bytes;",
          "release named_parameters():", listing["count"])


if __name__ == "__main__":
    main()
