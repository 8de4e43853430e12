"""Record AOQ's known answers from the released code (sunnychencool/AOQ@5bfe6209223cac4c671c2e659009729cdd6c9a2f).

    cd /work/main && nice -n 15 env OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES= .venv/bin/python \
        tests/known_answers/aoq/record.py --release /work/releases/AOQ

--release: a copy of the release patched as PROVENANCE.md says (CPU, Python 3). Runs, on the seeded features of
tests/test_known_answer_aoq.py:
  * modelAOQ.py ContrastiveLoss (the VSRN one: cosine similarity), constructed with its own defaults and
    max_violation=True (README: `--max_violation`) = AdapOffQuin; with alpha = inf, beta = 1 (weights exactly 1) =
    OffQuin; OffTri = that run's terms (1)–(4). The six term sums are read off the `.sum()` calls of
    ContrastiveLoss.forward with a TorchFunctionMode (the release code itself is not changed for this);
  * dataAOQ.py PrecompDataset.__getitem__ on a tiny candidate set, its `random.randint` fed item by item from the
    stream cirflow's sample_offline_negatives draws (torch.Generator(stream_seed): all n, then all partner offsets).
The release's image and text encoders (VSRN/BFAN on precomputed region features) are not run: loss-level only.
Writes expected.pt and inputs.json beside this file.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/: the input generators live in the test module
from test_known_answer_aoq import FEATURES, make_candidates, make_features  # noqa: E402

REPOSITORY = "sunnychencool/AOQ@5bfe6209223cac4c671c2e659009729cdd6c9a2f"
DIM = 8
BATCHES = {"unique": {"seed": 22, "b": 4},
           "duplicate": {"seed": 14, "b": 4, "image_ids": [0, 0, 1, 2]}}  # items 0, 1: two captions of one image
SAMPLING = {"seed": 21, "stream_seed": 22, "n_images": 12, "cpi": 5, "k_i2t": 20, "k_t2i": 4, "candidate_range": 20,
            "batch": 8}


@contextlib.contextmanager
def release_imports(root: Path):
    """sys.path / sys.modules as the release's imports need them while its modules load, restored afterwards (cirflow
    has its own top-level `models` package). Stubbed, never called by the code run here: `models` (VSRN's S2VT
    captioning package, not in the AOQ tree), `misc.rewards` (loads coco-caption's CIDEr-D), `pycocotools` (not
    installed); and `nltk`, whose word_tokenize needs the punkt data: a whitespace split stands in (the captions
    here are one word each, so it only carries a caption's index through)."""
    stubs = {
        "models": types.SimpleNamespace(DecoderRNN=None, EncoderRNN=None, S2VTAttModel=None, S2VTModel=None),
        "misc.rewards": types.SimpleNamespace(get_self_critical_reward=None, init_cider_scorer=None),
        "pycocotools": types.SimpleNamespace(),
        "pycocotools.coco": types.SimpleNamespace(COCO=None),
        "nltk": types.SimpleNamespace(tokenize=types.SimpleNamespace(word_tokenize=str.split)),
    }
    loaded_by_release = ("opts", "misc", "misc.utils", "GCN_lib", "GCN_lib.Rs_GCN")
    saved = {name: sys.modules.get(name) for name in (*stubs, *loaded_by_release)}
    sys.path.insert(0, str(root))
    sys.modules.update({name: types.ModuleType(name) for name in stubs})
    for name, stub in stubs.items():
        sys.modules[name].__dict__.update(vars(stub))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def load_release(root: Path, *files: str) -> list[types.ModuleType]:
    modules = []
    with release_imports(root):
        for file in files:
            spec = importlib.util.spec_from_file_location(f"aoq_release_{Path(file).stem}", root / file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            modules.append(module)
    return modules


class TermSums(torch.overrides.TorchFunctionMode):
    """Records every argument-less Tensor.sum(): in ContrastiveLoss.forward these are its return line's six terms,
    cost_s, cost_im, cost_s2, cost_im2, cost_s3, cost_im3 = terms (1)–(6)."""

    def __init__(self):
        super().__init__()
        self.sums: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.Tensor.sum and len(args) == 1 and not kwargs:
            self.sums.append(out)
        return out


def run_release_loss(model_mod, feats: dict, **overrides):
    """(loss, [six term sums]) of the release's ContrastiveLoss on leaf copies of the features, and the leaves."""
    criterion = model_mod.ContrastiveLoss(max_violation=True, **overrides)
    leaves = {k: v.clone().requires_grad_(True) for k, v in feats.items()}
    with TermSums() as mode:
        loss = criterion(*(leaves[k] for k in FEATURES))
    assert len(mode.sums) == 6, f"expected ContrastiveLoss.forward's six term sums, saw {len(mode.sums)}"
    hyper = {"marginonline": criterion.marginonline, "marginoffline": criterion.marginoffline,
             "alpha": criterion.alpha, "beta": criterion.beta, "max_violation": criterion.max_violation}
    return criterion, loss, mode.sums, leaves, hyper


def record_variants(model_mod, feats: dict) -> dict:
    out = {}
    # AdapOffQuin: the release as trained (its defaults: marginonline .2, marginoffline 0, alpha .3, beta 1.5)
    _, loss, sums, leaves, hyper = run_release_loss(model_mod, feats)
    out["adaptive_quintuplet"] = pack(loss, sums, leaves, hyper)
    # OffQuin: the same code with w = beta - (...)/alpha = 1 - 0 exactly (alpha = inf, beta = 1)
    _, loss, sums, leaves, hyper = run_release_loss(model_mod, feats, alpha=math.inf, beta=1.0)
    out["quintuplet"] = pack(loss, sums, leaves, hyper)
    # OffTri: that run's terms (1)-(4) (the release has no switch for it; the paper's ablation)
    _, _, sums, leaves, hyper = run_release_loss(model_mod, feats, alpha=math.inf, beta=1.0)
    out["triplet"] = pack(sums[0] + sums[1] + sums[2] + sums[3], sums[:4], leaves, hyper)
    return out


def pack(loss, sums, leaves, hyper) -> dict:
    grads = torch.autograd.grad(loss, [leaves[k] for k in FEATURES], allow_unused=True, materialize_grads=True)
    terms = [s.detach() for s in sums] + [torch.tensor(0.0)] * (6 - len(sums))
    assert math.isclose(sum(t.item() for t in terms), loss.item(), rel_tol=1e-6, abs_tol=1e-6)
    return {"loss": loss.detach(), "terms": terms, "grad": dict(zip(FEATURES, grads)),
            "hyper": {k: (float(v) if not isinstance(v, bool) else v) for k, v in hyper.items()}}


class StreamRandom:
    """Stands in for the `random` module dataAOQ.py imports: item i's random.randint(0, offcandisize - 1) returns
    n[i], its random.randint(0, 4) returns offset[i], checking the bounds the release asks for."""

    def __init__(self, n: torch.Tensor, offset: torch.Tensor, candidate_range: int):
        self.calls = [call for n_i, offset_i in zip(n.tolist(), offset.tolist())
                      for call in (((0, candidate_range - 1), n_i), ((0, 4), offset_i))]
        self.asked = []

    def randint(self, a, b):
        bounds, value = self.calls[len(self.asked)]
        self.asked.append((a, b))
        assert (a, b) == bounds, f"release asked randint{(a, b)}, expected randint{bounds}"
        return value


def record_sampling(data_mod) -> dict:
    cfg = SAMPLING
    i2t, t2i, image_index, caption_index = make_candidates(cfg["seed"], cfg["n_images"], cfg["cpi"], cfg["k_i2t"],
                                                           cfg["k_t2i"], cfg["batch"])
    assert cfg["cpi"] == 5, "dataAOQ.py hard-codes 5 captions per image"
    g = torch.Generator().manual_seed(cfg["stream_seed"])  # the order sample_offline_negatives draws in
    n = torch.randint(0, cfg["candidate_range"], (cfg["batch"],), generator=g)
    offset = torch.randint(0, cfg["cpi"], (cfg["batch"],), generator=g)

    n_captions = cfg["n_images"] * cfg["cpi"]
    vocab_ids = {"<start>": 1, "<end>": 2, **{f"c{r}": r + 3 for r in range(n_captions)}}
    ds = data_mod.PrecompDataset.__new__(data_mod.PrecompDataset)  # __init__ reads files; set what it would
    ds.vocab = vocab_ids.__getitem__
    ds.captions = [f"c{r}".encode() for r in range(n_captions)]  # read in 'rb' mode: bytes
    ds.images = np.repeat(np.arange(cfg["n_images"], dtype=np.float32)[:, None], 2, axis=1)  # image row r = [r, r]
    ds.length, ds.im_div, ds.split, ds.max_len = n_captions, 5, "train", 10
    ds.i2thn, ds.t2ihn = i2t.numpy(), t2i.numpy()
    ds.offcandisize = float(cfg["candidate_range"])  # trainAOQ.py: --offcandisize default 300, type=float
    stream = StreamRandom(n, offset, cfg["candidate_range"])
    data_mod.random = stream
    picked = {"caption": [], "image": [], "image_partner": [], "caption_partner": []}
    for index in caption_index.tolist():
        image, target, idx, img_id, _, _, imagehn, targethn, imagehn2, targethn2 = ds[index]
        assert idx == index and img_id == index // 5 and int(image[0]) == img_id and int(target[1]) - 3 == index
        picked["caption"].append(int(targethn[1]) - 3)  # T⁻ = i2t[img][n]
        picked["image"].append(int(imagehn[0]))  # I⁻ = t2i[index][n // 5]
        picked["caption_partner"].append(int(targethn2[1]) - 3)  # T⁻⁺ = I⁻ · 5 + n2
        picked["image_partner"].append(int(imagehn2[0]))  # I⁻⁺ = T⁻ // 5
    assert len(stream.asked) == 2 * cfg["batch"]
    return {"i2t": i2t, "t2i": t2i, "caption_index": caption_index, "n": n, "offset": offset,
            **{k: torch.tensor(v) for k, v in picked.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True, help="the patched copy of sunnychencool/AOQ@5bfe620")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_mod, data_mod = load_release(args.release, "modelAOQ.py", "dataAOQ.py")
    feats = {name: make_features(spec["seed"], spec["b"], DIM, spec.get("image_ids")) for name, spec in BATCHES.items()}
    release = {name: record_variants(model_mod, f) for name, f in feats.items()}
    _, _, _, _, hyper = run_release_loss(model_mod, feats["unique"])
    expected = {"inputs": feats, "release": release, "hyper": hyper, "sampling": record_sampling(data_mod),
                "repository": REPOSITORY}
    torch.save(expected, HERE / "expected.pt")
    inputs = {"repository": REPOSITORY, "dim": DIM, "batches": BATCHES, "features": list(FEATURES),
              "sampling": SAMPLING, "torch": torch.__version__,
              "note": "features: tests/test_known_answer_aoq.py make_features(seed, b, dim, image_ids); candidates: "
                      "make_candidates(seed, n_images, cpi, k_i2t, k_t2i, batch)"}
    (HERE / "inputs.json").write_text(json.dumps(inputs, indent=1) + "\n")
    for name, variants in release.items():
        for variant, r in variants.items():
            print(f"{name:9s} {variant:19s} loss {r['loss'].item():.6f} terms "
                  + " ".join(f"{t.item():.4f}" for t in r["terms"]))
    s = expected["sampling"]
    print("sampling n", s["n"].tolist(), "offset", s["offset"].tolist())
    print("  T-", s["caption"].tolist(), "I-", s["image"].tolist(), "I-+", s["image_partner"].tolist(),
          "T-+", s["caption_partner"].tolist())


if __name__ == "__main__":
    main()
