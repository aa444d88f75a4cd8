"""`lmforge chat`: talk to a checkpoint in the terminal, with its tool calls executed and shown.

A `ChatSession` keeps the conversation as `model.chat.Message`s. `respond` streams the assistant's tokens to a
`write` callback as they are decoded; when the model writes a tool call (generation stops at ``<|action_end|>``),
the call is executed — Python in the sandbox, a plugin for real — its result is shown and appended as an
``environment`` turn, and generation continues, up to `max_tool_rounds` calls per reply. `run_chat` is the terminal
loop over `read` / `write` functions (the CLI passes ``input`` and ``sys.stdout.write``; the tests pass their own):
``/reset`` starts over, ``/exit`` (or end of input) leaves.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from model.chat import Message, ToolCall, generation_prompt, parse_assistant, stop_token_ids, tool_call_error
from model.generate import SamplingConfig, stream
from model.model import InternLM2
from model.tokenizer import Tokenizer

SYSTEM = "You are a helpful assistant. Use the tools when a computation or a lookup helps."
PROMPT = "you> "


@dataclass
class ChatSession:
    model: InternLM2
    tokenizer: Tokenizer
    tools: dict[str, Any]  # plugin name → plugin (see tasks.sft.plugins); the interpreter is always available
    sandbox: Any = None  # a tasks.sft.sandbox.SandboxConfig, or None for its defaults
    use_tools: bool = True
    max_new_tokens: int = 256
    max_tool_rounds: int = 3
    temperature: float = 0.0
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        from tasks.sft.plugins import plugin_schemas

        self.messages = [Message("system", SYSTEM)]
        if self.use_tools:
            self.messages.append(Message("system", "Python code runs in a sandbox; print what you need.",
                                         name="interpreter"))
            if self.tools:
                schemas = plugin_schemas([self.tools[name] for name in sorted(self.tools)])
                self.messages.append(Message("system", schemas, name="plugin"))

    def _generate(self, write: Callable[[str], Any]) -> str:
        ids = generation_prompt(self.messages, self.tokenizer)
        cfg = SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                             stop_ids=tuple(stop_token_ids(self.tokenizer)))
        out: list[int] = []
        shown = ""
        with torch.inference_mode():
            for token in stream(self.model, ids, cfg):
                out.append(token)
                text = self.tokenizer.decode(out, skip_special=True)
                if text.startswith(shown):  # a partial UTF-8 character decodes later: print what is settled
                    write(text[len(shown) :])
                    shown = text
        return self.tokenizer.decode(out, skip_special=False)

    def run_tool(self, call: ToolCall) -> Message:
        """Execute a tool call; the environment turn with its result."""
        from model.chat import interpreter_source
        from tasks.sft.sandbox import run_python

        if call.kind == "interpreter":
            return Message("environment", run_python(interpreter_source(call.code or ""), self.sandbox).text()
                           or "(no output)", name="interpreter")
        plugin = self.tools.get(call.name or "")
        if plugin is None:
            return Message("environment", f"error: unknown plugin {call.name!r}; available: {sorted(self.tools)}",
                           name=call.name or "plugin")
        return Message("environment", plugin(call.arguments or {}) or "(no output)", name=plugin.name)

    def respond(self, user: str, write: Callable[[str], Any]) -> list[Message]:
        """Add the user's turn, stream the reply (running tool calls); returns the turns it added."""
        start = len(self.messages)
        self.messages.append(Message("user", user))
        for _ in range(self.max_tool_rounds + 1):
            raw = self._generate(write)
            content, call = parse_assistant(raw)
            if call is None or not self.use_tools:
                problem = tool_call_error(raw) if "<|action_start|>" in raw else None
                if problem:
                    write(f"\n[malformed tool call: {problem}]")
                self.messages.append(Message("assistant", content))
                break
            self.messages.append(Message("assistant", content, tool_call=call))
            result = self.run_tool(call)
            what = "interpreter" if call.kind == "interpreter" else f"plugin {call.name}"
            args = "" if call.kind == "interpreter" else " " + json.dumps(call.arguments, ensure_ascii=False)
            write(f"\n[{what}{args}] → {result.content}\n")
            self.messages.append(result)
        write("\n")
        return self.messages[start:]


def run_chat(session: ChatSession, read: Callable[[str], str], write: Callable[[str], Any]) -> int:
    """The terminal loop; returns the number of replies given."""
    replies = 0
    write("lmforge chat: /reset starts over, /exit leaves.\n")
    while True:
        try:
            line = read(PROMPT)
        except EOFError:
            write("\n")
            return replies
        line = line.strip()
        if line in ("/exit", "/quit"):
            return replies
        if line == "/reset":
            session.reset()
            write("(conversation reset)\n")
            continue
        if not line:
            continue
        write("assistant> ")
        session.respond(line, write)
        replies += 1
