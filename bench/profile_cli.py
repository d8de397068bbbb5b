"""Where a step of `train.py recipes/baseline.yaml` goes as users run it (packed rows, the default speed plan):
the loop's own `setup` and `train_step` (engine.loop), a few steps to compile, then torch.profiler over a few
more. Writes OUT_DIR/profile_cli.json (wall time a step, the time the GPU was busy, i.e. the union of its
kernels' intervals, kernel launches a step, the host's share) and the op tables by CUDA and by CPU time.

    python -m bench.profile_cli MODEL_DIR TRAIN_CSV OUT_DIR [--warmup 8] [--steps 4] [--override KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.common import card, write_json
from engine.config import load_recipe
from engine.loop import setup, train_step


def busy_us(kernels) -> float:
    """The union of the kernels' [start, end) intervals: GPU time with at least one kernel running."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((k.time_range.start, k.time_range.end) for k in kernels):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("train_csv")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--recipe", default="recipes/baseline.yaml")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--override", action="append", default=[])
    a = p.parse_args()
    a.out_dir.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(a.recipe, [f"model.path={a.model_dir}", f"data.train={a.train_csv}", "eval.generate=false",
                                    "train.resume=false", "output_dir=.cache/profile-cli", *a.override])
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    s = setup(recipe, [])
    warm = [train_step(s) for _ in range(a.warmup)]
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        profiled = [train_step(s) for _ in range(a.steps)]
        sync()
        wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    avg = prof.key_averages()
    per = 1 / a.steps
    result = {"plan": s.plan.line(), "warmup_step_s": [e["step_s"] for e in warm],
              "profiled_step_s": [e["step_s"] for e in profiled], "wall_per_step_s": wall * per,
              "gpu_busy_per_step_s": busy_us(kernels) * 1e-6 * per,
              "kernel_time_per_step_s": sum(k.time_range.elapsed_us() for k in kernels) * 1e-6 * per,
              "kernels_per_step": len(kernels) * per,
              "tokens_per_step": [round(e["tokens_per_s"] * e["step_s"]) for e in profiled],
              "card": card(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    result["gpu_idle_share"] = 1 - result["gpu_busy_per_step_s"] / result["wall_per_step_s"]
    (a.out_dir / "profile_cli_cuda.txt").write_text(avg.table(sort_by="self_cuda_time_total", row_limit=40))
    (a.out_dir / "profile_cli_cpu.txt").write_text(avg.table(sort_by="self_cpu_time_total", row_limit=40))
    write_json(a.out_dir / "profile_cli.json", result)
    print(result, flush=True)


if __name__ == "__main__":
    main()
