"""Greedy generation with a preallocated KV cache, driving the model's own modules (embedding, norms,
projections, MLP, head) directly.

HF `generate` spends most of a token step in Python around those modules (~75 ms a step for A.X 4.0 Light
on an H100, whatever the batch); this loop runs the same arithmetic with a few ops per layer. It covers the
Qwen2 family (A.X 4.0 Light) with full attention, plain or 4-bit weights (4-bit with any LoRA update
merged), greedy decoding only; anything else goes to HF `generate`. Measured (bench/RESULTS.md):
the merged A.X-shape model answers 15 questions x 64 tokens in 2.4 s instead of 4.7 s (H100); the 4-bit
model with LoRA merged on the fly, 300 x 64 tokens in 4.75 s instead of 6.19 s (H200); with peft's LoRA
branches the loop was slower than HF `generate` (11.2 s against ~8.6 s, H100), so those keep HF's.
Grouped-query attention is computed by grouping the query heads of each KV head, so the cache is never
repeated per head; attention scores and softmax run in fp32.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from decode.forward import causal_lm


def supports(model) -> bool:
    """Qwen2 family, full attention; a 4-bit model only with its LoRA updates merged (eval's merged-on-the-fly
    model), since the loop ran slower than HF `generate` through 4-bit layers with peft's LoRA branches."""
    from engine.lora import runs_lora_branches
    from engine.lora import is_4bit

    lm = causal_lm(model)
    cfg = lm.config
    quantized = any(is_4bit(p) for p in lm.parameters())
    return getattr(cfg, "model_type", "") == "qwen2" and not getattr(cfg, "use_sliding_window", False) \
        and not (quantized and runs_lora_branches(model))


def _no_autocast(device: torch.device):
    return torch.autocast(device.type, enabled=False) if device.type == "cuda" else contextlib.nullcontext()


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
               scale: float) -> torch.Tensor:
    """q [B, H, T, D] against keys/values [B, KV, S, D]; allowed [B, T, S]. Returns [B, T, H * D]."""
    b, h, t, d = q.shape
    kv = keys.shape[1]
    g = h // kv  # query head j*g + r reads KV head j, as HF's repeat_kv lays them out
    with _no_autocast(q.device):
        scores = q.float().reshape(b, kv, g * t, d) @ keys.float().transpose(-1, -2) * scale
        mask = allowed[:, None, None].expand(b, 1, g, t, allowed.shape[-1]).reshape(b, 1, g * t, -1)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out = (probs @ values.float()).reshape(b, h, t, d).to(q.dtype)
    return out.transpose(1, 2).reshape(b, t, h * d)


def _layer(layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: list[torch.Tensor], total: int,
           start: int, allowed: torch.Tensor, head_dim: int) -> torch.Tensor:
    """One decoder layer over positions [start, start + T) of a cache of `total` positions; earlier
    positions are already cached."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    b, t, _ = h.shape
    attn = layer.self_attn
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(b, t, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, -1, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if not cache:  # allocated at the prompt pass, in the dtype the projections produce
        cache += [torch.empty(b, k.shape[1], total, head_dim, dtype=k.dtype, device=k.device) for _ in range(2)]
    cache[0][:, :, start:start + t] = k
    cache[1][:, :, start:start + t] = v
    out = _attention(q, cache[0][:, :, :start + t], cache[1][:, :, :start + t], allowed, head_dim ** -0.5)
    h = h + attn.o_proj(out)
    return h + layer.mlp(layer.post_attention_layernorm(h))


@torch.no_grad()
def greedy_generate(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos_id: int, pad_id: int,
                    ban: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """New tokens [B, <= max_new_tokens] for left-padded prompts, as HF greedy `generate` with
    min_new_tokens=1 gives them: at least one token before end-of-turn, then `pad_id` after it. `ban(generated,
    logits)` may mask logits (the no-repeat rule) before each argmax."""
    lm = causal_lm(model)
    decoder, head, cfg = lm.get_decoder(), lm.get_output_embeddings(), lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    b, p = ids.shape
    total = p + max_new_tokens
    device = ids.device
    valid = torch.zeros(b, total, dtype=torch.bool, device=device)
    valid[:, :p] = mask.bool()
    valid[:, p:] = True
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    causal = torch.ones(p, p, dtype=torch.bool, device=device).tril()
    # a padding query may see itself, so no row of scores is all -inf (NaN) and padding stays finite
    allowed = causal[None] & valid[:, None, :p] | torch.eye(p, dtype=torch.bool, device=device)[None]
    h = decoder.embed_tokens(ids)
    cos, sin = decoder.rotary_emb(h, positions)
    caches: list[list[torch.Tensor]] = [[] for _ in decoder.layers]
    for layer, cache in zip(decoder.layers, caches):
        h = _layer(layer, h, cos, sin, cache, total, 0, allowed, head_dim)
    next_pos = positions[:, -1:] + 1
    generated = torch.full((b, 0), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = head(decoder.norm(h[:, -1])).float()
        if step == 0:
            logits[:, eos_id] = float("-inf")
        if ban is not None:
            logits = ban(generated, logits)
        token = logits.argmax(-1).masked_fill(finished, pad_id)
        generated = torch.cat([generated, token[:, None]], 1)
        finished |= token == eos_id
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        start = p + step
        h = decoder.embed_tokens(token[:, None])
        cos, sin = decoder.rotary_emb(h, next_pos)
        for layer, cache in zip(decoder.layers, caches):
            h = _layer(layer, h, cos, sin, cache, total, start, valid[:, None, :start + 1], head_dim)
        next_pos = next_pos + 1
    return generated
