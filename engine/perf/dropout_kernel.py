"""LoRA's input dropout fused with its A matmul (train.dropout_kernel): `lora_A(dropout(x))` without the
dropped copy of x or its mask ever in memory.

peft drops each LoRA input with PyTorch's dropout: the dropped copy of x is written, read by the A matmul,
drawn again by the recompute of a checkpointed layer, and read again with its mask in backward. A.X 4.0
Light has seven such inputs a layer, 40,448 values a token: at 8 x 2048 tokens on an H200 they cost 75 ms
of a 1.33 s step (measured against dropout off). Here whether an element is kept is a hash of (seed, row,
column), so each kernel recomputes it where it reads x: forward reads x once and writes the rank-r
product; backward reads x once, writes dx and reduces dA.

The dropout is the same function: each element kept with probability 1 - p and scaled by 1 / (1 - p),
independently. Its draws come from the hash (only the seeds from PyTorch's generator, one per LoRA linear,
drawn before each forward: `engine.perf.lora_forward.attach_seeds`), so a run with the kernel drops other
elements than a run without. On the CPU the op runs the same hash as torch ops (`keep_mask`), which is what
the tests compare the CUDA kernels with.
"""
from __future__ import annotations

import torch

from engine.perf.dropout_hash import dropped, keep_mask


@torch.library.custom_op("fsku::lora_a_dropout", mutates_args=())
def lora_a_dropout(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """dropout(x) @ weight.T for a 2-D x (tokens x features) and LoRA A weight (r x features)."""
    if x.is_cuda:
        from engine.perf.dropout_triton import forward
        return forward(x, weight, seed, p)
    return dropped(x, keep_mask(seed, *x.shape, p), p) @ weight.t()


@lora_a_dropout.register_fake
def _(x, weight, seed, p):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("fsku::lora_a_dropout_backward", mutates_args=())
def lora_a_dropout_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
                            p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dweight) of `lora_a_dropout` for the output gradient `grad`, the mask drawn again from `seed`."""
    if x.is_cuda:
        from engine.perf.dropout_triton import backward
        return backward(grad, x, weight, seed, p)
    keep = keep_mask(seed, *x.shape, p)
    dx = dropped(grad @ weight, keep, p)
    return dx, grad.t() @ dropped(x, keep, p)


@lora_a_dropout_backward.register_fake
def _(grad, x, weight, seed, p):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, seed, p = inputs
    ctx.save_for_backward(x, weight, seed)
    ctx.p = p


def _backward(ctx, grad):
    x, weight, seed = ctx.saved_tensors
    dx, dweight = lora_a_dropout_backward(grad.contiguous(), x, weight, seed, ctx.p)
    return dx, dweight, None, None


lora_a_dropout.register_autograd(_backward, setup_context=_setup_context)


def lora_a_with_dropout(x: torch.Tensor, weight: torch.Tensor, p: float, seed: torch.Tensor) -> torch.Tensor:
    """`F.linear(dropout(x, p), weight)` in training, through the fused op with this call's `seed` (one
    element): under autocast in its dtype, as F.linear would compute, else in the weight's, as peft casts x
    to it."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
    flat = x.reshape(-1, x.shape[-1]).to(dtype).contiguous()
    out = lora_a_dropout(flat, weight.to(dtype).contiguous(), seed, float(p))
    return out.view(*x.shape[:-1], weight.shape[0])
