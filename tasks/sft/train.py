"""The SFT stage (InternLM2 §4.1, §4.4): validate chat records, fine-tune a base checkpoint, evaluate with and
without tools.

- **Input**: ``{"messages": [...]}`` JSONL (`model.chat.parse_chat`'s contract). A record that breaks it goes to a
  quarantine with its file, line, error code and detail; the rest trains.
- **Training**: `run_phase` (the pretraining machinery: Lightning, checkpoints every N steps, exact resume, MLflow)
  on a `PackedChatDataset` — loss on the assistant's tokens only — starting from a chosen base checkpoint. The paper
  fine-tunes the pre-enhancement base; the pipeline passes the checkpoint it is told to.
- **Evaluation** on the held-out split, twice: *with tools* (the system turn declares the interpreter and the
  plugins; a tool call the model writes is executed — Python in the sandbox, plugins for real — and its result goes
  back as an environment turn, up to `max_tool_rounds` times) and *without* (no tools declared; a call the model
  writes anyway is not executed). Reported: the share of tool calls that are well formed and executed without
  error (overall and per tool), the accuracy of the final answers (`tasks.sft.generate.check_answer`), per kind and
  overall, and how many plugin calls carry every number of their question (`grounded_call`): a call can run and
  still not be about the question, and this tells the two apart.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from infra import storage
from model.chat import (
    Message,
    ToolCall,
    encode_chat,
    generation_prompt,
    interpreter_source,
    parse_assistant,
    parse_chat,
    stop_token_ids,
    tool_call_error,
)
from model.generate import SamplingConfig, generate
from model.model import InternLM2
from model.tokenizer import Tokenizer

TOOL_KINDS = ("interpreter", "plugin")


class SFTEvalConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_items: int = Field(200, ge=1, description="held-out conversations evaluated")
    max_new_tokens: int = Field(160, ge=1, description="tokens generated per assistant turn")
    max_tool_rounds: int = Field(2, ge=0, description="tool calls executed per conversation")
    batch_size: int = Field(16, ge=1)


def read_chats(url: str, plugins: Sequence[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(valid records, quarantine rows) of one JSONL file; a row names the file, line, error code and detail."""
    from model.chat import BadChat

    good, bad = [], []
    for number, line in enumerate(storage.read_bytes(url).decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            parse_chat(record, plugins=plugins)
        except json.JSONDecodeError as err:
            bad.append({"file": url, "line": number, "error": "invalid_json", "detail": str(err)})
        except BadChat as err:
            bad.append({"file": url, "line": number, "error": err.code, "detail": str(err)})
        else:
            good.append(record)
    return good, bad


def conversations(records: Sequence[dict[str, Any]], tokenizer: Tokenizer, plugins: Sequence[str]) -> list[Any]:
    """(ids, loss mask) of each record."""
    return [encode_chat(parse_chat(r, plugins=plugins), tokenizer) for r in records]


# ------------------------------------------------------------------------------------------- evaluation


def _prompt_turns(record: dict[str, Any], with_tools: bool, plugins: Sequence[str]) -> list[Message]:
    """The conversation through its last user turn (earlier turns, tool results included, as given); the tool
    declarations kept only `with_tools`. The model's reply to that turn is what `check_answer` judges."""
    messages = parse_chat(record, plugins=plugins)
    last_user = max(i for i, m in enumerate(messages) if m.role == "user")
    turns = messages[: last_user + 1]
    if not with_tools:
        turns = [m for m in turns if not (m.role == "system" and m.name in TOOL_KINDS)]
    return turns


def _execute(call: ToolCall, plugin_table: dict[str, Any], sandbox: Any) -> tuple[str, bool]:
    """(result text for the environment turn, whether it ran without error)."""
    from tasks.sft.sandbox import run_python

    if call.kind == "interpreter":
        result = run_python(interpreter_source(call.code or ""), sandbox)
        return result.text(), result.ok
    plugin = plugin_table.get(call.name or "")
    if plugin is None:
        return f"unknown plugin {call.name!r}; available: {sorted(plugin_table)}", False
    text = plugin(call.arguments or {})
    return text, not text.lower().startswith("error")


def tool_round(content: str, call: ToolCall, plugin_table: dict[str, Any], sandbox: Any) -> tuple[list[Message], bool]:
    """Run `call`: the assistant turn that made it and the environment turn with its result, and whether it ran
    without error. Shared with `tasks.evaluate.oc_model`, so both evaluations feed results back the same way."""
    result, ok = _execute(call, plugin_table, sandbox)
    answering = "interpreter" if call.kind == "interpreter" else call.name
    return [Message("assistant", content, tool_call=call), Message("environment", result, name=answering)], ok


_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


def numbers_in(text: str) -> set[Decimal]:
    """The decimal numbers written in `text` (``1,234`` read as 1234; ``7.30`` and ``7.3`` alike), as values."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return {Decimal(m).normalize() for m in _NUMBER.findall(text)}


def grounded_call(question: str, call: ToolCall) -> bool | None:
    """Whether a plugin call carries every number of the question it answers (None: not a plugin call, or the
    question has no number). Every reference plugin call the generator writes does; a model that writes one
    memorised call whatever it is asked does not, even when that call runs."""
    wanted = numbers_in(question)
    if call.kind != "plugin" or not wanted:
        return None
    return wanted <= numbers_in(json.dumps(call.arguments or {}))


def interleave_kinds(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records round-robin over their kinds (each kind in its own order), so a cut at any length keeps every kind
    represented: held-out files are written kind by kind."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_kind.setdefault(str((record.get("meta") or {}).get("kind", "?")), []).append(record)
    queues = list(by_kind.values())
    return [q[i] for i in range(max((len(q) for q in queues), default=0)) for q in queues if i < len(q)]


def evaluate(
    model: InternLM2, tokenizer: Tokenizer, records: Sequence[dict[str, Any]], *, with_tools: bool,
    plugin_table: dict[str, Any], cfg: SFTEvalConfig | None = None, sandbox: Any = None,
) -> dict[str, Any]:
    """Accuracy of final answers and tool-call health on `records` (held out), with or without tools."""
    from tasks.sft.generate import check_answer

    cfg = cfg or SFTEvalConfig()
    plugins = sorted(plugin_table)
    records = interleave_kinds(records)[: cfg.max_items]
    chats = [_prompt_turns(r, with_tools, plugins) for r in records]
    finals: list[str] = [""] * len(records)
    calls, well_formed, executed = 0, 0, 0
    per_tool: dict[str, list[int]] = {}  # tool -> [calls, executed]
    grounded: list[bool] = []  # per plugin call whose question has a number: does the call carry them all?
    questions = [next(m.content for m in reversed(chat) if m.role == "user") for chat in chats]
    failed: list[dict[str, Any]] = []  # the calls that did not run, for diagnosis (the first 50)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, stop_ids=tuple(stop_token_ids(tokenizer)))
    active = list(range(len(records)))
    for _ in range(cfg.max_tool_rounds + 1):
        if not active:
            break
        outputs: list[str] = []
        for start in range(0, len(active), cfg.batch_size):
            batch = active[start : start + cfg.batch_size]
            prompts = [generation_prompt(chats[i], tokenizer) for i in batch]
            with torch.inference_mode():
                ids = generate(model, prompts, sampling, pad_id=tokenizer.eos_id)
            outputs += [tokenizer.decode(x, skip_special=False) for x in ids]
        still = []
        for i, text in zip(active, outputs, strict=True):
            text = text.replace("<|im_end|>", "")
            content, call = parse_assistant(text)
            has_action = "<|action_start|>" in text
            if not has_action or not with_tools:
                finals[i] = content if call is None else text
                continue
            calls += 1
            error = "no parsable call" if call is None else tool_call_error(text)
            if call is None or error is not None:
                failed.append({"item": i, "stage": "malformed", "text": text, "reason": error})
                finals[i] = content
                continue
            well_formed += 1
            turns, ok = tool_round(content, call, plugin_table, sandbox)
            executed += ok
            tally = per_tool.setdefault(call.tool, [0, 0])
            tally[0] += 1
            tally[1] += ok
            grounding = grounded_call(questions[i], call)
            if grounding is not None:
                grounded.append(grounding)
            if not ok:
                failed.append({"item": i, "stage": "execution", "text": text, "reason": turns[-1].content[:500]})
            chats[i] = [*chats[i], *turns]
            still.append(i)
        active = still
    correct = [check_answer(r, finals[i]) for i, r in enumerate(records)]
    kinds = Counter(r.get("meta", {}).get("kind", "?") for r in records)
    per_kind = {k: sum(c for c, r in zip(correct, records, strict=True) if r.get("meta", {}).get("kind", "?") == k)
                / n for k, n in kinds.items()}
    return {"items": len(records), "accuracy": sum(correct) / max(len(records), 1), "tool_calls": calls,
            "tool_calls_well_formed": well_formed / calls if calls else 0.0,
            "tool_calls_executed": executed / calls if calls else 0.0,
            "accuracy_ci95": wilson_interval(sum(correct), len(records)),
            "tool_calls_executed_ci95": wilson_interval(executed, calls),
            "tool_calls_executed_per_tool": {tool: {"calls": n, "executed": ok / n}
                                             for tool, (n, ok) in sorted(per_tool.items())},
            "plugin_calls_grounded": sum(grounded) / len(grounded) if grounded else 0.0,
            "plugin_calls_grounded_ci95": wilson_interval(sum(grounded), len(grounded)),
            "per_kind": per_kind, "failed_calls": failed[:50], "correct": correct}


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> list[float]:
    """The Wilson score interval [low, high] of a binomial proportion (95 % by default); [0, 1] when n is 0."""
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n]; got {successes} of {n}")
    if n == 0:
        return [0.0, 1.0]
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def paired_gain(with_tools: Sequence[bool], without_tools: Sequence[bool]) -> dict[str, float]:
    """Tools against no tools on the same items: the items only one setting got right and the exact two-sided sign
    test (McNemar's exact test) on them. ``p_value`` near 1 means the two accuracies are indistinguishable."""
    if len(with_tools) != len(without_tools):
        raise ValueError(f"paired results need equal lengths; got {len(with_tools)} and {len(without_tools)}")
    pairs = Counter((bool(a), bool(b)) for a, b in zip(with_tools, without_tools, strict=True))
    only_with, only_without, both = pairs[True, False], pairs[False, True], pairs[True, True]
    n, k = only_with + only_without, min(only_with, only_without)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return {"only_with_tools": float(only_with), "only_without_tools": float(only_without), "both": float(both),
            "p_value": min(1.0, 2 * tail)}


# ------------------------------------------------------------------------------------------- the stage


def corpus_docs(clean_url: str | None, limit: int = 2000) -> list[tuple[str, str]]:
    """(id, text) of a cleaned corpus's documents (none without a corpus): long-context items and the search plugin."""
    from tasks.sft.plugins import corpus_docs as read_docs

    return [] if clean_url is None else read_docs(clean_url, limit)


def plugin_table(docs: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The plugins a model may call: calculator, unit converter, and a search over `docs` (when there are any)."""
    from tasks.sft.plugins import PLUGINS, make_search

    table = dict(PLUGINS)
    if docs:
        search = make_search(docs)
        table[search.name] = search
    return table


def load_base(base_url: str, tokenizer_url: str) -> tuple[InternLM2, Tokenizer]:
    """A checkpoint (any `load_model` form, local or remote directory) and its tokenizer."""
    from tasks.pretrain import load_for_inference

    return load_for_inference(base_url, tokenizer_url)
