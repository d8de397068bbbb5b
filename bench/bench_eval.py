"""Eval and inference speed on the A.X-shape model: one in-loop eval of 2,000 rows (decode only; scoring
runs on the CPU and is timed there) beside HF `generate` in batches of 64.

    python -m bench.bench_eval MODEL_DIR EVAL_CSV OUT_JSON
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from bench.common import card, synchronize, write_json
from decode.batching import left_pad
from engine.config import Recipe
from engine.data import read_examples
from engine.evaluate import Evaluator, eval_loss
from engine.loss import autocast
from engine.model import load_base_model, load_tokenizer


def hf_generate_seconds(model, tokenizer, prompts, max_new_tokens: int, batch: int = 64) -> float:
    """The yardstick: HF generate over the prompts in file order, batches of 64, left-padded."""
    synchronize()
    t0 = time.perf_counter()
    for k in range(0, len(prompts), batch):
        ids, mask = left_pad(prompts[k:k + batch], tokenizer.pad_token_id, model.device)
        with torch.no_grad(), autocast(model.device):
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    synchronize()
    return time.perf_counter() - t0


def main(model_dir: str, eval_csv: str, out_json: str) -> None:
    recipe = Recipe()
    recipe.model.path = model_dir
    recipe.decode.batch_size = 64
    recipe.decode.subj_batch_size = 300
    tokenizer = load_tokenizer(model_dir)
    t0 = time.perf_counter()
    model = load_base_model(recipe.model).eval()
    load_s = time.perf_counter() - t0
    examples = read_examples(eval_csv)
    ev = Evaluator(tokenizer, examples, recipe, None)
    ev.decode(model)  # warm-up: kernels, allocator
    synchronize()
    t0 = time.perf_counter()
    loss = eval_loss(model, ev.encoded, recipe.decode.batch_size, tokenizer.pad_token_id)
    synchronize()
    loss_s = time.perf_counter() - t0
    decoded = ev.decode(model)
    mc = [p for e, p in zip(examples, ev.prompts) if e.kind == "mc"]
    subj = [p for e, p in zip(examples, ev.prompts) if e.kind == "subj"]
    hf_mc = hf_generate_seconds(model, tokenizer, mc, 1)
    hf_subj = hf_generate_seconds(model, tokenizer, subj, recipe.decode.max_new_tokens)
    result = {
        "card": card(), "date": time.strftime("%Y-%m-%d"), "rows": len(examples), "mc_rows": len(mc),
        "subj_rows": len(subj), "model_load_s": round(load_s, 1),
        "ours_mc_s": round(decoded.mc_seconds, 3), "ours_subj_s": round(decoded.subj_seconds, 3),
        "ours_decode_s": round(decoded.mc_seconds + decoded.subj_seconds, 3),
        "ours_eval_loss_s": round(loss_s, 3), "eval_loss": loss,
        "ours_ms_per_mc": round(1000 * decoded.mc_seconds / len(mc), 2),
        "ours_ms_per_subj": round(1000 * decoded.subj_seconds / len(subj), 1),
        "hf_generate_mc_s": round(hf_mc, 3), "hf_generate_subj_s": round(hf_subj, 3),
        "hf_ms_per_mc": round(1000 * hf_mc / len(mc), 2), "hf_ms_per_subj": round(1000 * hf_subj / len(subj), 1),
        "subj_tokens_generated_mean": sum(p.n_tokens or 0 for p in decoded.predictions) / max(1, len(subj)),
    }
    write_json(Path(out_json), result)
    print(result)


if __name__ == "__main__":
    main(*sys.argv[1:4])
