"""GA: Adversarial and Isotropic Gradient Augmentation (Huang, Zhang, Zhou, Gao; IEEE TMM 25, 2022).

A plug-in regulariser for any composition model, read from the released code (fuxianghuang1/GA
`main.py` training_1_iter; the paper's own equation numbers are UNVERIFIED):

    R_adv = (λ/2) · d^{1−1/q} · mean_i ‖B·∇_{x_i} L‖_q,   d = C·H·W        (adversarial GA)
    r_k   = mean(ξ_k ⊙ θ_k) + mean(θ_k),   ξ_k ~ N(0, I)                   (isotropic GA)
          ⇒ ∂r_k/∂θ_k = (ξ_k + 1) / numel(θ_k)

R_adv is the first-order surrogate of max_{‖δ‖∞≤ε} L(x+δ) ≈ L(x) + ε‖∇_x L‖₁ (ℓ1 is the dual of ℓ∞),
in the form of Finlay & Oberman's scalable input-gradient regulariser.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

ISOTROPIC_MODES = ("clean", "as_released")


def adversarial_penalty(loss: torch.Tensor, reference_images: torch.Tensor, batch_size: int,
                        lam: float = 1e-6, q: float = 1.0) -> torch.Tensor:
    """R_adv = (λ/2) · d^{1−1/q} · mean_i ‖B·∇_{x_i} L‖_q for the batch-mean loss L.

    `reference_images` (B×C×H×W) must be the very tensor fed to the model and must require grad:
    callers do `ref.requires_grad_(True)` on the input batch *before* the forward pass. Only the
    reference image is penalised (not the target image, not the text).

    Cost: g = ∂L/∂x is taken with `create_graph=True` (double back-prop), i.e. one extra backward
    through the whole graph now, and `(L + R_adv).backward()` later runs the second-order backward
    through that gradient graph as well — roughly 2–3× the cost of a plain training step.
    """
    if not reference_images.requires_grad:
        raise ValueError("reference_images must require grad: call ref.requires_grad_(True) before the forward")
    (grad,) = torch.autograd.grad(loss, reference_images, create_graph=True)
    g = (batch_size * grad).flatten(1)  # B·∇_{x_i} L: per-sample gradient of the batch mean
    d = g.shape[1]  # C·H·W
    norms = torch.linalg.vector_norm(g, ord=q, dim=1)
    return (lam / 2.0) * d ** (1.0 - 1.0 / q) * norms.mean()


def parameter_order(model: nn.Module, mode: str = "clean") -> list[tuple[str, torch.Tensor]]:
    """The trainable (name, tensor) pairs in the order k = 1..P that the weights w_k follow.

    clean: the model's own `named_parameters()` order (every w_k is 1, so only ξ's draw order depends on it).
    as_released: the release's `model.named_parameters()` order, declared by the model as RELEASED_PARAMETER_ORDER
    (its parameter names or name prefixes, in the order the released class registers them); a model the GA release
    does not have keeps its own order.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    order = getattr(model, "RELEASED_PARAMETER_ORDER", None)
    if mode != "as_released" or order is None:
        return named

    def rank(name: str) -> int:
        for i, prefix in enumerate(order):
            if name == prefix or name.startswith(prefix + "."):
                return i
        raise ValueError(f"{type(model).__name__}.RELEASED_PARAMETER_ORDER does not place parameter {name!r}")

    return sorted(named, key=lambda item: rank(item[0]))  # stable: within a prefix, the model's own order


def _trainable(model_or_params: nn.Module | Iterable[torch.Tensor], mode: str) -> list[torch.Tensor]:
    """Trainable tensors in the order of `parameter_order` (k = 1..P); a plain iterable keeps its order."""
    if isinstance(model_or_params, nn.Module):
        return [p for _, p in parameter_order(model_or_params, mode)]
    return [p for p in model_or_params if p.requires_grad]


def _weights(num_params: int, mode: str) -> list[int]:
    """w_k = 1 (clean) or P − k + 1 (as_released: main.py adds `0.01·R` to the loss inside its loop over
    model.named_parameters(), R the running sum, so the k-th tensor's term is counted P − k + 1 times)."""
    if mode not in ISOTROPIC_MODES:
        raise ValueError(f"mode must be one of {ISOTROPIC_MODES}, got {mode!r}")
    return [1] * num_params if mode == "clean" else [num_params - k for k in range(num_params)]


def _xi(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """ξ_k ~ N(0, I) of θ_k's shape; drawn on the generator's device so one seed reproduces anywhere."""
    device = generator.device if generator is not None else p.device
    return torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype).to(p.device)


def isotropic_term(model_or_params: nn.Module | Iterable[torch.Tensor], weight: float = 0.01,
                   mode: str = "clean", generator: torch.Generator | None = None) -> torch.Tensor:
    """The released code's loss form: weight · Σ_k w_k · (mean(ξ_k ⊙ θ_k) + mean(θ_k)).

    Add it to the loss before `backward()`; its gradient equals `isotropic_gradient_noise`'s increment
    for the same generator state.
    """
    params = _trainable(model_or_params, mode)
    total = torch.zeros((), device=params[0].device if params else None)
    for w, p in zip(_weights(len(params), mode), params):
        total = total + w * ((_xi(p, generator) * p).mean() + p.mean())  # r_k
    return weight * total


@torch.no_grad()
def isotropic_gradient_noise(model_or_params: nn.Module | Iterable[torch.Tensor], weight: float = 0.01,
                             mode: str = "clean", generator: torch.Generator | None = None) -> None:
    """Call AFTER `loss.backward()`: θ_k.grad += w_k · weight · (ξ_k + 1) / numel(θ_k).

    A parameter with no gradient yet (unused by the loss) gets the increment as its gradient, exactly
    as the loss-term form would give it.
    """
    params = _trainable(model_or_params, mode)
    for w, p in zip(_weights(len(params), mode), params):
        step = w * weight * (_xi(p, generator) + 1.0) / p.numel()  # ∂(weight·w_k·r_k)/∂θ_k
        if p.grad is None:
            p.grad = step
        else:
            p.grad.add_(step)
