"""The dropout kernel's keep/drop decision: a 32-bit hash of (seed, row, column), the same in PyTorch (the
reference and CPU path) and in the Triton kernels, which read these constants."""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
ROW_MULT, COL_MULT, MIX1, MIX2 = 0x9E3779B1, 0xC2B2AE3D, 0x85EBCA6B, 0xC2B2AE35


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for int64 `h` in [0, 2**32), in halves so that no int64 product overflows."""
    return ((h & 0xFFFF) * c + ((((h >> 16) * (c & 0xFFFF)) & 0xFFFF) << 16)) & _M32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection with full avalanche), on int64 tensors."""
    h = h ^ (h >> 16)
    h = _mul32(h, MIX1)
    h = h ^ (h >> 13)
    h = _mul32(h, MIX2)
    return h ^ (h >> 16)


def threshold(p: float) -> int:
    """An element is kept when its 32-bit hash is at least this: probability 1 - p."""
    return min(round(p * 2 ** 32), _M32)


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """The kept elements of a `rows` x `cols` input for `seed` (a one-element int64 tensor): what the CUDA
    kernels compute element by element."""
    device = seed.device
    row_hash = fmix32((seed.view(1) + _mul32(torch.arange(rows, device=device), ROW_MULT)) & _M32)
    col_term = _mul32(torch.arange(cols, device=device), COL_MULT)
    return fmix32(row_hash[:, None] ^ col_term[None, :]) >= threshold(p)


def dropped(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """x with the dropped elements zeroed and the kept ones scaled, rounded once to x's dtype."""
    return torch.where(keep, x.float() * (1.0 / (1.0 - p)), 0.0).to(x.dtype)
