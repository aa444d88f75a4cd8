"""Pretraining data: token shards as one document store, packed fixed-length samples, a resumable sampler, mixes.

Packing follows InternEvo's default, which InternLM2 trains with: documents are concatenated into one stream and cut
into fixed windows, so a long document runs across samples and short ones share a sample. Instead of InternEvo's
``cu_seqlens`` each sample carries ``segment_ids`` (one id per stretch of one document) from which the model builds
its block-diagonal attention mask and per-document positions; ``targets`` are -100 where the next token belongs to
another document, so no loss is taken across a boundary.

Nothing here reads URLs: token shards are local ``.npy`` files (``tasks.tokenize.local_shards`` fetches them).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

IGNORE_INDEX = -100  # targets with this value take no loss (torch's cross_entropy default ignore_index)


def _check_shard(tokens: np.ndarray, offsets: np.ndarray, where: str) -> None:
    """Raise unless ``offsets`` (n_docs + 1,) cut the flat ``tokens`` (n_tokens,) into consecutive documents."""
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"{where}: tokens must be a flat integer array, got shape {tokens.shape} {tokens.dtype}")
    if offsets.ndim != 1 or len(offsets) < 1 or not np.issubdtype(offsets.dtype, np.integer):
        raise ValueError(f"{where}: offsets must be a 1-D integer array of n_docs + 1 entries, got {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != len(tokens):
        raise ValueError(
            f"{where}: offsets must run from 0 to len(tokens)={len(tokens)}, got {offsets[0]} .. {offsets[-1]}"
        )
    if np.any(np.diff(offsets) < 0):
        raise ValueError(f"{where}: offsets must be non-decreasing")


def _load_array(path: Path) -> np.ndarray:
    """Memory-map one ``.npy`` file; a missing, truncated or foreign file raises naming the path."""
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"shard file {path}: unreadable, truncated or not a .npy array ({exc})") from exc


class DocumentStore:
    """Documents as flat token arrays plus offsets; several shards (often memory-mapped) read as one store.

    A shard is ``tokens`` (n_tokens,) uint32 and ``offsets`` (n_docs + 1,) int64 with document ``d`` at
    ``tokens[offsets[d]:offsets[d + 1]]``. Shards are kept as they are (no copy); ``_doc_starts`` maps a global
    document index to its shard.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray) -> None:
        self._tokens: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        self._doc_starts = np.zeros(1, dtype=np.int64)  # (n_shards + 1,) first global doc index of each shard
        self._lengths: np.ndarray | None = None  # cached on first use
        self._append(tokens, offsets, "DocumentStore")

    def _append(self, tokens: np.ndarray, offsets: np.ndarray, where: str) -> None:
        _check_shard(tokens, offsets, where)
        self._tokens.append(tokens)
        self._offsets.append(offsets)
        self._doc_starts = np.append(self._doc_starts, self._doc_starts[-1] + len(offsets) - 1)
        self._lengths = None

    @classmethod
    def from_shards(cls, paths: Sequence[tuple[Path, Path]]) -> DocumentStore:
        """Memory-map each ``(tokens.npy, offsets.npy)`` pair: opening costs the offsets, not the tokens."""
        if not paths:
            raise ValueError("DocumentStore.from_shards: no shards given; expected (tokens.npy, offsets.npy) pairs")
        loaded = [(_load_array(t), _load_array(o), f"shard {t}") for t, o in paths]
        _check_shard(*loaded[0])  # here too, so an error names the first shard's file
        store = cls(*loaded[0][:2])
        for tokens, offsets, where in loaded[1:]:
            store._append(tokens, offsets, where)
        return store

    @classmethod
    def from_docs(cls, docs: Sequence[Sequence[int]]) -> DocumentStore:
        """An in-memory store, mostly for tests."""
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = [t for d in docs for t in d]
        return cls(np.array(flat, dtype=np.uint32), offsets)

    @property
    def n_docs(self) -> int:
        return int(self._doc_starts[-1])

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self._tokens)

    @property
    def lengths(self) -> np.ndarray:
        """(n_docs,) int64 token count of every document."""
        if self._lengths is None:
            self._lengths = np.concatenate([np.diff(o).astype(np.int64) for o in self._offsets])
        return self._lengths

    def doc(self, i: int) -> np.ndarray:
        """Document ``i``'s tokens: a view (of the memory map, for shards), not a copy."""
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} out of range: the store holds {self.n_docs} documents")
        shard = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        local = i - int(self._doc_starts[shard])
        offsets = self._offsets[shard]
        return self._tokens[shard][int(offsets[local]) : int(offsets[local + 1])]


def _checked_doc_ids(store: DocumentStore, doc_ids: np.ndarray | None) -> np.ndarray:
    if doc_ids is None:
        return np.arange(store.n_docs, dtype=np.int64)
    ids = np.asarray(doc_ids)
    if ids.ndim != 1 or len(ids) == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"doc_ids must be a non-empty 1-D integer array, got shape {ids.shape} {ids.dtype}")
    if ids.min() < 0 or ids.max() >= store.n_docs:
        raise ValueError(f"doc_ids must lie in [0, {store.n_docs}), got {ids.min()} .. {ids.max()}")
    return ids.astype(np.int64)


class PackedDataset(Dataset[dict[str, torch.Tensor]]):
    """Fixed windows over one seeded stream of documents (InternEvo-style packing).

    The stream is ``doc_ids`` (default every document once; repeats up-weight) in a seeded order, concatenated.
    Sample ``i`` reads stream tokens ``[i * seq_len, (i + 1) * seq_len + 1)``: inputs are the first ``seq_len``,
    targets the last ``seq_len``. Consecutive windows overlap by one token, so every stream token but the first is a
    target exactly once.
    """

    def __init__(self, store: DocumentStore, seq_len: int, *, seed: int, doc_ids: np.ndarray | None = None) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        ids = _checked_doc_ids(store, doc_ids)
        self.store, self.seq_len = store, seq_len
        self.order = ids[np.random.default_rng(seed).permutation(len(ids))]  # (n_segments,) doc id of each segment
        # (n_segments + 1,) where each segment starts in the stream; int64 so streams beyond 4G tokens index fine.
        self.starts = np.concatenate([[0], np.cumsum(store.lengths[self.order])]).astype(np.int64)
        self._len = max(int(self.starts[-1]) - 1, 0) // seq_len
        if self._len == 0:
            raise ValueError(
                f"PackedDataset: the selected documents hold {self.starts[-1]} tokens, fewer than one sample of "
                f"seq_len + 1 = {seq_len + 1}; lower seq_len or add documents"
            )

    def __len__(self) -> int:
        return self._len

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Stream tokens ``[i * seq_len, (i + 1) * seq_len + 1)`` and, per token, its segment index in the stream."""
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} out of range: the dataset holds {self._len} samples")
        begin, end = i * self.seq_len, (i + 1) * self.seq_len + 1
        # side="right" skips empty segments, whose start equals the next one's.
        first = int(np.searchsorted(self.starts, begin, side="right")) - 1
        last = int(np.searchsorted(self.starts, end - 1, side="right")) - 1
        pieces, segments = [], []
        for seg in range(first, last + 1):
            lo, hi = max(begin, self.starts[seg]), min(end, self.starts[seg + 1])
            doc = self.store.doc(int(self.order[seg]))
            pieces.append(doc[lo - self.starts[seg] : hi - self.starts[seg]])
            segments.append(np.full(hi - lo, seg, dtype=np.int64))
        return np.concatenate(pieces).astype(np.int64), np.concatenate(segments)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens, segments = self.window(i)  # (seq_len + 1,) each
        targets = tokens[1:].copy()
        targets[segments[1:] != segments[:-1]] = IGNORE_INDEX  # the next token starts another document
        return {
            "tokens": torch.from_numpy(tokens[:-1].copy()),
            "targets": torch.from_numpy(targets),
            "segment_ids": torch.from_numpy(segments[:-1] - segments[0]),  # 0, 0, …, 1, 1, … within the sample
        }


class ResumableSampler(Sampler[int]):
    """Epoch ``e`` visits ``range(num_samples)`` in the order seeded by ``(seed, e)``; ``start`` skips ahead.

    Positions count over all epochs, so a run resumed at global sample ``k`` (steps done × batch size) passes
    ``start=k`` and continues exactly where it stopped. ``state_dict`` counts the indices handed out, which runs
    ahead of the samples trained on when DataLoader workers prefetch; resume from the trained count when that matters.
    """

    def __init__(self, num_samples: int, *, seed: int, start: int = 0, epochs: int | None = None) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be None (endless) or >= 1, got {epochs}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.num_samples, self.seed, self.epochs = num_samples, seed, epochs
        self.position = start  # indices yielded so far, over all epochs

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def __iter__(self) -> Iterator[int]:
        epoch, skip = divmod(self.position, self.num_samples)
        while self.epochs is None or epoch < self.epochs:
            for index in self.permutation(epoch)[skip:]:
                self.position += 1
                yield int(index)
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:
        """Indices still to come; an endless sampler has no length (TypeError, as ``len`` of an iterator)."""
        if self.epochs is None:
            raise TypeError("an endless ResumableSampler (epochs=None) has no length")
        return max(self.epochs * self.num_samples - self.position, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "num_samples": self.num_samples, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["num_samples"], state["seed"]) != (self.num_samples, self.seed):
            raise ValueError(
                f"sampler state is for num_samples={state['num_samples']}, seed={state['seed']}; "
                f"this sampler has num_samples={self.num_samples}, seed={self.seed}"
            )
        self.position = int(state["position"])


def make_loader(
    dataset: Dataset[Any],
    batch_size: int,
    *,
    seed: int,
    start_sample: int = 0,
    num_workers: int = 0,
    epochs: int | None = None,
) -> DataLoader[Any]:
    """Batches of ``batch_size`` samples in ``ResumableSampler`` order, starting at global sample ``start_sample``.

    Batches are cut from the sampler's one stream of indices (across epoch boundaries), so resuming at
    ``start_sample = steps × batch_size`` reproduces the batches an uninterrupted run would have drawn.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = ResumableSampler(len(dataset), seed=seed, start=start_sample, epochs=epochs)  # type: ignore[arg-type]
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=num_workers, pin_memory=False
    )


def pool_tokens(lengths: np.ndarray, pool: np.ndarray, budget: float, rng: np.random.Generator) -> np.ndarray:
    """Doc ids from ``pool`` whose lengths sum to about ``budget``: whole shuffled passes, then a shuffled prefix."""
    pool_tokens = int(lengths[pool].sum())
    passes, rest = divmod(budget, pool_tokens)
    chosen = [rng.permutation(pool) for _ in range(int(passes))]
    tail = rng.permutation(pool)
    cum = np.cumsum(lengths[tail])
    n = int(np.searchsorted(cum, rest))  # cum[n - 1] < rest <= cum[n]: take n docs or n + 1, whichever is closer
    if n < len(tail) and abs(cum[n] - rest) < abs((cum[n - 1] if n else 0) - rest):
        n += 1
    chosen.append(tail[:n])
    return np.concatenate(chosen)


def mix_documents(
    lengths: np.ndarray, *, long_threshold: int, long_fraction: float, seed: int, total_tokens: int | None = None
) -> np.ndarray:
    """Doc ids for a long-context phase where about ``long_fraction`` of the tokens come from long documents.

    Long means ``length >= long_threshold`` tokens. InternLM2's phase 2 keeps half its data under 4k tokens
    (``long_threshold=4096, long_fraction=0.5``). ``total_tokens`` defaults to the corpus size; each side is sampled
    without replacement first and repeated (reshuffled) when its budget exceeds what it holds. Empty documents are
    never chosen. Returns sorted (n,) int64 ids, repeats included; ``PackedDataset`` shuffles them.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum()) if total_tokens is None else total_tokens
    _check_mix_args(long_threshold, long_fraction, total)
    long_pool = np.flatnonzero(lengths >= long_threshold)
    short_pool = np.flatnonzero((lengths > 0) & (lengths < long_threshold))
    _require_pool(long_pool, long_fraction > 0, f"no document has >= long_threshold={long_threshold} tokens")
    _require_pool(short_pool, long_fraction < 1, f"no non-empty document has < long_threshold={long_threshold} tokens")
    rng = np.random.default_rng(seed)
    parts = [np.zeros(0, dtype=np.int64)]
    if long_fraction > 0:
        parts.append(pool_tokens(lengths, long_pool, total * long_fraction, rng))
    if long_fraction < 1:
        parts.append(pool_tokens(lengths, short_pool, total * (1 - long_fraction), rng))
    return np.sort(np.concatenate(parts)).astype(np.int64)


def _check_mix_args(long_threshold: int, long_fraction: float, total_tokens: int) -> None:
    if not 0.0 <= long_fraction <= 1.0:
        raise ValueError(f"long_fraction must lie in [0, 1], got {long_fraction}")
    if long_threshold < 1:
        raise ValueError(f"long_threshold must be >= 1, got {long_threshold}")
    if total_tokens < 1:
        raise ValueError(f"total_tokens must be >= 1 (default: the corpus size), got {total_tokens}")


def _require_pool(pool: np.ndarray, needed: bool, problem: str) -> None:
    if needed and len(pool) == 0:
        raise ValueError(f"mix_documents: {problem}; change long_threshold or long_fraction, or add documents")


def long_short_token_share(lengths: np.ndarray, doc_ids: np.ndarray, long_threshold: int) -> tuple[float, float]:
    """(long, short) fractions of the tokens in ``doc_ids`` (repeats counted), split at ``long_threshold``."""
    picked = np.asarray(lengths, dtype=np.int64)[np.asarray(doc_ids, dtype=np.int64)]
    total = int(picked.sum())
    if total == 0:
        raise ValueError("long_short_token_share: doc_ids select no tokens")
    long = int(picked[picked >= long_threshold].sum())
    return long / total, (total - long) / total
