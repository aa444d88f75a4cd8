"""Parsing into documents + quarantine, and text normalisation (tasks/clean/parse.py)."""

from __future__ import annotations

import json

import polars as pl
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.clean.parse import (
    DOC_SCHEMA,
    ERROR_CODES,
    QUARANTINE_SCHEMA,
    RAW_CHARS,
    content_id,
    detect_language,
    normalize,
    normalize_text,
    parse_shard,
    split_lines,
)

GOOD = {"id": "d1", "text": "A short but valid text.", "source": "test", "meta": {"path": "a/b", "n": 1}}

# One line per bad-record kind: (raw line, expected error code).
BAD_LINES: list[tuple[bytes, str]] = [
    (b"", "empty_line"),
    (b"   \t ", "empty_line"),
    (b'{"text": "a\x00b", "source": "s"}', "nul_byte"),
    (b'{"text": "caf\xe9", "source": "s"}', "invalid_utf8"),
    (b'{"text": "x", "source": "s"', "invalid_json"),
    (b'{"text": NaN, "source": "s"}', "invalid_json"),
    (b'["text", "source"]', "not_an_object"),
    (b'"just a string"', "not_an_object"),
    (b'{"source": "s"}', "missing_field"),
    (b'{"text": "x"}', "missing_field"),
    (b'{"text": "x", "source": ""}', "missing_field"),
    (b'{"text": "x", "source": "s", "url": "http://x"}', "unknown_field"),
    (b'{"text": 42, "source": "s"}', "wrong_type"),
    (b'{"text": "x", "source": ["s"]}', "wrong_type"),
    (b'{"text": "x", "source": "s", "id": 7}', "wrong_type"),
    (b'{"text": "x", "source": "s", "id": ""}', "wrong_type"),
    (b'{"text": "x", "source": "s", "meta": [1, 2]}', "wrong_type"),
    (b'{"text": "  \\n\\t ", "source": "s"}', "empty_text"),
    (b'{"text": "' + b"y" * 101 + b'", "source": "s"}', "oversized_text"),
    (b'{"text": "a\\u0000b", "source": "s"}', "nul_byte"),
    (b'{"text": "a", "source": "s\\u0000"}', "nul_byte"),
    (b'{"text": "lone \\ud800 surrogate", "source": "s"}', "invalid_utf8"),
]


def _shard(lines: list[bytes], trailing_newline: bool = True) -> bytes:
    return b"\n".join(lines) + (b"\n" if trailing_newline else b"")


def test_every_bad_kind_is_quarantined_with_its_line_and_code() -> None:
    lines = [json.dumps(GOOD).encode()] + [line for line, _ in BAD_LINES] + [json.dumps(GOOD).encode()]
    parsed = parse_shard(_shard(lines), "s-0", max_chars=100)
    assert parsed.docs.get_column("line").to_list() == [1, len(lines)]
    expected = [(i + 2, code) for i, (_, code) in enumerate(BAD_LINES)]
    assert list(zip(parsed.quarantine["line"], parsed.quarantine["error"], strict=True)) == expected
    assert set(parsed.quarantine["error"]) <= set(ERROR_CODES)
    assert (parsed.quarantine["shard"] == "s-0").all()
    assert parsed.quarantine["detail"].str.len_chars().min() > 0


def test_good_record_fields_and_schemas() -> None:
    no_id = {"text": "Text without an id.", "source": "web"}
    parsed = parse_shard(_shard([json.dumps(GOOD).encode(), json.dumps(no_id).encode()]), "shard-a")
    assert dict(parsed.docs.schema) == DOC_SCHEMA
    assert dict(parsed.quarantine.schema) == QUARANTINE_SCHEMA
    first, second = parsed.docs.iter_rows(named=True)
    assert first == {**GOOD, "meta": json.dumps(GOOD["meta"]), "shard": "shard-a", "line": 1}
    assert second["id"] == "h" + xxhash.xxh3_64_hexdigest(no_id["text"].encode()) == content_id(no_id["text"])
    assert json.loads(second["meta"]) == {}


def test_null_id_gets_a_content_hash_and_crlf_lines_parse() -> None:
    line = b'{"id": null, "text": "caf\xc3\xa9", "source": "s"}\r'
    parsed = parse_shard(line + b"\n", "s")
    assert parsed.docs.row(0, named=True)["id"] == content_id("café")
    assert parsed.docs.row(0, named=True)["text"] == "café"


def test_trailing_newline_makes_no_extra_line() -> None:
    line = json.dumps(GOOD).encode()
    assert parse_shard(_shard([line, line]), "s").lines == 2
    assert parse_shard(_shard([line, line], trailing_newline=False), "s").lines == 2
    assert parse_shard(b"", "s").lines == 0
    assert split_lines(b"\n") == [b""]


def test_raw_excerpt_is_short_and_printable() -> None:
    line = b'{"text": "' + b"\x00\x1b\xff" * 400 + b'"}'
    bad = parse_shard(line, "s").quarantine.row(0, named=True)
    assert bad["error"] == "nul_byte"
    assert len(bad["raw"]) <= RAW_CHARS
    assert bad["raw"].isprintable()


def test_max_chars_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_chars"):
        parse_shard(b"", "s", max_chars=0)


_good_line = st.builds(
    lambda text, src: json.dumps({"text": text, "source": src}).encode(),
    st.text(min_size=1).filter(lambda t: t.strip() and "\x00" not in t),
    st.text(alphabet="abc", min_size=1, max_size=3),
)
_junk_line = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))
_mixed = st.lists(st.one_of(_good_line, _junk_line, st.sampled_from([line for line, _ in BAD_LINES])), max_size=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mixed, st.booleans())
def test_every_input_line_is_a_doc_or_quarantined_exactly_once(lines: list[bytes], trailing: bool) -> None:
    trailing = trailing or (bool(lines) and lines[-1] == b"")  # without it, a last empty line is no line at all
    data = _shard(lines, trailing_newline=trailing) if lines else b""
    parsed = parse_shard(data, "h", max_chars=100)
    expected_lines = len(lines) if data else 0
    assert len(parsed.docs) + len(parsed.quarantine) == expected_lines
    seen = sorted([*parsed.docs["line"], *parsed.quarantine["line"]])
    assert seen == list(range(1, expected_lines + 1))


# ---------------------------------------------------------------- normalisation


def _norm(text: str) -> str:
    return normalize_text(pl.Series("text", [text])).item()


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("cafe\u0301", "caf\u00e9"),  # NFC
        ("a\r\nb\rc", "a\nb\nc"),
        ("a\x00b\x07c\u200bd\ufeff\te", "abcd\te"),  # control and zero-width characters; the tab stays
        ("line   \n  indented  \t\nend", "line\n  indented\nend"),  # trailing whitespace only
        ("a\n\n\n\n\n\nb", "a\n\n\nb"),  # at most two blank lines in a row
        ("\n\nbody\n\n", "body"),
        ("x<br>y <b>bold</b> <a href='u'>link</a>", "x\ny bold link"),
        ("List<String> and a < b > c", "List<String> and a < b > c"),  # not tags: kept
        ("&lt;tag&gt; &amp; &quot;q&quot; a&nbsp;b", '<tag> & "q" a b'),
        ("write &amp;lt; for <", "write &amp;lt; for <"),  # an escaped entity stays escaped
        ('.\\" a roff comment\n\\fBbold\\fR and \\-\\-help', "bold and --help"),
    ],
)
def test_normalize_examples(raw: str, clean: str) -> None:
    assert _norm(raw) == clean


_FRAGMENTS = [
    "<br>",
    "<b>",
    "</p>",
    "&amp;",
    "&lt;",
    "&gt;",
    "&nbsp;",
    "\\fB",
    "\\f",
    "\\-",
    '.\\" c',
    "\n",
    "\r\n",
    "\r",
    " ",
    "\t",
    "\x00",
    "\u200b",
    "e\u0301",
    "\u0301",
    "<",
    ">",
    "&",
    ";",
    "amp",
    "lt",
    ".",
    "\\",
    "B",
]
_messy = st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=4)), max_size=25).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(_messy, min_size=1, max_size=4))
def test_normalize_is_idempotent(texts: list[str]) -> None:
    df = pl.DataFrame({"text": texts})
    once = normalize(df)
    assert normalize(once).equals(once)


def test_normalize_adds_language_and_keeps_rows() -> None:
    df = pl.DataFrame(
        {
            "id": ["en", "fr", "digits"],
            "text": [
                "The quick brown fox jumps over the lazy dog while the farmer watches from his porch.",
                "Le renard brun saute par-dessus le chien paresseux pendant que le fermier regarde.",
                "12345 67890 12345",
            ],
        }
    )
    out = normalize(df)
    assert out.columns == ["id", "text", "lang", "lang_score"]
    assert out["lang"].to_list() == ["en", "fr", "un"]
    assert out["lang_score"][0] > 0.5 and out["lang_score"][2] == 0.0
    assert detect_language("") == ("un", 0.0)


def test_normalize_needs_text() -> None:
    with pytest.raises(ValueError, match="'text' column"):
        normalize(pl.DataFrame({"body": ["x"]}))
