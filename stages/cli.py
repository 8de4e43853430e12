"""How a stage reports a bad input: one line on stderr naming the file, record or key, exit code 2."""
from __future__ import annotations

import sys
from collections.abc import Callable

from stages.manifest import ManifestError
from stages.params import ParamsError


class StageError(ValueError):
    """Bad input found while a stage runs (a corrupt shard, a missing split, ...)."""


def run_stage(main: Callable[[], object]) -> None:
    try:
        main()
    except (ParamsError, ManifestError, StageError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
