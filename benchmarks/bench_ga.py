"""What Gradient Augmentation costs per training step, for each composition model, in one sitting.

    python benchmarks/bench_ga.py [--steps 20] [--batch 64] [--size 64]

Per model (params.yaml `model` section, `model.name` switched) one optimiser step on a fixed synthetic
batch, timed without GA, with the adversarial term (one extra backward with create_graph, then the
second-order backward of the total) and with the isotropic term (noise added to the gradients: no extra
pass). Prints seconds per step and the ratio to the plain step of the same model.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from stages.modeling.factory import ModelConfig, build_model
from stages.training.objectives import GAConfig, LossConfig, isotropic_noise, training_loss
from stages.common.params import load
from stages.modeling.vocab import Vocab

ARMS = {"tirg": "bbc", "tirg_lastconv": "bbc", "composeae": "bbc", "val": "val_matching", "amc": "amc"}
TEXTS = ["add a small red circle at top-left", "make the blue square large", "remove the green triangle"]


def seconds_per_step(model, loss_cfg, ga, vocab, batch, steps: int) -> float:
    step_fn = lambda m, b: training_loss(m, loss_cfg, vocab, b, torch.device("cpu"), ga)[::3]  # (loss, logs)
    after_backward = isotropic_noise(ga, seed=0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            began = time.perf_counter()
        loss, _ = step_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        optimizer.step()
    return (time.perf_counter() - began) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="image side (resize.size of the default data)")
    args = parser.parse_args()
    base_model, base_ga, base_loss = load(ModelConfig, "model"), load(GAConfig, "ga"), load(LossConfig, "loss")
    vocab = Vocab.build(TEXTS)
    g = torch.Generator().manual_seed(0)
    batch = {"ref": torch.randn(args.batch, 3, args.size, args.size, generator=g),
             "tgt": torch.randn(args.batch, 3, args.size, args.size, generator=g),
             "text": [TEXTS[i % len(TEXTS)] for i in range(args.batch)]}
    variants = {"plain": dict(adversarial=False, isotropic=False), "adversarial": dict(adversarial=True, isotropic=False),
                "isotropic": dict(adversarial=False, isotropic=True)}
    print(f"{torch.get_num_threads()} threads, batch {args.batch}, {args.size}px, {args.steps} timed steps each")
    print(f"{'model':<14}{'variant':<13}{'s/step':>8}{'x plain':>9}")
    for name, loss_name in ARMS.items():
        cfg = dataclasses.replace(base_model, name=name)
        loss_cfg = dataclasses.replace(base_loss, name=loss_name)
        plain = None
        for variant, switches in variants.items():
            torch.manual_seed(0)
            model = build_model(cfg, len(vocab), args.size)
            ga = dataclasses.replace(base_ga, **switches)
            s = seconds_per_step(model, loss_cfg, ga, vocab, batch, args.steps)
            plain = plain or s
            print(f"{name:<14}{variant:<13}{s:>8.3f}{s / plain:>9.2f}")


if __name__ == "__main__":
    main()
