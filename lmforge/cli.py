"""The ``lmforge`` command: the user's entry point. Each stage subcommand runs the same flow a deployment runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
