"""Multiple choice by masked scoring: one forward pass a prompt, the last position's logits masked to the
digits of the options the question has, argmax. The answer is always a valid digit; the unmasked top
token is kept so the format-violation rate measures what the model would have said on its own."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch

from decode.batching import left_pad, length_sorted_batches
from decode.forward import last_token_logits
from engine.data import Example
from engine.options import rotated


@dataclass
class MCAnswer:
    choice: str
    raw: str
    """The unconstrained top token, decoded."""


def choice(digit_scores: torch.Tensor, n_options: int) -> str:
    """The answer digit: the best-scored of the first `n_options` digits (scores of digits 1, 2, ...)."""
    return str(int(digit_scores[:n_options].argmax()) + 1)


@torch.no_grad()
def answer_mc(model, tokenizer, examples: Sequence[Example], encode: Callable[[Example], list[int]],
              digit_ids: Sequence[int], batch_size: int, permutations: int = 1) -> list[MCAnswer]:
    """Answer every MC example. With `permutations` > 1 the options are shown in that many cyclic
    orders and each original option's log-probability is averaged over them (less position bias)."""
    device = next(model.parameters()).device
    jobs = []  # (example index, shift, prompt ids)
    for i, ex in enumerate(examples):
        for shift in range(min(max(1, permutations), ex.n_options)):
            shown = ex if shift == 0 else replace(ex, question=rotated(ex.question, shift))
            jobs.append((i, shift, encode(shown)))
    digits = torch.tensor(list(digit_ids), device=device)
    totals = [torch.zeros(ex.n_options) for ex in examples]
    raw = [""] * len(examples)
    for batch in length_sorted_batches([j[2] for j in jobs], batch_size):
        ids, mask = left_pad([jobs[k][2] for k in batch], tokenizer.pad_token_id, device)
        logits = last_token_logits(model, ids, mask)
        top = logits.argmax(-1).tolist()
        digit_logits = logits[:, digits]
        for row, k in enumerate(batch):
            i, shift, _ = jobs[k]
            n = examples[i].n_options
            logp = torch.log_softmax(digit_logits[row, :n], -1).cpu()
            # shown position j holds original option (j + shift) % n
            totals[i] += logp.roll(shift)
            if shift == 0:
                raw[i] = tokenizer.decode([top[row]], skip_special_tokens=False)
    return [MCAnswer(choice(t, len(t)), raw[i]) for i, t in enumerate(totals)]
