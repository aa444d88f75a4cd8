"""LMForgeModel: perplexity against a direct cross-entropy (batched, masked, truncated), greedy generation batched
against one at a time, the chat template, the tools marker against the SFT data, the tool loop with the real sandbox,
and OpenCompass building the class from a config dict."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from opencompass.models.base import LMTemplateParser
from opencompass.utils import build_model_from_cfg
from opencompass.utils.prompt import PromptList

from model.chat import Message, ToolCall, encode_chat, generation_prompt, parse_chat, render, stop_token_ids
from model.checkpoint import save_native
from model.config import ModelConfig
from model.generate import SamplingConfig, generate
from model.model import InternLM2
from model.tokenizer import Tokenizer
from tasks.evaluate.oc_model import TOOLS_MARKER, LMForgeModel, prompt_messages, tool_declarations
from tasks.sft.generate import INTERPRETER_SYSTEM, SFTDataConfig, build_sft
from tasks.sft.plugins import PLUGINS, plugin_schemas

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Return a new list containing all items from the iterable in ascending order.",
    "A",
    "Logging provides a flexible event logging system for applications and libraries.",
]
CALL = "I'll run it.<|action_start|><|interpreter|>\n```python\nprint(6*7)\n```<|action_end|>"
BEGIN, END = {"section": "begin", "pos": "begin"}, {"section": "begin", "pos": "end"}
ROUND, ROUND_END = {"section": "round", "pos": "begin"}, {"section": "round", "pos": "end"}


@pytest.fixture(scope="module")
def files(prose: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A tiny random checkpoint (dim 64, 2 layers; a wide init so greedy choices are clear) and its tokenizer."""
    root = tmp_path_factory.mktemp("oc_model")
    tok = Tokenizer.train(prose, 1024)
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tok.vocab_size,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=160,
        max_seq_len=256,
        init_std=0.3,
    )
    save_native(InternLM2(config), root / "ckpt")
    return str(root / "ckpt"), str(root / "tokenizer.json")


@pytest.fixture(scope="module")
def base(files: tuple[str, str]) -> LMForgeModel:
    return LMForgeModel(*files, batch_size=3, device="cpu")


@pytest.fixture(scope="module")
def chat(files: tuple[str, str]) -> LMForgeModel:
    return LMForgeModel(*files, chat=True, batch_size=3, device="cpu")


def direct_nll(m: LMForgeModel, ids: Sequence[int], start: int = 1) -> float:
    """Mean cross-entropy of ids[start:] given what precedes them, one sequence, straight from the logits."""
    with torch.inference_mode():
        logits = m.model(torch.tensor([list(ids)]))[0]
    return F.cross_entropy(logits[start - 1 : -1], torch.tensor(ids[start:])).item()


def scripted(m: LMForgeModel, monkeypatch: pytest.MonkeyPatch, replies: list[str]) -> list[list[int]]:
    """Make `m` reply with `replies` in turn (special spellings become their ids); returns the prompts it saw."""
    seen: list[list[int]] = []

    def fake(prompts: list[list[int]], max_new: int) -> list[list[int]]:
        seen.extend(prompts)
        return [m.tokenizer.encode(replies.pop(0)) for _ in prompts]

    monkeypatch.setattr(m, "_generate_ids", fake)
    return seen


# --- perplexity --------------------------------------------------------------------------------------------------


def test_get_ppl_batched_equals_one_at_a_time_and_direct_cross_entropy(base: LMForgeModel) -> None:
    batched = base.get_ppl(TEXTS)
    single = [float(base.get_ppl([t])[0]) for t in TEXTS]
    direct = [direct_nll(base, base.tokenizer.encode(t, bos=True)) for t in TEXTS]
    assert batched.shape == (len(TEXTS),) and batched.dtype.kind == "f"
    assert batched.tolist() == pytest.approx(single, abs=1e-4)
    assert batched.tolist() == pytest.approx(direct, abs=1e-4)


def test_get_ppl_mask_length_scores_only_the_suffix(base: LMForgeModel) -> None:
    prefix, suffix = "The quick brown fox", " jumps over the lazy dog."
    ids = base.tokenizer.encode(prefix + suffix, bos=True)
    mask = base.get_token_len(prefix)
    assert ids[:mask] == base.tokenizer.encode(prefix, bos=True)  # the split falls on a token boundary here
    masked = base.get_ppl([prefix + suffix, TEXTS[1]], mask_length=[mask, 0])
    assert masked[0] == pytest.approx(direct_nll(base, ids, start=mask), abs=1e-4)
    assert masked[1] == pytest.approx(base.get_ppl([TEXTS[1]])[0], abs=1e-4)  # masking nothing = no mask
    assert masked[0] != pytest.approx(base.get_ppl([prefix + suffix])[0], abs=1e-3)
    with pytest.raises(ValueError, match="no token left to score"):
        base.get_ppl([prefix], mask_length=[mask])


def test_get_ppl_truncates_long_inputs_from_the_left(files: tuple[str, str], base: LMForgeModel) -> None:
    short = LMForgeModel(*files, max_seq_len=12, device="cpu")
    ids = short.tokenizer.encode(TEXTS[1] + " " + TEXTS[3], bos=True)
    cut = len(ids) - 12
    assert cut > 3
    assert short.get_ppl([TEXTS[1] + " " + TEXTS[3]])[0] == pytest.approx(direct_nll(base, ids[-12:]), abs=1e-4)
    masked = short.get_ppl([TEXTS[1] + " " + TEXTS[3]], mask_length=[cut + 3])[0]
    assert masked == pytest.approx(direct_nll(base, ids[-12:], start=3), abs=1e-4)


def test_chat_get_ppl_scores_the_rendered_turns_with_chat_ids(chat: LMForgeModel) -> None:
    # Content opening with a line break: encoding the rendered text would merge it with the header's.
    prompt = PromptList([{"role": "HUMAN", "prompt": "Name a colour."}, {"role": "BOT", "prompt": "\nBlue."}])
    messages = [Message("user", "Name a colour."), Message("assistant", "\nBlue.")]
    text = chat.parse_template(prompt, "ppl")
    ids, _ = encode_chat(messages, chat.tokenizer)
    assert text == render(messages)
    assert chat.tokenizer.encode(text) != ids
    assert chat.get_token_len(text) == len(ids)
    assert chat.get_ppl([text])[0] == pytest.approx(direct_nll(chat, ids), abs=1e-4)


def test_get_token_len_counts_our_tokens(base: LMForgeModel, chat: LMForgeModel) -> None:
    for text in TEXTS:
        assert base.get_token_len(text) == len(base.tokenizer.encode(text, bos=True))
    messages = [Message("system", "Be brief."), Message("user", "What is 2+2?")]
    rendered = chat.parse_template(
        PromptList([{"role": "SYSTEM", "prompt": "Be brief."}, {"role": "HUMAN", "prompt": "What is 2+2?"}]), "gen"
    )
    ids = generation_prompt(messages, chat.tokenizer)
    assert chat.tokenizer.encode(rendered) == ids  # plain turns: the rendered text encodes to the same ids
    assert chat.get_token_len(rendered) == len(ids)


# --- generation --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["base", "chat"])
def test_generate_batched_equals_one_at_a_time(kind: str, base: LMForgeModel, chat: LMForgeModel) -> None:
    m = base if kind == "base" else chat
    prompts = m.parse_template([*TEXTS, "Hi"], "gen")
    batched = m.generate(prompts, 8)
    assert batched == [m.generate([p], 8)[0] for p in prompts]
    assert len({*batched}) > 1 and all(isinstance(t, str) for t in batched)
    for text in batched:
        assert not any(stop in text for stop in ("<|im_end|>", "<|action_end|>", "</s>"))


def test_generate_stops_at_a_stop_token_and_drops_it(files: tuple[str, str]) -> None:
    m = LMForgeModel(*files, chat=True, device="cpu")
    prompt = m.parse_template("Tell me about lists.", "gen")
    ids = generation_prompt([Message("user", "Tell me about lists.")], m.tokenizer)
    greedy = generate(m.model, [ids], SamplingConfig(max_new_tokens=6))[0]
    stops = stop_token_ids(m.tokenizer)
    assert not set(greedy) & set(stops)
    k = next(i for i, t in enumerate(greedy) if i > 0 and t not in greedy[:i])
    im_end = m.tokenizer.token_id("<|im_end|>")
    with torch.no_grad():  # the k-th greedy token's output row becomes <|im_end|>'s: decoding stops right there
        weight = m.model.output.weight
        weight[[greedy[k], im_end]] = weight[[im_end, greedy[k]]]
    assert m.generate([prompt], 6) == [m.tokenizer.decode(greedy[:k], skip_special=False)]


def test_generate_cuts_long_prompts_on_the_left(files: tuple[str, str], base: LMForgeModel) -> None:
    short = LMForgeModel(*files, max_seq_len=16, device="cpu")
    text = TEXTS[1] + " " + TEXTS[3]
    ids = short.tokenizer.encode(text, bos=True)
    assert len(ids) > 16
    expected = generate(base.model, [ids[-(16 - 5) :]], SamplingConfig(max_new_tokens=5, stop_ids=base.stop_ids))[0]
    assert short.generate([text], 5) == [short.tokenizer.decode(expected, skip_special=False)]
    with pytest.raises(ValueError, match="max_out_len"):
        short.generate([text], 16)


def test_generate_cuts_replies_at_stopping_criteria(base: LMForgeModel, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(base, monkeypatch, ["42\nQuestion: next", "7</s>"])
    assert base.generate(["Question: 6*7?\nAnswer:", "Q"], 8, stopping_criteria=["\nQuestion:"]) == ["42", "7"]


# --- chat template and tools -------------------------------------------------------------------------------------


def test_parse_template_renders_the_equivalent_messages(chat: LMForgeModel, base: LMForgeModel) -> None:
    prompt = PromptList(
        [
            BEGIN,
            {"role": "SYSTEM", "prompt": "Be brief."},
            END,
            ROUND,
            {"role": "HUMAN", "prompt": "Q1"},
            {"role": "BOT", "prompt": "A1"},
            {"role": "HUMAN", "prompt": "Q2"},
            {"role": "HUMAN", "prompt": "more"},
            {"role": "BOT", "prompt": ""},
            ROUND_END,
        ]
    )
    turns = [
        Message("system", "Be brief."),
        Message("user", "Q1"),
        Message("assistant", "A1"),
        Message("user", "Q2\nmore"),
    ]
    assert chat.parse_template(prompt, "gen") == render(turns, add_generation_prompt=True)
    scored = PromptList([*prompt[:-2], {"role": "BOT", "prompt": "A2"}, ROUND_END])
    assert chat.parse_template(scored, "ppl") == render([*turns, Message("assistant", "A2")])
    assert chat.parse_template(scored, "gen") == render(turns, add_generation_prompt=True)  # BOT to write: dropped
    assert chat.parse_template("Hello", "gen") == render([Message("user", "Hello")], add_generation_prompt=True)
    assert chat.parse_template(["a", "b"], "ppl") == [render([Message("user", t)]) for t in "ab"]
    assert base.parse_template(prompt, "gen") == LMTemplateParser().parse_template(prompt, "gen")
    with pytest.raises(ValueError, match="role"):
        prompt_messages(PromptList([{"role": "ROBOT", "prompt": "x"}]), "gen")


def test_tools_marker_expands_to_the_sft_declarations(chat: LMForgeModel) -> None:
    from tasks.evaluate import oc_config

    built = build_sft(
        SFTDataConfig(
            arithmetic=0, interpreter=1, plugin=1, python_function=0, multi_turn=0, refusal=0, long_context=0, workers=1
        )
    )
    sft_system = {r["meta"]["kind"]: [m for m in parse_chat(r) if m.role == "system"] for r in built.records}
    plugins = chat.plugins
    assert tool_declarations(("interpreter",), plugins) == sft_system["interpreter"]
    assert tool_declarations(("plugin",), plugins) == sft_system["plugin"]
    assert tool_declarations(("interpreter", "plugin"), plugins) == [*sft_system["interpreter"], *sft_system["plugin"]]
    assert sft_system["interpreter"] == [Message("system", INTERPRETER_SYSTEM, name="interpreter")]
    assert sft_system["plugin"] == [Message("system", plugin_schemas(PLUGINS.values()), name="plugin")]
    prompt = PromptList(
        [
            BEGIN,
            {"role": "SYSTEM", "prompt": TOOLS_MARKER},
            END,
            ROUND,
            {"role": "HUMAN", "prompt": "What is 6 times 7?"},
            {"role": "BOT", "prompt": ""},
            ROUND_END,
        ]
    )
    assert chat.parse_template(prompt, "gen") == render(
        [*sft_system["interpreter"], Message("user", "What is 6 times 7?")], add_generation_prompt=True
    )
    assert oc_config.TOOLS_MARKER == TOOLS_MARKER
    for bad in (("python",), "interpreter", ("corpus_search",)):
        with pytest.raises(ValueError, match="tools"):
            tool_declarations(bad, plugins)


def test_tool_loop_runs_the_call_in_the_sandbox(chat: LMForgeModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat, "tool_stats", {k: 0 for k in chat.tool_stats})
    # The prompt without tools is decoded first, then the tool loop's rounds.
    seen = scripted(chat, monkeypatch, ["No tools here.<|im_end|>", CALL, "The answer is 42.<|im_end|>"])
    with_tools = chat.parse_template(
        PromptList([{"role": "SYSTEM", "prompt": TOOLS_MARKER}, {"role": "HUMAN", "prompt": "What is 6 times 7?"}]),
        "gen",
    )
    without = chat.parse_template("Hi", "gen")
    assert chat.generate([with_tools, without], 32) == ["The answer is 42.", "No tools here."]
    call = ToolCall("interpreter", code="```python\nprint(6*7)\n```")
    after = [
        Message("system", INTERPRETER_SYSTEM, name="interpreter"),
        Message("user", "What is 6 times 7?"),
        Message("assistant", "I'll run it.", call),
        Message("environment", "42", name="interpreter"),
    ]
    assert seen[2] == generation_prompt(after, chat.tokenizer)
    assert "<|im_start|>environment name=<|interpreter|>\n42<|im_end|>" in chat.tokenizer.decode(seen[2])
    assert chat.tool_stats == {"calls": 1, "well_formed": 1, "executed": 1, "over_limit": 0}


def test_tool_loop_stops_at_max_tool_rounds(chat: LMForgeModel, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat, "tool_stats", {k: 0 for k in chat.tool_stats})
    monkeypatch.setattr(chat, "max_tool_rounds", 1)
    seen = scripted(chat, monkeypatch, [CALL, CALL])
    prompt = chat.parse_template(
        PromptList([{"role": "SYSTEM", "prompt": TOOLS_MARKER}, {"role": "HUMAN", "prompt": "6*7?"}]), "gen"
    )
    assert chat.generate([prompt], 32) == ["I'll run it."]
    assert len(seen) == 2
    assert chat.tool_stats == {"calls": 2, "well_formed": 2, "executed": 1, "over_limit": 1}


def test_tool_loop_calls_plugins_over_the_corpus(
    files: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = [
        {"id": "zebra-doc", "text": "Zebras have black and white stripes."},
        {"id": "other", "text": "Lists keep items in order."},
    ]
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "part-0.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    m = LMForgeModel(*files, chat=True, tools=("plugin", "corpus_search"), corpus=str(tmp_path), device="cpu")
    assert m.declarations == [
        Message("system", plugin_schemas([*PLUGINS.values(), m.plugins["corpus_search"]]), name="plugin")
    ]
    search = '<|action_start|><|plugin|>\n{"name": "corpus_search", "parameters": {"query": "stripes", "top_k": 1}}'
    seen = scripted(m, monkeypatch, [search + "<|action_end|>", "Found it.<|im_end|>"])
    prompt = m.parse_template(
        PromptList(
            [{"role": "SYSTEM", "prompt": TOOLS_MARKER}, {"role": "HUMAN", "prompt": "Which document is about zebras?"}]
        ),
        "gen",
    )
    assert m.generate([prompt], 32) == ["Found it."]
    assert "<|im_start|>environment name=<|plugin|>\n1. [zebra-doc]" in m.tokenizer.decode(seen[1])
    assert m.tool_stats == {"calls": 1, "well_formed": 1, "executed": 1, "over_limit": 0}


# --- OpenCompass ---------------------------------------------------------------------------------------------------


def test_opencompass_builds_it_from_a_config_dict(files: tuple[str, str]) -> None:
    path, tokenizer_path = files
    m = build_model_from_cfg(
        dict(
            type="tasks.evaluate.oc_model.LMForgeModel",
            path=path,
            tokenizer_path=tokenizer_path,
            chat=True,
            max_seq_len=512,
            batch_size=4,
            max_out_len=16,
            abbr="x",
            run_cfg=dict(num_gpus=0),
        )
    )
    assert isinstance(m, LMForgeModel)
    assert (m.chat, m.max_seq_len, m.batch_size) == (True, 512, 8)  # OpenCompass pops batch_size for its inferencer
    text = m.parse_template("Hello", "gen")
    assert m.get_token_len(text) == len(generation_prompt([Message("user", "Hello")], m.tokenizer))
