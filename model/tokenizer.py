"""Byte-level BPE tokenizer with InternLM2's special-token layout.

How this departs from the paper: InternLM2 uses a SentencePiece BPE whose "byte fallback" emits ``<0xXX>`` pieces
for characters outside its vocabulary. We train a *byte-level* BPE with Hugging Face ``tokenizers`` instead: every
UTF-8 byte is one of the 256 base symbols (the ByteLevel alphabet) and merges are learned on top, so any text
encodes without ``<unk>`` and decodes back byte-exactly. That is our form of byte fallback.

Pre-tokenization follows cl100k (whose top pieces seed InternLM2's vocabulary): a regex split that keeps digits in
pieces of at most three (``\\p{N}{1,3}``) and keeps whitespace runs (code indentation), then ByteLevel without a
dummy prefix space and without its own GPT-2 regex.

Special ids for a vocabulary of size V (V is the requested size rounded up to a multiple of 256):
``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, and InternLM2's chat tokens in the top slots exactly where InternLM2 puts them
for V = 92544: ``<|im_start|>`` V-1, ``<|im_end|>`` V-2, ``<|action_start|>`` V-3, ``<|action_end|>`` V-4,
``<|interpreter|>`` V-5, ``<|plugin|>`` V-6, ``<|reward|>`` V-17 (XTuner's 92527); V-16..V-7 hold
``<|reserved_0|>`` … ``<|reserved_9|>``. When the corpus is too small to learn V-17 pieces, the gap below
``<|reward|>`` is filled with further reserved tokens so the top ids never move.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

logger = logging.getLogger(__name__)

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
BASE_SPECIALS: tuple[str, ...] = (UNK, BOS, EOS)  # trained first, so they get ids 0, 1, 2
N_BYTES = 256
VOCAB_MULTIPLE = 256  # keeps the embedding matrix shape friendly to tensor cores and sharding

# Distance from the top of the vocabulary (id = V - offset), as in InternLM2 / XTuner.
CHAT_OFFSETS: dict[str, int] = {
    "<|im_start|>": 1,
    "<|im_end|>": 2,
    "<|action_start|>": 3,
    "<|action_end|>": 4,
    "<|interpreter|>": 5,
    "<|plugin|>": 6,
}
REWARD, REWARD_OFFSET = "<|reward|>", 17
N_TOP_RESERVED = REWARD_OFFSET - 1 - len(CHAT_OFFSETS)  # 10 slots between <|reward|> and <|plugin|>
N_TOP = REWARD_OFFSET  # the slots V-17 .. V-1 owned by the fixed layout
MIN_VOCAB = len(BASE_SPECIALS) + N_BYTES + N_TOP

# cl100k's pattern with the digit rule spelled out: letters with an optional leading non-letter, numbers in runs of
# at most three, punctuation runs, newlines, and whitespace runs (``\s+(?!\S)`` leaves the last space to the word).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# InternLM2's template: one <s> for the conversation, then ChatML turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def reserved_token(index: int) -> str:
    return f"<|reserved_{index}|>"


def round_vocab(vocab_size: int) -> int:
    """Requested size rounded up to a multiple of 256."""
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def top_special_tokens() -> list[str]:
    """The 17 fixed top tokens in ascending id order: <|reward|>, reserved 0..9, then the chat tokens."""
    chat_ascending = sorted(CHAT_OFFSETS, key=CHAT_OFFSETS.__getitem__, reverse=True)
    return [REWARD, *(reserved_token(i) for i in range(N_TOP_RESERVED)), *chat_ascending]


def expected_special_ids(vocab_size: int) -> dict[str, int]:
    """Where every fixed special token must sit in a vocabulary of ``vocab_size`` (already rounded)."""
    ids = {name: i for i, name in enumerate(BASE_SPECIALS)}
    first_top = vocab_size - N_TOP
    ids.update({name: first_top + i for i, name in enumerate(top_special_tokens())})
    return ids


def _checked_vocab_size(vocab_size: int) -> int:
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    rounded = round_vocab(vocab_size)
    if rounded < MIN_VOCAB:
        raise ValueError(
            f"vocab_size={vocab_size} (rounded up to {rounded}) cannot hold {N_BYTES} byte symbols + "
            f"{len(BASE_SPECIALS) + N_TOP} special tokens: the minimum is {MIN_VOCAB}"
        )
    return rounded


def _new_bpe() -> HFTokenizer:
    """An untrained byte-level BPE with our pre-tokenization; no normalizer, so bytes are never rewritten."""
    tok = HFTokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _counting(texts: Iterable[str], counter: list[int]) -> Iterator[str]:
    """Pass texts through while counting characters, so an empty corpus is caught without reading it twice."""
    for text in texts:
        counter[0] += len(text)
        yield text


def _fill_specials(tok: HFTokenizer, vocab_size: int) -> None:
    """Pad the trained vocabulary with reserved tokens up to V-17, then add the fixed top tokens in id order."""
    trained = tok.get_vocab_size(with_added_tokens=True)
    assert trained <= vocab_size - N_TOP, f"trainer produced {trained} tokens, more than the {vocab_size - N_TOP} asked"
    # Top reserved slots take reserved_0..9 so their names do not depend on the corpus; padding continues after.
    padding = [reserved_token(N_TOP_RESERVED + i) for i in range(vocab_size - N_TOP - trained)]
    tok.add_special_tokens(padding + top_special_tokens())
    # Prepend <s> for transformers' ``tok(text)`` (Llama-style); our own encode passes add_special_tokens=False.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, BASE_SPECIALS.index(BOS))]
    )


def _check_layout(tok: HFTokenizer, where: str) -> None:
    """Raise if ``tok`` does not have our vocabulary size rule and fixed special ids."""
    size = tok.get_vocab_size(with_added_tokens=True)
    if size % VOCAB_MULTIPLE or size < MIN_VOCAB:
        raise ValueError(
            f"{where}: vocabulary size {size} is not a multiple of {VOCAB_MULTIPLE} of at least {MIN_VOCAB}"
        )
    wrong = {
        name: tok.token_to_id(name) for name, i in expected_special_ids(size).items() if tok.token_to_id(name) != i
    }
    if wrong:
        raise ValueError(f"{where}: special tokens at wrong ids {wrong}; expected {expected_special_ids(size)}")


class Tokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer``: no implicit specials, fixed special ids, HF export."""

    def __init__(self, tok: HFTokenizer) -> None:
        _check_layout(tok, "Tokenizer")
        self._tok = tok
        self._special_ids = {t.content: i for i, t in sorted(tok.get_added_tokens_decoder().items()) if t.special}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
        """Train on ``texts``; the result has exactly ``vocab_size`` rounded up to a multiple of 256 tokens."""
        size = _checked_vocab_size(vocab_size)
        if min_frequency < 1:
            raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
        tok = _new_bpe()
        trainer = trainers.BpeTrainer(
            vocab_size=size - N_TOP,
            min_frequency=min_frequency,
            special_tokens=list(BASE_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
            show_progress=False,
        )
        chars = [0]
        tok.train_from_iterator(_counting(texts, chars), trainer=trainer)
        if chars[0] == 0:
            raise ValueError("texts is empty: the training iterator yielded no characters")
        _fill_specials(tok, size)
        logger.info("trained BPE: %d tokens (%d requested), %d training characters", size, vocab_size, chars[0])
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json`` written by :meth:`save` or :meth:`save_hf` (a file or the directory holding it)."""
        file = _json_path(Path(path))
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception for malformed JSON
            raise ValueError(f"{file} is not a valid tokenizer.json: {err}") from err
        _check_layout(tok, str(file))
        return cls(tok)

    def save(self, path: str | Path) -> Path:
        """Write ``tokenizer.json`` to ``path`` (or into it, if it is a directory); returns the file written."""
        file = _json_path(Path(path))
        file.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(file), pretty=True)
        return file

    def save_hf(self, directory: str | Path, *, model_max_length: int | None = None) -> Path:
        """Write a directory that ``transformers.AutoTokenizer.from_pretrained`` loads with no remote code."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.save(out / "tokenizer.json")
        specials = self._hf_special_tokens()
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "chat_template": CHAT_TEMPLATE,
            # Byte-level decoding is already exact; transformers' space clean-up would break round trips.
            "clean_up_tokenization_spaces": False,
        }
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        _write_json(out / "tokenizer_config.json", config)
        _write_json(out / "special_tokens_map.json", specials)
        return out

    def _hf_special_tokens(self) -> dict[str, Any]:
        named = [REWARD, *CHAT_OFFSETS]
        # pad = eos, as InternLM2 ships it; padded positions are masked out of the loss anyway.
        return {
            "bos_token": BOS,
            "eos_token": EOS,
            "unk_token": UNK,
            "pad_token": EOS,
            "additional_special_tokens": named,
        }

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, bos=bos, eos=eos)

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [self._wrap(e.ids, bos=bos, eos=eos) for e in encodings]

    def _wrap(self, ids: list[int], *, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        """The stored piece (byte-level alphabet, so a space reads as ``Ġ``); ``None`` when out of range."""
        return self._tok.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> dict[str, int]:
        """Every special token (base, chat, reward, reserved) by name; a copy, safe to mutate."""
        return dict(self._special_ids)

    def token_id(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            known = ", ".join(n for n in self._special_ids if not n.startswith("<|reserved_"))
            raise ValueError(f"unknown special token {name!r}; known: {known} and <|reserved_N|>") from None

    @property
    def unk_id(self) -> int:
        return self._special_ids[UNK]

    @property
    def bos_id(self) -> int:
        return self._special_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._special_ids[EOS]

    @property
    def backend(self) -> HFTokenizer:
        """The wrapped ``tokenizers.Tokenizer``, for callers that need offsets or batch padding."""
        return self._tok


def _json_path(path: Path) -> Path:
    return path / "tokenizer.json" if path.is_dir() else path


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
