"""Local plugins for tool-use SFT data (InternLM2 §4.1 function calling): real functions, not mocks.

- ``calculator``: arithmetic on an expression string, evaluated by walking Python's ``ast`` (never ``eval``): numbers,
  ``+ - * / // % **``, parentheses and unary signs. Numbers are exact fractions (``0.1`` is 1/10), so ``0.1 + 0.2``
  is ``0.3``; only a power with a non-integer exponent falls back to floating point. Names, calls, attributes,
  comparisons and other syntax are refused, and so are powers whose result would be huge.
- ``unit_converter``: length, mass, time, volume and temperature (with offsets: °C, °F, K), exact conversion factors
  (the international inch, pound and US gallon), results rounded to 6 decimal places when not exact.
- ``corpus_search`` (`make_search`): BM25 (k1 1.5, b 0.75) over a list of ``(id, text)`` documents, such as a
  cleaned corpus's ``text/*.jsonl`` (`corpus_docs`); returns the top-k ids with the first line and a snippet.

A plugin is called with a JSON-like ``arguments`` dict, checked against its schema first. It always returns text:
bad arguments or a failed computation come back as a line starting ``error:``, because a tool result is something
the model reads, and an exception escaping a plugin would end the conversation instead.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from infra import storage

Number = Fraction | float


class PluginError(ValueError):
    """A bad argument or an impossible computation; its message becomes the plugin's ``error:`` result."""


@dataclass(frozen=True)
class Plugin:
    """A named function with a JSON-schema-like description of its parameters."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[[dict[str, Any]], str] = field(repr=False)

    def schema(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def __call__(self, arguments: dict[str, Any]) -> str:
        try:
            return self.fn(_validate(self.parameters, arguments))
        except PluginError as err:
            return f"error: {err}"
        except Exception as err:  # a tool result the model reads, never a crash of the conversation
            return f"error: {self.name} failed: {type(err).__name__}: {err}"


_JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                            "boolean": (bool,), "object": (dict,), "array": (list,)}


def _validate(schema: dict[str, Any], arguments: Any) -> dict[str, Any]:
    """`arguments` with defaults filled in, or PluginError naming the first problem."""
    if not isinstance(arguments, dict):
        raise PluginError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    props: dict[str, dict[str, Any]] = schema.get("properties", {})
    unknown = sorted(set(arguments) - set(props))
    if unknown:
        raise PluginError(f"unknown argument(s) {unknown}; expected some of {sorted(props)}")
    missing = [k for k in schema.get("required", []) if k not in arguments]
    if missing:
        raise PluginError(f"missing required argument(s) {missing}")
    out = {k: spec["default"] for k, spec in props.items() if "default" in spec}
    for key, value in arguments.items():
        spec = props[key]
        kind = spec.get("type", "string")
        if isinstance(value, bool) and kind != "boolean" or not isinstance(value, _JSON_TYPES[kind]):
            raise PluginError(f"argument {key!r} must be a {kind}, got {type(value).__name__} {value!r}")
        if kind in ("integer", "number") and not math.isfinite(value):
            raise PluginError(f"argument {key!r} must be a finite number, got {value!r}")
        if "minimum" in spec and value < spec["minimum"] or "maximum" in spec and value > spec["maximum"]:
            raise PluginError(f"argument {key!r}={value!r} is outside [{spec.get('minimum')}, {spec.get('maximum')}]")
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------- calculator

MAX_EXPRESSION_CHARS = 500
MAX_RESULT_BITS = 4096  # ~1,233 decimal digits: more than any honest question needs, little enough to stay instant

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_SYMBOLS = {ast.BitXor: "^ (use ** for powers)", ast.BitAnd: "&", ast.BitOr: "|", ast.LShift: "<<", ast.RShift: ">>",
            ast.MatMult: "@"}


def _bits(x: Number) -> int:
    if isinstance(x, float):
        return 0
    return max(x.numerator.bit_length(), x.denominator.bit_length())


def _power(base: Number, exp: Number) -> Number:
    if isinstance(exp, Fraction) and exp.denominator == 1:
        n = exp.numerator
        if isinstance(base, Fraction) and base == 0 and n < 0:
            raise PluginError("division by zero: 0 raised to a negative power")
        if isinstance(base, Fraction) and abs(n) * max(_bits(base) - 1, 0) > MAX_RESULT_BITS or abs(n) > 100_000:
            raise PluginError(f"exponent {n} is too large: the result would exceed {MAX_RESULT_BITS} bits")
        return base**n
    if base < 0:
        raise PluginError("a negative number raised to a fractional power is not a real number")
    try:
        result = float(base) ** float(exp)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise PluginError("the result is too large for floating point")
    return result


def _apply(op: ast.operator, left: Number, right: Number) -> Number:
    if type(op) in _SYMBOLS:
        raise PluginError(f"operator {_SYMBOLS[type(op)]} is not supported")
    if isinstance(op, ast.Pow):
        return _power(left, right)
    if isinstance(op, ast.Div | ast.FloorDiv | ast.Mod) and right == 0:
        raise PluginError("division by zero")
    result = _BINARY[type(op)](left, right)
    if _bits(result) > MAX_RESULT_BITS:
        raise PluginError(f"the result exceeds {MAX_RESULT_BITS} bits")
    return result


def _evaluate(node: ast.AST) -> Number:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        # repr gives the shortest decimal that round-trips, so the literal 0.1 becomes exactly 1/10
        return Fraction(repr(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        return _apply(node.op, _evaluate(node.left), _evaluate(node.right))
    what = {ast.Name: "names", ast.Call: "function calls", ast.Attribute: "attributes", ast.Compare: "comparisons",
            ast.Subscript: "subscripts", ast.Constant: "non-numeric constants"}.get(type(node))
    what = what or f"{type(node).__name__} expressions"
    raise PluginError(f"{what} are not allowed: only numbers, + - * / // % ** and parentheses")


def format_number(x: Number, places: int = 10) -> str:
    """An exact integer or terminating decimal as is; anything else rounded to `places` decimals, zeros stripped."""
    if isinstance(x, Fraction) and x.denominator == 1:
        return str(x.numerator)
    if isinstance(x, Fraction) and _is_exact(x, places):
        return _decimal_string(x)
    rounded = round(Fraction(x), places)
    return _decimal_string(rounded) if rounded else "0"


def _is_exact(x: Fraction, places: int) -> bool:
    """Whether `x` is written exactly with at most `places` decimals."""
    return x.denominator == 1 or _terminates(x) and _decimals(x) <= places


def _terminates(x: Fraction) -> bool:
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _decimals(x: Fraction) -> int:
    n = 0
    while (x * 10**n).denominator != 1:
        n += 1
    return n


def _decimal_string(x: Fraction) -> str:
    n = _decimals(x)
    scaled = abs(x.numerator * 10**n // x.denominator)
    digits = str(scaled).rjust(n + 1, "0")
    text = digits if n == 0 else f"{digits[:-n]}.{digits[-n:]}"
    return ("-" if x < 0 else "") + text


def calculate(expression: str) -> Number:
    """The exact value of an arithmetic expression; PluginError on anything else."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise PluginError(f"expression is {len(expression)} characters long; at most {MAX_EXPRESSION_CHARS}")
    text = expression.replace("×", "*").replace("÷", "/").replace("−", "-").strip()
    if not text:
        raise PluginError("expression is empty")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as err:
        raise PluginError(f"cannot parse {expression!r}: {getattr(err, 'msg', err)}") from None
    return _evaluate(tree)


def _calculator(args: dict[str, Any]) -> str:
    value = calculate(args["expression"])
    text = format_number(value)
    if isinstance(value, float):
        return f"{text} (floating point, rounded to 10 decimal places)"
    if _is_exact(value, 10):
        return text
    return f"{text} (exactly {value.numerator}/{value.denominator}, rounded to 10 decimal places)"


CALCULATOR = Plugin(
    name="calculator",
    description="Evaluate an arithmetic expression exactly: numbers, + - * / // % ** and parentheses. "
                "Non-terminating fractions are rounded to 10 decimal places.",
    parameters={"type": "object",
                "properties": {"expression": {"type": "string", "description": "e.g. (12.5 * 4 - 3) / 7"}},
                "required": ["expression"]},
    fn=_calculator,
)


# ------------------------------------------------------------------------------------------- unit converter

# dimension, canonical unit, factor to the canonical unit, names
_UNIT_TABLE: list[tuple[str, str, Fraction, tuple[str, ...]]] = [
    ("length", "m", Fraction(1), ("m", "metre", "metres", "meter", "meters")),
    ("length", "km", Fraction(1000), ("km", "kilometre", "kilometres", "kilometer", "kilometers")),
    ("length", "cm", Fraction(1, 100), ("cm", "centimetre", "centimetres", "centimeter", "centimeters")),
    ("length", "mm", Fraction(1, 1000), ("mm", "millimetre", "millimetres", "millimeter", "millimeters")),
    ("length", "in", Fraction("0.0254"), ("in", "inch", "inches")),
    ("length", "ft", Fraction("0.3048"), ("ft", "foot", "feet")),
    ("length", "yd", Fraction("0.9144"), ("yd", "yard", "yards")),
    ("length", "mi", Fraction("1609.344"), ("mi", "mile", "miles")),
    ("length", "nmi", Fraction(1852), ("nmi", "nautical mile", "nautical miles")),
    ("mass", "kg", Fraction(1), ("kg", "kilogram", "kilograms")),
    ("mass", "g", Fraction(1, 1000), ("g", "gram", "grams")),
    ("mass", "mg", Fraction(1, 10**6), ("mg", "milligram", "milligrams")),
    ("mass", "t", Fraction(1000), ("t", "tonne", "tonnes", "metric ton", "metric tons")),
    ("mass", "lb", Fraction("0.45359237"), ("lb", "lbs", "pound", "pounds")),
    ("mass", "oz", Fraction("0.45359237") / 16, ("oz", "ounce", "ounces")),
    ("time", "s", Fraction(1), ("s", "sec", "second", "seconds")),
    ("time", "ms", Fraction(1, 1000), ("ms", "millisecond", "milliseconds")),
    ("time", "min", Fraction(60), ("min", "minute", "minutes")),
    ("time", "h", Fraction(3600), ("h", "hr", "hour", "hours")),
    ("time", "day", Fraction(86400), ("d", "day", "days")),
    ("time", "week", Fraction(604800), ("wk", "week", "weeks")),
    ("volume", "l", Fraction(1), ("l", "litre", "litres", "liter", "liters")),
    ("volume", "ml", Fraction(1, 1000), ("ml", "millilitre", "millilitres", "milliliter", "milliliters")),
    ("volume", "m3", Fraction(1000), ("m3", "m^3", "cubic metre", "cubic metres", "cubic meter", "cubic meters")),
    ("volume", "gal", Fraction("3.785411784"), ("gal", "gallon", "gallons", "us gallon", "us gallons")),
    ("volume", "qt", Fraction("3.785411784") / 4, ("qt", "quart", "quarts")),
    ("volume", "pt", Fraction("3.785411784") / 8, ("pt", "pint", "pints")),
    ("volume", "cup", Fraction("3.785411784") / 16, ("cup", "cups", "us cup", "us cups")),
    ("volume", "fl oz", Fraction("3.785411784") / 128, ("fl oz", "fluid ounce", "fluid ounces")),
]
# temperature: to kelvin is K = (value + offset) * scale
_TEMPERATURES: dict[str, tuple[Fraction, Fraction]] = {
    "C": (Fraction("273.15"), Fraction(1)), "K": (Fraction(0), Fraction(1)),
    "F": (Fraction("459.67"), Fraction(5, 9)),
}
_TEMPERATURE_NAMES = {"c": "C", "°c": "C", "degc": "C", "celsius": "C", "degrees celsius": "C", "k": "K",
                      "kelvin": "K", "f": "F", "°f": "F", "degf": "F", "fahrenheit": "F", "degrees fahrenheit": "F"}
UNITS: dict[str, tuple[str, str, Fraction]] = {
    alias: (dim, symbol, factor) for dim, symbol, factor, aliases in _UNIT_TABLE for alias in aliases
}


def _unit(name: str) -> tuple[str, str, Fraction | None]:
    key = " ".join(name.strip().lower().split())
    if key in _TEMPERATURE_NAMES:
        return "temperature", _TEMPERATURE_NAMES[key], None
    if key in UNITS:
        return UNITS[key]
    known = sorted({symbol for _, symbol, _, _ in _UNIT_TABLE} | set(_TEMPERATURES))
    raise PluginError(f"unknown unit {name!r}; known units: {', '.join(known)} (or their full names)")


def convert(value: Number, from_unit: str, to_unit: str) -> tuple[Fraction, str, str]:
    """(converted value, from symbol, to symbol); PluginError for unknown units or different dimensions."""
    (dim_a, sym_a, fac_a), (dim_b, sym_b, fac_b) = _unit(from_unit), _unit(to_unit)
    if dim_a != dim_b:
        raise PluginError(f"cannot convert {dim_a} ({sym_a}) to {dim_b} ({sym_b})")
    x = Fraction(repr(value)) if isinstance(value, float) else Fraction(value)
    if dim_a == "temperature":
        (off_a, scale_a), (off_b, scale_b) = _TEMPERATURES[sym_a], _TEMPERATURES[sym_b]
        kelvin = (x + off_a) * scale_a
        if kelvin < 0:
            raise PluginError(f"{format_number(x)} {_unit_label(sym_a)} is below absolute zero")
        return kelvin / scale_b - off_b, sym_a, sym_b
    assert fac_a is not None and fac_b is not None
    return x * fac_a / fac_b, sym_a, sym_b


def _unit_label(symbol: str) -> str:
    return f"°{symbol}" if symbol in ("C", "F") else symbol


def _unit_converter(args: dict[str, Any]) -> str:
    result, sym_a, sym_b = convert(args["value"], args["from_unit"], args["to_unit"])
    value = Fraction(repr(args["value"])) if isinstance(args["value"], float) else Fraction(args["value"])
    text = f"{format_number(value)} {_unit_label(sym_a)} = {format_number(result, 6)} {_unit_label(sym_b)}"
    return text if _is_exact(result, 6) else text + " (rounded to 6 decimal places)"


UNIT_CONVERTER = Plugin(
    name="unit_converter",
    description="Convert a value between units of length, mass, time, volume (US gallons) or temperature "
                "(C, F, K). Results are rounded to 6 decimal places.",
    parameters={"type": "object",
                "properties": {"value": {"type": "number", "description": "the amount to convert"},
                               "from_unit": {"type": "string", "description": "e.g. km, mi, lb, kg, F, C, gal"},
                               "to_unit": {"type": "string", "description": "the unit wanted"}},
                "required": ["value", "from_unit", "to_unit"]},
    fn=_unit_converter,
)


# ------------------------------------------------------------------------------------------- corpus search

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def _tokens(text: str) -> list[str]:
    return [t.lower() for t in _WORD.findall(text)]


@dataclass(frozen=True)
class BM25Index:
    """Okapi BM25 over whole documents (k1 1.5, b 0.75; IDF log(1 + (N − n + ½)/(n + ½)), never negative)."""

    ids: list[str]
    texts: list[str]
    counts: list[Counter[str]]
    lengths: list[int]
    df: Counter[str]
    k1: float = 1.5
    b: float = 0.75

    @classmethod
    def build(cls, docs: Sequence[tuple[str, str]], k1: float = 1.5, b: float = 0.75) -> BM25Index:
        if not docs:
            raise ValueError("corpus_search needs at least one (id, text) document")
        ids = [str(i) for i, _ in docs]
        if len(set(ids)) != len(ids):
            raise ValueError("corpus_search document ids must be unique")
        counts = [Counter(_tokens(t)) for _, t in docs]
        df: Counter[str] = Counter()
        for c in counts:
            df.update(c.keys())
        return cls(ids, [t for _, t in docs], counts, [sum(c.values()) for c in counts], df, k1, b)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """Indices and scores of the `k` best documents with a positive score, best first (ties by position)."""
        terms = set(_tokens(query))
        n, avg = len(self.ids), max(sum(self.lengths) / len(self.lengths), 1.0)
        scored = []
        for i, counts in enumerate(self.counts):
            score = 0.0
            for t in terms & counts.keys():
                idf = math.log(1 + (n - self.df[t] + 0.5) / (self.df[t] + 0.5))
                tf = counts[t]
                score += idf * tf * (self.k1 + 1) / (tf + self.k1 * (1 - self.b + self.b * self.lengths[i] / avg))
            if score > 0:
                scored.append((i, score))
        return sorted(scored, key=lambda s: (-s[1], s[0]))[:k]


def _title(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= 80 else line[:77] + "..."


def _snippet(text: str, query: str, width: int = 200) -> str:
    terms = set(_tokens(query))
    start = next((m.start() for m in _WORD.finditer(text) if m.group().lower() in terms), 0)
    lo = max(0, start - width // 4)
    piece = " ".join(text[lo: lo + width].split())
    return ("..." if lo else "") + piece + ("..." if lo + width < len(text) else "")


def make_search(docs: Sequence[tuple[str, str]], name: str = "corpus_search") -> Plugin:
    """A BM25 search plugin over `docs` (``(id, text)`` pairs)."""
    index = BM25Index.build(docs)

    def run(args: dict[str, Any]) -> str:
        query = args["query"]
        if not _tokens(query):
            raise PluginError("query has no words to search for")
        hits = index.search(query, args["top_k"])
        if not hits:
            return f"no documents match {query!r}"
        return "\n".join(f"{rank}. [{index.ids[i]}] {_title(index.texts[i])}\n   {_snippet(index.texts[i], query)}"
                         for rank, (i, _) in enumerate(hits, start=1))

    return Plugin(
        name=name,
        description=f"Search {len(docs)} documents by keywords (BM25); returns the best matches' ids, first lines "
                    "and snippets.",
        parameters={"type": "object",
                    "properties": {"query": {"type": "string", "description": "keywords"},
                                   "top_k": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3,
                                             "description": "how many results"}},
                    "required": ["query"]},
        fn=run,
    )


def corpus_docs(clean_url: str, limit: int | None = None) -> list[tuple[str, str]]:
    """``(id, text)`` of a cleaned corpus's documents — ``text/*.jsonl``, then the repository documents of
    ``code/*.jsonl`` — in file order, at most `limit`."""
    docs: list[tuple[str, str]] = []
    for kind in ("text", "code"):
        folder = storage.join(clean_url, kind)
        fs, path = storage.fs_for(folder)
        for url in storage.list_files(folder, "*.jsonl") if fs.isdir(path) else []:
            for line in storage.read_text(url).splitlines():
                if line.strip():
                    record = json.loads(line)
                    docs.append((str(record["id"]), str(record["text"])))
                    if limit is not None and len(docs) >= limit:
                        return docs
    if not docs:
        raise ValueError(f"no documents under {clean_url!r}: expected a cleaned corpus with text/*.jsonl")
    return docs


# ------------------------------------------------------------------------------------------- registry

PLUGINS: dict[str, Plugin] = {p.name: p for p in (CALCULATOR, UNIT_CONVERTER)}


def plugin_schemas(plugins: Iterable[str | Plugin]) -> str:
    """The JSON list of schemas that a ``system name=plugin`` turn carries, in the order given."""
    chosen = []
    for p in plugins:
        if isinstance(p, str):
            if p not in PLUGINS:
                raise ValueError(f"unknown plugin {p!r}; known: {sorted(PLUGINS)} (corpus_search: use make_search)")
            p = PLUGINS[p]
        chosen.append(p.schema())
    return json.dumps(chosen, ensure_ascii=False)
