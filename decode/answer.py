"""Every question of a set answered as the competition sees it: the one decode path of infer.py and the
in-loop eval. MC rows first, then subjective ones, each kind in length-sorted batches; each batch is yielded as
it is answered, so a caller can write it out (infer.py's partial file) or time it."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Sequence

import torch

from decode.batching import length_sorted_batches
from decode.mc import answer_mc
from decode.subjective import answer_subjective
from engine.config import DecodeConfig
from engine.data import Example


@dataclass
class AnsweredBatch:
    kind: str
    """"mc" or "subj"."""
    rows: list[int]
    """Indices into the examples."""
    answers: list[str]
    """The answer of each row: a digit, or the trimmed text."""
    raw: list[str]
    """MC: the unconstrained top token; subjective: ""."""
    n_tokens: list[int]
    """Subjective: tokens generated before trimming; MC: 0."""
    seconds: float


@torch.no_grad()
def answer_batches(model, tokenizer, examples: Sequence[Example], prompts: Sequence[list[int]],
                   prompt_for: Callable[[Example], list[int]], digit_ids: Sequence[int], settings: DecodeConfig,
                   rows: Collection[int] | None = None, done: Collection[int] = frozenset(),
                   fallbacks: Sequence[str] = ()) -> Iterator[AnsweredBatch]:
    """Answer `rows` (default: all) of `examples`. `prompts[i]` is row i's prompt as decoding sees it (it sets
    the batches); `prompt_for` builds an MC prompt again for shown option orders (decode.mc_permutations).
    A batch whose rows are all in `done` is skipped: a resumed job meets the same batches as the first run.
    `fallbacks[i]` stands in for a subjective answer that is empty after trimming."""
    wanted = range(len(examples)) if rows is None else rows
    for kind, size in (("mc", settings.batch_size), ("subj", settings.subj_batch_size)):
        of_kind = [i for i in wanted if examples[i].kind == kind]
        for batch in length_sorted_batches([prompts[i] for i in of_kind], size):
            picked = [of_kind[k] for k in batch]
            if all(i in done for i in picked):
                continue
            t0 = time.perf_counter()
            if kind == "mc":
                got = answer_mc(model, tokenizer, [examples[i] for i in picked], prompt_for, digit_ids,
                                settings.batch_size, settings.mc_permutations)
                answered = AnsweredBatch(kind, picked, [a.choice for a in got], [a.raw for a in got],
                                         [0] * len(got), 0.0)
            else:
                got = answer_subjective(model, tokenizer, [prompts[i] for i in picked], batch_size=len(picked),
                                        fallbacks=[fallbacks[i] for i in picked] if fallbacks else (),
                                        **settings.generation_kwargs())
                answered = AnsweredBatch(kind, picked, [a.text for a in got], [""] * len(got),
                                         [a.n_tokens for a in got], 0.0)
            answered.seconds = time.perf_counter() - t0
            yield answered
