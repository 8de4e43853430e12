"""Data-parallel training (stages.common.distributed): two gloo processes on 127.0.0.1 against one process."""
import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from stages.common.errors import StageError
from stages.training.objectives import LossConfig, matching_loss, training_loss
from stages.common.params import parse
from stages.training.loop import LoopConfig, fit
from stages.modeling.vocab import Vocab
from tiny_repo import TINY, copy_repository, merge, model_params, run

PARAMS = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
WORDS = "make it red blue add a small cube sphere left right remove the large".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch(task: str, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(3)
    texts = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (4,), generator=g).tolist()) for _ in range(size)]
    if task == "matching":  # two captions of image 0 in the batch: same-image masking across ranks
        ids = ["img0", "img1", "img2", "img0", "img4", "img5", "img6", "img7"][:size]
        return {"image": torch.randn(size, 3, 32, 32, generator=g), "text": texts, "image_id": ids,
                "caption_id": [f"c{i}" for i in range(size)]}
    return {"ref": torch.randn(size, 3, 32, 32, generator=g), "tgt": torch.randn(size, 3, 32, 32, generator=g),
            "text": texts, "query_id": [f"q{i}" for i in range(size)], "target_id": [f"t{i}" for i in range(size)]}


def rows(batch: dict, start: int, stop: int) -> dict:
    return {k: v[start:stop] for k, v in batch.items()}


def build(task: str):
    from stages.modeling.factory import ModelConfig, build_model

    torch.manual_seed(0)
    name, loss = ("dual_encoder", "nce") if task == "matching" else ("tirg", "bbc")
    cfg = parse(ModelConfig, "model", model_params(name=name, embed_dim=16, image={"channels": [8, 16]},
                                                   text={"embed_dim": 8, "hidden_dim": 8, "dropout": 0.0}))
    vocab = Vocab.build([" ".join(WORDS)])
    model = build_model(cfg, len(vocab), 32)
    for module in model.modules():  # per-process BatchNorm statistics would differ from the whole batch's:
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):  # keep them in eval mode through fit()
            module.eval()
            module.train = types.MethodType(lambda self, mode=True: self, module)
    return model, vocab, parse(LossConfig, "loss", {**PARAMS["loss"], "name": loss})


def loop(steps: int, checkpoint_every: int = 100) -> LoopConfig:
    return parse(LoopConfig, "pretrain", {**PARAMS["pretrain"], "steps": steps, "batch_size": 8, "lr": 0.1,
                                          "checkpoint_every": checkpoint_every, "log_every": 1, "device": "cpu",
                                          "workers": 0})


def step_fn(task, vocab, loss_cfg):
    def step(model, batch):
        if task == "matching":
            return matching_loss(model, loss_cfg, vocab, batch, torch.device("cpu"))
        loss, _, _, logs = training_loss(model, loss_cfg, vocab, batch, torch.device("cpu"))
        return loss, logs
    return step


def train_steps(task: str, work: Path, batches, steps: int) -> dict:
    model, vocab, loss_cfg = build(task)
    fit(model, iter(batches), step_fn(task, vocab, loss_cfg), loop(steps), work, "test")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rank(rank: int, world: int, port: int, task: str, work: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        per_rank = 8 // world
        batches = [rows(global_batch(task), rank * per_rank, (rank + 1) * per_rank)] * 3
        state = train_steps(task, Path(work), batches, 3)
        torch.save(state, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("task", ["composed", "matching"])
def test_two_processes_take_the_steps_of_one_process_with_the_whole_batch(task, tmp_path):
    # same global batch: rank r holds rows [4r, 4r + 4); in-batch losses see all 8 rows (across_ranks)
    mp.start_processes(_rank, args=(2, free_port(), task, str(tmp_path / "dist"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = train_steps(task, tmp_path / "single", [global_batch(task)] * 3, 3)
    untrained = build(task)[0].state_dict()
    moved = 0
    for key, value in single.items():
        if value.is_floating_point():
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-5, msg=key)
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{key}: the ranks' weights drifted apart"
            moved += not torch.allclose(value, untrained[key])
    assert moved > 10  # the steps changed the weights (the comparison is not between untouched models)


class _Stop(Exception):
    pass


def _crash_after(batches, n):
    for i, batch in enumerate(batches):
        if i == n:
            raise _Stop()
        yield batch


def _resume_rank(rank: int, world: int, port: int, work: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, vocab, loss_cfg = build("composed")
        batch = rows(global_batch("composed"), rank * 4, rank * 4 + 4)
        try:
            fit(model, iter([batch] * 6), step_fn("composed", vocab, loss_cfg), loop(6, 3), Path(work), "test")
        except StageError as error:
            (Path(out) / f"refused{rank}.txt").write_text(str(error))
    finally:
        torch.distributed.destroy_process_group()


def test_a_one_process_checkpoint_is_refused_on_two_processes(tmp_path):
    """Each process's data position and random streams are its own: a checkpoint of one process cannot go on as an
    uninterrupted run on two would, so every rank stops with a message (the stages key their resumable work
    directory by distributed.nproc_per_node too, so they never meet one)."""
    work = tmp_path / "work"
    model, vocab, loss_cfg = build("composed")
    with pytest.raises(_Stop):  # crashes at step 5, after the checkpoint of step 3
        fit(model, _crash_after([global_batch("composed")] * 6, 4), step_fn("composed", vocab, loss_cfg), loop(6, 3),
            work, "test")
    assert torch.load(work / "resume.pt", weights_only=True)["step"] == 3
    mp.start_processes(_resume_rank, args=(2, free_port(), str(work), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        assert "a run on 1 process(es), resumed on 2" in (tmp_path / f"refused{rank}.txt").read_text()
    assert (work / "resume.pt").exists()  # kept for a run on one process


# --- the real stage under torchrun ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """A copy of the repository with tiny params and the stages up to `vocabulary` run."""
    repo = tmp_path_factory.mktemp("dist_repo")
    copy_repository(repo)
    # one query per reference scene: with CSS3D-style siblings (32 per reference, adjacent in the shards) a batch
    # drawn from two rank streams holds fewer siblings than one drawn from one stream, and its loss is lower
    tiny = merge(TINY, {"dataset": {"shapes": {"train_queries": 3000, "queries_per_reference": 1}},
                        "shard": {"maxcount": 50}, "model": {"text": {"dropout": 0.0}}})
    params = merge(yaml.safe_load((repo / "params.yaml").read_text()), tiny)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["stages.prepare", "--out", "data/prepared"], ["stages.resize", "--prepared", "data/prepared", "--out",
                "data/resized"], ["stages.shard", "--resized", "data/resized", "--out", "data/shards"],
                ["stages.vocabulary", "--shards", "data/shards", "--out", "data/vocab"]):
        run([sys.executable, "-m", *cmd], repo)
    return repo


def pretrain(repo: Path, processes: int, out: str) -> list[float]:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["pretrain"].update(steps=30, batch_size=32, log_every=3, lr=0.05, shuffle_buffer=300, workers=0,
                              distributed={"nproc_per_node": processes, "backend": "gloo"})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = run([sys.executable, "-m", "stages.pretrain", "--shards", "data/shards", "--vocab", "data/vocab",
                  "--out", out, "--metrics", f"{out}.json"], repo)
    assert f"on {processes} x cpu" in result.stdout
    assert json.loads((repo / f"{out}.json").read_text())["processes"] == processes
    header, *rows = (repo / out / "live/plots/metrics/loss.tsv").read_text().splitlines()
    column = header.split("\t").index("loss")
    return [float(line.split("\t")[column]) for line in rows]


def test_torchrun_two_processes_follow_the_loss_curve_of_one(tiny_shards):
    one = pretrain(tiny_shards, 1, "data/one")
    two = pretrain(tiny_shards, 2, "data/two")  # relaunched under torchrun, 16 queries per process
    assert len(one) == len(two) == 10
    assert one[-1] < 0.7 * one[0] and two[-1] < 0.7 * two[0]  # both learn
    # different samples (resampled shards per rank) and per-process BatchNorm: equal within noise, not exactly
    for a, b in zip(one, two):
        assert abs(a - b) < 0.1 * one[0], (one, two)
    assert (tiny_shards / "data/two/model.pt").is_file() and not list(tiny_shards.glob("data/.two.partial-*"))


def test_siam_on_several_processes_is_refused_naming_the_keys(tiny_shards):
    params = yaml.safe_load((tiny_shards / "params.yaml").read_text())
    params["train"].update(siam_steps=5, distributed={"nproc_per_node": 2, "backend": "gloo"})
    (tiny_shards / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "stages.train", "--init", "data/none.pt", "--shards", "data/shards",
                             "--mined", "data/mined", "--out", "data/train"], cwd=tiny_shards, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert "train.siam_steps" in result.stderr and "train.distributed.nproc_per_node" in result.stderr
