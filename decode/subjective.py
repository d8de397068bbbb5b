"""Short answers: capped generation (max_new_tokens, no_repeat_ngram_size, greedy or temperature), stopping
at the end-of-turn token, trimmed to at most `max_sentences` sentences."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from decode.batching import left_pad, length_sorted_batches
from metrics.text import trim_sentences


def no_repeat_ngram_processor(n: int, prompt_len: int):
    """A logits processor banning any token that would repeat an n-gram of the answer generated so far.

    Vectorised on the device (HF's own processor loops in Python over every row and every token of the
    whole sequence, which dominates a step at large batches), and it looks at the generated tokens only:
    an answer may repeat the question's phrases, which it often must.
    """
    from transformers import LogitsProcessor

    class NoRepeatNGram(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            gen = input_ids[:, prompt_len:]
            if n < 1 or gen.shape[1] < n:
                return scores
            windows = gen.unfold(1, n, 1)  # [batch, positions, n]
            tail = gen[:, gen.shape[1] - (n - 1):]
            hit = (windows[:, :, : n - 1] == tail[:, None, :]).all(-1) if n > 1 else torch.ones_like(
                windows[:, :, 0], dtype=torch.bool)
            rows, cols = hit.nonzero(as_tuple=True)
            scores[rows, windows[rows, cols, n - 1]] = -float("inf")
            return scores

    return NoRepeatNGram()


@dataclass
class SubjAnswer:
    text: str
    n_tokens: int
    """Tokens generated before trimming (end-of-turn excluded)."""


@torch.no_grad()
def answer_subjective(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int,
                      no_repeat_ngram_size: int, temperature: float, max_sentences: int, max_chars: int,
                      batch_size: int, fallbacks: Sequence[str] = (),
                      on_batch: Callable[[int], None] | None = None) -> list[SubjAnswer]:
    """Answer every prompt. `fallbacks[i]` stands in when the model's answer is empty after trimming, so a
    submission never holds an empty answer."""
    from transformers import LogitsProcessorList

    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    out: list[SubjAnswer] = [SubjAnswer("", 0)] * len(prompts)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    for batch in length_sorted_batches(prompts, batch_size):
        ids, mask = left_pad([prompts[k] for k in batch], tokenizer.pad_token_id, device)
        processors = LogitsProcessorList([no_repeat_ngram_processor(no_repeat_ngram_size, ids.shape[1])]
                                         if no_repeat_ngram_size else [])
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=1,
                             logits_processor=processors, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                             use_cache=True, **sampling)
        new = gen[:, ids.shape[1]:].tolist()
        for row, k in enumerate(batch):
            tokens = new[row]
            if eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            tokens = [t for t in tokens if t != tokenizer.pad_token_id]
            text = trim_sentences(tokenizer.decode(tokens, skip_special_tokens=True), max_sentences, max_chars)
            if not text and k < len(fallbacks):
                text = fallbacks[k]
            out[k] = SubjAnswer(text, len(tokens))
        if on_batch:
            on_batch(len(batch))
    return out
