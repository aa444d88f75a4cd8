"""The phase-3 capability mix (InternLM2 §3.3): enhancement data assembled from the best of the cleaned corpus.

Groups, with shares of characters set in `CapabilityMixConfig.weights`:

- ``text``: the highest-quality clean text, the top `text_top_fraction` of documents by ``meta.quality`` (the
  quality classifier's score; documents without one rank last);
- ``code``: the high-tier repository documents of the code pipeline (``meta.tier == "high"``), repeated when the
  group needs more characters than they hold (moderate-tier documents only when there is no high-tier one);
- ``reasoning``: generated word problems with worked, checked solutions (`tasks.reasoning`).

The size is set by the text group (all its selected documents, once), unless `total_chars` fixes it; a group
smaller than its share repeats documents (each repeat a whole document, chosen in a fixed pseudo-random order).
The result is a corpus like the cleaned one (``text/mix.jsonl``, ``code/mix.jsonl``) that tokenizes the same way,
plus ``composition.json``: per group, documents, distinct documents, characters and share. A group with no
documents (a corpus without code) is left empty with a warning, and its share shows as 0 in the composition.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from infra import storage
from infra.settings import get_logger
from tasks.reasoning import generate

log = get_logger(__name__)

GROUPS = ("text", "code", "reasoning")


class CapabilityMixConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    weights: dict[str, float] = Field(default_factory=lambda: {"text": 0.5, "code": 0.3, "reasoning": 0.2},
                                      description="share of characters per group: text, code, reasoning")
    text_top_fraction: float = Field(0.3, gt=0, le=1, description="the best share of clean text (by meta.quality)")
    total_chars: int | None = Field(None, ge=1, description="mix size; None: set by the selected text")
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> CapabilityMixConfig:
        unknown = sorted(set(self.weights) - set(GROUPS))
        if unknown or not self.weights or any(w < 0 for w in self.weights.values()) or not sum(self.weights.values()):
            raise ValueError(f"weights={self.weights}: expected non-negative shares of some of {list(GROUPS)} "
                             "with a positive sum")
        return self


def _records(corpus_url: str, kind: str) -> list[dict[str, Any]]:
    folder = storage.join(corpus_url, kind)
    fs, path = storage.fs_for(folder)
    urls = storage.list_files(folder, "*.jsonl") if fs.isdir(path) else []
    return [json.loads(line) for url in urls for line in storage.read_bytes(url).decode("utf-8").splitlines()
            if line.strip()]


def _take(pool: list[dict[str, Any]], chars: float, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Whole documents from `pool` (in order, then repeating in a shuffled order) until `chars` characters."""
    out, size = [], 0
    if not pool or chars <= 0:
        return out
    order = list(range(len(pool)))
    while size < chars:
        for i in order:
            if size >= chars:
                break
            out.append(pool[i])
            size += len(pool[i]["text"])
        order = list(rng.permutation(len(pool)))
    return out


def build_capability_mix(clean_url: str, out_url: str, cfg: CapabilityMixConfig | None = None) -> dict[str, Any]:
    """Write the mix corpus under `out_url` and return its composition (also ``composition.json``)."""
    cfg = cfg or CapabilityMixConfig()
    rng = np.random.default_rng(cfg.seed)
    texts = sorted(_records(clean_url, "text"), key=lambda r: (-(r.get("meta") or {}).get("quality", -1.0), r["id"]))
    best_text = texts[: max(1, round(cfg.text_top_fraction * len(texts)))] if texts else []
    code = [r for r in _records(clean_url, "code") if "path" not in r]  # repository documents, not raw files
    high = [r for r in code if (r.get("meta") or {}).get("tier") == "high"]
    total_weight = sum(cfg.weights.values())
    shares = {g: cfg.weights.get(g, 0.0) / total_weight for g in GROUPS}
    if cfg.total_chars is not None:
        total = float(cfg.total_chars)
    elif shares["text"] > 0 and best_text:
        total = sum(len(r["text"]) for r in best_text) / shares["text"]
    else:
        raise ValueError("the mix size comes from the text group: give total_chars, or a positive text weight and "
                         f"a corpus with text documents under {clean_url!r}")
    pools = {"text": best_text, "code": high or code}
    chosen: dict[str, list[dict[str, Any]]] = {g: _take(pools[g], shares[g] * total, rng) for g in ("text", "code")}
    if shares["reasoning"] > 0:
        problems, size, seed = [], 0, cfg.seed
        while size < shares["reasoning"] * total:
            batch = generate(256, seed=seed)
            seed += 1
            for p in batch:
                problems.append({"id": f"reasoning-{cfg.seed}-{len(problems)}", "text": p.text(),
                                 "source": "reasoning", "meta": {"family": p.family}})
                size += len(problems[-1]["text"])
                if size >= shares["reasoning"] * total:
                    break
        chosen["reasoning"] = problems
    else:
        chosen["reasoning"] = []
    missing = [g for g in GROUPS if shares[g] > 0 and not chosen[g]]
    if missing:  # e.g. a text-only corpus: the mix is what exists, and says so
        log.warning("capability mix: no documents for group(s) %s under %s; the other groups fill the mix",
                    missing, clean_url)
    _write(storage.join(out_url, "text", "mix.jsonl"), chosen["text"] + chosen["reasoning"])
    _write(storage.join(out_url, "code", "mix.jsonl"), chosen["code"])
    chars = {g: sum(len(r["text"]) for r in docs) for g, docs in chosen.items()}
    composition = {
        g: {"documents": len(docs), "distinct": len({r["id"] for r in docs}), "chars": chars[g],
            "share": chars[g] / max(sum(chars.values()), 1), "target_share": shares[g]}
        for g, docs in chosen.items()
    }
    composition["code"]["high_tier_documents"] = sum((r.get("meta") or {}).get("tier") == "high"
                                                     for r in chosen["code"])
    storage.write_json(storage.join(out_url, "composition.json"), {"config": cfg.model_dump(), **composition})
    return composition


def _write(url: str, records: list[dict[str, Any]]) -> None:
    storage.write_bytes(url, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
