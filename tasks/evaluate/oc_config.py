"""The OpenCompass config that ties our models to the local eval sets (pure text; nothing of OpenCompass imported).

OpenCompass builds everything from a config by dotted type names; the classes it names live in
`tasks.evaluate.oc_classes` and are imported inside its tasks (in the evaluation subprocess, `tasks.evaluate.runner`):

- `LocalJSONL`: loads one of our eval sets (`tasks.evaluate.datasets`) from an **absolute** path; nothing is fetched.
  For cloze items it adds ``fill_A`` … ``fill_D``, the sentence with each option put in the blank, so the
  perplexity comparison scores whole sentences (a blank's neighbours matter as much as the word).
- Evaluators, each returning percentages and per-item ``details``:
  `AnswerEvaluator` (the stated final answer matches: `tasks.sft.generate` rules; a base model's bare continuation
  counts as its answer), `CodeEvaluator` (pass@1: the reply's code and the hidden tests run in our sandbox),
  `NeedleEvaluator` (the passphrase's digits; one extra row per length × depth cell for the heatmap).
- `opencompass_config`: the Python config text for a list of models over a list of sets. Base models get
  completion prompts ("Question: …\\nAnswer:"); chat models get user turns and, for the tool-use set, a system turn
  holding `TOOLS_MARKER`, which `LMForgeModel` expands to the tool declarations SFT trained on. Multiple choice is
  scored by perplexity (`PPLInferencer`: the option whose text has the lowest mean token loss), everything else by
  greedy generation (`GenInferencer`).
"""

from __future__ import annotations

from typing import Any

LETTERS = ("A", "B", "C", "D")
BLANK = "____"
TOOLS_MARKER = "@lmforge-tools"  # LMForgeModel replaces a system turn holding exactly this with the tool declarations
_PKG = "tasks.evaluate.oc_classes"
_PROMPT = "opencompass.openicl.icl_prompt_template.PromptTemplate"
_ZERO = "opencompass.openicl.icl_retriever.ZeroRetriever"
_PPL = "opencompass.openicl.icl_inferencer.PPLInferencer"
_GEN = "opencompass.openicl.icl_inferencer.GenInferencer"
_ACC = "opencompass.openicl.icl_evaluator.AccEvaluator"


# ------------------------------------------------------------------------------------------- the config

def needle_cell(length: int, depth: float) -> str:
    return f"len{int(length)}_depth{int(round(float(depth) * 100)):03d}"


PRIMARY_METRIC = {"knowledge_cloze": "accuracy", "language_continuation": "accuracy", "math_word": "accuracy",
                  "code_functions": "pass@1", "needle": "accuracy", "needle_choice": "accuracy",
                  "tool_math": "accuracy"}
MAX_OUT = {"math_word": 96, "code_functions": 160, "needle": 12, "tool_math": 96}


def _template(round_: list[dict[str, str]], begin: list[dict[str, str]] | None = None) -> dict[str, Any]:
    template: dict[str, Any] = {"round": round_}
    if begin:
        template["begin"] = begin
    return {"type": _PROMPT, "template": template}


def _ppl(options: dict[str, str]) -> dict[str, Any]:
    return {"prompt_template": {"type": _PROMPT, "template": options}, "retriever": {"type": _ZERO},
            "inferencer": {"type": _PPL}}


def _gen(template: dict[str, Any], max_out: int) -> dict[str, Any]:
    return {"prompt_template": template, "retriever": {"type": _ZERO},
            "inferencer": {"type": _GEN, "max_out_len": max_out}}


def dataset_config(name: str, path: str, chat: bool) -> dict[str, Any]:
    """One OpenCompass dataset entry for eval set `name` at `path`, prompted for a chat or a base model."""
    human = "HUMAN"
    if name == "knowledge_cloze":
        reader = {"input_columns": [f"fill_{k}" for k in LETTERS], "output_column": "answer"}
        infer = _ppl({k: f"{{fill_{k}}}" for k in LETTERS})
        evaluator = {"type": _ACC}
    elif name == "language_continuation":
        reader = {"input_columns": ["context", *LETTERS], "output_column": "answer"}
        infer = _ppl({k: f"{{context}} {{{k}}}" for k in LETTERS})
        evaluator = {"type": _ACC}
    elif name in ("math_word", "tool_math"):
        reader = {"input_columns": ["question"], "output_column": "answer"}
        prompt = "{question}" if chat else "Question: {question}\nAnswer:"
        begin = [{"role": "SYSTEM", "prompt": TOOLS_MARKER}] if name == "tool_math" and chat else None
        infer = _gen(_template([{"role": human, "prompt": prompt}], begin), MAX_OUT[name])
        evaluator = {"type": f"{_PKG}.AnswerEvaluator"}
    elif name == "code_functions":
        reader = {"input_columns": ["question"], "output_column": "tests"}
        prompt = "{question}" if chat else "{question}\n```python\n"
        infer = _gen(_template([{"role": human, "prompt": prompt}]), MAX_OUT[name])
        evaluator = {"type": f"{_PKG}.CodeEvaluator"}
    elif name == "needle":
        reader = {"input_columns": ["context", "question"], "output_column": "answer"}
        prompt = "{context}\n\n{question}" if chat else "{context}\n\nQuestion: {question}\nAnswer:"
        infer = _gen(_template([{"role": human, "prompt": prompt}]), MAX_OUT[name])
        evaluator = {"type": f"{_PKG}.NeedleEvaluator"}
    elif name == "needle_choice":
        reader = {"input_columns": ["prompt", *LETTERS], "output_column": "answer"}
        infer = _ppl({k: f"{{prompt}} {{{k}}}." for k in LETTERS})
        evaluator = {"type": f"{_PKG}.NeedleEvaluator"}
    else:
        raise ValueError(f"eval set {name!r}: expected one of {sorted(PRIMARY_METRIC)}")
    return {"abbr": name, "type": f"{_PKG}.LocalJSONL", "path": path, "fill_blank": name == "knowledge_cloze",
            "reader_cfg": reader, "infer_cfg": infer, "eval_cfg": {"evaluator": evaluator}}


def opencompass_config(models: list[dict[str, Any]], sets: dict[str, str], chat: bool) -> str:
    """The config file's text: `models` (OpenCompass model dicts) × `sets` (name → absolute path)."""
    datasets = [dataset_config(name, path, chat) for name, path in sets.items()]
    return (f"# written by lmforge (tasks.evaluate.oc_config); OpenCompass reads it with Config.fromfile\n"
            f"datasets = {datasets!r}\nmodels = {models!r}\n")
