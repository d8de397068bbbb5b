"""Training forwards of a peft LoRA linear, each the same function as peft's.

Training (`train.fused_lora`): the update added inside its second matmul. peft computes a LoRA linear as
`base(x).clone() + B(A(dropout(x))) * scale`: the update `B(...)` is written out at the full output width,
then read back with the base output to write their sum. `addmm` adds the rank-r product straight onto the
base output (one read, one write of the output), and the clone goes. On the gate and up projections
(18,944 wide) that is most of the memory traffic LoRA adds to a layer. Same function, same dropout draws in
the same order; only where the sum is formed differs.

Training (`train.dropout_kernel`): `A(dropout(x))` through `engine.dropout_kernel`'s fused op, which never
writes the dropped copy of x (the same dropout, drawn from a hash instead of PyTorch's generator).

Eval's merged forward is `engine.lora.lora_merged_on_the_fly`.
"""
from __future__ import annotations

import types

import torch

from decode.forward import causal_lm
from engine.lora import lora_linears


def low_rank_input(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """`lora_A(dropout(x))`, through the fused dropout op where this layer was given train.dropout_kernel
    and dropout is on."""
    dropout = self.lora_dropout[adapter]
    if self.dropout_kernel and isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0:
        from engine.perf.dropout_kernel import lora_a_with_dropout
        return lora_a_with_dropout(x, self.lora_A[adapter].weight, dropout.p, self.dropout_seed)
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


def attach_seeds(model, modules) -> None:
    """Give each LoRA linear in `modules` its own seed (`dropout_seed`, a one-element view of one tensor) and
    redraw them all from PyTorch's generator before every training forward of `model`'s decoder. Drawn
    there, outside the compiled layers, a checkpoint's recompute reads the same seed without saving and
    restoring the generator's state, and a CUDA graph (train.cuda_graphs) captures the draw itself.
    Calling it again replaces the previous seeds and hook."""
    lm = causal_lm(model)
    if not hasattr(lm, "get_decoder"):  # given one layer, not a model: it has no forward to draw before
        if modules:
            raise TypeError("attach_seeds needs the model whose decoder runs the LoRA linears")
        return
    decoder = lm.get_decoder()
    old = getattr(decoder, "_dropout_seed_hook", None)
    if old is not None:
        old.remove()
        decoder._dropout_seed_hook = None
    if not modules:
        return
    device = next(modules[0].lora_A.parameters()).device
    seeds = torch.zeros(len(modules), dtype=torch.long, device=device)
    for i, module in enumerate(modules):
        module.dropout_seed = seeds[i:i + 1]

    def draw(decoder, args):
        if decoder.training and torch.is_grad_enabled():
            seeds.random_(0, 2 ** 31 - 1)

    decoder._dropout_seed_hook = decoder.register_forward_pre_hook(draw)


def set_lora_forward(model, fused_update: bool = False, dropout_kernel: bool = False):
    """Give every LoRA linear of `model` (peft) the training levers asked for (train.fused_lora,
    train.dropout_kernel) through `training_forward`, or peft's own forward back when neither; in place,
    returns `model`."""
    modules = lora_linears(model)
    for module in modules:
        module.fused_update, module.dropout_kernel = fused_update, dropout_kernel
        if fused_update or dropout_kernel:
            module.forward = types.MethodType(training_forward, module)
        else:
            module.__dict__.pop("forward", None)
    attach_seeds(model, modules if dropout_kernel else [])
    return model
