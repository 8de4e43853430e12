"""A training stage killed with SIGKILL at a random step (between checkpoints) and run again ends with the bytes of an
uninterrupted run: pretrain and train, composed and matching (AOQ), shuffled and per_iteration sampling, DataLoader
workers 0 and 2, with EMA, model selection, validation and GA on.

Each case runs the real stage module in a subprocess three times: uninterrupted into one output folder; then into
another, killed (its whole process group, DataLoader workers too) once the live curves show the chosen step; then
again, which resumes from the last checkpoint. The two model files must have the same sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_inprocess import pretrained, write_params

STEPS, CHECKPOINT_EVERY = 24, 5
LOOP = {"steps": STEPS, "checkpoint_every": CHECKPOINT_EVERY, "log_every": 1, "device": "cpu", "batch_size": 8}
COMPOSED = {"dataset": {"shapes": {"image_size": 32, "train_queries": 96, "test_queries": 16, "novel_queries": 16,
                                   "val_queries": 16, "val_gallery_size": 32}},
            "resize": {"size": 24}, "shard": {"maxcount": 30},
            "model": {"embed_dim": 16, "image": {"channels": [8, 8]}, "text": {"embed_dim": 8, "hidden_dim": 8}}}
MATCHING = {"dataset": {"name": "shapes_captions",
                        "shapes_captions": {"image_size": 32, "train_images": 40, "val_images": 12, "test_images": 12,
                                            "novel_images": 8, "folds": 2}},
            "resize": {"size": 24}, "shard": {"maxcount": 15},
            "model": {"embed_dim": 16, "image": {"channels": [8, 8]}, "text": {"embed_dim": 8, "hidden_dim": 8}},
            "mine": {"aoq_i2t_k": 20, "aoq_t2i_k": 10}}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stage(name: str, root: Path, params: Path, out: str) -> list[str]:
    args = {"pretrain": ["--shards", "shards", "--vocab", "vocab"],
            "train": ["--init", "pretrain/model.pt", "--shards", "shards", "--mined", "mined"]}[name]
    return [sys.executable, "-m", f"stages.{name}", "--params", str(params), *args, "--out", out,
            "--live", f"live-{out}", "--metrics", f"{out}.json"]


def run_to_end(cmd: list[str], root: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def run_and_kill(cmd: list[str], root: Path, live: Path, at_step: int) -> None:
    """Start the stage in its own process group and SIGKILL the group once its curves have reached `at_step`."""
    process = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    loss = live / "plots" / "metrics" / "loss.tsv"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"the stage ended (code {process.returncode}) before step {at_step}: "
                                     f"{process.stderr.read()}")
            rows = loss.read_text().splitlines()[1:] if loss.exists() else []
            if rows and int(rows[-1].split("\t")[0]) >= at_step:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return
            time.sleep(0.01)
        raise AssertionError(f"step {at_step} not reached in 300 s")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def killed_and_resumed(name: str, root: Path, params: Path, label: str) -> dict:
    """sha256 of the model of an uninterrupted run and of a run killed at a random step and resumed."""
    at_step = random.Random(label).choice([s for s in range(CHECKPOINT_EVERY + 1, STEPS - 4) if s % CHECKPOINT_EVERY])
    run_to_end(stage(name, root, params, f"{label}-whole"), root)
    run_and_kill(stage(name, root, params, f"{label}-killed"), root, root / f"live-{label}-killed", at_step)
    assert not (root / f"{label}-killed").exists()  # nothing half-written in place
    resumed = run_to_end(stage(name, root, params, f"{label}-killed"), root)
    assert f"{name}: resuming at step " in resumed.stdout
    metrics = json.loads((root / f"{label}-killed.json").read_text())["provenance"]
    assert metrics["resumed"] is True and 0 < metrics["resumed_from_step"] <= at_step
    whole = json.loads((root / f"{label}-whole.json").read_text())["provenance"]
    assert whole["resumed"] is False and whole["resumed_from_step"] is None
    assert (root / f"live-{label}-killed" / "plots/metrics/loss.tsv").read_text() == \
        (root / f"live-{label}-whole" / "plots/metrics/loss.tsv").read_text()
    return {"whole": sha256(root / f"{label}-whole" / "model.pt"),
            "resumed": sha256(root / f"{label}-killed" / "model.pt"), "at_step": at_step}


def pretrained_and_mined(root: Path, dataset_changes: dict) -> Path:
    """Shards, vocabulary, a model pretrained for 10 steps and what `mine` draws from it, in `root`."""
    from stages import mine

    params = write_params(root, **dataset_changes, pretrain={**LOOP, "steps": 10, "workers": 0, "eval_every": 0})
    model = pretrained(root, params)
    mine.main(["--params", str(params), "--model", str(model), "--shards", str(root / "shards"),
               "--out", str(root / "mined")])
    return root


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """Shapes shards, a pretrained TIRG and its mined negatives (the train cases start from them)."""
    return pretrained_and_mined(tmp_path_factory.mktemp("composed"), COMPOSED)


@pytest.fixture(scope="module")
def matching(tmp_path_factory):
    """Shapes captions shards, a dual encoder pretrained with InfoNCE and its AOQ candidates."""
    return pretrained_and_mined(tmp_path_factory.mktemp("matching"), MATCHING)


CASES = {
    # shuffled queries through 2 DataLoader workers (the shuffle buffer spans shards), GA's two terms, an EMA of
    # the weights, validation every 4 steps
    "pretrain_shuffled_workers2_ga_ema": ("pretrain", {
        "pretrain": {**LOOP, "workers": 2, "shuffle_buffer": 40, "ema_decay": 0.9, "eval_every": 4},
        "ga": {"adversarial": True, "isotropic": True}}),
    # TIRG's per-iteration draws, in-process, keeping the best validated weights
    "pretrain_per_iteration_workers0_selection": ("pretrain", {
        "pretrain": {**LOOP, "workers": 0, "pair_sampling": "per_iteration", "eval_every": 3, "selection": "val_r1"}}),
    # fine-tuning with drawn mined negatives (their own random stream) and GA's isotropic noise
    "train_offline_negatives_workers2": ("train", {
        "train": {**LOOP, "workers": 2, "shuffle_buffer": 40, "eval_every": 6, "offline_negatives": True},
        "ga": {"isotropic": True}}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_killed_composed_run_resumes_to_the_bytes_of_an_uninterrupted_one(composed, case):
    name, changes = CASES[case]
    params = write_params(composed, **COMPOSED, **changes,
                          **({} if name == "pretrain" else {"pretrain": {**LOOP, "steps": 10, "workers": 0,
                                                                         "eval_every": 0}}))
    result = killed_and_resumed(name, composed, params, case)
    assert result["resumed"] == result["whole"], f"killed at step {result['at_step']}"


def test_a_killed_aoq_matching_run_resumes_to_the_bytes_of_an_uninterrupted_one(matching):
    """AOQ: shuffled (image, caption) pairs through 2 workers, offline negatives drawn from the mined candidates,
    the adaptive quintuplet loss, validation with selection of the best rsum."""
    params = write_params(matching, **MATCHING,
                          pretrain={**LOOP, "steps": 10, "workers": 0, "eval_every": 0},
                          loss={"name": "vse", "aoq_variant": "adaptive_quintuplet"},
                          train={**LOOP, "workers": 2, "shuffle_buffer": 40, "offline_negatives": True,
                                 "aoq_candidate_range": 5, "optimizer": "adam", "lr": 1e-3, "eval_every": 4,
                                 "selection": "val_rsum"})
    result = killed_and_resumed("train", matching, params, "train_aoq")
    assert result["resumed"] == result["whole"], f"killed at step {result['at_step']}"
