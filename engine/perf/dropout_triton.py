"""The CUDA side of `engine.dropout_kernel`: Triton kernels for `dropout(x) @ A.T` and its backward, the
keep/drop of each element hashed from (seed, row, column) exactly as `dropout_kernel.keep_mask` does.
Imported only when a CUDA tensor reaches the op (Triton ships with PyTorch's CUDA builds)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engine.perf import dropout_hash as hashing

ROW_MULT, COL_MULT = tl.constexpr(hashing.ROW_MULT), tl.constexpr(hashing.COL_MULT)
MIX1, MIX2 = tl.constexpr(hashing.MIX1), tl.constexpr(hashing.MIX2)


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h *= MIX1
    h ^= h >> 13
    h *= MIX2
    h ^= h >> 16
    return h


@triton.jit
def _dropped_tile(x_ptr, rows, cols, n_rows, n_cols, row_hash, KEEP_FROM: tl.constexpr, SCALE: tl.constexpr):
    """The tile x[rows, cols] with its dropout applied (zeros outside the matrix), in x's dtype."""
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], mask=inside, other=0.0)
    col_term = cols.to(tl.uint32) * COL_MULT
    keep = _fmix32(row_hash[:, None] ^ col_term[None, :]).to(tl.int64) >= KEEP_FROM
    return tl.where(keep, x.to(tl.float32) * SCALE, 0.0).to(x.dtype), keep


@triton.jit
def _row_hash(seed_ptr, rows):
    seed = tl.load(seed_ptr).to(tl.uint32)
    return _fmix32(seed + rows.to(tl.uint32) * ROW_MULT)


@triton.jit
def _forward_kernel(x_ptr, w_ptr, y_ptr, seed_ptr, n_rows, n_cols, R: tl.constexpr, KEEP_FROM: tl.constexpr,
                    SCALE: tl.constexpr, PRECISION: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """Program (n, s): rows block n, columns blocks s, s + SPLIT, ...: its share of y, at y_ptr[s]."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    split, n_split = tl.program_id(1), tl.num_programs(1)
    ranks = tl.arange(0, R)
    row_hash = _row_hash(seed_ptr, rows)
    acc = tl.zeros((BN, R), dtype=tl.float32)
    for k0 in range(split * BK, n_cols, n_split * BK):
        cols = k0 + tl.arange(0, BK)
        xd, _ = _dropped_tile(x_ptr, rows, cols, n_rows, n_cols, row_hash, KEEP_FROM, SCALE)
        w = tl.load(w_ptr + ranks[None, :] * n_cols + cols[:, None], mask=cols[:, None] < n_cols, other=0.0)
        acc = tl.dot(xd, w, acc, input_precision=PRECISION)
    out = y_ptr + split * n_rows * R + rows[:, None].to(tl.int64) * R + ranks[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=rows[:, None] < n_rows)


@triton.jit
def _backward_kernel(g_ptr, x_ptr, w_ptr, seed_ptr, dx_ptr, dw_ptr, n_rows, n_cols, R: tl.constexpr,
                     KEEP_FROM: tl.constexpr, SCALE: tl.constexpr, PRECISION: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr):
    """Program (k, s): columns block k, rows s, s + SPLIT, ... (in blocks of BN): writes dx there and
    its share of dw (dw_ptr[s], summed over s afterwards)."""
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    split, n_split = tl.program_id(1), tl.num_programs(1)
    ranks = tl.arange(0, R)
    w = tl.load(w_ptr + ranks[:, None] * n_cols + cols[None, :], mask=cols[None, :] < n_cols, other=0.0)
    acc = tl.zeros((R, BK), dtype=tl.float32)
    for n0 in range(split * BN, n_rows, n_split * BN):
        rows = n0 + tl.arange(0, BN)
        g = tl.load(g_ptr + rows[:, None].to(tl.int64) * R + ranks[None, :], mask=rows[:, None] < n_rows, other=0.0)
        xd, keep = _dropped_tile(x_ptr, rows, cols, n_rows, n_cols, _row_hash(seed_ptr, rows), KEEP_FROM, SCALE)
        acc = tl.dot(tl.trans(g), xd, acc, input_precision=PRECISION)
        dx = tl.where(keep, tl.dot(g, w, input_precision=PRECISION) * SCALE, 0.0)
        tl.store(dx_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))
    tl.store(dw_ptr + split * R * n_cols + ranks[:, None] * n_cols + cols[None, :], acc, mask=cols[None, :] < n_cols)


def _padded_rank(r: int) -> int:
    """tl.dot wants every dimension a power of two of at least 16."""
    return max(16, triton.next_power_of_2(r))


def _constants(x: torch.Tensor, w: torch.Tensor, p: float) -> dict:
    return {"R": w.shape[0], "KEEP_FROM": hashing.threshold(p), "SCALE": 1.0 / (1.0 - p),
            "PRECISION": "ieee" if x.dtype == torch.float32 else None}


# Tile shapes timed once per kernel, input width, dtype and row count below or above 4,096 (a few seconds at
# the first steps); Triton's CPU interpreter (tests) runs the first.
_TILES = [(64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 256, 8, 3),
          (32, 64, 2, 4)]
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_best_tile: dict[tuple, tuple] = {}


def _run(kernel, grid, args: tuple, constants: dict, tile: tuple) -> None:
    bn, bk, warps, stages = tile
    kernel[grid(bn, bk)](*args, **constants, BN=bn, BK=bk, num_warps=warps, num_stages=stages)


def _launch(kernel, grid, args: tuple, constants: dict, x: torch.Tensor) -> None:
    """Launch `kernel` over the input `x` with the fastest tile for its width, timed on the first call. Not
    triton.autotune: its bookkeeping on every launch costs host time that a 4 x 512 step (host-bound) feels,
    ~400 launches a step."""
    if _INTERPRETED:
        return _run(kernel, grid, args, constants, _TILES[0])
    n_rows, n_cols = x.shape
    key = (kernel.fn.__name__, n_cols, x.dtype, n_rows >= 4096)  # a few rows want other tiles than many
    if key not in _best_tile:
        times = {}
        for tile in _TILES:
            try:
                times[tile] = triton.testing.do_bench(lambda: _run(kernel, grid, args, constants, tile), warmup=5, rep=20)
            except triton.runtime.errors.OutOfResources:  # a tile too large for this card's shared memory
                continue
        _best_tile[key] = min(times, key=times.get)
    _run(kernel, grid, args, constants, _best_tile[key])


def _pad_rows(weight: torch.Tensor) -> torch.Tensor:
    r = weight.shape[0]
    return weight if _padded_rank(r) == r else torch.nn.functional.pad(weight, (0, 0, 0, _padded_rank(r) - r))


def forward(x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    n_rows, n_cols = x.shape
    r = weight.shape[0]
    w = _pad_rows(weight.contiguous())
    # few rows: the columns split too, so that the card fills (each split's share summed afterwards)
    n_split = max(1, min(16, triton.cdiv(n_cols, 512), triton.cdiv(8192, n_rows)))
    y = torch.empty(n_split, n_rows, w.shape[0], device=x.device, dtype=x.dtype if n_split == 1 else torch.float32)
    _launch(_forward_kernel, lambda bn, bk: (triton.cdiv(n_rows, bn), n_split),
            (x.contiguous(), w, y, seed, n_rows, n_cols), _constants(x, w, p), x)
    y = y[0] if n_split == 1 else y.sum(0).to(x.dtype)
    return y[:, :r].contiguous() if w.shape[0] != r else y


def backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, seed: torch.Tensor,
             p: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x.shape
    r = weight.shape[0]
    w = _pad_rows(weight.contiguous())
    g = grad if w.shape[0] == r else torch.nn.functional.pad(grad, (0, w.shape[0] - r))
    # rows split so that every width fills the card; each split sums its own share of dw
    n_split = max(1, min(32, triton.cdiv(n_rows, 512)))
    dx = torch.empty_like(x)
    dw = torch.empty(n_split, w.shape[0], n_cols, device=x.device, dtype=torch.float32)
    _launch(_backward_kernel, lambda bn, bk: (triton.cdiv(n_cols, bk), n_split),
            (g.contiguous(), x.contiguous(), w, seed, dx, dw, n_rows, n_cols), _constants(x, w, p), x)
    return dx, dw.sum(0)[:r].to(weight.dtype)
