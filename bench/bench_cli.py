"""What users run, timed: `python train.py RECIPE` on a CSV (sampler, collate, logging: the CLI path, with
nothing but the model path, the data path and the step count on its command line), beside HF Trainer + peft
on the same CSV and tokenization (micro-batch 8 x grad_accum 2, padded to each micro-batch's longest row as its
collator does, once without and once with `group_by_length`; the better row is the yardstick).

train.py runs twice: first on a cold inductor cache, then warm; the first-step times of both are kept.
Step times are medians after WARMUP steps. Writes OUT_JSON key "cli" -> "brief_recipe".

    python -m bench.bench_cli MODEL_DIR TRAIN_CSV OUT_JSON [--recipe recipes/baseline.yaml] [--steps 40]
        [--override KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import card, write_json

WARMUP = 5


BENCH_KEYS = ("model.path=", "data.train=", "train.max_steps=", "output_dir=", "eval.generate=")
"""Overrides that say where things are and how long to run, not how fast: eval.generate=false because the GPU
machine has no embedder to score generated answers with (the final eval comes after the timed steps)."""


def run_train_py(recipe: str, model_dir: str, csv: str, steps: int, out_dir: Path, log: Path,
                 extra: list[str]) -> dict:
    overrides = [f"model.path={model_dir}", f"data.train={csv}", f"train.max_steps={steps}", f"output_dir={out_dir}",
                 *extra]
    shutil.rmtree(out_dir, ignore_errors=True)
    report = log.with_suffix(".compile.json")
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "bench.compile_report", str(report), "train.py", recipe, *overrides],
                           stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"train.py exited {r.returncode}; see {log}")
    events = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if e["event"] == "train"]
    plan = next((line for line in log.read_text().splitlines() if line.startswith("speed plan")), "")
    predicted = re.search(r"predicted peak ([0-9.]+) GiB", plan)
    timed = [e["step_s"] for e in train[WARMUP:]]
    return {"step_s": statistics.median(timed), "mean_step_s": statistics.mean(timed),
            "first_step_s": train[0]["step_s"], "second_step_s": train[1]["step_s"],
            "peak_gib": max(e["peak_mem_gib"] for e in train),
            "predicted_peak_gib": float(predicted.group(1)) if predicted else None,
            "peak_reserved_gib": max(e.get("peak_reserved_gib", 0.0) for e in train), "plan": plan,
            "overrides": [o for o in overrides if not o.startswith(BENCH_KEYS)]}


def fsku_steps(recipe_path: str, model_dir: str, csv: str, steps: int) -> tuple[list[list], int]:
    """The HF-style steps of the CSV (a seeded permutation, micro_batch x grad_accum rows a step, tokenized as
    train.py does) and grad_accum: what HF Trainer and Unsloth are both timed on."""
    import numpy as np
    from engine.config import load_recipe
    from engine.data import encode_all, read_examples
    from engine.model import load_tokenizer

    recipe = load_recipe(recipe_path, [])
    t = recipe.train
    encoded = encode_all(load_tokenizer(model_dir), read_examples(csv), recipe.data.system_prompt,
                         recipe.data.max_len)
    order = np.random.default_rng(0).permutation(len(encoded))
    per_step = t.micro_batch * t.grad_accum
    return [[encoded[i] for i in order[k * per_step:(k + 1) * per_step]] for k in range(steps)], t.grad_accum


def hf_rows(recipe_path: str, model_dir: str, csv: str, steps: int) -> dict:
    from bench.bench_train import hf_model, release_gpu_memory, run_hf

    data, grad_accum = fsku_steps(recipe_path, model_dir, csv, steps)
    model = hf_model(model_dir)
    rows = {f"group_by_length={g}": run_hf(model, data, grad_accum, g) for g in (False, True)}
    del model
    release_gpu_memory()
    return rows


def unsloth_rows(recipe_path: str, model_dir: str, csv: str, steps: int, site: str, out: Path) -> dict:
    """bench/unsloth_cli.py in its own process (Unsloth patches transformers), its packages from `site`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([site, os.getcwd()])}
    log = out.with_name("cli_unsloth.log")
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "bench.unsloth_cli", recipe_path, model_dir, csv, str(steps),
                            str(out.with_name("cli_unsloth.json"))], stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        return {"error": f"exit {r.returncode}; see {log.name}"}
    return json.loads(out.with_name("cli_unsloth.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("train_csv")
    p.add_argument("out_json")
    p.add_argument("--recipe", default="recipes/baseline.yaml")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--key", default="brief_recipe", help='the entry under "cli" to write')
    p.add_argument("--ours-only", action="store_true", help="one train.py run (cold cache), no HF")
    p.add_argument("--override", action="append", default=[], help="more train.py overrides (KEY=VALUE)")
    p.add_argument("--unsloth-site", help="where Unsloth's packages are installed: time Unsloth too (its own process)")
    a = p.parse_args()
    out = Path(a.out_json)
    work = Path(".cache/bench-cli")
    work.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", f"/tmp/torchinductor_{os.environ.get('USER', 'root')}"))
    shutil.rmtree(cache, ignore_errors=True)
    cold = run_train_py(a.recipe, a.model_dir, a.train_csv, a.steps, work / "cold", out.with_name("cli_cold.log"),
                        a.override)
    if a.ours_only:
        return write_entry(out, a.key, {"recipe": a.recipe, "overrides": a.override, **cold, "card": card(),
                                        "date": time.strftime("%Y-%m-%d")})
    warm = run_train_py(a.recipe, a.model_dir, a.train_csv, a.steps, work / "warm", out.with_name("cli_warm.log"),
                        a.override)
    hf = hf_rows(a.recipe, a.model_dir, a.train_csv, a.steps)
    unsloth = unsloth_rows(a.recipe, a.model_dir, a.train_csv, a.steps, a.unsloth_site, out) if a.unsloth_site else {}
    best_hf = min(hf.values(), key=lambda r: r["step_s"])
    best_unsloth = min((r for r in unsloth.values() if isinstance(r, dict) and "step_s" in r),
                       key=lambda r: r["step_s"], default={})
    entry = {"recipe": a.recipe, "csv": a.train_csv, "steps": a.steps, "warmup": WARMUP, "plan": warm["plan"],
             "hf_step_s": best_hf["step_s"], "hf_peak_gib": best_hf["peak_gib"], "hf_rows": hf,
             "ours_step_s": warm["step_s"], "ours_mean_step_s": warm["mean_step_s"],
             "ours_step_s_cold_run": cold["step_s"], "ours_peak_gib": warm["peak_gib"],
             "ours_predicted_peak_gib": warm["predicted_peak_gib"], "ours_peak_reserved_gib": warm["peak_reserved_gib"],
             "speedup_vs_hf": best_hf["step_s"] / warm["step_s"],
             "peak_mem_ratio_vs_hf": warm["peak_gib"] / best_hf["peak_gib"], "ours_overrides": warm["overrides"],
             "bench_overrides": [o for o in a.override if o.startswith(BENCH_KEYS)],
             "first_step_s_cold": cold["first_step_s"], "first_step_s_warm": warm["first_step_s"],
             "second_step_s_cold": cold["second_step_s"], "second_step_s_warm": warm["second_step_s"],
             "unsloth_step_s": best_unsloth.get("step_s"), "unsloth_peak_gib": best_unsloth.get("peak_gib"),
             "speedup_vs_unsloth": best_unsloth["step_s"] / warm["step_s"] if best_unsloth else None,
             "unsloth_rows": unsloth,
             "card": card(), "date": time.strftime("%Y-%m-%d")}
    write_entry(out, a.key, entry)


def write_entry(out: Path, key: str, entry: dict) -> None:
    results = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("cli", {})[key] = entry
    write_json(out, results)
    print(json.dumps(entry, indent=1))


if __name__ == "__main__":
    main()
