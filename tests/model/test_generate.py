from __future__ import annotations

import pytest
import torch

from model.generate import SamplingConfig, generate, sample_next, stream
from model.model import InternLM2

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [40]]


def greedy_by_recompute(model: InternLM2, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_kv_cache_decoding_equals_full_recomputation(make_config) -> None:
    torch.manual_seed(0)
    model = InternLM2(make_config(max_seq_len=64)).eval()
    out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=15))
    assert out == [greedy_by_recompute(model, p, 15) for p in PROMPTS]


def test_greedy_generation_identical_to_hf_generate(make_config, make_pair) -> None:
    ours, hf = make_pair(make_config(n_kv_heads=1, max_seq_len=64))
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in PROMPTS])[:, None]).long()
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert generate(ours, PROMPTS, SamplingConfig(max_new_tokens=12)) == ref[:, width:].tolist()


def test_batched_rows_equal_single_prompt_runs(make_config) -> None:
    torch.manual_seed(1)
    model = InternLM2(make_config(max_seq_len=64)).eval()
    batched = generate(model, PROMPTS, SamplingConfig(max_new_tokens=10))
    assert batched == [generate(model, [p], SamplingConfig(max_new_tokens=10))[0] for p in PROMPTS]


def test_stop_tokens_end_rows_independently(make_config) -> None:
    torch.manual_seed(0)
    model = InternLM2(make_config(max_seq_len=64)).eval()
    free = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12))
    stop = free[0][3]
    out = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, stop_ids=(stop,)))
    for row, ref in zip(out, free, strict=True):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert row == ref[:cut]
    assert out[0][-1] == stop and len(out[0]) <= 4


def test_stream_yields_the_generate_tokens(make_config) -> None:
    torch.manual_seed(0)
    model = InternLM2(make_config(max_seq_len=64)).eval()
    cfg = SamplingConfig(max_new_tokens=9)
    assert list(stream(model, PROMPTS[0], cfg)) == generate(model, PROMPTS[:1], cfg)[0]


def test_sampling_is_seeded_and_respects_top_k() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0, 4.8]]).repeat(200, 1)
    cfg = SamplingConfig(temperature=1.0, top_k=2)
    a = sample_next(logits, cfg, torch.Generator().manual_seed(3))
    b = sample_next(logits, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert set(a.tolist()) == {1, 2}


def test_top_p_keeps_smallest_prefix() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    cfg = SamplingConfig(temperature=1.0, top_p=0.75)
    picks = sample_next(probs.log().repeat(500, 1), cfg, torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {0, 1}  # 0.5 < 0.75 needs the 0.3 too; 0.15 is never drawn


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"),
     ({"max_new_tokens": -1}, "max_new_tokens")],
)
def test_bad_sampling_parameters(kwargs: dict[str, float], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        SamplingConfig(**kwargs)  # type: ignore[arg-type]


def test_empty_prompt_rejected(make_config) -> None:
    model = InternLM2(make_config()).eval()
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        generate(model, [[1, 2], []])
