"""train.dequant_in_graph on the GPU: the op `fsku::dequantize_nf4` (its Triton kernel, called eagerly and
from a compiled function) and `dequantize_nf4`'s PyTorch ops compiled by inductor, against bitsandbytes' own
dequantization, bit for bit, on A.X 4.0 Light's four weight shapes (bf16 weights quantized on the card, block
scales fp32 as train.expand_double_quant leaves them), and the time of each.

    python -m bench.check_nf4 OUT_JSON
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from bench.common import cuda_ms, write_json
from engine.perf.nf4 import dequantize_nf4, dequantize_nf4_op

SHAPES = [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944)]  # q/o, k/v, gate/up, down


def host_us(fn, repeat: int = 50) -> float:
    """Mean microseconds the host spends issuing `fn` (the GPU queue is not waited on)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    host = (time.perf_counter() - start) / repeat * 1e6
    torch.cuda.synchronize()
    return host


def check(shape: tuple[int, int]) -> dict:
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    packed, state = bnbf.quantize_4bit(torch.randn(shape, device="cuda", dtype=torch.bfloat16), quant_type="nf4")
    args = packed, state.absmax, state.code
    kernel = lambda: dequantize_nf4_op(*args, state.blocksize, *shape, torch.bfloat16)
    ops = torch.compile(lambda: dequantize_nf4(*args, state.shape, state.blocksize, torch.bfloat16))
    theirs = lambda: bnbf.dequantize_4bit(packed, state)
    want = theirs()
    return {"shape": list(shape), "kernel_equal": torch.equal(kernel(), want),
            "kernel_compiled_equal": torch.equal(torch.compile(kernel)(), want),
            "ops_compiled_equal": torch.equal(ops(), want),
            "bitsandbytes_ms": cuda_ms(theirs), "kernel_ms": cuda_ms(kernel), "ops_compiled_ms": cuda_ms(ops),
            "bitsandbytes_host_us": host_us(theirs), "kernel_host_us": host_us(kernel)}


def main(out_json: str) -> None:
    results = [check(shape) for shape in SHAPES]
    for r in results:
        print(r, flush=True)
    write_json(Path(out_json), {"nf4_check": results})


if __name__ == "__main__":
    main(sys.argv[1])
