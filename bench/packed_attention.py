"""Train-step speed of packed windows: blocked attention (`model.model.attention_spans`) against one dense masked call.

A packed window's document mask hides most of its T×T scores (the upper triangle by causality, earlier documents by
the block diagonal), but one masked ``scaled_dot_product_attention`` call computes them all on CPU. The model instead
takes queries in blocks of ``ATTENTION_BLOCK`` and gives each block only the keys from its first document's start.
The anchor is the dense call (the block set past the window); both arms run the same weights, batch and documents,
as alternating pairs in one process (these machines are noisy). Document lengths are drawn like the ``tiny`` SFT
windows (~290 tokens per chat) and phase-2 windows (~870 per document). The last line is one JSON object.

    python bench/packed_attention.py                 # CPU, the tiny preset's shapes
    python bench/packed_attention.py --blocks 128,256,512
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

# This script shares its name with the `model` package: keep its own folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

import model.model as model_module  # noqa: E402
from model.config import get_preset  # noqa: E402
from model.model import InternLM2  # noqa: E402

DENSE = 1 << 30  # a block longer than any window: one masked call, the anchor


def packed_segments(batch: int, seq: int, mean_doc: float, gen: torch.Generator) -> torch.Tensor:
    """Segment ids (batch, seq) of documents with exponential lengths of mean ``mean_doc`` (at least 8 tokens)."""
    rows = []
    for _ in range(batch):
        ids, seg = [], 0
        while len(ids) < seq:
            n = max(8, int(torch.empty(1).exponential_(1 / mean_doc, generator=gen)))
            ids.extend([seg] * n)
            seg += 1
        rows.append(ids[:seq])
    return torch.tensor(rows)


def time_steps(model: InternLM2, opt: torch.optim.Optimizer, block: int, x: torch.Tensor, y: torch.Tensor,
               seg: torch.Tensor, steps: int, bf16: bool) -> float:
    """Seconds per train step (forward, backward, AdamW) with ``ATTENTION_BLOCK = block``."""
    model_module.ATTENTION_BLOCK = block
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t0 = time.perf_counter()
    for _ in range(steps):
        with amp:
            loss = model.loss(x, y, segment_ids=seg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--blocks", default="128,256")
    p.add_argument("--steps", type=int, default=3, help="train steps per timed sample")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--fp32", action="store_true", help="fp32 instead of bf16 autocast")
    args = p.parse_args()
    shapes = {"sft": (2, 1024, 290.0), "phase2": (1, 2048, 870.0)}  # (batch, seq, mean document length)
    blocks = [int(b) for b in args.blocks.split(",")]
    default_block = model_module.ATTENTION_BLOCK
    results: dict[str, object] = {"preset": args.preset, "threads": torch.get_num_threads(),
                                  "default_block": default_block, "shapes": {}}
    print(f"{args.preset}, {'fp32' if args.fp32 else 'bf16 autocast'}, {torch.get_num_threads()} threads; "
          f"anchor: one dense masked attention call")
    print(f"{'shape':<22}{'block':>8}{'s/step':>10}{'dense/this':>12}")
    for name, (batch, seq, mean_doc) in shapes.items():
        gen = torch.Generator().manual_seed(0)
        cfg = get_preset(args.preset).replace(max_seq_len=seq)
        torch.manual_seed(0)
        model = InternLM2(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        x = torch.randint(3, cfg.vocab_size, (batch, seq), generator=gen)
        y = torch.randint(3, cfg.vocab_size, (batch, seq), generator=gen)
        seg = packed_segments(batch, seq, mean_doc, gen)
        arms = [DENSE, *blocks]
        for block in arms:  # warm-up
            time_steps(model, opt, block, x, y, seg, 1, not args.fp32)
        times: dict[int, list[float]] = {b: [] for b in arms}
        for _ in range(args.pairs):
            for block in arms:
                times[block].append(time_steps(model, opt, block, x, y, seg, args.steps, not args.fp32))
        dense = statistics.median(times[DENSE])
        label = f"{name} {batch}×{seq}"
        print(f"{label:<22}{'dense':>8}{dense:>10.3f}{1.0:>12.2f}")
        row = {"dense_s_per_step": dense, "blocks": {}}
        for block in blocks:
            t = statistics.median(times[block])
            row["blocks"][block] = {"s_per_step": t, "speedup": dense / t}
            print(f"{label:<22}{block:>8}{t:>10.3f}{dense / t:>12.2f}")
        results["shapes"][name] = row
    model_module.ATTENTION_BLOCK = default_block
    print(json.dumps(results))


if __name__ == "__main__":
    main()
