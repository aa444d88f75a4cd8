"""Tokenizer training and corpus tokenization: exact round trips, honest counts, determinism, s3, bad input."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infra import storage
from model.data import DocumentStore, PackedDataset
from model.tokenizer import Tokenizer
from tasks.tokenize import (
    TokenManifest,
    local_shards,
    render_code,
    sample_texts,
    token_manifest_url,
    tokenize_corpus,
    train_tokenizer,
)

VOCAB = 512

PROSE = [
    "The quick brown fox jumps over the lazy dog. " * 8,
    "Ünïcødé survives: 東京, naïve café, emoji 🙂 and tabs\tand\nnewlines.\n",
    "Numbers 1234567 and 3.14159 split into short digit pieces.",
    "   \n\t",  # whitespace only: skipped as empty
    "Changelog\n=========\n\n* fixed a bug\n* fixed another bug\n",
    "",  # empty: skipped
]
CODE = [
    {"repo": "demo/pkg", "path": "pkg/__init__.py", "lang": "python", "text": "from .core import run\n"},
    {"repo": "demo/pkg", "path": "pkg/core.py", "lang": "python", "text": "def run(x):\n    return x * 2"},
    {"repo": "demo/doc", "path": "README.md", "lang": "markdown", "text": "Use ```python\nrun(1)\n``` here.\n"},
    {"repo": "demo/doc", "path": "empty.py", "lang": "python", "text": ""},
]


def _text_record(i: int, text: str, source: str) -> dict[str, Any]:
    return {"id": f"t{i}", "text": text, "source": source, "meta": {"n": i}}


def _jsonl(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _write_corpus(root: str) -> dict[str, list[dict[str, Any]]]:
    """Two text shards and one code shard under `root` (a path or URL); returns the records by shard path."""
    shards = {
        "text/shard-00000.jsonl": [_text_record(i, t, "manpage" if i % 2 else "sysdoc") for i, t in enumerate(PROSE)],
        "text/shard-00001.jsonl": [_text_record(10 + i, t, "stdlib_doc") for i, t in enumerate(PROSE[:3])],
        "code/shard-00000.jsonl": [{"id": f"c{i}", **r} for i, r in enumerate(CODE)],
    }
    for rel, records in shards.items():
        storage.write_text(storage.join(root, rel), _jsonl(records))
    return shards


def _expected_docs(shards: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Documents in manifest order (text shards, then code), empty ones left out."""
    out = []
    for rel in sorted(shards, key=lambda r: (r.split("/")[0] != "text", r)):
        for r in shards[rel]:
            if r["text"].strip():
                out.append(render_code(r) if rel.startswith("code/") else r["text"])
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    root = str(tmp_path_factory.mktemp("corpus"))
    return root, _write_corpus(root)


@pytest.fixture(scope="module")
def tokenizer_url(corpus: tuple[str, Any], tmp_path_factory: pytest.TempPathFactory) -> str:
    return train_tokenizer(corpus[0], str(tmp_path_factory.mktemp("tok")), VOCAB, seed=0)


@pytest.fixture(scope="module")
def tokenized(corpus: tuple[str, Any], tokenizer_url: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("out"))
    tokenize_corpus(corpus[0], tokenizer_url, out, workers=2)
    return out


def _decoded_docs(manifest_url: str, cache: Path) -> tuple[DocumentStore, list[list[int]]]:
    store = DocumentStore.from_shards(local_shards(manifest_url, cache))
    return store, [store.doc(i).tolist() for i in range(store.n_docs)]


def _tree(root: str) -> dict[str, bytes]:
    base = root.rstrip("/")
    return {url[len(base) :]: storage.read_bytes(url) for url in storage.list_files(root, "**")}


def test_render_code_is_markdown_with_a_safe_fence() -> None:
    assert render_code(CODE[1]) == "# demo/pkg/pkg/core.py\n\n```python\ndef run(x):\n    return x * 2\n```\n"
    doc = render_code(CODE[2])
    assert doc.startswith("# demo/doc/README.md\n\n````markdown\n") and doc.endswith("here.\n````\n")


def test_train_tokenizer_writes_loadable_file(tokenizer_url: str, corpus: tuple[str, Any]) -> None:
    assert tokenizer_url.endswith("/tokenizer.json")
    tok = Tokenizer.from_file(tokenizer_url)
    assert tok.vocab_size == VOCAB
    assert all(tok.decode(tok.encode(t)) == t for t in _expected_docs(corpus[1]))


def test_sample_texts_deterministic_and_bounded(corpus: tuple[str, Any]) -> None:
    root, shards = corpus
    everything = sample_texts(root, 10**9, seed=0)
    assert everything == _expected_docs(shards)  # a budget above the corpus takes every non-empty document
    small = sample_texts(root, 300, seed=1)
    assert small == sample_texts(root, 300, seed=1)
    assert 0 < len(small) < len(everything) and set(small) <= set(everything)
    assert any(sample_texts(root, 300, seed=s) != small for s in range(2, 6))


def test_tokenized_documents_decode_to_inputs(tokenized: str, tokenizer_url: str, corpus: tuple[str, Any]) -> None:
    tok = Tokenizer.from_file(tokenizer_url)
    _, docs = _decoded_docs(token_manifest_url(tokenized), Path("unused"))
    assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs)
    assert [tok.decode(d[1:-1]) for d in docs] == _expected_docs(corpus[1])


def test_manifest_counts_match_the_lines(tokenized: str, tokenizer_url: str, corpus: tuple[str, Any]) -> None:
    manifest = TokenManifest.model_validate(storage.read_json(token_manifest_url(tokenized)))
    shards = corpus[1]
    by_input = {s.input: s for s in manifest.shards}
    assert set(by_input) == set(shards)
    for rel, records in shards.items():
        shard = by_input[rel]
        assert shard.n_docs + shard.skipped_empty == len(records)
        assert shard.skipped_empty == sum(not r["text"].strip() for r in records)
        offsets = np.load(Path(tokenized, "tokens", shard.offsets))
        assert len(offsets) == shard.n_docs + 1 and offsets[-1] == shard.n_tokens
        assert np.load(Path(tokenized, "tokens", shard.tokens)).dtype == np.uint32
    # manpage records are lines 1, 3 and 5, two of them empty
    assert by_input["text/shard-00000.jsonl"].sources == {"manpage": 1, "sysdoc": 3}
    assert by_input["code/shard-00000.jsonl"].sources == {"demo/doc": 1, "demo/pkg": 2}
    assert manifest.n_docs == sum(s.n_docs for s in manifest.shards) == len(_expected_docs(shards))
    assert manifest.n_tokens == sum(manifest.tokens_per_kind.values())
    assert manifest.vocab_size == VOCAB
    assert manifest.tokenizer_sha256 == hashlib.sha256(storage.read_bytes(tokenizer_url)).hexdigest()


def test_tokenize_is_deterministic(corpus: tuple[str, Any], tokenizer_url: str, tokenized: str, tmp_path: Path) -> None:
    tokenize_corpus(corpus[0], tokenizer_url, str(tmp_path), workers=1)
    assert _tree(str(tmp_path)) == _tree(tokenized)


def test_token_shards_feed_packing(tokenized: str) -> None:
    store, docs = _decoded_docs(token_manifest_url(tokenized), Path("unused"))
    ds = PackedDataset(store, 8, seed=0)
    stream = np.concatenate([store.doc(int(d)) for d in ds.order])
    assert ds[len(ds) - 1]["tokens"].tolist() == stream[(len(ds) - 1) * 8 : len(ds) * 8].tolist()


def test_s3_round_trip(
    s3_bucket: str, corpus: tuple[str, Any], tokenizer_url: str, tokenized: str, tmp_path: Path
) -> None:
    root = f"{s3_bucket}/run"
    _write_corpus(f"{root}/corpus")
    storage.write_bytes(f"{root}/tok/tokenizer.json", storage.read_bytes(tokenizer_url))
    manifest = tokenize_corpus(f"{root}/corpus", f"{root}/tok", root, workers=2)
    local = TokenManifest.model_validate(storage.read_json(token_manifest_url(tokenized)))
    assert manifest == local
    cache = tmp_path / "cache"
    store, docs = _decoded_docs(token_manifest_url(root), cache)
    assert docs == _decoded_docs(token_manifest_url(tokenized), Path("unused"))[1]
    stamps = {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    assert len(stamps) == 2 * len(manifest.shards)
    local_shards(token_manifest_url(root), cache)  # the same objects already cached: nothing fetched again
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == stamps

    # Another run rewrites one shard with different tokens of the same length: the stale copy is not reused.
    shard = manifest.shards[0]
    url = f"{root}/tokens/{shard.tokens}"
    tokens = np.load(io.BytesIO(storage.read_bytes(url)))
    changed = io.BytesIO()
    np.save(changed, (tokens + 1).astype(tokens.dtype))
    assert len(changed.getvalue()) == len(storage.read_bytes(url))
    storage.write_bytes(url, changed.getvalue())
    tokens_path, _ = local_shards(token_manifest_url(root), cache)[0]
    assert np.array_equal(np.load(tokens_path), tokens + 1)


def test_local_manifest_is_read_in_place(tokenized: str, tmp_path: Path) -> None:
    pairs = local_shards(token_manifest_url(tokenized), tmp_path / "cache")
    assert all(p.parent == Path(tokenized, "tokens") for pair in pairs for p in pair)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("kind", "line", "match"),
    [
        ("text", "{not json", "not valid JSON"),
        ("text", '{"id": "x", "text": 5}', "field 'text' must be a string"),
        ("text", '["a list"]', "expected a JSON object"),
        ("code", '{"id": "x", "repo": "r", "path": "p", "text": "x = 1"}', "field 'lang' must be a string"),
    ],
)
def test_bad_line_names_shard_and_line(tmp_path: Path, tokenizer_url: str, kind: str, line: str, match: str) -> None:
    good = _jsonl([_text_record(0, "fine", "s")]) if kind == "text" else _jsonl([{"id": "c", **CODE[0]}])
    url = storage.join(str(tmp_path / "corpus"), kind, "shard-00000.jsonl")
    storage.write_text(url, good + good + line + "\n" + good)
    with pytest.raises(ValueError, match=rf"{url} line 3: {match}"):
        tokenize_corpus(str(tmp_path / "corpus"), tokenizer_url, str(tmp_path / "out"))
    assert not storage.exists(token_manifest_url(str(tmp_path / "out")))


def test_empty_corpus_dir_raises(tmp_path: Path, tokenizer_url: str) -> None:
    (tmp_path / "corpus" / "text").mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"no JSONL shards under '{tmp_path / 'corpus'}'"):
        tokenize_corpus(str(tmp_path / "corpus"), tokenizer_url, str(tmp_path / "out"))
    with pytest.raises(ValueError, match="workers must be >= 1"):
        tokenize_corpus(str(tmp_path / "corpus"), tokenizer_url, str(tmp_path / "out"), workers=0)


def test_code_documents_are_taken_as_is_and_their_weight_repeats_them(tokenizer_url: str, tmp_path: Path) -> None:
    docs = [{"id": "r1", "text": "# repo\n\n## a.py\n```python\nx = 1\n```\n", "source": "code",
             "meta": {"repo": "repo", "weight": 2.0}},
            {"id": "r2", "text": "# other\n", "source": "code", "meta": {"repo": "other", "weight": 1.0}}]
    (tmp_path / "corpus" / "code").mkdir(parents=True)
    (tmp_path / "corpus" / "code" / "repos-00000.jsonl").write_text(_jsonl(docs))
    manifest = tokenize_corpus(str(tmp_path / "corpus"), tokenizer_url, str(tmp_path / "out"), workers=1)
    (shard,) = manifest.shards
    assert shard.repeats == {"0": 2} and shard.sources == {"other": 1, "repo": 1}
    _, decoded = _decoded_docs(token_manifest_url(str(tmp_path / "out")), tmp_path / "cache")
    tokenizer = Tokenizer.from_file(storage.fs_for(tokenizer_url)[1])
    assert tokenizer.decode(decoded[0], skip_special=True) == docs[0]["text"]
