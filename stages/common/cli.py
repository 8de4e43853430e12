"""The command line every stage shares: a description, a runnable example, `--params` and `--out`."""
from __future__ import annotations

import argparse
from pathlib import Path

from stages.common.params import PARAMS_FILE


def stage_parser(doc: str, example: str, out_help: str) -> argparse.ArgumentParser:
    """A parser whose --help shows the module docstring and `example`; the stage adds its inputs."""
    parser = argparse.ArgumentParser(description=doc, epilog=f"example (from the repository root):\n  {example}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE,
                        help=f"the params file whose sections the stage reads (default: {PARAMS_FILE})")
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    return parser
