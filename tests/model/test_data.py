"""Packing reproduces the document stream, masks boundaries, resumes exactly; mixes hit their long-token share."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from model.data import (
    IGNORE_INDEX,
    DocumentStore,
    PackedDataset,
    ResumableSampler,
    long_short_token_share,
    make_loader,
    mix_documents,
)

SEQ = 16


def _docs(n: int = 40, seed: int = 0) -> list[list[int]]:
    """Documents of 0..50 tokens whose ids encode (doc, position), so any misplaced token is visible."""
    rng = np.random.default_rng(seed)
    return [[1000 * d + p for p in range(int(rng.integers(0, 51)))] for d in range(n)]


@pytest.fixture(name="store")
def _store() -> DocumentStore:
    return DocumentStore.from_docs(_docs())


def _stream(ds: PackedDataset) -> tuple[np.ndarray, np.ndarray]:
    """The permuted stream the dataset claims to cut: tokens and, per token, its segment position."""
    docs = [ds.store.doc(int(d)) for d in ds.order]
    segments = [np.full(len(doc), i) for i, doc in enumerate(docs)]
    return np.concatenate(docs).astype(np.int64), np.concatenate(segments)


def _samples(ds: PackedDataset) -> list[dict[str, torch.Tensor]]:
    return [ds[i] for i in range(len(ds))]


def test_store_from_docs_and_shards_agree(tmp_path: Path) -> None:
    docs = _docs()
    paths = []
    for k, part in enumerate((docs[:15], docs[15:16], docs[16:])):
        single = DocumentStore.from_docs(part)
        pair = (tmp_path / f"{k}.tokens.npy", tmp_path / f"{k}.offsets.npy")
        np.save(pair[0], np.concatenate([single.doc(i) for i in range(single.n_docs)]).astype(np.uint32))
        np.save(pair[1], np.concatenate([[0], np.cumsum(single.lengths)]).astype(np.int64))
        paths.append(pair)
    store = DocumentStore.from_shards(paths)
    assert store.n_docs == len(docs)
    assert store.num_tokens == sum(map(len, docs))
    assert store.lengths.tolist() == [len(d) for d in docs]
    assert all(store.doc(i).tolist() == d for i, d in enumerate(docs))
    assert isinstance(store.doc(20).base, np.memmap) or isinstance(store.doc(20), np.memmap)


def test_store_rejects_bad_offsets() -> None:
    with pytest.raises(ValueError, match="offsets must run from 0"):
        DocumentStore(np.arange(5, dtype=np.uint32), np.array([0, 3], dtype=np.int64))
    with pytest.raises(ValueError, match="non-decreasing"):
        DocumentStore(np.arange(5, dtype=np.uint32), np.array([0, 4, 2, 5], dtype=np.int64))
    with pytest.raises(IndexError, match="out of range"):
        DocumentStore.from_docs([[1, 2]]).doc(1)


def test_windows_reproduce_the_stream(store: DocumentStore) -> None:
    ds = PackedDataset(store, SEQ, seed=3)
    stream, _ = _stream(ds)
    samples = _samples(ds)
    assert len(ds) == (len(stream) - 1) // SEQ
    assert all(s[k].shape == (SEQ,) and s[k].dtype == torch.long for s in samples for k in s)
    rebuilt = torch.cat([s["tokens"] for s in samples]).numpy()
    last = ds.window(len(ds) - 1)[0][-1]
    assert np.array_equal(np.append(rebuilt, last), stream[: len(ds) * SEQ + 1])


def test_targets_masked_exactly_at_boundaries(store: DocumentStore) -> None:
    ds = PackedDataset(store, SEQ, seed=3)
    stream, segment_of = _stream(ds)
    for i, sample in enumerate(_samples(ds)):
        at = np.arange(i * SEQ, (i + 1) * SEQ)  # stream positions of this sample's inputs
        boundary = segment_of[at] != segment_of[at + 1]
        targets = sample["targets"].numpy()
        assert np.array_equal(targets == IGNORE_INDEX, boundary)
        assert np.array_equal(targets[~boundary], stream[at + 1][~boundary])


def test_segment_ids_change_exactly_at_boundaries_even_for_repeated_docs() -> None:
    store = DocumentStore.from_docs([[7] * 5, [8] * 3])
    ids = np.array([0, 0, 0, 0, 1])  # doc 0 repeated: the seeded order puts some copies next to each other
    ds = PackedDataset(store, 6, seed=0, doc_ids=ids)
    assert any(a == b == 0 for a, b in zip(ds.order[:-1], ds.order[1:], strict=True))
    _, segment_of = _stream(ds)
    for i, sample in enumerate(_samples(ds)):
        seg = sample["segment_ids"].numpy()
        expected = segment_of[i * 6 : (i + 1) * 6]
        assert seg[0] == 0
        assert np.array_equal(np.diff(seg) != 0, np.diff(expected) != 0)
        assert np.array_equal(
            sample["targets"].numpy() == IGNORE_INDEX, segment_of[i * 6 + 1 : (i + 1) * 6 + 1] != expected
        )


def test_seed_fixes_order(store: DocumentStore) -> None:
    a, b, c = (PackedDataset(store, SEQ, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(_samples(a), _samples(b), strict=True))
    assert not np.array_equal(a.order, c.order)
    assert not torch.equal(a[0]["tokens"], c[0]["tokens"])


def test_dataset_rejects_bad_arguments(store: DocumentStore) -> None:
    with pytest.raises(ValueError, match="doc_ids must lie in"):
        PackedDataset(store, SEQ, seed=0, doc_ids=np.array([0, store.n_docs]))
    with pytest.raises(ValueError, match="fewer than one sample"):
        PackedDataset(DocumentStore.from_docs([[1, 2, 3]]), 3, seed=0)
    with pytest.raises(IndexError):
        PackedDataset(store, SEQ, seed=0)[10_000]


@pytest.mark.parametrize("k", [0, 3, 7, 10, 23])
def test_sampler_resumes_at_any_position(k: int) -> None:
    full = list(islice(iter(ResumableSampler(7, seed=5)), 30))  # crosses four epoch boundaries
    resumed = list(islice(iter(ResumableSampler(7, seed=5, start=k)), 30 - k))
    assert resumed == full[k:]
    assert sorted(full[:7]) == list(range(7)) and sorted(full[7:14]) == list(range(7))
    assert full[:7] != full[7:14]  # every epoch has its own order


def test_sampler_epochs_length_and_state() -> None:
    sampler = ResumableSampler(5, seed=1, epochs=2)
    assert len(sampler) == 10
    it = iter(sampler)
    head = [next(it) for _ in range(6)]
    state = sampler.state_dict()
    assert state["position"] == 6
    other = ResumableSampler(5, seed=1, epochs=2)
    other.load_state_dict(state)
    assert len(other) == 4
    assert head + list(other) == list(ResumableSampler(5, seed=1, epochs=2))
    with pytest.raises(ValueError, match="seed=2"):
        ResumableSampler(5, seed=2).load_state_dict(state)
    with pytest.raises(TypeError, match="endless"):
        len(ResumableSampler(5, seed=1))


@pytest.mark.parametrize("k", [0, 8, 11])
def test_loader_start_sample_equals_skipping(store: DocumentStore, k: int) -> None:
    ds = PackedDataset(store, SEQ, seed=0)
    n_batches, batch = 5, 4
    stream = list(islice(iter(ResumableSampler(len(ds), seed=9)), k + n_batches * batch))[k:]
    expected = [torch.stack([ds[i]["tokens"] for i in stream[b * batch : (b + 1) * batch]]) for b in range(n_batches)]
    loader = make_loader(ds, batch, seed=9, start_sample=k)
    got = list(islice(iter(loader), n_batches))
    assert all(set(b) == {"tokens", "targets", "segment_ids"} and b["tokens"].shape == (batch, SEQ) for b in got)
    assert all(torch.equal(g["tokens"], e) for g, e in zip(got, expected, strict=True))
    if k % batch == 0:  # resuming at a batch boundary continues the uninterrupted run's batches
        uninterrupted = list(islice(iter(make_loader(ds, batch, seed=9)), k // batch + n_batches))[k // batch :]
        assert all(torch.equal(g["targets"], u["targets"]) for g, u in zip(got, uninterrupted, strict=True))


def _lengths(seed: int = 0) -> np.ndarray:
    """A heavy-tailed length distribution: mostly short documents, a few long ones (~10% of tokens long)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(1, 1000, size=2000), rng.integers(4096, 20_000, size=10)])


@pytest.mark.parametrize(("fraction", "total"), [(0.5, None), (0.25, 3_000_000), (0.9, 200_000)])
def test_mix_hits_long_fraction(fraction: float, total: int | None) -> None:
    lengths = _lengths()
    ids = mix_documents(lengths, long_threshold=4096, long_fraction=fraction, seed=0, total_tokens=total)
    long_share, short_share = long_short_token_share(lengths, ids, 4096)
    assert long_share == pytest.approx(fraction, rel=0.1)
    assert long_share + short_share == pytest.approx(1.0)
    assert int(lengths[ids].sum()) == pytest.approx(total or int(lengths.sum()), rel=0.1)
    assert np.array_equal(
        ids, mix_documents(lengths, long_threshold=4096, long_fraction=fraction, seed=0, total_tokens=total)
    )


def test_mix_repeats_scarce_long_documents() -> None:
    lengths = _lengths()
    ids = mix_documents(lengths, long_threshold=4096, long_fraction=0.5, seed=1)
    long_ids = ids[lengths[ids] >= 4096]
    assert len(long_ids) > len(np.unique(long_ids))  # only ~10% of tokens are long, so long docs repeat


def test_mix_raises_for_missing_pools() -> None:
    with pytest.raises(ValueError, match="long_threshold=4096"):
        mix_documents(np.array([10, 20, 30]), long_threshold=4096, long_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="long_threshold=5"):
        mix_documents(np.array([10, 20, 0]), long_threshold=5, long_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="long_fraction"):
        mix_documents(np.array([10, 20]), long_threshold=15, long_fraction=1.5, seed=0)


def test_corrupt_shard_file_is_named(tmp_path: Path) -> None:
    tokens, offsets = tmp_path / "a.tokens.npy", tmp_path / "a.offsets.npy"
    np.save(tokens, np.arange(100, dtype=np.uint32))
    np.save(offsets, np.array([0, 40, 100], dtype=np.int64))
    assert DocumentStore.from_shards([(tokens, offsets)]).n_docs == 2
    tokens.write_bytes(tokens.read_bytes()[:150])  # truncated mid-array, as a crashed copy would leave it
    with pytest.raises(ValueError, match=r"shard file .*a\.tokens\.npy: unreadable, truncated"):
        DocumentStore.from_shards([(tokens, offsets)])
