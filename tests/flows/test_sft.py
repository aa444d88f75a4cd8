"""The SFT flow on a real (temporary) Prefect server: bad records quarantined, the rest trains, held-out evaluation
with and without tools lands in storage and MLflow; and the chat loop over its I/O functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient

from flows.params import Where
from flows.sft import SFTParams, sft_flow
from infra import storage
from model.chat import Message, ToolCall
from model.checkpoint import save_native
from model.config import get_preset
from model.model import InternLM2
from model.tokenizer import Tokenizer
from tasks.presets import pipeline_preset
from tasks.sft.chat import ChatSession, run_chat
from tasks.sft.generate import generate_sft, write_sft
from tasks.sft.plugins import PLUGINS

BAD = [
    {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "user"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "", "tool_call": {"type": "plugin", "name": "teleport",
                                                                     "arguments": {}}}]},
]


@pytest.fixture(scope="module")
def base(prose: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    texts = prose + [json.dumps(r) for r in generate_sft(pipeline_preset("smoke").sft_data)]
    Tokenizer.train(texts, vocab_size=get_preset("smoke").vocab_size).save(root / "tokenizer.json")
    torch.manual_seed(0)
    save_native(InternLM2(get_preset("smoke")), root / "base")
    return root


@pytest.fixture(scope="module")
def trained(prefect_server: None, moto_server: str, base: Path) -> tuple[Path, Where, dict[str, Any]]:
    import s3fs

    data = base / "data"
    write_sft(generate_sft(pipeline_preset("smoke").sft_data), str(data))
    with (data / "train.jsonl").open("a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in BAD) + "not json\n")
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("lmforge-cold-sft")
    where = Where(root=str(base), tracking_uri=f"sqlite:///{base}/mlflow.db", cold_root="s3://lmforge-cold-sft/runs",
                  run_name="sft-test")
    params = SFTParams(base=str(base / "base"), tokenizer=str(base / "tokenizer.json"), output=str(base / "out"),
                       data=str(data), preset="smoke", where=where)
    return base / "out", where, sft_flow(params)


def test_bad_records_are_quarantined_with_reasons_and_the_rest_trains(trained: tuple[Path, Where, Any]) -> None:
    out, _, result = trained
    rows = [json.loads(x) for x in (out / "train" / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(r["error"] for r in rows) == ["bad_role", "invalid_json", "missing_content", "unknown_tool"]
    assert all(r["line"] > 0 and r["detail"] for r in rows)
    assert result["quarantined"] == 4
    assert (Path(result["native_url"]) / "model.safetensors").exists()


def test_held_out_evaluation_with_and_without_tools(trained: tuple[Path, Where, Any]) -> None:
    out, where, result = trained
    scores = json.loads((out / "train" / "eval.json").read_text())
    gain = scores.pop("tools_vs_none")
    assert set(scores) == {"with_tools", "without_tools"} and scores == result["eval"]
    for setting in scores.values():
        assert setting["items"] > 0 and 0 <= setting["accuracy"] <= 1
        assert len(setting["correct"]) == setting["items"]
        assert sum(setting["correct"]) == pytest.approx(setting["accuracy"] * setting["items"])
        low, high = setting["accuracy_ci95"]
        assert 0 <= low <= setting["accuracy"] <= high <= 1
        per_tool = setting["tool_calls_executed_per_tool"]
        well_formed = round(setting["tool_calls"] * setting["tool_calls_well_formed"])
        assert sum(t["calls"] for t in per_tool.values()) == well_formed
        assert 0 <= setting["plugin_calls_grounded"] <= 1
    pairs = list(zip(scores["with_tools"]["correct"], scores["without_tools"]["correct"], strict=True))
    assert gain["only_with_tools"] == sum(a and not b for a, b in pairs)
    assert gain["only_without_tools"] == sum(b and not a for a, b in pairs) and 0 < gain["p_value"] <= 1
    client = MlflowClient(where.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id], "tags.`lmforge.stage` = 'sft'")
    metrics = run[0].data.metrics
    assert metrics["data/quarantined"] == 4 and "eval/with_tools/accuracy" in metrics
    assert metrics["eval/tools_vs_none/p_value"] == gain["p_value"]
    assert "train/loss" in metrics


def test_each_checkpoint_is_also_in_cold_storage(trained: tuple[Path, Where, Any]) -> None:
    out, where, _ = trained
    cold = "s3://lmforge-cold-sft/runs/sft-test/sft/train"
    assert where.cold("smoke", "sft", "train") == cold
    local = sorted(p.name for p in (out / "train" / "checkpoints").glob("*.ckpt"))
    mirrored = sorted(url.rsplit("/", 1)[-1] for url in storage.list_files(f"{cold}/checkpoints"))
    assert local == mirrored and "last.ckpt" in mirrored and any(n.startswith("step=") for n in mirrored)
    last = (out / "train" / "checkpoints" / "last.ckpt").read_bytes()
    assert storage.read_bytes(f"{cold}/checkpoints/last.ckpt") == last
    assert storage.read_json(f"{cold}/phase_spec.json") == json.loads((out / "train" / "phase_spec.json").read_text())


def test_chat_loop_streams_replies_runs_tools_and_resets(base: Path) -> None:
    from model.checkpoint import load_model

    session = ChatSession(load_model(base / "base"), Tokenizer.from_file(base / "tokenizer.json"), dict(PLUGINS),
                          max_new_tokens=8)
    script = iter(["hello there", "/reset", "", "what is 2 + 2?", "/exit", "never read"])
    written: list[str] = []
    replies = run_chat(session, lambda prompt: (written.append(prompt), next(script))[1], written.append)
    text = "".join(written)
    assert replies == 2 and "(conversation reset)" in text and text.count("assistant> ") == 2
    assert [m.role for m in session.messages if m.role != "system"] == ["user", "assistant"]  # reset dropped turn 1
    call = session.run_tool(ToolCall("interpreter", code="print(sum(range(10)))"))
    assert call == Message("environment", "45", name="interpreter") or call.content.strip() == "45"
    plugin = session.run_tool(ToolCall("plugin", name="calculator", arguments={"expression": "6*7"}))
    assert "42" in plugin.content and plugin.name == "calculator"
    missing = session.run_tool(ToolCall("plugin", name="teleport", arguments={}))
    assert "unknown plugin" in missing.content


def test_chat_end_of_input_leaves_cleanly(base: Path) -> None:
    from model.checkpoint import load_model

    session = ChatSession(load_model(base / "base"), Tokenizer.from_file(base / "tokenizer.json"), {},
                          use_tools=False, max_new_tokens=4)

    def read(prompt: str) -> str:
        raise EOFError

    assert run_chat(session, read, lambda text: None) == 0
