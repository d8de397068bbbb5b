"""A micro-batch as the model sees it: token ids, the attention layout, labels, which example owns each
token, and the answer slots the loss reads. Two layouts build it: `collate` (one example per row,
right-padded) and `engine.perf.packing` (several examples per row, block-diagonal attention).

Everything the loss needs to find its answer tokens is worked out on the host when the batch is built
(`Batch.__post_init__`, from labels still on the CPU), padded to a few sizes: a step then never waits for the
GPU to count or gather, and the shapes a forward runs repeat across steps (what CUDA graphs need).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from engine.data import Encoded


def slot_count(n: int) -> int:
    """The padded size of `n` answer slots: the least of 64 x 2^k and 96 x 2^k that holds them."""
    size, other = 64, 96
    while size < n:
        size, other = other, size * 2
    return size


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    """[rows, width] padding mask (1 = token), or [rows, 1, width, width] additive mask for packed rows."""
    labels: torch.Tensor
    """-100 where no loss is taken; a label at position p is predicted by position p - 1."""
    example_ids: Optional[torch.Tensor] = None
    """[rows, width]: the batch-local index of the example each token belongs to, -1 on padding. None means
    one example per row (row r is example r)."""
    position_ids: Optional[torch.Tensor] = None
    """None means 0, 1, 2, ... along each row."""
    packed_examples: Optional[int] = None
    """How many examples the packed rows hold. None with one example per row."""
    answer_index: torch.Tensor = field(init=False)
    """[slots]: for each answer token, the flat position (row x width + column) of the hidden state that
    predicts it, in row-major order, then 0 on the padding slots."""
    answer_targets: torch.Tensor = field(init=False)
    """[slots]: the answer token ids, -100 on the padding slots (cross-entropy ignores them)."""
    answer_owner: torch.Tensor = field(init=False)
    """[slots]: the batch-local example of each answer token, 0 on the padding slots."""
    n_answer_tokens: int = field(init=False)
    n_labelled_examples: int = field(init=False)
    """Examples with at least one answer token (example weighting's denominator)."""
    n_tokens: int = field(init=False)
    """Real (non-padding) tokens."""

    def __post_init__(self):
        labels = self.labels.cpu()
        targets = labels[:, 1:]
        keep = targets != -100
        where = keep.nonzero()
        n = where.shape[0]
        owners = where[:, 0] if self.example_ids is None else self.example_ids.cpu()[:, 1:][keep]
        slots = slot_count(n)
        self.answer_index = torch.zeros(slots, dtype=torch.long)
        self.answer_index[:n] = where[:, 0] * labels.shape[1] + where[:, 1]
        self.answer_targets = torch.full((slots,), -100, dtype=torch.long)
        self.answer_targets[:n] = targets[keep]
        self.answer_owner = torch.zeros(slots, dtype=torch.long)
        self.answer_owner[:n] = owners
        self.n_answer_tokens = n
        self.n_labelled_examples = int(owners.unique().numel())
        self.n_tokens = int(self.attention_mask.sum() if self.example_ids is None else (self.example_ids >= 0).sum())
        device = self.labels.device  # built on the host, the batch moves whole (`to`); else the slots follow
        if device.type != "cpu":
            for name in ("answer_index", "answer_targets", "answer_owner"):
                setattr(self, name, getattr(self, name).to(device))

    @property
    def n_examples(self) -> int:
        return int(self.input_ids.shape[0]) if self.packed_examples is None else self.packed_examples

    @property
    def key(self) -> tuple:
        """What fixes the shapes of this batch's forward and loss: batches of one key run the same kernels."""
        return (tuple(self.input_ids.shape), tuple(self.attention_mask.shape), len(self.answer_index),
                self.n_examples, self.position_ids is None)

    def to(self, device: torch.device | str) -> "Batch":
        """This batch with its tensors on `device` (the host-side counts as they are)."""
        moved = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                setattr(moved, name, value.to(device))
        return moved


def collate(items: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """One example per row, right-padded to the longest item."""
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        ids[row, :n] = torch.tensor(it.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(it.labels)
    return Batch(ids, mask, labels).to(device)
