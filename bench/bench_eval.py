"""In-loop eval speed on the A.X-shape model: one eval of 2,000 rows (the teacher-forced pass that gives
eval_loss and the MC answers, then generation for the subjective rows; scoring runs on the CPU and is timed
there) beside HF `generate` in batches of 64.

    python -m bench.bench_eval MODEL_DIR EVAL_CSV OUT_JSON [--batch-size 64] [--skip-hf]
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.common import card, synchronize, write_json
from decode.batching import left_pad
from engine.config import Recipe
from engine.data import read_examples
from engine.evaluate import Evaluator
from engine.loss import autocast
from engine.model import add_lora, load_base_model, load_tokenizer


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


def main(model_dir: str, eval_csv: str, out_json: str, batch_size: int = 64, skip_hf: bool = False,
         variants: tuple[str, ...] = ("lora", "merged")) -> dict:
    recipe = Recipe()
    recipe.model.path = model_dir
    recipe.decode.batch_size = batch_size
    recipe.decode.subj_batch_size = 300
    tokenizer = load_tokenizer(model_dir)
    t0 = time.perf_counter()
    # the training model as the loop evaluates it: 4-bit base with LoRA branches, in eval mode
    model = add_lora(load_base_model(recipe.model), recipe.lora, True).eval()
    load_s = time.perf_counter() - t0
    examples = read_examples(eval_csv)
    ev = Evaluator(tokenizer, examples, recipe, None)
    mc = [p for e, p in zip(examples, ev.prompts) if e.kind == "mc"]
    subj = [p for e, p in zip(examples, ev.prompts) if e.kind == "subj"]
    result = {"card": card(), "date": time.strftime("%Y-%m-%d"), "rows": len(examples), "mc_rows": len(mc),
              "subj_rows": len(subj), "model_load_s": round(load_s, 1), "batch_size": batch_size}
    for variant in variants:
        recipe.eval.merge_lora = variant == "merged"
        ev.loss_and_answers(model)  # warm-up: kernels, allocator
        synchronize()
        t0 = time.perf_counter()
        loss, decoded = ev.loss_and_answers(model)
        synchronize()
        eval_s = time.perf_counter() - t0
        result[variant] = {
            "ours_eval_s": round(eval_s, 3),
            "ours_teacher_forced_s": round(eval_s - decoded.mc_seconds - decoded.subj_seconds, 3),
            "ours_mc_apart_s": round(decoded.mc_seconds, 3), "ours_subj_s": round(decoded.subj_seconds, 3),
            "eval_loss": loss, "ours_ms_per_subj": round(1000 * decoded.subj_seconds / len(subj), 1),
            "subj_tokens_generated_mean": sum(p.n_tokens or 0 for p in decoded.predictions) / max(1, len(subj))}
        print(variant, result[variant], flush=True)
    if not skip_hf:
        hf_mc = hf_generate_seconds(model, tokenizer, mc, 1)
        hf_subj = hf_generate_seconds(model, tokenizer, subj, recipe.decode.max_new_tokens)
        result.update({"hf_generate_mc_s": round(hf_mc, 3), "hf_generate_subj_s": round(hf_subj, 3),
                       "hf_ms_per_mc": round(1000 * hf_mc / len(mc), 2),
                       "hf_ms_per_subj": round(1000 * hf_subj / len(subj), 1),
                       "hf_2000_row_eval_estimate_s": round(hf_mc + hf_subj, 1)})
    write_json(Path(out_json), result)
    print(result)
    return result


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("eval_csv")
    p.add_argument("out_json")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--variants", default="lora,merged", help="lora (eval.merge_lora off), merged")
    a = p.parse_args()
    main(a.model_dir, a.eval_csv, a.out_json, a.batch_size, a.skip_hf, tuple(a.variants.split(",")))
