"""The code pipeline's stages: validation and quarantine, whitespace-insensitive dedup, tiers, repository documents,
and a ledger that balances."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from tasks.clean.dedup import DedupConfig
from tasks.code.stages import (
    CodeConfig,
    code_dedup_stage,
    code_finish_stage,
    code_rules_stage,
    code_shards,
    ingest_tree,
    language,
)

UTIL = '''"""Small helpers for the shop: prices and their formatting."""


def cents(amount: float) -> int:
    """Round an amount of money to whole cents."""
    return round(amount * 100)


def money(value: int) -> str:
    """Format cents as dollars, e.g. 1234 -> "$12.34"."""
    return f"${value // 100}.{value % 100:02d}"
'''
CART = '''"""A shopping cart that totals its items."""

from shop.util import cents, money


class Cart:
    """Items with prices; the total is kept in cents to avoid float drift."""

    def __init__(self) -> None:
        self.items: list[tuple[str, int]] = []

    def add(self, name: str, price: float) -> None:
        """Add one item at a price in dollars."""
        self.items.append((name, cents(price)))

    def total(self) -> str:
        """The total, formatted."""
        return money(sum(price for _, price in self.items))
'''
INIT = '''"""The shop package: a cart and the helpers that price it."""

from shop.cart import Cart
from shop.util import cents, money

__all__ = ["Cart", "cents", "money"]
'''
BLOB = "DATA = [\n" + "".join(f"    {i * 7919 % 65536:#06x}, {i * 104729 % 65536:#06x},\n" for i in range(2000)) + "]\n"


def reindent(code: str, unit: str) -> str:
    return "\n".join(unit * ((len(line) - len(line.lstrip(" "))) // 4) + line.lstrip(" ") for line in code.split("\n"))


def rec(repo: str, path: str, text: str, lang: str | None = None) -> str:
    return json.dumps({"repo": repo, "path": path, "text": text, **({"lang": lang} if lang else {})})


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    (root / "code").mkdir(parents=True)
    first = [
        rec("shop", "README.md", "# shop\n\nA tiny shop.\n"),
        rec("shop", "shop/cart.py", CART),
        rec("shop", "shop/util.py", UTIL),
        rec("shop", "shop/__init__.py", INIT),
        '{"repo": "broken", "path": "x.py", "text": ',  # invalid JSON
        rec("bin", "logo.py", "\x01\x02PNG\x1a\x7f" * 50),  # binary content
        rec("big", "huge.py", "x = 1\n" * 40_000),  # over max_file_bytes
    ]
    second = [
        rec("copy2", "util.py", reindent(UTIL, "  ")),  # the same file with 2-space and tab indentation
        rec("copy3", "util.py", reindent(UTIL, "\t")),
        rec("docs", "README.md", "# only docs\n\nNo code here.\n"),  # no code file: an empty repository
        rec("tables", "table.py", BLOB),  # a data blob: low tier
    ]
    (root / "code" / "a.jsonl").write_text("\n".join(first) + "\n")
    (root / "code" / "b.jsonl").write_text("\n".join(second) + "\n")
    return root


def run(root: Path, out: Path, cfg: CodeConfig) -> tuple[list[str], object]:
    found = code_shards([str(root)])
    names = [n for n, _ in found]
    for name, url in found:
        code_rules_stage(url, name, str(out), cfg, DedupConfig())
    code_dedup_stage(str(out), names, DedupConfig())
    return names, code_finish_stage(str(out), names, cfg)


def test_every_file_is_in_a_repository_document_removed_or_quarantined(shards: Path, tmp_path: Path) -> None:
    cfg = CodeConfig(max_file_bytes=100_000)
    names, ledger = run(shards, tmp_path / "out", cfg)
    assert names == ["in0-a", "in0-b"]
    assert ledger.lines == 11 and ledger.quarantined == {"invalid_json": 1, "binary_content": 1}
    assert ledger.removed["code_rules/code_too_large"] == 1
    assert ledger.removed["dedup/exact_duplicate"] == 2  # 2 spaces, 4 spaces and tabs: one file
    assert ledger.removed["code_repo/code_empty_repo"] == 1
    assert sum(v for k, v in ledger.removed.items() if k.startswith("code_quality/")) == 1  # the data blob
    lines = (tmp_path / "out" / "code_quarantine" / "in0-a.jsonl").read_text().splitlines()
    quarantine = [json.loads(x) for x in lines]
    assert {(q["error"], q["line"]) for q in quarantine} == {("invalid_json", 5), ("binary_content", 6)}
    removed = pl.read_parquet(tmp_path / "out" / "code_removed" / "in0-b.parquet")
    assert set(removed["reason"]) >= {"exact_duplicate", "code_empty_repo"}


def test_repository_document_is_dependency_sorted_markdown(shards: Path, tmp_path: Path) -> None:
    run(shards, tmp_path / "out", CodeConfig(max_file_bytes=100_000))
    docs = [json.loads(x) for x in (tmp_path / "out" / "code" / "repos-00000.jsonl").read_text().splitlines()]
    shop = next(d for d in docs if d["meta"]["repo"] == "shop")
    assert shop["meta"]["order"] == ["README.md", "shop/util.py", "shop/cart.py", "shop/__init__.py"]
    text = shop["text"]
    assert text.startswith("# shop\n") and text.index("## shop/util.py") < text.index("## shop/cart.py")
    assert "```python\n" in text and shop["source"] == "code" and shop["meta"]["tier"] in ("high", "moderate")
    assert {d["meta"]["repo"] for d in docs} == {"shop"}  # shop holds the first util.py; both copies went


def test_a_changed_config_recomputes_and_the_same_one_reuses(shards: Path, tmp_path: Path) -> None:
    _, first = run(shards, tmp_path / "out", CodeConfig(max_file_bytes=100_000))
    _, again = run(shards, tmp_path / "out", CodeConfig(max_file_bytes=100_000))
    assert again == first
    _, larger = run(shards, tmp_path / "out", CodeConfig(max_file_bytes=1_000_000))
    assert "code_rules/code_too_large" not in larger.removed and larger.lines == first.lines


def test_directory_tree_ingest_quarantines_unreadable_files_and_lists_empty_repos(tmp_path: Path) -> None:
    tree = tmp_path / "repos"
    (tree / "shop" / "shop").mkdir(parents=True)
    (tree / "shop" / "shop" / "util.py").write_text(UTIL)
    (tree / "shop" / "notes.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (tree / "empty").mkdir()
    counts = ingest_tree(str(tree), str(tmp_path / "in"))
    assert counts == {"files": 2, "written": 1, "quarantined": 1, "empty_repos": ["empty"]}
    rows = [json.loads(x) for x in (tmp_path / "in" / "code" / "tree-00000.jsonl").read_text().splitlines()]
    assert rows == [{"repo": "shop", "path": "shop/util.py", "lang": "python", "text": UTIL}]
    bad = json.loads((tmp_path / "in" / "quarantine" / "tree.jsonl").read_text())
    assert bad["error"] == "invalid_utf8" and "shop/notes.txt" in bad["detail"]
    with pytest.raises(ValueError, match="not a directory"):
        ingest_tree(str(tmp_path / "missing"), str(tmp_path / "x"))


def test_language_by_file_name() -> None:
    assert [language(p) for p in ("a/b.py", "x.H", "Makefile", "y.tsx", "z.unknown")] == [
        "python", "c", "make", "typescript", "text"]
