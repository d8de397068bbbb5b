"""train.dropout_kernel on the GPU: the Triton kernels against the PyTorch ops with the same hashed mask
(bf16, A.X 4.0 Light's LoRA input widths), and their time against PyTorch's dropout + matmul.

    python -m bench.check_dropout_kernel OUT_JSON [--tokens 16384]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.common import cuda_ms, write_json
from engine.perf.dropout_kernel import dropped, keep_mask, lora_a_dropout


def check(tokens: int, width: int, rank: int = 16, p: float = 0.05) -> dict:
    torch.manual_seed(0)
    x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(rank, width, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(tokens, rank, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor([1234], device="cuda")
    keep = keep_mask(seed, tokens, width, p)
    ref = dropped(x, keep, p) @ w.t()
    ref_dx, ref_dw = torch.autograd.grad(ref, (x, w), grad)
    out = lora_a_dropout(x, w, seed, p)
    dx, dw = torch.autograd.grad(out, (x, w), grad)

    def rel(a, b):
        a, b = a.detach().float(), b.detach().float()
        return float((a - b).abs().max() / b.abs().max())

    def fused():
        torch.autograd.grad(lora_a_dropout(x, w, seed, p), (x, w), grad)

    def pytorch():
        torch.autograd.grad(torch.nn.functional.dropout(x, p) @ w.t(), (x, w), grad)

    return {"tokens": tokens, "width": width, "keep_rate": float(keep.float().mean()),
            "rel_err_out": rel(out, ref), "rel_err_dx": rel(dx, ref_dx), "rel_err_dw": rel(dw, ref_dw),
            "fused_fwd_bwd_ms": cuda_ms(fused), "pytorch_fwd_bwd_ms": cuda_ms(pytorch)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_json")
    p.add_argument("--tokens", type=int, default=16384)
    a = p.parse_args()
    results = [check(a.tokens, width) for width in (3584, 18944)]
    for r in results:
        print(r, flush=True)
    write_json(Path(a.out_json), {"checks": results})
    worst = max(max(r["rel_err_out"], r["rel_err_dx"], r["rel_err_dw"]) for r in results)
    if worst > 2e-2:
        raise SystemExit(f"dropout kernel disagrees with the PyTorch ops: relative error {worst:.3g}")


if __name__ == "__main__":
    main()
