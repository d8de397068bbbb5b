"""LoRA's update added inside its second matmul.

peft computes a LoRA linear as `base(x).clone() + B(A(dropout(x))) * scale`: the update `B(...)` is written
out at the full output width, then read back with the base output to write their sum. `addmm` adds the
rank-r product straight onto the base output (one read, one write of the output), and the clone goes. On the
gate and up projections (18,944 wide) that is most of the memory traffic LoRA adds to a layer. Same function,
same dropout draws in the same order; only where the sum is formed differs.
"""
from __future__ import annotations

import types

import torch


def addmm_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or self.merged:
        return result
    for adapter in self.active_adapters:
        if adapter not in self.lora_A:
            continue
        low = self.lora_A[adapter](self.lora_dropout[adapter](x))
        update_weight = self.lora_B[adapter].weight
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]).to(result.dtype),
                           update_weight.t().to(result.dtype), alpha=self.scaling[adapter])
        result = flat.view(result.shape)
    return result


def fuse_lora_updates(model):
    """Switch every LoRA linear of `model` (peft) to the addmm forward, in place; returns `model`."""
    for module in lora_linears(model):
        module.forward = types.MethodType(addmm_forward, module)
    return model


def named_lora_linears(model) -> list[tuple[str, torch.nn.Module]]:
    """peft's LoRA layers over a linear (plain or 4-bit), with their module names."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "lora_A") and isinstance(getattr(m, "base_layer", None), torch.nn.Linear)]


def lora_linears(model) -> list[torch.nn.Module]:
    return [m for _, m in named_lora_linears(model)]
