"""Known answers of AOQ's losses and offline sampling, recorded from the release (sunnychencool/AOQ@5bfe620,
modelAOQ.py ContrastiveLoss, dataAOQ.py PrecompDataset.__getitem__) by tests/known_answers/aoq/record.py.

Loss-level: the release's loss sits on VSRN/BFAN encoders over precomputed region features, which are not run
here (no release layout either). Both sides get the same seeded, L2-normalised feature tensors in the release's
argument order `forward(im, s, imhnoff, shnoff, imhnoff2, shnoff2)`:
    im = v (I_i), s = u (T_i), imhnoff = v_neg (I⁻), shnoff = u_neg (T⁻), imhnoff2 = v_partner (I⁻⁺), shnoff2 = u_partner (T⁻⁺)
and each test compares the loss, its six per-term sums and the gradient w.r.t. every input tensor.

The release implements only the full AdapOffQuin loss. OffQuin is the same code with its weights made exactly 1
(alpha = inf, beta = 1: w = 1 − 0); OffTri is its terms (1)–(4), read from that same run (the recorder captures
the six `.sum()`s of ContrastiveLoss.forward). See tests/known_answers/aoq/PROVENANCE.md.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from models.losses.matching import aoq_loss, same_image_mask, sample_offline_negatives

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "known_answers" / "aoq"
ROOT = HERE.parent
RTOL, ATOL = 1e-4, 1e-5
FEATURES = ("im", "s", "imhnoff", "shnoff", "imhnoff2", "shnoff2")  # the release's argument names, in order
TERMS = ("online_caption", "online_image", "offline_caption", "offline_image", "offline_pair", "offline_partners")
VARIANTS = ("triplet", "quintuplet", "adaptive_quintuplet")  # OffTri, OffQuin, AdapOffQuin


# ---------------------------------------------------------------------------------------------- inputs (shared with record.py)


def make_features(seed: int, b: int, d: int, image_ids: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Six B × D unit-norm float32 tensors, in FEATURES order. With image_ids, rows of `im` that share an id are the
    same vector (the release's precomputed features hold each image once per caption: `images[index // 5]`)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(len(FEATURES), b, d, generator=g, dtype=torch.float32)
    if image_ids is not None:
        first = {}
        rows = [first.setdefault(i, r) for r, i in enumerate(image_ids)]
        raw[0] = raw[0][rows]
    unit = raw / raw.norm(dim=-1, keepdim=True)
    return dict(zip(FEATURES, unit))


def make_candidates(seed: int, n_images: int, cpi: int, k_i2t: int, k_t2i: int, batch: int):
    """Candidate lists in the release's layout (captions of image i are i·cpi .. i·cpi + cpi − 1): i2t[i] = k_i2t
    other images' captions, t2i[c] = k_t2i images other than c // cpi, int32 as the mine stage writes them; and a
    batch of distinct caption rows with their images."""
    g = torch.Generator().manual_seed(seed)
    n_captions = n_images * cpi
    i2t = torch.stack([torch.tensor([c for c in torch.randperm(n_captions, generator=g).tolist() if c // cpi != i][:k_i2t])
                       for i in range(n_images)]).int()
    t2i = torch.stack([torch.tensor([j for j in torch.randperm(n_images, generator=g).tolist() if j != c // cpi][:k_t2i])
                       for c in range(n_captions)]).int()
    caption_index = torch.randperm(n_captions, generator=g)[:batch]
    return i2t, t2i, caption_index // cpi, caption_index


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def recorded():
    return (json.loads((FIXTURES / "inputs.json").read_text()),
            torch.load(FIXTURES / "expected.pt", weights_only=True))


def features(inputs: dict, batch: str) -> dict[str, torch.Tensor]:
    spec = inputs["batches"][batch]
    return make_features(spec["seed"], spec["b"], inputs["dim"], spec.get("image_ids"))


def cirflow_aoq(feats: dict, hyper: dict, variant: str, same_image=None):
    """cirflow's aoq_loss on the features (leaves with grad), as stages/training/aoq.py feeds it."""
    x = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
    v, u, v_neg, u_neg, v_partner, u_partner = (x[k] for k in FEATURES)
    loss, terms = aoq_loss(v @ u.T, (v * u_neg).sum(1), (v_neg * u).sum(1), (v_neg * u_neg).sum(1),
                           (v_partner * u_partner).sum(1), hyper["marginonline"], hyper["marginoffline"],
                           hyper["alpha"], hyper["beta"], variant, same_image)
    grads = torch.autograd.grad(loss, [x[k] for k in FEATURES], allow_unused=True, materialize_grads=True)
    return loss.detach(), {k: t.detach() for k, t in terms.items()}, dict(zip(FEATURES, grads))


def assert_close(actual, expected, what):
    assert torch.allclose(actual, expected, rtol=RTOL, atol=ATOL), \
        f"{what}: max |diff| {(actual - expected).abs().max().item():.3g}\ncirflow {actual}\nrelease {expected}"


def check_against_release(release: dict, loss, terms, grads):
    assert_close(loss, release["loss"], "loss")
    for name, value in zip(TERMS, release["terms"]):
        assert_close(terms.get(name, torch.tensor(0.0)), value, f"term {name}")
    for name in FEATURES:
        assert_close(grads[name], release["grad"][name], f"dL/d{name}")


# ---------------------------------------------------------------------------------------------- tests


def test_known_answer_aoq_inputs_regenerate(recorded):
    """The seeds still give the tensors the release saw (a torch RNG change would show here first)."""
    inputs, expected = recorded
    for batch in inputs["batches"]:
        for name, value in features(inputs, batch).items():
            assert torch.equal(value, expected["inputs"][batch][name]), (batch, name)
    cand = inputs["sampling"]
    i2t, t2i, image_index, caption_index = make_candidates(cand["seed"], cand["n_images"], cand["cpi"],
                                                           cand["k_i2t"], cand["k_t2i"], cand["batch"])
    assert torch.equal(i2t, expected["sampling"]["i2t"]) and torch.equal(t2i, expected["sampling"]["t2i"])
    assert torch.equal(caption_index, expected["sampling"]["caption_index"])


def test_known_answer_aoq_hyperparameters(recorded):
    """params.yaml's AOQ loss settings (what the vse_aoq_* recipes train with) are the release's defaults."""
    _, expected = recorded
    hyper = expected["hyper"]
    loss = yaml.safe_load((ROOT / "params.yaml").read_text())["loss"]
    assert (loss["aoq_margin_online"], loss["aoq_margin_offline"], loss["aoq_alpha"], loss["aoq_beta"]) == \
        pytest.approx((hyper["marginonline"], hyper["marginoffline"], hyper["alpha"], hyper["beta"]))
    assert expected["hyper"]["max_violation"] is True


@pytest.mark.parametrize("variant", VARIANTS)
def test_known_answer_aoq_loss(recorded, variant):
    """cirflow's aoq_loss (no same-image mask, as the release) = the release's loss, six term sums, gradients."""
    inputs, expected = recorded
    release = expected["release"]["unique"][variant]
    loss, terms, grads = cirflow_aoq(features(inputs, "unique"), release["hyper"], variant)
    check_against_release(release, loss, terms, grads)


@pytest.mark.parametrize("variant", VARIANTS)
def test_known_answer_aoq_duplicate_image_batch(recorded, variant):
    """Issue 24 row "online negatives exclude only the diagonal": on a batch where items 0 and 1 are two captions of
    one image, the release counts each as the other's online negative. cirflow's aoq_loss with same_image=None
    reproduces the release exactly; with same_image_mask (what stages/training/aoq.py always passes) it differs."""
    inputs, expected = recorded
    release = expected["release"]["duplicate"][variant]
    feats = features(inputs, "duplicate")
    loss, terms, grads = cirflow_aoq(feats, release["hyper"], variant)
    check_against_release(release, loss, terms, grads)
    ids = torch.tensor(inputs["batches"]["duplicate"]["image_ids"])
    masked, masked_terms, _ = cirflow_aoq(feats, release["hyper"], variant, same_image_mask(ids))
    # the mask only touches the online terms (1), (2), and on this batch it changes them
    for name in TERMS[2:]:
        assert torch.equal(masked_terms.get(name, torch.tensor(0.0)), terms.get(name, torch.tensor(0.0)))
    assert abs(masked.item() - release["loss"].item()) > 1e-3, (masked.item(), release["loss"].item())


def test_known_answer_aoq_sampling(recorded):
    """sample_offline_negatives = dataAOQ.py's draw (T⁻ = i2t[img][n], I⁻ = t2i[cap][n // 5], T⁻⁺ = I⁻·5 + n2,
    I⁻⁺ = T⁻ // 5) when both read the same random stream: the release's per-item random.randint(0, 299) and
    random.randint(0, 4) were fed, item by item, the values of cirflow's generator draws."""
    inputs, expected = recorded
    cand, rec = inputs["sampling"], expected["sampling"]
    i2t, t2i, image_index, caption_index = make_candidates(cand["seed"], cand["n_images"], cand["cpi"],
                                                           cand["k_i2t"], cand["k_t2i"], cand["batch"])
    picked = sample_offline_negatives(i2t, t2i, image_index, caption_index, cand["cpi"], cand["candidate_range"],
                                      torch.Generator().manual_seed(cand["stream_seed"]))
    for field in ("caption", "image", "image_partner", "caption_partner"):
        assert torch.equal(getattr(picked, field), rec[field]), (field, getattr(picked, field), rec[field])


class _Model(torch.nn.Module):
    """Stand-in encoders: an "image" is its feature vector, a "text" is a row of a caption-feature table."""

    def __init__(self, captions: torch.Tensor):
        super().__init__()
        self.captions = captions

    def encode_image(self, images):
        return images

    def encode_text(self, tokens, lengths):
        return self.captions[tokens[:, 0]]


class _Tokenizer:
    def batch(self, texts):
        return torch.tensor([[int(t)] for t in texts]), torch.ones(len(texts), dtype=torch.long)


class _Negatives:
    def __init__(self, v_neg, v_partner, b):
        self.v_neg, self.v_partner, self.b = v_neg, v_partner, b

    def draw(self, image_ids, caption_ids):
        b = self.b
        return self.v_neg, self.v_partner, [str(b + i) for i in range(b)], [str(2 * b + i) for i in range(b)]


def run_batch_loss(feats: dict, hyper: dict, image_ids: list[str]):
    """stages/training/aoq.py aoq_batch_loss on the features (its slot wiring, and the mask it always applies)."""
    from stages.training.aoq import aoq_batch_loss

    x = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
    b = x["im"].shape[0]
    captions = torch.cat([x["s"], x["shnoff"], x["shnoff2"]])  # T_i, T⁻_i, T⁻⁺_i
    cfg = SimpleNamespace(aoq_margin_online=hyper["marginonline"], aoq_margin_offline=hyper["marginoffline"],
                          aoq_alpha=hyper["alpha"], aoq_beta=hyper["beta"], aoq_variant="adaptive_quintuplet")
    batch = {"text": [str(i) for i in range(b)], "image": x["im"], "image_id": image_ids,
             "caption_id": [f"c{i}" for i in range(b)]}
    loss, logs = aoq_batch_loss(_Model(captions), _Negatives(x["imhnoff"], x["imhnoff2"], b), cfg, _Tokenizer(), batch,
                                torch.device("cpu"))
    return loss.detach(), dict(zip(FEATURES, torch.autograd.grad(loss, [x[k] for k in FEATURES]))), logs


def test_known_answer_aoq_batch_loss_wiring(recorded):
    """The training path (aoq_batch_loss) puts I⁻, T⁻, I⁻⁺, T⁻⁺ in the release's slots: on a batch of distinct
    images (where its same-image mask is the diagonal) it gives the release's AdapOffQuin loss and gradients."""
    inputs, expected = recorded
    release = expected["release"]["unique"]["adaptive_quintuplet"]
    b = inputs["batches"]["unique"]["b"]
    loss, grads, logs = run_batch_loss(features(inputs, "unique"), release["hyper"], [f"img{i}" for i in range(b)])
    assert_close(loss, release["loss"], "loss")
    for name in FEATURES:
        assert_close(grads[name], release["grad"][name], f"dL/d{name}")
    assert logs["aoq_online_caption"] == pytest.approx(release["terms"][0].item(), rel=RTOL, abs=ATOL)


def test_known_answer_aoq_batch_loss_masks_duplicates(recorded):
    """On the two-captions-of-one-image batch the training path applies the same-image mask (no switch turns it
    off): it equals aoq_loss with same_image_mask, not the release."""
    inputs, expected = recorded
    release = expected["release"]["duplicate"]["adaptive_quintuplet"]
    feats = features(inputs, "duplicate")
    ids = inputs["batches"]["duplicate"]["image_ids"]
    loss, _, _ = run_batch_loss(feats, release["hyper"], [f"img{i}" for i in ids])
    masked, _, _ = cirflow_aoq(feats, release["hyper"], "adaptive_quintuplet", same_image_mask(torch.tensor(ids)))
    assert_close(loss, masked, "masked loss")
    assert abs(loss.item() - release["loss"].item()) > 1e-3
