"""`LMForgeModel`: an OpenCompass model class for lmforge checkpoints, so real OpenCompass evaluates our models.

A config names it by dotted path, ``dict(type="tasks.evaluate.oc_model.LMForgeModel", path=<checkpoint>,
tokenizer_path=<tokenizer.json>, chat=..., run_cfg=dict(num_gpus=0))``. It implements what OpenCompass's inferencers
call: `get_ppl` (PPLInferencer), `generate` (GenInferencer) and `get_token_len`.

- **Base models** (``chat=False``) keep OpenCompass's default `parse_template`: the prompt is plain text, encoded
  with a leading ``<s>`` as pretraining documents were, and generation stops at ``</s>``.
- **Chat models** (``chat=True``) turn OpenCompass's PromptList (``{"role": "HUMAN"|"BOT"|"SYSTEM", "prompt"}``
  items, section markers skipped) into `model.chat` turns and render them as ChatML (a plain string prompt is one
  user turn). Empty items are skipped and neighbouring items of one role are joined with a newline, as OpenCompass's
  HF chat wrapper does; in ``gen`` mode trailing BOT items are dropped, since that is the turn to generate (its
  ``prompt`` is dropped too, as OpenCompass's own meta-template parser does), and the text ends with the generation
  prompt. In ``ppl`` mode a BOT item is the assistant content being scored. Generation stops at ``<|im_end|>``,
  ``<|action_end|>`` or ``</s>``.
- **The tools marker**: a SYSTEM item whose prompt is exactly `TOOLS_MARKER` becomes the tool declarations SFT
  trained on (`tool_declarations`): the interpreter's system turn, then one plugin turn with the schemas.
- **The tool loop**: for a chat prompt that declares tools, a reply ending in a tool call is executed (Python in the
  sandbox, plugins from `tasks.sft.train.plugin_table`), the assistant turn and the environment turn with the result
  are appended exactly as `model.chat` renders them, and generation goes on, at most ``max_tool_rounds`` calls; the
  string returned is the last reply's content. `tool_stats` counts calls, well-formed ones, ones that ran without
  error, and well-formed ones past the round limit (not run). A prompt without declarations never runs a tool.

OpenCompass passes prompts between `parse_template` and the model as rendered strings. Encoding such a string would
lose what `model.chat` guarantees (special spellings in content stay bytes; content that opens with a line break
starts on a token boundary), so `parse_template` keeps the turns and their ids (`generation_prompt` or
`encode_chat`) per rendered string, and the model methods look them up; a string that did not come from it is
encoded as it is.

`get_ppl` is the mean next-token cross-entropy over the tokens after the first ``mask_length[i]`` (``<s>``
included in the count, as `get_token_len` counts it). OpenCompass's HF wrapper divides by one token too many when
no mask is given; here it is the plain mean. Inputs longer than ``max_seq_len`` lose tokens on the left (the mask
moves with them); generation prompts are cut on the left to leave ``max_out_len`` tokens of room.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from opencompass.models.base import BaseModel
from opencompass.utils.prompt import PromptList

from infra.settings import get_logger
from model.chat import (
    TOOLS,
    Message,
    encode_chat,
    generation_prompt,
    parse_assistant,
    render,
    stop_token_ids,
    tool_call_error,
)
from model.generate import SamplingConfig, generate
from model.model import rope_theta_for
from model.tokenizer import BOS
from tasks.evaluate.oc_config import TOOLS_MARKER  # a SYSTEM item holding exactly this → the tool declarations
from tasks.sft.generate import INTERPRETER_SYSTEM
from tasks.sft.plugins import plugin_schemas
from tasks.sft.sandbox import SandboxConfig
from tasks.sft.train import corpus_docs, load_base, plugin_table, tool_round

log = get_logger(__name__)

SFT_PLUGINS = ("calculator", "unit_converter")  # what `build_sft`'s plugin items declare, in this order
OC_ROLES = {"HUMAN": "user", "BOT": "assistant", "SYSTEM": "system"}
PROMPT_CACHE = 8192  # rendered prompts remembered; OpenCompass parses a batch just before running it


def tool_declarations(tools: Sequence[str], plugins: Mapping[str, Any]) -> list[Message]:
    """The system turns that declare `tools`, as the SFT data declares them.

    Each entry is ``"interpreter"``, ``"plugin"`` (the SFT data's plugins, `SFT_PLUGINS`) or the name of a plugin
    in `plugins`. The interpreter turn comes first; all plugins share one turn, in the order named.
    """
    if isinstance(tools, str):
        raise ValueError(f"tools must be a sequence of names, got the string {tools!r}: write ({tools!r},)")
    unknown = [t for t in tools if t not in ("interpreter", "plugin", *plugins)]
    if unknown:
        raise ValueError(
            f"unknown tools {unknown}: expected 'interpreter', 'plugin' (the SFT plugins {SFT_PLUGINS}) "
            f"or a plugin name from {sorted(plugins)} (corpus_search needs corpus=...)"
        )
    expanded = (SFT_PLUGINS if t == "plugin" else (t,) for t in tools if t != "interpreter")
    names = list(dict.fromkeys(name for group in expanded for name in group))
    turns = [Message("system", INTERPRETER_SYSTEM, name="interpreter")] if "interpreter" in tools else []
    if names:
        turns.append(Message("system", plugin_schemas([plugins[name] for name in names]), name="plugin"))
    return turns


def prompt_messages(prompt: PromptList | str, mode: str, declarations: Sequence[Message] = ()) -> list[Message]:
    """Our turns for one OpenCompass prompt (see the module docstring); `declarations` replace `TOOLS_MARKER`."""
    if mode not in ("gen", "ppl"):
        raise ValueError(f"mode must be 'gen' or 'ppl', got {mode!r}")
    if isinstance(prompt, str):
        return [Message("user", prompt)]
    items = [_item_turn(item) for item in prompt if not (isinstance(item, dict) and "section" in item)]
    if mode == "gen":
        while items and items[-1][0] == "assistant":  # the turn the model is about to write
            items.pop()
    turns: list[Message] = []
    for role, text in items:
        if role == "system" and text == TOOLS_MARKER:
            turns += declarations
        elif text:
            last = turns[-1] if turns else None
            if last is not None and last.role == role and last.name is None:
                turns[-1] = Message(role, f"{last.content}\n{text}")
            else:
                turns.append(Message(role, text))
    return turns


def _item_turn(item: Any) -> tuple[str, str]:
    """(our role, text) of one PromptList item; a bare string is user text."""
    if isinstance(item, str):
        return "user", item
    if not isinstance(item, dict):
        raise ValueError(f"prompt item {item!r}: expected a string or a {{'role', 'prompt'}} dict")
    role = OC_ROLES.get(item.get("role")) or OC_ROLES.get(item.get("fallback_role"))
    text = item.get("prompt", "")
    if role is None or not isinstance(text, str):
        raise ValueError(
            f"prompt item {item!r}: expected role (or fallback_role) in {sorted(OC_ROLES)} and a string prompt"
        )
    return role, text


def _placement(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """CUDA when available (bf16 where supported), else CPU in fp32; either can be forced by name."""
    where = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        bf16 = where.type == "cuda" and torch.cuda.is_bf16_supported()
        return where, torch.bfloat16 if bf16 else torch.float32
    kind = getattr(torch, dtype, None)
    if not isinstance(kind, torch.dtype) or not kind.is_floating_point:
        raise ValueError(f"dtype must name a torch floating type ('float32', 'bfloat16', ...), got {dtype!r}")
    return where, kind


class LMForgeModel(BaseModel):
    """An lmforge checkpoint behind OpenCompass's model interface (see the module docstring).

    ``tools`` and ``corpus`` matter to chat models only: the tools the marker declares (`tool_declarations`) and a
    cleaned corpus URL whose documents the ``corpus_search`` plugin searches. ``batch_size`` splits each call into
    model batches. ``device`` / ``dtype`` override the placement; other keywords go to OpenCompass's `BaseModel`.
    """

    def __init__(
        self,
        path: str,
        tokenizer_path: str,
        chat: bool = False,
        max_seq_len: int = 2048,
        batch_size: int = 8,
        tools: Sequence[str] = ("interpreter",),
        max_tool_rounds: int = 2,
        corpus: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        **kwargs: Any,
    ) -> None:
        if chat and kwargs.get("meta_template"):
            raise ValueError("meta_template has no effect on a chat LMForgeModel (it renders ChatML): drop it")
        if max_seq_len < 2 or batch_size < 1 or max_tool_rounds < 0:
            raise ValueError(
                f"need max_seq_len >= 2, batch_size >= 1, max_tool_rounds >= 0; got {max_seq_len}, "
                f"{batch_size}, {max_tool_rounds}"
            )
        super().__init__(path=path, max_seq_len=max_seq_len, **kwargs)
        self.chat, self.batch_size, self.max_tool_rounds = chat, batch_size, max_tool_rounds
        self.plugins = plugin_table(corpus_docs(corpus))
        self.declarations = tool_declarations(tools, self.plugins)
        self.sandbox = SandboxConfig()
        self.device, self.dtype = _placement(device, dtype)
        model, self.tokenizer = load_base(path, tokenizer_path)
        self.model = model.to(self.device, self.dtype).eval()
        self.stop_ids = stop_token_ids(self.tokenizer) if chat else (self.tokenizer.eos_id,)
        self.tool_stats = {"calls": 0, "well_formed": 0, "executed": 0, "over_limit": 0}
        self._prompts: OrderedDict[str, tuple[list[Message], list[int]]] = OrderedDict()
        log.info("LMForgeModel %s (%s) on %s/%s", path, "chat" if chat else "base", self.device, self.dtype)

    # --- prompts and tokens ----------------------------------------------------------------------------------------

    def parse_template(self, prompt_template: Any, mode: str) -> Any:
        """ChatML text for chat models (the turns and ids are remembered); OpenCompass's default for base models."""
        if not self.chat:
            return super().parse_template(prompt_template, mode)
        if isinstance(prompt_template, list | tuple) and not isinstance(prompt_template, PromptList):
            return [self.parse_template(p, mode) for p in prompt_template]
        messages = prompt_messages(prompt_template, mode, self.declarations)
        gen = mode == "gen"
        ids = generation_prompt(messages, self.tokenizer) if gen else encode_chat(messages, self.tokenizer)[0]
        text = render(messages, add_generation_prompt=gen)
        self._prompts[text] = (messages, ids)
        self._prompts.move_to_end(text)
        while len(self._prompts) > PROMPT_CACHE:
            self._prompts.popitem(last=False)
        return text

    def _ids(self, text: str) -> list[int]:
        """Token ids of a prompt: remembered by `parse_template`, else encoded as is (with ``<s>`` in front)."""
        known = self._prompts.get(text)
        if known is not None:
            return list(known[1])
        return self.tokenizer.encode(text) if text.startswith(BOS) else self.tokenizer.encode(text, bos=True)

    def get_token_len(self, prompt: str) -> int:
        """Tokens the model reads for `prompt`, ``<s>`` included (what `get_ppl`'s ``mask_length`` counts)."""
        return len(self._ids(str(prompt)))

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Row indices in batches of similar length. Rows whose RoPE base differs (dynamic NTK past the trained
        context) never share a batch: the model picks one base per forward pass, from its longest position."""
        groups: dict[float, list[int]] = {}
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            groups.setdefault(rope_theta_for(self.model.config, lengths[i]), []).append(i)
        size = self.batch_size
        return [group[s : s + size] for group in groups.values() for s in range(0, len(group), size)]

    # --- perplexity ------------------------------------------------------------------------------------------------

    def get_ppl(self, inputs: list[str], mask_length: list[int] | None = None) -> np.ndarray:
        """Mean token NLL of each input over its tokens after the first ``mask_length[i]``."""
        if mask_length is not None and len(mask_length) != len(inputs):
            raise ValueError(f"mask_length has {len(mask_length)} entries for {len(inputs)} inputs")
        masks = mask_length if mask_length is not None else [0] * len(inputs)
        rows = [self._scored(i, self._ids(str(text)), masks[i]) for i, text in enumerate(inputs)]
        out = np.zeros(len(rows), dtype=np.float64)
        for batch in self._batches([len(ids) for ids, _ in rows]):
            out[batch] = self._batch_nll([rows[i] for i in batch])
        return out

    def _scored(self, index: int, ids: list[int], mask: int) -> tuple[list[int], int]:
        """(ids cut to max_seq_len from the left, index of the first scored token)."""
        cut = max(len(ids) - self.max_seq_len, 0)
        ids, start = ids[cut:], max(mask - cut, 1)  # token 0 has nothing before it to be predicted from
        if start >= len(ids):
            raise ValueError(
                f"input {index}: no token left to score ({len(ids) + cut} tokens, {cut} cut to fit "
                f"max_seq_len={self.max_seq_len}, the first {mask} masked)"
            )
        return ids, start

    @torch.inference_mode()
    def _batch_nll(self, rows: Sequence[tuple[list[int], int]]) -> list[float]:
        # Right padding under plain causal attention: a real token only sees earlier, real tokens, at the positions
        # it has alone, so the padding changes nothing that is scored.
        width = max(len(ids) for ids, _ in rows)
        tokens = torch.full((len(rows), width), self.tokenizer.eos_id, dtype=torch.long, device=self.device)
        for r, (ids, _) in enumerate(rows):
            tokens[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        logits = self.model(tokens)  # (B, T, V)
        return [
            float(F.cross_entropy(logits[r, start - 1 : len(ids) - 1].float(), tokens[r, start : len(ids)]))
            for r, (ids, start) in enumerate(rows)
        ]

    # --- generation ------------------------------------------------------------------------------------------------

    def generate(self, inputs: list[str], max_out_len: int, stopping_criteria: Sequence[str] = ()) -> list[str]:
        """Greedy continuations, stop tokens removed; chat prompts that declare tools run the tool loop. Each reply
        is cut before the first of `stopping_criteria` (strings, as OpenCompass's inferencer passes them)."""
        if not 1 <= max_out_len < self.max_seq_len:
            raise ValueError(f"max_out_len must be in [1, max_seq_len={self.max_seq_len}), got {max_out_len}")
        chats = [self._tool_chat(str(text)) for text in inputs]
        plain = [i for i, chat in enumerate(chats) if chat is None]
        looped = [i for i, chat in enumerate(chats) if chat is not None]
        out = [""] * len(inputs)
        for i, ids in zip(plain, self._complete([self._ids(str(inputs[i])) for i in plain], max_out_len), strict=True):
            out[i] = self.tokenizer.decode(ids[:-1] if ids and ids[-1] in self.stop_ids else ids, skip_special=False)
        finals = self._tool_loop([list(chats[i] or []) for i in looped], max_out_len)
        for i, text in zip(looped, finals, strict=True):
            out[i] = text
        return [_cut(text, stopping_criteria) for text in out]

    def _tool_chat(self, text: str) -> list[Message] | None:
        """The turns of a chat prompt that declares tools (so runs the tool loop), else None."""
        known = self._prompts.get(text) if self.chat else None
        if known is None or not any(m.role == "system" and m.name in TOOLS for m in known[0]):
            return None
        return known[0]

    def _complete(self, prompts: Sequence[list[int]], max_new: int) -> list[list[int]]:
        """New ids per prompt (stop token included when hit); prompts cut on the left to leave `max_new` of room."""
        prompts = [p[-(self.max_seq_len - max_new) :] for p in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        for batch in self._batches([len(p) for p in prompts]):
            for i, ids in zip(batch, self._generate_ids([prompts[i] for i in batch], max_new), strict=True):
                out[i] = ids
        return out

    def _generate_ids(self, prompts: list[list[int]], max_new: int) -> list[list[int]]:
        """One greedy batch on the KV cache: the only place the model decodes (tests script it here)."""
        cfg = SamplingConfig(max_new_tokens=max_new, stop_ids=tuple(self.stop_ids))
        return generate(self.model, prompts, cfg, pad_id=self.tokenizer.eos_id)

    def _tool_loop(self, chats: list[list[Message]], max_new: int) -> list[str]:
        """Final reply contents: each round generates for the chats still calling tools and runs their calls."""
        finals = [""] * len(chats)
        active = list(range(len(chats)))
        for round_ in range(self.max_tool_rounds + 1):
            if not active:
                break
            replies = self._complete([generation_prompt(chats[i], self.tokenizer) for i in active], max_new)
            still = []
            for i, ids in zip(active, replies, strict=True):
                text = self.tokenizer.decode(ids, skip_special=False)
                finals[i], turns = self._reply(text, last_round=round_ == self.max_tool_rounds)
                if turns:
                    chats[i] = [*chats[i], *turns]
                    still.append(i)
            active = still
        return finals

    def _reply(self, text: str, *, last_round: bool) -> tuple[str, list[Message]]:
        """(the reply's content, the assistant + environment turns when its tool call ran, else [])."""
        content, call = parse_assistant(text)
        if call is None and tool_call_error(text) is None:
            return content, []
        self.tool_stats["calls"] += 1
        if call is None:
            return content, []
        self.tool_stats["well_formed"] += 1
        if last_round:
            self.tool_stats["over_limit"] += 1
            return content, []
        turns, ok = tool_round(content, call, self.plugins, self.sandbox)
        self.tool_stats["executed"] += ok
        return content, turns


def _cut(text: str, stops: Iterable[str]) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text
