"""Matching losses: guided-image-retrieval NCE, symmetric InfoNCE, VSE++ max-violation, AOQ loss and sampling.

Expected values are worked out by hand in the comments (math on the stated similarities), not by the code under test.
"""
import math

import pytest
import torch

from models.losses.matching import aoq_loss, nce_loss, sample_offline_negatives, symmetric_info_nce, vse_max_violation

# ---------------------------------------------------------------------------------------------- NCE (spec §4.2)

# items 0 and 1 show the same image (id 7), item 2 another (id 9)
V = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
U = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
IDS = torch.tensor([7, 7, 9])
# s[i, j] = v_i · u_j = [[1, .6, 0], [1, .6, 0], [0, .8, 1]]


def test_nce_masks_other_captions_of_the_same_image():
    # caption 0: positive s00 = 1, negatives {i : id_i != 7} = {2}: s20 = 0 (s10 = 1 is excluded)
    #   -log(e^1 / (e^1 + e^0)) = log(1 + e^-1)
    # caption 1: positive s11 = .6, negative s21 = .8 (s01 = .6 excluded) -> log(1 + e^{.2})
    # caption 2: positive s22 = 1, negatives s02 = s12 = 0 -> log(1 + 2 e^-1)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(0.2)) + math.log1p(2 * math.exp(-1))) / 3
    assert nce_loss(V, U, IDS).item() == pytest.approx(expected, abs=1e-6)
    # without the mask, caption 0 would also count s10 = 1: log(1 + e^0 + e^-1) — a different value
    unmasked0 = math.log(1 + 1 + math.exp(-1))
    assert unmasked0 > math.log1p(math.exp(-1)) + 0.5
    # the positive pair of caption 1 is (I_1, T_1), not the duplicate I_0: all ids distinct changes only the masks
    all_distinct = (math.log(1 + math.exp(0) + math.exp(-1)) + math.log(1 + math.exp(0) + math.exp(0.2))
                    + math.log1p(2 * math.exp(-1))) / 3
    assert nce_loss(V, U, torch.tensor([0, 1, 2])).item() == pytest.approx(all_distinct, abs=1e-6)


def test_nce_temperature_and_normalisation():
    # tau = .5 doubles every logit: log(1 + e^{-2}), log(1 + e^{.4}), log(1 + 2 e^{-2})
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(0.4)) + math.log1p(2 * math.exp(-2))) / 3
    assert nce_loss(V, U, IDS, tau=0.5).item() == pytest.approx(expected, abs=1e-6)
    # inputs are L2-normalised inside: scaling them changes nothing
    assert nce_loss(3 * V, 0.5 * U, IDS).item() == pytest.approx(nce_loss(V, U, IDS).item(), abs=1e-6)


def test_nce_all_same_image_leaves_only_positives():
    # two captions of one image: each caption's softmax holds its positive alone -> -log(1) = 0, whatever s
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    u = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    loss = nce_loss(v, u, torch.tensor([4, 4]))
    assert loss.item() == pytest.approx(0.0, abs=1e-7)
    loss.backward()
    assert torch.isfinite(v.grad).all() and v.grad.abs().max() < 1e-7


# ---------------------------------------------------------------------------------------------- symmetric InfoNCE


def test_symmetric_info_nce_equals_clip_on_2x2():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    u = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor(math.log(2.0), requires_grad=True)
    # logits = 2 * [[.6, 0], [.8, 1]] = [[1.2, 0], [1.6, 2]]
    rows = math.log1p(math.exp(-1.2)) + math.log1p(math.exp(1.6 - 2))  # image -> text, labels 0, 1
    cols = math.log1p(math.exp(1.6 - 1.2)) + math.log1p(math.exp(0 - 2))  # text -> image
    expected = 0.5 * (rows / 2 + cols / 2)
    loss = symmetric_info_nce(v, u, torch.tensor([0, 1]), scale)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert scale.grad is not None and scale.grad.abs() > 0  # the temperature is learned


def test_symmetric_info_nce_clamps_scale_and_masks_duplicates():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    u = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    big = symmetric_info_nce(v, u, torch.tensor([0, 1]), torch.tensor(math.log(1000.0)))
    at_100 = symmetric_info_nce(v, u, torch.tensor([0, 1]), torch.tensor(math.log(100.0)))
    assert big.item() == pytest.approx(at_100.item(), abs=1e-6)
    # both items show the same image: each softmax keeps only its positive -> every CE is 0
    same = symmetric_info_nce(v, u, torch.tensor([3, 3]), torch.tensor(math.log(2.0)))
    assert same.item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------------------------------------- VSE++ (spec §5.3)

SIM = torch.tensor([[0.85, 0.5, 0.7],
                    [0.2, 0.8, 0.1],
                    [0.6, 0.4, 0.3]])


def test_vse_max_violation_hardest_negative_and_sum():
    # rows (caption retrieval): row 0 hardest T_2 = .7 (not T_1 = .5): .2 + .7 - .85 = .05
    #   row 1 hardest .2: .2 + .2 - .8 < 0 -> 0;  row 2 hardest .6: .2 + .6 - .3 = .5
    # cols (image retrieval): col 0 hardest .6: .2 + .6 - .85 < 0;  col 1 hardest .5: .2 + .5 - .8 < 0
    #   col 2 hardest .7: .2 + .7 - .3 = .6
    # sum = .05 + .5 + .6 = 1.15 (a mean over 3 would be .383)
    sim = SIM.clone().requires_grad_(True)
    loss = vse_max_violation(sim, margin=0.2)
    assert loss.item() == pytest.approx(1.15, abs=1e-6)
    loss.backward()
    # gradient only on the chosen hardest negatives and the active positives:
    # [0,2] is row 0's and col 2's hardest (+2), [2,0] row 2's (+1); [0,0] -1, [2,2] -2 (row 2 and col 2)
    expected = torch.tensor([[-1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [1.0, 0.0, -2.0]])
    assert torch.allclose(sim.grad, expected)


def test_vse_max_violation_same_image_mask():
    # items 0 and 2 show the same image: [0,2] and [2,0] leave the negatives
    same = torch.tensor([[True, False, True], [False, True, False], [True, False, True]])
    # row 0 hardest .5: .2 + .5 - .85 < 0;  row 2 hardest .4: .2 + .4 - .3 = .3;  col 2 hardest .1: .2 + .1 - .3 = 0
    # col 0 hardest .2 < 0; col 1 unchanged < 0; row 1 unchanged 0  -> total .3
    assert vse_max_violation(SIM, 0.2, same_image=same).item() == pytest.approx(0.3, abs=1e-6)


# ---------------------------------------------------------------------------------------------- AOQ (spec §5.3)

# pos = diag = [.8, .6]; online hardest caption (row max off-diag) = [.7, .3]; hardest image (col) = [.3, .7]
AOQ_SIM = torch.tensor([[0.8, 0.7], [0.3, 0.6]])
OFF_CAPTION = torch.tensor([0.76, 0.65])  # S(I_i, T-_i)
OFF_IMAGE = torch.tensor([0.6, 0.65])  # S(I-_i, T_i)
OFF_PAIR = torch.tensor([0.9, 0.1])  # S(I-_i, T-_i)
OFF_PARTNERS = torch.tensor([0.2, 0.7])  # S(I-+_i, T-+_i)
# hinges: online caption [.2+.7-.8, .2+.3-.6] = [.1, 0]; online image [.2+.3-.8, .2+.7-.6] = [0, .3]
# weights (alpha .3, beta 1.5): w^c = 1.5 - ([.76, .65] - [.7, .3]) / .3 = [1.3, .3333]
#                               w^v = 1.5 - ([.6, .65] - [.3, .7]) / .3 = [.5, 1.6667]
# (1) = 1.3 * .1 = .13;  (2) = 1.6667 * .3 = .5
# (3) = [.76-.8]+ + [.65-.6]+ = .05;  (4) = [.6-.8]+ + [.65-.6]+ = .05
# (5) = [.9-.8]+ + [.1-.6]+ = .1;  (6) = [.2-.8]+ + [.7-.6]+ = .1


def run_aoq(variant, sim=AOQ_SIM, off_caption=OFF_CAPTION):
    return aoq_loss(sim, off_caption, OFF_IMAGE, OFF_PAIR, OFF_PARTNERS, variant=variant)


def test_aoq_six_terms_adaptive():
    loss, terms = run_aoq("adaptive_quintuplet")
    expected = {"online_caption": 0.13, "online_image": 0.5, "offline_caption": 0.05, "offline_image": 0.05,
                "offline_pair": 0.1, "offline_partners": 0.1}
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, abs=1e-5), name
    assert loss.item() == pytest.approx(0.93, abs=1e-5)


def test_aoq_variants():
    # quintuplet: w = 1 -> (1) = .1, (2) = .3, (3)-(6) unchanged: .7;  triplet drops (5), (6): .5
    loss_q, terms_q = run_aoq("quintuplet")
    assert terms_q["online_caption"].item() == pytest.approx(0.1, abs=1e-6)
    assert terms_q["online_image"].item() == pytest.approx(0.3, abs=1e-6)
    assert loss_q.item() == pytest.approx(0.7, abs=1e-5)
    loss_t, terms_t = run_aoq("triplet")
    assert set(terms_t) == {"online_caption", "online_image", "offline_caption", "offline_image"}
    assert loss_t.item() == pytest.approx(0.5, abs=1e-5)
    # triplet's online part is exactly VSE++ max-violation
    vse = vse_max_violation(AOQ_SIM, 0.2)
    assert (terms_t["online_caption"] + terms_t["online_image"]).item() == pytest.approx(vse.item(), abs=1e-6)
    with pytest.raises(ValueError, match="variant"):
        run_aoq("quadruplet")


def test_aoq_weights_are_not_detached():
    # d loss / d S(I_0, T-_0): term (1) = w^c_0 * .1 with dw/ds = -1/.3 -> -.3333; term (3) row 0 inactive
    off = OFF_CAPTION.clone().requires_grad_(True)
    run_aoq("adaptive_quintuplet", off_caption=off)[0].backward()
    assert off.grad[0].item() == pytest.approx(-0.1 / 0.3, abs=1e-5)
    # d loss / d sim[0,1] (row 0's hardest caption and col 1's hardest image):
    # (1): w^c_0 * 1 + .1 * (1/.3) = 1.3 + .3333;  (2): w^v_1 * 1 + .3 * (1/.3) = 1.6667 + 1  -> 4.3
    # (detached weights would give 1.3 + 1.6667 = 2.9667)
    sim = AOQ_SIM.clone().requires_grad_(True)
    run_aoq("adaptive_quintuplet", sim=sim)[0].backward()
    assert sim.grad[0, 1].item() == pytest.approx(4.3, abs=1e-4)
    # weights are not clipped: a very easy offline negative gives w > beta, a very hard one w < 0
    _, terms = aoq_loss(AOQ_SIM, torch.tensor([-0.5, 0.0]), OFF_IMAGE, OFF_PAIR, OFF_PARTNERS)
    # w^c_0 = 1.5 - (-.5 - .7)/.3 = 5.5 -> (1) = .55
    assert terms["online_caption"].item() == pytest.approx(0.55, abs=1e-5)
    _, terms = aoq_loss(AOQ_SIM, torch.tensor([1.3, 0.0]), OFF_IMAGE, OFF_PAIR, OFF_PARTNERS)
    # w^c_0 = 1.5 - (1.3 - .7)/.3 = -.5 -> (1) = -.05
    assert terms["online_caption"].item() == pytest.approx(-0.05, abs=1e-5)


# ---------------------------------------------------------------------------------------------- sampling (§5.2)

CPI = 2  # 3 images, 6 captions; captions of image i are 2i, 2i+1
I2T = torch.tensor([[4, 2, 5, 3],  # image 0 (own captions 0, 1 never listed)
                    [1, 5, 0, 4],  # image 1 (own 2, 3)
                    [3, 0, 2, 1]])  # image 2 (own 4, 5)
T2I = torch.tensor([[2, 1], [1, 2], [0, 2], [2, 0], [1, 0], [0, 1]])  # caption c never lists image c // 2


def test_sampling_candidate_range_one_is_deterministic():
    images, captions = torch.tensor([0, 1, 2]), torch.tensor([0, 3, 5])
    neg = sample_offline_negatives(I2T, T2I, images, captions, CPI, 1, torch.Generator().manual_seed(0))
    # n = 0 for every pair: T- = i2t[img, 0] = [4, 1, 3];  I- = t2i[cap, 0] = [2, 2, 0]
    assert neg.caption.tolist() == [4, 1, 3]
    assert neg.image.tolist() == [2, 2, 0]
    # I-+ = image of T- = T- // 2 = [2, 0, 1]
    assert neg.image_partner.tolist() == [2, 0, 1]
    # T-+ is one of I-'s captions: {4, 5}, {4, 5}, {0, 1}
    assert (neg.caption_partner // CPI).tolist() == [2, 2, 0]
    caption, image, image_partner, caption_partner = neg  # a plain 4-tuple too
    assert caption is neg.caption and caption_partner is neg.caption_partner


def test_sampling_ties_both_negatives_to_one_draw():
    images = torch.tensor([0, 1, 2] * 20)
    captions = torch.tensor([1, 2, 4] * 20)
    a = sample_offline_negatives(I2T, T2I, images, captions, CPI, 4, torch.Generator().manual_seed(3))
    b = sample_offline_negatives(I2T, T2I, images, captions, CPI, 4, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # the generator fixes the draw
    for k in range(len(images)):
        n = I2T[images[k]].tolist().index(a.caption[k].item())  # rows hold distinct captions: recover n
        assert a.image[k].item() == T2I[captions[k], n // CPI].item()  # same n, divided by cpi
        assert a.image_partner[k].item() == a.caption[k].item() // CPI
        assert a.caption_partner[k].item() // CPI == a.image[k].item()
    assert len(set(a.caption.tolist())) > 3  # several ranks were drawn
    assert set((a.caption_partner % CPI).tolist()) == {0, 1}  # both partner captions occur


def test_sampling_validates_candidate_range():
    images, captions = torch.tensor([0]), torch.tensor([0])
    with pytest.raises(ValueError, match="train.aoq.candidate_range"):
        sample_offline_negatives(I2T, T2I, images, captions, CPI, 5)  # > K1 = 4
    with pytest.raises(ValueError, match="train.aoq.candidate_range"):
        sample_offline_negatives(I2T, T2I, images, captions, CPI, 0)
    short_t2i = T2I[:, :1]  # K2 = 1: draws n <= 1 need n // 2 = 0 only
    sample_offline_negatives(I2T, short_t2i, images, captions, CPI, 2)
    with pytest.raises(ValueError, match="train.aoq.candidate_range"):
        sample_offline_negatives(I2T, short_t2i, images, captions, CPI, 3)  # n = 2 -> n // 2 = 1 >= K2
