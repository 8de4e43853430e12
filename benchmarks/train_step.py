"""Training-step samples/s of every model, plain vs the fast path (bf16 autocast, channels_last, pinned host
batch + non-blocking copy) and optionally torch.compile, in one sitting.

    python benchmarks/train_step.py [--models tirg,val,...] [--steps 20] [--warmup 3] [--batch 64]
                                    [--image-encoder small_cnn|resnet18|resnet50] [--image-size 64]
                                    [--device auto|cpu|cuda] [--compile] [--cpu-bf16]
    # GPU:  python benchmarks/train_step.py --image-encoder resnet50 --image-size 224 --batch 32 --compile

Per model (params.yaml `model` section with `model.name` and `model.image.encoder` switched; weights never
read, random init) one step = host batch -> device, loss, backward, optimiser step (params `pretrain`
optimiser), plus what `stages.training.loop.fit` does each step (the isfinite check and `loss.item()`). The loss
is stages.training.objectives.training_loss with the model's own loss (bbc; val_matching for val, amc for amc), or
matching_loss with nce for the dual_encoder. The batch is synthetic: random normal images, random texts
from a small word list; the same batch every step.

Variants (the toggles are set here, not by device):
    plain         fp32, contiguous, pageable host batch, blocking copy, eager
    fast          bf16 autocast + channels_last (model and images) + pinned host batch + non_blocking copy
    fast+compile  fast, with every top-level submodule of the model torch.compile'd (--compile)
    compile       plain + torch.compile (CPU with --compile)
On CUDA: plain, fast, (fast+compile). On the CPU: plain, (compile), and with --cpu-bf16 also fast and
(fast+compile); pinned memory and non_blocking need an accelerator and are off there.

training_loss / matching_loss call stages.common.device's `autocast` and `to_device`, which switch bf16 and
channels_last on by device (always on on CUDA). For a clean plain-vs-fast comparison this benchmark swaps
those two names inside stages.training.objectives for the variant's explicit toggles while it runs (the loss code
itself is unchanged); it fails loudly if stages.training.objectives no longer has them.

The model is compiled module by module (nn.Module.compile on each child), because the stages call
encode_reference / compose / encode_image, not forward: compiling the top-level model would change
nothing. Dynamo does not trace nn.LSTM (a graph break): the LSTM text encoders stay eager. Warm-up steps
(compilation happens there) are not timed; CUDA is synchronised around the timed steps. The host batch is
pinned once before the steps, as a DataLoader's pin thread would hand it over: pinning is not timed, the
copy is. "plain" keeps torch's defaults otherwise (cuDNN may use TF32 for convolutions, matmuls are full
fp32; cudnn.benchmark off, as in the stages). Samples/s are queries (or image-caption pairs) per second;
"x plain" is the ratio to the plain row of the same model.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import random
import time
from collections.abc import Iterator
from unittest import mock

import torch
from torch import nn

from stages.training import objectives
from stages.modeling.factory import ModelConfig, build_model
from stages.training.objectives import LossConfig, matching_loss, training_loss
from stages.common.params import load
from stages.training.loop import LoopConfig, compile_model, make_optimizer
from stages.common.device import pick_device
from stages.modeling.vocab import Vocab

LOSS_OF = {"tirg": "bbc", "tirg_lastconv": "bbc", "composeae": "bbc", "val": "val_matching", "amc": "amc",
           "dual_encoder": "nce"}
WORDS = ["add", "remove", "make", "the", "a", "small", "large", "red", "blue", "green", "circle", "square",
         "triangle", "at", "top", "bottom", "left", "right", "center", "darker", "longer", "sleeves", "with"]


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    bf16: bool = False
    channels_last: bool = False
    pinned: bool = False
    non_blocking: bool = False
    compile: bool = False


def variants(device: torch.device, compile: bool, cpu_bf16: bool) -> list[Variant]:
    cuda = device.type == "cuda"
    fast = dict(bf16=True, channels_last=True, pinned=cuda, non_blocking=cuda)
    chosen = [Variant("plain")]
    if not cuda and compile:
        chosen.append(Variant("compile", compile=True))
    if cuda or cpu_bf16:
        chosen.append(Variant("fast", **fast))
        if compile:
            chosen.append(Variant("fast+compile", **fast, compile=True))
    return chosen


def random_texts(n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def host_batch(model_name: str, batch: int, size: int, texts: list[str], seed: int) -> dict:
    """A batch as stages.shards.loaders collates it (queries, or image-caption pairs for the dual encoder)."""
    g = torch.Generator().manual_seed(seed)
    image = lambda: torch.randn(batch, 3, size, size, generator=g)  # noqa: E731
    if model_name == "dual_encoder":
        ids = [f"image{i}" for i in range(batch)]
        return {"image": image(), "text": texts, "image_id": ids, "caption_id": ids}
    return {"ref": image(), "tgt": image(), "text": texts,
            "query_id": [f"q{i}" for i in range(batch)], "target_id": [f"t{i}" for i in range(batch)]}


IMAGE_KEYS = ("ref", "tgt", "image")


def pin(batch: dict) -> dict:
    """What a DataLoader with pin_memory=True hands over: the image tensors in page-locked memory."""
    return {k: v.pin_memory() if k in IMAGE_KEYS else v for k, v in batch.items()}


def copy_to(batch: dict, device: torch.device, non_blocking: bool) -> dict:
    return {k: v.to(device, non_blocking=non_blocking) if k in IMAGE_KEYS else v for k, v in batch.items()}


@contextlib.contextmanager
def toggles(variant: Variant):
    """The variant's autocast and image placement in place of stages.common.device's device-driven ones, inside
    stages.training.objectives (mock.patch.object raises if the names are gone)."""
    def autocast(device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16)

    def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
        images = images.to(device, non_blocking=variant.non_blocking)
        return images.contiguous(memory_format=torch.channels_last) if variant.channels_last else images

    with mock.patch.object(objectives, "autocast", autocast), mock.patch.object(objectives, "to_device", to_device):
        yield


def model_config(base: ModelConfig, name: str, image_encoder: str) -> ModelConfig:
    image = dataclasses.replace(base.image, encoder=image_encoder, weights=None)
    return dataclasses.replace(base, name=name, image=image)


def samples_per_s(name: str, variant: Variant, args, base_model: ModelConfig, base_loss: LossConfig,
                  loop: LoopConfig, vocab: Vocab, batch: dict, device: torch.device,
                  feed: Iterator[dict] | None = None, compile_options: dict | None = None) -> float:
    """Samples/s of `args.steps` steps after `args.warmup`, each on `batch`, or with `feed` on the next batch it
    gives (a loader's: pinned or already on the device as it made them). compile_options: torch.compile's."""
    torch.manual_seed(0)
    model = build_model(model_config(base_model, name, args.image_encoder), len(vocab), args.image_size,
                        load_weights=False).to(device)
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if variant.compile:
        torch._dynamo.reset()  # a fresh cache per model: no recompile limit carried over from the last one
        compile_model(model, **(compile_options or {}))  # what pretrain/train do with `compile: true`
    loss_cfg = dataclasses.replace(base_loss, name=LOSS_OF[name])
    optimizer, _ = make_optimizer(model, loop)
    if variant.pinned and feed is None:
        batch = pin(batch)

    def loss_of(model, on_device):
        if name == "dual_encoder":
            return matching_loss(model, loss_cfg, vocab, on_device, device)[0]
        return training_loss(model, loss_cfg, vocab, on_device, device)[0]

    model.train()
    with toggles(variant):
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                graphs = compiled_graphs()
                began = time.perf_counter()
            loss = loss_of(model, copy_to(batch if feed is None else next(feed), device, variant.non_blocking))
            if not torch.isfinite(loss):  # as fit does: one sync per step
                raise FloatingPointError(f"{name} {variant.name}: loss {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rate = args.steps * args.batch / (time.perf_counter() - began)
    if compiled_graphs() != graphs:
        print(f"{name} {variant.name}: compiled again during the timed steps, its rate includes compilation "
              f"(more --warmup steps)", flush=True)
    return rate


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (Dynamo's counter)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(LOSS_OF), help=f"comma-separated, of {', '.join(LOSS_OF)}")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model and variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them (compilation)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64, help="image side (resize.size of the default data)")
    parser.add_argument("--image-encoder", choices=["small_cnn", "resnet18", "resnet50"],
                        help="default: params.yaml model.image.encoder (random init either way)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile variants")
    parser.add_argument("--cpu-bf16", action="store_true", help="on the CPU, also run fast (bf16 autocast)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if unknown := [n for n in names if n not in LOSS_OF]:
        parser.error(f"--models: unknown {', '.join(unknown)} (have {', '.join(LOSS_OF)})")
    if args.steps < 1 or args.warmup < 1 or args.batch < 2:
        parser.error("--steps and --warmup need at least 1, --batch at least 2")

    base_model, base_loss, loop = load(ModelConfig, "model"), load(LossConfig, "loss"), load(LoopConfig, "pretrain")
    args.image_encoder = args.image_encoder or base_model.image.encoder
    device = pick_device(args.device)
    texts = random_texts(args.batch, random.Random(0))
    vocab = Vocab.build(texts)
    chosen = variants(device, args.compile, args.cpu_bf16)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device {device} ({where}), torch {torch.__version__}; {args.image_encoder} {args.image_size}px, "
          f"batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps, optimiser {loop.optimizer}")
    for v in chosen:
        on = [k for k in ("bf16", "channels_last", "pinned", "non_blocking", "compile") if getattr(v, k)]
        print(f"  {v.name:<13} {' + '.join(on) or 'fp32, contiguous, pageable, blocking, eager'}")
    print()
    print(f"{'model':<14}{'loss':<14}{'variant':<14}{'samples/s':>10}{'x plain':>9}")
    for name in names:
        batch = host_batch(name, args.batch, args.image_size, texts, seed=0)
        plain = None
        for v in chosen:
            rate = samples_per_s(name, v, args, base_model, base_loss, loop, vocab, batch, device)
            plain = plain or rate
            print(f"{name:<14}{LOSS_OF[name]:<14}{v.name:<14}{rate:>10.1f}{rate / plain:>9.2f}", flush=True)
    if len(chosen) == 1:
        print("\n(only plain on the CPU: add --compile and/or --cpu-bf16 for a comparison)")


if __name__ == "__main__":
    main()
