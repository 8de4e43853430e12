"""Training batch streams whose position a checkpoint holds, so that a resumed run reads the batches an
uninterrupted one would have read, byte for byte.

A stream's state is tiny: the epoch, and per DataLoader worker the number of batches it has handed on (torchdata's
StatefulDataLoader keeps the worker bookkeeping: which worker yields next, which ran dry, what was prefetched but
not yet taken). A restored worker replays its shuffled stream of *undecoded* samples up to that count and decodes
from there on: the shuffle buffer and the shard order come back as they were, at the cost of reading (not decoding)
the shards read so far this epoch.

Every loader draws its worker seeds from a generator of its own, seeded from (seed, epoch): none touches the
process's global torch RNG, which the model's dropout draws from and a checkpoint restores.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
from torch.utils.data import IterableDataset
from torch.utils.data._utils import signal_handling
from torchdata.stateful_dataloader import StatefulDataLoader



class DecodedBatches(IterableDataset):
    """`raw`'s batches (lists of undecoded samples, e.g. a WebDataset pipeline ending in `.batched(n, list)`),
    each turned into a batch by `finish` (decode + collate). Its iterator is what torchdata saves per worker."""

    def __init__(self, raw: Iterable[list], finish: Callable[[list], dict]):
        super().__init__()
        self.raw, self.finish = raw, finish

    def __iter__(self) -> "_SkippingIterator":
        return _SkippingIterator(self.raw, self.finish)


class _SkippingIterator:
    """Counts the batches it has finished; restored with a count, it first takes that many raw batches unfinished."""

    def __init__(self, raw: Iterable[list], finish: Callable[[list], dict]):
        self.raw, self.finish, self.taken, self._raw = raw, finish, 0, None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._raw is None:
            self._raw = iter(self.raw)
            for _ in range(self.taken):
                next(self._raw)
        batch = next(self._raw)
        self.taken += 1
        return self.finish(batch)

    def state_dict(self) -> dict:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        if self._raw is not None:
            raise RuntimeError("a batch stream's position is restored before its first batch")
        self.taken = state["taken"]


def stateful_loader(dataset, seed: int, workers: int, pin_memory: bool = False, **kwargs) -> StatefulDataLoader:
    """A StatefulDataLoader of one batch per item, its worker seeds drawn from its own generator (`seed`)."""
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, which torch 2.14 deprecates
        warnings.filterwarnings("ignore", "'set_vital' is deprecated", UserWarning)
        return StatefulDataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                                  generator=torch.Generator().manual_seed(seed), snapshot_every_n_steps=1, **kwargs)


class ResumableStream:
    """Endless batches of `make_loader(seed + epoch)` for epoch 0, 1, ... (one loader for ever when it is endless).

    state_dict() -> {"epoch", "loader"}; load_state_dict(state) before the first batch goes on from there.
    `decode(batch)` runs on each batch in this process (e.g. JPEG decoding on the GPU); an epoch that yields no
    batch from its start is an error (`empty`: the message)."""

    def __init__(self, make_loader: Callable[[int], StatefulDataLoader], seed: int, empty: str,
                 decode: Callable[[dict], dict] | None = None):
        self.make_loader, self.seed, self.empty, self.decode = make_loader, seed, empty, decode
        self.epoch, self._restored, self._loader, self._iterator, self._yielded = 0, None, None, None, False

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while True:
            if self._iterator is None:
                self._loader = self.make_loader(self.seed + self.epoch)
                if self._restored is not None:
                    self._loader.load_state_dict(self._restored)
                self._yielded = self._restored is not None  # a restored epoch may have no batch left
                self._restored = None
                self._iterator = iter(self._loader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                if not self._yielded:
                    raise ValueError(self.empty) from None
                self.epoch, self._loader, self._iterator = self.epoch + 1, None, None
                continue
            except BaseException:
                self.close()
                raise
            self._yielded = True
            return self.decode(batch) if self.decode is not None else batch

    def state_dict(self) -> dict:
        loader = self._loader.state_dict() if self._loader is not None else self._restored
        return {"epoch": self.epoch, "loader": loader}

    def load_state_dict(self, state: dict) -> None:
        if self._iterator is not None:
            raise RuntimeError("a batch stream's position is restored before its first batch")
        self.epoch, self._restored = state["epoch"], state["loader"]

    def close(self) -> None:
        """Stops the loader's workers now, not when the stream is collected."""
        if self._iterator is not None:
            stop_workers(self._iterator)
            self._iterator = None


def stop_workers(iterator) -> None:
    """torch's own clean-up of a multi-process DataLoader iterator (private API), with its workers first
    taken off torch's SIGCHLD watch: a worker that failed on a shard can exit with code 1 while it is joined
    (seen in the full test suite), which the watch would raise as a second error over the first."""
    if not hasattr(iterator, "_shutdown_workers"):  # workers=0: nothing to stop
        return
    if getattr(iterator, "_worker_pids_set", False):
        signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False
    iterator._shutdown_workers()


class StepStream:
    """The batches of steps `start`.. of a map-style dataset whose item `step` is step `step`'s batch (a function of
    (seed, step): stages.shards.pairs.PerIterationQueries); its state is the next step."""

    def __init__(self, dataset, steps: int, seed: int, workers: int, pin_memory: bool = False,
                 decode: Callable[[dict], dict] | None = None):
        self.dataset, self.steps, self.seed, self.workers, self.pin_memory = dataset, steps, seed, workers, pin_memory
        self.decode, self.step, self._iterator = decode, 0, None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            if self.step >= self.steps:
                raise StopIteration
            self._iterator = iter(stateful_loader(self.dataset, self.seed, self.workers, self.pin_memory,
                                                  sampler=range(self.step, self.steps)))
        try:
            batch = next(self._iterator)
        except BaseException:  # the last step drawn, or a failing worker: stop the workers now
            self.close()
            raise
        self.step += 1
        return self.decode(batch) if self.decode is not None else batch

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        if self._iterator is not None:
            raise RuntimeError("a batch stream's position is restored before its first batch")
        self.step = state["step"]

    def close(self) -> None:
        if self._iterator is not None:
            stop_workers(self._iterator)
            self._iterator = None
