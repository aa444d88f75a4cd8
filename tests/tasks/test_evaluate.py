"""The evaluation stage through real OpenCompass: an answer-key model scores 100 everywhere and random weights score
near chance (the scoring is wired right), a failure inside OpenCompass surfaces with its cause and a re-run resumes,
nothing needs the network, the summary is checked for gaps, and the registry's `champion` moves only on improvement.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.checkpoint import save_native
from model.config import ModelConfig
from model.model import InternLM2
from model.tokenizer import Tokenizer
from tasks.evaluate.datasets import EvalDataConfig, eval_holdout, read_eval_sets
from tasks.evaluate.runner import EvalRunConfig, EvaluationError, read_summary, to_metrics
from tasks.evaluate.stages import build_eval_data, evaluate_checkpoint, promote_champion

FIXTURES = str(Path(__file__).resolve().parents[1] / "fixtures")
ANSWER_KEY = "oc_fixture_models.AnswerKeyModel"
SETS = ("knowledge_cloze", "language_continuation", "math_word", "code_functions", "needle", "needle_choice",
        "tool_math")
GROUPS = ("knowledge", "language", "reasoning", "coding", "long_context", "long_context", "tool_use")
CFG = EvalDataConfig(cloze=24, continuation=24, math=4, code=3, tool=3, needle_lengths=(64, 128),
                     needle_depths=(0.0, 0.5, 1.0), needle_per_cell=1, holdout_share=0.25)


@pytest.fixture(scope="module")
def corpus(prose: list[str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """A cleaned-corpus layout (``text/*.jsonl``) of standard-library prose."""
    root = tmp_path_factory.mktemp("clean")
    (root / "text").mkdir()
    lines = [json.dumps({"id": f"doc-{i:04d}", "text": text, "source": "stdlib", "meta": {}})
             for i, text in enumerate(prose)]
    (root / "text" / "shard-00000.jsonl").write_text("\n".join(lines) + "\n")
    return str(root)


@pytest.fixture(scope="module")
def sets(corpus: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("evalsets"))
    build_eval_data(corpus, out, CFG)
    return out


@pytest.fixture(scope="module")
def random_model(prose: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("random")
    tok = Tokenizer.train(prose, 1024)
    tok.save(root / "tokenizer.json")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=160,
                         max_seq_len=512)
    save_native(InternLM2(config), root / "ckpt")
    return str(root / "ckpt"), str(root / "tokenizer.json")


def answer_key(**update: object) -> EvalRunConfig:
    return EvalRunConfig(model_class=ANSWER_KEY, **update)


def test_sets_come_from_held_out_text_only(corpus: str, sets: str) -> None:
    manifest = read_eval_sets(sets)
    assert {s["name"] for s in manifest["sets"]} == set(SETS)
    for name in ("knowledge_cloze", "language_continuation"):
        rows = [json.loads(x) for x in (Path(sets) / f"{name}.jsonl").read_text().splitlines()]
        assert rows and all(eval_holdout(r["doc_id"], CFG.holdout_share) for r in rows)
    report = json.loads((Path(sets) / "contamination.json").read_text())
    assert set(report) == set(SETS) and all(r["items"] > 0 for r in report.values())


def test_answer_key_model_scores_100_on_every_set(sets: str, tmp_path: Path) -> None:
    result = evaluate_checkpoint(sets, "", sets, str(tmp_path / "out"), chat=True, run_cfg=answer_key(),
                                 title="answer-key", extra_paths=(FIXTURES,))
    metrics = result["metrics"]
    groups = dict(zip(SETS, GROUPS, strict=True))
    assert {f"eval/{groups[s]}/{s}" for s in SETS} <= set(metrics)
    assert all(metrics[f"eval/{groups[s]}/{s}"] == 100.0 for s in SETS), metrics
    assert metrics["eval/average"] == 100.0
    cells = [k for k in metrics if k.startswith("eval/long_context/needle/len")]
    assert len(cells) == len(CFG.needle_lengths) * len(CFG.needle_depths)
    cells = [k for k in metrics if k.startswith("eval/long_context/needle_choice/len")]
    assert len(cells) == len(CFG.needle_lengths) * len(CFG.needle_depths)
    assert (tmp_path / "out" / "needle.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "needle_choice.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "summary.csv").is_file()
    assert result["needle"]["grid"] == [[100.0, 100.0]] * 3


def test_random_weights_score_near_chance(sets: str, random_model: tuple[str, str], tmp_path: Path) -> None:
    ckpt, tok = random_model
    result = evaluate_checkpoint(ckpt, tok, sets, str(tmp_path / "out"), chat=False,
                                 run_cfg=EvalRunConfig(max_seq_len=512), title="random")
    m = result["metrics"]
    # four options: chance is 25 %; with 24 items three standard deviations reach about 51 %
    assert 0.0 <= m["eval/knowledge/knowledge_cloze"] <= 55.0
    assert 0.0 <= m["eval/language/language_continuation"] <= 55.0
    # six needle items: a random model picks the planted number by luck, not by reading the context
    assert 0.0 <= m["eval/long_context/needle_choice"] <= 70.0
    for key in ("eval/reasoning/math_word", "eval/coding/code_functions", "eval/long_context/needle"):
        assert m[key] <= 10.0, key
    assert "eval/tool_use/tool_math" not in m  # a base model does not get the tool-use set


def test_failure_inside_opencompass_raises_with_its_cause_and_a_rerun_resumes(sets: str, tmp_path: Path) -> None:
    marker = tmp_path / "raised"
    run_cfg = EvalRunConfig(model_class="oc_fixture_models.FlakyModel", extra_model_args={"marker": str(marker)})
    out = tmp_path / "out"
    with pytest.raises(EvaluationError, match="simulated model failure"):
        evaluate_checkpoint(sets, "", sets, str(out), chat=True, run_cfg=run_cfg, extra_paths=(FIXTURES,))
    assert marker.exists()
    (run_dir,) = (out / "oc").iterdir()
    done = {p.name: p.stat().st_mtime_ns for p in (run_dir / "predictions" / "lmforge").glob("*.json")}
    assert {"knowledge_cloze.json", "language_continuation.json"} <= set(done)  # perplexity sets finished first
    result = evaluate_checkpoint(sets, "", sets, str(out), chat=True, run_cfg=run_cfg, extra_paths=(FIXTURES,))
    assert result["opencompass_run"] == run_dir.name  # the same run id: resumed, not restarted
    again = {p.name: p.stat().st_mtime_ns for p in (run_dir / "predictions" / "lmforge").glob("*.json")}
    assert all(again[name] == mtime for name, mtime in done.items())  # finished predictions were not recomputed
    assert result["metrics"]["eval/average"] == 100.0


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_evaluation_runs_with_the_network_cut(sets: str, tmp_path: Path) -> None:
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged network namespaces unavailable: {probe.stderr.decode().strip()}")
    code = (
        "import sys, json\n"
        "from tasks.evaluate.runner import EvalRunConfig\n"
        "from tasks.evaluate.stages import evaluate_checkpoint\n"
        f"r = evaluate_checkpoint({sets!r}, '', {sets!r}, {str(tmp_path / 'out')!r}, chat=True,\n"
        f"    run_cfg=EvalRunConfig(model_class={ANSWER_KEY!r}), extra_paths=({FIXTURES!r},))\n"
        "print(json.dumps(r['metrics']['eval/average']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    proc = subprocess.run(["unshare", "-rn", sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip().splitlines()[-1]) == 100.0


def _summary(tmp_path: Path, name: str, rows: str) -> Path:
    path = tmp_path / name
    path.write_text("dataset,version,metric,mode,lmforge\n" + rows)
    return path


def test_summary_with_a_missing_cell_is_an_error(tmp_path: Path) -> None:
    gap = _summary(tmp_path, "gap.csv", "knowledge_cloze,abc,accuracy,ppl,40.00\nmath_word,abc,accuracy,gen,-\n")
    with pytest.raises(EvaluationError, match="math_word/accuracy"):
        read_summary(gap, ["knowledge_cloze", "math_word"])
    short = _summary(tmp_path, "short.csv", "knowledge_cloze,abc,accuracy,ppl,40.00\n")
    with pytest.raises(EvaluationError, match="needle/accuracy"):
        read_summary(short, ["knowledge_cloze", "needle"])
    assert read_summary(short, ["knowledge_cloze"]) == {"knowledge_cloze": {"accuracy": 40.0}}


def test_metrics_are_named_by_group_and_averaged_per_group() -> None:
    metrics = to_metrics({"knowledge_cloze": {"accuracy": 40.0}, "language_continuation": {"accuracy": 20.0},
                          "needle": {"accuracy": 50.0, "len64_depth000": 100.0, "len64_depth100": 0.0}})
    assert metrics["eval/knowledge/knowledge_cloze"] == 40.0
    assert metrics["eval/long_context/needle/len64_depth000"] == 100.0
    assert metrics["eval/long_context"] == 50.0
    assert metrics["eval/average"] == pytest.approx((40.0 + 20.0 + 50.0) / 3)


def test_champion_alias_moves_only_on_improvement(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("t")
    runs = [client.create_run(exp).info.run_id for _ in range(3)]
    first = promote_champion(uri, "chat", "/ckpt/a", runs[0], 30.0)
    worse = promote_champion(uri, "chat", "/ckpt/b", runs[1], 25.0)
    better = promote_champion(uri, "chat", "/ckpt/c", runs[2], 31.5)
    assert (first["promoted"], worse["promoted"], better["promoted"]) == (True, False, True)
    assert worse["champion"] == first["version"] and worse["previous_score"] == 30.0
    champion = client.get_model_version_by_alias("chat", "champion")
    assert int(champion.version) == better["version"] and champion.source == "/ckpt/c"
    assert len(client.search_model_versions("name='chat'")) == 3  # every evaluated chat model is a version
