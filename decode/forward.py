"""The decoder stack and the output head of a causal LM, peft-wrapped or not.

Calling the two apart lets training and MC scoring run the 102,400-wide head only on the positions that
matter (answer tokens; the last prompt position) instead of every position of every sequence.
"""
from __future__ import annotations

import torch


def causal_lm(model):
    """The transformers model under a peft wrapper (LoRA layers stay injected in its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_and_head(model):
    lm = causal_lm(model)
    return lm.get_decoder(), lm.get_output_embeddings()


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor | None = None) -> torch.Tensor:
    decoder, _ = decoder_and_head(model)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out[0]


def last_token_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits (fp32) at the last position of left-padded prompts: one head call of shape [batch, vocab]."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = hidden_states(model, input_ids, attention_mask, position_ids)
    _, head = decoder_and_head(model)
    return head(hidden[:, -1]).float()


@torch.no_grad()
def warm_up(model, prompt_ids: list[int], pad_id: int) -> None:
    """One MC-style forward and a two-token generate on one prompt: the first CUDA calls of a process
    (cuBLAS handles, kernel loading, allocator growth) cost seconds, which belong to loading the model,
    not to the first batch of answers."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    last_token_logits(model, ids, mask)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                   pad_token_id=pad_id)
