"""Byte-level BPE: byte-exact round trips, fixed special ids, cl100k-style splits, and parity with transformers."""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.tokenizer import CHAT_OFFSETS, CHAT_TEMPLATE, REWARD, Tokenizer, expected_special_ids, reserved_token

# Stdlib modules whose docstrings (prose, doctests) and sources (indented code) make a small mixed corpus.
DOC_MODULES = (
    "argparse", "asyncio", "base64", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "enum", "fractions", "functools", "heapq", "http.client", "inspect", "itertools", "json",
    "logging", "math", "operator", "os", "pathlib", "pickle", "random", "re", "shutil", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "threading", "types", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip
SOURCE_MODULES = ("textwrap", "json.encoder", "heapq", "fractions")

SETTINGS = settings(max_examples=200, deadline=None)


def _docs(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    objects = [
        module,
        *(obj for _, obj in inspect.getmembers(module, lambda o: inspect.isclass(o) or inspect.isroutine(o))),
    ]
    return [doc for doc in map(inspect.getdoc, objects) if doc]


def _corpus() -> list[str]:
    texts = [doc for name in DOC_MODULES for doc in _docs(name)]
    texts += [inspect.getsource(importlib.import_module(name)) for name in SOURCE_MODULES]
    # Long and repeated numbers, so BPE would merge digit runs longer than three if the pre-tokenizer allowed it.
    texts += [" ".join(str(7**k) for k in range(60)) for _ in range(20)]
    texts += [" ".join(str(1000 + i) for i in range(100)) for _ in range(20)]
    return texts


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    texts = _corpus()
    assert 200_000 < sum(map(len, texts)) < 2_000_000  # a few hundred KB: fast yet enough for real merges
    return texts


@pytest.fixture(scope="module")
def tok(corpus: list[str]) -> Tokenizer:
    return Tokenizer.train(corpus, 1024)


@pytest.fixture(scope="module", params=[512, 700])
def sized(request: pytest.FixtureRequest, corpus: list[str]) -> Tokenizer:
    return Tokenizer.train(corpus, request.param)


def _pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.decode([i]) for i in tok.encode(text)]


# --- round trips --------------------------------------------------------------------------------------------------

TRICKY = st.sampled_from(
    [
        "<s>",
        "</s>",
        "<unk>",
        "<0xFF>",
        "<|im_start|>",
        "<|reserved_3|>",
        "\x00",
        "\u0301",
        "👩‍👩‍👧",
        "\r\n",
        "\t\t",
        "\ufeff",
    ]
)


@SETTINGS
@given(text=st.text())
def test_round_trip_arbitrary_text(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@SETTINGS
@given(parts=st.lists(st.one_of(st.text(max_size=8), TRICKY), max_size=12))
def test_round_trip_text_with_special_looking_strings(tok: Tokenizer, parts: list[str]) -> None:
    text = "".join(parts)
    assert tok.decode(tok.encode(text)) == text


@SETTINGS
@given(data=st.binary())
def test_round_trip_bytes_via_latin1_and_replace(tok: Tokenizer, data: bytes) -> None:
    latin = data.decode("latin-1")
    assert tok.decode(tok.encode(latin)).encode("latin-1") == data
    replaced = data.decode("utf-8", errors="replace")
    assert tok.decode(tok.encode(replaced)) == replaced


def test_no_unk_for_unseen_scripts(tok: Tokenizer) -> None:
    text = "Ελληνικά 中文 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x7f\x01"
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_encode_batch_matches_encode_and_adds_requested_specials(tok: Tokenizer) -> None:
    texts = ["hello world", "", "def f(x):\n    return x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, bos=True, eos=True) == [[1, *tok.encode(t), 2] for t in texts]
    assert tok.encode("hello")[0] != tok.bos_id  # no implicit <s>


def test_no_dummy_prefix(tok: Tokenizer) -> None:
    assert _pieces(tok, "return")[0].startswith("r")
    assert "".join(_pieces(tok, "return")) == "return"


# --- special tokens -----------------------------------------------------------------------------------------------


def test_special_ids_fixed(sized: Tokenizer) -> None:
    v = sized.vocab_size
    assert v % 256 == 0 and v in (512, 768)
    fixed = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": v - 1, "<|im_end|>": v - 2, "<|action_start|>": v - 3}
    fixed |= {"<|action_end|>": v - 4, "<|interpreter|>": v - 5, "<|plugin|>": v - 6, REWARD: v - 17}
    fixed |= {reserved_token(i): v - 16 + i for i in range(10)}
    assert {name: sized.token_id(name) for name in fixed} == fixed
    assert expected_special_ids(v) == fixed
    assert (sized.unk_id, sized.bos_id, sized.eos_id) == (0, 1, 2)


def test_internlm2_ids_at_full_size() -> None:
    ids = expected_special_ids(92544)
    assert (ids["<|im_start|>"], ids["<|im_end|>"], ids["<|plugin|>"], ids[REWARD]) == (92543, 92542, 92538, 92527)


def test_small_corpus_padded_with_reserved_tokens() -> None:
    small = Tokenizer.train(["tiny corpus"] * 3, 512)
    assert small.vocab_size == 512
    assert small.token_id(REWARD) == 495
    assert small.decode([494]).startswith("<|reserved_")  # the gap under <|reward|> is padding, not learned pieces


@pytest.mark.parametrize("name", [*CHAT_OFFSETS, REWARD, "<s>", "</s>", "<unk>"])
def test_special_token_is_one_id_inside_text(sized: Tokenizer, name: str) -> None:
    ids = sized.encode(f"a{name}b")
    assert ids == [*sized.encode("a"), sized.token_id(name), *sized.encode("b")]
    assert sized.decode(ids, skip_special=True) == "ab"


def test_special_tokens_never_split(tok: Tokenizer) -> None:
    text = "<|im_start|><|im_start|>x<|im_end|>\n</s><s>"
    ids = tok.encode(text)
    expected = ["<|im_start|>", "<|im_start|>", "<|im_end|>", "</s>", "<s>"]
    assert [i for i in ids if i in tok.special_ids.values()] == [tok.token_id(n) for n in expected]
    assert tok.decode(ids) == text


def test_unknown_special_name_raises(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=re.escape("<|nope|>")):
        tok.token_id("<|nope|>")


# --- pre-tokenization ---------------------------------------------------------------------------------------------


def test_digits_split_in_pieces_of_at_most_three(tok: Tokenizer) -> None:
    assert [piece for piece, _ in tok.backend.pre_tokenizer.pre_tokenize_str("12345")] == ["123", "45"]
    number = "100" * 5 + "12345" + str(7**80)
    pieces = _pieces(tok, number)
    assert "".join(pieces) == number
    assert max(len(p) for p in pieces) == 3  # digit merges were learned, and never past three digits
    assert _pieces(tok, "100100") == ["100", "100"]


@given(n=st.integers(min_value=0, max_value=10**40))
@SETTINGS
def test_no_piece_holds_more_than_three_digits(tok: Tokenizer, n: int) -> None:
    assert all(sum(c.isdigit() for c in p) <= 3 for p in _pieces(tok, f"x={n}, total {n * 7}"))


def test_indentation_runs_kept(tok: Tokenizer) -> None:
    line = "        return self._value\n"
    pieces = _pieces(tok, line)
    assert "".join(pieces) == line
    lead = pieces[: next(i for i, p in enumerate(pieces) if p.strip())]
    assert all(set(p) == {" "} for p in lead)
    assert max(len(p) for p in lead) >= 4  # the indentation is a learned run, not eight single spaces
    assert len(pieces[len(lead)]) > 1 and pieces[len(lead)].startswith(" ")  # one space rides with the word


# --- files and transformers ---------------------------------------------------------------------------------------

SAMPLES = ["Hello, world!", "def f(x):\n    return x + 12345\n", "a<|im_start|>b", "  多语言 🙂\n\n"]


def test_save_and_from_file_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    written = tok.save(tmp_path / "tok" / "tokenizer.json")
    assert written.name == "tokenizer.json"
    for loaded in (Tokenizer.from_file(written), Tokenizer.from_file(written.parent)):
        assert loaded.encode_batch(SAMPLES) == tok.encode_batch(SAMPLES)
        assert loaded.special_ids == tok.special_ids


def test_pretrained_tokenizer_fast_matches(tok: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok.save(tmp_path)))
    for text in SAMPLES:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf(text)["input_ids"] == [tok.bos_id, *tok.encode(text)]


def test_auto_tokenizer_after_save_hf(tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    out = tok.save_hf(tmp_path / "hf")
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    assert type(hf).__name__ == "PreTrainedTokenizerFast"
    assert (hf.bos_token, hf.eos_token, hf.unk_token, hf.pad_token) == ("<s>", "</s>", "<unk>", "</s>")
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, hf.pad_token_id) == (1, 2, 0, 2)
    assert hf.convert_tokens_to_ids("<|im_start|>") == tok.vocab_size - 1
    for text in SAMPLES:
        ids = hf(text)["input_ids"]
        assert ids == [tok.bos_id, *tok.encode(text)]
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special=True)


def test_chat_template_renders_chatml(tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok.save_hf(tmp_path)))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    expected = "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    assert hf.apply_chat_template(messages, tokenize=False) == expected.removesuffix("<|im_start|>assistant\n")
    assert hf.apply_chat_template(messages, add_generation_prompt=True) == tok.encode(expected)  # one <s>, at id 1
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


# --- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 100, 256])
def test_vocab_too_small_raises(size: int) -> None:
    with pytest.raises(ValueError, match=r"vocab_size=.*minimum is 276"):
        Tokenizer.train(["some text"], size)


def test_vocab_not_int_raises() -> None:
    with pytest.raises(ValueError, match="vocab_size must be an int"):
        Tokenizer.train(["some text"], 512.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("texts", [[], iter([]), ["", ""]])
def test_empty_corpus_raises(texts: list[str]) -> None:
    with pytest.raises(ValueError, match="texts is empty"):
        Tokenizer.train(texts, 512)


def test_from_file_missing_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer.from_file(missing)


@pytest.mark.parametrize("content", ["{not json", '{"version": "1.0"}'])
def test_from_file_corrupt_names_path(tmp_path: Path, content: str) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        Tokenizer.from_file(bad)


def test_from_file_foreign_layout_names_path(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    foreign = tmp_path / "foreign.json"
    HFTokenizer(models.BPE(vocab={chr(i): i for i in range(97, 97 + 26)}, merges=[])).save(str(foreign))
    with pytest.raises(ValueError, match=re.escape(str(foreign))):
        Tokenizer.from_file(foreign)
