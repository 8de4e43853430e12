"""The parameter layouts of the methods' released code: one entry per release, each owning its name map between
cirflow's state_dict and the release's. The known-answer recorders give a release cirflow's weights through them
(tests/known_answers/<method>/record.py) and the known-answer tests check that they round-trip.

They live with the tests until `model.init_from` (issue 24, item 3: a release's checkpoint loaded into cirflow's
model) reads them: then they move into the stages' code, and the pipeline's dvc.lock is recorded again.
Each module of this package registers its layouts with `register` when the package is imported.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class ReleaseLayout:
    """cirflow key -> release key for every tensor of a model, and how a tensor changes on the way (default: as is).

    `names`: {cirflow state_dict key: release state_dict key}; `to_release` / `to_cirflow`: {cirflow key: function}
    for tensors stored differently (e.g. LSTM gates in another order); `release_only`: release keys with no cirflow
    counterpart that a release checkpoint may hold and that are left out when loading (e.g. an unused text model)."""
    name: str
    repository: str  # owner/name@commit of the release
    names: dict[str, str]
    to_release: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)
    to_cirflow: dict[str, Callable[[Tensor], Tensor]] = field(default_factory=dict)
    release_only: tuple[str, ...] = ()

    def release_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """cirflow's state_dict in the release's names."""
        self._check(set(state), set(self.names), "cirflow's model")
        return {self.names[k]: self.to_release.get(k, _same)(v) for k, v in state.items()}

    def cirflow_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A release's state_dict in cirflow's names."""
        wanted = {release: ours for ours, release in self.names.items()}
        self._check(set(state) - set(self.release_only), set(wanted), "the release checkpoint")
        return {wanted[k]: self.to_cirflow.get(wanted[k], _same)(v) for k, v in state.items() if k in wanted}

    def _check(self, given: set[str], expected: set[str], what: str) -> None:
        if missing := sorted(expected - given):
            raise KeyError(f"{self.name} ({self.repository}): {what} lacks {missing[0]!r}"
                           f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
        if extra := sorted(given - expected):
            raise KeyError(f"{self.name} ({self.repository}): {what} has {extra[0]!r}, which the layout does not map"
                           f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")


def _same(tensor: Tensor) -> Tensor:
    return tensor


LAYOUTS: dict[str, ReleaseLayout] = {}


def register(layout: ReleaseLayout) -> ReleaseLayout:
    if layout.name in LAYOUTS:
        raise ValueError(f"release layout {layout.name!r} registered twice")
    LAYOUTS[layout.name] = layout
    return layout


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
