"""Top-K over query x gallery similarities (`mine`, `evaluate`): our chunked matmul + running topk against what
a user would otherwise run, in one sitting, each side in its own process (so peak memory is its own).

    python benchmarks/bench_topk.py [--n 50000] [--dim 512] [--k 50] [--naive-n 10000] [--device cpu|cuda]
    python benchmarks/bench_topk.py --grid [--gallery-ratio 1] [--repeats 3]   # d x k grid: products, chunked, faiss

Sides: `products` (chunked_topk's block products alone over the whole problem, blocked and threaded as it does
them: the sustained matmul rate, its ceiling), `chunked` (stages.retrieval.chunked_topk, the pipeline's code
path: oneDNN block products and the numba selection on the CPU), `naive` (full Q x G matrix, then a per-row argsort, as research code does; at --naive-n because the full
matrix is N² floats), scikit-learn
`NearestNeighbors(algorithm="brute", metric="cosine")`, faiss-cpu `IndexFlatIP` (pip install -e '.[bench]'), and
`floor` (run_output_floor: the output alone, no scores; --sides floor or --grid).
The machine's own matmul rate is measured first in the same script (3 s on one cached block: "% matmul"), and
again as the `products` side ("% products"); GFLOP/s of a side = 2·Q·G·d / seconds.
Vectors are random unit vectors (cosine = inner product); all sides must return the same neighbours.
With --device cuda the matmul rate and the `chunked` side run on the GPU (the same code path as `mine` and
`evaluate` there); the other sides stay on the CPU.

--grid: d in 128, 256, 512, 1024 x k in 10, 50, 100, 400, 2000 in one sitting, each cell's sides (`products`,
`chunked`, faiss, `floor`) one after the other, each in its own process and timed as the fastest of --repeats runs
(the same work each time: the machine's noise only adds); a markdown table with chunked / faiss (time), chunked %
of products, and the output floor % of products: `floor` is what any exact top-k returning sorted (float32,
int64) results spends on that output alone (sorting Q x k keys, writing Q x k results into fresh memory), so
chunked cannot reach more than 100 / (100 + floor %) of the products. Queries x gallery per d are set so that the
products take 1-3 s on the project's 2-core CPU (GRID_PRODUCTS); --gallery-ratio G/Q shapes them (1: square).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import threading
import time

import numpy as np
import torch


def vectors(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(dim: int, device: str, seconds: float = 3.0) -> dict[str, float]:
    """The machine's float32 matmul rate on blocks the size chunked_topk uses, for each BLAS at hand:
    torch's matmul (MKL on x86, cuBLAS on CUDA) and, on the CPU, numpy's (OpenBLAS) and oneDNN's inner
    product (stages.retrieval.block_scores, what chunked_topk runs on the CPU)."""
    from stages.retrieval.topk import GALLERY_CHUNK, QUERY_CHUNK, block_scores

    a, b = torch.randn(QUERY_CHUNK, dim, device=device), torch.randn(GALLERY_CHUNK, dim, device=device)
    products = {"torch": lambda: a @ b.T}
    if device == "cpu":
        a_np, b_np = a.numpy(), b.numpy()
        products["numpy"] = lambda: a_np @ b_np.T
        products["onednn"] = lambda: block_scores(a, b)
    rates = {}
    for name, product in products.items():
        product()
        synchronize(device)
        began, flops = time.perf_counter(), 0
        while time.perf_counter() - began < seconds:
            product()
            flops += 2 * QUERY_CHUNK * dim * GALLERY_CHUNK
        synchronize(device)
        rates[name] = flops / (time.perf_counter() - began) / 1e9
    return rates


def run_products(q, g, k, device="cpu"):
    """The block products of chunked_topk over the whole problem and nothing else: the sustained matmul
    rate on this data (gallery blocks read from memory, clocks under a long load), the ceiling of `chunked`."""
    from stages.retrieval.topk import block_products

    block_products(torch.from_numpy(q).to(device), torch.from_numpy(g).to(device))
    synchronize(device)
    return None


def run_chunked(q, g, k, device="cpu"):
    from stages.retrieval.topk import chunked_topk

    q, g = torch.from_numpy(q).to(device), torch.from_numpy(g).to(device)
    indices = chunked_topk(q, g, k)[1]
    synchronize(device)
    return indices.cpu().numpy()


def run_naive(q, g, k):
    sims = torch.from_numpy(q) @ torch.from_numpy(g).T
    return torch.argsort(sims, dim=1, descending=True)[:, :k].numpy()


def run_sklearn(q, g, k):
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine").fit(g).kneighbors(q)[1]


def run_faiss(q, g, k):
    import faiss

    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    return index.search(q, k)[1]


def run_output_floor(q, g, k):
    """What an exact top-k that returns each query's k best sorted, as (float32 score, int64 row), spends on its
    output alone, without reading a score: Q x k 64-bit keys sorted row by row with numpy's sort (x86-simd-sort on
    AVX-512) and the Q x k result written into fresh memory (the pages' first touch included), on torch's threads
    in 512-row tasks as chunked_topk runs them. The keys are made in place by a multiplicative hash of their
    position (an order as random as scores in gallery order, at the cost of writing them)."""
    from concurrent.futures import ThreadPoolExecutor

    threads, rows_per_task = torch.get_num_threads(), 512
    positions = np.arange(rows_per_task * k, dtype=np.uint64)
    own = threading.local()  # each thread's keys, reused from task to task
    scores, rows = torch.empty((len(q), k)), torch.empty((len(q), k), dtype=torch.long)

    def task(r0):
        if not hasattr(own, "keys"):
            own.keys = np.empty((rows_per_task, k), np.uint64)
        keys = own.keys[: min(rows_per_task, len(q) - r0)]
        np.multiply(positions[: keys.size], np.uint64(0x9E3779B97F4A7C15 + 2 * r0), out=keys.reshape(-1))
        keys.sort(axis=1)
        scores[r0 : r0 + rows_per_task].fill_(0.0)
        rows[r0 : r0 + rows_per_task].fill_(0)

    with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        list(pool.map(task, range(0, len(q), rows_per_task)))
    return None


SIDES = {"products": run_products, "chunked": run_chunked, "naive": run_naive, "sklearn": run_sklearn,
         "faiss": run_faiss, "floor": run_output_floor}


def measure(side: str, n: int, dim: int, k: int, device: str, out: mp.Queue, n_gallery: int | None = None,
            repeats: int = 1) -> None:
    """Puts (side, n, seconds, peak MB, first rows' neighbours) on `out`: the fastest of `repeats` runs (the others
    are the same work; the machine's noise only adds time)."""
    q, g = vectors(n, dim, 1), vectors(n_gallery or n, dim, 2)
    extra = {"device": device} if side in ("products", "chunked") else {}
    if side in ("products", "chunked"):  # imports, CUDA context and kernels, numba's compiled kernels: not counted
        SIDES[side](q[:1024], g[:8192], min(k, 8192, len(g)), device)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        neighbours = None  # the last run's result freed first: each run writes into fresh memory, as the first did
        began = time.perf_counter()
        neighbours = SIDES[side](q, g, k, **extra)
        times.append(time.perf_counter() - began)
    seconds = min(times)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    head = None if neighbours is None else np.asarray(neighbours[:200], dtype=np.int64)
    out.put((side, n, seconds, peak_mb, head))


GRID_DIMS = (128, 256, 512, 1024)
GRID_KS = (10, 50, 100, 400, 2000)
# queries x gallery per d: products of about 1.5-2 s at the project CPU's ~300 GFLOP/s (2 cores)
GRID_PRODUCTS = {128: 2.3e9, 256: 1.15e9, 512: 5.8e8, 1024: 2.9e8}


def run_side(ctx, side: str, n: int, dim: int, k: int, device: str, n_gallery: int | None = None, repeats: int = 1):
    """(seconds: the fastest of `repeats` runs, peak MB, first rows' neighbours) of one side, in a fresh process."""
    queue = ctx.Queue()
    process = ctx.Process(target=measure, args=(side, n, dim, k, device, queue, n_gallery, repeats))
    process.start()
    _, _, seconds, peak_mb, head = queue.get()
    process.join()
    return seconds, peak_mb, head


def grid(ratio: float, device: str, dims=GRID_DIMS, ks=GRID_KS, repeats: int = 3) -> None:
    import datetime
    import os
    import platform
    import sys

    ctx = mp.get_context("spawn")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"{datetime.date.today()}: python benchmarks/bench_topk.py --grid --gallery-ratio {ratio:g}"
          + ("" if (dims, ks) == (GRID_DIMS, GRID_KS) else f" --dims {' '.join(map(str, dims))} --ks {' '.join(map(str, ks))}")
          + ("" if repeats == 3 else f" --repeats {repeats}") + "; "
          f"{torch.get_num_threads()} threads, {cpu}; chunked on {device}; seconds: the fastest of {repeats} runs of "
          "each side, each side in its own process", flush=True)
    print("| d | queries x gallery | k | products s | chunked s | faiss s | chunked / faiss | chunked % of products "
          "| output floor % of products | same top-k |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dim in dims:
        queries = int(round((GRID_PRODUCTS[dim] / ratio) ** 0.5, -2))
        gallery = int(round(queries * ratio, -2))
        for k in ks:  # the products again for each cell: its ratio is read from runs one after the other
            products = run_side(ctx, "products", queries, dim, 1, device, gallery, repeats)[0]
            chunked, _, mine = run_side(ctx, "chunked", queries, dim, k, device, gallery, repeats)
            faiss, _, theirs = run_side(ctx, "faiss", queries, dim, k, "cpu", gallery, repeats)
            floor = run_side(ctx, "floor", queries, dim, k, "cpu", gallery, repeats)[0]
            same = np.mean([len(set(a) & set(b)) / k for a, b in zip(mine, theirs)])
            print(f"| {dim} | {queries // 1000}k x {gallery / 1000:g}k | {k} | {products:.2f} | {chunked:.2f} | "
                  f"{faiss:.2f} | {chunked / faiss:.2f} | {100 * products / chunked:.0f}% | "
                  f"{100 * floor / products:.0f}% | {same:.3f} |", flush=True)
        print(f"(d={dim} done, load average {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50000, help="queries = gallery size")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--naive-n", type=int, default=10000, help="size for the full-matrix side")
    parser.add_argument("--sides", nargs="+", default=[side for side in SIDES if side != "floor"], choices=list(SIDES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where `chunked` runs")
    parser.add_argument("--grid", action="store_true", help="the d x k grid of products, chunked and faiss")
    parser.add_argument("--gallery-ratio", type=float, default=1.0, help="--grid: gallery rows per query row")
    parser.add_argument("--dims", type=int, nargs="+", default=list(GRID_DIMS), help="--grid: its d values")
    parser.add_argument("--ks", type=int, nargs="+", default=list(GRID_KS), help="--grid: its k values")
    parser.add_argument("--repeats", type=int, default=3, help="--grid: runs per side, the fastest reported")
    args = parser.parse_args()
    if args.grid:
        return grid(args.gallery_ratio, args.device, tuple(args.dims), tuple(args.ks), args.repeats)
    rates = matmul_gflops(args.dim, args.device)
    rate = max(rates.values())  # the machine's rate: its fastest BLAS
    print(f"{torch.get_num_threads()} threads; {args.device} matmul rate "
          + ", ".join(f"{name} {value:.1f}" for name, value in rates.items())
          + f" GFLOP/s (% matmul below: of {rate:.1f}); d={args.dim}, k={args.k}"
          + ("; peak MB is host memory" if args.device == "cuda" else ""))
    print(f"{'side':<9}{'N':>7}{'seconds':>9}{'GFLOP/s':>9}{'% matmul':>10}{'% products':>12}{'peak MB':>9}"
          f"{'same top-k':>12}")
    ctx = mp.get_context("spawn")
    reference, products = {}, None
    for side in args.sides:
        n = args.naive_n if side == "naive" else args.n
        queue = ctx.Queue()
        process = ctx.Process(target=measure, args=(side, n, args.dim, args.k, args.device, queue))
        process.start()
        side, n, seconds, peak_mb, head = queue.get()
        process.join()
        gflops = 2 * n * n * args.dim / seconds / 1e9
        if side == "products":
            products = gflops
        of_products = f"{100 * gflops / products:>11.0f}%" if products else f"{'-':>12}"
        if head is not None and n not in reference:
            reference[n] = head
        overlap = None if head is None else np.mean([len(set(a) & set(b)) / args.k for a, b in zip(head, reference[n])])
        same = "-" if overlap is None else f"{overlap:.3f}"
        print(f"{side:<9}{n:>7}{seconds:>9.2f}{gflops:>9.1f}{100 * gflops / rate:>9.0f}%{of_products}{peak_mb:>9.0f}"
              f"{same:>12}")


if __name__ == "__main__":
    main()
