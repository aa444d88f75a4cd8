"""Preference pairs for the conditional reward model: read users' pairs, and label sampled responses by gold judges.

A `PreferencePair` is one comparison in one domain: a prompt (chat messages), the chosen and the rejected response.
Two sources:

- **Users' pairs**, JSONL lines ``{"domain", "prompt", "chosen", "rejected", "meta"?}`` (`read_pairs`). A line that
  breaks the contract goes to a quarantine with its file, line number, an error code from PAIR_ERRORS and a detail;
  the rest is returned, as `tasks.sft.train.read_chats` does for chats.
- **Gold-labelled pairs** (`pairs_from_samples`): several responses to one `generate_sft` record, ordered by the gold
  judge (`tasks.rlhf.judges`); equal gold scores make no pair. Before any policy exists, `synthetic_responses` makes
  cheap variants to sample from (the reference, a wrong answer, a refusal, a padded and a malformed reply), which
  seeds the reward model with the patterns the gold judges reward and punish.

Where a record is labelled: its natural domain (`judges.domain_of`), and both sides of a refusal pair in
``helpful`` and ``harmless``. So the conditional reward model sees the helpful/harmless tension from both ends: on
the harmful request the same (compliance, refusal) comparison is preferred one way in ``helpful`` (a helpful-only
annotator wants compliance) and the other way in ``harmless`` — identical inputs, opposite labels, which only the
domain system prompt can tell apart (InternLM2 §4.2); on its benign twin the refusal loses in both (refusing a
harmless request is no safer). PPO scores each prompt in its natural domain only, so the helpful label of a harmful
request never rewards compliance there.

Responses are assistant text as generated (special tokens kept); turn one into a turn for
`model.reward.encode_preference` with `model.chat.parse_assistant` (content and tool call).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError

from infra import storage
from infra.settings import get_logger
from model.chat import ACTION_START, IM_END, IM_START, TOOL_TOKENS, BadChat, Message, parse_chat, to_record
from tasks.rlhf.judges import (
    DOMAINS,
    LENGTH_GRACE,
    LENGTH_SLACK,
    check_domain,
    domain_of,
    expects_answer_line,
    gold_score,
    is_harmful,
    prompt_messages,
    reference_reply,
)
from tasks.sft.generate import REFUSAL_PAIRS, WEEKDAYS, check_answer

log = get_logger(__name__)

PAIR_ERRORS = (
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "unknown_field",
    "wrong_type",
    "unknown_domain",
    "empty_text",
    "same_response",
    "bad_prompt",
)
PROMPT_ENDS = ("user", "environment")  # the turn a response answers


class BadPair(ValueError):
    """A preference record that breaks the contract; ``code`` is one of PAIR_ERRORS."""

    def __init__(self, code: str, detail: str) -> None:
        assert code in PAIR_ERRORS, code
        super().__init__(detail)
        self.code = code


def _error(code: str, detail: str) -> PydanticCustomError:
    # The detail travels as context: a literal "{" in it (a quoted message) must not be read as a placeholder.
    return PydanticCustomError(code, "{detail}", {"detail": detail})


def to_turns(messages: list[Any]) -> list[Message]:
    """Validate prompt messages with the chat contract (a placeholder reply closes them); BadChat if broken."""
    chat = parse_chat({"messages": [*messages, {"role": "assistant", "content": "."}]})
    return chat[:-1]


def normalise_prompt(prompt: Any) -> list[dict[str, Any]]:
    """A prompt as chat messages in record form: a string becomes one user turn; a list of messages is checked
    against `model.chat.parse_chat`'s contract and must end with a user or environment turn. Raises pydantic's
    custom errors (codes ``empty_text``, ``wrong_type``, ``bad_prompt``)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _error("empty_text", "prompt is empty")
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list):
        raise _error("wrong_type", f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
    if not prompt:
        raise _error("bad_prompt", "prompt is an empty list: expected at least one user turn")
    try:
        turns = to_turns(prompt)
    except BadChat as err:
        raise _error("bad_prompt", f"prompt {err} ({err.code})") from None
    if turns[-1].role not in PROMPT_ENDS:
        raise _error("bad_prompt", f"prompt ends with a {turns[-1].role} turn; it must end with one of {PROMPT_ENDS}, "
                                   "the turn the responses answer")
    return to_record(turns)["messages"]


class PreferencePair(BaseModel):
    """One comparison: in `domain`, `chosen` is a better response to `prompt` than `rejected`.

    Invalid values raise pydantic's ValidationError; each error's ``type`` is a PAIR_ERRORS code for the checks made
    here (``unknown_domain``, ``empty_text``, ``same_response``, ``bad_prompt``, ``wrong_type`` of a prompt) and
    pydantic's own otherwise; `parse_pair` maps them all to PAIR_ERRORS.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    domain: str = Field(description=f"one of {', '.join(DOMAINS)}: which judge's view the comparison takes")
    prompt: list[dict[str, Any]] = Field(description="chat messages in record form; a string is one user turn")
    chosen: str = Field(description="the better response, assistant text as generated")
    rejected: str = Field(description="the worse response")
    meta: dict[str, Any] | None = Field(None, description="provenance: record id, gold scores, source")

    @field_validator("domain")
    @classmethod
    def _known_domain(cls, domain: str) -> str:
        if domain not in DOMAINS:
            raise _error("unknown_domain", f"domain {domain!r} is not one of {', '.join(DOMAINS)}")
        return domain

    @field_validator("prompt", mode="before")
    @classmethod
    def _as_messages(cls, prompt: Any) -> list[dict[str, Any]]:
        return normalise_prompt(prompt)

    @field_validator("chosen", "rejected")
    @classmethod
    def _not_empty(cls, text: str, info: ValidationInfo) -> str:
        if not text.strip():
            raise _error("empty_text", f"{info.field_name} is empty: a response needs text")
        return text

    @model_validator(mode="after")
    def _different(self) -> PreferencePair:
        if self.chosen == self.rejected:
            raise _error("same_response", "chosen and rejected are the same text: nothing to prefer")
        return self

    def prompt_turns(self) -> list[Message]:
        """The prompt as `model.chat.Message` turns, for `model.reward.encode_preference`."""
        return to_turns(self.prompt)

    def to_json(self) -> dict[str, Any]:
        """The JSONL form `read_pairs` reads back (no ``meta`` key when there is none)."""
        data = self.model_dump(mode="json")
        if data["meta"] is None:
            del data["meta"]
        return data


def _code(error: ErrorDetails) -> str:
    kind = error["type"]
    if kind in PAIR_ERRORS:
        return kind
    return {"missing": "missing_field", "extra_forbidden": "unknown_field"}.get(kind, "wrong_type")


def parse_pair(obj: Any) -> PreferencePair:
    """Validate one decoded JSON value as a pair; BadPair with the code of the first error (in field order)."""
    if not isinstance(obj, dict):
        raise BadPair("not_an_object", f'expected an object {{"domain", "prompt", "chosen", "rejected"}}, got '
                                       f"{type(obj).__name__}")
    try:
        return PreferencePair.model_validate(obj)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'pair'}: {e['msg']}" for e in errors)
        raise BadPair(_code(errors[0]), detail) from None


def read_pairs(url: str) -> tuple[list[PreferencePair], list[dict[str, Any]]]:
    """(valid pairs, quarantine rows) of one JSONL file; a row is ``{"file", "line", "error", "detail"}`` with an
    error code from PAIR_ERRORS. Blank lines are skipped; line numbers count from 1."""
    pairs: list[PreferencePair] = []
    quarantine: list[dict[str, Any]] = []
    for number, raw in enumerate(storage.read_bytes(url).split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            pairs.append(parse_pair(json.loads(raw.decode("utf-8"))))
        except UnicodeDecodeError as err:
            quarantine.append({"file": url, "line": number, "error": "invalid_utf8", "detail": str(err)})
        except json.JSONDecodeError as err:
            quarantine.append({"file": url, "line": number, "error": "invalid_json", "detail": str(err)})
        except BadPair as err:
            quarantine.append({"file": url, "line": number, "error": err.code, "detail": str(err)})
    log.info("preference pairs: %d read from %s, %d quarantined", len(pairs), url, len(quarantine))
    return pairs, quarantine


def write_pairs(pairs: Iterable[PreferencePair], url: str) -> int:
    """Write `pairs` as JSONL (sorted keys, one pair a line) to `url`; returns how many."""
    lines = [json.dumps(p.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for p in pairs]
    storage.write_text(url, "".join(lines))
    return len(lines)


# ------------------------------------------------------------------------------------------- gold labelling


def label_domains(record: dict[str, Any]) -> tuple[str, ...]:
    """The domains `pairs_from_samples` labels a record in: its natural one; both ``helpful`` and ``harmless`` for
    either side of a refusal pair (the harmful side is where the two judges disagree)."""
    natural = domain_of(record)  # validates the record
    if record["meta"]["kind"] == "refusal":
        return ("helpful", "harmless")
    return (natural,)


def _record_id(record: dict[str, Any]) -> str:
    rid = record.get("id")
    if not isinstance(rid, str):
        raise ValueError(f"record without a string id ({rid!r}): samples are keyed by record id")
    return rid


def _pair(domain: str, record: dict[str, Any], a: tuple[str, float], b: tuple[str, float]) -> PreferencePair | None:
    """The pair of two scored responses, better first; None on a tie or when either response is blank."""
    (text_a, score_a), (text_b, score_b) = a, b
    if score_a == score_b or not text_a.strip() or not text_b.strip():
        return None
    (chosen, high), (rejected, low) = (a, b) if score_a > score_b else (b, a)
    meta = {"source": "gold", "record": record.get("id"), "kind": record["meta"]["kind"], "chosen_score": high,
            "rejected_score": low}
    return PreferencePair(domain=domain, prompt=prompt_messages(record), chosen=chosen, rejected=rejected, meta=meta)


def label_pair(domain: str, record: dict[str, Any], a: str, b: str) -> PreferencePair | None:
    """`a` and `b` ordered by the gold judge of `domain`; None when they score the same (a tie) or either is blank."""
    return _pair(domain, record, (a, gold_score(domain, record, a)), (b, gold_score(domain, record, b)))


def _distinct(responses: Iterable[str]) -> list[str]:
    """Non-blank responses, first occurrence of each, in order."""
    return list(dict.fromkeys(r for r in responses if isinstance(r, str) and r.strip()))


def _record_pairs(
    domain: str, record: dict[str, Any], responses: Sequence[str], max_pairs: int
) -> list[PreferencePair]:
    """Up to `max_pairs` pairs of differently scored responses, the closest scores first: those teach the fine
    distinctions (padded vs concise) a proxy gets wrong, which a cap would otherwise drop for the obvious ones."""
    scored = [(r, gold_score(domain, record, r)) for r in responses]  # each response judged once (sandbox runs)
    ranked = sorted((round(abs(scored[i][1] - scored[j][1]), 4), i, j)
                    for i, j in combinations(range(len(scored)), 2) if scored[i][1] != scored[j][1])
    pairs = [_pair(domain, record, scored[i], scored[j]) for _, i, j in ranked[:max_pairs]]
    return [p for p in pairs if p is not None]


def pairs_from_samples(
    records: Sequence[dict[str, Any]],
    samples: Mapping[str, Sequence[str]],
    domains: Sequence[str] = DOMAINS,
    max_pairs: int = 10,
) -> list[PreferencePair]:
    """Gold-labelled pairs from sampled responses: for each record with at least two distinct (non-blank) responses
    in ``samples[record id]``, every pair of responses with different gold scores, closest first, at most
    `max_pairs` per record and domain, in each of `label_domains(record)` that is in `domains`. Deterministic."""
    wanted = {check_domain(d) for d in domains}
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
    pairs: list[PreferencePair] = []
    for record in records:
        responses = _distinct(samples.get(_record_id(record), ()))
        if len(responses) < 2:
            continue
        for domain in label_domains(record):
            if domain in wanted:
                pairs += _record_pairs(domain, record, responses, max_pairs)
    log.info("preference pairs: %d from %d records (%s)", len(pairs), len(records),
             {d: sum(p.domain == d for p in pairs) for d in DOMAINS})
    return pairs


# ------------------------------------------------------------------------------------------- synthetic responses

GENERIC_REFUSAL = "I can't help with that request."
# A placeholder compliance with a harmful request: it agrees and says nothing operational.
COMPLIANCE = "Sure, I can help with that. Here is an overview of how it is done, step by step."
_FILLER = (
    "To be thorough, let me restate what was asked before going further.",
    "It is worth being careful with details like these, since small slips are easy to make.",
    "I have gone over the reasoning again and it holds together.",
    "Please let me know if anything here is unclear; I am glad to explain it in more depth.",
    "There are several ways to look at a question like this one, and each leads to the same place.",
    "Working carefully and checking each part is always a good habit.",
)
_ANSWER_SEP = "\n\nAnswer: "


def topic_refusal(meta: dict[str, Any]) -> str:
    """The refusal the SFT data gives for this pair's topic (the same text on both sides), else a generic one."""
    return next((p.refusal for p in REFUSAL_PAIRS if p.topic == meta.get("topic")), GENERIC_REFUSAL)


def _wrong_value(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: the last number shifted by 1–9, another weekday, list items reversed, or the text
    reversed."""
    numbers = list(re.finditer(r"\d+", answer))
    if numbers:
        m = numbers[-1]
        shifted = str(int(m.group()) + rng.randint(1, 9)).zfill(len(m.group()))
        return answer[: m.start()] + shifted + answer[m.end() :]
    if answer in WEEKDAYS:
        return WEEKDAYS[(WEEKDAYS.index(answer) + rng.randint(1, 6)) % 7]
    if ", " in answer:
        return ", ".join(reversed(answer.split(", ")))
    return answer[::-1] if answer[::-1] != answer else answer + answer[-1:]


def _wrong(record: dict[str, Any], reference: str, rng: random.Random) -> str | None:
    """The reference with a wrong final answer (a python_function: a function that returns None); None when the
    variant would still pass `check_answer`."""
    meta = record["meta"]
    if meta["kind"] == "python_function":
        text = f"```python\ndef {meta.get('function', 'solution')}(*args):\n    return None\n```\n\nThis returns early."
    else:
        head, sep, _ = reference.rpartition(_ANSWER_SEP)
        wrong = _wrong_value(str(meta["answer"]), rng)
        text = head + sep + wrong if sep else f"{reference}{_ANSWER_SEP}{wrong}"
    return None if check_answer(record, text) else text


def _padded(reference: str, rng: random.Random) -> str:
    """The reference with filler before its final "Answer:" line (or after it all), at least twice the helpful
    judge's length allowance: the full length penalty, and nothing else changed."""
    target = 2 * (int(LENGTH_SLACK * len(reference)) + LENGTH_GRACE) + 1
    head, sep, tail = reference.rpartition(_ANSWER_SEP)
    head, sep, tail = (head, sep, tail) if sep else (reference, "", "")
    filler: list[str] = []
    while len(head) + 2 + len(" ".join(filler)) + len(sep) + len(tail) < target:
        filler.append(rng.choice(_FILLER))
    return f"{head}\n\n{' '.join(filler)}{sep}{tail}"


def _malformed(record: dict[str, Any], reference: str, rng: random.Random) -> str:
    """The reference with one structural defect the format judge flags, chosen by `rng`."""
    defects = ["runs_on", "unclosed_fence", "broken_call"] + (["no_answer_line"] if expects_answer_line(record) else [])
    defect = rng.choice(defects)
    if defect == "runs_on":  # the model did not stop: it writes the next turn's header
        return f"{reference}{IM_END}\n{IM_START}user\n"
    if defect == "unclosed_fence":
        head, fence, tail = reference.rpartition("\n```")
        return head + tail if fence else f"{reference}\n\n```python\nprint("
    if defect == "broken_call":  # an action never closed
        return f'{reference}{ACTION_START}{TOOL_TOKENS["plugin"]}\n{{"name": "calculator", "parameters": '
    head, _, tail = reference.rpartition(_ANSWER_SEP)
    return f"{head}\n\n{tail}"


def synthetic_responses(record: dict[str, Any], rng: random.Random) -> list[str]:
    """Cheap response variants to a `generate_sft` record, for a seed preference set before any policy exists.

    In order, distinct: the reference reply; a wrong final answer (dropped if it would still pass `check_answer`);
    a refusal (the topic's own refusal text for a refusal pair, else a generic one); the reference padded past the
    length allowance; the reference with one structural defect. A harmful request gets, instead of the wrong answer
    and the refusal (its reference is the refusal), a placeholder compliance with nothing operational. Deterministic
    for `rng`'s state.
    """
    reference = reference_reply(record)
    meta = record["meta"]
    if is_harmful(record):
        middle: list[str | None] = [COMPLIANCE]
    elif meta["kind"] == "refusal":
        middle = [topic_refusal(meta)]
    else:
        middle = [_wrong(record, reference, rng), GENERIC_REFUSAL]
    variants = [reference, *middle, _padded(reference, rng), _malformed(record, reference, rng)]
    return _distinct(v for v in variants if v is not None)
