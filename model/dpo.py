"""Direct Preference Optimization (Rafailov et al. 2023): the offline baseline arm of our COOL RLHF benchmark.

The loss, per preference pair, with π the policy and π_ref the frozen reference::

    z = β · [(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))]
    loss = −log σ(z)                                  (the paper's eq. 7, averaged over pairs)

β·(log π − log π_ref) is the *implicit reward* of a response; the logged ``margin`` is z, ``accuracy`` the share of
pairs with z > 0. What we run, and where it departs from or fills in the paper:

- The reference is the SFT model the policy starts from (the paper's π_SFT), copied once at construction and frozen
  (``requires_grad`` off, kept in eval mode, forwarded under ``no_grad``). The paper's fallback of first fine-tuning
  on the chosen responses when no SFT model exists is not done here.
- β = 0.1 by default (the paper uses 0.1 for most runs and 0.5 for TL;DR summarisation).
- log π(y|x) is the *sum* of the response tokens' log-probabilities, as in the paper (not a length-normalised mean,
  as in SimPO/IPO-style variants); it is computed in fp32 whatever the autocast dtype.
- The response is the final assistant turn only: content, tool call (if any) and its ``<|im_end|>``, exactly as
  :func:`model.chat.encode_chat` masks an assistant turn. Earlier assistant turns of a multi-turn prompt are context.
- Optional conservative DPO (cDPO, Mitchell 2023): with ``label_smoothing`` ε each label is taken to be flipped with
  probability ε, so the loss is −(1 − ε)·log σ(z) − ε·log σ(−z); ε = 0 is the paper's loss. Unlike plain DPO it has
  a finite optimum (z = log((1 − ε)/ε)), so margins stop growing on noisy pairs.
- The schedule is :func:`model.pretrain.adamw_schedule` with an :class:`OptimConfig` (the paper: RMSprop, LR 1e-6,
  150 warmup steps, batch 64; :func:`dpo_optim` gives that LR and warmup on our AdamW).
- Pairs longer than ``max_len`` are rejected, never truncated (see :func:`encode_dpo_pair`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from model.chat import Message, encode_chat, parse_assistant
from model.config import ModelConfig
from model.model import InternLM2
from model.pretrain import OptimConfig, PretrainModule, adamw_schedule
from model.tokenizer import Tokenizer

PROMPT_ENDS = ("user", "environment")  # the turn a response answers (as tasks.rlhf.preferences requires)
PAIR_KEYS = ("chosen", "chosen_mask", "rejected", "rejected_mask")

DPOItem = tuple[list[int], list[bool], list[int], list[bool]]  # chosen ids, chosen mask, rejected ids, rejected mask


class PairLike(Protocol):
    """What :func:`encode_dpo_pair` reads from a ``tasks.rlhf.preferences.PreferencePair`` (not imported: model/
    does not depend on tasks/)."""

    chosen: str
    rejected: str

    def prompt_turns(self) -> list[Message]: ...


# ---------------------------------------------------------------------------------------------------------------
# Log-probabilities and loss


def sequence_logps(model: InternLM2, tokens: Tensor, loss_mask: Tensor) -> Tensor:
    """Σ over response tokens of log π(token_t | tokens_<t), one fp32 sum per row: (B,).

    Alignment: ``loss_mask[:, t]`` True means token ``t`` itself is a response token, scored by the logits at
    position ``t − 1`` (the mask :func:`model.chat.encode_chat` returns, unshifted). So ``loss_mask[:, 0]`` must be
    False (nothing predicts the first token) and every row needs a True somewhere after it. Logits are computed only
    at the scored positions, and log-softmax runs in fp32. Right padding (mask False) changes nothing: attention is
    causal, so later tokens cannot reach earlier positions.
    """
    _check_tokens(tokens, loss_mask)
    hidden = model.hidden_states(tokens)  # (B, T, dim)
    scored = loss_mask[:, 1:]  # (B, T-1): position t-1 predicts token t
    rows = scored.nonzero()[:, 0]  # (N,) the row of each scored token
    logits = model.output(hidden[:, :-1][scored])  # (N, vocab), only where a response token is predicted
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, 1:][scored][:, None]).squeeze(1)  # (N,)
    return torch.zeros(tokens.shape[0], dtype=torch.float32, device=tokens.device).index_add(0, rows, logp)


def _check_tokens(tokens: Tensor, loss_mask: Tensor) -> None:
    if tokens.dim() != 2 or tokens.shape != loss_mask.shape:
        raise ValueError(f"tokens and loss_mask must share one (B, T) shape, got {tuple(tokens.shape)} and "
                         f"{tuple(loss_mask.shape)}")
    if tokens.numel() == 0:
        raise ValueError(f"sequence_logps got an empty batch, tokens of shape {tuple(tokens.shape)}")
    if loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be a bool tensor (True on response tokens), got {loss_mask.dtype}")
    if bool(loss_mask[:, 0].any()):
        raise ValueError("loss_mask[:, 0] must be False: no logits predict a sequence's first token (the mask marks "
                         "the scored token itself, not the position that predicts it)")
    empty = (~loss_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no response token (loss_mask all False): nothing to score")


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean over pairs of −(1 − ε)·log σ(z) − ε·log σ(−z), z = β·[(π_c − ref_c) − (π_r − ref_r)]; ε = 0 is DPO.

    Inputs are sequence log-probabilities (B,). Stats, all detached: ``reward_chosen``/``reward_rejected`` (mean
    implicit rewards β·(π − ref)), ``margin`` (mean z) and ``accuracy`` (share of pairs with z > 0).
    """
    _check_loss_inputs([policy_chosen, policy_rejected, ref_chosen, ref_rejected], beta, label_smoothing)
    reward_chosen = beta * (policy_chosen.float() - ref_chosen.float())  # (B,)
    reward_rejected = beta * (policy_rejected.float() - ref_rejected.float())
    z = reward_chosen - reward_rejected
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    stats = {
        "reward_chosen": reward_chosen.detach().mean(),
        "reward_rejected": reward_rejected.detach().mean(),
        "margin": z.detach().mean(),
        "accuracy": (z.detach() > 0).float().mean(),
    }
    return losses.mean(), stats


def _check_loss_inputs(logps: Sequence[Tensor], beta: float, label_smoothing: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the KL coefficient; the paper uses 0.1 to 0.5), got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) (the assumed share of flipped labels), got "
                         f"{label_smoothing}")
    shapes = [tuple(t.shape) for t in logps]
    if len(set(shapes)) != 1 or len(shapes[0]) != 1:
        raise ValueError(f"policy_chosen, policy_rejected, ref_chosen, ref_rejected must be four (B,) tensors of one "
                         f"shape, got {shapes}")
    if shapes[0][0] == 0:
        raise ValueError("dpo_loss got an empty batch (B = 0)")


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def _reply(response: str | Message) -> Message:
    """An assistant turn from generated text (special tokens kept, tool call parsed) or a ready Message."""
    if isinstance(response, Message):
        if response.role != "assistant":
            raise ValueError(f"a DPO response must be an assistant turn, got a {response.role} turn")
        return response
    content, call = parse_assistant(response)
    return Message("assistant", content, call)


def _encode_response(
    prompt: Sequence[Message], response: Message, tokenizer: Tokenizer
) -> tuple[list[int], list[bool]]:
    """Ids of prompt + response and a mask True only on the response's trained tokens (earlier turns are False)."""
    n_prompt = len(encode_chat(prompt, tokenizer)[0])  # encode_chat(prompt + reply) starts with exactly these ids
    ids, mask = encode_chat([*prompt, response], tokenizer)
    return ids, [False] * n_prompt + mask[n_prompt:]


def encode_dpo_pair(
    pair: PairLike | tuple[Sequence[Message], str | Message, str | Message],
    tokenizer: Tokenizer,
    *,
    max_len: int | None = None,
) -> DPOItem:
    """(chosen_ids, chosen_mask, rejected_ids, rejected_mask) for a ``PreferencePair`` or (prompt, chosen, rejected).

    Each sequence is ``encode_chat(prompt + [response])``; its mask is True on the final assistant turn only (content,
    action and ``<|im_end|>``). Responses given as text are generated assistant text with special tokens kept, split
    into content and tool call by :func:`model.chat.parse_assistant`. ``max_len``: a pair with either sequence longer
    raises ValueError rather than being truncated, because cutting the response changes what is compared and cutting
    the prompt's left drops its system turn; filter long pairs before training.
    """
    prompt, chosen, rejected = _unpack(pair)
    if not prompt or prompt[-1].role not in PROMPT_ENDS:
        last = prompt[-1].role if prompt else "nothing"
        raise ValueError(f"a DPO prompt must end with one of {PROMPT_ENDS}, the turn the responses answer; got {last}")
    chosen_ids, chosen_mask = _encode_response(prompt, _reply(chosen), tokenizer)
    rejected_ids, rejected_mask = _encode_response(prompt, _reply(rejected), tokenizer)
    longest = max(len(chosen_ids), len(rejected_ids))
    if max_len is not None and longest > max_len:
        raise ValueError(f"pair is {longest} tokens long (chosen {len(chosen_ids)}, rejected {len(rejected_ids)}), "
                         f"over max_len={max_len}; filter long pairs out before training (they are not truncated)")
    if chosen_ids == rejected_ids:
        raise ValueError("chosen and rejected encode to the same ids: nothing to prefer")
    return chosen_ids, chosen_mask, rejected_ids, rejected_mask


def _unpack(pair: Any) -> tuple[list[Message], str | Message, str | Message]:
    if hasattr(pair, "prompt_turns"):
        return list(pair.prompt_turns()), pair.chosen, pair.rejected
    if isinstance(pair, (tuple, list)) and len(pair) == 3:
        prompt, chosen, rejected = pair
        return list(prompt), chosen, rejected
    raise ValueError(f"encode_dpo_pair takes a PreferencePair or (prompt_messages, chosen, rejected), "
                     f"got {type(pair).__name__}")


def collate_dpo(items: Sequence[DPOItem], pad_id: int) -> dict[str, Tensor]:
    """Right-pad items from :func:`encode_dpo_pair` to one T for chosen and rejected alike.

    Returns ``chosen``/``rejected`` (B, T) long and ``chosen_mask``/``rejected_mask`` (B, T) bool, False on padding.
    """
    if not items:
        raise ValueError("collate_dpo got no items")
    for i, item in enumerate(items):
        if len(item) != 4 or len(item[0]) != len(item[1]) or len(item[2]) != len(item[3]):
            raise ValueError(f"item {i} must be (chosen_ids, chosen_mask, rejected_ids, rejected_mask) with each mask "
                             f"as long as its ids, got lengths {[len(x) for x in item]}")
    T = max(len(item[k]) for item in items for k in (0, 2))
    batch: dict[str, Tensor] = {}
    for k, name in enumerate(PAIR_KEYS):
        fill, dtype = (False, torch.bool) if name.endswith("_mask") else (pad_id, torch.long)
        batch[name] = torch.tensor([list(item[k]) + [fill] * (T - len(item[k])) for item in items], dtype=dtype)
    return batch


# ---------------------------------------------------------------------------------------------------------------
# Training


def dpo_optim(total_steps: int, warmup_steps: int = 150) -> OptimConfig:
    """The paper's LR (1e-6) and warmup (150 steps), held constant after it, on our AdamW (the paper used RMSprop)."""
    warmup = min(warmup_steps, total_steps)
    return OptimConfig(lr=1e-6, weight_decay=0.0, min_lr_ratio=1.0, warmup_steps=warmup, total_steps=total_steps)


class DPOModule(L.LightningModule):
    """Trains ``policy`` by DPO against ``reference``, a frozen copy of the policy made at construction.

    Start from an SFT model with :meth:`from_lm`. Batches come from :func:`collate_dpo`. Both models' weights are in
    the checkpoint (the reference is needed to resume); :func:`policy_state_dict` extracts the policy for saving.
    """

    # Same fix as pretraining: Lightning refuses to clip for a fused optimizer under bf16 autocast, needlessly.
    configure_gradient_clipping = PretrainModule.configure_gradient_clipping

    def __init__(
        self,
        model_config: ModelConfig | Mapping[str, Any],
        optim: OptimConfig | Mapping[str, Any],
        beta: float = 0.1,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if not beta > 0 or not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"DPOModule needs beta > 0 and 0 <= label_smoothing < 0.5, got {beta}, {label_smoothing}")
        config = model_config if isinstance(model_config, ModelConfig) else ModelConfig.from_dict(dict(model_config))
        self.optim = optim if isinstance(optim, OptimConfig) else OptimConfig.from_dict(optim)
        self.beta, self.label_smoothing = beta, label_smoothing
        self.save_hyperparameters({"model_config": config.to_dict(), "optim": self.optim.to_dict(), "beta": beta,
                                   "label_smoothing": label_smoothing})
        self.policy = InternLM2(config)
        self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()

    @classmethod
    def from_lm(cls, lm: InternLM2, optim: OptimConfig, beta: float = 0.1, label_smoothing: float = 0.0) -> DPOModule:
        """Policy and reference both start as copies of ``lm`` (the SFT model), on its device and dtype."""
        ref = lm.tok_embeddings.weight
        module = cls(lm.config, optim, beta, label_smoothing).to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            module.policy.load_state_dict(lm.state_dict(), strict=True)
            module.reference.load_state_dict(lm.state_dict(), strict=True)
        return module

    def train(self, mode: bool = True) -> DPOModule:
        """Put the policy in ``mode``; the reference stays in eval whatever a caller or Lightning's loops ask."""
        super().train(mode)
        self.reference.eval()
        return self

    def logps(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(policy_chosen, policy_rejected, ref_chosen, ref_rejected), each (B,): one (2B, T) forward per model."""
        tokens = torch.cat([batch["chosen"], batch["rejected"]])  # (2B, T): collate_dpo gives both one T
        mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]])
        policy_chosen, policy_rejected = sequence_logps(self.policy, tokens, mask).chunk(2)
        with torch.no_grad():
            ref_chosen, ref_rejected = sequence_logps(self.reference, tokens, mask).chunk(2)
        return policy_chosen, policy_rejected, ref_chosen, ref_rejected

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, "dpo")
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def _step(self, batch: Mapping[str, Tensor], prefix: str) -> Tensor:
        loss, stats = dpo_loss(*self.logps(batch), beta=self.beta, label_smoothing=self.label_smoothing)
        size = batch["chosen"].shape[0]
        self.log(f"{prefix}/loss", loss, prog_bar=True, batch_size=size)
        for name in ("margin", "accuracy", "reward_chosen", "reward_rejected"):
            self.log(f"{prefix}/{name}", stats[name], batch_size=size)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_schedule(self.policy, self.optim, self.device)


def policy_state_dict(source: DPOModule | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The policy's plain InternLM2 state dict (detached CPU copies), for ``model.checkpoint.save_native`` or
    ``InternLM2.load_state_dict``; from a module, or from a DPO Lightning checkpoint's ``state_dict``.

    ``model.checkpoint.load_model`` reads a ``.ckpt`` under the ``model.`` prefix, which a DPO checkpoint lacks
    (``policy.`` and ``reference.``): go through this function instead.
    """
    if isinstance(source, DPOModule):
        state: Mapping[str, Tensor] = source.policy.state_dict()
    else:
        state = {k.removeprefix("policy."): v for k, v in source.items() if k.startswith("policy.")}
        if not state:
            raise ValueError(f"no policy.* tensors in this state dict (keys start {sorted(source)[:3]}): expected a "
                             "DPOModule checkpoint's state_dict")
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in state.items()}
