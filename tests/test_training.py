import itertools

import pytest
import torch

from stages.common.params import parse
from stages.training.loop import LoopConfig, fit

LOOP = dict(seed=0, steps=6, batch_size=4, lr=0.1, momentum=0.9, weight_decay=0.0, lr_decay_every=3,
            lr_decay=0.5, optimizer="sgd", ema_decay=0.0, ema_as_released_every=0, shuffle_buffer=0, pair_sampling="shuffled", workers=0, device="cpu", checkpoint_every=2, log_every=1,
            compile=False, distributed={"nproc_per_node": 1, "backend": "auto"})


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
    assert torch.load(work / "resume.pt", weights_only=False)["step"] == 4

    resumed = fresh_model()  # a new process: weights come from the checkpoint, batches go on from step 4
    summary = fit(resumed, batches(start=4), regression_step, cfg, work, "test")
    assert summary["steps"] == 2
    assert not (work / "resume.pt").exists()
    for a, b in zip(unbroken.parameters(), resumed.parameters()):
        assert torch.allclose(a, b)
    logged = (work / "live/plots/metrics/loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in logged[1:]] == ["1", "2", "3", "4", "5", "6"]


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
