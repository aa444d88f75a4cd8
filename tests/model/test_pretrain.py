from __future__ import annotations

import math
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from model.checkpoint import CheckpointError
from model.config import ModelConfig
from model.data import DocumentStore, PackedDataset, ResumableSampler, make_loader
from model.model import InternLM2
from model.pretrain import (
    OptimConfig,
    PackedDataModule,
    PretrainModule,
    RankBatches,
    from_pretrained_weights,
    lr_factor,
    param_groups,
)

SMOKE = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


def counting_docs(n: int, seed: int = 0) -> list[list[int]]:
    """Documents that count upward from a random start: next-token structure a tiny model learns in a few steps."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        start, length = int(rng.integers(0, 500)), int(rng.integers(8, 40))
        docs.append([(start + i) % 500 + 3 for i in range(length)])
    return docs


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedule


def test_lr_schedule_warms_up_linearly_then_cosine_to_ten_percent() -> None:
    o = OptimConfig(lr=1e-3, warmup_steps=4, total_steps=20)
    assert [lr_factor(s, o) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lr_factor(4, o) == pytest.approx(1.0)  # the cosine starts at the peak
    assert lr_factor(12, o) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # halfway: 0.55
    assert lr_factor(20, o) == pytest.approx(0.1)
    assert lr_factor(30, o) == pytest.approx(0.1)  # past total_steps: holds the floor
    assert all(lr_factor(s, o) > lr_factor(s + 1, o) for s in range(4, 20))


def test_scheduler_from_configure_optimizers_follows_lr_factor_per_optimizer_step() -> None:
    o = OptimConfig(lr=2e-3, warmup_steps=3, total_steps=10)
    module = PretrainModule(SMOKE, o)
    conf = module.configure_optimizers()
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"
    seen = []
    for _ in range(12):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen == [[pytest.approx(2e-3 * lr_factor(s, o))] * 2 for s in range(12)]


def test_weight_decay_skips_norms_and_decays_every_matrix() -> None:
    module = PretrainModule(SMOKE, OptimConfig(warmup_steps=0, total_steps=10))
    optimizer = module.configure_optimizers()["optimizer"]
    by_name = {g["name"]: g for g in optimizer.param_groups}
    assert by_name["decay"]["weight_decay"] == 0.1 and by_name["no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in module.model.named_parameters()}
    no_decay = {names[id(p)] for p in by_name["no_decay"]["params"]}
    assert no_decay == {n for n, p in module.model.named_parameters() if p.ndim == 1}
    assert all(n.endswith("norm.weight") for n in no_decay) and len(no_decay) == 2 * SMOKE.n_layers + 1
    decay = {names[id(p)] for p in by_name["decay"]["params"]}
    assert {"tok_embeddings.weight", "output.weight", "layers.0.attention.wqkv.weight"} <= decay
    assert optimizer.defaults["fused"] is True and optimizer.defaults["betas"] == (0.9, 0.95)


def test_param_groups_leave_out_an_empty_group() -> None:
    groups = param_groups(torch.nn.Linear(3, 4, bias=False), 0.1)
    assert [g["name"] for g in groups] == ["decay"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"warmup_steps": 5, "total_steps": 4}, "warmup_steps <= total_steps"),
        ({"warmup_steps": 0, "total_steps": 0}, "total_steps >= 1"),
        ({"warmup_steps": 0, "total_steps": 4, "lr": 0.0}, "lr > 0"),
        ({"warmup_steps": 0, "total_steps": 4, "min_lr_ratio": 1.5}, "min_lr_ratio"),
    ],
)
def test_optim_config_rejects_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OptimConfig(**kwargs)


def test_optim_config_round_trips_through_a_dict() -> None:
    o = OptimConfig(lr=1e-3, warmup_steps=2, total_steps=9)
    data = {**o.to_dict(), "betas": list(o.betas)}  # as it reads back from a checkpoint or JSON
    assert OptimConfig.from_dict(data) == o


# ---------------------------------------------------------------------------------------------------------------
# Packed batches


def per_position_ce(model: InternLM2, tokens: torch.Tensor, targets: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
    """(B, T) cross-entropy of every position; 0 where the target is ignored."""
    logits = model(tokens, **kw)  # (B, T, V)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=-100)
    return ce.view_as(targets)


def test_packed_sample_gives_each_document_the_loss_it_has_alone() -> None:
    torch.manual_seed(0)
    model = InternLM2(SMOKE).eval()
    docs = [[5, 9, 13, 17, 21, 25, 29, 33, 37, 41], [100, 7, 100, 7, 100, 7, 100], [300 + i for i in range(12)]]
    total = sum(map(len, docs))
    dataset = PackedDataset(DocumentStore.from_docs(docs), total - 1, seed=3)  # one sample holding every document
    sample = {k: v[None] for k, v in dataset[0].items()}
    with torch.no_grad():
        ce = per_position_ce(model, sample["tokens"], sample["targets"], segment_ids=sample["segment_ids"])[0]
        seg = sample["segment_ids"][0]
        for s in range(len(docs)):
            doc = next(d for d in docs if d[0] == int(sample["tokens"][0][seg == s][0]))  # first tokens differ
            alone = per_position_ce(model, torch.tensor([doc[:-1]]), torch.tensor([doc[1:]]))[0]
            assert_close(ce[seg == s].sum(), alone.sum(), rtol=1e-5, atol=1e-5)
        packed = model.loss(sample["tokens"], sample["targets"], segment_ids=sample["segment_ids"])
        n_valid = int((sample["targets"] != -100).sum())
        assert n_valid == total - len(docs)  # no target crosses a document boundary
        assert_close(packed, ce.sum() / n_valid, rtol=1e-5, atol=1e-5)
        unmasked = model.loss(sample["tokens"], sample["targets"])
    assert not torch.allclose(packed, unmasked)  # the mask and restarting positions do change the loss


# ---------------------------------------------------------------------------------------------------------------
# Data position


def test_rank_batches_match_make_loader_on_one_rank_and_partition_global_batches() -> None:
    dataset = PackedDataset(DocumentStore.from_docs(counting_docs(30)), 16, seed=0)
    reference = [b["tokens"] for b in islice(make_loader(dataset, 4, seed=7, start_sample=8), 6)]
    single = RankBatches(ResumableSampler(len(dataset), seed=7, start=8), 4)
    ours = [torch.stack([dataset[i]["tokens"] for i in idx]) for idx in islice(single, 6)]
    assert len(ours) == 6 and all(torch.equal(a, b) for a, b in zip(reference, ours, strict=True))
    whole = list(islice(RankBatches(ResumableSampler(len(dataset), seed=7), 4), 5))
    ranks = [list(islice(RankBatches(ResumableSampler(len(dataset), seed=7), 2, rank=r, world_size=2), 5))
             for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == whole


def quiet_trainer(**kw: Any) -> L.Trainer:
    base = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                enable_model_summary=False, limit_val_batches=0, gradient_clip_val=1.0)
    return L.Trainer(**{**base, **kw})


def test_train_dataloader_runs_after_the_checkpoint_restores_the_step(tmp_path: Path) -> None:
    """Lightning 2.6 restores loops before fit_loop.setup_data() asks for the loader: the data position follows."""
    dataset = PackedDataset(DocumentStore.from_docs(counting_docs(60)), 16, seed=0)
    optim = OptimConfig(lr=1e-3, warmup_steps=0, total_steps=6)
    first = quiet_trainer(max_steps=4, accumulate_grad_batches=3)
    first.fit(PretrainModule(SMOKE, optim), datamodule=PackedDataModule(dataset, 2, 3, seed=1))
    first.save_checkpoint(tmp_path / "step4.ckpt")
    data = PackedDataModule(dataset, 2, 3, seed=1)
    quiet_trainer(max_steps=6, accumulate_grad_batches=3).fit(
        PretrainModule(SMOKE, optim), datamodule=data, ckpt_path=tmp_path / "step4.ckpt"
    )
    assert data.start_sample == 4 * 2 * 3


# ---------------------------------------------------------------------------------------------------------------
# The LightningModule in a Trainer


class StepMetrics(L.Callback):
    """The metrics Lightning holds after each optimizer step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.last_step = 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step != self.last_step:
            self.last_step = trainer.global_step
            self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_training_logs_loss_lr_tokens_and_grad_norm_per_optimizer_step() -> None:
    L.seed_everything(0)
    dataset = PackedDataset(DocumentStore.from_docs(counting_docs(120)), 32, seed=0)
    optim = OptimConfig(lr=1e-2, warmup_steps=2, total_steps=6)
    module = PretrainModule(SMOKE, optim)
    metrics = StepMetrics()
    trainer = quiet_trainer(max_steps=6, accumulate_grad_batches=2, callbacks=[metrics])
    trainer.fit(module, datamodule=PackedDataModule(dataset, batch_size=3, accumulate=2, seed=0))
    assert trainer.global_step == 6 and len(metrics.rows) == 6 and len(module.loss_history) == 6
    assert [r["train/lr"] for r in metrics.rows] == pytest.approx([1e-2 * lr_factor(s, optim) for s in range(6)])
    assert [r["train/tokens"] for r in metrics.rows] == [float((s + 1) * 2 * 3 * 32) for s in range(6)]
    assert [r["train/loss"] for r in metrics.rows] == pytest.approx(module.loss_history)
    assert all(r["train/grad_norm"] > 0 and r["train/tokens_per_s"] > 0 for r in metrics.rows)
    assert module.tokens_seen == 6 * 2 * 3 * 32


class GradNormAfterStep(L.Callback):
    """The gradient norm the optimizer stepped with: Lightning zeroes gradients only inside the next closure."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.norm = float(torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters()]))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradients_are_clipped_with_the_fused_optimizer_in_either_precision(precision: str) -> None:
    dataset = PackedDataset(DocumentStore.from_docs(counting_docs(20)), 32, seed=0)
    module = PretrainModule(SMOKE, OptimConfig(warmup_steps=0, total_steps=2))
    after = GradNormAfterStep()
    trainer = quiet_trainer(max_steps=1, precision=precision, gradient_clip_val=0.05, callbacks=[after])
    trainer.fit(module, datamodule=PackedDataModule(dataset, batch_size=2, accumulate=1, seed=0))
    assert trainer.callback_metrics["train/grad_norm"] > 0.5  # before clipping
    assert after.norm == pytest.approx(0.05, rel=1e-3)
    assert trainer.optimizers[0].defaults["fused"] is True


def test_hyperparameters_are_plain_dicts_that_rebuild_the_module() -> None:
    config = SMOKE.replace(rope_theta=1e6)
    module = PretrainModule(config, OptimConfig(lr=1e-3, warmup_steps=1, total_steps=5), packing_masks=False)
    hp = dict(module.hparams)
    assert hp["model_config"] == config.to_dict() and hp["optim"]["lr"] == 1e-3 and hp["packing_masks"] is False
    again = PretrainModule(**hp)
    assert again.model.config == config and again.optim == module.optim


def test_from_pretrained_weights_keeps_the_new_config_and_rejects_other_shapes() -> None:
    torch.manual_seed(0)
    previous = InternLM2(SMOKE)
    module = PretrainModule(SMOKE.replace(rope_theta=1e6, max_seq_len=512), OptimConfig(warmup_steps=0, total_steps=1))
    from_pretrained_weights(module, previous.state_dict())
    for name, tensor in previous.state_dict().items():
        assert torch.equal(module.model.state_dict()[name], tensor), name
    assert module.model.config.rope_theta == 1e6 and module.model.config.max_seq_len == 512
    wider = PretrainModule(SMOKE.replace(dim=128), OptimConfig(warmup_steps=0, total_steps=1))
    with pytest.raises(CheckpointError, match="shape"):
        from_pretrained_weights(wider, previous.state_dict(), source="phase1/final")
