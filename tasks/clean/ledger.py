"""The ledger of the text-cleaning flow: every input line is kept, removed (stage and reason) or quarantined.

Invariant, per shard and in total: ``lines = kept + Σ removed + Σ quarantined``. A ledger that does not balance is an
error, never a warning: it means a document was lost or counted twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, Field


class LedgerError(RuntimeError):
    """Counts that do not add up: something was lost or double-counted."""


class ShardLedger(BaseModel):
    shard: str
    lines: int
    kept: int
    removed: dict[str, int] = Field(default_factory=dict)  # "stage/reason" → documents
    quarantined: dict[str, int] = Field(default_factory=dict)  # error code → lines
    filters: str = ""  # the safety/quality settings the shard was filtered with (a change recomputes it)

    @property
    def accounted(self) -> int:
        return self.kept + sum(self.removed.values()) + sum(self.quarantined.values())

    def check(self) -> ShardLedger:
        if self.accounted != self.lines:
            raise LedgerError(f"shard {self.shard}: {self.lines} lines in, but kept {self.kept} + removed "
                              f"{sum(self.removed.values())} + quarantined {sum(self.quarantined.values())} "
                              f"= {self.accounted}")
        return self


class Ledger(BaseModel):
    shards: list[ShardLedger]

    @property
    def lines(self) -> int:
        return sum(s.lines for s in self.shards)

    @property
    def kept(self) -> int:
        return sum(s.kept for s in self.shards)

    @property
    def removed(self) -> dict[str, int]:
        return dict(sorted(_sum(s.removed for s in self.shards).items()))

    @property
    def quarantined(self) -> dict[str, int]:
        return dict(sorted(_sum(s.quarantined for s in self.shards).items()))

    def check(self) -> Ledger:
        for shard in self.shards:
            shard.check()
        return self

    def by_stage(self) -> dict[str, int]:
        """Removed documents per stage (the part of "stage/reason" before the slash)."""
        return dict(_sum({k.split("/", 1)[0]: v} for k, v in self.removed.items()))

    def funnel(self, stages: Iterable[str]) -> list[tuple[str, int]]:
        """Documents left after each step: input, after parsing, then after each stage in order."""
        left = self.lines - sum(self.quarantined.values())
        steps = [("input lines", self.lines), ("parsed", left)]
        removed = self.by_stage()
        for stage in stages:
            left -= removed.get(stage, 0)
            steps.append((stage, left))
        return steps

    def metrics(self) -> dict[str, float]:
        out = {"docs/input": float(self.lines), "docs/kept": float(self.kept)}
        out.update({f"removed/{k}": float(v) for k, v in self.removed.items()})
        out.update({f"quarantined/{k}": float(v) for k, v in self.quarantined.items()})
        return out


def _sum(counts: Iterable[dict[str, int]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for c in counts:
        total.update(c)
    return total


def funnel_plot(steps: list[tuple[str, int]], path: Path, title: str = "text cleaning funnel") -> Path:
    """A horizontal bar per step (documents left), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, counts = zip(*steps, strict=True)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(steps) + 1.2))
    ax.barh(range(len(steps)), counts, color="#4c72b0")
    ax.set_yticks(range(len(steps)), labels)
    ax.invert_yaxis()
    for i, c in enumerate(counts):
        ax.text(c, i, f" {c:,}", va="center")
    ax.set_xlabel("documents")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
