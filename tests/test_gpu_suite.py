"""benchmarks/gpu_suite.py: its dry run (--device cpu) goes through every section's code path but the CUDA calls."""
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tiny_repo import REPO

SUITE = REPO / "benchmarks" / "gpu_suite.py"


def suite(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUITE), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_the_dry_run_measures_every_section_and_prints_the_tables(tmp_path):
    """Two models (one per loss branch of the step: composed and matching) keep it short; the dry run of all six
    is `python benchmarks/gpu_suite.py --device cpu`."""
    result = suite("--device", "cpu", "--models", "tirg,dual_encoder", "--json", str(tmp_path / "rows.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert not [r for r in rows if "error" in r], rows
    measured = {(r["section"], r.get("model") or r.get("decode") or r.get("side"), r.get("variant"))
                for r in rows if "rate" in r or "seconds" in r and "side" in r}
    for model in ("tirg", "dual_encoder"):
        for variant in ("plain", "fast", "fast+compile"):
            assert ("step", model, variant) in measured
    for decode in ("cpu", "gpu"):
        assert ("loader", decode, None) in measured and ("fed", decode, None) in measured
    assert {side for section, side, _ in measured if section == "topk"} == {"cpu 1024x2048", "gpu 1024x2048",
                                                                          "gpu 4096x16384"}
    assert all(r["same"] == 1.0 for r in rows if r["section"] == "topk")  # the same neighbours on every side
    out = result.stdout
    for header in ("== train step:", "== loader:", "== top-K:", "tirg fast step fed by the loader"):
        assert header in out
    table = out[out.index("== train step:"):out.index("== loader:")]
    assert [line.split()[0] for line in table.splitlines()[2:4]] == ["tirg", "dual_encoder"]
    assert all(len(line.split()) == 6 for line in table.splitlines()[2:4])  # 3 rates and 2 ratios each


def test_a_section_is_stopped_at_its_budget_and_the_run_still_reports():
    # half a second: shorter than starting the section's process (importing torch) on any machine, so the budget
    # is always what ends it
    result = suite("--device", "cpu", "--sections", "step", "--budget-step", "0.5", "--models", "composeae")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[step] stopped at its budget of 0.5 s" in result.stdout
    table = result.stdout[result.stdout.index("== train step:"):]
    assert table.splitlines()[2].split() == ["composeae", "-", "-", "-", "-", "-"]  # nothing measured, still a row


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_the_gpu_run_without_cuda_says_so(capsys):
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_suite"] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["gpu_suite"]
    with pytest.raises(SystemExit):
        module.main(["--device", "cuda"])
    assert "--device cuda: torch sees no CUDA device (the dry run is --device cpu)" in capsys.readouterr().err
