from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from infra import storage
from tasks.corpus import (
    CORPUS_PRESETS,
    TEXT_SOURCES,
    Candidate,
    CorpusConfig,
    CorpusManifest,
    SizeFilter,
    build_corpus,
    corpus_config,
    load_manifest,
    manpage_candidates,
    module_doc_text,
    select,
    sysdoc_candidates,
)

SMOKE = CORPUS_PRESETS["smoke"]
TEXT_FIELDS = {"id": str, "text": str, "source": str, "meta": dict}
CODE_FIELDS = {"id": str, "repo": str, "path": str, "lang": str, "text": str}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, CorpusManifest]:
    out = str(tmp_path_factory.mktemp("corpus") / "smoke")
    return out, build_corpus(out, SMOKE)


def _records(root: str, kind: str) -> list[dict[str, Any]]:
    lines = []
    for url in storage.list_files(storage.join(root, kind), "*.jsonl"):
        lines.extend(storage.read_text(url).splitlines())
    return [json.loads(line) for line in lines]


def _tree_bytes(root: str) -> dict[str, bytes]:
    base = root.rstrip("/")
    return {url[len(base) :]: storage.read_bytes(url) for url in storage.list_files(root, "**")}


def _candidate(group: str, path: str, text: str | Exception) -> Candidate:
    def read() -> str:
        if isinstance(text, Exception):
            raise text
        return text

    return Candidate(group, path, read, {"path": path})


def test_two_builds_are_byte_identical(smoke: tuple[str, CorpusManifest], tmp_path: Path) -> None:
    first, _ = smoke
    second = str(tmp_path / "again")
    build_corpus(second, SMOKE)
    assert _tree_bytes(first) == _tree_bytes(second)
    assert any(name.startswith("/text/shard-") for name in _tree_bytes(second))


def test_text_records_have_the_contract_fields(smoke: tuple[str, CorpusManifest]) -> None:
    records = _records(smoke[0], "text")
    for record in records:
        assert set(record) == set(TEXT_FIELDS)
        assert all(isinstance(record[k], t) for k, t in TEXT_FIELDS.items())
        assert record["source"] in TEXT_SOURCES
        assert re.fullmatch(r"[0-9a-f]{16}", record["id"])
        assert record["meta"]["bytes"] == len(record["text"].encode("utf-8"))
        assert isinstance(record["meta"]["path"], str) and record["meta"]["path"]
    assert len({r["id"] for r in records}) == len(records)


def test_text_is_sorted_by_source_then_path(smoke: tuple[str, CorpusManifest]) -> None:
    keys = [(r["source"], r["meta"]["path"]) for r in _records(smoke[0], "text")]
    assert keys == sorted(keys)


def test_code_records_have_repo_path_lang(smoke: tuple[str, CorpusManifest]) -> None:
    records = _records(smoke[0], "code")
    assert records
    for record in records:
        assert set(record) == set(CODE_FIELDS)
        assert all(isinstance(record[k], t) for k, t in CODE_FIELDS.items())
        assert record["lang"] == "python"
        assert record["path"].endswith(".py")
        assert record["repo"] == f"cpython-stdlib/{record['path'].split('/')[0]}"
    assert len({r["repo"] for r in records}) >= 5  # balanced across packages, not one package's first files


def test_smoke_respects_its_limits(smoke: tuple[str, CorpusManifest]) -> None:
    root, manifest = smoke
    text, code = _records(root, "text"), _records(root, "code")
    assert 0 < len(text) <= SMOKE.max_text_docs
    assert 0 < len(code) <= SMOKE.max_code_files
    assert all(s.records <= SMOKE.shard_docs for s in [*manifest.text_shards, *manifest.code_shards])
    for record in [*text, *code]:
        assert len(record["text"].strip()) >= SMOKE.min_chars
        assert len(record["text"].encode("utf-8")) <= SMOKE.max_doc_bytes


def test_several_sources_are_present_and_balanced(smoke: tuple[str, CorpusManifest]) -> None:
    counts = Counter(r["source"] for r in _records(smoke[0], "text"))
    assert {"stdlib_doc", "pkg_description", "pkg_license"} <= set(counts)
    assert max(counts.values()) - min(counts.values()) <= 1 or sum(counts.values()) < SMOKE.max_text_docs


def test_manifest_counts_equal_lines_written(smoke: tuple[str, CorpusManifest]) -> None:
    root, manifest = smoke
    text, code = _records(root, "text"), _records(root, "code")
    assert manifest.text_docs == len(text) == sum(s.records for s in manifest.text_shards)
    assert manifest.code_files == len(code) == sum(s.records for s in manifest.code_shards)
    assert manifest.docs_per_source == dict(Counter(r["source"] for r in text))
    assert manifest.files_per_repo == dict(Counter(r["repo"] for r in code))
    for shard in manifest.text_shards + manifest.code_shards:
        data = storage.read_bytes(storage.join(root, shard.path))
        assert (len(data), data.count(b"\n")) == (shard.bytes, shard.records)
    assert load_manifest(root) == manifest


def test_build_to_s3_matches_local_build(smoke: tuple[str, CorpusManifest], s3_bucket: str) -> None:
    local_root, local_manifest = smoke
    s3_root = storage.join(s3_bucket, "corpora", "smoke")
    manifest = build_corpus(s3_root, SMOKE)
    assert manifest == local_manifest
    assert _tree_bytes(s3_root) == _tree_bytes(local_root)


def test_rebuild_with_fewer_shards_removes_stale_ones(tmp_path: Path) -> None:
    sources = [_candidate("stdlib_doc", f"m{i}.py", "word " * 50) for i in range(6)]
    out = str(tmp_path / "c")
    build_corpus(out, CorpusConfig(None, 0, shard_docs=2, min_chars=10), sources, [])
    manifest = build_corpus(out, CorpusConfig(None, 0, shard_docs=5, min_chars=10), sources, [])
    assert [s.path for s in manifest.text_shards] == ["text/shard-00000.jsonl", "text/shard-00001.jsonl"]
    assert [u.rsplit("/", 2)[-2:] for u in storage.list_files(out, "text/*")] == [
        ["text", "shard-00000.jsonl"],
        ["text", "shard-00001.jsonl"],
    ]


def test_no_documents_is_a_clear_error(tmp_path: Path) -> None:
    short = [_candidate("stdlib_doc", "a.py", "too short")]
    with pytest.raises(ValueError, match="no text documents"):
        build_corpus(str(tmp_path / "empty"), CorpusConfig(10, 10, shard_docs=5, min_chars=100), short, [])
    assert not storage.exists(str(tmp_path / "empty" / "manifest.json"))


def test_capped_selection_is_round_robin_across_groups() -> None:
    candidates = [
        *(_candidate("a", f"{i:02d}", "x" * 20) for i in range(10)),
        *(_candidate("b", f"{i:02d}", "x" * 20) for i in range(2)),
        *(_candidate("c", f"{i:02d}", "x" * 20) for i in range(50)),
    ]
    picked = list(select(candidates, 12, SizeFilter(min_chars=1)))
    assert Counter(c.group for c, _ in picked) == {"a": 5, "b": 2, "c": 5}
    keys = [(c.group, c.path) for c, _ in picked]
    assert keys == sorted(keys)
    c_paths = [c.path for c, _ in picked if c.group == "c"]
    assert c_paths != ["00", "01", "02", "03", "04"]  # spread over the list, not its head


def test_capped_selection_visits_every_family_before_repeating_one() -> None:
    crowd = [Candidate("manpage", f"gcloud_{i:03d}", lambda: "x" * 20, family="gcloud") for i in range(100)]
    loners = [_candidate("manpage", name, "y" * 20) for name in ("ls", "tar", "zip")]
    picked = list(select([*crowd, *loners], 4, SizeFilter(min_chars=1)))
    assert sorted(c.family or c.path for c, _ in picked) == ["gcloud", "ls", "tar", "zip"]


def test_unreadable_short_and_oversized_candidates_are_skipped() -> None:
    candidates = [
        _candidate("s", "broken", OSError("unreadable")),
        _candidate("s", "short", "tiny"),
        _candidate("s", "huge", "y" * 500),
        _candidate("s", "good", "z" * 50),
    ]
    keep = SizeFilter(min_chars=10, max_bytes=100)
    assert [(c.path, t) for c, t in select(candidates, None, keep)] == [("good", "z" * 50)]
    assert [c.path for c, _ in select(candidates, 4, keep)] == ["good"]


def test_module_doc_text_collects_public_docstrings(tmp_path: Path) -> None:
    source = '''"""Module doc."""


def public(a, b=1):
    """Public function doc."""


def _private():
    """Hidden doc."""


class Thing(Base):
    """Class doc."""

    def method(self):
        """Method doc."""
'''
    path = tmp_path / "mod.py"
    path.write_text(source)
    text = module_doc_text(path)
    assert text.startswith("Module doc.")
    assert "def public(a, b=1)\n    Public function doc." in text
    assert "class Thing(Base)\n    Class doc." in text
    assert "    def method(self)\n        Method doc." in text
    assert "Hidden" not in text


def test_man_pages_keep_roff_and_skip_symlinks(tmp_path: Path) -> None:
    roff = ".TH LS 1\n.SH NAME\nls \\- list directory contents\n.B \\-a\n"
    (tmp_path / "ls.1.gz").write_bytes(gzip.compress(roff.encode()))
    (tmp_path / "dir.1.gz").symlink_to(tmp_path / "ls.1.gz")
    found = list(manpage_candidates(tmp_path))
    assert [c.path for c in found] == [f"{tmp_path.name}/ls.1.gz"]
    assert found[0].read() == roff
    assert found[0].meta["name"] == "ls.1"


def test_sysdoc_decompresses_and_skips_binary_and_other_names(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "changelog.Debian.gz").write_bytes(gzip.compress(b"pkg (1.0) unstable; urgency=low\n"))
    (pkg / "copyright").write_text("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n")
    (pkg / "README.bin").write_bytes(b"\x00\x01\x02")
    (pkg / "example.conf").write_text("ignored")
    found = {c.path: c for c in sysdoc_candidates(tmp_path)}
    assert sorted(found) == ["pkg/README.bin", "pkg/changelog.Debian.gz", "pkg/copyright"]
    assert found["pkg/changelog.Debian.gz"].read().startswith("pkg (1.0) unstable")
    assert found["pkg/changelog.Debian.gz"].meta["package"] == "pkg"
    assert [c.path for c, _ in select(found.values(), None, SizeFilter(min_chars=1))] == [
        "pkg/changelog.Debian.gz",
        "pkg/copyright",
    ]


def test_presets_grow_and_unknown_names_fail() -> None:
    assert (
        corpus_config("smoke").max_text_docs
        < corpus_config("tiny").max_text_docs
        < corpus_config("small").max_text_docs
    )
    assert corpus_config("internlm2-7b") == CORPUS_PRESETS["full"]
    with pytest.raises(ValueError, match="unknown corpus preset 'huge'"):
        corpus_config("huge")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_text_docs": -1}, "max_text_docs"),
        ({"shard_docs": 0}, "shard_docs"),
        ({"min_chars": -5}, "min_chars"),
        ({"max_doc_bytes": 0}, "max_doc_bytes"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict[str, int], field: str) -> None:
    base = {"max_text_docs": 1, "max_code_files": 1, "shard_docs": 1, "min_chars": 0}
    with pytest.raises(ValueError, match=field):
        CorpusConfig(**{**base, **kwargs})
