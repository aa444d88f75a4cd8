"""Side-by-side comparison of MLflow runs: the evaluation metrics and the parameters that differ.

`compare_runs` fetches the runs by id (or by name within the lmforge experiment) and returns rows of
``(key, value per run, delta against the first run)``; `lmforge compare` prints them. Only keys under ``eval/`` are
compared by default (``prefix`` widens it), and parameters are listed only where the runs disagree, so the table
answers "what changed, and what did it do".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Comparison:
    runs: list[str]  # run ids, in the order asked
    names: list[str]  # run names
    metrics: list[tuple[str, list[float | None], list[float | None]]]  # key, values, delta vs the first run
    params: list[tuple[str, list[str | None]]] = field(default_factory=list)  # only the ones that differ


def _find(client: Any, ref: str) -> Any:
    """A run by id, else by name (the newest with that name) in any experiment."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(ref)
    except MlflowException:
        pass
    experiments = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(experiments, filter_string=f"attributes.run_name = '{ref}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        raise ValueError(f"run {ref!r}: no MLflow run with that id or name")
    return found[0]


def compare_runs(tracking_uri: str, refs: Sequence[str], prefix: str = "eval/") -> Comparison:
    """Compare `refs` (run ids or names); at least two."""
    from mlflow import MlflowClient

    if len(refs) < 2:
        raise ValueError(f"compare needs at least two runs, got {list(refs)}")
    client = MlflowClient(tracking_uri)
    runs = [_find(client, ref) for ref in refs]
    keys = sorted({k for r in runs for k in r.data.metrics if k.startswith(prefix)})
    if not keys:
        raise ValueError(f"runs {list(refs)} have no metrics under {prefix!r}: were they evaluated?")
    metrics = []
    for key in keys:
        values = [r.data.metrics.get(key) for r in runs]
        first = values[0]
        delta = [None if v is None or first is None else v - first for v in values]
        metrics.append((key, values, delta))
    param_keys = sorted({k for r in runs for k in r.data.params})
    params = [(k, [r.data.params.get(k) for r in runs]) for k in param_keys
              if len({r.data.params.get(k) for r in runs}) > 1]
    return Comparison(runs=[r.info.run_id for r in runs], names=[r.info.run_name or "" for r in runs],
                      metrics=metrics, params=params)
