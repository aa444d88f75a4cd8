"""Parse, validate and normalise raw JSONL text shards (InternLM2 §3.1.1, steps 1 and 2).

Record contract, one JSON object a line::

    {"id": str (optional), "text": str, "source": str, "meta": {...} (optional)}

Every line ends up either as a document or in the quarantine (with its shard, 1-based line number, an error code
from ERROR_CODES and the first characters of the raw line), so ``len(docs) + len(quarantine)`` is the number of
input lines; a blank line is quarantined as ``empty_line`` for that reason. The contract is strict: a top-level key
outside it is ``unknown_field`` (extra data belongs under ``meta``) rather than silently dropped. A missing or null
id becomes ``"h" + xxh3_64(text)``: stable across runs, so re-parsing a shard gives the same ids.

`normalize` cleans the text with polars string expressions and adds the language (pycld2, whose model ships inside
the wheel, so it works offline). It is idempotent: it runs one cleaning pass until nothing changes, because one
pass can expose new matches (removing a tag can join ``&am<b>p;`` into an entity).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import polars as pl
import pycld2
import xxhash

QUARANTINE_SCHEMA: dict[str, pl.DataType] = {
    "shard": pl.Utf8(),
    "line": pl.Int64(),
    "error": pl.Utf8(),
    "detail": pl.Utf8(),
    "raw": pl.Utf8(),
}
ERROR_CODES = (
    "empty_line",
    "nul_byte",
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "unknown_field",
    "wrong_type",
    "empty_text",
    "oversized_text",
)
REQUIRED_FIELDS = ("text", "source")
OPTIONAL_FIELDS = ("id", "meta")
RAW_CHARS = 500
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class BadRecord(ValueError):
    """One line that breaks the record contract; `code` is one of ERROR_CODES."""

    def __init__(self, code: str, detail: str) -> None:
        assert code in ERROR_CODES, code
        super().__init__(detail)
        self.code = code


@dataclass(frozen=True)
class Contract:
    """The fields of one kind of record: required strings (``text`` among them), optional strings, plus the
    optional ``id`` (string; a content hash when absent) and ``meta`` (object) every kind has."""

    kind: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()

    @property
    def schema(self) -> dict[str, pl.DataType]:
        fields = ("id", *self.required, *self.optional, "meta")
        return {**{f: pl.Utf8() for f in fields}, "shard": pl.Utf8(), "line": pl.Int64()}


TEXT = Contract("text", REQUIRED_FIELDS)
CODE = Contract("code", ("text", "repo", "path"), ("lang",))
DOC_SCHEMA = TEXT.schema


@dataclass(frozen=True)
class ParsedShard:
    docs: pl.DataFrame  # DOC_SCHEMA
    quarantine: pl.DataFrame  # QUARANTINE_SCHEMA

    @property
    def lines(self) -> int:
        return len(self.docs) + len(self.quarantine)


def content_id(text: str) -> str:
    """The id of a record that came without one: a hash of its text (the same text always gets the same id)."""
    return "h" + xxhash.xxh3_64_hexdigest(text.encode("utf-8"))


def split_lines(data: bytes) -> list[bytes]:
    """Lines of a JSONL buffer; a final newline ends the last line rather than starting an empty one."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return lines


def raw_excerpt(line: bytes) -> str:
    """The start of a raw line as printable text: bad bytes and control characters become escapes."""
    text = line[: RAW_CHARS * 4].decode("utf-8", errors="backslashreplace")[:RAW_CHARS]
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)[:RAW_CHARS]  # escapes lengthen it


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity, which no other JSON reader does; re-serialised meta would be invalid.
    raise BadRecord("invalid_json", f"non-standard JSON constant {name}")


def _decode(line: bytes) -> Any:
    if b"\x00" in line:
        raise BadRecord("nul_byte", f"raw NUL byte at offset {line.index(0)}")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecord("invalid_utf8", f"invalid UTF-8 at byte {err.start}: {err.reason}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise BadRecord("invalid_json", f"invalid JSON: {err.msg} at column {err.colno}") from None


def _check_fields(obj: dict[str, Any], contract: Contract = TEXT) -> None:
    missing = [k for k in contract.required if k not in obj]
    if missing:
        needs = " and ".join(repr(k) for k in contract.required)
        raise BadRecord("missing_field", f"missing field(s) {missing}: a {contract.kind} record needs {needs}")
    unknown = sorted(set(obj) - {*contract.required, *contract.optional, *OPTIONAL_FIELDS})
    if unknown:
        raise BadRecord("unknown_field", f"unknown field(s) {unknown}: put extra data under 'meta'")
    nullable_str, nullable_obj = (str, type(None)), (dict, type(None))
    kinds = [*((k, str) for k in contract.required), *((k, nullable_str) for k in (*contract.optional, "id")),
             ("meta", nullable_obj)]
    for key, kind in kinds:
        if key in obj and not isinstance(obj[key], kind):
            raise BadRecord("wrong_type", f"field {key!r} is {type(obj[key]).__name__}, expected {_kind_name(kind)}")
    for key in contract.required:
        if key != "text" and not obj[key]:
            raise BadRecord("missing_field", f"field {key!r} is empty")
    if obj.get("id") == "":
        raise BadRecord("wrong_type", "field 'id' is an empty string: give a real id, or none to get a content hash")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else {"str": "string", "dict": "object"}[k.__name__] for k in kinds)


def _check_text(text: str, max_chars: int) -> None:
    if "\x00" in text:
        raise BadRecord("nul_byte", f"NUL character in text at index {text.index(chr(0))}")
    if not text.strip():
        raise BadRecord("empty_text", "text is empty or only whitespace")
    if len(text) > max_chars:
        raise BadRecord("oversized_text", f"text has {len(text):,} characters, more than max_chars={max_chars:,}")


def _encodable(record: dict[str, Any]) -> None:
    """JSON escapes can smuggle lone surrogates (``"\\ud800"``) into strings that no UTF-8 writer accepts."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise BadRecord("invalid_utf8", f"lone surrogate escape in a string: {err.reason}") from None


def parse_record(line: bytes, *, max_chars: int, contract: Contract = TEXT) -> dict[str, str | None]:
    """One line → {id, the contract's fields, meta (JSON)}, or BadRecord saying what is wrong with it."""
    if not line.strip():
        raise BadRecord("empty_line", "blank line")
    obj = _decode(line)
    if not isinstance(obj, dict):
        raise BadRecord("not_an_object", f"a JSON {type(obj).__name__}, expected an object")
    _check_fields(obj, contract)
    text, meta = obj["text"], obj.get("meta") or {}
    names = [k for k in (*contract.required, *contract.optional, "id") if k != "text"]
    if any("\x00" in (obj.get(k) or "") for k in names):
        raise BadRecord("nul_byte", f"NUL character in one of {names}")
    _check_text(text, max_chars)
    _encodable(obj)
    fields = {k: obj.get(k) for k in (*contract.required, *contract.optional)}
    return {"id": obj.get("id") or content_id(text), **fields, "meta": json.dumps(meta, ensure_ascii=False)}


def parse_shard(data: bytes, shard: str, *, max_chars: int = 1_000_000, contract: Contract = TEXT) -> ParsedShard:
    """Split a JSONL shard into valid records and a quarantine of bad lines; nothing is dropped silently."""
    if max_chars < 1:
        raise ValueError(f"max_chars={max_chars}: expected a positive number of characters")
    docs: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    for number, line in enumerate(split_lines(data), start=1):
        try:
            docs.append({**parse_record(line, max_chars=max_chars, contract=contract), "shard": shard, "line": number})
        except BadRecord as err:
            bad.append(
                {"shard": shard, "line": number, "error": err.code, "detail": str(err), "raw": raw_excerpt(line)}
            )
    return ParsedShard(pl.DataFrame(docs, schema=contract.schema), pl.DataFrame(bad, schema=QUARANTINE_SCHEMA))


# ---------------------------------------------------------------- normalisation

# Markup leftovers. HTML tags only from a list of real tag names, so `List<String>` or `a < b > c` in prose and
# code keep their angle brackets (`x <b and c> y` does read as a <b> tag with two attributes, and goes).
_HTML_TAGS = (
    "a|abbr|b|big|blockquote|body|br|center|code|dd|div|dl|dt|em|font|h[1-6]|head|hr|html|i|img|kbd|li|link|meta|"
    "ol|p|pre|s|samp|small|span|strike|strong|sub|sup|table|tbody|td|th|thead|title|tr|tt|u|ul|var"
)
_TAG = rf"(?i)</?(?:{_HTML_TAGS})(?:\s+[\w:-]+(?:\s*=\s*(?:\"[^\"<>]*\"|'[^'<>]*'|[^\s<>\"']+))?)*\s*/?>"
_BREAK_TAG = r"(?i)<(?:br|p|/p|div|/div|hr)\b[^<>]*>"
_ENTITIES = {
    "&nbsp;": " ",  # a plain space, so the whitespace rules below see it
    "&lt;": "<",
    "&gt;": ">",
    "&quot;": '"',
    "&apos;": "'",
    "&#39;": "'",
    "&#x27;": "'",
    "&#34;": '"',
    "&#160;": " ",
    "&mdash;": "\u2014",
    "&ndash;": "\u2013",
    "&hellip;": "\u2026",
    "&copy;": "\u00a9",
    "&reg;": "\u00ae",
    "&trade;": "\u2122",
    "&laquo;": "\u00ab",
    "&raquo;": "\u00bb",
    "&lsquo;": "\u2018",
    "&rsquo;": "\u2019",
    "&ldquo;": "\u201c",
    "&rdquo;": "\u201d",
}
# `&amp;` last and only where it does not start another entity: `&amp;lt;` is the text "&lt;", and unescaping it
# twice (once per pass) would turn documentation about entities into markup.
_AMP = r"&amp;([^#a-zA-Z]|$)"
_ROFF_COMMENT = r"(?m)^[.'][ \t]*\\\".*$"
_ROFF_FONT = r"\\f(?:[BIRPC1-4]|\([A-Za-z0-9]{2}|\[[A-Za-z0-9]*\])"
_CONTROL = r"[\p{Cc}&&[^\n\t]]|[\x{200B}\x{2060}\x{FEFF}]"  # keep \n and \t; drop zero-width and BOM too


def _clean_pass(text: pl.Expr) -> pl.Expr:
    """One normalisation pass; order matters (markup first, whitespace last, NFC before and after)."""
    text = text.str.normalize("NFC").str.replace_all(r"\r\n?|[\x{2028}\x{2029}]", "\n")
    text = text.str.replace_all(_CONTROL, "")
    text = text.str.replace_all(_ROFF_COMMENT, "").str.replace_all(_ROFF_FONT, "").str.replace_all(r"\\-", "-")
    text = text.str.replace_all(_BREAK_TAG, "\n").str.replace_all(_TAG, "")
    text = text.str.replace_many(list(_ENTITIES), list(_ENTITIES.values())).str.replace_all(_AMP, "&${1}")
    text = text.str.replace_all(r"(?m)[^\S\n]+$", "")  # trailing whitespace per line; indentation stays
    text = text.str.replace_all(r"\n{4,}", "\n\n\n").str.strip_chars("\n")  # at most two blank lines in a row
    return text.str.normalize("NFC")  # removals can put a combining mark next to a new base character


def normalize_text(texts: pl.Series, max_passes: int = 20) -> pl.Series:
    """`_clean_pass` until no text changes, so normalising twice gives what normalising once gave."""
    current = texts
    for _ in range(max_passes):
        cleaned = pl.select(_clean_pass(pl.lit(current))).to_series().alias(texts.name)
        if cleaned.equals(current):
            return cleaned
        current = cleaned
    raise AssertionError(f"text normalisation did not settle after {max_passes} passes")  # each pass shrinks text


def detect_language(text: str) -> tuple[str, float]:
    """pycld2's top language and the share of the text in it (0..1); ("un", 0.0) when it cannot tell."""
    try:
        _reliable, _bytes, details = pycld2.detect(text, isPlainText=True)
    except pycld2.error:
        return "un", 0.0
    _name, code, percent, _score = details[0]
    return (code, percent / 100.0) if code != "un" else ("un", 0.0)


def _languages(texts: pl.Series) -> pl.DataFrame:
    found = [detect_language(t) for t in texts]  # pycld2 is C++ per call; no vector API exists
    return pl.DataFrame(found, schema={"lang": pl.Utf8(), "lang_score": pl.Float64()}, orient="row")


def normalize(df: pl.DataFrame) -> pl.DataFrame:
    """Clean `text` (Unicode NFC, control characters, markup leftovers, whitespace) and add `lang`, `lang_score`.

    Documents whose text becomes empty stay (the rules remove them as `gopher_short_doc`), so counts still add up.
    """
    if "text" not in df.columns:
        raise ValueError(f"normalize needs a 'text' column; got columns {df.columns}")
    text = normalize_text(df.get_column("text"))
    out = df.with_columns(text).drop(["lang", "lang_score"], strict=False)
    return pl.concat([out, _languages(text)], how="horizontal")
