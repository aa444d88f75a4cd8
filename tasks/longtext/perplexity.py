"""The perplexity-difference filter for long documents (InternLM2 §3.1.3), scored with our own `InternLM2`.

The paper: for consecutive segments S1, S2 of a document, compare P(S2 | S1) with P(S2); if S1 makes S2 harder to
predict, the text is incoherent (unrelated pieces stitched together, shuffled boilerplate) and is dropped, with
thresholds per domain and language. Ours, exactly:

- The document's tokens are cut into consecutive segments of `segment_tokens` (a partial last segment is not used);
  each consecutive pair (S_i, S_{i+1}) is one measurement, and `max_pairs` caps them by taking evenly spaced pairs
  (first and last included), so a book costs no more than an article.
- ``nll_alone``: the mean next-token NLL of S_{i+1}'s tokens 2..L when S_{i+1} is a sequence of its own;
  ``nll_with_context``: the same tokens' NLL when S_{i+1} follows S_i in one sequence of 2L tokens. Token 1 of
  S_{i+1} is left out of both: alone it has no context at all, which would hand the "with context" side a free win.
- The document's *context gain* is the mean over its pairs of ``nll_alone - nll_with_context``, in nats per token:
  positive = the preceding segment helps (coherent long text), zero or negative = it does not. Documents with fewer
  than two full segments have no gain (NaN, kept).
- `PerplexityConfig.min_gain` drops documents whose gain is below it; the default 0.0 is the paper's rule (drop when
  the context makes the next segment *harder*). Per-source thresholds (`min_gain_by_source`) override it, since
  code and prose gain differently from context; tune them on borderline samples, as the paper does
  (``bench/longtext_ppl.py`` prints the gains of coherent and shuffled documents). On the tiny preset's phase-1
  checkpoint (5.2M parameters, 128-token segments, 4 pairs), 60 documents of the built-in corpus against the same
  documents with their segments shuffled: the coherent version gains more for 92 % of them (mean gain +0.057 against
  −0.085 nats/token), and ``min_gain=0`` would drop 3 % of the coherent and 68 % of the shuffled versions.

Departures: LongWanjuan (a public implementation) scores each 4,096-token chunk's last 1,024 tokens with the whole
chunk as context against 1,024 tokens of context; we compare no context with one segment of context, so a pair fits
a short-context model (2·segment_tokens must not exceed ``max_seq_len``), and no BOS is put before a segment: both
sequences start mid-document alike. Forward passes are batched across pairs and documents (every sequence of a
batch has the same length, so there is no padding), run under ``torch.inference_mode`` in the model's dtype (fp32
as `load_model` returns it) unless `autocast` is given, and the NLL is computed from the hidden states in row
chunks, so the (tokens × vocab) logits of a long batch never exist at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from model.loss import default_chunk
from model.model import InternLM2
from tasks.clean.safety import split_by_reason
from tasks.longtext.filters import STAGE

REASON = "long_ppl_no_context_gain"
GAIN = "ppl_gain"
DOC_CHUNK = 256  # documents tokenised and windowed at a time: bounds the token windows held in memory


class TokenEncoder(Protocol):
    """What the filter needs of a tokenizer (`model.tokenizer.Tokenizer` is one)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class PerplexityConfig(BaseModel):
    """Perplexity-difference filter; `min_gain=None` and no per-source thresholds turn it off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    segment_tokens: int = Field(1024, ge=2, description="tokens per segment; a pair spans twice this")
    max_pairs: int | None = Field(8, ge=1, description="evenly spaced segment pairs scored per document")
    batch_size: int = Field(8, ge=1, description="segment pairs per forward pass")
    min_gain: float | None = Field(0.0, description="drop below this context gain (nats/token); None = off")
    min_gain_by_source: dict[str, float] = Field(default_factory=dict, description="per-`source` thresholds")


# ---------------------------------------------------------------- scoring


def pair_starts(n_tokens: int, segment_tokens: int, max_pairs: int | None) -> np.ndarray:
    """Token offsets of S_i for the scored pairs (S_i, S_{i+1}); empty under two full segments."""
    n_pairs = n_tokens // segment_tokens - 1
    if n_pairs < 1:
        return np.zeros(0, dtype=np.int64)
    if max_pairs is None or n_pairs <= max_pairs:
        index = np.arange(n_pairs)
    else:  # step (n_pairs-1)/(max_pairs-1) > 1, so rounding never repeats a pair
        index = np.linspace(0, n_pairs - 1, max_pairs).round().astype(np.int64)
    return index * segment_tokens


def _windows(token_ids: Sequence[int], segment_tokens: int, max_pairs: int | None) -> np.ndarray:
    """(pairs, 2·segment_tokens) int64: S_i followed by S_{i+1} for each scored pair."""
    ids = np.asarray(token_ids, dtype=np.int64)
    starts = pair_starts(len(ids), segment_tokens, max_pairs)
    return ids[starts[:, None] + np.arange(2 * segment_tokens)]


def _check_model(model: InternLM2, segment_tokens: int, max_pairs: int | None, batch_size: int) -> None:
    if segment_tokens < 2:
        raise ValueError(f"segment_tokens must be >= 2 (token 1 of a segment is not scored), got {segment_tokens}")
    if 2 * segment_tokens > model.config.max_seq_len:
        raise ValueError(
            f"segment_tokens={segment_tokens}: a pair is {2 * segment_tokens} tokens, longer than the "
            f"model's context max_seq_len={model.config.max_seq_len}; use at most "
            f"{model.config.max_seq_len // 2}"
        )
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be None or >= 1, got {max_pairs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _mean_nll(model: InternLM2, tokens: Tensor, start: int) -> Tensor:
    """Per row of `tokens` (B, T): mean NLL (fp32) of tokens start+1..T-1, each predicted from all before it."""
    hidden = model.hidden_states(tokens)[:, start:-1]  # (B, n, dim): the positions that predict the scored tokens
    B, n, _ = hidden.shape
    flat, targets = hidden.reshape(B * n, -1), tokens[:, start + 1 :].reshape(B * n)
    weight = model.output.weight  # (V, dim)
    chunk = default_chunk(weight.shape[0])
    nll = torch.empty(B * n, dtype=torch.float32, device=tokens.device)
    for s in range(0, B * n, chunk):
        logits = (flat[s : s + chunk] @ weight.t()).float()  # (c, V)
        target = logits.gather(1, targets[s : s + chunk, None]).squeeze(1)
        nll[s : s + chunk] = torch.logsumexp(logits, dim=-1) - target
    return nll.view(B, n).mean(dim=1)


def pair_gains(
    model: InternLM2, windows: np.ndarray, batch_size: int = 8, autocast: torch.dtype | None = None
) -> np.ndarray:
    """nll_alone − nll_with_context (float64) for each row of `windows` (pairs, 2L): S_i then S_{i+1}."""
    L = windows.shape[1] // 2
    device = model.output.weight.device
    gains = np.empty(len(windows), dtype=np.float64)
    amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with torch.inference_mode(), amp:
        for s in range(0, len(windows), batch_size):
            pair = torch.from_numpy(windows[s : s + batch_size]).to(device)  # (b, 2L)
            alone = _mean_nll(model, pair[:, L:], 0)  # S_{i+1} on its own: tokens 2..L
            with_context = _mean_nll(model, pair, L)  # the same tokens after S_i
            gains[s : s + batch_size] = (alone - with_context).double().cpu().numpy()
    return gains


def context_gain(
    model: InternLM2,
    token_ids: Sequence[int],
    segment_tokens: int,
    max_pairs: int | None = None,
    batch_size: int = 8,
    autocast: torch.dtype | None = None,
) -> float | None:
    """Mean context gain (nats/token) of one document's segment pairs; None under two full segments."""
    _check_model(model, segment_tokens, max_pairs, batch_size)
    windows = _windows(token_ids, segment_tokens, max_pairs)
    if not len(windows):
        return None
    return float(pair_gains(model, windows, batch_size, autocast).mean())


def score_token_ids(
    model: InternLM2,
    docs: Sequence[Sequence[int]],
    segment_tokens: int,
    max_pairs: int | None = 8,
    batch_size: int = 8,
    autocast: torch.dtype | None = None,
) -> np.ndarray:
    """`context_gain` of every document (NaN where it is None), with pairs of several documents in one batch."""
    _check_model(model, segment_tokens, max_pairs, batch_size)
    per_doc = [_windows(ids, segment_tokens, max_pairs) for ids in docs]
    counts = np.array([len(w) for w in per_doc])
    out = np.full(len(docs), np.nan)
    if counts.sum():
        gains = pair_gains(model, np.concatenate(per_doc), batch_size, autocast)
        owner = np.repeat(np.arange(len(docs)), counts)
        sums = np.bincount(owner, weights=gains, minlength=len(docs))
        scored = counts > 0
        out[scored] = sums[scored] / counts[scored]
    return out


def _chunks(texts: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for s in range(0, len(texts), size):
        yield texts[s : s + size]


def score_documents(
    model: InternLM2,
    tokenizer: TokenEncoder,
    texts: Sequence[str],
    segment_tokens: int,
    max_pairs: int | None = 8,
    batch_size: int = 8,
    autocast: torch.dtype | None = None,
) -> np.ndarray:
    """Context gain of each text (float64, NaN for texts under two full segments); no BOS/EOS added."""
    texts = list(texts)
    parts = [
        score_token_ids(model, tokenizer.encode_batch(chunk), segment_tokens, max_pairs, batch_size, autocast)
        for chunk in _chunks(texts, DOC_CHUNK)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


# ---------------------------------------------------------------- the filter


def _threshold(cfg: PerplexityConfig) -> pl.Expr | None:
    """Each row's minimum gain (null = not judged), or None when the filter is off."""
    if cfg.min_gain is None and not cfg.min_gain_by_source:
        return None
    default = pl.lit(cfg.min_gain, dtype=pl.Float64)
    if not cfg.min_gain_by_source:
        return default
    return pl.col("source").replace_strict(cfg.min_gain_by_source, default=default, return_dtype=pl.Float64)


def _check_frame(df: pl.DataFrame, cfg: PerplexityConfig) -> None:
    if "text" not in df.columns or df.schema["text"] != pl.Utf8:
        raise ValueError(f"ppl_filter needs a String 'text' column; got schema {dict(df.schema)}")
    if cfg.min_gain_by_source and "source" not in df.columns:
        raise ValueError(
            f"min_gain_by_source {sorted(cfg.min_gain_by_source)} needs a 'source' column; got columns {df.columns}"
        )
    clash = [c for c in (GAIN, "stage", "reason") if c in df.columns]
    if clash:
        raise ValueError(f"columns {clash} are written by ppl_filter: drop or rename them first")


def ppl_filter(
    df: pl.DataFrame, model: InternLM2, tokenizer: TokenEncoder, cfg: PerplexityConfig
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(kept, removed), both with a ``ppl_gain`` column; removed rows carry ``stage="longtext"`` and `REASON`.

    Only rows with a threshold are scored: ``ppl_gain`` is null where none applies (filter off, or a source without
    a threshold while `min_gain` is None) and where the document has fewer than two full segments; those are kept.
    """
    _check_frame(df, cfg)
    threshold = _threshold(cfg)
    if threshold is None:
        return split_by_reason(df.with_columns(pl.lit(None, dtype=pl.Float64).alias(GAIN)), [], STAGE)
    # a literal threshold selects one row, not one per document: broadcast it against a column first
    judged = df.select(pl.col("text").is_not_null() & threshold.is_not_null()).to_series()
    gains = np.full(len(df), np.nan)
    if judged.any():
        texts = df.get_column("text").filter(judged).to_list()
        gains[judged.to_numpy()] = score_documents(
            model, tokenizer, texts, cfg.segment_tokens, cfg.max_pairs, cfg.batch_size
        )
    scored = df.with_columns(pl.Series(GAIN, gains, dtype=pl.Float64).fill_nan(None))
    return split_by_reason(scored, [(REASON, pl.col(GAIN) < threshold)], STAGE)
