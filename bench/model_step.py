"""Train-step and decode throughput of our InternLM2 against HF ``LlamaForCausalLM`` at the same config.

Both sides run in one process as alternating A/B pairs (these machines are noisy), each in the same mode:
fp32 eager, bf16 autocast eager, and each with ``torch.compile``. A train step is forward + backward + AdamW.
Decode compares our KV-cache ``generate`` with HF ``generate`` (greedy, same prompts, same lengths).
The anchor is HF's best training mode; ratios are ours / HF. The last line is one JSON object with the figures.

    python bench/model_step.py --preset tiny            # CPU
    python bench/model_step.py --preset internlm2-1_8b --device cuda --batch 4 --seq 4096 --modes bf16   # one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# This script shares its name with the `model` package: keep its own folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from model.config import ModelConfig, get_preset  # noqa: E402
from model.convert import from_hf_state_dict, to_hf_config  # noqa: E402
from model.generate import SamplingConfig, generate  # noqa: E402
from model.model import InternLM2  # noqa: E402

PEAK_FLOPS = {"cuda": 989e12}  # H100/H200 dense bf16; CPU has no meaningful peak here


def build_pair(config: ModelConfig, device: str) -> tuple[InternLM2, LlamaForCausalLM]:
    fields = {k: v for k, v in to_hf_config(config).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf_config = LlamaConfig(**fields)
    hf_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config).to(device)
    ours = InternLM2(config).to(device)
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), config))
    return ours, hf


def train_step_fn(model: torch.nn.Module, kind: str, bf16: bool, compiled: bool, device: str) -> Callable:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    if kind == "ours":
        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model.loss(x, y)
    else:
        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model(input_ids=x, labels=y).loss  # HF shifts labels itself
    fwd = torch.compile(loss_fn) if compiled else loss_fn
    amp = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        with amp:
            loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_train(step: Callable, kind: str, batch: torch.Tensor, steps: int, device: str) -> float:
    x, y = (batch[:, :-1], batch[:, 1:]) if kind == "ours" else (batch, batch)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    sync(device)
    return steps * x.numel() / (time.perf_counter() - t0)


def bench_train(cfg: ModelConfig, args: argparse.Namespace, mode: str) -> dict[str, float]:
    bf16, compiled = "bf16" in mode, "compile" in mode
    ours, hf = build_pair(cfg, args.device)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(args.device)
    steps = {k: train_step_fn(m, k, bf16, compiled, args.device) for k, m in (("ours", ours), ("hf", hf))}
    for kind, step in steps.items():  # warm-up (compilation, allocator)
        time_train(step, kind, batch, args.warmup, args.device)
    rates: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(args.pairs):
        for kind in ("ours", "hf"):
            rates[kind].append(time_train(steps[kind], kind, batch, args.steps, args.device))
    return {k: statistics.median(v) for k, v in rates.items()}


def bench_decode(cfg: ModelConfig, args: argparse.Namespace) -> dict[str, float]:
    ours, hf = build_pair(cfg, args.device)
    ours.eval(), hf.eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in args.prompt_lens]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=args.device)
    mask = (ids != 0).long()
    n_new = args.new_tokens
    sampling = SamplingConfig(max_new_tokens=n_new)

    def run_ours() -> None:
        generate(ours, prompts, sampling)

    def run_hf() -> None:
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                        do_sample=False, pad_token_id=0)

    rates: dict[str, list[float]] = {"ours": [], "hf": []}
    for fn in (run_ours, run_hf):
        fn()
    for _ in range(args.pairs):
        for kind, fn in (("ours", run_ours), ("hf", run_hf)):
            sync(args.device)
            t0 = time.perf_counter()
            fn()
            sync(args.device)
            rates[kind].append(len(prompts) * n_new / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="train steps per timed sample")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pairs", type=int, default=3, help="alternating A/B samples per mode")
    p.add_argument("--modes", default="fp32,bf16,fp32+compile,bf16+compile")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--prompt-lens", type=lambda s: [int(v) for v in s.split(",")], default=[32, 17, 25, 9])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--no-decode", action="store_true")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = get_preset(args.preset).replace(max_seq_len=max(args.seq, get_preset(args.preset).max_seq_len))
    results: dict[str, object] = {"preset": args.preset, "device": args.device, "batch": args.batch,
                                  "seq": args.seq, "threads": torch.get_num_threads(), "train": {}}
    print(f"{args.preset} on {args.device}: batch {args.batch} × seq {args.seq}, {torch.get_num_threads()} threads")
    print(f"{'mode':<16}{'ours tok/s':>14}{'HF tok/s':>14}{'ours/HF':>10}")
    for mode in args.modes.split(","):
        r = bench_train(cfg, args, mode)
        results["train"][mode] = {**r, "ratio": r["ours"] / r["hf"]}
        print(f"{mode:<16}{r['ours']:>14,.0f}{r['hf']:>14,.0f}{r['ours'] / r['hf']:>10.2f}")
    train = results["train"]
    hf_best = max(v["hf"] for v in train.values())
    ours_best = max(v["ours"] for v in train.values())
    results["anchor_hf_best_tok_s"] = hf_best
    results["ours_best_over_hf_best"] = ours_best / hf_best
    results["min_ratio_same_mode"] = min(v["ratio"] for v in train.values())
    print(f"best ours / best HF (anchor {hf_best:,.0f} tok/s): {ours_best / hf_best:.2f}")
    if args.device in PEAK_FLOPS:
        fpt = cfg.flops_per_token(args.seq)
        results["mfu_ours_best"] = ours_best * fpt / PEAK_FLOPS[args.device]
        print(f"MFU ours (best mode): {results['mfu_ours_best']:.1%}  ({fpt / 1e9:.2f} GFLOP/token)")
    if not args.no_decode:
        d = bench_decode(cfg, args)
        results["decode"] = {**d, "ratio": d["ours"] / d["hf"]}
        print(f"{'decode':<16}{d['ours']:>14,.0f}{d['hf']:>14,.0f}{d['ours'] / d['hf']:>10.2f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
