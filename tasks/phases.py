"""Which documents each pretraining phase reads (InternLM2 §3.2, §3.3).

- phase 1 (``mix.kind == "all"``): every document once per epoch, long ones cut into context-sized windows;
- phase 2 (``"long_short"``): about ``long_fraction`` of the tokens from documents at least ``long_threshold`` tokens
  long, the rest from shorter ones (the paper keeps half its 32k-phase data under 4k tokens);
- phase 3 (``"capability"``): a named mix with token shares per data group. Until the data-quality stages exist the
  groups are the token shards' kinds (``text``, ``code``), so the mix is "what exists", weighted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from infra import storage
from model.data import DocumentStore, long_short_token_share, mix_documents, pool_tokens


class PhaseMix(BaseModel):
    kind: Literal["all", "long_short", "capability"] = "all"
    name: str = "all"
    long_threshold: int | None = None  # tokens; None = this phase's context length
    long_fraction: float = Field(0.5, ge=0.0, le=1.0)
    weights: dict[str, float] = Field(default_factory=dict)  # capability: token share per shard kind
    total_tokens: int | None = None  # None = as many tokens as the selected documents hold

    @model_validator(mode="after")
    def _check(self) -> PhaseMix:
        if self.kind == "capability" and (not self.weights or any(w < 0 for w in self.weights.values())):
            raise ValueError(f"mix {self.name!r}: a capability mix needs non-negative weights per group, "
                             f"got {self.weights}")
        return self


def doc_kinds(manifest_url: str) -> np.ndarray:
    """The kind (text/code) of every document, in the order ``DocumentStore.from_shards`` concatenates shards."""
    manifest = storage.read_json(manifest_url)
    return np.concatenate([np.full(s["n_docs"], s["kind"], dtype=object) for s in manifest["shards"]])


def doc_repeats(manifest_url: str) -> np.ndarray:
    """Times each document is read by a phase that reads everything (``meta.weight`` rounded; 1 for most)."""
    manifest = storage.read_json(manifest_url)
    parts = []
    for shard in manifest["shards"]:
        counts = np.ones(shard["n_docs"], dtype=np.int64)
        for index, times in (shard.get("repeats") or {}).items():
            counts[int(index)] = times
        parts.append(counts)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def capability_mix(lengths: np.ndarray, kinds: np.ndarray, mix: PhaseMix, seed: int) -> np.ndarray:
    """Doc ids whose tokens split across groups as ``mix.weights`` says (groups sampled with repeats as needed)."""
    total = mix.total_tokens or int(lengths.sum())
    weight_sum = sum(mix.weights.values())
    rng = np.random.default_rng(seed)
    parts = [np.zeros(0, dtype=np.int64)]
    for group, weight in sorted(mix.weights.items()):
        pool = np.flatnonzero((kinds == group) & (lengths > 0))
        if len(pool) == 0:
            raise ValueError(f"mix {mix.name!r}: no documents of kind {group!r}; kinds present: {sorted(set(kinds))}")
        if weight > 0:
            parts.append(pool_tokens(lengths, pool, total * weight / weight_sum, rng))
    return np.sort(np.concatenate(parts)).astype(np.int64)


def select_documents(
    lengths: np.ndarray, kinds: np.ndarray, mix: PhaseMix, *, default_threshold: int, seed: int,
    repeats: np.ndarray | None = None,
) -> tuple[np.ndarray | None, dict[str, float]]:
    """(doc ids or None for all, shares to log) for one phase; "all" repeats up-weighted documents (`repeats`)."""
    threshold = mix.long_threshold or default_threshold
    if mix.kind == "all":
        upweighted = repeats is not None and bool((repeats != 1).any())
        ids = np.repeat(np.arange(len(lengths)), repeats) if upweighted else None
    elif mix.kind == "long_short":
        ids = mix_documents(lengths, long_threshold=threshold, long_fraction=mix.long_fraction, seed=seed,
                            total_tokens=mix.total_tokens)
    else:
        ids = capability_mix(lengths, kinds, mix, seed)
    chosen = np.arange(len(lengths)) if ids is None else ids
    long_share, short_share = long_short_token_share(lengths, chosen, threshold)
    shares = {"mix/long_token_share": long_share, "mix/short_token_share": short_share,
              "mix/documents": float(len(chosen)), "mix/tokens": float(lengths[chosen].sum()),
              "mix/repeated_documents": float(len(chosen) - len(np.unique(chosen)))}
    for kind in sorted(set(kinds)):
        shares[f"mix/{kind}_token_share"] = float(lengths[chosen][kinds[chosen] == kind].sum() / lengths[chosen].sum())
    return ids, shares


def phase_documents(
    manifest_url: str, shards: list[tuple[Path, Path]], spec: Any, mix: dict[str, Any]
) -> tuple[np.ndarray | None, dict[str, float]]:
    """Doc ids and logged shares for ``spec`` (a PhaseSpec) over the token shards of ``manifest_url``."""
    lengths = DocumentStore.from_shards(shards).lengths
    parsed = PhaseMix.model_validate(mix)
    return select_documents(lengths, doc_kinds(manifest_url), parsed, default_threshold=spec.seq_len, seed=spec.seed,
                            repeats=doc_repeats(manifest_url))
