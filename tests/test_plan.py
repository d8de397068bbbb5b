"""The speed plan: what `train.speed: auto` switches on, within which memory budget."""
import importlib.util

import torch

import pytest

from engine.config import TrainConfig
from engine.errors import UserError
from engine.perf.plan import DEFAULT_BUDGET_GIB, check_device, memory_budget_gib, plan_speed, predicted_peak_gib

CUDA = torch.device("cuda")
LONG = lambda: (8 * 1024, 8 * 1024)  # noqa: E731 -- 8 x 1024 tokens a forward, every one labelled
FSKU = lambda: (1536, 192)  # noqa: E731 -- what the FSKU mix's largest forward holds


def never_asked():
    raise AssertionError("the plan sized memory where it plans nothing")
TRITON_OPS = importlib.util.find_spec("triton") is not None and hasattr(torch.library, "triton_op")


def test_cpu_and_off_run_exactly_the_recipes_keys():
    t = TrainConfig()
    assert plan_speed(t, 0.05, False, 28, 8192, never_asked, torch.device("cpu")).train == t
    off = TrainConfig(speed="off", memory_gib=22)
    assert plan_speed(off, 0.05, True, 28, 8192, never_asked, CUDA).train == off
    assert plan_speed(TrainConfig(memory_gib=22), 0.05, False, 28, 8192, never_asked, CUDA).train.compile is False


def test_auto_on_a_4bit_cuda_model_takes_every_lever_and_spends_the_budget():
    plan = plan_speed(TrainConfig(memory_gib=22), 0.05, True, 28, 8192, LONG, CUDA)
    t = plan.train
    assert t.compile and t.expand_double_quant and t.packing and not t.cuda_graphs  # graphs: not yet (graphs.py)
    assert t.dequant_in_graph == TRITON_OPS and t.dropout_kernel == (importlib.util.find_spec("triton") is not None)
    # the head holds one ce_chunk (4,096) of the 8,192 answer slots at a time
    assert plan.predicted_peak_gib <= 22 < predicted_peak_gib(8 * 1024, 4096, t.save_matmuls + 1)
    assert t.save_matmuls == 14
    assert "save_matmuls=14" in plan.line() and "predicted peak 21.6 GiB of a 22.0 GiB budget" in plan.line()


def test_a_small_budget_keeps_no_matmuls_and_lora_without_dropout_needs_no_dropout_kernel():
    plan = plan_speed(TrainConfig(memory_gib=9), 0.0, True, 28, 8192, LONG, CUDA)
    assert plan.train.save_matmuls == 0 and not plan.train.dropout_kernel
    assert plan.predicted_peak_gib > 9  # nothing fits better; the line says so
    assert "predicted peak 11.8 GiB of a 9.0 GiB budget" in plan.line()


def test_keys_the_recipe_sets_are_kept():
    plan = plan_speed(TrainConfig(memory_gib=40, compile=True, save_matmuls=3, keep_activations=2), 0.05, True, 28, 8192, LONG,
                      CUDA)
    assert plan.train.save_matmuls == 3 and plan.train.keep_activations == 2 and plan.train.compile


def test_levers_fit_the_recipes_bound_and_the_peak_is_predicted_for_the_runs_own_largest_forward():
    """Short FSKU rows: the same levers as the recipe's 8 x 1024 bound, and the peak of their 1,536-token
    forwards (8.4 GiB measured on the H200 with these levers, bench/NOTES.md)."""
    plan = plan_speed(TrainConfig(memory_gib=22), 0.05, True, 28, 8192, FSKU, CUDA)
    assert plan.train.save_matmuls == 14
    assert plan.predicted_peak_gib == pytest.approx(predicted_peak_gib(1536, 192, 14))
    assert abs(plan.predicted_peak_gib - 8.37) < 0.1 * 8.37


def test_graphs_need_cuda():
    with pytest.raises(UserError, match="train.cuda_graphs: needs CUDA"):
        check_device(TrainConfig(cuda_graphs=True), torch.device("cpu"))
    check_device(TrainConfig(cuda_graphs=True), CUDA)


def test_the_default_budget_is_the_card_less_a_margin_at_most_what_a_24gb_card_holds(monkeypatch):
    class Card:
        def __init__(self, gib):
            self.total_memory = gib * 2 ** 30

    for card_gib, budget in ((140, DEFAULT_BUDGET_GIB), (16, 14.0)):
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, g=card_gib: Card(g))
        assert memory_budget_gib(TrainConfig(), CUDA) == budget
    assert memory_budget_gib(TrainConfig(memory_gib=60), CUDA) == 60
