from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from infra.tracking import RunRef
from tasks.pretrain import PhaseSpec
from tasks.reporting import loss_plot
from tasks.stages import phase_task


def test_phase_refuses_shards_of_another_vocabulary(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"vocab_size": 4096, "shards": []}))
    spec = PhaseSpec(name="p1", seq_len=64, rope_theta=50_000.0, max_steps=1, batch_size=1)
    config = {"vocab_size": 512, "dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2}
    with pytest.raises(ValueError, match="4096-token vocabulary, the p1 model has vocab_size=512"):
        phase_task.fn(spec, config, str(manifest), str(tmp_path / "out"), None, {}, RunRef("", ""))


def test_loss_plot_is_a_png(tmp_path: Path) -> None:
    path = loss_plot([5.0, 4.0, 3.5, 3.2], "phase1", tmp_path / "loss.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100

