from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import model.model as model_module
from model.loss import linear_cross_entropy
from model.model import InternLM2, attention_spans, segment_positions


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # GQA ratios 1, 2, 4
@pytest.mark.parametrize("seq_len", [1, 7, 33])
def test_logits_match_hf_llama(make_config, make_pair, n_kv_heads: int, seq_len: int) -> None:
    ours, hf = make_pair(make_config(n_kv_heads=n_kv_heads, max_seq_len=64))
    x = torch.randint(0, 300, (3, seq_len), generator=torch.Generator().manual_seed(seq_len))
    with torch.no_grad():
        assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_ntk_scaling_matches_hf_dynamic_past_trained_length(make_config, make_pair) -> None:
    ours, hf = make_pair(make_config(max_seq_len=16, rope_ntk_factor=2.0))
    x = torch.randint(0, 300, (2, 41))
    with torch.no_grad():
        assert_close(ours(x), hf(x).logits, rtol=1e-5, atol=1e-5)


def test_ntk_changes_nothing_within_trained_length_and_something_past_it(make_config) -> None:
    torch.manual_seed(0)
    plain = InternLM2(make_config(max_seq_len=16)).eval()
    ntk = InternLM2(make_config(max_seq_len=16, rope_ntk_factor=2.0)).eval()
    ntk.load_state_dict(plain.state_dict())
    short, long = torch.randint(0, 300, (1, 16)), torch.randint(0, 300, (1, 40))
    with torch.no_grad():
        assert torch.equal(plain(short), ntk(short))
        a, b = plain(long), ntk(long)
    assert torch.equal(a[:, 0], b[:, 0])  # position 0 is not rotated at any base
    assert (a[:, 1:] - b[:, 1:]).abs().max() > 1e-4


def test_rope_base_changes_only_rotated_positions(make_config) -> None:
    torch.manual_seed(0)
    m50k = InternLM2(make_config(rope_theta=50_000.0)).eval()
    m1m = InternLM2(make_config(rope_theta=1_000_000.0)).eval()
    m1m.load_state_dict(m50k.state_dict())
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        a, b = m50k(x), m1m(x)
    assert_close(a[:, 0], b[:, 0], rtol=0, atol=1e-6)
    assert (a[:, 1:] - b[:, 1:]).abs().max() > 1e-4


def test_packed_documents_do_not_see_each_other(make_config) -> None:
    torch.manual_seed(0)
    model = InternLM2(make_config()).eval()
    doc_a, doc_b = torch.randint(0, 300, (9,)), torch.randint(0, 300, (6,))
    segments = torch.tensor([[0] * 9 + [1] * 6])
    packed = torch.cat([doc_a, doc_b])[None]
    changed = torch.cat([torch.randint(0, 300, (9,)), doc_b])[None]
    with torch.no_grad():
        p1 = model(packed, segment_ids=segments)
        p2 = model(changed, segment_ids=segments)
        alone = model(doc_b[None])
    assert torch.equal(p1[:, 9:], p2[:, 9:])  # changing document A leaves B's logits unchanged
    assert_close(p1[:, 9:], alone, rtol=1e-5, atol=1e-5)  # positions restart: B packed == B alone
    assert (p1[:, :9] - p2[:, :9]).abs().max() > 1e-4


def test_segment_positions_restart() -> None:
    seg = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_attention_spans_skip_only_keys_masked_for_the_whole_block() -> None:
    # row 0: documents at 0, 5, 9; row 1: one document to 7, then 7..
    seg = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3, [0] * 7 + [1] * 5])
    # blocks of 4: queries 0-3 read keys 0-3; 4-7 from min(start 0, start 0) = 0; 8-11 from min(5, 7) = 5
    assert attention_spans(seg, 4) == [(0, 4, 0), (4, 8, 0), (8, 12, 5)]
    assert attention_spans(seg[:1], 5) == [(0, 5, 0), (5, 10, 5), (10, 12, 9)]
    with pytest.raises(ValueError, match="block must be >= 1"):
        attention_spans(seg, 0)


@pytest.mark.parametrize("block", [3, 16, 39])
def test_blocked_packed_attention_equals_one_dense_call(make_config, monkeypatch, block: int) -> None:
    torch.manual_seed(0)
    model = InternLM2(make_config()).double()
    seg = torch.zeros(2, 40, dtype=torch.long)
    seg[0, 11:] += 1
    seg[0, 30:] += 1
    seg[1, 25:] += 1
    tokens, targets = torch.randint(0, 300, (2, 40)), torch.randint(0, 300, (2, 40))

    def loss_and_grads(attention_block: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        monkeypatch.setattr(model_module, "ATTENTION_BLOCK", attention_block)
        model.zero_grad()
        loss = model.loss(tokens, targets, segment_ids=seg)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    dense_loss, dense_grads = loss_and_grads(1 << 30)
    loss, grads = loss_and_grads(block)
    assert_close(loss, dense_loss, rtol=1e-12, atol=1e-12)
    for g, d in zip(grads, dense_grads, strict=True):
        assert_close(g, d, rtol=1e-10, atol=1e-12)


def test_loss_equals_cross_entropy_of_logits_and_grads(make_config) -> None:
    torch.manual_seed(0)
    model = InternLM2(make_config())
    x = torch.randint(0, 300, (2, 17))
    y = torch.randint(0, 300, (2, 17))
    y[0, :5] = -100
    fused = model.loss(x, y)
    fused.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    plain = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    plain.backward()
    assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_linear_cross_entropy_chunking_is_exact_in_float64() -> None:
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    t[[3, 10]] = -100
    loss = linear_cross_entropy(h, w, t, chunk=8)
    gh, gw = torch.autograd.grad(loss, (h, w))
    ref = F.cross_entropy(h @ w.t(), t)
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    assert_close(gh, rh, rtol=1e-5, atol=1e-7)
    assert_close(gw, rw, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert_close(linear_cross_entropy(h, w, t, chunk=5).double(), ref, rtol=1e-6, atol=1e-6)


def test_linear_cross_entropy_rejects_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="hidden has 4 rows but targets has 3"):
        linear_cross_entropy(torch.randn(4, 2), torch.randn(5, 2), torch.zeros(3, dtype=torch.long))


def test_bf16_autocast_loss_close_to_fp32(make_config) -> None:
    torch.manual_seed(0)
    model = InternLM2(make_config())
    x = torch.randint(0, 300, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.loss(x[:, :-1], x[:, 1:])
    full = model.loss(x[:, :-1], x[:, 1:])
    assert low.dtype == torch.float32
    assert abs(low.item() - full.item()) < 0.05
