"""Prefect tasks for the pipeline's stages: thin wrappers that add retries, caching, MLflow child runs and artifacts.

Caching is keyed on the task's source and its inputs except the MLflow parent run (a new one each pipeline run), so a
re-run with the same parameters skips finished stages. Training stages resume from their last checkpoint on a retry.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from infra import storage
from infra.settings import get_logger
from infra.tracking import RunRef
from model.config import ModelConfig
from tasks.corpus import build_corpus, corpus_config
from tasks.reporting import PrefectProgress, log_loss_plot, stage_run, table_artifact

log = get_logger(__name__)

CACHE = TASK_SOURCE + INPUTS - "parent"


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O and crashes; a ValueError is the user's input or parameters, and retrying cannot fix it."""
    try:
        state.result()
    except ValueError:
        return False
    except BaseException:
        return True
    return True


IO_RETRIES = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": retry_unless_user_error}


@task(name="build-corpus", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def corpus_task(out_url: str, preset: str, parent: RunRef) -> str:
    """The built-in corpus for a preset; returns the corpus URL."""
    config = corpus_config(preset)
    with stage_run(parent, "corpus", {"preset": preset, **vars(config)}) as (tracker, ref):
        manifest = build_corpus(out_url, config)
        counts = {f"docs/{source}": n for source, n in manifest.docs_per_source.items()}
        tracker.log_metrics(ref, {**counts, "code_files": manifest.code_files, "bytes": manifest.total_bytes})
        rows = [{"source": s, "documents": n} for s, n in sorted(manifest.docs_per_source.items())]
        table_artifact("corpus", [*rows, {"source": "code (stdlib)", "documents": manifest.code_files}],
                       f"built-in corpus at {out_url}")
    return out_url


@task(name="train-tokenizer", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def tokenizer_task(corpus_url: str, out_url: str, vocab_size: int, sample_bytes: int, parent: RunRef) -> str:
    """BPE on a sample of the corpus; returns the tokenizer.json URL."""
    from tasks.tokenize import train_tokenizer

    params = {"vocab_size": vocab_size, "sample_bytes": sample_bytes, "corpus": corpus_url}
    with stage_run(parent, "tokenizer", params) as (tracker, ref):
        url = train_tokenizer(corpus_url, out_url, vocab_size, sample_bytes=sample_bytes)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "tokenizer.json"
            local.write_bytes(storage.read_bytes(url))
            tracker.log_artifact(ref, local, "tokenizer")
    return url


@task(name="tokenize", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def tokenize_task(corpus_url: str, tokenizer_url: str, out_url: str, parent: RunRef, holdout: float = 0.0) -> str:
    """Token shards for every corpus shard (less the evaluation's held-out text share); returns the manifest URL."""
    from tasks.tokenize import token_manifest_url, tokenize_corpus

    params = {"corpus": corpus_url, "tokenizer": tokenizer_url, "holdout": holdout}
    with stage_run(parent, "tokenize", params) as (tracker, ref):
        manifest = tokenize_corpus(corpus_url, tokenizer_url, out_url, holdout=holdout)
        per_kind = {f"tokens/{kind}": n for kind, n in manifest.tokens_per_kind.items()}
        held = sum(s.held_out for s in manifest.shards)
        tracker.log_metrics(ref, {"tokens": manifest.n_tokens, "documents": manifest.n_docs, "held_out": held,
                                  **per_kind})
        rows = [{"shard": s.tokens, "kind": s.kind, "documents": s.n_docs, "tokens": s.n_tokens}
                for s in manifest.shards]
        table_artifact("token-shards", rows, f"token shards at {out_url}")
    return token_manifest_url(out_url)


@task(name="pretrain-phase", cache_policy=CACHE, persist_result=True, **{**IO_RETRIES, "retry_delay_seconds": 10})
def phase_task(
    spec: Any, model_config: dict[str, Any], tokens_manifest: str, out_url: str, init: str | None,
    mix: dict[str, Any], parent: RunRef, cold_url: str | None = None,
) -> dict[str, Any]:
    """One pretraining phase; a retry resumes from the phase's last checkpoint. ``cold_url``: where each checkpoint is
    also uploaded as it is saved (cold storage)."""
    from model.probes import probe_metrics
    from tasks.phases import phase_documents
    from tasks.pretrain import run_phase
    from tasks.tokenize import local_shards

    config = ModelConfig.from_dict(model_config)
    vocab = storage.read_json(tokens_manifest)["vocab_size"]
    if vocab != config.vocab_size:
        raise ValueError(f"{tokens_manifest}: token shards use a {vocab}-token vocabulary, the {spec.name} model has "
                         f"vocab_size={config.vocab_size}; tokenize with the preset's tokenizer")
    params = {"phase": spec.model_dump() if hasattr(spec, "model_dump") else vars(spec), "model": model_config,
              "mix": mix, "init": init or "random"}
    with stage_run(parent, f"pretrain/{spec.name}", params, output=out_url) as (tracker, ref):
        shards = local_shards(tokens_manifest, _cache_dir(tokens_manifest))
        doc_ids, shares = phase_documents(tokens_manifest, shards, spec, mix)
        tracker.log_metrics(ref, shares)
        result = run_phase(spec, config, shards, doc_ids, out_url, init_weights=init, cold_url=cold_url,
                           mlflow=(ref.tracking_uri, ref.run_id) if ref.enabled else None,
                           callbacks=[PrefectProgress(key=f"pretrain-{spec.name}-progress".replace("_", "-"))])
        log_loss_plot(tracker, ref, result.losses, f"{spec.name}: train loss")
        tracker.log_metrics(ref, probe_metrics(result.copy_probe))
        table_artifact(f"pretrain-{spec.name}".replace("_", "-"), [_result_row(spec.name, result)],
                       f"pretraining phase {spec.name}")
    return {**result.model_dump(), "run_id": ref.run_id}  # the model's MLflow run: its evaluation goes there


def _result_row(name: str, result: Any) -> dict[str, Any]:
    return {"phase": name, "steps": result.steps, "tokens": result.tokens, "first loss": round(result.first_loss, 4),
            "final loss": round(result.final_loss, 4), "seconds": round(result.seconds, 1),
            "copy gain": round(result.copy_probe["gain"], 3) if result.copy_probe else None}


def _cache_dir(url: str) -> Path:
    """A local cache for remote token shards (a local manifest's shards are read in place)."""
    import hashlib

    key = hashlib.sha1(url.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "lmforge-cache" / key


@task(name="export-hf", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def export_task(native_url: str, tokenizer_url: str, out_url: str, parent: RunRef) -> str:
    """The final checkpoint as a transformers-loadable Llama directory under ``out_url``."""
    from model.checkpoint import export_hf, load_model

    with stage_run(parent, "export", {"checkpoint": native_url, "tokenizer": tokenizer_url}) as (tracker, ref):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = Path(tmp) / "ckpt"
            storage.download_dir(native_url, str(ckpt))
            tok = Path(tmp) / "tokenizer.json"
            tok.write_bytes(storage.read_bytes(tokenizer_url))
            out = export_hf(load_model(ckpt), Path(tmp) / "hf", tokenizer_file=tok)
            storage.upload_dir(str(out), out_url)
            tracker.log_artifact(ref, out, "hf")
    return out_url


def reuse_if_present(stage: Any, output_marker: str) -> Any:
    """``stage`` set to refresh its cache when its output is gone (a cache hit must never point at deleted files)."""
    return stage.with_options(refresh_cache=not storage.exists(output_marker))


# ------------------------------------------------------------------------------------------- text cleaning


@task(name="clean-rules", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def clean_rules_task(raw_url: str, name: str, out_url: str, rules: str, version: str) -> dict[str, Any]:
    """Parse, normalise, rules and dedup signatures for one shard."""
    from tasks.clean.dedup import DedupConfig
    from tasks.clean.stages import rules_stage

    return rules_stage(raw_url, name, out_url, rules, DedupConfig())


@task(name="clean-dedup", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def clean_dedup_task(out_url: str, names: list[str], versions: list[str]) -> str:
    """Exact and MinHash-LSH clusters across every shard."""
    from tasks.clean.dedup import DedupConfig
    from tasks.clean.stages import dedup_stage

    return dedup_stage(out_url, names, DedupConfig())


@task(name="clean-quality-model", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def clean_quality_model_task(out_url: str, names: list[str], quality: Any, versions: list[str]) -> str | None:
    """The quality classifier: trained on the rule-passing documents, or the configured one (None: filter off)."""
    from tasks.clean.stages import quality_model_stage

    return quality_model_stage(out_url, names, quality)


@task(name="clean-finish", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def clean_finish_task(
    name: str, out_url: str, version: str, safety: Any, quality: Any, quality_model: str | None
) -> dict[str, Any]:
    """Dedup, safety and quality filters; the clean shard, its removed documents and quarantine, its ledger."""
    from tasks.clean.stages import finish_stage

    return finish_stage(name, out_url, safety, quality, quality_model).model_dump()


@task(name="clean-report", **IO_RETRIES)
def clean_report_task(
    ledgers: list[dict[str, Any]], input_url: str, out_url: str, parent: RunRef, quality_model: str | None = None
) -> dict[str, Any]:
    """The total ledger (checked) to storage and MLflow, a funnel plot, the classifiers' held-out figures, and a
    Prefect table of reasons."""
    from tasks.clean.ledger import Ledger, funnel_plot
    from tasks.clean.stages import FUNNEL, classifier_metrics

    ledger = Ledger.model_validate({"shards": ledgers}).check()
    storage.write_json(storage.join(out_url, "ledger.json"), {**ledger.model_dump(), "removed": ledger.removed,
                                                               "quarantined": ledger.quarantined})
    with stage_run(parent, "data/text", {"input": input_url, "output": out_url}) as (tracker, ref):
        tracker.log_metrics(ref, {**ledger.metrics(), **classifier_metrics(ledger, quality_model)})
        with tempfile.TemporaryDirectory() as tmp:
            plot = funnel_plot(ledger.funnel(FUNNEL), Path(tmp) / "funnel.png")
            storage.write_bytes(storage.join(out_url, "funnel.png"), plot.read_bytes())
            tracker.log_artifact(ref, plot, "plots")
    rows = [{"stage/reason": k, "documents": v} for k, v in ledger.removed.items()]
    rows += [{"stage/reason": f"quarantine/{k}", "documents": v} for k, v in ledger.quarantined.items()]
    table_artifact("text-cleaning", [{"stage/reason": "input lines", "documents": ledger.lines}, *rows,
                                     {"stage/reason": "kept", "documents": ledger.kept}], f"cleaned into {out_url}")
    return {"lines": ledger.lines, "kept": ledger.kept, "removed": ledger.removed, "quarantined": ledger.quarantined}


# ------------------------------------------------------------------------------------------- code cleaning


@task(name="code-rules", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def code_rules_task(raw_url: str, name: str, out_url: str, cfg: Any, version: str) -> dict[str, Any]:
    """Parse and validate one code shard (quarantine), oversized files out, dedup signatures."""
    from tasks.clean.dedup import DedupConfig
    from tasks.code.stages import code_rules_stage

    return code_rules_stage(raw_url, name, out_url, cfg, DedupConfig())


@task(name="code-dedup", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def code_dedup_task(out_url: str, names: list[str], versions: list[str]) -> str:
    """Whitespace-insensitive exact and MinHash-LSH clusters across the code shards."""
    from tasks.clean.dedup import DedupConfig
    from tasks.code.stages import code_dedup_stage

    return code_dedup_stage(out_url, names, DedupConfig())


@task(name="code-finish", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def code_finish_task(out_url: str, names: list[str], cfg: Any, versions: list[str]) -> dict[str, Any]:
    """Quality tiers, dependency-sorted repository documents, and the code ledger."""
    from tasks.code.stages import code_finish_stage

    return code_finish_stage(out_url, names, cfg).model_dump()


@task(name="code-report", **IO_RETRIES)
def code_report_task(ledgers: dict[str, Any], input_url: str, out_url: str, parent: RunRef) -> dict[str, Any]:
    """The code ledger to MLflow, a funnel plot, tier counts, and a Prefect table of reasons."""
    from tasks.clean.ledger import Ledger, funnel_plot

    ledger = Ledger.model_validate(ledgers).check()
    total = storage.read_json(storage.join(out_url, "code_ledger.json"))
    with stage_run(parent, "data/code", {"input": input_url, "output": out_url}) as (tracker, ref):
        tracker.log_metrics(ref, {**ledger.metrics(), "repos": float(total["repos"])})
        with tempfile.TemporaryDirectory() as tmp:
            steps = ledger.funnel(["code_rules", "dedup", "code_quality", "code_repo"])
            plot = funnel_plot(steps, Path(tmp) / "code_funnel.png", title="code cleaning funnel (files)")
            storage.write_bytes(storage.join(out_url, "code_funnel.png"), plot.read_bytes())
            tracker.log_artifact(ref, plot, "plots")
    rows = [{"stage/reason": k, "files": v} for k, v in ledger.removed.items()]
    rows += [{"stage/reason": f"quarantine/{k}", "files": v} for k, v in ledger.quarantined.items()]
    table_artifact("code-cleaning", [{"stage/reason": "input files", "files": ledger.lines}, *rows,
                                     {"stage/reason": "kept (in repository documents)", "files": ledger.kept},
                                     {"stage/reason": "repository documents", "files": total["repos"]}],
                   f"code cleaned into {out_url}")
    return {"files": ledger.lines, "kept": ledger.kept, "repos": total["repos"], "removed": ledger.removed,
            "quarantined": ledger.quarantined}


# ------------------------------------------------------------------------------------------- long text and mixes


@task(name="longtext-shard", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def longtext_task(
    shard_url: str, name: str, out_url: str, checkpoint_url: str, tokenizer_url: str, cfg: Any, ppl: Any,
    version: str,
) -> dict[str, Any]:
    """Long-document selection, statistical and perplexity-difference filters for one clean text shard."""
    from tasks.longtext.stages import longtext_stage

    return longtext_stage(shard_url, name, out_url, checkpoint_url, tokenizer_url, cfg, ppl).model_dump()


@task(name="longtext-report", **IO_RETRIES)
def longtext_report_task(
    ledgers: list[dict[str, Any]], clean_url: str, out_url: str, parent: RunRef
) -> dict[str, Any]:
    """Phase 2's corpus summary (long/short shares, removed per reason, context gains) to storage and MLflow."""
    from tasks.clean.ledger import ShardLedger, funnel_plot
    from tasks.longtext.stages import copy_code, summarize

    summary = summarize(out_url, [ShardLedger.model_validate(x) for x in ledgers])
    code = copy_code(clean_url, out_url)
    with stage_run(parent, "data/longtext", {"input": clean_url, "output": out_url}) as (tracker, ref):
        metrics = {k: float(v) for k, v in summary.items() if isinstance(v, int | float)}
        metrics.update({f"removed/{k}": float(v) for k, v in summary["removed"].items()})
        tracker.log_metrics(ref, {**metrics, "code_shards": float(code)})
        steps = [("documents", summary["documents"]), ("short (pass)", summary["short"]),
                 ("long candidates", summary["long_kept"] + summary["long_removed"]),
                 ("long kept", summary["long_kept"])]
        with tempfile.TemporaryDirectory() as tmp:
            plot = funnel_plot(steps, Path(tmp) / "longtext.png", title="phase-2 long-text selection")
            tracker.log_artifact(ref, plot, "plots")
    table_artifact("longtext", [{"measure": k, "value": v} for k, v in summary.items() if k != "removed"]
                   + [{"measure": f"removed/{k}", "value": v} for k, v in summary["removed"].items()],
                   f"phase-2 corpus at {out_url}")
    return summary


@task(name="capability-mix", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def capability_mix_task(clean_url: str, out_url: str, cfg: Any, parent: RunRef) -> str:
    """Phase 3's corpus: the best text, high-tier code and reasoning data at the configured shares."""
    from tasks.mix import build_capability_mix

    with stage_run(parent, "data/capability-mix", {"input": clean_url, **cfg.model_dump()}) as (tracker, ref):
        composition = build_capability_mix(clean_url, out_url, cfg)
        metrics = {f"{group}/{k}": float(v) for group, row in composition.items() for k, v in row.items()}
        tracker.log_metrics(ref, metrics)
        table_artifact("capability-mix", [{"group": g, **row} for g, row in composition.items()],
                       f"phase-3 capability mix at {out_url}")
    return out_url


# ------------------------------------------------------------------------------------------- SFT


@task(name="sft-data", cache_policy=CACHE, persist_result=True, **IO_RETRIES)
def sft_data_task(clean_url: str | None, out_url: str, cfg: Any, parent: RunRef, holdout: float = 0.0) -> str:
    """Generated SFT conversations (checked answers, executed tool calls) → ``train.jsonl`` / ``held_out.jsonl``;
    long-context items leave out the evaluation's held-out documents (`holdout`, as tokenization does)."""
    from tasks.evaluate.datasets import eval_holdout
    from tasks.sft.generate import generate_sft, write_sft
    from tasks.sft.train import corpus_docs

    with stage_run(parent, "sft/data", {"corpus": str(clean_url), **cfg.model_dump()}) as (tracker, ref):
        docs = [text for doc_id, text in corpus_docs(clean_url) if not eval_holdout(doc_id, holdout)]
        stats = write_sft(generate_sft(cfg, docs), out_url)
        tracker.log_metrics(ref, {f"{split}/{kind}": float(n) for split, kinds in stats.items()
                                  for kind, n in kinds.items()})
        table_artifact("sft-data", [{"split": s, "kind": k, "items": n} for s, kinds in stats.items()
                                    for k, n in kinds.items()], f"SFT data at {out_url}")
    return out_url


@task(name="sft-train", cache_policy=CACHE, persist_result=True, **{**IO_RETRIES, "retry_delay_seconds": 10})
def sft_task(
    data_url: str, base_url: str, tokenizer_url: str, out_url: str, spec: Any, eval_cfg: Any, clean_url: str | None,
    parent: RunRef, cold_url: str | None = None,
) -> dict[str, Any]:
    """Fine-tune `base_url` on the SFT data (resumable), then evaluate on the held-out split with and without tools.
    ``cold_url``: where each checkpoint is also uploaded as it is saved."""
    from model.probes import probe_metrics
    from model.sft import PackedChatDataset
    from tasks.pretrain import run_phase
    from tasks.sft.train import (
        conversations,
        corpus_docs,
        evaluate,
        load_base,
        paired_gain,
        plugin_table,
        read_chats,
    )

    docs = corpus_docs(clean_url)
    tools = plugin_table(docs)
    params = {"data": data_url, "base": base_url, "spec": spec.model_dump(), "eval": eval_cfg.model_dump()}
    with stage_run(parent, "sft", params, output=out_url) as (tracker, ref):
        train, bad = read_chats(storage.join(data_url, "train.jsonl"), sorted(tools))
        held, bad_held = read_chats(storage.join(data_url, "held_out.jsonl"), sorted(tools))
        storage.write_text(storage.join(out_url, "quarantine.jsonl"),
                           "".join(json.dumps(b) + "\n" for b in [*bad, *bad_held]))
        base, tokenizer = load_base(base_url, tokenizer_url)
        dataset = PackedChatDataset(conversations(train, tokenizer, sorted(tools)), spec.seq_len, seed=spec.seed,
                                    pad_id=tokenizer.eos_id)
        tracker.log_metrics(ref, {"data/train": float(len(train)), "data/held_out": float(len(held)),
                                  "data/quarantined": float(len(bad) + len(bad_held)),
                                  "data/windows": float(len(dataset)), "data/truncated": float(dataset.truncated),
                                  "data/trainable_tokens": float(dataset.trainable_tokens)})
        result = run_phase(spec, base.config, [], None, out_url, init_weights=base_url, dataset=dataset,
                           cold_url=cold_url, mlflow=(ref.tracking_uri, ref.run_id) if ref.enabled else None,
                           callbacks=[PrefectProgress(key="sft-progress")])
        log_loss_plot(tracker, ref, result.losses, "SFT: train loss")
        tracker.log_metrics(ref, {"train/first_loss": result.first_loss, "train/final_loss": result.final_loss,
                                  **probe_metrics(result.copy_probe)})
        model, _ = load_base(result.native_url, tokenizer_url)
        scores = {name: evaluate(model, tokenizer, held, with_tools=with_tools, plugin_table=tools, cfg=eval_cfg)
                  for name, with_tools in (("with_tools", True), ("without_tools", False))}
        flat = {f"eval/{name}/{k}": float(v) for name, s in scores.items() for k, v in s.items()
                if isinstance(v, int | float)}
        flat.update({f"eval/{name}/kind/{k}": float(v) for name, s in scores.items()
                     for k, v in s["per_kind"].items()})
        flat.update({f"eval/{name}/tool/{tool}/executed": float(t["executed"]) for name, s in scores.items()
                     for tool, t in s["tool_calls_executed_per_tool"].items()})
        gain = paired_gain(scores["with_tools"]["correct"], scores["without_tools"]["correct"])
        flat.update({f"eval/tools_vs_none/{k}": v for k, v in gain.items()})
        tracker.log_metrics(ref, flat)
        storage.write_json(storage.join(out_url, "eval.json"), {**scores, "tools_vs_none": gain})
        nested = ("per_kind", "failed_calls", "correct", "tool_calls_executed_per_tool")
        rows = [{"setting": name, **{k: v for k, v in s.items() if k not in nested}} for name, s in scores.items()]
        table_artifact("sft-eval", rows, f"SFT held-out evaluation of {out_url}")
    return {"native_url": result.native_url, "final_loss": result.final_loss, "eval": scores,
            "quarantined": len(bad) + len(bad_held), "run_id": ref.run_id}
