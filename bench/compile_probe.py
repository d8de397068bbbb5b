"""Does torch.compile of each 4-bit decoder layer remove the per-step host overhead? Step time and the
loss of a fixed batch, before and after `layer.compile()`, at 4 x 512 and the length-grouped FSKU mix.

    python -m bench.compile_probe MODEL_DIR OUT_JSON
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from bench.bench_train import batches_for, our_model, run_ours, vocab_size
from bench.common import write_json
from engine.batch import collate
from engine.loss import forward_backward


def fixed_loss(model, items) -> float:
    model.zero_grad(set_to_none=True)
    loss = float(forward_backward(model, [collate(items, 1, "cuda")], "token", 4096))
    model.zero_grad(set_to_none=True)
    return loss


def main(model_dir: str, out_json: str) -> None:
    vocab = vocab_size(model_dir)
    shapes = {s: batches_for(s, 13, vocab) for s in ("4x512", "gmix64")}
    probe = batches_for("4x512", 1, vocab, seed=7)[0]
    model = our_model(model_dir)
    result = {"loss_before": fixed_loss(model, probe)}
    for s, data in shapes.items():
        result[f"{s}_eager_step_s"] = run_ours(model, data)["step_s"]
    result["loss_eager_after_training"] = fixed_loss(model, probe)
    for layer in model.get_base_model().model.layers:
        layer.compile(dynamic=True)
    t0 = time.perf_counter()
    try:
        result["loss_compiled"] = fixed_loss(model, probe)
        result["first_compiled_step_s"] = time.perf_counter() - t0
        for s, data in shapes.items():
            r = run_ours(model, data)
            result[f"{s}_compiled_step_s"] = r["step_s"]
            result[f"{s}_compiled_peak_gib"] = r["peak_gib"]
    except Exception as e:  # the probe reports what failed rather than dying
        result["compile_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    import torch._dynamo as dynamo
    result["graph_breaks"] = {k: v for k, v in dynamo.utils.counters["graph_break"].items()} if hasattr(
        dynamo, "utils") else {}
    write_json(Path(out_json), result)
    print(result)


if __name__ == "__main__":
    main(*sys.argv[1:3])
