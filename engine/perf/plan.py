"""The speed plan: which levers a run switches on (`train.speed: auto`), and the peak memory it predicts.

On CUDA with a 4-bit base, `auto` takes every lever measured to keep the loss the same and pay on the
A.X 4.0 Light shape (bench/RESULTS.md): compiled layers recomputed inside their graphs, expanded double
quant, 4-bit weights dequantized in the graph, LoRA dropout in its kernel (when dropout > 0),  and spends the
memory budget (`train.memory_gib`; 0 = the card less a margin, at most 22 GiB) on `save_matmuls`. Lever keys a recipe sets
are kept (they only add to the plan); `train.speed: off` runs exactly the recipe's keys. On CPU, `auto` is
the plain path.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from engine.config import TrainConfig
from engine.errors import UserError

MARGIN_GIB = 2.0
"""Kept free of the card's memory for the allocator's fragmentation and other processes."""
DEFAULT_BUDGET_GIB = 22.0
"""The budget when `train.memory_gib` is 0, on cards larger than the contest's: a run planned on an H200 fits
the 24 GB RTX 4090 too. Spending more bought nothing measurable on the FSKU mix (0.29 s a step with all 28
layers' matmuls kept against 0.27 s with 14, bench/RESULTS.md)."""

# Peak allocated memory of a step of the A.X 4.0 Light shape, 4-bit, LoRA r 16 on all projections, with the
# levers `auto` takes: a fixed part (weights, adapters and their optimizer state, a layer's dequantized weights),
# a part per token of the largest forward, a part per token per layer that keeps its matmul outputs, and a part
# per answer slot whose logits (102,400 wide, fp32 and bf16, and their gradients) the head holds at once (at most
# train.ce_chunk). Fitted to the eighth session's H200 runs (8 x 1024 with save_matmuls 10, 8 x 2048 with 5 and
# 12, every token labelled) and the ninth's FSKU mix (forwards of 1,536 tokens, about 150 answer slots, with 0, 14
# and 28 layers saving): within 6% of each (bench/NOTES.md).
FIXED_GIB = 5.94
PER_TOKEN_GIB = 3.65e-4
PER_SAVED_LAYER_TOKEN_GIB = 8.58e-5
PER_HEAD_SLOT_GIB = 7.0e-4


@dataclass(frozen=True)
class Plan:
    train: TrainConfig
    """The recipe's train section with the plan's levers set."""
    predicted_peak_gib: float | None
    budget_gib: float | None

    def line(self) -> str:
        t = self.train
        levers = [name for name in ("compile", "expand_double_quant", "dequant_in_graph", "dropout_kernel",
                                    "fused_lora", "cuda_graphs") if getattr(t, name)]
        if t.save_matmuls:
            levers.append(f"save_matmuls={t.save_matmuls}")
        if t.keep_activations:
            levers.append(f"keep_activations={t.keep_activations}")
        shown = ", ".join(levers) or "plain path"
        layout = "packed rows" if t.packing else "one padded row per example"
        peak = ("" if self.predicted_peak_gib is None else
                f"; predicted peak {self.predicted_peak_gib:.1f} GiB of a {self.budget_gib:.1f} GiB budget")
        return f"speed plan ({t.speed}): {shown}; {layout}{peak}"


def predicted_peak_gib(tokens_per_forward: int, head_slots: int, save_matmuls: int) -> float:
    return (FIXED_GIB + tokens_per_forward * (PER_TOKEN_GIB + save_matmuls * PER_SAVED_LAYER_TOKEN_GIB)
            + head_slots * PER_HEAD_SLOT_GIB)


def memory_budget_gib(train: TrainConfig, device: torch.device) -> float:
    if train.memory_gib:
        return train.memory_gib
    return min(DEFAULT_BUDGET_GIB, torch.cuda.get_device_properties(device).total_memory / 2 ** 30 - MARGIN_GIB)


def check_device(train: TrainConfig, device: torch.device) -> None:
    """Levers that need what this machine lacks, refused before the model loads."""
    if train.cuda_graphs and device.type != "cuda":
        raise UserError(f"train.cuda_graphs: needs CUDA (this run's device is {device.type}); leave it unset")


def plan_speed(train: TrainConfig, lora_dropout: float, quantized: bool, n_layers: int, bound_tokens: int,
               largest_forward: Callable[[], tuple[int, int]], device: torch.device) -> Plan:
    """The levers of a run and its predicted peak. The levers fit the budget at the largest forward the recipe
    allows (`bound_tokens` = micro_batch x max_len, every token an answer), so the plan does not hang on which
    rows a CSV holds; the peak is predicted for this run's own largest forward (`largest_forward()`: its most
    tokens and answer slots, engine.perf.packing.largest_forward)."""
    if train.speed == "off" or device.type != "cuda" or not quantized:
        return Plan(train, None, None)
    budget = memory_budget_gib(train, device)
    head = (lambda slots: min(slots, train.ce_chunk) if train.ce_chunk else slots)
    triton = importlib.util.find_spec("triton") is not None
    levers = dict(compile=True, expand_double_quant=True,
                  dequant_in_graph=train.dequant_in_graph or (triton and hasattr(torch.library, "triton_op")),
                  dropout_kernel=train.dropout_kernel or (triton and lora_dropout > 0))
    if train.gradient_checkpointing and train.recompute_in_graph and not train.save_matmuls:
        fits = [s for s in range(n_layers + 1) if predicted_peak_gib(bound_tokens, head(bound_tokens), s) <= budget]
        levers["save_matmuls"] = max(fits, default=0)
    planned = dataclasses.replace(train, **levers)
    tokens, answer_slots = largest_forward()
    return Plan(planned, predicted_peak_gib(tokens, head(answer_slots), planned.save_matmuls), budget)
