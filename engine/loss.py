"""Cross-entropy on answer tokens only, with the head applied to those positions alone."""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from decode.forward import decoder_and_head, hidden_states
from engine.batch import Batch


def _head_ce(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def answer_positions(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last hidden state at every answer slot of `batch` (the position that predicts an answer token),
    that token (-100 on padding slots) and its example: row-major order, so an example's first entry
    predicts its first answer token. The first `batch.n_answer_tokens` slots are the real ones."""
    hidden = hidden_states(model, batch.input_ids, batch.attention_mask, batch.position_ids)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.answer_index)
    return h, batch.answer_targets, batch.answer_owner


def answer_token_losses(model, batch: Batch, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-answer-slot cross-entropy (fp32; 0 on padding slots), the slots' targets and their examples.

    With `chunk` > 0 and more slots than that, the head and the loss run `chunk` positions at a time under
    activation checkpointing, so the fp32 logits of at most one chunk ever exist (they are recomputed in
    backward): 8 x 2048 labelled tokens would otherwise hold 6.7 GB of logits. The head draws no random
    numbers, so its recompute needs no saved RNG state (which CUDA graph capture could not read).
    """
    h, t, owners = answer_positions(model, batch)
    _, head = decoder_and_head(model)
    if chunk and h.shape[0] > chunk and torch.is_grad_enabled():
        ce = torch.cat([checkpoint(_head_ce, head, h[i:i + chunk], t[i:i + chunk], use_reentrant=False,
                                   preserve_rng_state=False)
                        for i in range(0, h.shape[0], chunk)])
    else:
        ce = _head_ce(head, h, t)
    return ce, t, owners


def weighted_loss_sum(ce: torch.Tensor, targets: torch.Tensor, owners: torch.Tensor, n_examples: int,
                      weighting: str) -> torch.Tensor:
    """The micro-batch's share of the step loss, before division by the step's denominator.

    token: sum of token losses (the step divides by its answer-token count);
    example: sum of per-example mean losses (the step divides by its example count). Padding slots
    (target -100) count for neither; no shape depends on the data, so the sum runs without a wait.
    """
    if weighting == "token":
        return ce.sum()
    real = (targets != -100).to(ce.dtype)
    counts = torch.zeros(n_examples, device=ce.device).index_add_(0, owners, real)
    sums = torch.zeros(n_examples, device=ce.device).index_add_(0, owners, ce)
    return (sums / counts.clamp(min=1)).sum()


def micro_batch_loss(model, batch: Batch, weighting: str, chunk: int, denom: float | torch.Tensor) -> torch.Tensor:
    """One micro-batch's share of the step loss (divided by the whole step's `denom`), ready for backward."""
    with autocast(batch.input_ids.device):
        ce, targets, owners = answer_token_losses(model, batch, chunk)
    return weighted_loss_sum(ce, targets, owners, batch.n_examples, weighting) / denom


def forward_backward(model, batches: Sequence[Batch], weighting: str, chunk: int = 0,
                     denom: float | None = None) -> torch.Tensor:
    """Accumulate the gradient of one optimizer step over its micro-batches; returns the step's loss.

    Each micro-batch's summed loss is divided by the whole step's answer-token count (token weighting)
    or example count (example weighting) before backward, so the sum of the micro-batch gradients is
    the gradient of the whole batch's loss. `denom` is that count for a step spread over several ranks
    (each rank then passes only its own micro-batches); by default it is counted from `batches`.
    """
    if denom is None:
        denom = step_denominator(batches, weighting)
    loss = torch.zeros((), device=batches[0].input_ids.device)
    for b in batches:
        part = micro_batch_loss(model, b, weighting, chunk, max(1, denom))
        part.backward()
        loss += part.detach()
    return loss


def step_denominator(batches: Sequence[Batch], weighting: str) -> int:
    """The step's answer tokens (token weighting) or examples with an answer (example weighting)."""
    return sum(b.n_answer_tokens if weighting == "token" else b.n_labelled_examples for b in batches)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on CPU, where the tiny models run in fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
