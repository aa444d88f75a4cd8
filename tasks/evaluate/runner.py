"""Run real OpenCompass on one checkpoint and turn its summary into metrics, a heatmap and a report.

- **Where it runs**: a child process, ``python -m opencompass.cli.main CONFIG --debug -w WORK -r RUN_ID``, from a
  scratch directory (OpenCompass writes ``tmp/`` into its working directory). ``--debug`` runs every task inside
  that process, so an exception in a model or an evaluator ends it with a non-zero status and its traceback, which
  becomes our error (plain CLI mode would log the failure and exit 0). The process gets the hub variables set to
  offline, so nothing it imports may reach the network.
- **Resume**: the run id is a hash of what decides the result (checkpoint files, eval sets, prompts, model
  settings). Re-running the same evaluation, as a Prefect retry does, reuses OpenCompass's finished predictions
  (``predictions/<model>/<set>.json``) and only computes what is missing.
- **Checks**: the summary CSV must have a number in every (set, metric) cell the sets promise; a ``-`` (a task
  that produced nothing) is an error naming the cell, never a silent gap.
- **Metrics**: ``eval/<group>/<set>`` (each set's primary metric, in percent), ``eval/<group>/<set>/<metric>``
  for the rest (the needle's length × depth cells), ``eval/<group>`` (mean of the group's sets) and
  ``eval/average`` (mean of the groups evaluated: the headline).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from infra import storage
from infra.settings import get_logger
from tasks.evaluate.oc_config import PRIMARY_METRIC, needle_cell, opencompass_config

log = get_logger(__name__)

GROUP_OF = {"knowledge_cloze": "knowledge", "language_continuation": "language", "math_word": "reasoning",
            "code_functions": "coding", "needle": "long_context", "needle_choice": "long_context",
            "tool_math": "tool_use"}
BASE_SETS = ("knowledge_cloze", "language_continuation", "math_word", "code_functions", "needle", "needle_choice")
CHAT_SETS = (*BASE_SETS, "tool_math")
MODEL_ABBR = "lmforge"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_EVALUATE_OFFLINE": "1", "DATASET_SOURCE": "Local", "TOKENIZERS_PARALLELISM": "false"}


class EvaluationError(RuntimeError):
    """OpenCompass failed, or its summary lacks a cell; the message carries the cause."""


class EvalRunConfig(BaseModel):
    """How one checkpoint is evaluated."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int = Field(8, ge=1, description="prompts per forward pass")
    max_seq_len: int = Field(4096, ge=16, description="longest prompt + answer, in tokens; longer ones are cut left")
    max_tool_rounds: int = Field(2, ge=0, description="tool calls a chat model may make per tool-use item")
    timeout_s: int = Field(3600, ge=10, description="wall-clock limit of the OpenCompass process")
    model_class: str = Field("tasks.evaluate.oc_model.LMForgeModel",
                             description="OpenCompass model type (dotted path); tests swap in fixtures")
    extra_model_args: dict[str, Any] = Field(default_factory=dict, description="more keyword arguments for it")


def sets_for(chat: bool, available: Sequence[str]) -> list[str]:
    """The eval sets a checkpoint gets: everything for a chat model, all but tool use for a base model."""
    wanted = CHAT_SETS if chat else BASE_SETS
    return [name for name in wanted if name in available]


def model_entry(checkpoint: str, tokenizer: str, chat: bool, cfg: EvalRunConfig, corpus: str | None) -> dict[str, Any]:
    """The OpenCompass model dict for one of our checkpoints."""
    entry: dict[str, Any] = {"abbr": MODEL_ABBR, "type": cfg.model_class, "path": checkpoint,
                             "tokenizer_path": tokenizer, "chat": chat, "max_seq_len": cfg.max_seq_len,
                             "batch_size": cfg.batch_size, "run_cfg": {"num_gpus": 0}}
    if chat:
        entry.update({"max_tool_rounds": cfg.max_tool_rounds, "corpus": corpus})
    entry.update(cfg.extra_model_args)
    return entry


def _digest(url: str) -> str:
    """A content hash of a file or of a directory's files (names and bytes)."""
    h = hashlib.sha256()
    fs, path = storage.fs_for(url)
    files = storage.list_files(url, "*") if fs.isdir(path) else [url]
    for f in sorted(files):
        h.update(f.rsplit("/", 1)[-1].encode())
        h.update(storage.read_bytes(f))
    return h.hexdigest()


def run_id_for(checkpoint: str, sets: Mapping[str, str], config_text: str) -> str:
    """OpenCompass's ``-r`` id: the same checkpoint, sets and config give the same id, so a retry resumes."""
    h = hashlib.sha256(_digest(checkpoint).encode())
    for name, path in sorted(sets.items()):
        h.update(name.encode())
        h.update(_digest(path).encode())
    h.update(config_text.encode())
    return "run-" + h.hexdigest()[:16]


def _env(extra_paths: Sequence[str]) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV}
    root = str(Path(__file__).resolve().parents[2])  # the repository (an editable install finds it anyway)
    env["PYTHONPATH"] = os.pathsep.join([*extra_paths, root, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def run_opencompass(
    models: list[dict[str, Any]], sets: Mapping[str, str], chat: bool, work_dir: Path, *, timeout_s: int = 3600,
    run_id: str | None = None, extra_paths: Sequence[str] = (), checkpoint: str | None = None,
) -> tuple[str, Path]:
    """Run OpenCompass over `models` × `sets` in `work_dir`; returns (run id, the summary CSV). Raises
    `EvaluationError` with the log's tail when it fails."""
    work_dir = Path(work_dir).resolve()
    text = opencompass_config(models, dict(sets), chat)
    run_id = run_id or run_id_for(checkpoint or models[0]["path"], sets, text)
    configs = work_dir / "configs"
    configs.mkdir(parents=True, exist_ok=True)
    config_path = configs / f"{run_id}.py"
    config_path.write_text(text)
    scratch = work_dir / "scratch"
    scratch.mkdir(exist_ok=True)
    log_path = work_dir / f"{run_id}.log"
    cmd = [sys.executable, "-m", "opencompass.cli.main", str(config_path), "--debug", "-w", str(work_dir / "oc"),
           "-r", run_id]
    resumed = (work_dir / "oc" / run_id / "predictions").exists()
    log.info("OpenCompass %s (%s): %s", run_id, "resuming" if resumed else "new", " ".join(cmd))
    with open(log_path, "ab") as out:
        try:
            proc = subprocess.run(cmd, cwd=scratch, env=_env(extra_paths), stdout=out, stderr=subprocess.STDOUT,
                                  timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as err:
            raise EvaluationError(f"OpenCompass {run_id} ran past {timeout_s} s; its log: {log_path}") from err
    if proc.returncode != 0:
        raise EvaluationError(f"OpenCompass {run_id} failed (exit {proc.returncode}); log {log_path}:\n"
                              f"{_tail(log_path)}")
    summaries = sorted((work_dir / "oc" / run_id / "summary").glob("summary_*.csv"))
    if not summaries:
        raise EvaluationError(f"OpenCompass {run_id} wrote no summary; log {log_path}:\n{_tail(log_path)}")
    return run_id, summaries[-1]


def _tail(path: Path, lines: int = 40) -> str:
    """The traceback's end (the cause) and what preceded it."""
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def read_summary(csv_path: Path, sets: Sequence[str], model_abbr: str = MODEL_ABBR) -> dict[str, dict[str, float]]:
    """{set: {metric: value}} from OpenCompass's summary CSV; a missing set, metric or value raises."""
    table: dict[str, dict[str, float]] = {}
    missing = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            value = row.get(model_abbr, "-")
            try:
                number = float(value)
            except (TypeError, ValueError):
                missing.append(f"{row['dataset']}/{row['metric']}={value!r}")
                continue
            table.setdefault(row["dataset"], {})[row["metric"]] = number
    for name in sets:
        if PRIMARY_METRIC[name] not in table.get(name, {}):
            missing.append(f"{name}/{PRIMARY_METRIC[name]}")
    if missing:
        raise EvaluationError(f"{csv_path}: OpenCompass summary has no value for {', '.join(missing)}")
    return table


def to_metrics(summary: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """MLflow metrics from a summary (see the module docstring)."""
    metrics: dict[str, float] = {}
    groups: dict[str, list[float]] = {}
    for name, values in summary.items():
        group = GROUP_OF[name]
        primary = values[PRIMARY_METRIC[name]]
        metrics[f"eval/{group}/{name}"] = primary
        groups.setdefault(group, []).append(primary)
        for metric, value in values.items():
            if metric != PRIMARY_METRIC[name]:
                metrics[f"eval/{group}/{name}/{metric}"] = value
    for group, values in groups.items():
        metrics[f"eval/{group}"] = sum(values) / len(values)
    if groups:
        metrics["eval/average"] = sum(metrics[f"eval/{g}"] for g in groups) / len(groups)
    return metrics


def needle_grid(values: Mapping[str, float], lengths: Sequence[int], depths: Sequence[float]) -> list[list[float]]:
    """Needle accuracy as rows = depths, columns = lengths (NaN for a cell the summary lacks)."""
    return [[values.get(needle_cell(length, depth), float("nan")) for length in lengths] for depth in depths]


def needle_heatmap(grid: list[list[float]], lengths: Sequence[int], depths: Sequence[float], path: Path,
                   title: str) -> Path:
    """The needle-in-a-haystack heatmap: depth (rows) × haystack length in tokens (columns), accuracy in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(lengths), 1.0 + 0.6 * len(depths)))
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("haystack length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, "–" if value != value else f"{value:.0f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy %")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_report(title: str, metrics: Mapping[str, float], contamination: Mapping[str, Any] | None) -> str:
    """The Prefect artifact: one row per set, group means, the headline, and contamination counts."""
    lines = [f"# {title}", "", "| group | set | score |", "| --- | --- | ---: |"]
    for key in sorted(k for k in metrics if k.count("/") == 2):
        _, group, name = key.split("/")
        lines.append(f"| {group} | {name} | {metrics[key]:.1f} |")
    for key in sorted(k for k in metrics if k.count("/") == 1 and k != "eval/average"):
        lines.append(f"| {key.split('/')[1]} | *mean* | {metrics[key]:.1f} |")
    if "eval/average" in metrics:
        lines.append(f"| **average** | | **{metrics['eval/average']:.1f}** |")
    if contamination:
        lines += ["", "Contamination (items whose n-grams mostly occur in the training data):", ""]
        lines += [f"- {name}: {c['contaminated']} of {c['items']}" for name, c in contamination.items()]
    return "\n".join(lines) + "\n"


def save_json(url: str, value: Any) -> None:
    storage.write_text(url, json.dumps(value, indent=2, sort_keys=True))
