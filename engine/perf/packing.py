"""Packed steps: a step's examples laid out several to a row, so a forward computes real tokens instead of
padding. Attention is block-diagonal (causal inside each example, never across), positions restart at 0 for
every example and each example's first label is dropped, so every answer token's loss is the one it has
alone in a padded row: the step's loss is the same function, only its layout changes.

Rows are padded to one of a few lengths (64 x 2^k and 96 x 2^k), so the shapes a step runs repeat across
steps; a step takes the row length that pads it least.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import torch

from engine.batch import Batch, collate, slot_count
from engine.config import TrainConfig
from engine.data import Encoded

ROW_LENGTHS = tuple(sorted(base << k for base in (64, 96) for k in range(10)))
"""The lengths a packed row may have: two to an octave, 64 to 49,152."""


def row_lengths_for(longest: int, most: int) -> list[int]:
    """The row lengths that hold an example of `longest` tokens: the shortest such, and longer ones up to
    `most` tokens."""
    fits = [w for w in ROW_LENGTHS if w >= longest]
    if not fits:
        raise ValueError(f"an example of {longest} tokens is longer than any packed row ({ROW_LENGTHS[-1]})")
    return [w for w in fits if w <= most] or fits[:1]


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `capacity` tokens, longest first; deterministic."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fit = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if fit is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


def block_causal_mask(example_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1, width, width] additive mask: a token sees the earlier tokens of its own example only
    (padding, id -1, sees earlier padding, so no query row is empty)."""
    width = example_ids.shape[1]
    same = example_ids[:, :, None] == example_ids[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=example_ids.device).tril()
    mask = torch.zeros(same.shape, dtype=dtype, device=example_ids.device)
    return mask.masked_fill_(~(same & causal), torch.finfo(dtype).min)[:, None]


def pack_rows(items: Sequence[Encoded], rows: Sequence[Sequence[int]], width: int, pad_id: int,
              mask_dtype: torch.dtype, device: torch.device | str = "cpu") -> Batch:
    """One forward's packed rows; `rows` lists the indices of `items` in each row, in row order."""
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, -100, dtype=torch.long)
    owner = torch.full(shape, -1, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    example = 0
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(items[i].input_ids)
            ids[r, at:at + n] = torch.tensor(items[i].input_ids)
            labels[r, at:at + n] = torch.tensor(items[i].labels)
            labels[r, at] = -100  # predicted by the previous example's last token otherwise
            owner[r, at:at + n] = example
            positions[r, at:at + n] = torch.arange(n)
            at, example = at + n, example + 1
    mask = block_causal_mask(owner.to(device), mask_dtype)  # on the device: width^2 values a row
    return Batch(ids, mask, labels, owner, positions, packed_examples=example).to(device)


def packed_layout(lengths: Sequence[int], tokens_per_forward: int) -> tuple[int, list[list[int]]]:
    """The row length and rows (indices into `lengths`) that pad a step least; the shorter length on a tie,
    since attention's cost grows with it."""
    layouts = [(w, first_fit_decreasing(lengths, w)) for w in row_lengths_for(max(lengths), tokens_per_forward)]
    return min(layouts, key=lambda layout: (len(layout[1]) * layout[0], layout[0]))


class Forward(NamedTuple):
    """One forward of a step, before any tensor is built: its rows (indices into the step's items) and width."""
    width: int
    rows: list[list[int]]

    @property
    def tokens(self) -> int:
        return len(self.rows) * self.width

    @property
    def items(self) -> list[int]:
        return [i for row in self.rows for i in row]


def packed_forwards(lengths: Sequence[int], tokens_per_forward: int) -> list[Forward]:
    """A step's examples packed into rows of one length (`packed_layout`), as many rows to a forward as
    `tokens_per_forward` holds (at least one)."""
    width, rows = packed_layout(lengths, tokens_per_forward)
    per_forward = max(1, tokens_per_forward // width)
    return [Forward(width, rows[k:k + per_forward]) for k in range(0, len(rows), per_forward)]


def padded_forwards(lengths: Sequence[int], micro_batch: int, sort: bool) -> list[Forward]:
    """One example per row, `micro_batch` rows to a forward (sorted by length first when asked, to cut
    padding), each forward as wide as its longest example."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    chunks = [order[k:k + micro_batch] for k in range(0, len(order), micro_batch)]
    return [Forward(max(lengths[i] for i in chunk), [[i] for i in chunk]) for chunk in chunks]


def step_layout(lengths: Sequence[int], train: TrainConfig, max_len: int) -> list[Forward]:
    """The forwards of one optimizer step of examples of these lengths: packed (`train.packing`), as many
    tokens to a forward as the recipe's longest micro-batch (`micro_batch x max_len`) could have, or one
    example per row."""
    if train.packing:
        return packed_forwards(lengths, train.micro_batch * max_len)
    return padded_forwards(lengths, train.micro_batch, train.sampler.group_by_length)


def step_batches(items: Sequence[Encoded], pad_id: int, train: TrainConfig, max_len: int,
                 mask_dtype: torch.dtype, device: torch.device | str = "cpu") -> list[Batch]:
    """The batches of `step_layout`, built."""
    layout = step_layout([len(it.input_ids) for it in items], train, max_len)
    if train.packing:
        return [pack_rows(items, f.rows, f.width, pad_id, mask_dtype, device) for f in layout]
    return [collate([items[i] for i in f.items], pad_id, device) for f in layout]


def largest_forward(steps: Iterable[Sequence[int]], lengths: Sequence[int], answer_tokens: Sequence[int],
                    train: TrainConfig, max_len: int) -> tuple[int, int]:
    """The most tokens, and the most answer slots, that any forward of these steps (each a list of example
    indices into `lengths` and `answer_tokens`) holds: what the speed plan sizes memory for."""
    tokens = slots = 0
    for step in steps:
        for f in step_layout([lengths[i] for i in step], train, max_len):
            tokens = max(tokens, f.tokens)
            slots = max(slots, slot_count(sum(answer_tokens[step[i]] for i in f.items)))
    return tokens, slots
