"""Unsloth as its users run it, on the CSV bench_cli times train.py and HF Trainer on: FastLanguageModel 4-bit +
get_peft_model (r 16, alpha 32, all seven projections, LoRA dropout as the recipe, gradient checkpointing
"unsloth"), then HF Trainer (which Unsloth patches) over the very steps HF Trainer is timed on
(bench_cli.fsku_steps: micro-batch 8 x grad_accum 2), `group_by_length` off and on. Its own process: Unsloth
must be imported before transformers, and it patches transformers for the whole process.

    PYTHONPATH=UNSLOTH_SITE:. python -m bench.unsloth_cli RECIPE MODEL_DIR TRAIN_CSV STEPS OUT_JSON
"""
from __future__ import annotations

import os
from pathlib import Path
import sys

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", "/tmp/unsloth_compiled_cache")
import unsloth  # noqa: E402,F401  (first: it patches transformers as it is imported)
from unsloth import FastLanguageModel  # noqa: E402

import torch  # noqa: E402

from bench.bench_cli import fsku_steps  # noqa: E402
from bench.bench_train import run_hf  # noqa: E402
from bench.common import write_json  # noqa: E402
from engine.config import load_recipe  # noqa: E402


def main(recipe_path: str, model_dir: str, csv: str, steps: str, out_json: str) -> None:
    recipe = load_recipe(recipe_path, [])
    data, grad_accum = fsku_steps(recipe_path, model_dir, csv, int(steps))
    model, _ = FastLanguageModel.from_pretrained(model_name=os.path.abspath(model_dir), max_seq_length=2048,
                                                 dtype=torch.bfloat16, load_in_4bit=True)
    model = FastLanguageModel.get_peft_model(model, r=recipe.lora.r, lora_alpha=recipe.lora.alpha,
                                             lora_dropout=recipe.lora.dropout, target_modules=recipe.lora.targets,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=0)
    FastLanguageModel.for_training(model)
    rows = {"version": unsloth.__version__}
    for g in (False, True):
        rows[f"group_by_length={g}"] = run_hf(model, data, grad_accum, g, gradient_checkpointing=False)
        write_json(Path(out_json), rows)
    print(rows, flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:6])
