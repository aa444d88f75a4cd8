"""MinHash signatures from raw text: our numpy stage against datasketch and rensa, plus LSH precision/recall at 0.7.

Throughput: the same documents (the built-in corpus's text shards, preset "tiny": ~3,000 docs, ~2.9 KB mean) go
through each method in alternating rounds in one process, pinned to one core with single-threaded numpy, polars
and rayon; each figure is the median of the rounds. All produce 128-slot signatures of word 5-gram shingles:
- ours: `hash_texts` (lowercase, word split, token and shingle hashing, MinHash: all numpy over a batch);
- datasketch: `MinHash(num_perm=128).update_batch` of the usual Python shingles (`" ".join` of 5 words from
  `text.lower().split()`), one object per document;
- rensa: `RMinHash(num_perm=128, seed=1).update` of the same shingles, one object per document; and, for scale,
  rensa on prebuilt shingles (library time alone, Python shingling excluded).

Precision/recall: the planted near-duplicate set of `tests/tasks/test_dedup.py` (stdlib docstrings with edits,
reorders, whitespace and boilerplate; truth = exact Jaccard of word 5-gram sets, pairs with J in [0.65, 0.75]
unscored). "pairs" = LSH candidates whose estimated Jaccard is >= 0.7: ours with our 21x6 bands, datasketch with
`MinHashLSH(threshold=0.7, num_perm=128)` (its own 14x9 bands), rensa with `RMinHashLSH(0.7, 128, num_bands=16)`
(16x8, the b*r=128 split whose S-curve threshold is nearest 0.7). "clusters" = our full stage pipeline, scored
on all pairs within a cluster (as the test does). The last line is one JSON object with every figure.

    python bench/dedup.py [--rounds 3] [--docs 3000]
"""

# ruff: noqa: E402  (the thread-count variables must be set before numpy, polars and rensa are imported)
from __future__ import annotations

import os

for _var in ("POLARS_MAX_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/polars/rensa start their pools

import argparse
import importlib.util
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python bench/dedup.py` from anywhere

from infra import storage
from tasks.clean.dedup import DedupConfig, band_hashes, dedup_frames, estimated_jaccard, hash_texts
from tasks.corpus import build_corpus, corpus_config

NUM_PERM, NGRAM, THRESHOLD, SEED = 128, 5, 0.7, 1
RENSA_BANDS = 16
Pairs = set[tuple[int, int]]


def load_planted_module() -> ModuleType:
    """The test module holds the planted-set generator and the reference Jaccard: one definition for both."""
    spec = importlib.util.spec_from_file_location("planted_dedup", ROOT / "tests" / "tasks" / "test_dedup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def corpus_texts(limit: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as tmp:
        build_corpus(tmp, corpus_config("tiny"))
        shards = storage.list_files(storage.join(tmp, "text"), "*.jsonl")
        texts = pl.concat([pl.read_ndjson(s).select("text") for s in shards])["text"].to_list()
    return texts[:limit]


def shingles(text: str) -> list[str]:
    """The usual Python 5-gram shingles: whitespace words, joined back with single spaces."""
    words = text.lower().split()
    if len(words) < NGRAM:
        return [" ".join(words)] if words else []
    return [" ".join(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)]


# ---------------------------------------------------------------- signature makers (raw text → signatures)


def ours(texts: list[str]) -> np.ndarray:
    signature = hash_texts(texts, DedupConfig()).signature
    assert signature is not None
    return signature


def datasketch_sigs(texts: list[str]) -> list:
    from datasketch import MinHash

    out = []
    for text in texts:
        m = MinHash(num_perm=NUM_PERM, seed=SEED)
        m.update_batch([s.encode("utf-8") for s in shingles(text)])
        out.append(m)
    return out


def rensa_sigs(texts: list[str]) -> list:
    from rensa import RMinHash

    out = []
    for text in texts:
        m = RMinHash(num_perm=NUM_PERM, seed=SEED)
        m.update(shingles(text))
        out.append(m)
    return out


def rensa_prebuilt(prebuilt: list[list[str]]) -> Callable[[list[str]], list]:
    from rensa import RMinHash

    def run(texts: list[str]) -> list:
        out = []
        for tokens in prebuilt:
            m = RMinHash(num_perm=NUM_PERM, seed=SEED)
            m.update(tokens)
            out.append(m)
        return out

    return run


def throughput(makers: dict[str, Callable[[list[str]], object]], texts: list[str], rounds: int) -> dict[str, float]:
    """Median docs/s per maker over `rounds` alternating rounds (after one warm-up call each on a small slice)."""
    for make in makers.values():
        make(texts[:50])
    rates: dict[str, list[float]] = {name: [] for name in makers}
    for _ in range(rounds):
        for name, make in makers.items():
            start = time.perf_counter()
            make(texts)
            rates[name].append(len(texts) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


# ---------------------------------------------------------------- precision / recall on the planted set


def ours_pairs(texts: list[str]) -> Pairs:
    cfg = DedupConfig()
    hashed = hash_texts(texts, cfg)
    assert hashed.signature is not None
    bands = band_hashes(hashed.signature, cfg)
    candidates: Pairs = set()
    for k in range(cfg.n_bands):
        buckets: dict[int, list[int]] = {}
        for doc, h in enumerate(bands[:, k].tolist()):
            if hashed.shingles[doc]:
                buckets.setdefault(h, []).append(doc)
        candidates.update(p for docs in buckets.values() for p in itertools.combinations(docs, 2))
    left, right = (np.array(side, dtype=np.int64) for side in zip(*sorted(candidates), strict=True))
    keep = estimated_jaccard(hashed.signature, left, right) >= THRESHOLD
    return {(int(a), int(b)) for a, b, ok in zip(left, right, keep, strict=True) if ok}


def lsh_pairs(sigs: list, lsh: object, insert: Callable, query: Callable) -> Pairs:
    for i, m in enumerate(sigs):
        insert(lsh, i, m)
    found: Pairs = set()
    for i, m in enumerate(sigs):
        for j in query(lsh, m):
            j = int(j)
            if j != i and sigs[i].jaccard(sigs[j]) >= THRESHOLD:
                found.add((min(i, j), max(i, j)))
    return found


def datasketch_pairs(texts: list[str]) -> Pairs:
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    return lsh_pairs(datasketch_sigs(texts), lsh, lambda x, i, m: x.insert(i, m), lambda x, m: x.query(m))


def rensa_pairs(texts: list[str]) -> Pairs:
    from rensa import RMinHashLSH

    lsh = RMinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, num_bands=RENSA_BANDS)
    return lsh_pairs(rensa_sigs(texts), lsh, lambda x, i, m: x.insert(i, m), lambda x, m: x.query(m))


def cluster_pairs(planted: Any, module: ModuleType) -> set[tuple[str, str]]:
    with tempfile.TemporaryDirectory(prefix="bench-dedup-pr-") as work:
        dedup_frames({"all": planted.frame}, work)
        return module.cluster_pairs(Path(work))


def precision_recall(module: ModuleType) -> dict[str, dict[str, float]]:
    planted = module.planted_corpus()
    ids = planted.frame["id"].to_list()
    texts = planted.frame["text"].to_list()
    results = {}
    for name, find in (("ours", ours_pairs), ("datasketch", datasketch_pairs), ("rensa", rensa_pairs)):
        pairs = {tuple(sorted((ids[a], ids[b]))) for a, b in find(texts)}
        results[name] = module.score(planted, pairs)
    results["ours (clusters)"] = module.score(planted, cluster_pairs(planted, module))
    return {name: {"precision": s.precision, "recall": s.recall, "tp": s.tp, "fp": s.fp, "fn": s.fn}
            for name, s in results.items()}


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=3000, help="documents from the tiny corpus (it has ~3,000)")
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per method")
    p.add_argument("--no-pr", action="store_true", help="skip precision/recall on the planted set")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, whatever pools a library starts
    texts = corpus_texts(args.docs)
    mean_bytes = statistics.mean(len(t.encode("utf-8")) for t in texts)
    makers: dict[str, Callable[[list[str]], object]] = {
        "ours": ours, "rensa": rensa_sigs, "datasketch": datasketch_sigs,
        "rensa (shingles prebuilt)": rensa_prebuilt([shingles(t) for t in texts]),
    }
    rates = throughput(makers, texts, args.rounds)
    print(f"{len(texts)} docs, mean {mean_bytes:,.0f} bytes, one core, median of {args.rounds} alternating rounds")
    print(f"{'method':<28}{'docs/s':>10}{'ours / it':>12}")
    for name, rate in rates.items():
        print(f"{name:<28}{rate:>10,.0f}{rates['ours'] / rate:>12.2f}")
    results: dict[str, object] = {
        "docs": len(texts), "mean_bytes": mean_bytes, "rounds": args.rounds, "docs_per_s": rates,
        "ours_over_rensa": rates["ours"] / rates["rensa"], "ours_over_datasketch": rates["ours"] / rates["datasketch"],
    }
    results["goal_met"] = results["ours_over_rensa"] >= 1.0 and results["ours_over_datasketch"] >= 5.0
    if not args.no_pr:
        pr = precision_recall(load_planted_module())
        print(f"\n{'planted set @ 0.7':<28}{'precision':>10}{'recall':>10}{'tp':>6}{'fp':>6}{'fn':>6}")
        for name, s in pr.items():
            print(f"{name:<28}{s['precision']:>10.3f}{s['recall']:>10.3f}{s['tp']:>6}{s['fp']:>6}{s['fn']:>6}")
        results["precision_recall"] = pr
    print(json.dumps(results))


if __name__ == "__main__":
    main()
