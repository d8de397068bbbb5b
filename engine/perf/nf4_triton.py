"""The CUDA side of `engine.perf.nf4`: one Triton kernel that dequantizes an NF4 weight, each program a run of
packed bytes (two weights a byte, high nibble first) written out as twice as many values. Imported only
when a CUDA tensor reaches the op (Triton ships with PyTorch's CUDA builds).

On an H200 it dequantizes A.X 4.0 Light's gate projection (18,944 x 3,584) in 0.05-0.09 ms across runs,
about bitsandbytes' 0.076 ms, where inductor's kernel for `engine.perf.nf4.dequantize_nf4`'s ops takes 0.28 ms
(`bench/check_nf4.py`), bit for bit the same weights.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

BLOCK = 1024  # bytes a program: the gate weight took 0.047-0.050 ms at 512, 1,024 and 2,048 alike


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes, BYTES_PER_SCALE: tl.constexpr,
                       BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n_bytes
    byte = tl.load(packed_ptr + offsets, mask=inside, other=0)
    scale = tl.load(absmax_ptr + offsets // BYTES_PER_SCALE, mask=inside, other=0.0)
    high = tl.load(code_ptr + (byte >> 4).to(tl.int32)) * scale  # fp32 product, rounded once below
    low = tl.load(code_ptr + (byte & 15).to(tl.int32)) * scale
    out = tl.program_id(0) * 2 * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + out, tl.interleave(high, low).to(out_ptr.dtype.element_ty), mask=out < 2 * n_bytes)


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, rows: int,
               cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The rows x cols weight in `dtype`; traced by torch.compile as a call of the kernel, which inductor
    launches from its generated code."""
    out = torch.empty(rows, cols, dtype=dtype, device=packed.device)
    n_bytes = rows * cols // 2
    wrap_triton(_dequantize_kernel)[(triton.cdiv(n_bytes, BLOCK),)](
        packed, absmax, code, out, n_bytes, BYTES_PER_SCALE=blocksize // 2, BLOCK=BLOCK)
    return out
