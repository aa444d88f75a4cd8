"""InternLM2's chat format: validate chat records, render ChatML, encode with a loss mask, parse tool calls.

The format (InternLM2 §4.1 and §4.4, Lagent's ``INTERNLM2_META``), for a conversation of any length::

    <s><|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>system name=<|plugin|>\\n{JSON schemas}<|im_end|>\\n       (or name=<|interpreter|>: tool declarations)
    <|im_start|>user\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{content}<|action_start|><|plugin|>\\n{"name": …, "parameters": …}<|action_end|>\\n
    <|im_end|>\\n                                                               (one line, wrapped here)
    <|im_start|>environment name=<|plugin|>\\n{result}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

One ``<s>`` opens the conversation and nothing closes it (no ``</s>``): generation stops at ``<|im_end|>``, or at
``<|action_end|>`` when the model calls a tool. An interpreter call is ``<|action_start|><|interpreter|>\\n{code}
<|action_end|>\\n``. The code goes in verbatim: InternLM2's data usually wraps it in a ```` ```python ```` fence, which
then belongs to ``ToolCall.code`` (``interpreter_source`` strips it before running). A plugin call is
``json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)`` (Lagent writes ASCII escapes; raw UTF-8
costs fewer tokens and reads the same). An environment header names the tool *kind*: ``<|interpreter|>`` when the
turn's ``name`` is ``"interpreter"``, ``<|plugin|>`` for any plugin name (the plugin's own name only lives in the
record, as in InternLM2, where the call just before says which plugin answered).

Encoding never tokenizes the rendered string. Each turn is a list of pieces, special tokens or plain text, shared
with ``render`` so the text and the ids cannot drift apart. Special pieces become their single ids; text pieces are
encoded so that a special token's *spelling* inside them (a user typing ``<|im_end|>``, a web page returned by a
plugin) stays ordinary bytes: the usual encoder is tried first, and if its output holds any special id the piece is
re-encoded with the pre-tokenizer and BPE model alone, which know nothing of added tokens (prompt-injection safety).
A turn's header (``<|im_start|>assistant\\n``) is encoded apart from its content, so the content starts on a token
boundary exactly as it does at generation time, after ``generation_prompt``. For content that does not open with a
line break (after optional spaces) the ids equal the tokenizer's encoding of the rendered text, and so the HF chat
template's; otherwise the pre-tokenizer would have merged that line break with the header's.

Loss mask (XTuner's ``internlm2_chat`` recipe): True on each assistant turn's content, its action (through the
newline after ``<|action_end|>``) and its ``<|im_end|>``; False on ``<s>``, every header, the ``\\n`` after
``<|im_end|>``, and every system, user and environment token.

Record contract, validated by ``parse_chat`` (each violation a ``BadChat`` with a code from ``CHAT_ERRORS``)::

    {"messages": [{"role": str, "content": str, "tool_call": {...} (optional), "name": str (optional)}, ...],
     "id": str (optional), "meta": {...} (optional)}

``tool_call`` is ``{"type": "interpreter", "code": str}`` or ``{"type": "plugin", "name": str, "arguments": {...}}``.
Choices where the paper is silent: system turns may only open the conversation (a plain one and tool declarations
may follow each other there); an assistant turn that calls a tool must be the last turn or be followed directly by
the environment turn answering it, whose ``name`` is ``"interpreter"`` or the plugin's name; content may be empty
only on an assistant turn that calls a tool; an optional field that is ``null`` counts as absent (columnar writers
emit nulls), so ``to_record`` gives the canonical form, without them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from model.tokenizer import BOS, EOS, Tokenizer

ROLES = ("system", "user", "assistant", "environment")
TOOLS = ("interpreter", "plugin")
CHAT_ERRORS = (
    "not_an_object",
    "missing_messages",
    "empty_messages",
    "not_a_message",
    "bad_role",
    "missing_content",
    "wrong_type",
    "unknown_field",
    "unknown_tool",
    "bad_tool_call",
    "tool_call_not_assistant",
    "environment_without_call",
    "no_assistant_turn",
    "bad_order",
)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ACTION_START, ACTION_END = "<|action_start|>", "<|action_end|>"
TOOL_TOKENS: dict[str, str] = {"interpreter": "<|interpreter|>", "plugin": "<|plugin|>"}
ACTION_TOKENS = (ACTION_START, ACTION_END, *TOOL_TOKENS.values())
STOP_TOKENS = (IM_END, ACTION_END, EOS)  # where a chat generation ends: turn over, tool called, or document over

RECORD_FIELDS = ("messages", "id", "meta")
MESSAGE_FIELDS = ("role", "content", "tool_call", "name")
CALL_FIELDS = {"interpreter": ("type", "code"), "plugin": ("type", "name", "arguments")}
PLUGIN_CALL_KEYS = ("name", "parameters")  # the JSON an assistant writes inside a plugin action
NAMED_ROLES = ("system", "environment")
_EXCERPT = 40
_FENCE = re.compile(r"\A\s*```[\w+-]*[ \t]*\n(?P<code>.*?)\n?```\s*\Z", re.DOTALL)

_Piece = tuple[str, bool]  # (text, is_special_token)


class BadChat(ValueError):
    """A chat record that breaks the contract; ``code`` is one of CHAT_ERRORS, ``turn`` the message index or None."""

    def __init__(self, code: str, detail: str, *, turn: int | None = None, field: str | None = None) -> None:
        assert code in CHAT_ERRORS, code
        where = "record" if turn is None else f"messages[{turn}]"
        super().__init__(f"{where}{'.' + field if field else ''}: {detail}")
        self.code, self.turn, self.field = code, turn, field


def _tool_call_problem(kind: str, code: Any, name: Any, arguments: Any) -> str | None:
    """Why these ToolCall fields do not make a call, or None; shared by ToolCall, parse_chat and parse_assistant."""
    if kind not in TOOLS:
        return f"kind must be one of {TOOLS}, got {kind!r}"
    if kind == "interpreter":
        if name is not None or arguments is not None:
            return "an interpreter call takes code only, not name or arguments"
        if not isinstance(code, str) or not code.strip():
            return f"interpreter code must be a non-empty string of Python, got {code!r}"
        return None
    if code is not None:
        return "a plugin call takes name and arguments, not code"
    if not isinstance(name, str) or not name.strip():
        return f"plugin name must be a non-empty string, got {name!r}"
    if name == "interpreter":
        return "plugin name 'interpreter' is reserved for the code interpreter"
    if not isinstance(arguments, dict):
        return f"plugin arguments must be a JSON object, got {type(arguments).__name__}"
    try:
        json.dumps(arguments, allow_nan=False)
    except (TypeError, ValueError) as err:
        return f"plugin arguments must be plain JSON: {err}"
    return None


@dataclass(frozen=True)
class ToolCall:
    """One action of an assistant turn: Python for the interpreter, or a named plugin with JSON arguments."""

    kind: str  # "interpreter" or "plugin"
    code: str | None = None  # interpreter: Python source
    name: str | None = None  # plugin: plugin name
    arguments: dict | None = None  # plugin: JSON arguments

    def __post_init__(self) -> None:
        problem = _tool_call_problem(self.kind, self.code, self.name, self.arguments)
        if problem:
            raise ValueError(f"ToolCall: {problem}")

    @property
    def tool(self) -> str:
        """The ``name`` of the environment turn that answers this call: "interpreter" or the plugin's name."""
        return "interpreter" if self.kind == "interpreter" else str(self.name)


@dataclass(frozen=True)
class Message:
    """One turn. ``name``: the answering tool on an environment turn; "plugin"/"interpreter" on a system turn that
    declares tools. ``tool_call`` only on assistant turns."""

    role: str
    content: str
    tool_call: ToolCall | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Message.role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ValueError(f"Message.content must be a string, got {type(self.content).__name__}")
        if self.tool_call is not None and self.role != "assistant":
            raise ValueError(f"Message.tool_call is only allowed on assistant turns, not {self.role}")
        if self.name is not None and self.role not in NAMED_ROLES:
            raise ValueError(f"Message.name is only allowed on {NAMED_ROLES} turns, not {self.role}")
        if self.role == "system" and self.name not in (None, *TOOLS):
            raise ValueError(f"a system Message.name must be one of {TOOLS} or None, got {self.name!r}")


# --- parsing records -----------------------------------------------------------------------------------------------


def parse_chat(record: dict, *, plugins: Collection[str] | None = None) -> list[Message]:
    """Validate one chat record and return its turns; ``plugins``, when given, is the set of callable plugin names."""
    raw_messages = _raw_messages(record)
    chat = [_parse_message(raw, turn, plugins) for turn, raw in enumerate(raw_messages)]
    _check_order(chat)
    return chat


def _raw_messages(record: Any) -> list[Any]:
    if not isinstance(record, dict):
        raise BadChat("not_an_object", f'expected an object {{"messages": [...]}}, got {type(record).__name__}')
    unknown = sorted(map(str, set(record) - set(RECORD_FIELDS)))
    if unknown:
        raise BadChat("unknown_field", f"unknown fields {unknown}; a record holds {RECORD_FIELDS} (extras go in meta)")
    if record.get("messages") is None:
        raise BadChat("missing_messages", 'no "messages": expected a list of {"role", "content"} objects')
    for field, kind, form in (("messages", list, "a list"), ("id", str, "a string"), ("meta", dict, "an object")):
        value = record.get(field)
        if value is not None and not isinstance(value, kind):
            raise BadChat("wrong_type", f"{field} must be {form}, got {type(value).__name__}", field=field)
    if not record["messages"]:
        raise BadChat("empty_messages", "messages is empty: a chat needs at least one assistant turn", field="messages")
    return record["messages"]


def _parse_message(raw: Any, turn: int, plugins: Collection[str] | None) -> Message:
    if not isinstance(raw, dict):
        raise BadChat("not_a_message", f'expected an object {{"role", "content"}}, got {type(raw).__name__}', turn=turn)
    unknown = sorted(map(str, set(raw) - set(MESSAGE_FIELDS)))
    if unknown:
        raise BadChat("unknown_field", f"unknown fields {unknown}; a message holds {MESSAGE_FIELDS}", turn=turn)
    role = raw.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise BadChat("bad_role", f"role must be one of {ROLES}, got {role!r}", turn=turn, field="role")
    tool_call = _parse_tool_call(raw.get("tool_call"), turn, role, plugins)
    content = _parse_content(raw.get("content"), turn, role, tool_call)
    return Message(role, content, tool_call, _parse_name(raw.get("name"), turn, role))


def _parse_content(content: Any, turn: int, role: str, tool_call: ToolCall | None) -> str:
    if content is None:
        raise BadChat("missing_content", f"no content: this {role} turn needs a string", turn=turn, field="content")
    if not isinstance(content, str):
        detail = f"content must be a string, got {type(content).__name__}"
        raise BadChat("wrong_type", detail, turn=turn, field="content")
    if not content and tool_call is None:
        raise BadChat(
            "missing_content",
            f"content is empty; only an assistant turn with a tool_call may have empty content, this is a {role} turn",
            turn=turn,
            field="content",
        )
    return content


def _parse_tool_call(raw: Any, turn: int, role: str, plugins: Collection[str] | None) -> ToolCall | None:
    if raw is None:
        return None
    if role != "assistant":
        detail = f"only assistant turns call tools, not {role} turns"
        raise BadChat("tool_call_not_assistant", detail, turn=turn, field="tool_call")
    forms = '{"type": "interpreter", "code": str} or {"type": "plugin", "name": str, "arguments": {...}}'
    if not isinstance(raw, dict) or "type" not in raw:
        raise BadChat("bad_tool_call", f"expected {forms}, got {raw!r:.{_EXCERPT}}", turn=turn, field="tool_call")
    kind = raw["type"]
    if not isinstance(kind, str) or kind not in TOOLS:
        raise BadChat("unknown_tool", f"type must be one of {TOOLS}, got {kind!r}", turn=turn, field="tool_call.type")
    if sorted(raw) != sorted(CALL_FIELDS[kind]):
        detail = f"a {kind} call has exactly the keys {CALL_FIELDS[kind]}, got {sorted(raw)}"
        raise BadChat("bad_tool_call", detail, turn=turn, field="tool_call")
    problem = _tool_call_problem(kind, raw.get("code"), raw.get("name"), raw.get("arguments"))
    if problem:
        raise BadChat("bad_tool_call", problem, turn=turn, field="tool_call")
    if kind == "plugin" and plugins is not None and raw["name"] not in plugins:
        detail = f"plugin {raw['name']!r} is not one of the available plugins {sorted(plugins)}"
        raise BadChat("unknown_tool", detail, turn=turn, field="tool_call.name")
    return ToolCall(kind, raw.get("code"), raw.get("name"), raw.get("arguments"))


def _parse_name(name: Any, turn: int, role: str) -> str | None:
    if name is None:
        return None
    if role not in NAMED_ROLES:
        detail = f"name is only allowed on {NAMED_ROLES} turns, not on a {role} turn"
        raise BadChat("unknown_field", detail, turn=turn, field="name")
    if not isinstance(name, str):
        raise BadChat("wrong_type", f"name must be a string, got {type(name).__name__}", turn=turn, field="name")
    if role == "system" and name not in TOOLS:
        detail = f"a system turn's name declares a tool kind, one of {TOOLS}; got {name!r}"
        raise BadChat("unknown_tool", detail, turn=turn, field="name")
    return name


def _check_order(chat: Sequence[Message]) -> None:
    """Sequence rules: leading system turns, each call answered by the next turn, at least one assistant turn."""
    opened = False  # a non-system turn has been seen
    for turn, message in enumerate(chat):
        previous = chat[turn - 1] if turn else None
        if message.role == "system" and opened:
            raise BadChat("bad_order", "system turns may only open the conversation", turn=turn, field="role")
        opened = opened or message.role != "system"
        call = previous.tool_call if previous is not None else None
        if message.role == "environment":
            _check_answer(message, call, turn)
        elif call is not None:
            detail = f"turn {turn - 1} calls {call.tool!r}, so this turn must be its result, not a {message.role} turn"
            raise BadChat("bad_order", detail, turn=turn, field="role")
    if not any(m.role == "assistant" for m in chat):
        detail = f"none of the {len(chat)} turns is an assistant turn: nothing to learn"
        raise BadChat("no_assistant_turn", detail, field="messages")


def _check_answer(message: Message, call: ToolCall | None, turn: int) -> None:
    if call is None:
        detail = "an environment turn must directly follow an assistant turn with a tool_call"
        raise BadChat("environment_without_call", detail, turn=turn)
    if message.name != call.tool:
        detail = f"the environment turn answers the call to {call.tool!r}, so its name must be {call.tool!r}"
        raise BadChat("environment_without_call", f"{detail}, got {message.name!r}", turn=turn, field="name")


def to_record(messages: Sequence[Message], *, record_id: str | None = None, meta: dict | None = None) -> dict:
    """The record ``parse_chat`` reads back into ``messages``; optional fields are left out rather than null."""
    record: dict[str, Any] = {"messages": [_message_record(m) for m in messages]}
    if record_id is not None:
        record["id"] = record_id
    if meta is not None:
        record["meta"] = meta
    return record


def _message_record(message: Message) -> dict[str, Any]:
    raw: dict[str, Any] = {"role": message.role, "content": message.content}
    call = message.tool_call
    if call is not None:
        fields = {"code": call.code} if call.kind == "interpreter" else {"name": call.name, "arguments": call.arguments}
        raw["tool_call"] = {"type": call.kind, **fields}
    if message.name is not None:
        raw["name"] = message.name
    return raw


# --- rendering and encoding ----------------------------------------------------------------------------------------


def _header(role: str, tool_kind: str | None = None) -> list[_Piece]:
    if tool_kind is None:
        return [(IM_START, True), (f"{role}\n", False)]
    return [(IM_START, True), (f"{role} name=", False), (TOOL_TOKENS[tool_kind], True), ("\n", False)]


def _header_tool(message: Message) -> str | None:
    """The tool token a header carries: the declared kind on a system turn, the answering kind on an environment."""
    if message.name is None:
        return None
    if message.role == "environment":
        return "interpreter" if message.name == "interpreter" else "plugin"
    return message.name


def _action(call: ToolCall) -> list[_Piece]:
    if call.kind == "interpreter":
        payload = str(call.code)
    else:
        payload = json.dumps({"name": call.name, "parameters": call.arguments}, ensure_ascii=False)
    tool = TOOL_TOKENS[call.kind]
    return [(ACTION_START, True), (tool, True), ("\n" + payload, False), (ACTION_END, True), ("\n", False)]


def _body(message: Message) -> list[_Piece]:
    """Content and action: what an assistant writes between its header and ``<|im_end|>``."""
    return [(message.content, False), *(_action(message.tool_call) if message.tool_call else [])]


def _turn(message: Message) -> list[tuple[list[_Piece], bool]]:
    """A turn as (pieces, trained) groups: header, body through <|im_end|>, and the newline that separates turns."""
    header = _header(message.role, _header_tool(message))
    body = [*_body(message), (IM_END, True)]
    return [(header, False), (body, message.role == "assistant"), ([("\n", False)], False)]


def _text(pieces: Sequence[_Piece]) -> str:
    return "".join(text for text, _ in pieces)


def assistant_text(content: str, tool_call: ToolCall | None = None) -> str:
    """What an assistant turn holds between its header and ``<|im_end|>``; ``parse_assistant`` inverts it."""
    return _text(_body(Message("assistant", content, tool_call)))


def render(messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
    """The exact ChatML text; for plain turns equal to the HF template's ``apply_chat_template(tokenize=False)``."""
    turns = "".join(_text(pieces) for message in messages for pieces, _ in _turn(message))
    return BOS + turns + (_text(_header("assistant")) if add_generation_prompt else "")


class _PieceEncoder:
    """Encodes pieces with one tokenizer: special pieces to their ids, text with special spellings kept as bytes."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special_ids = frozenset(tokenizer.special_ids.values())

    def __call__(self, piece: _Piece) -> list[int]:
        text, special = piece
        if special:
            return [self.tokenizer.token_id(text)]
        ids = self.tokenizer.encode(text)
        if self.special_ids.isdisjoint(ids):
            return ids
        # The added-token matcher found a special spelling in the text; the BPE model alone never emits those ids.
        backend = self.tokenizer.backend
        words = backend.pre_tokenizer.pre_tokenize_str(text)
        return [token.id for word, _ in words for token in backend.model.tokenize(word)]


def encode_chat(messages: Sequence[Message], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and the loss mask (True = train on this token), of equal length."""
    return _encode(messages, _PieceEncoder(tokenizer))


def generation_prompt(messages: Sequence[Message], tokenizer: Tokenizer) -> list[int]:
    """The conversation so far plus ``<|im_start|>assistant\\n``: a prefix of ``encode_chat`` with the reply added."""
    encode = _PieceEncoder(tokenizer)
    ids, _ = _encode(messages, encode)
    return ids + [i for piece in _header("assistant") for i in encode(piece)]


def _encode(messages: Sequence[Message], encode: _PieceEncoder) -> tuple[list[int], list[bool]]:
    ids, mask = [encode.tokenizer.bos_id], [False]
    for message in messages:
        for pieces, trained in _turn(message):
            for piece in pieces:
                piece_ids = encode(piece)
                ids += piece_ids
                mask += [trained] * len(piece_ids)
    return ids, mask


def stop_token_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Ids of STOP_TOKENS, for the generator's ``stop_ids``."""
    return tuple(tokenizer.token_id(token) for token in STOP_TOKENS)


# --- parsing generations -------------------------------------------------------------------------------------------


def parse_assistant(text: str) -> tuple[str, ToolCall | None]:
    """Split a generated assistant turn into its content and tool call; never raises.

    ``text`` is the decoded generation (special tokens kept), with or without a final stop token (``<|im_end|>`` or
    ``</s>``, dropped). With no action tokens the whole text is content. A malformed action gives ``(text, None)``,
    the text (less the stop token) kept whole as content; ``tool_call_error`` says what was wrong.
    """
    content, call, _ = _split_action(_strip_stop(text))
    return content, call


def tool_call_error(text: str) -> str | None:
    """Why the action in ``text`` is malformed; None when it is well formed or there is none."""
    return _split_action(_strip_stop(text))[2]


def interpreter_source(code: str) -> str:
    """The Python inside an interpreter call: ``code`` without the Markdown fence InternLM2's data wraps it in."""
    match = _FENCE.match(code)
    return match.group("code") if match else code


def _strip_stop(text: str) -> str:
    for stop in (IM_END, EOS):
        if text.endswith(stop):
            return text.removesuffix(stop)
    return text


def _split_action(body: str) -> tuple[str, ToolCall | None, str | None]:
    """(content, call, None) for a well-formed or absent action; (body, None, reason) for a malformed one."""
    if not any(token in body for token in ACTION_TOKENS):
        return body, None, None
    start = body.find(ACTION_START)
    content, rest = (body, "") if start < 0 else (body[:start], body[start + len(ACTION_START) :])
    stray = next((token for token in ACTION_TOKENS if token in content), None)
    if stray is not None:
        return body, None, f"{stray} outside an action: an action opens with {ACTION_START}"
    kind = next((k for k, token in TOOL_TOKENS.items() if rest.startswith(token)), None)
    if kind is None:
        return body, None, f"unknown action kind {rest[:_EXCERPT]!r}: expected {' or '.join(TOOL_TOKENS.values())}"
    rest = rest.removeprefix(TOOL_TOKENS[kind])
    if not rest.startswith("\n"):
        return body, None, f"{TOOL_TOKENS[kind]} must be followed by a newline, got {rest[:_EXCERPT]!r}"
    end = rest.find(ACTION_END)
    if end < 0:
        return body, None, f"missing {ACTION_END}: the action is not closed"
    payload, tail = rest[1:end], rest[end + len(ACTION_END) :]
    if tail not in ("", "\n"):
        return body, None, f"text after {ACTION_END}: {tail[:_EXCERPT]!r} (one action ends the turn)"
    inner = next((token for token in ACTION_TOKENS if token in payload), None)
    if inner is not None:
        return body, None, f"{inner} inside the action: one action per turn"
    call, problem = _call_from_payload(kind, payload)
    return (content, call, None) if call is not None else (body, None, problem)


def _call_from_payload(kind: str, payload: str) -> tuple[ToolCall | None, str | None]:
    if kind == "interpreter":
        problem = _tool_call_problem(kind, payload, None, None)
        return (None, problem) if problem else (ToolCall(kind, code=payload), None)
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as err:
        return None, f"plugin call is not valid JSON ({err}): {payload[:_EXCERPT]!r}"
    if not isinstance(data, dict) or sorted(data) != sorted(PLUGIN_CALL_KEYS):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        return None, f"plugin call must be a JSON object with exactly the keys {PLUGIN_CALL_KEYS}, got {got}"
    problem = _tool_call_problem(kind, None, data["name"], data["parameters"])
    return (None, problem) if problem else (ToolCall(kind, name=data["name"], arguments=data["parameters"]), None)
