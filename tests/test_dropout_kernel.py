"""train.dropout_kernel: the hashed dropout is a dropout, the fused op is `dropout(x) @ A.T` with its
gradients, and the Triton kernels compute what the PyTorch ops compute (Triton's CPU interpreter)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.perf.dropout_kernel import dropped, keep_mask, lora_a_dropout, lora_a_with_dropout
from engine.perf.dropout_hash import threshold

ROOT = Path(__file__).resolve().parents[1]


def test_hashed_mask_keeps_one_minus_p_independently():
    seed = torch.tensor([7])
    keep = keep_mask(seed, 2000, 3584, 0.05).float()
    assert abs(keep.mean().item() - 0.95) < 0.001
    assert abs(keep[:, ::2].mean().item() - keep[:, 1::2].mean().item()) < 0.002
    centred = keep - keep.mean()
    for a, b in ((centred[:, 1:], centred[:, :-1]), (centred[1:], centred[:-1]), (centred[:, 256:], centred[:, :-256])):
        assert abs((a * b).mean().item() / centred.var().item()) < 0.01  # neighbours uncorrelated
    assert not torch.equal(keep_mask(seed, 64, 64, 0.5), keep_mask(torch.tensor([8]), 64, 64, 0.5))
    assert torch.equal(keep_mask(seed, 64, 64, 0.5), keep_mask(seed.clone(), 64, 64, 0.5))
    assert keep_mask(seed, 50, 50, 0.0).all() and threshold(1.0) == 2 ** 32 - 1


def test_fused_op_is_dropout_then_matmul_with_its_gradients():
    torch.manual_seed(0)
    x = torch.randn(37, 96, requires_grad=True)
    w = torch.randn(16, 96, requires_grad=True)
    seed, p = torch.tensor([3]), 0.2
    keep = keep_mask(seed, 37, 96, p)
    ref = dropped(x, keep, p) @ w.t()
    grad = torch.randn(37, 16)
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w), grad)
    out = lora_a_dropout(x, w, seed, p)
    dx, dw = torch.autograd.grad(out, (x, w), grad)
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(dx, ref_dx, atol=1e-5) and torch.allclose(dw, ref_dw, atol=1e-5)
    assert (dx[~keep] == 0).all() and (dx[keep] != 0).all()
    torch.library.opcheck(torch.ops.fsku.lora_a_dropout.default, (x.detach().requires_grad_(), w, seed, p))


def test_lora_a_with_dropout_computes_in_the_autocast_dtype_and_drops_what_its_seed_says():
    torch.manual_seed(0)
    x, w, seed = torch.randn(2, 5, 64), torch.randn(8, 64), torch.tensor([3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = lora_a_with_dropout(x, w, 0.5, seed)
    assert low.shape == (2, 5, 8) and low.dtype == torch.bfloat16
    first = lora_a_with_dropout(x, w, 0.5, seed)
    assert first.dtype == torch.float32 and torch.equal(first, lora_a_with_dropout(x, w, 0.5, seed.clone()))
    assert not torch.equal(first, lora_a_with_dropout(x, w, 0.5, torch.tensor([4])))


def test_each_lora_linear_gets_its_own_seed_drawn_before_each_training_forward(tiny_model):
    from engine.config import LoraConfig, ModelConfig
    from engine.lora import lora_linears
    from engine.model import add_lora, load_base_model
    from engine.perf.lora_forward import set_lora_forward

    model = set_lora_forward(add_lora(load_base_model(ModelConfig(path=str(tiny_model), quant="none")),
                                      LoraConfig(r=4, alpha=8, dropout=0.1), False), dropout_kernel=True)
    seeds = lambda: [int(m.dropout_seed) for m in lora_linears(model)]  # noqa: E731
    ids = torch.tensor([[5, 6, 7]])
    model.train()
    model(input_ids=ids)
    first = seeds()
    assert len(set(first)) == len(first) == 14  # 2 layers x 7 projections
    model(input_ids=ids)
    second = seeds()
    assert not set(first) & set(second)
    model.eval()
    model(input_ids=ids)
    assert seeds() == second  # eval draws nothing
    set_lora_forward(model, dropout_kernel=True)  # again: one hook, not two
    model.train()
    torch.manual_seed(9)
    model(input_ids=ids)
    torch.manual_seed(9)
    assert seeds() == torch.zeros(14, dtype=torch.long).random_(0, 2 ** 31 - 1).tolist()  # one draw a forward


INTERPRETED = """
import torch
from engine.perf import dropout_kernel as dk, dropout_triton as dt
torch.manual_seed(0)
for n, k, r in ((70, 130, 16), (64, 64, 4), (5, 2000, 32), (129, 640, 16)):
    x, w, g = torch.randn(n, k), torch.randn(r, k) * 0.1, torch.randn(n, r)
    seed, p = torch.tensor([12345]), 0.3
    keep = dk.keep_mask(seed, n, k, p)
    xd = dk.dropped(x, keep, p)
    dx, dw = dt.backward(g, x, w, seed, p)
    errors = [(dt.forward(x, w, seed, p) - xd @ w.t()).abs().max(), (dx - dk.dropped(g @ w, keep, p)).abs().max(),
              (dw - g.t() @ xd).abs().max()]
    assert max(errors) < 1e-4, (n, k, r, errors)
print("kernels agree")
"""


def test_triton_kernels_match_the_torch_ops_in_the_interpreter():
    """The CUDA kernels, run by Triton's CPU interpreter in fp32 (bf16 is checked on the GPU by
    bench/check_dropout_kernel.py): the same outputs and gradients as the PyTorch ops, odd shapes and
    ranks padded to 16 and columns split over programs (few rows) included."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "kernels agree" in run.stdout, run.stderr[-2000:]


TUNED = """
import torch, triton.testing
from engine.perf import dropout_kernel as dk, dropout_triton as dt
dt._INTERPRETED = False  # the launch path a GPU takes, its timing faked: tile 4 of _TILES is the fastest
timed = []
def fake_bench(fn, **_):
    fn()
    timed.append(1)
    return [5.0, 4.0, 3.0, 2.0, 1.0, 6.0, 7.0][(len(timed) - 1) % len(dt._TILES)]
triton.testing.do_bench = fake_bench
torch.manual_seed(0)
x, w, seed, p = torch.randn(70, 130), torch.randn(16, 130) * 0.1, torch.tensor([5]), 0.3
want = dk.dropped(x, dk.keep_mask(seed, 70, 130, p), p) @ w.t()
for _ in range(2):
    assert (dt.forward(x, w, seed, p) - want).abs().max() < 1e-4
assert len(timed) == len(dt._TILES) and dt._best_tile == {("_forward_kernel", 130, torch.float32, False): dt._TILES[4]}
dt.forward(torch.randn(4096, 130), w, seed, p)  # many rows: timed again
assert len(timed) == 2 * len(dt._TILES) and len(dt._best_tile) == 2
print("tiles timed once a key")
"""


def test_kernel_tiles_are_timed_once_per_width_dtype_and_row_count():
    """The tile choice the GPU path makes: every tile timed at the first call of a key (kernel, width,
    dtype, few or many rows), the fastest reused after, the result unchanged (Triton's interpreter)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", TUNED], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "tiles timed once a key" in run.stdout, run.stderr[-2000:]
