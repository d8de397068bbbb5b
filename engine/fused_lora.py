"""Other ways to compute a peft LoRA linear, each the same function as peft's.

Training (`train.fused_lora`): the update added inside its second matmul. peft computes a LoRA linear as
`base(x).clone() + B(A(dropout(x))) * scale`: the update `B(...)` is written out at the full output width,
then read back with the base output to write their sum. `addmm` adds the rank-r product straight onto the
base output (one read, one write of the output), and the clone goes. On the gate and up projections
(18,944 wide) that is most of the memory traffic LoRA adds to a layer. Same function, same dropout draws in
the same order; only where the sum is formed differs.

Training (`train.dropout_kernel`): `A(dropout(x))` through `engine.dropout_kernel`'s fused op, which never
writes the dropped copy of x (the same dropout, drawn from a hash instead of PyTorch's generator).

Eval (`eval.merge_lora`): the update merged into the dequantized weight for each call, one matmul a layer.
"""
from __future__ import annotations

import contextlib
import functools
import types

import torch


def low_rank_input(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """`lora_A(dropout(x))`, through the fused dropout op where this layer was given train.dropout_kernel
    and dropout is on."""
    dropout = self.lora_dropout[adapter]
    if self.dropout_kernel and isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0:
        from engine.dropout_kernel import lora_a_with_dropout
        return lora_a_with_dropout(x, self.lora_A[adapter].weight, dropout.p)
    return self.lora_A[adapter](dropout(x))


def training_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA linear with this layer's training levers (`set_lora_forward`)."""
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or self.merged:
        return result
    for adapter in self.active_adapters:
        if adapter not in self.lora_A:
            continue
        low = low_rank_input(self, adapter, x)
        update_weight = self.lora_B[adapter].weight
        if self.fused_update:
            flat = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]).to(result.dtype),
                               update_weight.t().to(result.dtype), alpha=self.scaling[adapter])
            result = flat.view(result.shape)
        else:
            result = result + (self.lora_B[adapter](low) * self.scaling[adapter]).to(result.dtype)
    return result


def set_lora_forward(model, fused_update: bool = False, dropout_kernel: bool = False):
    """Give every LoRA linear of `model` (peft) the training levers asked for (train.fused_lora,
    train.dropout_kernel) through `training_forward`, or peft's own forward back when neither; in place,
    returns `model`."""
    for module in lora_linears(model):
        module.fused_update, module.dropout_kernel = fused_update, dropout_kernel
        if fused_update or dropout_kernel:
            module.forward = types.MethodType(training_forward, module)
        else:
            module.__dict__.pop("forward", None)
    return model


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
    from engine.model import dense_weight

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
    from decode.forward import causal_lm

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
