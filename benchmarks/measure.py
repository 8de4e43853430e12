"""What the benchmark scripts share: one timed step and the table that lists them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    step: str
    items: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.items / self.seconds


def print_table(rows: list[Measurement], unit: str = "items") -> None:
    width = max(len(row.step) for row in rows)
    print(f"{'step':<{width}}  {unit:>7}  {'seconds':>8}  {unit + '/s':>9}")
    for row in rows:
        print(f"{row.step:<{width}}  {row.items:>7}  {row.seconds:>8.2f}  {row.rate:>9.0f}")
