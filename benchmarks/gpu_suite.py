"""The GPU suite: one command, under 5 minutes on one GPU, every figure a ratio measured in the same run.

    python benchmarks/gpu_suite.py --device cuda [--json results.json]   # the GPU run (docs/scaling.md)
    python benchmarks/gpu_suite.py --device cpu                          # dry run: tiny sizes, the same code paths

Sections, each in its own process with a time budget (`--budget-step/-loader/-topk` seconds; the process is
stopped at its budget and what it measured by then is kept, the rest marked "over budget"):

  step    each composed model (tirg, tirg_lastconv, composeae, val, amc) and the dual encoder: samples/s of a
          training step, eager (fp32, contiguous, pageable, blocking) against the project's fast path (bf16 autocast,
          channels_last, pinned batch + non-blocking copy) and the fast path with torch.compile (compile_model, as
          `compile: true` runs it): benchmarks/train_step.py's step (random init, synthetic batch, params.yaml's
          `model`, `loss` and `pretrain` optimiser). Eager and fast for every model first, then the compiled runs
          (the slow part: compilation happens in the warm-up steps, not timed).
  loader  JPEG shards of the shapes generator at the step's image size, made by the real stages (prepare's
          generator, resize to JPEG, shard), read by stages.shards.loaders.training_batches with the images
          decoded on the CPU workers (PIL) or batch by batch on the GPU (decode_on, torchvision.io.decode_jpeg);
          images/s against each model's best step images/s (a query is 2 images, an image-caption pair 1), and the
          TIRG fast step fed by each loader (the step as `pretrain` runs it).
  topk    stages.retrieval.chunked_topk on the CPU (oneDNN blocks) and with device cuda (cuBLAS; default and larger
          chunks), as `mine` and `evaluate` call it (features on the host, results back on the host).

--device cpu runs the same sections at tiny sizes (--image-encoder small_cnn, 32 px, batch 8, 1 + 2 steps, loader
workers 1, top-K 3000 x 3000): the GPU's side of the loader and of top-K runs on the CPU there (torchvision's
decode_jpeg on the CPU; chunked_topk with device cpu), torch.compile uses the `eager` backend (Dynamo traces, no
code generation) and bf16 autocast runs on the CPU. Its numbers mean nothing; it checks the suite end to end
(tests/test_gpu_suite.py). Shapes scenes are flat colours: their JPEGs decode faster than photographs do.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
MODELS = ("tirg", "tirg_lastconv", "composeae", "val", "amc", "dual_encoder")
IMAGES_PER_SAMPLE = {name: 1 if name == "dual_encoder" else 2 for name in MODELS}  # a query: reference + target
SECTIONS = ("step", "loader", "topk")


@dataclasses.dataclass(frozen=True)
class Profile:
    device: str
    image_encoder: str
    image_size: int
    batch: int
    warmup: int
    steps: int
    compile_options: dict
    tiny_model: bool  # the dry run: params.yaml's model with tiny widths (the same parts, fast to trace)
    train_queries: int
    loader_workers: tuple[int, ...]
    loader_batches: int  # timed per loader (an epoch of the train queries holds more)
    topk_n: int
    topk_dim: int
    topk_k: int
    budgets: dict  # section -> seconds
    models: tuple[str, ...] = MODELS


def profile(device: str, cores: int) -> Profile:
    """The GPU run's sizes, or the dry run's (--device cpu)."""
    if device == "cuda":
        return Profile(device=device, image_encoder="resnet50", image_size=224, batch=64, warmup=5, steps=10,
                       compile_options={}, tiny_model=False, train_queries=2048,
                       loader_workers=tuple(sorted({1, min(4, cores), max(1, cores - 2)})), loader_batches=24,
                       topk_n=50000, topk_dim=512, topk_k=50,
                       budgets={"step": 180, "loader": 60, "topk": 25})
    return Profile(device=device, image_encoder="small_cnn", image_size=32, batch=8, warmup=1, steps=2,
                   compile_options={"backend": "eager"}, tiny_model=True, train_queries=48, loader_workers=(1,),
                   loader_batches=3, topk_n=3000, topk_dim=64, topk_k=10,
                   budgets={"step": 120, "loader": 90, "topk": 60})


# --- step ----------------------------------------------------------------------------------------------------


def step_variants(device):
    """eager, fast, fast+compile (train_step's, without its CPU-only `compile` variant)."""
    from train_step import variants

    return [v for v in variants(device, compile=True, cpu_bf16=True) if v.name != "compile"]


def step_setup(p: Profile):
    import torch

    from stages.common.params import load
    from stages.modeling.factory import ModelConfig
    from stages.modeling.vocab import Vocab
    from stages.training.loop import LoopConfig
    from stages.training.objectives import LossConfig
    from train_step import random_texts

    texts = random_texts(p.batch, random.Random(0))
    args = argparse.Namespace(image_encoder=p.image_encoder, image_size=p.image_size, batch=p.batch, warmup=p.warmup,
                              steps=p.steps)
    model = load(ModelConfig, "model", PARAMS)
    if p.tiny_model:
        model = dataclasses.replace(model, embed_dim=32, image=dataclasses.replace(model.image, channels=[8, 8, 16, 16]),
                                    text=dataclasses.replace(model.text, embed_dim=16, hidden_dim=16))
    configs = (model, load(LossConfig, "loss", PARAMS), load(LoopConfig, "pretrain", PARAMS))
    return args, configs, texts, Vocab.build(texts), torch.device(p.device)


def run_step(p: Profile, report, deadline: float) -> None:
    import torch

    from train_step import host_batch, samples_per_s

    args, (base_model, base_loss, loop), texts, vocab, device = step_setup(p)
    report({"section": "step", "what": "device", "name": torch.cuda.get_device_name(device)
            if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"})
    eager, fast, compiled = step_variants(device)
    for phase in ((eager, fast), (compiled,)):  # the compiled runs last: they cost the most
        for name in p.models:
            for variant in phase:
                if variant.compile and time.monotonic() > deadline - 15:
                    report({"section": "step", "model": name, "variant": variant.name, "error": "over budget"})
                    continue
                batch = host_batch(name, p.batch, p.image_size, texts, seed=0)
                try:
                    rate = samples_per_s(name, variant, args, base_model, base_loss, loop, vocab, batch, device,
                                         compile_options=p.compile_options)
                    report({"section": "step", "model": name, "variant": variant.name, "rate": rate})
                except Exception as err:  # one model's failure (out of memory, a compile error) is a row
                    report({"section": "step", "model": name, "variant": variant.name, "error": _first_line(err)})
                if device.type == "cuda":
                    torch.cuda.empty_cache()


# --- loader --------------------------------------------------------------------------------------------------


def build_jpeg_shards(p: Profile, root: Path) -> Path:
    """The shapes generator at the step's image size, resized to JPEG and sharded by the stages' own code."""
    from stages.common.parallel import SERIAL, ParallelConfig
    from stages.common.params import parse
    from stages.datasets import manifest, shapes
    from stages.resize import ResizeConfig, run_resize
    from stages.shard import ShardConfig, run_shard

    parallel = ParallelConfig(runner="processes", workers=0, address=None, items_per_task=64) \
        if p.device == "cuda" else SERIAL
    cfg = parse(shapes.Config, "dataset.shapes", dict(
        seed=0, image_size=p.image_size, min_objects=2, max_objects=5, train_queries=p.train_queries,
        test_queries=16, novel_queries=16, novel_combos=4, queries_per_reference=8))
    images, queries = shapes.build(cfg, root / "prepared", parallel=parallel)
    manifest.write(root / "prepared", images, queries)
    run_resize(root / "prepared", root / "resized", parse(ResizeConfig, "resize", dict(
        size=p.image_size, mode="center_crop", pad_value=0, format="jpeg", jpeg_quality=90)), parallel)
    run_shard(root / "resized", root / "shards", parse(ShardConfig, "shard", dict(
        maxcount=max(p.batch, p.train_queries // 16), maxsize=10**9)), parallel)
    return root / "shards"


def synced(batches, device):
    """The batches, each one finished on a CUDA device before it is handed on (the GPU decodes asynchronously)."""
    import torch

    try:
        for batch in batches:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            yield batch
    finally:
        batches.close()


def run_loader(p: Profile, report, deadline: float, tmp: Path) -> None:
    import torch

    from bench_loader import time_loader
    from stages.modeling.vocab import Vocab
    from stages.shards.loaders import decode_device, texts, training_batches
    from train_step import samples_per_s

    began = time.perf_counter()
    shards = build_jpeg_shards(p, tmp)
    report({"section": "loader", "what": "data", "seconds": time.perf_counter() - began,
            "queries": p.train_queries})
    device = torch.device(p.device)  # the GPU side: cuda, or the CPU in the dry run
    on_gpu = decode_device("cuda", device, shards, "train", "queries") if device.type == "cuda" else device
    decode_sides = (("cpu", None), ("gpu", on_gpu))
    for workers in p.loader_workers:
        for label, decode_on in decode_sides:
            batches = training_batches(shards, "train", p.batch, 4 * p.batch, 0, workers,
                                       pin_memory=device.type == "cuda", decode_on=decode_on)
            try:  # bench_loader's timing: samples/s over loader_batches batches after an untimed first one
                rate = time_loader(label, synced(batches, device), workers, p.loader_batches).rate
                report({"section": "loader", "decode": label, "workers": workers, "rate": rate})
            except Exception as err:
                report({"section": "loader", "decode": label, "workers": workers, "error": _first_line(err)})

    args, (base_model, base_loss, loop), _, _, _ = step_setup(p)
    vocab = Vocab.build(list(texts(shards, "train")))
    fast = next(v for v in step_variants(device) if v.name == "fast")
    workers = max(p.loader_workers)
    for label, decode_on in decode_sides:
        if time.monotonic() > deadline - 10:
            report({"section": "fed", "decode": label, "workers": workers, "error": "over budget"})
            continue
        feed = training_batches(shards, "train", p.batch, 4 * p.batch, 0, workers,
                                pin_memory=device.type == "cuda", decode_on=decode_on)
        try:
            rate = samples_per_s("tirg", fast, args, base_model, base_loss, loop, vocab, {}, device, feed=feed)
            report({"section": "fed", "decode": label, "workers": workers, "rate": rate})
        except Exception as err:
            report({"section": "fed", "decode": label, "workers": workers, "error": _first_line(err)})
        finally:
            feed.close()


# --- top-K ---------------------------------------------------------------------------------------------------


def run_topk(p: Profile, report, deadline: float) -> None:
    import torch

    from bench_topk import synchronize, vectors
    from stages.retrieval.topk import chunked_topk

    q, g = torch.from_numpy(vectors(p.topk_n, p.topk_dim, 1)), torch.from_numpy(vectors(p.topk_n, p.topk_dim, 2))
    device = torch.device(p.device)  # the GPU side: cuda, or the CPU in the dry run
    sides = [("cpu", "cpu", {}), ("gpu", device, {}), ("gpu", device, {"query_chunk": 4096, "gallery_chunk": 16384})]
    reference = None
    for label, where, chunks in sides:
        name = f"{label} {chunks.get('query_chunk', 1024)}x{chunks.get('gallery_chunk', 2048)}"
        if time.monotonic() > deadline - 5:
            report({"section": "topk", "side": name, "error": "over budget"})
            continue
        chunked_topk(q[:256], g[:4096], p.topk_k, device=where, **chunks)  # CUDA context, cuBLAS, kernels: not timed
        synchronize(torch.device(where).type)
        began = time.perf_counter()
        indices = chunked_topk(q, g, p.topk_k, device=where, **chunks)[1]
        synchronize(torch.device(where).type)
        seconds = time.perf_counter() - began
        reference = indices if reference is None else reference
        same = overlap(indices, reference)
        report({"section": "topk", "side": name, "seconds": seconds, "same": same})


def overlap(a, b, rows: int = 4096) -> float:
    """The mean share of each row's top-k indices in `a` that row's in `b` holds too (ties may reorder a row)."""
    shared = sum((a[i:i + rows, :, None] == b[i:i + rows, None, :]).any(2).sum().item()
                 for i in range(0, a.shape[0], rows))
    return shared / a.numel()


# --- the sections' processes ---------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    return text[:160]


def section_main(section: str, p: Profile, rows: mp.Queue, deadline: float, tmp: str) -> None:
    """One section in its own process: rows go to the parent as they are measured."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # train_step, bench_topk
    os.chdir(REPO)
    if sys.platform == "linux":  # a spawned process spawns its children too; the stages' DataLoaders fork theirs
        mp.set_start_method("fork", force=True)
    if hasattr(os, "setpgrp"):  # its own process group: stopped at its budget with its children (compile workers)
        os.setpgrp()
    started = time.monotonic()

    def report(row: dict) -> None:  # `at`: seconds into the section (where its budget goes)
        rows.put({**row, "at": round(time.monotonic() - started, 1)})

    try:
        if section == "step":
            run_step(p, report, deadline)
        elif section == "loader":
            run_loader(p, report, deadline, Path(tmp))
        else:
            run_topk(p, report, deadline)
    except Exception:
        report({"section": section, "what": "crash", "error": traceback.format_exc()})
    report({"section": section, "what": "end"})


def run_section(section: str, p: Profile, tmp: Path, on_row) -> list[dict]:
    """Run a section's process until it ends or its budget is spent (then it is stopped); its rows, in order."""
    ctx = mp.get_context("spawn")
    rows_queue = ctx.Queue()
    budget = p.budgets[section]
    deadline = time.monotonic() + budget
    process = ctx.Process(target=section_main, args=(section, p, rows_queue, deadline, str(tmp)))
    process.start()
    rows, ended = [], False
    while not ended:
        try:
            row = rows_queue.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        except queue.Empty:
            if time.monotonic() >= deadline:
                rows.append({"section": section, "what": "budget", "error": f"stopped at its budget of {budget:g} s"})
                on_row(rows[-1])
                break
            if not process.is_alive():
                rows.append({"section": section, "what": "crash", "error": f"exit code {process.exitcode}"})
                on_row(rows[-1])
                break
            continue
        ended = row.get("what") == "end"
        if not ended:
            rows.append(row)
            on_row(row)
    if process.is_alive():
        process.join(5 if ended else 0)
    if process.is_alive():
        _kill(process)
    return rows


def _kill(process) -> None:
    """Stop a section's process and the processes it started (its process group, see section_main)."""
    import signal

    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (AttributeError, ProcessLookupError, PermissionError):
        process.kill()
    process.join()


# --- report --------------------------------------------------------------------------------------------------


def show_row(row: dict) -> None:
    """One line per measurement as it comes (a run stopped by hand still shows what it measured)."""
    detail = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items() if k != "section"}
    print(f"  [{row['section']}] " + " ".join(f"{k}={v}" for k, v in detail.items()), flush=True)


def best_step_rates(rows: list[dict]) -> dict[str, tuple[str, float]]:
    """Each model's fastest measured step: (variant, samples/s)."""
    best: dict[str, tuple[str, float]] = {}
    for row in rows:
        if row["section"] == "step" and "rate" in row and row["rate"] > best.get(row["model"], ("", 0.0))[1]:
            best[row["model"]] = (row["variant"], row["rate"])
    return best


def _cell(row: dict | None, width: int, key: str = "rate", fmt: str = ".1f") -> str:
    if row is None:
        return f"{'-':>{width}}"
    if "error" in row:
        return f"{'over budget' if 'budget' in row['error'] else 'failed':>{width}}"
    return f"{row[key]:>{width}{fmt}}"


def print_tables(p: Profile, rows: list[dict]) -> None:
    if "step" in p.budgets:
        print_step(p, rows)
    if "loader" in p.budgets:
        print_loader(p, rows)
    if "topk" in p.budgets:
        print_topk(p, rows)
    for r in (r for r in rows if r.get("what") in ("crash", "budget")):
        print(f"\n[{r['section']}] {r['error']}")


def _steps(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["model"], r["variant"]): r for r in rows if r["section"] == "step" and "model" in r}


def print_step(p: Profile, rows: list[dict]) -> None:
    step = _steps(rows)
    device = next((r["name"] for r in rows if r.get("what") == "device"), p.device)
    print(f"\n== train step: {device}; {p.image_encoder} {p.image_size} px, batch {p.batch}, {p.warmup} warm-up + "
          f"{p.steps} timed steps; samples/s (queries, or image-caption pairs)")
    print(f"{'model':<14}{'eager':>10}{'fast':>10}{'fast+compile':>14}{'fast/eager':>12}{'compile/eager':>15}")
    for name in p.models:
        e, f, c = (step.get((name, v)) for v in ("plain", "fast", "fast+compile"))
        ratio = lambda a, b: f"{a['rate'] / b['rate']:>{12}.2f}" if a and b and "rate" in a and "rate" in b \
            else f"{'-':>12}"  # noqa: E731
        print(f"{name:<14}{_cell(e, 10)}{_cell(f, 10)}{_cell(c, 14)}{ratio(f, e)}{ratio(c, e):>15}")
    for r in (r for r in rows if r["section"] == "step" and "error" in r and "budget" not in r["error"]):
        print(f"  {r.get('model', '')} {r.get('variant', '')}: {r['error']}")


def print_loader(p: Profile, rows: list[dict]) -> None:
    step, best = _steps(rows), best_step_rates(rows)
    data = next((r for r in rows if r.get("what") == "data"), None)
    print(f"\n== loader: JPEG shards of shapes scenes at {p.image_size} px (quality 90"
          + (f", {data['queries']} train queries built in {data['seconds']:.0f} s" if data else "")
          + f"), batch {p.batch}; images/s, and x each model's best step images/s (>= 1: the loader keeps it fed)"
          + ("; dry run: the gpu side decodes on the CPU" if p.device == "cpu" else ""))
    names = [n for n in p.models if n in best]
    print(f"{'decode':<8}{'workers':>8}{'samples/s':>11}{'images/s':>10}" + "".join(f"{n:>15}" for n in names))
    for r in (r for r in rows if r["section"] == "loader" and "decode" in r):
        line = f"{r['decode']:<8}{r['workers']:>8}{_cell(r, 11)}"
        if "rate" in r:
            images = 2 * r["rate"]
            line += f"{images:>10.0f}" + "".join(
                f"{images / (best[n][1] * IMAGES_PER_SAMPLE[n]):>15.2f}" for n in names)
        print(line)
    fed = [r for r in rows if r["section"] == "fed"]
    if fed:
        tirg = step.get(("tirg", "fast"))
        print(f"tirg fast step fed by the loader (pre-loaded: {_cell(tirg, 0).strip()} samples/s):")
        for r in fed:
            of = f"  {r['rate'] / tirg['rate']:.2f}x the pre-loaded step" if "rate" in r and tirg and "rate" in tirg \
                else ""
            print(f"  decode {r['decode']:<4} {r['workers']} workers: {_cell(r, 0).strip()} samples/s{of}")


def print_topk(p: Profile, rows: list[dict]) -> None:
    topk = [r for r in rows if r["section"] == "topk" and "side" in r]
    print(f"\n== top-K: stages.retrieval.chunked_topk, {p.topk_n} x {p.topk_n}, d {p.topk_dim}, k {p.topk_k}"
          + (" (dry run: the gpu side runs on the CPU)" if p.device == "cpu" else ""))
    cpu = next((r for r in topk if r["side"].startswith("cpu") and "seconds" in r), None)
    print(f"{'side (chunks)':<22}{'seconds':>9}{'x cpu':>8}{'same top-k':>12}")
    for r in topk:
        x = f"{cpu['seconds'] / r['seconds']:>8.1f}" if cpu and "seconds" in r else f"{'-':>8}"
        print(f"{r['side']:<22}{_cell(r, 9, 'seconds', '.2f')}{x}{_cell(r, 12, 'same', '.3f')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], required=True,
                        help="cuda: the GPU run; cpu: the dry run at tiny sizes")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    for section in SECTIONS:
        parser.add_argument(f"--budget-{section}", type=float, metavar="S", help=f"seconds for {section}")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--image-encoder", choices=["small_cnn", "resnet18", "resnet50"],
                        help="default: resnet50 on cuda, small_cnn on cpu (random init either way)")
    parser.add_argument("--json", type=Path, help="also write every measured row to this file")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (the dry run is --device cpu)")
    models = tuple(n.strip() for n in args.models.split(",") if n.strip())
    unknown = [n for n in models if n not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {', '.join(unknown) or '(none given)'} (have {', '.join(MODELS)})")
    p = profile(args.device, os.cpu_count() or 1)
    budgets = {s: getattr(args, f"budget_{s}") or p.budgets[s] for s in args.sections}
    p = dataclasses.replace(p, budgets=budgets, image_encoder=args.image_encoder or p.image_encoder, models=models)
    print(f"gpu suite, device {args.device}: torch {torch.__version__}, {os.cpu_count()} CPU cores; budgets "
          + ", ".join(f"{s} {b:g} s" for s, b in budgets.items()) + f" (at most {sum(budgets.values()):g} s)",
          flush=True)
    began, rows = time.perf_counter(), []
    tmp = Path(tempfile.mkdtemp(prefix="gpu_suite-"))
    try:
        for section in args.sections:
            print(f"{section} ...", flush=True)
            started = time.perf_counter()
            rows += run_section(section, p, tmp, show_row)
            print(f"{section}: {time.perf_counter() - started:.0f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_tables(p, rows)
    print(f"\nsuite: {time.perf_counter() - began:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"profile": dataclasses.asdict(p), "rows": rows}, indent=1))
    failed = [r for r in rows if "error" in r and "budget" not in r["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
