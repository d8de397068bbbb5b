"""Short answers: capped generation (max_new_tokens, no_repeat_ngram_size, greedy or temperature), stopping
at the end-of-turn token, trimmed to at most `max_sentences` sentences."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from decode.batching import left_pad, length_sorted_batches
from decode.fast_generate import greedy_generate, supports
from metrics.text import trim_sentences


def ban_repeats(generated: torch.Tensor, scores: torch.Tensor, n: int) -> torch.Tensor:
    """Mask (in place) every token that would repeat an n-gram of `generated` [batch, tokens so far].

    Vectorised on the device (HF's own processor loops in Python over every row and every token of the
    whole sequence, which dominates a step at large batches), and it looks at the generated tokens only:
    an answer may repeat the question's phrases, which it often must.
    """
    if n < 1 or generated.shape[1] < n:
        return scores
    windows = generated.unfold(1, n, 1)  # [batch, positions, n]
    tail = generated[:, generated.shape[1] - (n - 1):]
    hit = (windows[:, :, : n - 1] == tail[:, None, :]).all(-1) if n > 1 else torch.ones_like(
        windows[:, :, 0], dtype=torch.bool)
    rows, cols = hit.nonzero(as_tuple=True)
    scores[rows, windows[rows, cols, n - 1]] = -float("inf")
    return scores


def no_repeat_ngram_processor(n: int, prompt_len: int):
    """`ban_repeats` as a logits processor for HF `generate` (whose input_ids include the prompt)."""
    from transformers import LogitsProcessor

    class NoRepeatNGram(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            return ban_repeats(input_ids[:, prompt_len:], scores, n)

    return NoRepeatNGram()


@dataclass
class SubjAnswer:
    text: str
    n_tokens: int
    """Tokens generated before trimming (end-of-turn excluded)."""


@torch.no_grad()
def answer_subjective(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int,
                      no_repeat_ngram_size: int, temperature: float, max_sentences: int, max_chars: int,
                      batch_size: int, fast_generate: bool = True, fallbacks: Sequence[str] = ()) -> list[SubjAnswer]:
    """Answer every prompt. `fallbacks[i]` stands in when the model's answer is empty after trimming, so a
    submission never holds an empty answer. Greedy decoding of a supported model goes through our own
    KV-cache loop (`decode.fast_generate`) unless `fast_generate` is off; the rest through HF `generate`."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    out: list[SubjAnswer] = [SubjAnswer("", 0)] * len(prompts)
    for batch in length_sorted_batches(prompts, batch_size):
        ids, mask = left_pad([prompts[k] for k in batch], tokenizer.pad_token_id, device)
        if fast_generate and temperature <= 0 and supports(model):
            new = greedy_generate(model, ids, mask, max_new_tokens, eos, tokenizer.pad_token_id,
                                  lambda g, s: ban_repeats(g, s, no_repeat_ngram_size)).tolist()
        else:
            new = hf_generate(model, ids, mask, max_new_tokens, no_repeat_ngram_size, temperature, eos,
                              tokenizer.pad_token_id)
        for row, k in enumerate(batch):
            tokens = new[row]
            if eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            tokens = [t for t in tokens if t != tokenizer.pad_token_id]
            text = trim_sentences(tokenizer.decode(tokens, skip_special_tokens=True), max_sentences, max_chars)
            if not text and k < len(fallbacks):
                text = fallbacks[k]
            out[k] = SubjAnswer(text, len(tokens))
    return out


def hf_generate(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, no_repeat_ngram_size: int,
                temperature: float, eos: int, pad: int) -> list[list[int]]:
    from transformers import LogitsProcessorList

    processors = LogitsProcessorList([no_repeat_ngram_processor(no_repeat_ngram_size, ids.shape[1])]
                                     if no_repeat_ngram_size else [])
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=1,
                         logits_processor=processors, eos_token_id=eos, pad_token_id=pad, use_cache=True, **sampling)
    return gen[:, ids.shape[1]:].tolist()
