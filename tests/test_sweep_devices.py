"""pipelines.sweep on several devices: which GPUs each running experiment gets (no GPU needed: the devices are
injected)."""
import time as clock

import pytest

from pipelines import sweep


class Future:
    """A submitted experiment of `seconds`, with the state API the sweep reads from a Prefect future."""

    def __init__(self, name, env, seconds):
        self.name, self.env = name, env
        self.start = clock.monotonic()
        self.end = self.start + seconds

    @property
    def state(self):
        return type("State", (), {"is_final": lambda _: clock.monotonic() >= self.end})()


def run(jobs: int, parallel: int, devices: list[str], seconds=(0.3, 0.05, 0.1, 0.05, 0.2, 0.05)) -> list[Future]:
    points = [(f"e{i}", ({}, {"train.lr": str(i)})) for i in range(jobs)]
    return sweep.launch(points, parallel, devices,
                        lambda name, labels, assignment, env: Future(name, env, seconds[int(name[1:]) % len(seconds)]))


def overlapping(futures: list[Future]) -> list[tuple[Future, Future]]:
    return [(a, b) for i, a in enumerate(futures) for b in futures[i + 1:] if a.start < b.end and b.start < a.end]


def test_each_running_experiment_gets_its_own_gpu():
    futures = run(6, 2, ["0", "1"])
    assert all(f.env in ({"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}) for f in futures)
    assert overlapping(futures)  # two at a time ...
    assert all(a.env != b.env for a, b in overlapping(futures))  # ... never on one GPU
    assert [f.env["CUDA_VISIBLE_DEVICES"] for f in futures[:2]] == ["0", "1"]


def test_gpus_are_shared_out_among_the_slots():
    assert sweep.device_slots(["0", "1", "2", "3", "4", "5", "6", "7"], 2) == ["0,1,2,3", "4,5,6,7"]
    assert sweep.device_slots(["0", "1", "2"], 2) == ["0", "1"]  # the third is left idle
    assert sweep.device_slots(["0", "1"], 4) == ["0", "1", "0", "1"]  # more slots than GPUs: round-robin
    assert sweep.device_slots(["GPU-a", "GPU-b"], 2) == ["GPU-a", "GPU-b"]
    assert sweep.device_slots([], 3) == [None, None, None]  # no GPU: nothing is set
    assert sweep.device_slots(["0", "1"], 1) == [None]  # one at a time: the experiment sees every GPU


def test_with_more_slots_than_gpus_a_start_takes_the_least_used_gpu():
    futures = run(6, 4, ["0", "1"])
    for f in futures:
        running = [g for g in futures if g is not f and g.start <= f.start < g.end]
        on_same = sum(g.env == f.env for g in running)
        assert on_same <= sum(g.env != f.env for g in running)  # never the busier GPU


@pytest.mark.parametrize("parallel, devices", [(1, ["0", "1"]), (2, [])])
def test_nothing_is_set_with_one_at_a_time_or_without_a_gpu(parallel, devices):
    assert all(f.env is None for f in run(3, parallel, devices))


def test_the_devices_present_are_cuda_visible_devices_or_those_torch_counts(monkeypatch):
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert sweep.visible_devices() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sweep.visible_devices() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert sweep.visible_devices() == ["0", "1", "2"]


def test_the_flow_hands_the_devices_present_to_its_slots(tmp_path, monkeypatch):
    """sweep(parallel=2) on a machine with 2 GPUs (injected): every experiment is submitted with one of them."""
    import shutil

    from tiny_repo import REPO

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.setattr(sweep, "visible_devices", lambda: ["0", "1"])
    seen = []

    class Task:
        def with_options(self, **_):
            return self

        def submit(self, root, name, assignment, labels, env):
            seen.append(env)
            future = Future(name, env, 0.05)
            future.result = lambda: {"experiment": name, "status": "done", **assignment}
            return future

    monkeypatch.setattr(sweep, "run_experiment", Task())
    monkeypatch.setattr(sweep, "create_table_artifact", lambda **_: None)
    rows = sweep.sweep.fn(grid={"train.lr": ["0.01", "0.02", "0.03"]}, root=str(tmp_path), out="s.csv", parallel=2)
    assert [r["train.lr"] for r in rows] == ["0.01", "0.02", "0.03"]
    assert seen[:2] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    assert seen[2] in seen[:2]
