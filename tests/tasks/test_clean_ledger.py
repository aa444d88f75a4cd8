from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tasks.clean.ledger import Ledger, LedgerError, ShardLedger, funnel_plot


def shard(name: str, lines: int, kept: int, removed: dict[str, int], quarantined: dict[str, int]) -> ShardLedger:
    return ShardLedger(shard=name, lines=lines, kept=kept, removed=removed, quarantined=quarantined)


def test_balanced_ledger_totals_and_funnel() -> None:
    ledger = Ledger(shards=[
        shard("a", 10, 5, {"rules/gopher_short_doc": 2, "dedup/near_duplicate": 1}, {"invalid_json": 2}),
        shard("b", 6, 4, {"rules/gopher_short_doc": 1}, {"nul_byte": 1}),
    ]).check()
    assert (ledger.lines, ledger.kept) == (16, 9)
    assert ledger.removed == {"dedup/near_duplicate": 1, "rules/gopher_short_doc": 3}
    assert ledger.quarantined == {"invalid_json": 2, "nul_byte": 1}
    assert ledger.funnel(["rules", "dedup"]) == [("input lines", 16), ("parsed", 13), ("rules", 10), ("dedup", 9)]
    assert ledger.metrics()["removed/rules/gopher_short_doc"] == 3.0


def test_unbalanced_shard_is_an_error_naming_it() -> None:
    with pytest.raises(LedgerError, match=r"shard b: 6 lines in, but kept 4 \+ removed 0 \+ quarantined 1 = 5"):
        Ledger(shards=[shard("b", 6, 4, {}, {"nul_byte": 1})]).check()


def test_funnel_plot_png(tmp_path: Path) -> None:
    path = funnel_plot([("input lines", 16), ("parsed", 13), ("rules", 10)], tmp_path / "funnel.png")
    with Image.open(path) as img:
        assert img.format == "PNG"
