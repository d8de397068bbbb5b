"""The one door to the speed mechanisms: the loop hands it the model and the recipe and gets back the model
with the plan's levers applied and the plan (which also says how batches are laid out); then, for the
trainable parameters, what runs a step's forwards and backwards (`step_forwards`)."""
from __future__ import annotations

import torch

from typing import Callable, Sequence

from decode.forward import causal_lm
from engine.batch import Batch
from engine.config import Recipe
from engine.loss import forward_backward
from engine.perf.levers import apply_speed_levers
from engine.lora import is_4bit
from engine.perf.plan import Plan, plan_speed


def speed_up(model, recipe: Recipe, device: torch.device,
             largest_forward: Callable[[], tuple[int, int]]) -> tuple[object, Plan]:
    """The model with the plan's levers, and the plan; `largest_forward()`: the most tokens and answer slots a
    forward of this run holds (asked only when the plan sizes memory)."""
    t = recipe.train
    plan = plan_speed(t, recipe.lora.dropout, any(is_4bit(p) for p in model.parameters()),
                      causal_lm(model).config.num_hidden_layers, t.micro_batch * recipe.data.max_len, largest_forward,
                      device)
    return apply_speed_levers(model, plan.train), plan


def step_forwards(model, plan: Plan, params: Sequence[torch.nn.Parameter]) -> Callable[[Sequence[Batch], float], torch.Tensor]:
    """`(batches, denom) -> loss`: one optimizer step's forwards and backwards, their gradients accumulated into
    `params`' grads (engine.loss.forward_backward), replayed as CUDA graphs where the plan says so."""
    t = plan.train
    if t.cuda_graphs:
        from engine.perf.graphs import GraphedForwards
        return GraphedForwards(model, params, t.loss_weighting, t.ce_chunk)
    return lambda batches, denom: forward_backward(model, batches, t.loss_weighting, t.ce_chunk, denom)
