"""Shard and load: does the training data pipeline keep a training step of the default model fed?

    python benchmarks/bench_loader.py [--batches N] [--workers 1 2] [--steps 20] [--batch B] [--reuse DIR]

Side A reads the train query shards through stages.shards.loaders.training_batches (WebDataset: shard shuffle,
json decode, sample shuffle with pretrain.shuffle_buffer, PNG decode + normalise, batches; a DataLoader with
`workers` processes), as `pretrain` does. Side B is what baseline research code would write: a
torch.utils.data.Dataset over the resized folder + queries.parquet (one query = open the reference file and
the target file with PIL, the same normalisation as stages.shards.loaders.decode_image) in a
DataLoader(shuffle=True, drop_last=True). Same batch size (pretrain.batch_size), same number of samples,
1 and 2 workers (0 = in-process, also accepted). Each side's first batch (worker start-up) is not timed.
By default one epoch of batches is timed: A's shuffle buffer reads ahead (two samples per batch sample) until
it holds pretrain.shuffle_buffer samples, then drains at the epoch end, so a short run from an epoch's start
understates A; over an epoch it averages out as in training. Each epoch is a new DataLoader iterator with
new workers (on both sides): one epoch change falls in the timed run, as it does once an epoch in training.

The train step is one pretrain step (forward + backward + optimiser step, GA when params switch it on) of
the default model (params.yaml `model`, `loss`, `pretrain`: TIRG, small_cnn, bbc, SGD), built the way
stages/pretrain.py builds it (vocabulary stage's output, image size from the shards, pretrain.device), on a
few batches loaded beforehand: no loading in the timed loop. "fed by A" runs the same steps pulling each
batch from side A, i.e. the pretrain loop as it runs.

The loader keeps the step fed when its samples/s are at least the train step's. On a machine with few cores
(2 here) the loader workers and the train step compete for the same cores: the standalone rates overstate
what both get at once, so the "fed by A" rows are the figure that counts; a fed rate well under the
pre-loaded rate means the step waits on data (or loses cores to the workers).

Data: the default dataset (params.yaml `dataset`) is built into a temporary directory by the real stages
(prepare -> resize -> shard, then vocabulary), removed at the end; --reuse DIR takes DIR/resized and
DIR/shards instead (e.g. --reuse data after `dvc repro`).
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from stages.datasets import manifest
from stages.shards import store
from stages.shards.loaders import decode_image, training_batches
from stages.modeling.factory import ModelConfig, build_model
from stages.training.objectives import GAConfig, LossConfig, isotropic_noise, training_loss
from stages.common.parallel import ParallelConfig
from stages.common.params import load
from stages.prepare import prepare
from stages.pretrain import image_size_of
from stages.resize import ResizeConfig, run_resize
from stages.shard import ShardConfig, run_shard
from stages.modeling.text import training_text
from stages.training.loop import LoopConfig, make_optimizer, seed_everything
from stages.common.device import pick_device, place_model
from stages.vocabulary import VocabularyConfig
from stages.vocabulary import build as build_vocabulary

SPLIT = "train"


@dataclass(frozen=True)
class Measurement:
    what: str
    workers: int | None  # None: no loader (pre-loaded batches)
    samples: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.samples / self.seconds


# --- data ----------------------------------------------------------------------------------------


def resize_images(prepared: Path, out: Path) -> None:
    """The `resize` stage with params.yaml's `resize` and `parallel` sections (adapt here if run_resize changes)."""
    run_resize(prepared, out, load(ResizeConfig, "resize"), load(ParallelConfig, "parallel"))


def shard_images(resized: Path, out: Path) -> None:
    """The `shard` stage with params.yaml's `shard` and `parallel` sections."""
    run_shard(resized, out, load(ShardConfig, "shard"), load(ParallelConfig, "parallel"))


def build_data(root: Path) -> tuple[Path, Path]:
    """(resized, shards) of the default dataset, made by the real stages under `root`."""
    prepare(root / "prepared")
    resize_images(root / "prepared", root / "resized")
    shard_images(root / "resized", root / "shards")
    return root / "resized", root / "shards"


# --- side B: one file per image ------------------------------------------------------------------


class QueryFolder(Dataset):
    """The queries of one split, read file by file from the resized folder: the research-code baseline."""

    def __init__(self, resized: Path, split: str):
        images, queries = manifest.read(resized)
        self.root = Path(resized)
        self.path_of = dict(zip(images.column("image_id").to_pylist(), images.column("path").to_pylist()))
        self.queries = [q for q in queries.to_pylist() if q["split"] == split]

    def __len__(self) -> int:
        return len(self.queries)

    def image(self, image_id: str) -> torch.Tensor:
        return decode_image((self.root / self.path_of[image_id]).read_bytes())  # the loaders' normalisation

    def __getitem__(self, i: int) -> dict:
        q = self.queries[i]
        return {"ref": self.image(q["reference_id"]), "tgt": self.image(q["target_id"]), "text": q["text"],
                "query_id": q["query_id"], "target_id": q["target_id"]}


def folder_batches(resized: Path, batch: int, seed: int, workers: int) -> Iterator[dict]:
    """Endless shuffled batches of QueryFolder, a new DataLoader iterator (and workers) each epoch."""
    loader = DataLoader(QueryFolder(resized, SPLIT), batch_size=batch, shuffle=True, drop_last=True,
                        num_workers=workers, generator=torch.Generator().manual_seed(seed))
    while True:
        yield from loader


# --- timing --------------------------------------------------------------------------------------


def time_loader(what: str, batches: Iterator[dict], workers: int, count: int) -> Measurement:
    """Samples/s over `count` batches after one untimed batch; closes the generator (stops its workers)."""
    try:
        next(batches)
        began, samples = time.perf_counter(), 0
        for batch in itertools.islice(batches, count):
            samples += len(batch["text"])
        return Measurement(what, workers, samples, time.perf_counter() - began)
    finally:
        batches.close()


class TrainStep:
    """One pretrain step of the default model, as stages/pretrain.py and stages.training.fit run it."""

    def __init__(self, shard_dir: Path, vocab_dir: Path, device: str | None):
        self.model_cfg, self.cfg = load(ModelConfig, "model"), load(LoopConfig, "pretrain")
        loss_cfg, ga = load(LossConfig, "loss"), load(GAConfig, "ga")
        self.model_cfg.check_task("composed")
        loss_cfg.check_model(self.model_cfg.name, self.cfg.batch_size, "pretrain")
        self.loss_name = loss_cfg.name
        seed_everything(self.cfg.seed)
        tokenizer, word_vectors = training_text(self.model_cfg.text.encoder, vocab_dir)
        self.image_size = image_size_of(shard_dir, SPLIT)
        self.device = pick_device(device or self.cfg.device)
        self.model = place_model(build_model(self.model_cfg, len(tokenizer), self.image_size,
                                             word_vectors=word_vectors), self.device)

        def step(model, batch):
            loss, _, _, logs = training_loss(model, loss_cfg, tokenizer, batch, self.device, ga)
            return loss, logs

        self.step_fn, self.after_backward = step, isotropic_noise(ga, self.cfg.seed)
        self.optimizer, self.scheduler = make_optimizer(self.model, self.cfg)
        self.model.train()

    def describe(self) -> str:
        return (f"{self.model_cfg.name}, {self.loss_name}, {self.model_cfg.image.encoder} {self.image_size}px, "
                f"{self.device}")

    def run(self, batch: dict) -> int:
        loss, _ = self.step_fn(self.model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train step: loss became {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.after_backward is not None:
            self.after_backward(self.model)
        self.optimizer.step()
        self.scheduler.step()
        loss.item()
        return len(batch["text"])

    def time(self, what: str, batches: Iterator[dict], workers: int | None, warmup: int, steps: int) -> Measurement:
        """Samples/s over `steps` steps after `warmup` untimed ones."""
        for batch in itertools.islice(batches, warmup):
            self.run(batch)
        self._sync()
        began, samples = time.perf_counter(), 0
        for batch in itertools.islice(batches, steps):
            samples += self.run(batch)
        self._sync()
        return Measurement(what, workers, samples, time.perf_counter() - began)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# --- report --------------------------------------------------------------------------------------


def print_table(rows: list[Measurement]) -> None:
    width = max(len(row.what) for row in rows)
    print(f"{'what':<{width}}  {'workers':>7}  {'samples':>7}  {'seconds':>8}  {'samples/s':>9}")
    for row in rows:
        workers = "-" if row.workers is None else str(row.workers)
        print(f"{row.what:<{width}}  {workers:>7}  {row.samples:>7}  {row.seconds:>8.2f}  {row.rate:>9.0f}")


def print_verdict(shard_rows: list[Measurement], folder_rows: list[Measurement], step: Measurement,
                  fed_rows: list[Measurement]) -> None:
    print()
    print(f"{'workers':>7}  {'A / B':>6}  {'A / step':>8}  {'fed / step':>10}  keeps the step fed")
    for a, b, fed in zip(shard_rows, folder_rows, fed_rows):
        fed_ratio = fed.rate / step.rate
        verdict = "yes" if a.rate >= step.rate else "no"
        print(f"{a.workers:>7}  {a.rate / b.rate:>5.2f}x  {a.rate / step.rate:>7.2f}x  {fed_ratio:>9.2f}x  "
              f"{verdict} (standalone); fed step at {fed_ratio:.0%} of the pre-loaded step")


def run(resized: Path, shard_dir: Path, vocab_dir: Path, args) -> None:
    cfg = load(LoopConfig, "pretrain")
    batch, seed, buffer = args.batch or cfg.batch_size, cfg.seed, cfg.shuffle_buffer
    build_vocabulary(shard_dir, vocab_dir, load(VocabularyConfig, "vocabulary"))
    queries = store.read_index(shard_dir)["splits"][SPLIT]["queries"]
    args.batches = args.batches or max(1, queries["count"] // batch)
    step = TrainStep(shard_dir, vocab_dir, args.device)
    if step.cfg.batch_size != batch:
        print(f"(train step at batch {batch}, pretrain.batch_size is {step.cfg.batch_size})")
    print(f"split {SPLIT}: {queries['count']} queries in {len(queries['shards'])} shards; batch {batch}, "
          f"shuffle buffer {buffer}, {args.batches} timed batches per loader, {args.steps} timed train steps; "
          f"{torch.get_num_threads()} torch threads", flush=True)

    shard_rows, folder_rows = [], []
    for workers in args.workers:
        shard_rows.append(time_loader("A  shards: training_batches (WebDataset)",
                                      training_batches(shard_dir, SPLIT, batch, buffer, seed, workers),
                                      workers, args.batches))
        folder_rows.append(time_loader("B  folder: Dataset + DataLoader (PIL per file)",
                                       folder_batches(resized, batch, seed, workers), workers, args.batches))
        print(f"  loaders, {workers} workers: A {shard_rows[-1].rate:.0f}, B {folder_rows[-1].rate:.0f} samples/s",
              flush=True)

    preload = training_batches(shard_dir, SPLIT, batch, buffer, seed, 0)
    loaded = list(itertools.islice(preload, min(args.steps + args.warmup, 8)))
    preload.close()
    pre_loaded = step.time(f"train step ({step.describe()}), pre-loaded", itertools.cycle(loaded), None,
                           args.warmup, args.steps)
    fed_rows = []
    for workers in args.workers:
        batches = training_batches(shard_dir, SPLIT, batch, buffer, seed, workers)
        try:
            fed_rows.append(step.time("train step fed by A", batches, workers, args.warmup, args.steps))
        finally:
            batches.close()

    print()
    print_table([row for pair in zip(shard_rows, folder_rows) for row in pair] + [pre_loaded] + fed_rows)
    print_verdict(shard_rows, folder_rows, pre_loaded, fed_rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, help="timed batches per loader (default: one epoch of the split)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader processes (0 = in-process)")
    parser.add_argument("--steps", type=int, default=20, help="timed train steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed train steps before them")
    parser.add_argument("--batch", type=int, help="batch size (default: pretrain.batch_size)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="train step (default: pretrain.device)")
    parser.add_argument("--reuse", type=Path, metavar="DIR",
                        help="take DIR/resized and DIR/shards (e.g. data, after dvc repro) instead of building them")
    args = parser.parse_args(argv)
    if (args.batches is not None and args.batches < 1) or args.steps < 1 or args.warmup < 0 or min(args.workers) < 0:
        parser.error("--batches and --steps need at least 1, --warmup and --workers at least 0")
    with tempfile.TemporaryDirectory(prefix="bench_loader-") as tmp:
        tmp = Path(tmp)
        if args.reuse:
            resized, shard_dir = args.reuse / "resized", args.reuse / "shards"
            for path in (resized / manifest.QUERIES_FILE, shard_dir / store.INDEX_FILE):
                if not path.is_file():
                    parser.error(f"--reuse: {path} is missing")
        else:
            began = time.perf_counter()
            resized, shard_dir = build_data(tmp)
            print(f"built the default dataset (prepare, resize, shard) in {time.perf_counter() - began:.0f} s")
        run(resized, shard_dir, tmp / "vocab", args)


if __name__ == "__main__":
    main()
