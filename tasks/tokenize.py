"""Tokenizer training and corpus tokenization: JSONL shards in, flat token shards + document offsets out.

Each input shard ``<kind>/<name>.jsonl`` (kind: text or code) becomes ``tokens/<kind>-<name>.tokens.npy``
((n_tokens,) uint32, every document ``[<s>] + ids + [</s>]``) and ``tokens/<kind>-<name>.offsets.npy``
((n_docs + 1,) int64), plus ``tokens/manifest.json`` listing them. A raw code file (a record with
``repo``/``path``/``lang``) is rendered as Markdown first (a ``# repo/path`` heading and a fenced block tagged with
the language); a code *document* (the code pipeline's dependency-sorted repository, already Markdown) is taken as is.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel
from tokenizers import Tokenizer as HFTokenizer

from infra import storage
from infra.settings import get_logger
from model.tokenizer import Tokenizer

log = get_logger(__name__)

KINDS = ("text", "code")
TOKENS_DIR = "tokens"
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
ENCODE_CHUNK = 256  # documents per encode_batch call: bounds the Python lists of ids alive at once
CODE_FIELDS = ("repo", "path", "lang", "text")


class TokenShard(BaseModel):
    tokens: str  # file name relative to the manifest's directory, e.g. "text-shard-00000.tokens.npy"
    offsets: str
    kind: str  # "text" or "code"
    input: str  # the JSONL shard it came from, relative to the corpus root
    n_docs: int
    n_tokens: int
    skipped_empty: int  # records whose text was empty or whitespace only
    sources: dict[str, int]  # documents per `source` (text) or per `repo` (code)
    repeats: dict[str, int] = {}  # document index (in this shard) → times a phase reading "all" repeats it
    held_out: int = 0  # text documents kept out of training for evaluation (`tasks.evaluate.datasets.eval_holdout`)


class TokenManifest(BaseModel):
    """What `tokenize_corpus` wrote; stored as ``tokens/manifest.json``."""

    vocab_size: int
    bos_id: int
    eos_id: int
    tokenizer_sha256: str
    dtype: str = "uint32"
    shards: list[TokenShard]
    n_docs: int
    n_tokens: int
    tokens_per_kind: dict[str, int]


# ---------------------------------------------------------------- reading the corpus


def render_code(record: dict[str, Any]) -> str:
    """A code file as one Markdown document; the fence outgrows any backtick run inside the code (CommonMark)."""
    text = record["text"]
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = text if text.endswith("\n") else text + "\n"
    return f"# {record['repo']}/{record['path']}\n\n{fence}{record['lang']}\n{body}{fence}\n"


def _parse(line: bytes, url: str, number: int, kind: str) -> dict[str, Any]:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as err:
        raise ValueError(f"{url} line {number}: not valid JSON ({err})") from err
    if not isinstance(record, dict):
        raise ValueError(f"{url} line {number}: expected a JSON object, got {type(record).__name__}")
    fields = CODE_FIELDS if kind == "code" and "path" in record else ("text",)  # code: a file or a document
    for name in fields:
        if not isinstance(record.get(name), str):
            raise ValueError(f"{url} line {number}: field {name!r} must be a string, got {record.get(name)!r:.80}")
    return record


def read_records(url: str, kind: str) -> Iterator[dict[str, Any]]:
    """Records of one JSONL shard, each checked; a bad line raises ValueError naming the URL and line number."""
    data = storage.read_bytes(url)
    for number, line in enumerate(data.splitlines(), start=1):
        yield _parse(line, url, number, kind)


def document_text(record: dict[str, Any], kind: str) -> str | None:
    """What gets tokenized for a record: its text, or its Markdown rendering for code; None when empty."""
    if not record["text"].strip():
        return None
    return render_code(record) if kind == "code" and "path" in record else record["text"]


def input_shards(corpus_url: str) -> list[tuple[str, str]]:
    """(kind, url) of every ``text/*.jsonl`` and ``code/*.jsonl`` shard under the corpus, in a fixed order."""
    found = [(kind, url) for kind in KINDS for url in storage.list_files(storage.join(corpus_url, kind), "*.jsonl")]
    if not found:
        raise ValueError(f"no JSONL shards under {corpus_url!r}: expected text/*.jsonl and/or code/*.jsonl there")
    return found


# ---------------------------------------------------------------- tokenizer training


def _file_size(url: str) -> int:
    fs, path = storage.fs_for(url)
    return int(fs.size(path))


def sample_texts(corpus_url: str, max_bytes: int, *, seed: int) -> list[str]:
    """About ``max_bytes`` of documents spread over every shard (each kept with one probability), deterministic."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    shards = input_shards(corpus_url)
    keep = min(1.0, max_bytes / max(sum(_file_size(url) for _, url in shards), 1))
    rng = np.random.default_rng(seed)
    texts, size = [], 0
    for kind, url in shards:
        for record in read_records(url, kind):
            text = document_text(record, kind)
            if text is None or rng.random() >= keep:
                continue
            texts.append(text)
            size += len(text.encode("utf-8"))
            if size >= max_bytes:
                return texts
    return texts


def train_tokenizer(
    corpus_url: str, out_url: str, vocab_size: int, *, sample_bytes: int = 20_000_000, seed: int = 0
) -> str:
    """Train the byte-level BPE on a sample of the corpus; writes ``<out_url>/tokenizer.json``, returns its URL."""
    texts = sample_texts(corpus_url, sample_bytes, seed=seed)
    if not texts:
        raise ValueError(f"no non-empty documents under {corpus_url!r} to train a tokenizer on")
    tokenizer = Tokenizer.train(texts, vocab_size)
    url = storage.join(out_url, TOKENIZER_FILE)
    storage.write_text(url, tokenizer.backend.to_str(pretty=True))
    log.info(
        "trained tokenizer (vocab %d) on %d documents from %s -> %s", tokenizer.vocab_size, len(texts), corpus_url, url
    )
    return url


def load_tokenizer(tokenizer_url: str) -> tuple[Tokenizer, str]:
    """The tokenizer at a ``tokenizer.json`` URL (or a directory URL holding one) and the file's sha256."""
    url = tokenizer_url if tokenizer_url.endswith(".json") else storage.join(tokenizer_url, TOKENIZER_FILE)
    data = storage.read_bytes(url)
    try:
        backend = HFTokenizer.from_str(data.decode("utf-8"))
    except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
        raise ValueError(f"{url} is not a valid tokenizer.json: {err}") from err
    return Tokenizer(backend), hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- tokenization


def _save_npy(url: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    with storage.atomic_write(url) as f:
        f.write(buffer.getbuffer())


def _encode_docs(tokenizer: Tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Flat (n_tokens,) uint32 tokens with every document wrapped in <s> … </s>, and (n_docs + 1,) int64 offsets."""
    arrays = [np.zeros(0, dtype=np.uint32)]
    for start in range(0, len(texts), ENCODE_CHUNK):
        ids = tokenizer.encode_batch(texts[start : start + ENCODE_CHUNK], bos=True, eos=True)
        arrays.extend(np.asarray(doc, dtype=np.uint32) for doc in ids)
    lengths = np.array([len(a) for a in arrays[1:]], dtype=np.int64)
    return np.concatenate(arrays), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _shard_name(kind: str, url: str) -> tuple[str, str]:
    """Input path relative to the corpus root ("text/shard-00000.jsonl") and the output stem ("text-shard-00000")."""
    rel = f"{kind}/{posixpath.basename(url)}"
    return rel, rel.removesuffix(".jsonl").replace("/", "-")


def _tokenize_shard(tokenizer: Tokenizer, kind: str, url: str, out_dir: str, holdout: float = 0.0) -> TokenShard:
    from tasks.evaluate.datasets import eval_holdout

    texts: list[str] = []
    sources: Counter[str] = Counter()
    repeats: dict[str, int] = {}
    skipped = held_out = 0
    for record in read_records(url, kind):
        text = document_text(record, kind)
        if text is None:
            skipped += 1
            continue
        if holdout > 0 and kind == "text" and eval_holdout(str(record["id"]), holdout):
            held_out += 1
            continue
        weight = (record.get("meta") or {}).get("weight") if isinstance(record.get("meta"), dict) else None
        if isinstance(weight, int | float) and weight > 0 and round(weight) != 1:
            repeats[str(len(texts))] = max(1, round(weight))  # up-weighted (high-tier code): repeated whole
        texts.append(text)
        label = record.get("repo") or (record.get("meta") or {}).get("repo") or record.get("source")
        sources[label if isinstance(label, str) else "unknown"] += 1
    tokens, offsets = _encode_docs(tokenizer, texts)
    rel, stem = _shard_name(kind, url)
    shard = TokenShard(
        tokens=f"{stem}.tokens.npy",
        offsets=f"{stem}.offsets.npy",
        kind=kind,
        input=rel,
        n_docs=len(texts),
        n_tokens=len(tokens),
        skipped_empty=skipped,
        sources=dict(sorted(sources.items())),
        repeats=repeats,
        held_out=held_out,
    )
    _save_npy(storage.join(out_dir, shard.tokens), tokens)
    _save_npy(storage.join(out_dir, shard.offsets), offsets)
    return shard


def token_manifest_url(out_url: str) -> str:
    """Where `tokenize_corpus(..., out_url)` puts its manifest."""
    return storage.join(out_url, TOKENS_DIR, MANIFEST)


def tokenize_corpus(
    corpus_url: str, tokenizer_url: str, out_url: str, *, workers: int = 2, holdout: float = 0.0
) -> TokenManifest:
    """Tokenize every text and code shard under ``corpus_url`` into ``<out_url>/tokens/`` (local or s3://).

    ``holdout`` > 0 keeps that share of text documents (chosen by a hash of their id, so every stage that
    tokenizes the same documents leaves out the same ones) out of the shards: the evaluation's held-out text.

    Shards run on ``workers`` threads (the tokenizer's batch encoding is native code that releases the GIL).
    The manifest is removed first and written last, so a run that dies half-way never looks finished.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be a share in [0, 1), got {holdout}")
    shards = input_shards(corpus_url)
    tokenizer, sha256 = load_tokenizer(tokenizer_url)
    manifest_url = token_manifest_url(out_url)
    storage.remove(manifest_url, missing_ok=True)
    out_dir = storage.join(out_url, TOKENS_DIR)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = list(pool.map(lambda s: _tokenize_shard(tokenizer, s[0], s[1], out_dir, holdout), shards))
    manifest = _manifest(done, tokenizer, sha256)
    storage.write_json(manifest_url, manifest.model_dump(mode="json"))
    log.info(
        "tokenized %d documents (%d tokens) from %s into %s", manifest.n_docs, manifest.n_tokens, corpus_url, out_dir
    )
    return manifest


def _manifest(shards: list[TokenShard], tokenizer: Tokenizer, sha256: str) -> TokenManifest:
    per_kind: Counter[str] = Counter()
    for shard in shards:
        per_kind[shard.kind] += shard.n_tokens
    return TokenManifest(
        vocab_size=tokenizer.vocab_size,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        tokenizer_sha256=sha256,
        shards=shards,
        n_docs=sum(s.n_docs for s in shards),
        n_tokens=sum(s.n_tokens for s in shards),
        tokens_per_kind=dict(sorted(per_kind.items())),
    )


def load_token_manifest(manifest_url: str) -> TokenManifest:
    return TokenManifest.model_validate(storage.read_json(manifest_url))


# ---------------------------------------------------------------- local copies for training


def _fetch(url: str, local: Path) -> Path:
    """Copy ``url`` to ``local`` unless the copy there came from the same object.

    The object's identity is fsspec's ``ukey`` (the ETag on S3), kept beside the copy in ``<local>.ukey``: a size match
    alone would take a rewritten object of the same length (another run writing the same URL) for the cached one.
    """
    fs, path = storage.fs_for(url)
    ukey = str(fs.ukey(path))
    marker = local.with_name(local.name + ".ukey")
    if local.is_file() and marker.is_file() and marker.read_text() == ukey:
        return local
    marker.unlink(missing_ok=True)  # the copy is replaced below; a crash before the new marker means a re-fetch
    with fs.open(path, "rb") as src, storage.atomic_write(str(local)) as dst:
        while block := src.read(8 << 20):
            dst.write(block)
    marker.write_text(ukey)
    log.info("fetched %s -> %s", url, local)
    return local


def local_shards(manifest_url: str, cache_dir: Path) -> list[tuple[Path, Path]]:
    """(tokens, offsets) local paths of every shard a token manifest lists, for `DocumentStore.from_shards`.

    Local manifests are read in place (nothing copied); remote shards are downloaded into ``cache_dir`` once and
    reused while the object they came from is unchanged (its ``ukey``, the ETag on S3). One cache directory per token
    set: names are not namespaced.
    """
    manifest = load_token_manifest(manifest_url)
    base = manifest_url.rsplit("/", 1)[0] if "/" in manifest_url else "."
    fs, _ = storage.fs_for(base)
    pairs = []
    for shard in manifest.shards:
        urls = (storage.join(base, shard.tokens), storage.join(base, shard.offsets))
        if storage.is_local(fs):
            pairs.append((Path(storage.fs_for(urls[0])[1]), Path(storage.fs_for(urls[1])[1])))
        else:
            pairs.append((_fetch(urls[0], cache_dir / shard.tokens), _fetch(urls[1], cache_dir / shard.offsets)))
    return pairs
