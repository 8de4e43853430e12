"""The errors a stage reports as bad input, and how: one line on stderr naming the file, record or key, exit code 2."""
from __future__ import annotations

import sys
from collections.abc import Callable

from stages.common.params import ParamsError


class ManifestError(ValueError):
    """A manifest breaks its contract; the message names the file and the offending record."""


class StageError(ValueError):
    """Bad input found while a stage runs (a corrupt shard, a missing split, ...)."""


def run_stage(main: Callable[[], object]) -> None:
    try:
        main()
    except (ParamsError, ManifestError, StageError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
