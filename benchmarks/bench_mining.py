"""`mine`'s matching path (AOQ offline candidates, stages/retrieval/offline_candidates.py `mine_candidates`) at
growing sizes, on generated unit embeddings: time and peak memory (CPU), and a fit extrapolated to COCO and
Flickr30k's training sets.

    python benchmarks/bench_mining.py [--images 10000 20000 40000] [--captions-per-image 5] [--dim 1024]
                                      [--i2t-k 2000] [--t2i-k 400]

Each size runs in its own process (peak = that process's maximum resident set, embeddings included, after the
embeddings are made: the `embeddings MB` column is their share). The time is `mine_candidates` alone (the stage
also embeds the images and captions and writes the file). Both directions compute every image-caption product
once (i2t: images x captions, t2i: captions x images), so the time grows as images x captions: the fit is
seconds = a * images * captions + b * (images * i2t_k + captions * t2i_k) by least squares over the sizes run,
peak MB = c + e * (images * i2t_k + captions * t2i_k) + embedding MB.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

import numpy as np
import torch

from bench_topk import vectors  # random unit vectors (benchmarks/ is on sys.path when run as a script)

TARGETS = {"Flickr30k": (29000, 145000), "COCO": (113287, 566435)}  # training images, captions (Karpathy split)


def measure(images: int, per_image: int, dim: int, i2t_k: int, t2i_k: int, out: mp.Queue) -> None:
    from stages.retrieval.offline_candidates import mine_candidates

    image_emb = torch.from_numpy(vectors(images, dim, 1))
    text_emb = torch.from_numpy(vectors(images * per_image, dim, 2))
    text_image = torch.arange(images).repeat_interleave(per_image)
    text_image = text_image[torch.randperm(len(text_image), generator=torch.Generator().manual_seed(0))]
    small = slice(0, 2 * i2t_k // per_image + 10)  # numba's kernels loaded, thread pool started: not counted
    mine_candidates(image_emb[small], text_emb[: small.stop * per_image],
                    torch.arange(small.stop).repeat_interleave(per_image), i2t_k, min(t2i_k, small.stop - 1))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    began = time.perf_counter()
    i2t, t2i = mine_candidates(image_emb, text_emb, text_image, i2t_k, t2i_k)
    seconds = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert i2t.shape == (images, i2t_k) and t2i.shape == (images * per_image, t2i_k)
    out.put((seconds, peak, before, (image_emb.numel() + text_emb.numel()) * 4 / 2**20,
             (i2t.numel() + t2i.numel()) * i2t.element_size() / 2**20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[10000, 20000, 40000])
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--i2t-k", type=int, default=2000)
    parser.add_argument("--t2i-k", type=int, default=400)
    args = parser.parse_args()
    per = args.captions_per_image
    print(f"{torch.get_num_threads()} threads; d={args.dim}, i2t_k={args.i2t_k}, t2i_k={args.t2i_k}, "
          f"{per} captions per image")
    print("| images | captions | seconds | peak MB | embeddings MB | candidates MB (int64) |")
    print("|---|---|---|---|---|---|")
    ctx = mp.get_context("spawn")
    rows = []
    for images in args.images:
        queue = ctx.Queue()
        process = ctx.Process(target=measure, args=(images, per, args.dim, args.i2t_k, args.t2i_k, queue))
        process.start()
        seconds, peak, before, embedding_mb, candidates_mb = queue.get()
        process.join()
        rows.append((images, images * per, seconds, peak, embedding_mb))
        print(f"| {images} | {images * per} | {seconds:.1f} | {peak:.0f} | {embedding_mb:.0f} | {candidates_mb:.0f} |",
              flush=True)
    if len(rows) < 2:
        return
    kept = lambda n, m: n * args.i2t_k + m * args.t2i_k  # noqa: E731 - candidates kept, both directions
    a, b = np.linalg.lstsq(np.array([[n * m, kept(n, m)] for n, m, *_ in rows], dtype=float),
                           np.array([r[2] for r in rows]), rcond=None)[0]
    c, e = np.polyfit([kept(n, m) for n, m, *_ in rows], [peak - emb for *_, peak, emb in rows], 1)[::-1]
    print(f"fit: seconds = {a:.3g} * images * captions + {b:.3g} * kept candidates; "
          f"peak MB = {c:.0f} + {e * 1e6:.2f} MB per million kept candidates + embeddings")
    for name, (n, m) in TARGETS.items():
        embedding_mb = (n + m) * args.dim * 4 / 2**20
        print(f"{name} ({n} images x {m} captions): ~{(a * n * m + b * kept(n, m)) / 60:.0f} min, "
              f"peak ~{(c + e * kept(n, m) + embedding_mb) / 1024:.1f} GB (embeddings {embedding_mb / 1024:.1f} GB, "
              f"candidates {kept(n, m) * 8 / 2**30:.1f} GB as int64, {kept(n, m) * 4 / 2**30:.1f} GB as the file's int32)")


if __name__ == "__main__":
    main()
