"""Prefect tasks of the evaluation stage: build the eval sets, evaluate one checkpoint, keep the `champion` alias.

- ``eval-data``: the local sets (`tasks.evaluate.datasets`) from the cleaned corpus's **held-out** text (the share
  tokenization left out) plus a contamination check of every item against what trains (the rest of the cleaned
  text and code, and the SFT training chats when given). Counts go to MLflow (``contamination/<set>``) and
  ``contamination.json``.
- ``opencompass``: real OpenCompass over the sets a checkpoint gets (`tasks.evaluate.runner`); every number is logged
  on the evaluated model's own MLflow run when the caller names it (the phase's or SFT's child run), else on this
  stage's run; the summary CSV, scores JSON and the needle heatmap become artifacts and files under the output;
  a Prefect markdown artifact shows the table. Retries resume OpenCompass's run (same run id).
- ``resolve_checkpoint``: a ``models:/NAME@ALIAS`` checkpoint (e.g. the nightly schedule's
  ``models:/lmforge-chat@champion``) becomes the checkpoint URL that model version was registered with.
- ``champion``: registers the evaluated chat model as a new version of the registered model and moves the alias
  ``champion`` to it only when its ``eval/average`` beats the current champion's.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task

from infra import storage
from infra.settings import get_logger
from infra.tracking import RunRef, tracker_for
from tasks.reporting import stage_run, table_artifact
from tasks.stages import CACHE, IO_RETRIES

log = get_logger(__name__)

CHAMPION = "champion"
MODELS_SCHEME = "models:/"


def clean_text_docs(clean_url: str) -> Iterator[tuple[str, str, str]]:
    """(kind, id, text) of every cleaned text and code document under a corpus root."""
    from tasks.tokenize import document_text, input_shards, read_records

    for kind, url in input_shards(clean_url):
        for record in read_records(url, kind):
            text = document_text(record, kind)
            if text:
                yield kind, str(record["id"]), text


def build_eval_data(clean_url: str, out_url: str, cfg: Any, sft_train: str | None = None) -> dict[str, Any]:
    """Write the eval sets and their contamination report under `out_url`; returns the report."""
    from tasks.evaluate.datasets import build_eval_sets, contamination, eval_holdout, write_eval_sets

    docs = list(clean_text_docs(clean_url))
    held = [(i, t) for kind, i, t in docs if kind == "text" and eval_holdout(i, cfg.holdout_share)]
    trained = [t for kind, i, t in docs if not (kind == "text" and eval_holdout(i, cfg.holdout_share))]
    if not held:
        raise ValueError(f"{clean_url}: no held-out text documents at holdout_share={cfg.holdout_share}; "
                         f"raise it or pass a larger corpus")
    haystack = [(i, t) for kind, i, t in docs if kind == "text"]
    sets = build_eval_sets(held, cfg, haystack_docs=haystack)
    write_eval_sets(sets, out_url)
    if sft_train and storage.exists(sft_train):
        for line in storage.read_bytes(sft_train).decode("utf-8").splitlines():
            if line.strip():
                trained.append(" ".join(m.get("content") or "" for m in json.loads(line).get("messages", [])))
    report = contamination(sets, trained)
    storage.write_json(storage.join(out_url, "contamination.json"), report)
    log.info("eval sets from %d held-out documents (of %d); contamination: %s", len(held), len(docs),
             {k: v["contaminated"] for k, v in report.items()})
    return report


@task(name="eval-data", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def eval_data_task(clean_url: str, out_url: str, cfg: Any, parent: RunRef, sft_train: str | None = None) -> str:
    """The local eval sets and their contamination check; returns `out_url`."""
    with stage_run(parent, "eval/data", {"corpus": clean_url, **cfg.model_dump()}) as (tracker, ref):
        report = build_eval_data(clean_url, out_url, cfg, sft_train)
        tracker.log_metrics(ref, {f"contamination/{name}": float(r["contaminated"]) for name, r in report.items()})
        tracker.log_metrics(ref, {f"items/{name}": float(r["items"]) for name, r in report.items()})
        table_artifact("eval-data", [{"set": name, "items": r["items"], "contaminated": r["contaminated"]}
                                     for name, r in report.items()], f"evaluation sets at {out_url}")
    return out_url


def _work_dir(out_url: str) -> Path:
    """OpenCompass needs a local directory: the output itself when local, else a cache keyed by the output."""
    fs, path = storage.fs_for(out_url)
    if storage.is_local(fs):
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path)
    key = hashlib.sha1(out_url.encode()).hexdigest()[:16]
    local = Path(tempfile.gettempdir()) / "lmforge-eval" / key
    local.mkdir(parents=True, exist_ok=True)
    return local


def evaluate_checkpoint(
    checkpoint: str, tokenizer: str, data_url: str, out_url: str, *, chat: bool, run_cfg: Any,
    corpus: str | None = None, title: str = "", extra_paths: tuple[str, ...] = (),
) -> dict[str, Any]:
    """OpenCompass over `checkpoint`; writes ``scores.json``, ``summary.csv`` and ``needle.png`` under `out_url`."""
    from tasks.evaluate.datasets import read_eval_sets
    from tasks.evaluate.runner import (
        model_entry,
        needle_grid,
        needle_heatmap,
        read_summary,
        run_opencompass,
        sets_for,
        to_metrics,
    )

    fs, path = storage.fs_for(data_url)
    if storage.is_local(fs):
        data_url = str(Path(path).resolve())  # OpenCompass runs in another directory: absolute paths only
    manifest = read_eval_sets(data_url)
    by_name = {s["name"]: s for s in manifest["sets"]}
    names = sets_for(chat, list(by_name))
    if not names:
        raise ValueError(f"{data_url}: no eval sets for a {'chat' if chat else 'base'} model")
    paths = {name: storage.join(data_url, by_name[name]["path"]) for name in names}
    work = _work_dir(out_url)
    models = [model_entry(checkpoint, tokenizer, chat, run_cfg, corpus)]
    oc_run, summary_csv = run_opencompass(models, paths, chat, work, timeout_s=run_cfg.timeout_s,
                                          extra_paths=extra_paths, checkpoint=checkpoint)
    summary = read_summary(summary_csv, names)
    metrics = to_metrics(summary)
    result: dict[str, Any] = {"checkpoint": checkpoint, "chat": chat, "opencompass_run": oc_run,
                              "metrics": metrics, "summary": summary, "title": title}
    storage.write_bytes(storage.join(out_url, "summary.csv"), summary_csv.read_bytes())
    for name in ("needle", "needle_choice"):
        if name not in summary:
            continue
        grid_spec = by_name[name].get("grid") or {}
        lengths, depths = grid_spec.get("lengths", []), grid_spec.get("depths", [])
        grid = needle_grid(summary[name], lengths, depths)
        how = "generated answer" if name == "needle" else "choice by perplexity"
        png = needle_heatmap(grid, lengths, depths, work / f"{name}.png", f"needle ({how}): {title}")
        storage.write_bytes(storage.join(out_url, f"{name}.png"), png.read_bytes())
        result[name] = {"lengths": lengths, "depths": depths, "grid": grid}
    storage.write_json(storage.join(out_url, "scores.json"), result)
    return result


@task(name="opencompass", cache_policy=CACHE, persist_result=True, retries=1, retry_delay_seconds=5)
def evaluate_task(
    checkpoint: str, tokenizer: str, data_url: str, out_url: str, chat: bool, run_cfg: Any, parent: RunRef,
    model_run: RunRef | None = None, corpus: str | None = None, title: str = "",
) -> dict[str, Any]:
    """Evaluate one checkpoint with OpenCompass; a retry resumes OpenCompass's run instead of recomputing it."""
    from prefect.artifacts import create_markdown_artifact

    from tasks.evaluate.runner import markdown_report

    params = {"checkpoint": checkpoint, "chat": chat, "data": data_url, **run_cfg.model_dump()}
    with stage_run(parent, f"eval/{title or 'model'}", params) as (tracker, ref):
        result = evaluate_checkpoint(checkpoint, tokenizer, data_url, out_url, chat=chat, run_cfg=run_cfg,
                                     corpus=corpus, title=title)
        target = model_run if model_run is not None and model_run.enabled else ref
        tracker_for(target).log_metrics(target, result["metrics"])
        tracker_for(target).set_tags(target, {"lmforge.checkpoint": checkpoint, "lmforge.eval_run": ref.run_id})
        if target is not ref:
            tracker.log_metrics(ref, result["metrics"])
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("summary.csv", "scores.json", "needle.png", "needle_choice.png"):
                url = storage.join(out_url, name)
                if storage.exists(url):
                    local = Path(tmp) / name
                    local.write_bytes(storage.read_bytes(url))
                    tracker.log_artifact(ref, local, "eval")
                    if target is not ref:
                        tracker_for(target).log_artifact(target, local, "eval")
        contamination_url = storage.join(data_url, "contamination.json")
        contamination = storage.read_json(contamination_url) if storage.exists(contamination_url) else None
        report = markdown_report(f"OpenCompass: {title or checkpoint}", result["metrics"], contamination)
        try:
            create_markdown_artifact(report, key=f"eval-{title or 'model'}".replace("_", "-").lower(),
                                     description=f"OpenCompass results for {checkpoint}")
        except Exception as exc:  # outside a Prefect run there is nowhere to put it
            log.debug("no Prefect artifact: %s", exc)
    return {**result, "mlflow_run": target.run_id}


def resolve_checkpoint(tracking_uri: str, checkpoint: str) -> str:
    """The checkpoint URL behind a registry URI (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: the model
    version's ``source``, which `promote_champion` sets to the checkpoint URL); any other string is returned as is."""
    if not checkpoint.startswith(MODELS_SCHEME):
        return checkpoint
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, version = _parse_models_uri(checkpoint)
    client = MlflowClient(tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        raise ValueError(f"{checkpoint}: no registered model {name!r} in the MLflow registry at {tracking_uri} "
                         f"(register one with `lmforge eval … --chat --register-as {name}`)") from exc
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise ValueError(f"{checkpoint}: registered model {name!r} has no {what} at {tracking_uri}") from exc
    if not found.source or found.source.startswith(MODELS_SCHEME):
        raise ValueError(f"{checkpoint}: version {found.version} of {name!r} has source {found.source!r}, "
                         f"not a checkpoint URL")
    log.info("%s is version %s of %s: %s", checkpoint, found.version, name, found.source)
    return str(found.source)


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` → (NAME, ALIAS, None); ``models:/NAME/VERSION`` → (NAME, None, VERSION)."""
    rest = uri[len(MODELS_SCHEME):].strip("/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in name:
            return name, alias, None
    else:
        name, _, version = rest.partition("/")
        if name and version.isdigit():
            return name, None, version
    raise ValueError(f"{uri!r}: expected models:/NAME@ALIAS (e.g. models:/lmforge-chat@{CHAMPION}) or "
                     f"models:/NAME/VERSION")


def promote_champion(tracking_uri: str, model_name: str, checkpoint: str, run_id: str, score: float) -> dict[str, Any]:
    """Register `checkpoint` as a new version of `model_name`; move the ``champion`` alias to it only if `score`
    (its ``eval/average``) beats the current champion's. Returns what happened."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="lmforge chat models; alias `champion` = best so far")
    version = client.create_model_version(model_name, source=checkpoint, run_id=run_id or None,
                                          tags={"eval_average": f"{score:.6f}"})
    try:
        current = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        current = None
    best = float(current.tags.get("eval_average", "nan")) if current is not None else None
    promoted = best is None or best != best or round(score, 6) > best  # the tag holds 6 decimals: compare those
    if promoted:
        client.set_registered_model_alias(model_name, CHAMPION, version.version)
    log.info("%s version %s (eval/average %.2f): %s", model_name, version.version, score,
             f"now {CHAMPION}" if promoted else f"{CHAMPION} stays version {current.version} ({best:.2f})")
    return {"model": model_name, "version": int(version.version), "score": score, "promoted": promoted,
            "champion": int(version.version) if promoted else int(current.version), "previous_score": best}


@task(name="champion", cache_policy=CACHE, persist_result=True, retries=2, retry_delay_seconds=5)
def champion_task(tracking_uri: str, model_name: str, checkpoint: str, run_id: str, score: float) -> dict[str, Any]:
    """Register the evaluated chat model; cached on its inputs, so re-running a finished pipeline adds no version."""
    return promote_champion(tracking_uri, model_name, checkpoint, run_id, score)
