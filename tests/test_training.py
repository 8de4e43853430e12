import math
import itertools
import shutil
import warnings

import pytest
import torch

from stages.common.params import parse
from stages.common.errors import StageError
from stages.training.loop import LoopConfig, fit

LOOP = dict(seed=0, steps=6, batch_size=4, lr=0.1, momentum=0.9, weight_decay=0.0, lr_decay_every=3,
            lr_decay=0.5, optimizer="sgd", ema_decay=0.0, ema_as_released_every=0, shuffle_buffer=0, pair_sampling="shuffled", workers=0, device="cpu", checkpoint_every=2, log_every=1,
            compile=False, distributed={"nproc_per_node": 1, "backend": "auto"}, text_lr=0.0, lr_schedule="step",
            cosine_t_max=2, clip_grad_norm=0.0, selection="last", eval_every=100, validation_split="auto")


def batches(start: int = 0):
    for step in itertools.count(start):
        g = torch.Generator().manual_seed(step)
        yield {"x": torch.randn(4, 3, generator=g), "y": torch.randn(4, 1, generator=g)}


def regression_step(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]), {}


def fresh_model():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 1)


def test_a_crashed_run_resumes_from_its_checkpoint_and_ends_where_an_unbroken_one_does(tmp_path):
    cfg = parse(LoopConfig, "pretrain", LOOP)
    unbroken = fresh_model()
    fit(unbroken, batches(), regression_step, cfg, tmp_path / "a", "test")

    def crash_at_step_5(model, batch, calls=itertools.count()):
        if next(calls) == 5:
            raise RuntimeError("power cut")
        return regression_step(model, batch)

    work = tmp_path / "b"
    with pytest.raises(RuntimeError, match="power cut"):
        fit(fresh_model(), batches(), crash_at_step_5, cfg, work, "test")
    assert torch.load(work / "resume.pt", weights_only=True)["step"] == 4

    resumed = fresh_model()  # a new process: weights come from the checkpoint, batches go on from step 4
    summary = fit(resumed, batches(start=4), regression_step, cfg, work, "test")
    assert summary["steps"] == 2
    assert not (work / "resume.pt").exists()
    for a, b in zip(unbroken.parameters(), resumed.parameters()):
        assert torch.allclose(a, b)
    logged = (work / "live/plots/metrics/loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in logged[1:]] == ["1", "2", "3", "4", "5", "6"]


def test_a_checkpoint_without_random_streams_or_data_position_is_refused_with_what_to_do(tmp_path):
    """A run crashed under an older cirflow left a resume.pt without the streams: going on from it could not end as
    the uninterrupted run does, so the stage stops and says how to start afresh."""
    cfg = parse(LoopConfig, "pretrain", {**LOOP, "log_every": 1})

    def crash_at_step_5(model, batch, calls=itertools.count()):
        if next(calls) == 5:
            raise RuntimeError("power cut")
        return regression_step(model, batch)

    work = tmp_path / "work"
    with pytest.raises(RuntimeError, match="power cut"):
        fit(fresh_model(), batches(), crash_at_step_5, cfg, work, "test")
    state = torch.load(work / "resume.pt", weights_only=True)
    del state["ranks"]
    torch.save(state, work / "resume.pt")
    with pytest.raises(StageError, match=f"a checkpoint of an older cirflow .* delete {work} to start afresh"):
        fit(fresh_model(), batches(start=4), regression_step, cfg, work, "test")


def test_a_diverging_loss_stops_with_a_clear_error(tmp_path):
    cfg = parse(LoopConfig, "pretrain", LOOP)
    nan_step = lambda model, batch: (model(batch["x"]).sum() * float("nan"), {})
    with pytest.raises(FloatingPointError, match="loss became nan by step 1"):
        fit(fresh_model(), batches(), nan_step, cfg, tmp_path, "test")


def test_compile_model_compiles_every_part_and_keeps_the_outputs_and_weights():
    from stages.modeling.factory import ModelConfig, build_model
    from stages.training.loop import compile_model
    from tiny_repo import model_params

    cfg = parse(ModelConfig, "model", model_params(embed_dim=16, image={"channels": [8, 16]},
                                                   text={"embed_dim": 8, "hidden_dim": 8, "dropout": 0.0}))
    torch.manual_seed(0)
    model = build_model(cfg, 20, 32).eval()
    images, tokens, lengths = torch.randn(2, 3, 32, 32), torch.randint(1, 20, (2, 5)), torch.tensor([5, 3])
    with torch.no_grad():
        before = model.compose(model.encode_reference(images), model.encode_text(tokens, lengths))
        keys = list(model.state_dict())
        compile_model(model, backend="eager")  # the real inductor backend needs minutes on this CPU
        assert all(child._compiled_call_impl is not None for child in model.children()
                   if not isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)))
        after = model.compose(model.encode_reference(images), model.encode_text(tokens, lengths))
    assert list(model.state_dict()) == keys  # checkpoints stay loadable without torch.compile
    torch.testing.assert_close(after, before)


class TwoTowers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

    def tower_parameters(self):
        return list(self.image.parameters()), list(self.text.parameters())


def towers_step(model, batch):
    image, text = model.image(batch["x"]), model.text(batch["x"].flip(1))
    return ((image - text) ** 2).sum() + ((image.sum(1, keepdim=True) - batch["y"]) ** 2).mean(), {}


TWO_TOWERS = {**LOOP, "optimizer": "adam_two_towers", "lr": 1e-2, "text_lr": 1e-3, "weight_decay": 1e-4,
              "lr_schedule": "cosine_per_pass", "cosine_t_max": 2, "clip_grad_norm": 0.5}


def test_two_towers_step_as_the_lightning_1_5_loop_of_the_release(tmp_path):
    """The release (guided-image-retrieval run.py + src/model.py, PyTorch Lightning 1.5): two Adam optimisers,
    training_step called once per optimiser on the same batch, both cosine schedulers stepped inside it, the
    optimiser's own parameters clipped to 30 (0.5 here) and stepped. Written out here by hand."""
    cfg = parse(LoopConfig, "pretrain", TWO_TOWERS)
    fitted = TwoTowers()
    fit(fitted, batches(), towers_step, cfg, tmp_path, "test")

    reference = TwoTowers()
    image, text = reference.tower_parameters()
    optimisers = [torch.optim.Adam(image, lr=1e-2, weight_decay=1e-4), torch.optim.Adam(text, lr=1e-3, weight_decay=1e-4)]
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=2) for o in optimisers]
    lrs = []
    for batch in itertools.islice(batches(), 6):
        for optimiser, params in zip(optimisers, (image, text)):
            loss, _ = towers_step(reference, batch)
            with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": the release's order
                warnings.simplefilter("ignore", UserWarning)
                for s in schedulers:
                    s.step()
            for p in image + text:
                p.grad = None
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            optimiser.step()
            lrs.append(optimiser.param_groups[0]["lr"])
    # T_max = 2 stepped twice a batch: the image tower always at lr / 2, the text tower at 0 and text_lr in turn
    assert lrs[0::2] == pytest.approx([5e-3] * 6) and lrs[1::2] == pytest.approx([0.0, 1e-3] * 3, abs=1e-12)
    for a, b in zip(fitted.parameters(), reference.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_two_towers_resume_and_refuse_a_model_without_towers(tmp_path):
    cfg = parse(LoopConfig, "pretrain", TWO_TOWERS)
    unbroken = TwoTowers()
    fit(unbroken, batches(), towers_step, cfg, tmp_path / "a", "test")

    def crash_at_step_5(model, batch, calls=itertools.count()):
        if next(calls) == 2 * 5:  # two passes a step
            raise RuntimeError("power cut")
        return towers_step(model, batch)

    with pytest.raises(RuntimeError, match="power cut"):
        fit(TwoTowers(), batches(), crash_at_step_5, cfg, tmp_path / "b", "test")
    resumed = TwoTowers()
    fit(resumed, batches(start=4), towers_step, cfg, tmp_path / "b", "test")
    for a, b in zip(unbroken.parameters(), resumed.parameters()):
        assert torch.allclose(a, b)
    from stages.common.params import ParamsError
    with pytest.raises(ParamsError, match="pretrain.optimizer: adam_two_towers needs a model with an image and a text tower"):
        fit(fresh_model(), batches(), regression_step, cfg, tmp_path / "c", "pretrain")


def test_gradient_clipping_bounds_the_step():
    cfg = parse(LoopConfig, "pretrain", {**LOOP, "lr": 1.0, "momentum": 0.0, "steps": 1, "clip_grad_norm": 0.01})
    model = fresh_model()
    before = [p.detach().clone() for p in model.parameters()]
    import tempfile
    with tempfile.TemporaryDirectory() as work:
        fit(model, batches(), regression_step, cfg, __import__("pathlib").Path(work), "test")
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert float(moved) == pytest.approx(0.01, rel=1e-5)  # SGD lr 1: the step is the clipped gradient


def test_selection_keeps_the_best_validated_weights_across_a_resume(tmp_path):
    cfg = parse(LoopConfig, "pretrain", {**LOOP, "selection": "val_rsum", "eval_every": 2})
    scores = iter([1.0, 5.0, 3.0])  # validated after steps 2, 4 and 6
    selected = fresh_model()
    summary = fit(selected, batches(), regression_step, cfg, tmp_path / "a", "test",
                  validate=lambda m: {"val_rsum": next(scores)})
    assert summary["selected_step"] == 4 and summary["selected_val_rsum"] == 5.0
    at_step_4 = fresh_model()
    fit(at_step_4, batches(), regression_step, parse(LoopConfig, "pretrain", {**LOOP, "steps": 4}), tmp_path / "b", "test")
    for a, b in zip(selected.parameters(), at_step_4.parameters()):
        assert torch.allclose(a, b)

    def crash_at_step_5(model, batch, calls=itertools.count()):
        if next(calls) == 5:
            raise RuntimeError("power cut")
        return regression_step(model, batch)

    scores = iter([1.0, 5.0, 3.0])
    with pytest.raises(RuntimeError, match="power cut"):
        fit(fresh_model(), batches(), crash_at_step_5, cfg, tmp_path / "c", "test",
            validate=lambda m: {"val_rsum": next(scores)})
    resumed = fresh_model()  # the checkpoint at step 4 carries the best weights so far (step 4, score 5)
    summary = fit(resumed, batches(start=4), regression_step, cfg, tmp_path / "c", "test",
                  validate=lambda m: {"val_rsum": 4.0})
    assert summary["selected_step"] == 4
    for a, b in zip(resumed.parameters(), at_step_4.parameters()):
        assert torch.allclose(a, b)
    with pytest.raises(ValueError, match="needs a validate function"):
        fit(fresh_model(), batches(), regression_step, cfg, tmp_path / "d", "test")


def test_curves_go_to_the_live_folder_as_training_goes_and_a_resumed_run_continues_them(tmp_path):
    """The live folder is outside the staged output: its rows are on disk before the run ends (read here from
    inside a validate call at step 4), a resumed run restores the rows up to its checkpoint (even with the folder gone,
    as DVC leaves it) and appends, and a new
    run starts the curves afresh."""
    live = tmp_path / "live"
    cfg = parse(LoopConfig, "pretrain", {**LOOP, "eval_every": 2, "log_every": 1, "checkpoint_every": 2})
    seen_mid_run = {}

    def validate(model, step=itertools.count(2, 2)):
        at = next(step)
        if at == 4:
            seen_mid_run["loss"] = (live / "plots/metrics/loss.tsv").read_text().splitlines()
            seen_mid_run["val"] = (live / "plots/metrics/val_r1.tsv").read_text().splitlines()
        return {"val_r1": float(at), "val_r10": 2.0 * at}

    def crash_at_step_5(model, batch, calls=itertools.count()):
        if next(calls) == 5:
            raise RuntimeError("power cut")
        return regression_step(model, batch)

    with pytest.raises(RuntimeError, match="power cut"):
        fit(fresh_model(), batches(), crash_at_step_5, cfg, tmp_path / "work", "test", validate=validate,
            live_dir=live)
    assert [row.split("\t")[0] for row in seen_mid_run["loss"][1:]] == ["1", "2", "3"]  # while it ran
    assert seen_mid_run["val"][1:] and seen_mid_run["val"][1].split("\t")[0] == "2"
    assert not (tmp_path / "work" / "live").exists()  # nothing inside the staged output

    shutil.rmtree(live)  # DVC removes a stage's outputs before it runs the stage again: the checkpoint holds them
    fit(fresh_model(), batches(start=4), regression_step, cfg, tmp_path / "work", "test",
        validate=lambda m: {"val_r1": 9.0, "val_r10": 9.0}, live_dir=live)
    loss_steps = [int(row.split("\t")[0]) for row in (live / "plots/metrics/loss.tsv").read_text().splitlines()[1:]]
    assert loss_steps == [1, 2, 3, 4, 5, 6]  # rows after the step-4 checkpoint were redone once, not twice
    val = [row.split("\t") for row in (live / "plots/metrics/val_r1.tsv").read_text().splitlines()[1:]]
    assert [(int(r[0]), float(r[-1])) for r in val] == [(2, 2.0), (4, 4.0), (6, 9.0)]

    fit(fresh_model(), batches(), regression_step, parse(LoopConfig, "pretrain", {**LOOP, "steps": 2, "log_every": 1}),
        tmp_path / "new", "test", live_dir=live)
    assert [row.split("\t")[0] for row in (live / "plots/metrics/loss.tsv").read_text().splitlines()[1:]] == ["1", "2"]
    assert not (live / "plots/metrics/val_r1.tsv").exists()  # a new run: the old curves are gone


def test_the_cosine_schedule_anneals_the_learning_rate_to_zero_over_the_run(tmp_path):
    from stages.training.loop import make_optimizers

    cfg = parse(LoopConfig, "pretrain", {**LOOP, "steps": 4, "lr": 0.1, "lr_schedule": "cosine"})
    (optimizer, scheduler), = make_optimizers(fresh_model(), cfg)
    rates = []
    for _ in range(cfg.steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    rates.append(optimizer.param_groups[0]["lr"])
    # lr_t = lr (1 + cos(pi t / T)) / 2, written out here
    assert rates == pytest.approx([0.1 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)], abs=1e-12)
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)
