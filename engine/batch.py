"""A micro-batch as the model sees it: token ids, the attention layout, labels, and which example owns each
token. Two layouts build it: `collate` (one example per row, right-padded) and `engine.perf.packing`
(several examples per row, block-diagonal attention)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from engine.data import Encoded


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
    """How many examples the packed rows hold (known when they are built: counting `example_ids` on the device
    would wait for the GPU every forward). None with one example per row."""

    @property
    def n_examples(self) -> int:
        return int(self.input_ids.shape[0]) if self.packed_examples is None else self.packed_examples

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens."""
        if self.example_ids is None:
            return int(self.attention_mask.sum())
        return int((self.example_ids >= 0).sum())

    @property
    def n_answer_tokens(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())

    @property
    def n_labelled_examples(self) -> int:
        """Examples with at least one answer token (example weighting's denominator)."""
        return int(self.owners(self.labels[:, 1:] != -100).unique().numel())

    def owners(self, keep: torch.Tensor) -> torch.Tensor:
        """The example of each labelled target, for `keep` = (labels[:, 1:] != -100); row-major order."""
        if self.example_ids is None:
            return keep.nonzero()[:, 0]
        return self.example_ids[:, 1:][keep]


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
    return Batch(ids.to(device), mask.to(device), labels.to(device))
