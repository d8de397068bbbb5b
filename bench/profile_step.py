"""Where a training step's time goes on the A.X-shape model: step times at 4 x 512 with and without
gradient checkpointing, then a torch.profiler table of two steps (self CPU and CUDA time by op).

    python -m bench.profile_step MODEL_DIR OUT_DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from bench.bench_train import batches_for, our_model, vocab_size
from bench.common import StepTimer, write_json
from engine.batch import collate
from engine.loss import forward_backward


def steps(model, data, opt, timer=None):
    params = [p for p in model.parameters() if p.requires_grad]
    for items in data:
        if timer:
            timer.start()
        forward_backward(model, [collate(items, 1, "cuda")], "token", 4096)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if timer:
            timer.stop()


def main(model_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    data = batches_for("4x512", 8, vocab_size(model_dir))
    model = our_model(model_dir)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    result = {}
    for ckpt in (True, False):
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        timer = StepTimer()
        steps(model, data, opt, timer)
        result[f"step_s_checkpointing_{ckpt}"] = timer.median(3)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        steps(model, data[:2], opt)
        torch.cuda.synchronize()
    avg = prof.key_averages()
    result["self_cpu_total_s"] = sum(e.self_cpu_time_total for e in avg) / 1e6 / 2
    result["self_cuda_total_s"] = sum(getattr(e, "self_device_time_total", 0) for e in avg) / 1e6 / 2
    result["cpu_ops_per_step"] = sum(e.count for e in avg if e.key.startswith("aten::")) // 2
    (out / "profile_cpu.txt").write_text(avg.table(sort_by="self_cpu_time_total", row_limit=30), encoding="utf-8")
    (out / "profile_cuda.txt").write_text(avg.table(sort_by="self_cuda_time_total", row_limit=30), encoding="utf-8")
    write_json(out / "profile.json", result)
    print(result)


if __name__ == "__main__":
    main(*sys.argv[1:3])
