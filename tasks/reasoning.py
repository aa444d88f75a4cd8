"""Reasoning data for the phase-3 capability mix: generated word problems with worked, checked solutions.

InternLM2's phase 3 mixes in mathematics and reasoning data we cannot download here, so we generate it: five
problem families (shopping totals with change, rates and times, unit conversions, linear equations, arithmetic
sequences) with randomised names, objects and numbers, each written as a problem followed by a step-by-step
solution and a final ``Answer: …`` line. Every number in a solution is computed by the generator, and `check`
re-derives the answer from the problem's numbers, so a wrong solution cannot be written. This teaches the shape of
multi-step reasoning; it is not a benchmark and is not drawn from any evaluation set.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

NAMES = ("Ada", "Bram", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena", "Mira",
         "Nils", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma", "Vera", "Wen", "Yusuf", "Zofia")
ITEMS = (("notebook", "notebooks"), ("apple", "apples"), ("pencil", "pencils"), ("ticket", "tickets"),
         ("loaf of bread", "loaves of bread"), ("bottle of water", "bottles of water"), ("book", "books"),
         ("cup of coffee", "cups of coffee"), ("bus pass", "bus passes"), ("plant", "plants"))
VEHICLES = ("train", "cyclist", "bus", "ferry", "runner", "car", "boat")
UNITS = (("kilometres", "metres", 1000), ("hours", "minutes", 60), ("kilograms", "grams", 1000),
         ("litres", "millilitres", 1000), ("minutes", "seconds", 60), ("metres", "centimetres", 100))


@dataclass(frozen=True)
class Problem:
    family: str
    question: str
    steps: list[str]
    answer: str
    numbers: dict[str, int | str]  # what `check` needs to recompute the answer

    def text(self) -> str:
        body = "\n".join(f"Step {i}: {s}" for i, s in enumerate(self.steps, start=1))
        return f"Problem: {self.question}\n\nSolution:\n{body}\nAnswer: {self.answer}\n"


def _money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def shopping(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    (one_a, many_a), (one_b, many_b) = rng.sample(ITEMS, 2)
    qa, qb = rng.randint(2, 9), rng.randint(2, 9)
    pa, pb = rng.randint(50, 900), rng.randint(50, 900)
    total = qa * pa + qb * pb
    paid = (total // 1000 + 1) * 1000 + rng.choice((0, 1000))
    steps = [f"{qa} {many_a} at {_money(pa)} each cost {qa} × {_money(pa)} = {_money(qa * pa)}.",
             f"{qb} {many_b} at {_money(pb)} each cost {qb} × {_money(pb)} = {_money(qb * pb)}.",
             f"Together: {_money(qa * pa)} + {_money(qb * pb)} = {_money(total)}.",
             f"Change from {_money(paid)}: {_money(paid)} − {_money(total)} = {_money(paid - total)}."]
    question = (f"{name} buys {qa} {many_a} at {_money(pa)} each and {qb} {many_b} at {_money(pb)} each, and pays "
                f"with {_money(paid)}. How much change does {name} get?")
    return Problem("shopping", question, steps, _money(paid - total),
                   {"qa": qa, "pa": pa, "qb": qb, "pb": pb, "paid": paid})


def rate_time(rng: random.Random) -> Problem:
    vehicle = rng.choice(VEHICLES)
    speed = rng.randint(4, 120)
    hours, minutes = rng.randint(1, 6), rng.choice((0, 15, 20, 30, 40, 45))
    total_minutes = 60 * hours + minutes
    distance = Fraction(speed * total_minutes, 60)
    steps = [f"{hours} h {minutes} min is {hours} × 60 + {minutes} = {total_minutes} minutes.",
             f"In hours: {total_minutes} / 60 = {_frac(Fraction(total_minutes, 60))} h.",
             f"Distance = speed × time = {speed} × {_frac(Fraction(total_minutes, 60))} = {_frac(distance)} km."]
    question = (f"A {vehicle} travels at a steady {speed} km/h for {hours} hours and {minutes} minutes. "
                "How far does it go?")
    return Problem("rate_time", question, steps, f"{_frac(distance)} km",
                   {"speed": speed, "minutes": total_minutes})


def _frac(x: Fraction) -> str:
    if x.denominator == 1:
        return str(x.numerator)
    return f"{float(x):.4f}".rstrip("0").rstrip(".")


def conversion(rng: random.Random) -> Problem:
    big, small, factor = rng.choice(UNITS)
    whole, part = rng.randint(1, 40), rng.randint(1, factor - 1)
    total = whole * factor + part
    steps = [f"1 {big[:-1] if big.endswith('s') else big} is {factor} {small}.",
             f"{whole} {big} is {whole} × {factor} = {whole * factor} {small}.",
             f"Adding {part} {small}: {whole * factor} + {part} = {total} {small}."]
    question = f"How many {small} are there in {whole} {big} and {part} {small}?"
    return Problem("conversion", question, steps, f"{total} {small}",
                   {"whole": whole, "part": part, "factor": factor, "unit": small})


def linear(rng: random.Random) -> Problem:
    a = rng.choice([k for k in range(-9, 10) if k not in (0, 1)])
    x = rng.randint(-20, 20)
    b = rng.randint(-50, 50)
    c = a * x + b
    sign = "+" if b >= 0 else "−"
    steps = [f"Subtract {b} from both sides: {a}x = {c} − ({b}) = {c - b}.",
             f"Divide both sides by {a}: x = {c - b} / {a} = {x}.",
             f"Check: {a} × {x} {sign} {abs(b)} = {a * x + b}, which is {c}."]
    return Problem("linear", f"Solve for x: {a}x {sign} {abs(b)} = {c}.", steps, f"x = {x}",
                   {"a": a, "b": b, "c": c})


def sequence(rng: random.Random) -> Problem:
    first, step, n = rng.randint(-30, 30), rng.choice([k for k in range(-12, 13) if k]), rng.randint(8, 60)
    shown = [first + step * k for k in range(4)]
    nth = first + step * (n - 1)
    steps = [f"Consecutive terms differ by {shown[1]} − {shown[0]} = {step}.",
             f"The n-th term is {first} + (n − 1) × {step}.",
             f"For n = {n}: {first} + {n - 1} × {step} = {nth}."]
    question = f"The sequence {', '.join(map(str, shown))}, … goes up by the same amount each time. What is term {n}?"
    return Problem("sequence", question, steps, str(nth), {"first": first, "step": step, "n": n})


FAMILIES: dict[str, Callable[[random.Random], Problem]] = {
    "shopping": shopping, "rate_time": rate_time, "conversion": conversion, "linear": linear, "sequence": sequence,
}


def check(problem: Problem) -> bool:
    """Recompute the answer from the problem's numbers alone."""
    v = problem.numbers
    expected = {
        "shopping": lambda: _money(int(v["paid"]) - int(v["qa"]) * int(v["pa"]) - int(v["qb"]) * int(v["pb"])),
        "rate_time": lambda: f"{_frac(Fraction(int(v['speed']) * int(v['minutes']), 60))} km",
        "conversion": lambda: f"{int(v['whole']) * int(v['factor']) + int(v['part'])} {v['unit']}",
        "linear": lambda: f"x = {Fraction(int(v['c']) - int(v['b']), int(v['a']))}",
        "sequence": lambda: str(int(v["first"]) + int(v["step"]) * (int(v["n"]) - 1)),
    }[problem.family]()
    return expected == problem.answer


def generate(n: int, seed: int = 0) -> list[Problem]:
    """`n` problems, families in turn, deterministic for a seed; every one passes `check`."""
    if n < 0:
        raise ValueError(f"n={n}: expected a number of problems >= 0")
    rng = random.Random(seed)
    names = sorted(FAMILIES)
    problems = [FAMILIES[names[i % len(names)]](rng) for i in range(n)]
    wrong = [p for p in problems if not check(p)]
    if wrong:
        raise AssertionError(f"generator bug: {len(wrong)} problems fail their check, e.g. {wrong[0]}")
    return problems
