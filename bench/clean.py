"""Throughput of our rule chain against datatrove's Gopher quality + Gopher repetition + C4 filters, same documents.

Documents: the built-in corpus (tiny preset: 3,000 text documents of man pages, READMEs, licences, docstrings),
parsed and normalised first (not timed). Both sides run the same three rule sets at datatrove's defaults (C4's
curly-brace rule on, as in datatrove): ours is `annotate` + `apply_rules` over the whole frame, datatrove's is its
per-document `filter()` chain, stopping at the first filter that drops a document, as its pipeline does.

Per core: this process pins polars to one thread (POLARS_MAX_THREADS=1, set before polars is imported) and runs
ours and datatrove as alternating A/B pairs. Polars reads that variable once, so the all-cores figure for ours comes
from a child process of this script; datatrove's is its per-core figure (it scales by running more processes).

datatrove's English word tokenizer is NLTK's, which loads the Punkt model from nltk_data (a download). With no
network, datatrove here gets the same two NLTK algorithms without the trained parameters (an untrained
`PunktSentenceTokenizer` + `NLTKWordTokenizer`): same code path and cost, slightly different sentence splits.

    python bench/clean.py                 # prints a table; the last line is one JSON object
    python bench/clean.py --docs 1000 --repeats 5
"""

from __future__ import annotations

import os
import sys

if "--child" not in sys.argv:
    os.environ["POLARS_MAX_THREADS"] = "1"  # before polars is imported anywhere

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable  # noqa: E402

import polars as pl  # noqa: E402

from infra import storage  # noqa: E402
from tasks.clean.parse import normalize, parse_shard  # noqa: E402
from tasks.clean.rules import Rule, apply_rules, c4_rules, gopher_quality_rules, gopher_repetition_rules  # noqa: E402
from tasks.corpus import build_corpus, corpus_config  # noqa: E402


def load_docs(corpus_url: str | None, limit: int) -> pl.DataFrame:
    """Parsed, normalised built-in corpus documents (built into a temporary folder unless a corpus is given)."""
    with tempfile.TemporaryDirectory(prefix="bench-clean-") as tmp:
        url = corpus_url or tmp
        if corpus_url is None:
            build_corpus(url, corpus_config("tiny"))
        shards = storage.list_files(storage.join(url, "text"), "shard-*.jsonl")
        docs = pl.concat([parse_shard(storage.read_bytes(u), u).docs for u in shards])
    return normalize(docs.head(limit))


def our_rules() -> list[Rule]:
    return gopher_quality_rules() + gopher_repetition_rules() + c4_rules(curly_brace=True)


def run_ours(docs: pl.DataFrame) -> tuple[float, list[str | None]]:
    """Seconds for the whole chain, and per document the reason (None = kept)."""
    start = time.perf_counter()
    kept, removed = apply_rules(docs, our_rules())
    seconds = time.perf_counter() - start
    reasons = dict(zip(removed["id"], removed["reason"], strict=True))
    return seconds, [reasons.get(i) for i in docs["id"]]


def datatrove_chain() -> Callable[[str, str], str | None]:
    """datatrove's three filters with an offline NLTK tokenizer; returns text → reason (None = kept)."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.utils.word_tokenizers import WordTokenizer, strip_strings
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    class OfflineNLTK(WordTokenizer):
        """nltk.word_tokenize's algorithm (Punkt sentences, then Treebank-style words) without downloaded data."""

        def __init__(self) -> None:
            self.sentences, self.words = PunktSentenceTokenizer(), NLTKWordTokenizer()

        def word_tokenize(self, text: str) -> list[str]:
            return strip_strings([w for s in self.sentences.tokenize(text) for w in self.words.tokenize(s)])

        def sent_tokenize(self, text: str) -> list[str]:
            return strip_strings(self.sentences.tokenize(text))

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return list(self.sentences.span_tokenize(text))

    filters = [GopherQualityFilter(), GopherRepetitionFilter(), C4QualityFilter()]
    for f in filters:
        f.tokenizer = OfflineNLTK()

    def run(doc_id: str, text: str) -> str | None:
        doc = Document(text=text, id=doc_id)
        for f in filters:
            result = f.filter(doc)
            if result is not True:
                return f"{f.name}:{result[1] if isinstance(result, tuple) else 'dropped'}"
        return None

    return run


def run_datatrove(docs: pl.DataFrame, chain: Callable[[str, str], str | None]) -> tuple[float, list[str | None]]:
    start = time.perf_counter()
    reasons = [chain(i, t) for i, t in zip(docs["id"], docs["text"], strict=True)]
    return time.perf_counter() - start, reasons


def child_main(args: argparse.Namespace) -> None:
    """All-cores run of ours only: one JSON line with the best time."""
    docs = pl.read_parquet(args.child)
    times = [run_ours(docs)[0] for _ in range(args.repeats)]
    print(json.dumps({"threads": pl.thread_pool_size(), "seconds": min(times)}))


def all_cores(docs: pl.DataFrame, repeats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-clean-") as tmp:
        path = os.path.join(tmp, "docs.parquet")
        docs.write_parquet(path)
        env = {k: v for k, v in os.environ.items() if k != "POLARS_MAX_THREADS"}
        cmd = [sys.executable, __file__, "--child", path, "--repeats", str(repeats)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def agreement(ours: list[str | None], theirs: list[str | None]) -> dict[str, float]:
    same = sum((a is None) == (b is None) for a, b in zip(ours, theirs, strict=True))
    return {"decisions_agree": same / len(ours), "ours_kept": ours.count(None), "datatrove_kept": theirs.count(None)}


def print_table(rows: list[tuple[str, int, float, int]], n_docs: int) -> None:
    print(f"{'implementation':40s} {'threads':>7s} {'seconds':>8s} {'docs/s':>9s} {'docs/s/core':>12s} {'kept':>6s}")
    for name, threads, seconds, kept in rows:
        rate = n_docs / seconds
        print(f"{name:40s} {threads:7d} {seconds:8.3f} {rate:9.0f} {rate / threads:12.0f} {kept:6d}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=None, help="an existing built-in corpus URL (default: build tiny)")
    p.add_argument("--docs", type=int, default=3000, help="at most this many documents")
    p.add_argument("--repeats", type=int, default=3, help="A/B pairs; the median time of each side is reported")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args)
    docs = load_docs(args.corpus, args.docs)
    chain = datatrove_chain()
    ours_t, theirs_t = [], []
    for _ in range(args.repeats):  # alternate, so drifting machine load hits both sides alike
        ours_s, ours_reasons = run_ours(docs)
        theirs_s, theirs_reasons = run_datatrove(docs, chain)
        ours_t.append(ours_s)
        theirs_t.append(theirs_s)
    ours_s, theirs_s = statistics.median(ours_t), statistics.median(theirs_t)
    multi = all_cores(docs, args.repeats)
    agree = agreement(ours_reasons, theirs_reasons)
    print_table(
        [
            ("datatrove Gopher Q + Gopher R + C4", 1, theirs_s, int(agree["datatrove_kept"])),
            ("lmforge annotate + apply_rules", 1, ours_s, int(agree["ours_kept"])),
            ("lmforge annotate + apply_rules (all)", int(multi["threads"]), multi["seconds"], int(agree["ours_kept"])),
        ],
        len(docs),
    )
    print("datatrove reasons:", dict(Counter(r for r in theirs_reasons if r).most_common(8)))
    print("our reasons:      ", dict(Counter(r for r in ours_reasons if r).most_common(8)))
    per_core_ratio = theirs_s / ours_s
    figures = {
        "docs": len(docs),
        "mb": round(docs["text"].str.len_bytes().sum() / 1e6, 2),
        "datatrove_docs_per_s_per_core": round(len(docs) / theirs_s, 1),
        "ours_docs_per_s_per_core": round(len(docs) / ours_s, 1),
        "ours_docs_per_s_all_cores": round(len(docs) / multi["seconds"], 1),
        "all_cores_threads": multi["threads"],
        "ratio_ours_over_datatrove_per_core": round(per_core_ratio, 2),
        **{k: round(v, 3) for k, v in agree.items()},
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
