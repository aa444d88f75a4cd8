"""The ``lmforge`` command: the user's entry point. Each stage subcommand runs the same flow a deployment runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()


@app.command("presets")
def presets() -> None:
    """List the model presets with their shapes and parameter counts."""
    from model.config import PRESETS

    table = Table("preset", "layers", "dim", "heads", "kv heads", "ffn", "vocab", "context", "params")
    for name, c in PRESETS.items():
        table.add_row(name, *(str(v) for v in (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size,
                                                c.max_seq_len)), f"{c.num_params() / 1e6:,.1f}M")
    console.print(table)


@app.command("export-hf")
def export_hf(
    checkpoint: Annotated[Path, typer.Argument(help="lmforge checkpoint dir, Lightning .ckpt, or HF Llama dir")],
    out: Annotated[Path, typer.Argument(help="output directory (created)")],
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer.json; default: the one beside it")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
) -> None:
    """Export a checkpoint as a transformers-loadable Llama model (safetensors + config.json + tokenizer)."""
    import torch

    from model.checkpoint import TOKENIZER, CheckpointError, load_model
    from model.checkpoint import export_hf as do_export

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise typer.BadParameter(f"expected one of {', '.join(dtypes)}, got {dtype!r}", param_hint="--dtype")
    if tokenizer is None:
        beside = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / TOKENIZER
        tokenizer = beside if beside.is_file() else None
    try:
        model = load_model(checkpoint)
        do_export(model, out, tokenizer_file=tokenizer, dtype=dtypes[dtype])
    except CheckpointError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    note = "" if tokenizer else " (no tokenizer found: pass --tokenizer to include one)"
    console.print(f"exported {checkpoint} → {out}{note}")


def _where(root: str | None, run_name: str | None, tracking_uri: str | None, cold_root: str | None = None) -> Any:
    from flows.params import Where

    return Where(root=root, run_name=run_name, tracking_uri=tracking_uri, cold_root=cold_root)


def _show_result(title: str, result: dict[str, Any]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in result.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    console.print(table)


RootOpt = Annotated[str | None, typer.Option("--root", help="local path or s3:// URL (default: LMFORGE_ROOT)")]
RunNameOpt = Annotated[str | None, typer.Option(help="directory under the root (default: the preset)")]
TrackingOpt = Annotated[str | None, typer.Option(help="MLflow tracking URI (default: sqlite beside the root)")]
PresetOpt = Annotated[str, typer.Option(help="smoke, tiny, small, internlm2-1_8b, internlm2-7b, internlm2-20b")]


@app.command("run")
def run(
    preset: PresetOpt = "tiny",
    input: Annotated[str | None, typer.Option("--input", help="raw JSONL corpus dir; default: built in")] = None,
    root: RootOpt = None,
    run_name: RunNameOpt = None,
    tracking_uri: TrackingOpt = None,
    cold_root: Annotated[str | None, typer.Option(help="cold storage (e.g. s3://bucket/cold) that receives every "
                                                       "training checkpoint as it is saved")] = None,
) -> None:
    """Run the whole pipeline (the same flow the `pipeline` deployment runs)."""
    from flows.pipeline import PipelineParams, pipeline_flow
    from tasks.presets import pipeline_preset

    _check_preset(preset, pipeline_preset)
    params = PipelineParams(preset=preset, input=input, where=_where(root, run_name, tracking_uri, cold_root))
    _show_result(f"pipeline ({preset})", pipeline_flow(params))


@app.command("data")
def data(
    input: Annotated[str, typer.Option("--input", help="raw corpus dir (local or s3://): text/*.jsonl or *.jsonl")],
    output: Annotated[str, typer.Option("--output", help="where the clean corpus goes")],
    rules: Annotated[str, typer.Option(help="rule preset: default or builtin")] = "builtin",
    task_runner: Annotated[str, typer.Option(help="default or dask (a local 2-worker Dask cluster)")] = "default",
    blocked_domains: Annotated[str, typer.Option(help="domain blocklist: builtin, a file URL, or off")] = "builtin",
    blocked_words: Annotated[str, typer.Option(help="word blocklist: builtin, a file URL, or off")] = "builtin",
    max_toxicity: Annotated[float, typer.Option(help="drop above this toxicity score; 1 = off")] = 0.5,
    max_adult: Annotated[float, typer.Option(help="drop above this adult-content score; 1 = off")] = 0.5,
    min_quality: Annotated[float, typer.Option(help="drop below this quality score; 0 = off")] = 0.5,
    quality_model: Annotated[str | None, typer.Option(help="a trained quality model (.npz); default: train")] = None,
    code_tree: Annotated[str | None, typer.Option(help="a directory of repositories (a folder each) to clean")] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Clean raw JSONL shards (the `data` deployment's flow): text (quarantine, rules, dedup, safety, quality) and
    code (quarantine, dedup, quality tiers, dependency-sorted repository documents), each with a ledger."""
    from flows.data import DataParams, data_flow
    from tasks.clean.quality import QualityConfig
    from tasks.clean.safety import SafetyConfig

    if task_runner not in ("default", "dask"):
        raise typer.BadParameter(f"expected default or dask, got {task_runner!r}", param_hint="--task-runner")
    for name, value in (("--max-toxicity", max_toxicity), ("--max-adult", max_adult), ("--min-quality", min_quality)):
        if not 0 <= value <= 1:
            raise typer.BadParameter(f"expected a score in [0, 1], got {value}", param_hint=name)
    safety = SafetyConfig(
        blocked_domains=None if blocked_domains == "off" else blocked_domains,
        blocked_words=None if blocked_words == "off" else blocked_words,
        max_toxicity=None if max_toxicity >= 1 else max_toxicity, max_adult=None if max_adult >= 1 else max_adult,
    )
    quality = QualityConfig(min_score=None if min_quality <= 0 else min_quality, model=quality_model)
    params = DataParams(input=input, output=output, rules=rules, task_runner=task_runner, safety=safety,
                        quality=quality, code_tree=code_tree, where=_where(None, None, tracking_uri))
    result = data_flow(params)
    code = result.pop("code")
    _show_result("text cleaning", result)
    if code is not None:
        _show_result("code cleaning", code)


@app.command("longtext")
def longtext(
    input: Annotated[str, typer.Option("--input", help="a cleaned corpus (the data flow's output)")],
    output: Annotated[str, typer.Option("--output", help="where phase 2's corpus goes")],
    checkpoint: Annotated[str, typer.Option(help="the scoring model's checkpoint directory URL")],
    tokenizer: Annotated[str, typer.Option(help="its tokenizer.json URL")],
    preset: PresetOpt = "tiny",
    tracking_uri: TrackingOpt = None,
) -> None:
    """Select phase 2's long documents (the `longtext` deployment's flow) with a preset's thresholds."""
    from flows.longtext import LongTextParams, longtext_flow
    from tasks.presets import pipeline_preset

    _check_preset(preset, pipeline_preset)
    plan = pipeline_preset(preset)
    params = LongTextParams(input=input, output=output, checkpoint=checkpoint, tokenizer=tokenizer,
                            longtext=plan.longtext, perplexity=plan.perplexity, where=_where(None, None, tracking_uri))
    _show_result("long-text selection", longtext_flow(params))


@app.command("sft")
def sft(
    base: Annotated[str, typer.Option(help="checkpoint to fine-tune (a phase's final/ directory)")],
    tokenizer: Annotated[str, typer.Option(help="its tokenizer.json")],
    output: Annotated[str, typer.Option("--output", help="where data, checkpoints and evaluation go")],
    data: Annotated[str | None, typer.Option(help="folder of train.jsonl / held_out.jsonl; default: made")] = None,
    corpus: Annotated[str | None, typer.Option(help="cleaned corpus for long-context items and search")] = None,
    preset: PresetOpt = "tiny",
    tracking_uri: TrackingOpt = None,
) -> None:
    """Supervised fine-tuning in ChatML with tool use (the `sft` deployment's flow), then held-out evaluation."""
    from flows.sft import SFTParams, sft_flow
    from tasks.presets import pipeline_preset

    _check_preset(preset, pipeline_preset)
    params = SFTParams(base=base, tokenizer=tokenizer, output=output, data=data, corpus=corpus, preset=preset,
                       where=_where(None, None, tracking_uri))
    result = sft_flow(params)
    for name, scores in result["eval"].items():
        _show_result(f"held-out, {name.replace('_', ' ')}", {k: v for k, v in scores.items() if k != "per_kind"})


@app.command("rlhf")
def rlhf(
    sft: Annotated[str, typer.Option(help="the SFT checkpoint (its final/ directory)")],
    tokenizer: Annotated[str, typer.Option(help="its tokenizer.json")],
    sft_data: Annotated[str, typer.Option(help="folder with the SFT train.jsonl / held_out.jsonl")],
    output: Annotated[str, typer.Option("--output", help="where the reward models, rounds and report go")],
    pairs: Annotated[str | None, typer.Option(help="extra preference pairs (JSONL: domain, prompt, chosen, "
                                                   "rejected)")] = None,
    ptx_tokens: Annotated[list[str] | None, typer.Option(help="token shard folder(s) for the PTX loss")] = None,
    rounds: Annotated[int | None, typer.Option(min=1, help="online rounds (default: the preset's)")] = None,
    fast_path: Annotated[bool, typer.Option(help="patch the reward model on hacking patterns")] = True,
    slow_path: Annotated[bool, typer.Option(help="the lagging broad reward-model update")] = True,
    dpo: Annotated[bool, typer.Option(help="also train the DPO baseline")] = True,
    preset: PresetOpt = "tiny",
    tracking_uri: TrackingOpt = None,
) -> None:
    """COOL RLHF (the `rlhf` deployment's flow): conditional reward model, PPO rounds with fast and slow path, DPO."""
    from flows.rlhf import RLHFParams, rlhf_flow
    from tasks.presets import pipeline_preset

    _check_preset(preset, pipeline_preset)
    params = RLHFParams(sft=sft, tokenizer=tokenizer, sft_data=sft_data, output=output, pairs=pairs,
                        ptx_tokens=ptx_tokens or [], rounds=rounds, fast_path=fast_path, slow_path=slow_path,
                        dpo=dpo, preset=preset, where=_where(None, None, tracking_uri))
    result = rlhf_flow(params)
    _show_result("reward model", result["reward_model_metrics"])
    for i, metrics in enumerate(result["rounds"], 1):
        _show_result(f"round {i} (held-out prompts)", metrics)
    if result["dpo"] is not None:
        _show_result("DPO (held-out prompts)", result["dpo"])
    typer.echo(f"actor: {result['actor']}")


@app.command("chat")
def chat(
    checkpoint: Annotated[str, typer.Argument(help="a checkpoint: lmforge dir, Lightning .ckpt or HF dir")],
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer.json (default: the checkpoint's own)")] = None,
    tools: Annotated[bool, typer.Option(help="declare and run the interpreter and plugins")] = True,
    corpus: Annotated[str | None, typer.Option(help="a cleaned corpus for the search plugin")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
) -> None:
    """Talk to a model in the terminal: tokens stream, tool calls run in the sandbox and show as tool turns."""
    import sys

    from model.checkpoint import load_model
    from model.tokenizer import Tokenizer
    from tasks.sft.chat import ChatSession, run_chat
    from tasks.sft.train import corpus_docs, plugin_table

    path = Path(checkpoint)
    tok_file = Path(tokenizer) if tokenizer else (path if path.is_dir() else path.parent) / "tokenizer.json"
    if not tok_file.is_file():
        raise typer.BadParameter(f"no tokenizer at {tok_file}: pass --tokenizer", param_hint="--tokenizer")
    session = ChatSession(load_model(path).eval(), Tokenizer.from_file(tok_file), plugin_table(corpus_docs(corpus)),
                          use_tools=tools, max_new_tokens=max_new_tokens, temperature=temperature)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    run_chat(session, input, write)


@app.command("eval")
def evaluate(
    checkpoint: Annotated[str, typer.Argument(help="checkpoint to evaluate (a phase's or SFT's final/ directory, "
                                                   "or models:/NAME@ALIAS from the MLflow registry)")],
    tokenizer: Annotated[str, typer.Option(help="its tokenizer.json")],
    output: Annotated[str, typer.Option("--output", help="where scores, summary, heatmap and OpenCompass's work go")],
    chat: Annotated[bool, typer.Option(help="a chat model: ChatML prompts and the tool-use set")] = False,
    data: Annotated[str | None, typer.Option(help="built eval sets (folder with manifest.json)")] = None,
    corpus: Annotated[str | None, typer.Option(help="cleaned corpus to build the sets from (held-out text)")] = None,
    model_run: Annotated[str | None, typer.Option(help="MLflow run id of the model (metrics go there)")] = None,
    register_as: Annotated[str | None, typer.Option(help="registered model name; `champion` moves on improvement")]
    = None,
    title: Annotated[str, typer.Option(help="a label for reports")] = "model",
    preset: PresetOpt = "tiny",
    tracking_uri: TrackingOpt = None,
) -> None:
    """Evaluate a checkpoint with OpenCompass on the local sets (the `evaluate` deployment's flow)."""
    from flows.evaluate import EvaluateParams, evaluate_flow
    from tasks.presets import pipeline_preset

    _check_preset(preset, pipeline_preset)
    if data is None and corpus is None:
        raise typer.BadParameter("pass --data (built eval sets) or --corpus (a cleaned corpus)", param_hint="--data")
    params = EvaluateParams(checkpoint=checkpoint, tokenizer=tokenizer, output=output, chat=chat, data=data,
                            corpus=corpus, preset=preset, model_run=model_run, register_as=register_as, title=title,
                            where=_where(None, None, tracking_uri))
    result = evaluate_flow(params)
    table = Table("metric", "score", title=f"OpenCompass: {checkpoint}")
    for key, value in sorted(result["metrics"].items()):
        table.add_row(key, f"{value:.2f}")
    console.print(table)
    if "champion" in result:
        _show_result("registry", result["champion"])


@app.command("compare")
def compare(
    runs: Annotated[list[str], typer.Argument(help="two or more MLflow run ids (or run names)")],
    prefix: Annotated[str, typer.Option(help="compare metrics under this prefix")] = "eval/",
    tracking_uri: TrackingOpt = None,
) -> None:
    """Side-by-side table of runs' evaluation metrics, with deltas against the first, and the params that differ."""
    from tasks.evaluate.compare import compare_runs

    uri = _where(None, None, tracking_uri).tracking()
    try:
        cmp = compare_runs(uri, runs, prefix)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    table = Table("metric", *(f"{n or r[:8]}\n{r[:8]}" for n, r in zip(cmp.names, cmp.runs, strict=True)),
                  *(f"Δ {n or r[:8]}" for n, r in zip(cmp.names[1:], cmp.runs[1:], strict=True)),
                  title="eval comparison (Δ against the first run)")
    for key, values, delta in cmp.metrics:
        cells = ["–" if v is None else f"{v:.2f}" for v in values]
        deltas = ["–" if d is None else ("[green]" if d > 0 else "[red]" if d < 0 else "") + f"{d:+.2f}"
                  for d in delta[1:]]
        table.add_row(key, *cells, *deltas)
    console.print(table)
    if cmp.params:
        params = Table("param", *(n or r[:8] for n, r in zip(cmp.names, cmp.runs, strict=True)),
                       title="parameters that differ")
        for key, values in cmp.params:
            params.add_row(key, *("–" if v is None else v[:60] for v in values))
        console.print(params)


@app.command("pretrain")
def pretrain(
    tokens: Annotated[str, typer.Option(help="token-shard manifest URL (…/tokens/manifest.json)")],
    output: Annotated[str, typer.Option("--output", help="directory URL for the phases")],
    preset: PresetOpt = "tiny",
    init: Annotated[str | None, typer.Option(help="checkpoint URL to start phase 1 from")] = None,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Run the three pretraining phases on existing token shards (the `pretrain` deployment's flow)."""
    from flows.pretrain import PretrainParams, pretrain_flow
    from tasks.presets import pipeline_preset

    _check_preset(preset, pipeline_preset)
    params = PretrainParams(tokens=tokens, output=output, preset=preset, init=init,
                            where=_where(None, None, tracking_uri))
    for phase in pretrain_flow(params):
        _show_result(phase["name"], {k: v for k, v in phase.items() if k != "losses"})


StateDirOpt = Annotated[Path | None, typer.Option("--state-dir", help="pid files, logs, databases (default: "
                                                                    "<LMFORGE_ROOT or ./.lmforge>/stack)")]


def _state_dir(state_dir: Path | None) -> Path:
    from infra.stack import default_state_dir

    return (state_dir or default_state_dir()).absolute()


@app.command("up")
def up(
    s3: Annotated[bool, typer.Option("--s3", help="also run moto's S3, for artifacts and LMFORGE_ROOT")] = False,
    deploy: Annotated[bool, typer.Option(help="run `prefect deploy --all` for prefect.yaml's deployments")] = True,
    state_dir: StateDirOpt = None,
    prefect_port: Annotated[int, typer.Option(help="Prefect server (API and UI)")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow tracking server")] = 5000,
    s3_port: Annotated[int, typer.Option(help="moto's S3 API (with --s3)")] = 5001,
    bucket: Annotated[str, typer.Option(help="the bucket for artifacts and data (with --s3)")] = "lmforge",
    mlflow_workers: Annotated[int, typer.Option(min=1, help="MLflow server worker processes")] = 2,
    timeout: Annotated[float, typer.Option(min=1.0, help="seconds each server may take to become healthy")] = 180.0,
) -> None:
    """Start a local server stack on 127.0.0.1: Prefect server, MLflow server, a process worker (and moto's S3)."""
    from infra.stack import StackConfig, StackError
    from infra.stack import up as stack_up

    try:
        config = StackConfig(state_dir=_state_dir(state_dir), prefect_port=prefect_port, mlflow_port=mlflow_port,
                             s3_port=s3_port, s3=s3, bucket=bucket, deploy=deploy, mlflow_workers=mlflow_workers,
                             timeout=timeout)
        state = stack_up(config, echo=_plain)
    except StackError as exc:
        _fail(exc)
    _show_services(config.state_dir)
    typer.echo(f"\nPrefect UI: http://127.0.0.1:{prefect_port}\nMLflow UI:  {config.mlflow_url}")
    typer.echo(f"\nTo use the stack from a shell (or `source {config.state_dir / 'env.sh'}`):")
    for key, value in state["env"].items():
        typer.echo(f"export {key}={value}")
    typer.echo("\n`lmforge status` shows it, `lmforge down` stops it.")


@app.command("down")
def down(state_dir: StateDirOpt = None) -> None:
    """Stop the local stack that `lmforge up` started (reverse order) and forget it."""
    from infra.stack import StackError
    from infra.stack import down as stack_down

    where = _state_dir(state_dir)
    try:
        stopped = stack_down(where, echo=_plain)
    except StackError as exc:
        _fail(exc)
    console.print(f"stack under {where} stopped" if stopped else f"nothing running under {where}")


@app.command("status")
def status(state_dir: StateDirOpt = None) -> None:
    """Each service of the local stack: pid, alive or not, URL."""
    where = _state_dir(state_dir)
    if not _show_services(where):
        console.print(f"nothing running under {where} (no stack.json)")


def _show_services(state_dir: Path) -> bool:
    from infra.stack import StackError
    from infra.stack import status as stack_status

    try:
        rows = stack_status(state_dir)
    except StackError as exc:
        _fail(exc)
    if not rows:
        return False
    table = Table("service", "pid", "state", "url", title=f"lmforge stack ({escape(str(state_dir))})")
    for service, alive in rows:
        url = service.url or f"pool {service.extra.get('pool', '')}"
        table.add_row(service.name, str(service.pid), "[green]alive" if alive else "[red]dead", url)
    console.print(table)
    console.print(f"logs: {escape(str(state_dir))}/<service>.log")
    return True


def _plain(message: str) -> None:
    console.print(message, markup=False, highlight=False)


def _fail(exc: Exception) -> NoReturn:
    console.print(f"[red]error:[/red] {escape(str(exc))}")
    raise typer.Exit(1) from exc


def _check_preset(preset: str, lookup: Any) -> None:
    from model.config import ConfigError

    try:
        lookup(preset)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--preset") from exc


def main() -> None:
    app()


if __name__ == "__main__":
    main()
