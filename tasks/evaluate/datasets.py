"""Local evaluation sets for the OpenCompass stage: one per capability group, built offline from what we have.

InternLM2 reports OpenCompass scores on public benchmarks (MMLU, HellaSwag, GSM8K, HumanEval, needle in a haystack,
tool-use suites) that we cannot download here; these are small stand-ins in the same shapes. Every row has a stable
``id`` and the fields an OpenCompass prompt template uses; ``ppl`` sets are scored by the likelihood of each option,
``gen`` sets by grading a generation:

- ``knowledge_cloze`` (knowledge, ppl): a 15–40 word sentence of a held-out document with one content word
  (alphabetic, ≥ 5 letters, not a stopword, used once in the sentence) blanked as ``____``; options A–D are that word
  and three words of the same length class with the closest corpus frequency that occur only in *other* documents,
  cased like it and not sharing its first five letters (so no "function"/"functions" pairs). Fields ``question``,
  ``A``–``D``, ``answer`` (a letter), ``doc_id``.
- ``language_continuation`` (language, ppl): 30–60 words of context starting at a sentence start and four
  continuations of the same 8–15 word length: the true next words and three spans from random positions of other
  documents. Fields ``context``, ``A``–``D``, ``answer``, ``doc_id``.
- ``math_word`` (reasoning, gen): word problems from `tasks.reasoning`'s five families, every answer re-derived by
  `tasks.reasoning.check`; graded on the reply's "Answer: …" line as `tasks.sft.generate.check_answer` does.
  Fields ``question``, ``answer``, ``family``, ``numbers``, ``group``.
- ``code_functions`` (coding, gen): the SFT generator's "write a function that …" tasks (HumanEval's shape); a
  reference solution that does not pass its hidden tests in the sandbox drops the item. Fields ``question``,
  ``entry``, ``tests`` (code to append to a solution: it raises AssertionError on a wrong result and prints
  ``expect`` when all pass), ``expect``, ``solution``, ``family``, ``group``.
- ``needle`` (long_context, gen): for each (length, depth) of a grid, "The secret passphrase for <name> is
  <5 digits>." planted at the sentence boundary nearest that depth (a word boundary if none is within 5 %) of a
  haystack of document text cut at a word boundary to about length × chars-per-token characters. Fields ``context``,
  ``question``, ``answer``, ``length``, ``depth``, ``needle``, ``position`` (where the needle really starts, 0–1).
- ``tool_math`` (tool_use, gen): the SFT generator's interpreter tasks (word problems, string tasks, weekday and
  days-between questions) with their exact answers; the model is meant to call its tools at evaluation time, so
  nothing is executed here. Fields ``question``, ``answer``, ``family``, ``group``.

Text fields of the document sets are whitespace-collapsed document text, so ``question`` with the blank filled, or
``context + " " + true option``, is a substring of ``" ".join(doc.split())``. Each set draws from its own random
stream (``lmforge-eval/<seed>/<set>``), so everything is deterministic for a seed and documents (their order does
not matter), and changing one count leaves the other sets as they were.

What this is not: a public benchmark, large, or comparable with the paper's numbers. The cloze tests which word a
text used (LAMBADA-like) more than world knowledge, which a small corpus holds little of; the continuation
distractors are not adversarially filtered as HellaSwag's are, so the set is easier. The math, code and tool sets
come from the same templates as the SFT data: a distinct seed stream, but exact collisions happen, and an SFT set of
the default size almost surely holds each of the 15 fixed function tasks. So run `contamination` against the
training texts and report it (`drop_contaminated` removes the flagged rows); the generated rows carry the SFT
``group`` key (`tasks.sft.generate.split_of`), so an evaluator can also keep only groups the SFT split held out.
The document sets must be built from documents held out of training (`eval_holdout`), which only the caller can
ensure; the needle haystack may use any text, since only the planted sentence is asked about. A set the documents
cannot fill is cut short, with a warning, never padded.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, NamedTuple

import numpy as np
import xxhash
from pydantic import BaseModel, ConfigDict, Field, field_validator

from infra import storage
from infra.settings import get_logger
from tasks.sft.generate import _checked, _code_task, _function_task, _FunctionTask, _problem, _take, _unique
from tasks.sft.sandbox import run_python

log = get_logger(__name__)

GROUPS = ("knowledge", "language", "reasoning", "coding", "long_context", "tool_use")
DATASETS: dict[str, tuple[str, str]] = {  # name -> (group, kind), in GROUPS order
    "knowledge_cloze": ("knowledge", "ppl"),
    "language_continuation": ("language", "ppl"),
    "math_word": ("reasoning", "gen"),
    "code_functions": ("coding", "gen"),
    "needle": ("long_context", "gen"),
    "needle_choice": ("long_context", "ppl"),
    "tool_math": ("tool_use", "gen"),
}
LETTERS = "ABCD"
BLANK = "____"
NEEDLE = "The secret passphrase for {name} is {number}."
NEEDLE_QUESTION = "What is the secret passphrase for {name}? Answer with the number only."
MANIFEST = "manifest.json"
SANDBOX_WORKERS = 4
STOPWORDS = frozenset(
    "about above according across actually after again against almost along already although always among another "
    "anything anyway around because become becomes before behind being below beside besides between beyond both "
    "cannot could doing during either else elsewhere enough especially every everything except first following "
    "further given having hence however indeed instead itself least might moreover mostly much must myself neither "
    "never nevertheless nothing often other others otherwise ought ourselves perhaps please quite rather really "
    "several shall should since something sometimes somewhat still such their theirs them themselves then there "
    "thereby therefore these they thing things this those though through throughout thus together toward towards "
    "under unless until upon usually various very whatever when whenever where whereas whether which while whose "
    "will within without would yourself yourselves".split())

NeedleLength = Annotated[int, Field(ge=64, le=1 << 20)]
NeedleDepth = Annotated[float, Field(ge=0.0, le=1.0)]


class EvalDataConfig(BaseModel):
    """Items per set (a set the documents cannot fill is cut short, with a warning), the seed, the needle grid
    (lengths in tokens) and the share of clean documents held out of training for evaluation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(7, ge=0)
    cloze: int = Field(200, ge=0, description="knowledge_cloze items")
    continuation: int = Field(200, ge=0, description="language_continuation items")
    math: int = Field(100, ge=0, description="math_word items")
    code: int = Field(40, ge=0, description="code_functions items")
    tool: int = Field(60, ge=0, description="tool_math items")
    needle_lengths: tuple[NeedleLength, ...] = Field((256, 512, 1024, 2048), description="haystack lengths in tokens")
    needle_depths: tuple[NeedleDepth, ...] = Field((0.0, 0.25, 0.5, 0.75, 1.0), description="needle depths, 0–1")
    needle_per_cell: int = Field(2, ge=0, description="needle items per (length, depth)")
    holdout_share: float = Field(0.03, ge=0, le=1, description="share of clean documents kept out of training")

    @field_validator("needle_lengths", "needle_depths")
    @classmethod
    def _distinct(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"{value} repeats a value: each grid value must appear once")
        return value

    def counts(self) -> dict[str, int]:
        cells = len(self.needle_lengths) * len(self.needle_depths) * self.needle_per_cell
        return {"knowledge_cloze": self.cloze, "language_continuation": self.continuation, "math_word": self.math,
                "code_functions": self.code, "needle": cells, "needle_choice": cells, "tool_math": self.tool}


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set; `meta` holds what the manifest reports besides the rows (``asked``, the needle grid)."""

    name: str
    group: str
    kind: str  # "ppl": score each option by likelihood; "gen": generate, then grade
    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)


def eval_holdout(doc_id: str, share: float) -> bool:
    """True for the documents held out of training for evaluation: xxh64 of the id, as a fraction, below `share`.

    No seed is involved, so a document stays on its side across runs, and a larger share only adds documents."""
    if not 0 <= share <= 1:
        raise ValueError(f"holdout share {share}: expected a fraction between 0 and 1")
    return xxhash.xxh64_intdigest(f"lmforge-eval:{doc_id}".encode()) / 2**64 < share


# ------------------------------------------------------------------------------------------- documents

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[A-Z\"'(])")
_CANDIDATE = re.compile(r"(?<![\w.'’-])[A-Za-z]{5,}(?![\w'’-]|\.\w)")  # a whole word, not part of os.path or it's
_WORD = re.compile(r"\w+")


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _documents(docs: Sequence[tuple[str, str]], what: str) -> list[tuple[str, str]]:
    """(doc_id, text) pairs sorted by id, so the input order does not matter; empty texts are left out."""
    if isinstance(docs, str | bytes):
        raise ValueError(f"{what} must be a sequence of (doc_id, text) pairs, not one string")
    pairs = []
    for i, pair in enumerate(docs):
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"{what}[{i}] is {str(pair)[:80]!r}: expected a (doc_id, text) pair of strings")
        pairs.append((pair[0], pair[1]))
    repeated = sorted(d for d, k in Counter(d for d, _ in pairs).items() if k > 1)
    if repeated:
        raise ValueError(f"{what} repeats doc ids {repeated[:5]}: each document needs its own id")
    return sorted(p for p in pairs if p[1].strip())


# A cloze sentence must be plain prose (no code, regexes, roff escapes, Markdown, or a blank already); a continuation
# window may carry light markup, which is still the document's language, but no interpreter sessions or roff.
_MARKUP = re.compile(r"[\\{}\[\]<>=|#@$^~*`_]|>>>")
_CODE = re.compile(r"\\|>>>|```")


def _prose_like(words: Sequence[str], markup: re.Pattern[str] = _MARKUP, share: float = 0.85) -> bool:
    """No `markup` and at least `share` of the words plain (letters once punctuation is stripped)."""
    if any(markup.search(w) for w in words):
        return False
    return sum(w.strip(",.;:!?()\"'").isalpha() for w in words) >= share * len(words)


def _sentences(text: str, lo: int = 15, hi: int = 40) -> list[str]:
    out = []
    for sentence in _SENTENCE_END.split(_collapse(text)):
        words = sentence.split()
        if lo <= len(words) <= hi and sentence[0].isupper() and sentence[-1] in ".!?" and _prose_like(words):
            out.append(sentence)
    return out


# ------------------------------------------------------------------------------------------- knowledge: cloze


def _blankable(word: str) -> bool:
    return word[1:].islower() and word.lower() not in STOPWORDS  # no TextWrapper or ASCII: their case gives away


def _length_class(word: str) -> int:
    return min((len(word) - 5) // 2, 3)  # 5–6, 7–8, 9–10, 11+ letters


class _Vocab(NamedTuple):
    freq: Counter[str]  # lower-cased blankable word -> occurrences over all documents
    doc_words: dict[str, set[str]]  # doc id -> its blankable words
    by_class: dict[int, list[str]]  # length class -> blankable words, sorted


def _vocab(docs: Sequence[tuple[str, str]]) -> _Vocab:
    freq: Counter[str] = Counter()
    doc_words = {}
    for doc_id, text in docs:
        words = [m.group().lower() for m in _CANDIDATE.finditer(text) if _blankable(m.group())]
        freq.update(words)
        doc_words[doc_id] = set(words)
    by_class: dict[int, list[str]] = {}
    for word in sorted(freq):
        by_class.setdefault(_length_class(word), []).append(word)
    return _Vocab(freq, doc_words, by_class)


def _distractors(word: str, doc_id: str, vocab: _Vocab, rng: random.Random, k: int = 3) -> list[str] | None:
    """`k` words of `word`'s length class from other documents, drawn from the 4k nearest in log frequency."""
    lower = word.lower()
    pool = [w for w in vocab.by_class[_length_class(lower)] if w not in vocab.doc_words[doc_id] and w[:5] != lower[:5]]
    target = math.log(vocab.freq[lower])
    nearest = sorted(pool, key=lambda w: (abs(math.log(vocab.freq[w]) - target), w))[: 4 * k]
    chosen: list[str] = []
    for w in rng.sample(nearest, len(nearest)):
        if len(chosen) < k and all(w[:5] != c[:5] for c in chosen):
            chosen.append(w)
    if len(chosen) < k:
        return None
    return [w.capitalize() if word[0].isupper() else w for w in chosen]


def _cloze_row(doc_id: str, sentence: str, vocab: _Vocab, rng: random.Random) -> dict[str, Any] | None:
    uses = Counter(w.lower() for w in _WORD.findall(sentence))
    spans = [m for m in _CANDIDATE.finditer(sentence) if _blankable(m.group()) and uses[m.group().lower()] == 1]
    for m in rng.sample(spans, min(3, len(spans))):
        others = _distractors(m.group(), doc_id, vocab, rng)
        if others is None:
            continue
        options = [m.group(), *others]
        rng.shuffle(options)
        question = sentence[: m.start()] + BLANK + sentence[m.end():]
        return {"question": question, **dict(zip(LETTERS, options, strict=True)),
                "answer": LETTERS[options.index(m.group())], "doc_id": doc_id}
    return None


def _cloze(docs: Sequence[tuple[str, str]], n: int, rng: random.Random) -> list[dict[str, Any]]:
    if not n:
        return []
    vocab = _vocab(docs)
    seen: set[str] = set()
    candidates = []
    for doc_id, text in docs:
        for sentence in _sentences(text):
            if sentence not in seen:  # docstrings repeat sentences; one question each
                seen.add(sentence)
                candidates.append((doc_id, sentence))
    rng.shuffle(candidates)
    rows = []
    for doc_id, sentence in candidates:
        if len(rows) == n:
            break
        if (row := _cloze_row(doc_id, sentence, vocab, rng)) is not None:
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- language: continuation


def _windows(words: list[str], rng: random.Random) -> Iterator[tuple[int, int, int]]:
    """Non-overlapping (start, context words, continuation words), each starting at a sentence start."""
    i = 0
    while i < len(words):
        if i == 0 or words[i - 1][-1] in ".!?":
            context, ending = rng.randint(30, 60), rng.randint(8, 15)
            if i + context + ending > len(words):
                return
            if _prose_like(words[i: i + context + ending], _CODE, 0.8):
                yield i, context, ending
                i += context + ending
                continue
        i += 1


def _foreign_span(words: dict[str, list[str]], doc_id: str, size: int, rng: random.Random,
                  avoid: set[str]) -> str | None:
    others = [d for d in sorted(words) if d != doc_id and len(words[d]) >= size]
    for _ in range(10 if others else 0):
        other = words[rng.choice(others)]
        at = rng.randrange(len(other) - size + 1)
        span = " ".join(other[at: at + size])
        if span not in avoid:
            return span
    return None


def _continuation(docs: Sequence[tuple[str, str]], n: int, rng: random.Random) -> list[dict[str, Any]]:
    if not n:
        return []
    words = {doc_id: _collapse(text).split() for doc_id, text in docs}
    candidates = [(doc_id, *w) for doc_id, _ in docs for w in _windows(words[doc_id], rng)]
    rng.shuffle(candidates)
    rows = []
    for doc_id, start, size, ending in candidates:
        if len(rows) == n:
            break
        true = " ".join(words[doc_id][start + size: start + size + ending])
        options = [true]
        while len(options) < 4 and (span := _foreign_span(words, doc_id, ending, rng, set(options))) is not None:
            options.append(span)
        if len(options) < 4:
            continue
        rng.shuffle(options)
        rows.append({"context": " ".join(words[doc_id][start: start + size]),
                     **dict(zip(LETTERS, options, strict=True)), "answer": LETTERS[options.index(true)],
                     "doc_id": doc_id})
    return rows


# ------------------------------------------------------------------------------------------- generated sets


def _math(n: int, rng: random.Random) -> list[dict[str, Any]]:
    return [{"question": p.question, "answer": p.answer, "family": p.family, "numbers": p.numbers,
             "group": p.question} for p in _take(_unique(_problem, rng, lambda p: p.question), n)]


def _passes(task: _FunctionTask) -> bool:
    result = run_python(task.solution + task.tests())
    return result.ok and result.stdout.strip() == task.passed()


def _code(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """Function tasks whose reference solution passes its hidden tests, in draw order; failures are replaced by
    fresh draws (`tasks.sft.generate._checked`: it gives up after max(20, n), so a broken sandbox cannot loop)."""
    dropped: Counter[str] = Counter()
    tasks = _checked(_unique(_function_task, rng, lambda t: t.group), n,
                     lambda t: t if _passes(t) else "fails_own_tests", SANDBOX_WORKERS, dropped, "code_functions")
    if dropped:
        log.warning("eval data: %d code_functions candidates failed their own tests in the sandbox",
                    sum(dropped.values()))
    return [{"question": t.prompt, "entry": t.function, "tests": t.tests(), "expect": t.passed(),
             "solution": t.solution, "family": t.family, "group": t.group} for t in tasks]


def _tool(n: int, rng: random.Random) -> list[dict[str, Any]]:
    return [{"question": t.question, "answer": t.answer, "family": t.family, "group": t.group}
            for t in _take(_unique(_code_task, rng, lambda t: t.question), n)]


# ------------------------------------------------------------------------------------------- long context: needle

_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n\s*\n")
_SPACE = re.compile(r"\s+")
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
NEEDLE_CHARS = len(NEEDLE.format(name="x" * 7, number="0" * 5))  # every name has 7 letters, every number 5 digits


def _haystack(texts: Sequence[str], start: int, chars: int) -> str:
    """Texts from `start` on (wrapping round, so a short corpus repeats), cut at the last whitespace ≤ `chars`."""
    parts, size = [], 0
    while size <= chars:
        parts.append(texts[(start + len(parts)) % len(texts)].strip())
        size += len(parts[-1]) + 2
    head = "\n\n".join(parts)[: chars + 1]
    cut = max(head.rfind(" "), head.rfind("\n"))
    return head[:cut].rstrip() if cut > 0 else head[:chars]


def _insert_at(hay: str, depth: float) -> int:
    """The sentence boundary nearest `depth` of the way through, or the nearest word boundary if none is within 5 %."""
    target = depth * len(hay)

    def nearest(pattern: re.Pattern[str]) -> int:
        return min([0, *(m.end() for m in pattern.finditer(hay)), len(hay)], key=lambda p: (abs(p - target), p))

    at = nearest(_BOUNDARY)
    return at if abs(at - target) <= 0.05 * len(hay) else nearest(_SPACE)


def _plant(hay: str, at: int, needle: str) -> str:
    before, after = hay[:at], hay[at:]
    left = "" if not before or before[-1].isspace() else " "
    right = "" if not after or after[0].isspace() else " "
    return f"{before}{left}{needle}{right}{after}"


def _fresh(draw: Callable[[], str], used: set[str], text: str) -> str:
    """A draw not used before and not in `text` (case-insensitive), so the planted fact is the only answer."""
    lowered = text.lower()
    for _ in range(10_000):
        value = draw()
        if value not in used and value.lower() not in lowered:
            used.add(value)
            return value
    raise AssertionError(f"no fresh value in 10,000 draws ({len(used)} used): the draw space is too small")


def _needle_row(texts: Sequence[str], length: int, depth: float, chars_per_token: float, rng: random.Random,
                used: set[str]) -> dict[str, Any]:
    def name() -> str:
        return ("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3)) + rng.choice(_CONSONANTS))

    hay = _haystack(texts, rng.randrange(len(texts)), round(length * chars_per_token) - NEEDLE_CHARS - 1)
    who = _fresh(name, used, hay).capitalize()
    number = _fresh(lambda: str(rng.randint(10000, 99999)), used, hay)
    needle = NEEDLE.format(name=who, number=number)
    context = _plant(hay, _insert_at(hay, depth), needle)
    return {"context": context, "question": NEEDLE_QUESTION.format(name=who), "answer": number, "length": length,
            "depth": depth, "needle": needle, "position": round(context.index(needle) / len(context), 4)}


def _needle(docs: Sequence[tuple[str, str]], cfg: EvalDataConfig, chars_per_token: float,
            rng: random.Random) -> list[dict[str, Any]]:
    texts = [text for _, text in docs]
    cells = [(length, depth) for length in cfg.needle_lengths for depth in cfg.needle_depths]
    if not texts or not cells or not cfg.needle_per_cell:
        return []
    if min(cfg.needle_lengths) * chars_per_token < 4 * NEEDLE_CHARS:
        raise ValueError(f"needle length {min(cfg.needle_lengths)} tokens × {chars_per_token} chars per token is under "
                         f"{4 * NEEDLE_CHARS} characters: too short to hide a {NEEDLE_CHARS}-character needle in")
    longest = max(cfg.needle_lengths) * chars_per_token
    if sum(len(t) for t in texts) < longest:
        log.warning("eval data: haystack text (%d chars) is shorter than the longest haystack (%d chars); it repeats",
                    sum(len(t) for t in texts), longest)
    used: set[str] = set()
    return [{"id": f"needle-{length}-{depth:g}-{k}", **_needle_row(texts, length, depth, chars_per_token, rng, used)}
            for length, depth in cells for k in range(cfg.needle_per_cell)]


def _needle_choice(needles: Sequence[dict[str, Any]], rng: random.Random) -> list[dict[str, Any]]:
    """The same haystacks as multiple choice scored by perplexity: after the context, "The secret passphrase for
    <name> is" and four five-digit numbers, one the planted one. A base model too small to *generate* the digits
    can still prefer the number it has seen in its context, which is what a long-context phase should improve."""
    rows = []
    for row in needles:
        used = {row["answer"]}
        options = [row["answer"]]
        while len(options) < 4:
            number = str(rng.randint(10000, 99999))
            if number not in used and number not in row["context"]:
                used.add(number)
                options.append(number)
        rng.shuffle(options)
        name = row["question"].split(" for ", 1)[1].split("?", 1)[0]
        rows.append({"id": row["id"].replace("needle-", "needle_choice-", 1),
                     "prompt": f"{row['context']}\n\nThe secret passphrase for {name} is",
                     **dict(zip(LETTERS, options, strict=True)), "answer": LETTERS[options.index(row["answer"])],
                     "length": row["length"], "depth": row["depth"]})
    return rows


# ------------------------------------------------------------------------------------------- assembly


def build_eval_sets(docs: Sequence[tuple[str, str]], cfg: EvalDataConfig, *, chars_per_token: float = 4.0,
                    haystack_docs: Sequence[tuple[str, str]] | None = None) -> list[EvalSet]:
    """The seven sets (in `DATASETS` order), deterministic for `cfg.seed` and the documents.

    `docs` are (doc_id, text) pairs of clean documents held out of training; `haystack_docs` (any documents, held
    out or not) fill the needle haystacks, `docs` when None. `chars_per_token` turns needle lengths in tokens into
    characters (measure it on the tokenizer the model uses).
    """
    if not (math.isfinite(chars_per_token) and 0.5 <= chars_per_token <= 64):
        raise ValueError(f"chars_per_token={chars_per_token}: expected characters per token between 0.5 and 64")
    docs = _documents(docs, "docs")
    hay = docs if haystack_docs is None else _documents(haystack_docs, "haystack_docs")
    streams = {name: random.Random(f"lmforge-eval/{cfg.seed}/{name}") for name in DATASETS}
    asked = cfg.counts()
    made = {
        "knowledge_cloze": _cloze(docs, cfg.cloze, streams["knowledge_cloze"]),
        "language_continuation": _continuation(docs, cfg.continuation, streams["language_continuation"]),
        "math_word": _math(cfg.math, streams["math_word"]),
        "code_functions": _code(cfg.code, streams["code_functions"]),
        "needle": _needle(hay, cfg, chars_per_token, streams["needle"]),
        "tool_math": _tool(cfg.tool, streams["tool_math"]),
    }
    made["needle_choice"] = _needle_choice(made["needle"], streams["needle_choice"])
    grid = {"lengths": list(cfg.needle_lengths), "depths": list(cfg.needle_depths), "per_cell": cfg.needle_per_cell,
            "chars_per_token": chars_per_token}
    sets = []
    for name, (group, kind) in DATASETS.items():
        rows = [row if "id" in row else {"id": f"{name}-{i:05d}", **row} for i, row in enumerate(made[name])]
        meta = {"asked": asked[name], **({"grid": grid} if name in ("needle", "needle_choice") else {})}
        sets.append(EvalSet(name, group, kind, rows, meta))
        if len(rows) < asked[name]:
            log.warning("eval data: %s has %d of %d items (%d documents, %d haystack documents)", name, len(rows),
                        asked[name], len(docs), len(hay))
    log.info("eval data: %s", {s.name: len(s.rows) for s in sets})
    return sets


def write_eval_sets(sets: Sequence[EvalSet], out_url: str) -> dict[str, Any]:
    """``<out>/<name>.jsonl`` per set and ``<out>/manifest.json``; returns the manifest. Each manifest entry names
    its file by ``path``, relative to `out_url`, so the directory can be copied (s3:// to local) as a whole."""
    names = [s.name for s in sets]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"sets {names}: expected distinct names from {sorted(DATASETS)}")
    entries = []
    for s in sets:
        path = f"{s.name}.jsonl"
        body = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in s.rows)
        storage.write_text(storage.join(out_url, path), body)
        entries.append({"name": s.name, "group": s.group, "kind": s.kind, "n": len(s.rows), "path": path, **s.meta})
    manifest = {"sets": entries}
    storage.write_json(storage.join(out_url, MANIFEST), manifest)
    return manifest


def read_eval_sets(out_url: str) -> dict[str, Any]:
    """The manifest `write_eval_sets` wrote under `out_url`."""
    manifest = storage.read_json(storage.join(out_url, MANIFEST))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("sets"), list):
        raise ValueError(f"{storage.join(out_url, MANIFEST)!r} has no 'sets' list: not written by write_eval_sets")
    return manifest


def read_rows(out_url: str, name: str) -> list[dict[str, Any]]:
    """The rows of one set under `out_url`, as written."""
    entry = next((e for e in read_eval_sets(out_url)["sets"] if e["name"] == name), None)
    if entry is None:
        raise ValueError(f"no set {name!r} in the manifest under {out_url!r}")
    return [json.loads(line) for line in storage.read_text(storage.join(out_url, entry["path"])).splitlines() if line]


# ------------------------------------------------------------------------------------------- contamination

_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd, so the rolling combination below keeps order and spreads bits
_CONTENT: dict[str, Callable[[dict[str, Any]], list[str]]] = {  # what training text could have contained
    "knowledge_cloze": lambda r: [r["question"].replace(BLANK, r[r["answer"]])],
    "language_continuation": lambda r: [f"{r['context']} {r[r['answer']]}"],
    "math_word": lambda r: [r["question"], r["answer"]],
    "code_functions": lambda r: [r["question"], r["solution"]],
    "needle": lambda r: [r["question"], r["needle"]],  # the haystack is ordinary text, training on it is fine
    "needle_choice": lambda r: [f"{r['prompt'].rsplit(chr(10), 1)[-1]} {r[r['answer']]}."],  # the needle sentence
    "tool_math": lambda r: [r["question"], r["answer"]],
}


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """64-bit hashes of the word `n`-grams of `text` (lower-cased ``\\w+`` words), shape (max(words − n + 1, 0),)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return np.empty(0, np.uint64)
    h = np.fromiter((xxhash.xxh64_intdigest(w.encode()) for w in words), np.uint64, len(words))
    grams = np.zeros(len(words) - n + 1, np.uint64)
    for j in range(n):  # grams[i] = Σ_j h[i + j] · MIX^(n − 1 − j) mod 2^64; uint64 arrays wrap silently
        grams = grams * _MIX + h[j: len(words) - n + 1 + j]
    return grams


def _training_index(texts: Iterable[str], n: int, flush: int = 4_000_000) -> np.ndarray:
    """Sorted distinct n-gram hashes of all training texts, deduplicated every `flush` hashes to bound memory."""
    index, chunks, size = np.empty(0, np.uint64), [], 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"training text {i} is a {type(text).__name__}: expected str")
        chunks.append(ngram_hashes(text, n))
        size += len(chunks[-1])
        if size >= flush:
            index, chunks, size = np.unique(np.concatenate([index, *chunks])), [], 0
    return np.unique(np.concatenate([index, *chunks]))


def _overlap(grams: np.ndarray, index: np.ndarray) -> float:
    at = np.minimum(np.searchsorted(index, grams), max(len(index) - 1, 0))
    return float(np.mean(index[at] == grams)) if len(index) else 0.0


def _shares(s: EvalSet, index: np.ndarray, n: int) -> dict[str, float | None]:
    """Row id -> share of its n-grams found in `index` (None: too short to judge)."""
    if s.name not in _CONTENT:
        raise ValueError(f"set {s.name!r}: expected one of {sorted(_CONTENT)}")
    shares: dict[str, float | None] = {}
    for row in s.rows:
        grams = np.unique(np.concatenate([ngram_hashes(t, n) for t in _CONTENT[s.name](row)]))
        shares[row["id"]] = _overlap(grams, index) if len(grams) else None
    return shares


def _check_contamination_args(n: int, threshold: float) -> None:
    if n < 1 or not 0 < threshold <= 1:
        raise ValueError(f"n={n}, threshold={threshold}: expected n >= 1 and 0 < threshold <= 1")


def contamination(sets: Sequence[EvalSet], training_texts: Iterable[str], n: int = 8,
                  threshold: float = 0.5) -> dict[str, dict[str, Any]]:
    """Per set: how many rows share at least `threshold` of their word `n`-grams with the training texts.

    A row's n-grams come from its content fields (`_CONTENT`: the cloze sentence with its answer, context plus the
    true continuation, question and answer or solution, the needle question and sentence), each field on its own.
    A row with fewer than `n` words in every field cannot be judged and counts as ``unchecked`` (e.g. "Solve for x:
    3x + 5 = 20." at n = 8). ``ids`` lists the first 20 contaminated rows; ``max_overlap`` is the largest share seen.
    """
    _check_contamination_args(n, threshold)
    index = _training_index(training_texts, n)
    report = {}
    for s in sets:
        shares = _shares(s, index, n)
        hits = [i for i, share in shares.items() if share is not None and share >= threshold]
        judged = [x for x in shares.values() if x is not None]
        report[s.name] = {"items": len(s.rows), "contaminated": len(hits), "ids": hits[:20],
                          "unchecked": len(shares) - len(judged), "max_overlap": round(max(judged, default=0.0), 4)}
    return report


def drop_contaminated(sets: Sequence[EvalSet], training_texts: Iterable[str], n: int = 8,
                      threshold: float = 0.5) -> list[EvalSet]:
    """The sets without the rows `contamination` flags (ids unchanged, so a gap shows where a row went)."""
    _check_contamination_args(n, threshold)
    index = _training_index(training_texts, n)
    out = []
    for s in sets:
        shares = _shares(s, index, n)
        keep = [r for r in s.rows if (shares[r["id"]] or 0.0) < threshold]
        if len(keep) < len(s.rows):
            log.warning("eval data: dropped %d contaminated rows of %s", len(s.rows) - len(keep), s.name)
        out.append(EvalSet(s.name, s.group, s.kind, keep, {**s.meta, "contaminated_dropped": len(s.rows) - len(keep)}))
    return out
