"""Where chunked_topk's time goes beyond the block products, on one core: the parts docs/scaling.md uses to explain
the d x k grid of bench_topk.py.

    python benchmarks/bench_topk_parts.py [--dim 128] [--gallery 48000] [--rows 256] [--ks 10 400 2000]

* products: the single-threaded oneDNN block products of `rows` queries against the gallery in 2048-column blocks
  (chunked_topk's per-thread shape), in ns per score;
* select: topk_native's selection kernel over those blocks, kept in memory beforehand, in ns per score, reading
  each block once (`each block once`: the blocks total rows x gallery x 4 bytes, far beyond L2, as the product's
  output mostly is by the time it is read) and one block again and again (`one block again`: its lines stay in
  cache);
* first touch: writing an array into fresh memory (the pages' first touch) against writing it again, in GB/s:
  what a top-k's output costs beyond its sort.
Timings are the fastest of --repeats runs.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench_topk import vectors  # random unit vectors (benchmarks/ is on sys.path when run as a script)
from stages.retrieval import topk_native
from stages.retrieval.topk import block_scores

COLUMNS = 2048  # chunked_topk's gallery_chunk


def fastest(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--gallery", type=int, default=48000)
    parser.add_argument("--rows", type=int, default=256, help="query rows per block (chunked_topk: 1024 / threads)")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 400, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not topk_native.available():
        raise SystemExit(f"bench_topk_parts: numba is not importable ({topk_native.import_error()})")
    torch.set_num_threads(1)
    queries = torch.from_numpy(vectors(args.rows, args.dim, 1))
    gallery = torch.from_numpy(vectors(args.gallery, args.dim, 2))
    starts = range(0, args.gallery, COLUMNS)
    scores = args.rows * args.gallery

    def products():
        for g0 in starts:
            block_scores(queries, gallery[g0 : g0 + COLUMNS])

    products()
    per_score = fastest(products, args.repeats) / scores * 1e9
    print(f"1 thread; {args.rows} queries x {args.gallery} gallery rows, d = {args.dim}, blocks of {COLUMNS} columns")
    print(f"products: {per_score:.2f} ns per score")
    blocks = [block_scores(queries, gallery[g0 : g0 + COLUMNS]).numpy() for g0 in starts]
    workspace: dict = {}
    for k in args.ks:
        for label, pick in (("each block once", lambda i: blocks[i]), ("one block again", lambda i: blocks[min(i, 1)])):
            def select():
                selection = topk_native._Selection(args.rows, k, args.gallery, True, workspace)
                for i, g0 in enumerate(starts):
                    selection.add(pick(i), g0)

            select()  # numba's compiled kernel loaded, the workspace touched
            seconds = fastest(select, args.repeats)
            print(f"select k = {k}, {label}: {seconds / scores * 1e9:.2f} ns per score "
                  f"({100 * seconds / scores * 1e9 / per_score:.0f} % of the products)")
    size = 96_000_000  # 0.77 GB of int64, the result indices of 48k queries x k = 2000
    first, again = [], []
    for _ in range(args.repeats):
        began = time.perf_counter()
        out = torch.empty(size, dtype=torch.long)
        out.fill_(1)
        first.append(time.perf_counter() - began)
        began = time.perf_counter()
        out.fill_(2)
        again.append(time.perf_counter() - began)
        del out
    gigabytes = size * 8 / 1e9
    print(f"writing {gigabytes:.2f} GB: fresh memory (first touch) {gigabytes / min(first):.1f} GB/s, "
          f"touched memory {gigabytes / min(again):.1f} GB/s")


if __name__ == "__main__":
    main()
