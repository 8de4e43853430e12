"""Runs a TIRG-family release (google/tirg@c58daa0 or fuxianghuang1/GA@f808df1, a patched copy kept outside this
repository) on given weights and inputs, through the release's OWN training-step code, and reads off what it
computed. Used only by the record.py scripts of tests/known_answers/{tirg,tirg_lastconv,ga}; never at test time.

The release's `main.py` imports packages a training run needs (tensorboardX, scikit-image through datasets.py,
the bert-as-service client) and builds `training_1_iter` / `gPenalty` as closures inside `train_loop`. So main.py
is not imported: its source is parsed and these functions are executed, unchanged, in a namespace holding what their
enclosing scopes hold in a run (`opt`, `model`, `optimizer`, `losses_tracking`, `loss_weights`, `l2_loss`, main.py's
module imports). The harness adds only observers:
  * a forward hook on `model.normalization_layer` (query q̂, then target t̂: compute_loss normalises them in that
    order) and one on `model.soft_triplet_loss` (the triplets the release drew);
  * a stand-in optimizer whose `step()` copies every parameter's .grad (no update): the gradient of the step's
    total loss as `total_loss.backward()` left it;
  * a wrapper around `gPenalty` keeping the value R_adv it returned;
  * `torch.randn_like` (GA's random_grad noise) read from a dedicated torch.Generator seeded with `noise_seed`,
    drawn exactly as `torch.randn(p.shape, generator=g)` — cirflow's IsotropicNoise draws its ξ_k the same way
    from `torch.Generator().manual_seed(seed)`, so both sides see the same noise tensors in the same order.
"""
from __future__ import annotations

import ast
import importlib
import math
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import torch


def import_release(release: Path, module: str = "img_text_composition_models"):
    """The release's model module, imported from its folder (which goes first on sys.path)."""
    release = Path(release).resolve()
    if not (release / f"{module}.py").is_file():
        raise FileNotFoundError(f"{release}: no {module}.py (give the release copy's folder)")
    sys.path.insert(0, str(release))
    for name in ("img_text_composition_models", "text_model", "torch_functions"):
        sys.modules.pop(name, None)
    return importlib.import_module(module)


def _function_sources(main_py: Path, names: set[str]) -> dict[str, str]:
    """Source of each (possibly nested) function `names` of main.py, dedented to module level."""
    text = main_py.read_text()
    found = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            found[node.name] = textwrap.dedent(ast.get_source_segment(text, node, padded=True))
    missing = names - set(found)
    if missing:
        raise ValueError(f"{main_py}: no function {sorted(missing)}")
    return found


class _RecordingOptimizer:
    """Stands in for the SGD optimizer: zero_grad as SGD's (grads to None), step() keeps the grads."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.grads = model, None

    def zero_grad(self):
        self.model.zero_grad(set_to_none=True)

    def step(self):
        self.grads = {name: None if p.grad is None else p.grad.detach().clone()
                      for name, p in self.model.named_parameters()}


class _SeededTorch(types.ModuleType):
    """`torch` for the exec'd functions, with randn_like drawn from a dedicated generator (see the module doc)."""

    def __init__(self, generator: torch.Generator, drawn: list):
        super().__init__("torch")
        self._generator, self._drawn = generator, drawn

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, p, *args, **kwargs):
        assert not args and not kwargs, "randn_like called with options the harness does not reproduce"
        xi = torch.randn(p.shape, generator=self._generator, dtype=p.dtype).to(p.device)
        self._drawn.append(xi)
        return xi


class ReleaseRun:
    """One release (google/tirg or GA) with its main.py functions, ready to run training steps."""

    def __init__(self, release: Path, flavour: str):
        if flavour not in ("tirg", "ga"):
            raise ValueError(flavour)
        self.release, self.flavour = Path(release).resolve(), flavour
        self.models = import_release(self.release)
        wanted = {"create_model_and_optimizer", "training_1_iter"} | ({"gPenalty"} if flavour == "ga" else set())
        self.sources = _function_sources(self.release / "main.py", wanted)

    def _namespace(self, **extra) -> dict:
        ns = {"np": np, "torch": torch, "sys": sys, "math": math, "torchvision": __import__("torchvision"),
              "img_text_composition_models": self.models, "Variable": torch.autograd.Variable,
              "grad": torch.autograd.grad}
        ns.update(extra)
        return ns

    def build_model(self, opt: argparse.Namespace, texts: list[str]) -> torch.nn.Module:
        """The release's create_model_and_optimizer(opt, texts)[0] (its optimizer is not used)."""
        ns = self._namespace()
        exec(compile(self.sources["create_model_and_optimizer"], str(self.release / "main.py"), "exec"), ns)
        model, _ = ns["create_model_and_optimizer"](opt, texts)
        return model

    def training_step(self, model: torch.nn.Module, opt: argparse.Namespace, data: list[dict],
                      forward_seed: int, numpy_seed: int, noise_seed: int | None = None) -> dict:
        """One call of the release's training_1_iter(data) in train mode; what it computed."""
        losses_tracking: dict = {}
        optimizer = _RecordingOptimizer(model)
        normalized, triplets, penalties, drawn = [], [], [], []
        generator = torch.Generator().manual_seed(noise_seed if noise_seed is not None else 0)
        ns = self._namespace(opt=opt, model=model, optimizer=optimizer, losses_tracking=losses_tracking,
                             loss_weights=[1.0, 0.1, 0.1, 0.01], l2_loss=torch.nn.MSELoss())
        ns["torch"] = _SeededTorch(generator, drawn)
        for name in ("gPenalty", "training_1_iter"):
            if name in self.sources:
                exec(compile(self.sources[name], str(self.release / "main.py"), "exec"), ns)
        if "gPenalty" in ns:
            released_penalty = ns["gPenalty"]

            def gPenalty(*args, **kwargs):  # noqa: N802 - the release's name
                value = released_penalty(*args, **kwargs)
                penalties.append(value.detach().clone())
                return value

            ns["gPenalty"] = gPenalty
        hooks = [model.normalization_layer.register_forward_hook(
                     lambda module, args, out: normalized.append(out.detach().clone())),
                 model.soft_triplet_loss.register_forward_hook(
                     lambda module, args, out: triplets.append([list(t) for t in args[1]]))]
        model.train()
        torch.manual_seed(forward_seed)  # the text model's Dropout(0.1) draws from the global generator
        np.random.seed(numpy_seed)  # the soft triplet's np.random.shuffle
        try:
            ns["training_1_iter"](data)
        finally:
            for hook in hooks:
                hook.remove()
            torch.autograd.set_detect_anomaly(False)  # GA's training_1_iter switches it on for the process
        return {"losses": {k: v[-1] for k, v in losses_tracking.items()}, "grads": optimizer.grads,
                "normalized": normalized, "triplets": triplets, "penalties": penalties, "noise": drawn}

    def penalty_gradient(self, model: torch.nn.Module, images, texts, targets, forward_seed: int,
                         params: list[str], soft_triplet: bool = False) -> tuple[float, dict]:
        """R_adv = the release's gPenalty(img1, loss, lam=1e-6, q=1) on compute_loss's loss, and ∂R_adv/∂θ for the
        named parameters (GA main.py calls it with these arguments)."""
        ns = self._namespace()
        exec(compile(self.sources["gPenalty"], str(self.release / "main.py"), "exec"), ns)
        model.train()
        torch.manual_seed(forward_seed)
        img1 = torch.autograd.Variable(torch.from_numpy(images).float(), requires_grad=True)
        img2 = torch.autograd.Variable(torch.from_numpy(targets).float())
        loss, _ = model.compute_loss(img1, texts, img2, soft_triplet_loss=soft_triplet)
        penalty = ns["gPenalty"](img1, loss, lam=1e-6, q=1)
        named = dict(model.named_parameters())
        grads = torch.autograd.grad(penalty, [named[p] for p in params], allow_unused=True)
        return penalty.item(), {p: (torch.zeros_like(named[p]) if g is None else g.detach().clone())
                                for p, g in zip(params, grads)}
