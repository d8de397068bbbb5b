"""What a model's weights are and how its LoRA layers are read: 4-bit or plain, dequantized, and the LoRA
update merged into the weight on the fly for eval and inference (one matmul a layer). The training-side LoRA
forwards (fused update, dropout kernel) are in `engine.perf.lora_forward`."""
from __future__ import annotations

import contextlib
import functools

import torch

from decode.forward import causal_lm


def is_4bit(param) -> bool:
    """A bitsandbytes 4-bit weight (Params4bit carries its quant state)."""
    return getattr(param, "quant_state", None) is not None


def dense_weight(linear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight a (possibly 4-bit) linear layer computes with, in `dtype`. A plain weight already in
    `dtype` comes back as itself: never modify the result in place."""
    weight = linear.weight
    if is_4bit(weight):
        import bitsandbytes.functional as bnbf
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    return weight.detach().to(dtype)


def named_lora_linears(model) -> list[tuple[str, torch.nn.Module]]:
    """peft's LoRA layers over a linear (plain or 4-bit), with their module names."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)]


def lora_linears(model) -> list[torch.nn.Module]:
    return [m for _, m in named_lora_linears(model)]


def runs_lora_branches(model) -> bool:
    """Whether some active LoRA layer of `model` computes its update apart from the base matmul (peft's
    forward or the addmm one), rather than merged into the weight."""
    return any(not m.disable_adapters and not m.merged and m.active_adapters
               and getattr(m.forward, "func", None) is not merged_forward for m in lora_linears(model))


def merged_forward(self, dtype: torch.dtype, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The layer as one matmul, its LoRA update added into the dequantized weight for this call: eval mode
    (no dropout) and no grad only."""

    base = self.base_layer
    if self.disable_adapters or self.merged:
        return base(x, *args, **kwargs)
    weight = dense_weight(base, dtype)
    for adapter in self.active_adapters:
        if adapter in self.lora_A:
            weight = torch.addmm(weight, self.lora_B[adapter].weight.to(dtype), self.lora_A[adapter].weight.to(dtype),
                                 alpha=self.scaling[adapter])
    bias = None if base.bias is None else base.bias.to(dtype)
    return torch.nn.functional.linear(x.to(dtype), weight, bias)


@contextlib.contextmanager
def lora_merged_on_the_fly(model):
    """Inside: no grad, and every LoRA linear of `model` (in eval mode) computes `merged_forward`.

    A 4-bit projection costs a dequantize, one addmm into the dequantized weight and one matmul, where peft
    runs the base matmul, two LoRA matmuls, a scale and an add, each a module call or op of its own: eval
    forwards and generation steps are host-bound, so the op count is their time. The same function up to
    the bf16 rounding of the merged weight (what infer.py's merged model computes). On exit each layer's
    forward is what it was (peft's, or `training_forward`).
    """

    dtype = causal_lm(model).get_input_embeddings().weight.dtype  # the unquantized weights': bf16 on CUDA
    modules = lora_linears(model)
    before = [m.__dict__.get("forward") for m in modules]
    try:
        for m in modules:
            m.forward = functools.partial(merged_forward, m, dtype)
        with torch.no_grad():
            yield model
    finally:
        for m, forward in zip(modules, before):
            if forward is None:
                del m.forward
            else:
                m.forward = forward
