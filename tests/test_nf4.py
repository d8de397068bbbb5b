"""train.dequant_in_graph: 4-bit weights dequantized by PyTorch ops (engine.nf4), on the CPU.

Shapes keep each weight row whole blocks of 64: bitsandbytes' CPU dequantization kernel (the reference
here) reads blocks within rows, its quantizer and its CUDA kernels across them, so the two disagree
otherwise; `dequantize_nf4` follows the quantizer.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SAMPLE, compiled_checkpoint
from engine.config import LoraConfig, ModelConfig
from engine.data import encode_all, read_examples
from engine.errors import UserError
from engine.batch import collate
from engine.loss import forward_backward
from engine.perf.levers import CheckpointedMatmulTags
from engine.model import add_lora, load_base_model
from engine.perf.nf4 import dequantize_in_graph, dequantize_nf4, dequantized_weights

bnb = pytest.importorskip("bitsandbytes")


def linear_4bit(linear: torch.nn.Linear, nested: bool = False):
    """`linear` as bitsandbytes' NF4 Linear4bit, quantized on the CPU, computing in fp32."""
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4", compress_statistics=nested)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=nested)
    if linear.bias is not None:
        q.bias = torch.nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,blocksize", [((128, 64), 64), ((64, 192), 64), ((96, 256), 128)])
def test_dequantize_nf4_is_bitsandbytes_dequantization(dtype, shape, blocksize):
    import bitsandbytes.functional as bnbf
    torch.manual_seed(0)
    packed, state = bnbf.quantize_4bit(torch.randn(shape, dtype=dtype) * 3, blocksize=blocksize, quant_type="nf4")
    got = dequantize_nf4(packed, state.absmax, state.code, state.shape, blocksize, dtype)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, bnbf.dequantize_4bit(packed, state))


INTERPRETED = """
import torch, bitsandbytes.functional as bnbf
from engine.perf.nf4 import dequantize_nf4
from engine.perf.nf4_triton import BLOCK, dequantize
torch.manual_seed(0)
for rows, cols in ((128, 192), (3, 64), (40, 2 * BLOCK + 64)):  # a run of bytes split over programs
    packed, state = bnbf.quantize_4bit(torch.randn(rows, cols), quant_type="nf4")
    got = dequantize(packed, state.absmax, state.code, 64, rows, cols, torch.float32)
    assert torch.equal(got, dequantize_nf4(packed, state.absmax, state.code, state.shape, 64, torch.float32))
print("kernel agrees")
"""


def test_triton_kernel_matches_the_torch_ops_in_the_interpreter():
    """The CUDA kernel, run by Triton's CPU interpreter in fp32 (whose bf16 conversion is not the GPU's:
    bf16 is checked bit for bit on the GPU by bench/check_nf4.py): the weights of `dequantize_nf4`."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "kernel agrees" in run.stdout, run.stderr[-2000:]


def quantized(model):
    """`model` with its LoRA target projections in 4-bit (what model.quant=nf4 loads on CUDA)."""
    targets = set(LoraConfig().targets)
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] in targets and isinstance(module, torch.nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear_4bit(module))
    return model


def test_dequant_in_graph_is_the_same_model(tiny_model, tiny_tokenizer):
    """The tiny model with 4-bit projections and LoRA (non-zero B): the same loss and LoRA gradients with
    each 4-bit linear through `nf4_linear_forward` as through bitsandbytes."""
    examples = read_examples(SAMPLE)
    batch = collate(encode_all(tiny_tokenizer, examples[:4], "s", 512), tiny_tokenizer.pad_token_id)
    results = []
    for lever in (False, True):
        torch.manual_seed(0)
        model = add_lora(quantized(load_base_model(ModelConfig(path=str(tiny_model), quant="none"))),
                         LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=True)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.02)
        if lever:
            assert dequantize_in_graph(model) == 2 * 7  # 2 layers x 7 projections
        model.train()
        loss = float(forward_backward(model, [batch], "token"))
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (plain_loss, plain), (loss, grads) = results
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    for name, grad in plain.items():
        assert torch.allclose(grads[name], grad, atol=1e-6), name


def two_layers():
    """Two 4-bit linears with a LoRA-like trainable matrix between: up (128 x 64), silu, down (64 x 128)."""
    torch.manual_seed(0)
    up, down = (linear_4bit(torch.nn.Linear(k, n, bias=False)) for n, k in ((128, 64), (64, 128)))
    lora = torch.nn.Parameter(torch.randn(4, 64) * 0.1)

    def body(x):
        h = up(x) + (x @ lora.t()).sum(-1, keepdim=True)
        return down(torch.nn.functional.silu(h)) + x

    return torch.nn.ModuleList([up, down]), lora, body


def gradients(step, x, lora):
    x.grad = lora.grad = None
    step(x).square().sum().backward()
    return x.grad, lora.grad


@pytest.mark.parametrize("checkpoint,save", [(True, False), (True, True), (False, False)])
def test_dequantized_weights_are_recomputed_once_for_backward(checkpoint, save):
    """CheckpointedMatmulTags with train.dequant_in_graph: no dequantized weight is ever kept for backward
    (checkpointed or not); backward dequantizes each weight it reads once, for its recompute and its input
    gradient together; with save (train.save_matmuls) the first matmul's output is kept instead of
    recomputed. Gradients equal bitsandbytes' own."""
    layers, lora, body = two_layers()
    x = torch.randn(8, 64, requires_grad=True)
    want = gradients(body, x, lora)
    assert dequantize_in_graph(layers) == 2
    step, graphs = compiled_checkpoint(body, save, checkpoint=checkpoint)
    for got, expected in zip(gradients(step, x, lora), want):
        assert torch.allclose(got, expected, atol=1e-5)
    saved = [tuple(n.meta["val"].shape) for n in graphs["backward"].nodes if n.op == "placeholder"]
    assert (128, 64) not in saved and (64, 128) not in saved
    dequantizing, readers = dequantized_weights(graphs["backward"])
    assert sum(str(n.target).startswith("aten.index") for n in dequantizing) == 2  # one a weight
    recomputed = checkpoint and not save  # up's matmul again, for silu's backward
    assert len(readers) == 2 + recomputed  # the input gradients of both, and the recompute
    assert ((8, 128) in saved) == (not recomputed)


def test_dequant_in_graph_compiles_with_inductor():
    """Compiled by inductor, with the recompute inside the graph as compile_layers sets it up: the
    dequantization kernel inductor generates computes bitsandbytes' gradients."""
    layers, lora, body = two_layers()
    x = torch.randn(8, 64, requires_grad=True)
    want = gradients(body, x, lora)
    assert dequantize_in_graph(layers) == 2
    torch._dynamo.reset()
    step = torch.compile(lambda x: torch.utils.checkpoint.checkpoint(body, x, use_reentrant=False),
                         options={"fallback_random": True, "joint_custom_pre_pass": CheckpointedMatmulTags(False)})
    for got, expected in zip(gradients(step, x, lora), want):
        assert torch.allclose(got, expected, atol=1e-5)


def test_double_quantized_weights_need_expanding_first():
    model = torch.nn.Sequential(linear_4bit(torch.nn.Linear(64, 64), nested=True))
    with pytest.raises(UserError, match="train.dequant_in_graph: 0 is not NF4 with fp32 block scales"):
        dequantize_in_graph(model)
