"""Means over seeds with 95% confidence intervals, and paired differences between two arms run on the same seeds.

The interval is Student's t: mean ± t(0.975, n−1)·s/√n, s the sample standard deviation over the n seeds. A
paired difference takes, seed by seed, arm A minus arm B and gives that difference's mean and interval, which is
narrower than comparing two unpaired intervals when the seeds move both arms alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float  # nan for a single value: one seed has no interval
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        return self.n > 1 and (self.low > 0 or self.high < 0)

    def text(self, signed: bool = False) -> str:
        mean = f"{self.mean:+.1f}" if signed else f"{self.mean:.1f}"
        return mean if self.n < 2 else f"{mean} ± {self.half_width:.1f}"


def interval(values: list[float], confidence: float = 0.95) -> Interval:
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, math.nan, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n), n)


def paired_difference(a: dict[object, float], b: dict[object, float], confidence: float = 0.95) -> Interval:
    """A − B over the seeds both arms ran ({seed: value} each)."""
    seeds = sorted(set(a) & set(b), key=str)
    if not seeds:
        raise ValueError("the two arms share no seed")
    return interval([a[s] - b[s] for s in seeds], confidence)
