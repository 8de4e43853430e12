"""GA's Weighted Harmonic Mean of recalls; its formula is unverified in the paper, so both readings are offered."""
from __future__ import annotations




def whm_over_splits(seen: float, unseen: float, beta: float) -> float:
    """(1 + β²)·R_seen·R_unseen / (β²·R_seen + R_unseen): β > 1 weighs the unseen split more."""
    denominator = beta**2 * seen + unseen
    return 0.0 if denominator == 0 else (1 + beta**2) * seen * unseen / denominator


def whm_over_recall_levels(recalls: list[float], weights: list[float]) -> float:
    """Σ_k w_k / Σ_k (w_k / R@k); 0 when any recall is 0."""
    if len(recalls) != len(weights):
        raise ValueError(f"{len(recalls)} recall levels but {len(weights)} weights")
    if any(r == 0 for r in recalls):
        return 0.0
    return sum(weights) / sum(w / r for w, r in zip(weights, recalls))
