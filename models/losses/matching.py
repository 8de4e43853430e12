"""Image–text matching losses of the dual encoder (sibasmarak/guided-image-retrieval@59f935a utils/loss.py) and of AOQ (Chen, Deng, Luo, arXiv 2003.03669; sunnychencool/AOQ@5bfe620 modelAOQ.py ContrastiveLoss).

Guided image retrieval (sibasmarak/guided-image-retrieval utils/loss.py ContrastiveLoss), v_i, u_j L2-normalised:
    s_ij = v_i · u_j
    L_NCE = −(1/B) Σ_j log[ e^{s_jj/τ} / (e^{s_jj/τ} + Σ_i 1[id_i ≠ id_j] e^{s_ij/τ}) ]        (utils/loss.py)
CLIP-style option (`symmetric`, not in the release), t = min(e^{logit_scale}, 100):
    L_sym = ½ [CE_rows(t · v uᵀ) + CE_cols(t · v uᵀ)]

AOQ (sunnychencool/AOQ modelAOQ.py ContrastiveLoss), S(I, T) a similarity, pos_i = S(I_i, T_i):
    T̃_i = argmax_{j≠i} S(I_i, T_j),  Ĩ_i = argmax_{j≠i} S(I_j, T_i)             (online hardest, VSE++)
    w_i^c = β − (S(I_i, T⁻_i) − S(I_i, T̃_i)) / α,  w_i^v = β − (S(I⁻_i, T_i) − S(Ĩ_i, T_i)) / α     (adaptive weights)
    L_AOQ = Σ_i  w_i^c [m_on + S(I_i, T̃_i) − pos_i]₊        (1)
               + w_i^v [m_on + S(Ĩ_i, T_i) − pos_i]₊        (2)
               +       [m_off + S(I_i, T⁻_i) − pos_i]₊      (3)
               +       [m_off + S(I⁻_i, T_i) − pos_i]₊      (4)
               +       [m_off + S(I⁻_i, T⁻_i) − pos_i]₊     (5)
               +       [m_off + S(I⁻⁺_i, T⁻⁺_i) − pos_i]₊   (6)
Term numbers (1)–(6) follow ContrastiveLoss.forward's order; the paper's own equation numbers are UNVERIFIED.
T⁻ / I⁻ are the offline hard negatives of the pair, I⁻⁺ the image of T⁻, T⁻⁺ a caption of I⁻ (dataAOQ.py).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

AOQ_VARIANTS = ("triplet", "quintuplet", "adaptive_quintuplet")


# ---------------------------------------------------------------------------------------------- dual encoder


def same_image_mask(image_ids: torch.Tensor) -> torch.Tensor:
    """B × B bool, True where items i and j show the same image (diagonal included)."""
    return image_ids[:, None] == image_ids[None, :]


def nce_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, image_ids: torch.Tensor,
             tau: float = 1.0) -> torch.Tensor:
    """L_NCE of utils/loss.py: for each caption j a softmax over the batch images, positive s_jj, negatives the images
    with another id; other captions' copies of image j are neither positive nor negative. Mean over captions.

    τ = 1 is the release (its `temperature=0.07` is stored but never used); inputs are L2-normalised here.
    """
    v, u = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    s = (v @ u.T) / tau  # s[i, j] = v_i · u_j / τ
    b = s.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=s.device)
    keep = eye | ~same_image_mask(image_ids.to(s.device))  # column j: the positive i = j and every other-id image
    logits = s.masked_fill(~keep, float("-inf"))
    return -(s.diagonal() - torch.logsumexp(logits, dim=0)).mean()


def symmetric_info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, image_ids: torch.Tensor,
                       logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with a learned temperature: ½ [CE(image → texts) + CE(text → images)].

    logits = min(e^{logit_scale}, 100) · cos; same-image duplicates (j ≠ i, id_j = id_i) are removed from the
    negatives in both directions. CLIP clamps the scale at 100; here the clamp is on e^{logit_scale}.
    """
    v, u = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * (v @ u.T)
    b = logits.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=logits.device)
    duplicates = same_image_mask(image_ids.to(logits.device)) & ~eye  # symmetric, so one mask serves both directions
    logits = logits.masked_fill(duplicates, float("-inf"))
    labels = torch.arange(b, device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# ---------------------------------------------------------------------------------------------- VSE++ / AOQ


def hardest_negatives(sim: torch.Tensor, same_image: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online hardest negatives of a B × B similarity (sim[i, j] = S(I_i, T_j), diagonal positives).

    Returns (S(I_i, T̃_i) = max_{j≠i} sim[i, j], S(Ĩ_i, T_i) = max_{j≠i} sim[j, i], row_valid, col_valid).
    `same_image` (B × B bool) also excludes duplicate-image pairs. Where a row/column has no negative left the
    hardest score is set to 0 and the *_valid flag is False (callers zero those terms).
    """
    b = sim.shape[0]
    excluded = torch.eye(b, dtype=torch.bool, device=sim.device)
    if same_image is not None:
        excluded = excluded | same_image.to(sim.device)
    masked = sim.masked_fill(excluded, float("-inf"))
    row_valid, col_valid = (~excluded).any(dim=1), (~excluded).any(dim=0)
    zero = torch.zeros((), dtype=sim.dtype, device=sim.device)
    caption_hardest = torch.where(row_valid, masked.max(dim=1).values, zero)  # S(I_i, T̃_i)
    image_hardest = torch.where(col_valid, masked.max(dim=0).values, zero)  # S(Ĩ_i, T_i)
    return caption_hardest, image_hardest, row_valid, col_valid


def vse_max_violation(sim: torch.Tensor, margin: float = 0.2, same_image: torch.Tensor | None = None) -> torch.Tensor:
    """L_VSE++ = Σ_i [m + max_{j≠i} S(I_i,T_j) − S(I_i,T_i)]₊ + [m + max_{j≠i} S(I_j,T_i) − S(I_i,T_i)]₊ (a SUM)."""
    pos = sim.diagonal()
    caption_hardest, image_hardest, row_valid, col_valid = hardest_negatives(sim, same_image)
    cost_c = F.relu(margin + caption_hardest - pos) * row_valid  # caption retrieval (anchor image)
    cost_v = F.relu(margin + image_hardest - pos) * col_valid  # image retrieval (anchor caption)
    return cost_c.sum() + cost_v.sum()


def aoq_loss(sim: torch.Tensor, s_off_caption: torch.Tensor, s_off_image: torch.Tensor, s_off_pair: torch.Tensor,
             s_off_partners: torch.Tensor, margin_online: float = 0.2, margin_offline: float = 0.0,
             alpha: float = 0.3, beta: float = 1.5, variant: str = "adaptive_quintuplet",
             same_image: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_AOQ of ContrastiveLoss.forward (terms (1)–(6), each summed over the batch). Returns (loss, per-term sums).

    sim: B × B, sim[i, j] = S(I_i, T_j); s_off_caption = S(I_i, T⁻_i); s_off_image = S(I⁻_i, T_i);
    s_off_pair = S(I⁻_i, T⁻_i); s_off_partners = S(I⁻⁺_i, T⁻⁺_i) (all length B).
    variant: "triplet" = OffTri, terms 1–4 with w = 1; "quintuplet" = OffQuin, terms 1–6 with w = 1;
    "adaptive_quintuplet" = AdapOffQuin, the full loss. The ablation names are read from the paper figure [U].
    The weights are neither detached nor clipped, as released. `same_image` (default None = release, no
    masking) excludes duplicate-image pairs from the online negatives.
    """
    if variant not in AOQ_VARIANTS:
        raise ValueError(f"variant must be one of {AOQ_VARIANTS}, got {variant!r}")
    pos = sim.diagonal()
    caption_hardest, image_hardest, row_valid, col_valid = hardest_negatives(sim, same_image)
    if variant == "adaptive_quintuplet":
        w_c = beta - (s_off_caption - caption_hardest) / alpha  # adaptive weight, caption retrieval
        w_v = beta - (s_off_image - image_hardest) / alpha  # adaptive weight, image retrieval
    else:
        w_c = w_v = torch.ones_like(pos)
    terms = {
        "online_caption": (w_c * F.relu(margin_online + caption_hardest - pos) * row_valid).sum(),  # (1)
        "online_image": (w_v * F.relu(margin_online + image_hardest - pos) * col_valid).sum(),  # (2)
        "offline_caption": F.relu(margin_offline + s_off_caption - pos).sum(),  # (3)
        "offline_image": F.relu(margin_offline + s_off_image - pos).sum(),  # (4)
    }
    if variant != "triplet":
        terms["offline_pair"] = F.relu(margin_offline + s_off_pair - pos).sum()  # (5)
        terms["offline_partners"] = F.relu(margin_offline + s_off_partners - pos).sum()  # (6)
    return sum(terms.values()), terms


# ---------------------------------------------------------------------------------------------- sampling


class OfflineNegatives(NamedTuple):
    """Index tensors (length B) of one batch's offline negatives (dataAOQ.py)."""

    caption: torch.Tensor  # T⁻ = i2t[image, n]
    image: torch.Tensor  # I⁻ = t2i[caption, n // cpi]
    image_partner: torch.Tensor  # I⁻⁺ = T⁻ // cpi, the image of T⁻
    caption_partner: torch.Tensor  # T⁻⁺, a uniformly drawn caption of I⁻


def sample_offline_negatives(i2t: torch.Tensor, t2i: torch.Tensor, image_index: torch.Tensor,
                             caption_index: torch.Tensor, captions_per_image: int, candidate_range: int,
                             generator: torch.Generator | None = None) -> OfflineNegatives:
    """AOQ's per-pair draw (dataAOQ.py): n ~ U{0..candidate_range−1} for each pair (I = image_index, T = caption_index),
    T⁻ = i2t[I, n], I⁻ = t2i[T, n // cpi], I⁻⁺ = T⁻ // cpi, T⁻⁺ = I⁻ · cpi + U{0..cpi−1}.

    i2t: n_images × K1 caption indices, t2i: n_captions × K2 image indices; captions of image i are
    i·cpi .. i·cpi + cpi − 1. Draws: n first, then the partner offsets (CPU generator, results on i2t's device).
    Range check is exact: the largest draw needs (candidate_range − 1) // cpi < K2 (not candidate_range // cpi).
    """
    cpi = int(captions_per_image)
    if i2t.dim() != 2 or t2i.dim() != 2:
        raise ValueError("i2t and t2i must be 2-D candidate index arrays")
    k1, k2 = i2t.shape[1], t2i.shape[1]
    if cpi < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {cpi}")
    if not 1 <= candidate_range <= k1:
        raise ValueError(f"train.aoq.candidate_range = {candidate_range} must be in 1..{k1} "
                         f"(the i2t candidate lists hold {k1} captions per image)")
    if (candidate_range - 1) // cpi >= k2:
        raise ValueError(f"train.aoq.candidate_range = {candidate_range} needs t2i lists of at least "
                         f"{(candidate_range - 1) // cpi + 1} images per caption (n // {cpi}), they hold {k2}")
    device = i2t.device
    b = image_index.shape[0]
    n = torch.randint(0, candidate_range, (b,), generator=generator).to(device)
    offset = torch.randint(0, cpi, (b,), generator=generator).to(device)
    neg_caption = i2t[image_index.to(device), n].long()
    neg_image = t2i[caption_index.to(t2i.device), (n // cpi).to(t2i.device)].long().to(device)
    return OfflineNegatives(caption=neg_caption, image=neg_image,
                            image_partner=torch.div(neg_caption, cpi, rounding_mode="floor"),
                            caption_partner=neg_image * cpi + offset)

