"""Command `headline`: the numbers of the last run in a few lines, from metrics/*.json (what `make repro` ends with).

    python -m stages.headline [--metrics metrics]

Composed retrieval: recall@K of the composed query per evaluated split under each protocol, with the gallery and
query counts. Matching: i2t / t2i R@1 and rsum per split, and the 1K-fold average where there is one. Then the
training steps and seconds. `dvc metrics show` has every number; this is the part a reader wants first.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from stages.common.errors import StageError, run_stage


def composed_lines(evaluate: dict) -> list[str]:
    lines = ["| split | protocol | " + " | ".join(f"R@{k}" for k in _ks(evaluate)) + " | gallery | queries |",
             "|---|---|" + "---|" * (len(_ks(evaluate)) + 2)]
    for split, protocols in evaluate["composed"].items():
        for protocol, scores in protocols.items():
            if not isinstance(scores, dict) or "gallery" not in scores:
                continue  # harmonic / WHM summaries and per-category tables: in dvc metrics show
            recalls = " | ".join(f"{scores[f'r{k}']:.1f}" for k in _ks(evaluate))
            lines.append(f"| {split} | {protocol} | {recalls} | {scores['gallery']} | {scores['queries']} |")
    return lines


def _ks(evaluate: dict) -> list[int]:
    for protocols in evaluate["composed"].values():
        for scores in protocols.values():
            if isinstance(scores, dict) and "gallery" in scores:
                return sorted(int(key[1:]) for key in scores if key.startswith("r") and key[1:].isdigit())
    raise StageError("metrics/evaluate.json: no composed recall in it")


def matching_lines(evaluate: dict) -> list[str]:
    lines = ["| split | i2t R@1 | t2i R@1 | rsum | 1K-fold rsum | images | captions |", "|---|---|---|---|---|---|---|"]
    for split, result in evaluate.items():
        if not isinstance(result, dict) or "all" not in result:
            continue
        folds = result.get("folds_average", {}).get("rsum")
        lines.append(f"| {split} | {result['all']['i2t']['r1']:.1f} | {result['all']['t2i']['r1']:.1f} | "
                     f"{result['all']['rsum']:.1f} | {'—' if folds is None else f'{folds:.1f}'} | "
                     f"{result['counts']['images']} | {result['counts']['captions']} |")
    return lines


def headline(metrics_dir: Path) -> str:
    path = metrics_dir / "evaluate.json"
    if not path.is_file():
        raise StageError(f"{path}: no such file (has `evaluate` run? `dvc repro` first)")
    evaluate = json.loads(path.read_text())
    lines = composed_lines(evaluate) if "composed" in evaluate else matching_lines(evaluate)
    for stage in ("pretrain", "train"):
        run = metrics_dir / f"{stage}.json"
        if run.is_file():
            data = json.loads(run.read_text())
            lines.append(f"{stage}: {data.get('steps', 0)} steps in {data.get('seconds', 0):.0f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metrics", type=Path, default=Path("metrics"), help="the metrics folder (default: metrics)")
    args = parser.parse_args(argv)
    print(headline(args.metrics))


if __name__ == "__main__":
    run_stage(main)
