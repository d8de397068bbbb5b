"""Cross-entropy on answer tokens only, with the head applied to those positions alone."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from decode.forward import decoder_and_head, hidden_states
from engine.data import Encoded


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_answer_tokens(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())


def collate(items: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """Right-pad to the longest item of the micro-batch."""
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        ids[row, :n] = torch.tensor(it.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(it.labels)
    return Batch(ids.to(device), mask.to(device), labels.to(device))


def answer_token_losses(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-answer-token cross-entropy (fp32) and the batch row each token belongs to."""
    hidden = hidden_states(model, batch.input_ids, batch.attention_mask)
    targets = batch.labels[:, 1:]
    keep = targets != -100
    _, head = decoder_and_head(model)
    logits = head(hidden[:, :-1][keep]).float()
    ce = F.cross_entropy(logits, targets[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    return ce, rows


def weighted_loss_sum(ce: torch.Tensor, rows: torch.Tensor, n_rows: int, weighting: str) -> torch.Tensor:
    """The micro-batch's share of the step loss, before division by the step's denominator.

    token: sum of token losses (the step divides by its answer-token count);
    example: sum of per-example mean losses (the step divides by its example count).
    """
    if weighting == "token":
        return ce.sum()
    counts = torch.zeros(n_rows, device=ce.device).index_add_(0, rows, torch.ones_like(ce))
    sums = torch.zeros(n_rows, device=ce.device).index_add_(0, rows, ce)
    return (sums[counts > 0] / counts[counts > 0]).sum()
