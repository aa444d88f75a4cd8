"""Does the perplexity-difference filter tell coherent long text from the same text shuffled? And how fast is it?

Takes `--n` documents of a cleaned corpus (``text/*.jsonl``) with at least two segments of tokens, cuts each to a
whole number of segments, and builds a shuffled twin: the same segments in a random order (never the original
one). Both are scored with `tasks.longtext.perplexity.score_token_ids` (`context_gain`, batched across documents).
A filter that works gives the coherent version the larger gain for most documents; the shuffled twin is the hard
case (same topic, same vocabulary, only the order broken), not the easy one of unrelated text.

Reports: the share of documents whose coherent version gains more, the mean gains of both, the share of each with a
negative gain (dropped at the default ``min_gain=0``), per source, and documents scored per second (both versions
count). The last line is one JSON object.

    python bench/longtext_ppl.py --checkpoint runs/tiny/pretrain/phase1_short/final \\
        --tokenizer runs/tiny/tokenizer/tokenizer.json --corpus runs/tiny/clean --n 60
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# bench/model_step.py shares its name with the `model` package: keep this folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from infra import storage  # noqa: E402
from model.checkpoint import load_model  # noqa: E402
from model.tokenizer import Tokenizer  # noqa: E402
from tasks.longtext.perplexity import score_token_ids  # noqa: E402


def read_corpus(corpus_url: str) -> list[dict]:
    """Records of ``text/*.jsonl`` under a cleaned (or raw) corpus."""
    shards = storage.list_files(storage.join(corpus_url, "text"), "*.jsonl")
    if not shards:
        raise SystemExit(f"no text/*.jsonl under {corpus_url!r}: pass a corpus or cleaned-corpus directory")
    return [json.loads(line) for url in shards for line in storage.read_bytes(url).splitlines() if line.strip()]


def pick(records: list[dict], tok: Tokenizer, seg: int, n: int, rng: np.random.Generator) -> list[tuple[str, list]]:
    """(source, token ids cut to whole segments) for up to `n` random documents of at least two segments."""
    ids = tok.encode_batch([r["text"] for r in records])
    long = [i for i, t in enumerate(ids) if len(t) >= 2 * seg]
    chosen = sorted(rng.choice(long, size=min(n, len(long)), replace=False)) if long else []
    return [(str(records[i].get("source")), ids[i][: len(ids[i]) // seg * seg]) for i in chosen]


def shuffled(ids: list[int], seg: int, rng: np.random.Generator) -> list[int]:
    """The same segments in a random order other than the original."""
    n = len(ids) // seg
    order = np.arange(n)
    while (order == np.arange(n)).all():
        order = rng.permutation(n)
    return [t for k in order for t in ids[k * seg : (k + 1) * seg]]


def report(sources: list[str], coherent: np.ndarray, shuffled_gain: np.ndarray, seconds: float, args) -> dict:
    per_source = {}
    for source in sorted(set(sources)):
        mask = np.array([s == source for s in sources])
        per_source[source] = {
            "docs": int(mask.sum()),
            "coherent_wins": round(float((coherent[mask] > shuffled_gain[mask]).mean()), 3),
        }
    return {
        "docs": len(sources),
        "segment_tokens": args.segment_tokens,
        "max_pairs": args.max_pairs,
        "coherent_wins": round(float((coherent > shuffled_gain).mean()), 3),
        "mean_gain_coherent": round(float(coherent.mean()), 4),
        "mean_gain_shuffled": round(float(shuffled_gain.mean()), 4),
        "negative_coherent": round(float((coherent < 0).mean()), 3),
        "negative_shuffled": round(float((shuffled_gain < 0).mean()), 3),
        "docs_per_s": round(2 * len(sources) / seconds, 2),
        "seconds": round(seconds, 2),
        "per_source": per_source,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="anything load_model reads (lmforge dir, .ckpt, HF dir)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json matching the checkpoint")
    parser.add_argument("--corpus", required=True, help="a corpus directory holding text/*.jsonl")
    parser.add_argument("--n", type=int, default=60, help="documents to score")
    parser.add_argument("--segment-tokens", type=int, default=None, help="default: min(1024, max_seq_len // 2)")
    parser.add_argument("--max-pairs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint).to(args.device)
    tok = Tokenizer.from_file(args.tokenizer)
    if tok.vocab_size != model.config.vocab_size:
        raise SystemExit(f"{args.tokenizer}: {tok.vocab_size} tokens, the model has {model.config.vocab_size}")
    args.segment_tokens = args.segment_tokens or min(1024, model.config.max_seq_len // 2)
    rng = np.random.default_rng(args.seed)
    docs = pick(read_corpus(args.corpus), tok, args.segment_tokens, args.n, rng)
    if not docs:
        raise SystemExit(f"no document of {2 * args.segment_tokens}+ tokens under {args.corpus!r}")
    twins = [shuffled(ids, args.segment_tokens, rng) for _, ids in docs]
    start = time.perf_counter()
    coherent = score_token_ids(model, [ids for _, ids in docs], args.segment_tokens, args.max_pairs, args.batch_size)
    shuffled_gain = score_token_ids(model, twins, args.segment_tokens, args.max_pairs, args.batch_size)
    result = report([s for s, _ in docs], coherent, shuffled_gain, time.perf_counter() - start, args)
    print(
        f"model {args.checkpoint} ({model.config.num_params() / 1e6:.1f}M params, ctx {model.config.max_seq_len}), "
        f"{result['docs']} docs, segments of {args.segment_tokens} tokens, <= {args.max_pairs} pairs, {args.device}"
    )
    print(
        f"coherent beats shuffled: {result['coherent_wins']:.1%}   mean gain coherent "
        f"{result['mean_gain_coherent']:+.4f}  shuffled {result['mean_gain_shuffled']:+.4f} nats/token"
    )
    print(
        f"negative gain (dropped at min_gain=0): coherent {result['negative_coherent']:.1%}, shuffled "
        f"{result['negative_shuffled']:.1%}   {result['docs_per_s']} docs/s"
    )
    for source, row in result["per_source"].items():
        print(f"  {source:<16} {row['docs']:>4} docs   coherent wins {row['coherent_wins']:.1%}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
