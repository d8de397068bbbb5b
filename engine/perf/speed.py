"""The one door to the speed mechanisms: the loop hands it the model and the recipe and gets back the model
with the plan's levers applied, and the plan (which also says how batches are laid out)."""
from __future__ import annotations

import torch

from decode.forward import causal_lm
from engine.config import Recipe
from engine.perf.levers import apply_speed_levers
from engine.lora import is_4bit
from engine.perf.plan import Plan, plan_speed


def speed_up(model, recipe: Recipe, device: torch.device) -> tuple[object, Plan]:
    t = recipe.train
    plan = plan_speed(t, recipe.lora.dropout, any(is_4bit(p) for p in model.parameters()),
                      causal_lm(model).config.num_hidden_layers, t.micro_batch * recipe.data.max_len, device)
    return apply_speed_levers(model, plan.train), plan
