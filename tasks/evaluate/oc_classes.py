"""The classes OpenCompass builds by name from our config (`tasks.evaluate.oc_config`): the loader and evaluators.

- `LocalJSONL` loads one eval set (`tasks.evaluate.datasets`) from its URL; nothing is fetched. Cloze rows gain
  ``fill_A`` … ``fill_D``, the sentence with each option in the blank, so perplexity scores whole sentences.
- `AnswerEvaluator`: the stated final answer matches (`tasks.sft.generate` rules; a base model's bare continuation
  counts as its answer). `CodeEvaluator`: pass@1, the reply's code and the item's hidden tests run in our sandbox.
  `NeedleEvaluator`: the first number in the reply is the passphrase; one extra row per length × depth cell.
Each returns percentages and per-item ``details`` (OpenCompass keeps them in its results JSON).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any

import numpy as np
from datasets import Dataset
from opencompass.datasets.base import BaseDataset
from opencompass.openicl.icl_evaluator import BaseEvaluator

from infra import storage
from tasks.evaluate.oc_config import BLANK, LETTERS, needle_cell


class LocalJSONL(BaseDataset):
    """One eval set's JSONL (local or remote URL) as a `datasets.Dataset`; cloze rows gain the filled sentences."""

    @staticmethod
    def load(path: str, fill_blank: bool = False) -> Dataset:
        rows = [json.loads(line) for line in storage.read_bytes(path).decode("utf-8").splitlines() if line.strip()]
        if not rows:
            raise ValueError(f"{path}: no evaluation items")
        for row in rows:
            for key, value in list(row.items()):  # nested values (lists, dicts) travel as JSON text
                if isinstance(value, list | dict):
                    row[key] = json.dumps(value)
            if fill_blank:
                if BLANK not in row["question"]:
                    raise ValueError(f"{path}: cloze item {row.get('id')!r} has no {BLANK} blank")
                row.update({f"fill_{k}": row["question"].replace(BLANK, row[k], 1) for k in LETTERS})
        return Dataset.from_list(rows)


# ------------------------------------------------------------------------------------------- evaluators


def _stated_answer(prediction: str) -> str:
    """A chat reply's answer segment, or a base model's continuation's first line when it states none."""
    from tasks.sft.generate import _answer_segment

    if re.search(r"answer(?:\s+is)?\s*:?", prediction, re.IGNORECASE):
        return _answer_segment(prediction)
    lines = [line for line in prediction.splitlines() if line.strip()]
    return lines[0] if lines else ""


class AnswerEvaluator(BaseEvaluator):
    """Exact final answers (``tasks.sft.generate`` matching: case, spaces, separators normalised; one number compared
    by value)."""

    def score(self, predictions: list[str], references: list[str]) -> dict[str, Any]:
        from tasks.sft.generate import _matches

        if len(predictions) != len(references):
            return {"error": "predictions and references differ in length"}
        details = []
        for prediction, reference in zip(predictions, references, strict=True):
            segment = _stated_answer(prediction)
            details.append({"pred": prediction, "answer": reference, "segment": segment,
                            "correct": _matches(str(reference), segment)})
        return {"accuracy": 100.0 * float(np.mean([d["correct"] for d in details])), "details": details}


def extract_code(prediction: str) -> str:
    """The last fenced code block of a reply, else the reply itself (a base model continuing an open fence)."""
    blocks = re.findall(r"```(?:python|py)?[ \t]*\n(.*?)```", prediction, re.DOTALL)
    if blocks:
        return blocks[-1]
    return prediction.split("```", 1)[0]


class CodeEvaluator(BaseEvaluator):
    """pass@1 of greedy completions: the reply's code followed by the item's hidden tests, run in the sandbox."""

    def score(self, predictions: list[str], references: list[str], test_set: Any) -> dict[str, Any]:
        from tasks.sft.sandbox import run_python

        details = []
        for prediction, tests, row in zip(predictions, references, test_set, strict=True):
            code = extract_code(prediction)
            result = run_python(code + "\n\n" + tests)
            expect = row.get("expect")
            passed = result.ok and (expect is None or result.stdout.strip() == str(expect))
            details.append({"pred": prediction, "correct": passed, "stderr": result.stderr[-300:]})
        return {"pass@1": 100.0 * float(np.mean([d["correct"] for d in details])), "details": details}


class NeedleEvaluator(BaseEvaluator):
    """The first number in the reply must be the passphrase (generation), or the chosen option must be the planted
    number (``needle_choice``, by perplexity); accuracy overall and per length × depth cell."""

    def score(self, predictions: list[str], references: list[str], test_set: Any) -> dict[str, Any]:
        cells: dict[str, list[bool]] = defaultdict(list)
        details = []
        for prediction, answer, row in zip(predictions, references, test_set, strict=True):
            if str(answer) in LETTERS:  # the multiple-choice variant: OpenCompass predicts the option's letter
                correct = str(prediction).strip() == str(answer)
            else:
                found = re.findall(r"\d+", prediction)
                correct = bool(found) and found[0] == str(answer)
            cells[needle_cell(row["length"], row["depth"])].append(correct)
            details.append({"pred": prediction, "answer": answer, "correct": correct})
        out: dict[str, Any] = {"accuracy": 100.0 * float(np.mean([d["correct"] for d in details]))}
        out.update({cell: 100.0 * float(np.mean(hits)) for cell, hits in sorted(cells.items())})
        out["details"] = details
        return out
