"""Offline inference to a submission CSV (`ID,Answer`), one row per test ID in test order.

    python infer.py --test TEST.csv --out SUBMISSION.csv (--recipe RECIPE | --model DIR) [--adapter DIR | --no-adapter]

With --recipe the adapter is that run's `checkpoints/best`, verified against its manifest; a run without a
usable one is refused (exit 2) unless --adapter names another or --no-adapter asks for the base model. The
first line printed names the adapter and its step.

MC questions are answered by masked digit scoring (always a valid digit), subjective ones by capped
generation. Answers are appended to `SUBMISSION.csv.partial.jsonl` batch by batch; a killed run, re-run
with the same command, skips the finished batches and writes the same file. The CSV itself is written
once, atomically, after checking every row. Runs on Python 3.10 + PyTorch 2.1 + transformers 4.46.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

from engine.errors import ArgumentParser, UserError, run_cli
from engine.quiet import quiet_library_noise
from engine.faults import fault
from engine.files import atomic_write_text
from engine.paths import check_adapter_dir, check_model_dir


def parse_args() -> argparse.Namespace:
    p = ArgumentParser(description="Write a submission CSV for a test file, offline.")
    p.add_argument("--test", required=True, type=Path, help="CSV with ID and Question columns")
    p.add_argument("--out", required=True, type=Path, help="submission CSV to write (ID,Answer)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--recipe", help="take model, prompt and decoding settings from this recipe")
    src.add_argument("--model", help="base model directory (decoding settings: defaults)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--adapter", type=Path, help="LoRA adapter directory (default with --recipe: its run's "
                                                     "checkpoints/best)")
    which.add_argument("--no-adapter", action="store_true", help="answer with the base model alone, on purpose")
    p.add_argument("--batch-size", type=int, help="MC prompts per forward pass (default: decode.batch_size)")
    p.add_argument("--subj-batch-size", type=int, help="subjective prompts per generate call "
                                                       "(default: decode.subj_batch_size)")
    p.add_argument("--max-new-tokens", type=int, help="cap on subjective answers (default: decode.max_new_tokens)")
    p.add_argument("--no-merge", action="store_true",
                   help="keep the 4-bit base and the LoRA branches apart, as in training (~5.5 GB instead of "
                        "~15 GB for A.X 4.0 Light, and slower); by default the 4-bit weights are dequantized "
                        "and the adapter merged into them")
    return p.parse_args()


def recipe_adapter(recipe) -> Path:
    """The run's `checkpoints/best`, verified; anything else is a user error that says what to do."""
    from engine.checkpoint import newest_verified, verify

    ckpt_root = Path(recipe.output_dir) / "checkpoints"
    best = ckpt_root / "best"
    if best.is_dir():
        problem = verify(best)
        if problem is None:
            return best
        where = f"{best} is damaged ({problem})"
    else:
        where = f"no checkpoint under {recipe.output_dir}"
    newest = newest_verified(ckpt_root)
    instead = f"pass --adapter {newest}" if newest else "train first, pass --adapter DIR"
    raise UserError(f"{where}: {instead}, or --no-adapter for the base model")


def adapter_step(adapter: Path) -> str:
    from engine.checkpoint import manifest_step
    step = manifest_step(adapter)
    return f"step {step}" if step is not None else "step unknown: no manifest"


def settings(args: argparse.Namespace):
    """(recipe, adapter dir or None) with the command line's choices applied."""
    from engine.checkpoint import MANIFEST, verify
    from engine.config import Recipe, load_recipe

    if args.recipe:
        recipe = load_recipe(args.recipe)
    else:
        recipe = Recipe()
        recipe.model.path = args.model
    for key in ("batch_size", "subj_batch_size", "max_new_tokens"):  # command line over recipe
        value = getattr(args, key)
        if value is not None:
            if value <= 0:
                raise UserError(f"--{key.replace('_', '-')} must be greater than 0")
            setattr(recipe.decode, key, value)
    check_model_dir(recipe.model.path, "model.path" if args.recipe else "--model")
    adapter = args.adapter
    if adapter is not None:
        check_adapter_dir(adapter)
        problem = verify(adapter) if (adapter / MANIFEST).exists() else None
        if problem:
            raise UserError(f"--adapter: {adapter} is damaged ({problem})")
    elif args.recipe and not args.no_adapter:
        adapter = recipe_adapter(recipe)
    return recipe, adapter


def fingerprint(test: Path, recipe, adapter, merge: bool) -> str:
    """What the partial answers depend on: a different test file, model or setting starts afresh."""
    h = hashlib.sha256(test.read_bytes())
    d = recipe.decode
    h.update(json.dumps([str(Path(recipe.model.path).resolve()), str(adapter and Path(adapter).resolve()),
                         recipe.data.system_prompt, recipe.data.max_len, d.max_new_tokens, d.temperature,
                         d.no_repeat_ngram_size, d.max_sentences, d.max_chars, d.batch_size, d.subj_batch_size,
                         d.fast_generate, d.mc_permutations, recipe.seed, merge]).encode())
    if adapter is not None:
        h.update((Path(adapter) / "adapter_model.safetensors").read_bytes() if
                 (Path(adapter) / "adapter_model.safetensors").is_file() else b"")
    return h.hexdigest()[:16]


def read_partial(path: Path, key: str) -> dict[str, str]:
    """Answers from an earlier run of the same job; a torn last line (killed mid-write) is dropped."""
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        if not lines or json.loads(lines[0]).get("fingerprint") != key:
            print(f"note: {path} is from another job; starting over", file=sys.stderr)
            return {}
    except json.JSONDecodeError:
        return {}
    done = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            break
        done.update(rec["answers"])
    return done


def append_partial(path: Path, answers: dict[str, str]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"answers": answers}, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def check_answers(examples, answers: dict[str, str]) -> None:
    from metrics.score import is_allowed_digit
    for ex in examples:
        a = answers.get(ex.id)
        if a is None:
            raise RuntimeError(f"no answer for ID {ex.id}")
        if ex.kind == "mc" and not is_allowed_digit(a, ex.n_options):
            raise RuntimeError(f"ID {ex.id}: MC answer {a!r} is not a digit 1..{ex.n_options}")
        if ex.kind == "subj" and not a.strip():
            raise RuntimeError(f"ID {ex.id}: empty subjective answer")


def write_csv_atomically(path: Path, examples, answers: dict[str, str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ID", "Answer"])
    for ex in examples:
        w.writerow([ex.id, answers[ex.id]])
    atomic_write_text(path, buf.getvalue(), before_replace=lambda: fault("kill-infer-write"))


def check_out_dir(out: Path) -> None:
    if not out.parent.is_dir():
        raise UserError(f"--out: directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out: directory {out.parent} is not writable")


def open_partial(partial: Path, key: str, n_questions: int) -> dict[str, str]:
    """The answers an earlier run of this job left in `partial`, or a fresh file headed by the job's key."""
    answers = read_partial(partial, key)
    if answers:
        print(f"resuming: {len(answers)} of {n_questions} answers already in {partial}", file=sys.stderr)
    else:
        partial.write_text(json.dumps({"fingerprint": key}) + "\n", encoding="utf-8")
    return answers


def load_for_inference(recipe, adapter, merge: bool):
    """(model in eval mode, tokenizer, seconds): the base, the adapter, then merged (or LoRA kept apart)."""
    import torch
    from engine.perf.lora_forward import set_lora_forward
    from engine.model import load_adapter, load_base_model, load_tokenizer, merged_for_inference

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    tokenizer = load_tokenizer(recipe.model.path)
    model = load_base_model(recipe.model)
    if adapter is not None:
        model = load_adapter(model, adapter)
    model = merged_for_inference(model) if merge else set_lora_forward(model, fused_update=True)
    return model.eval(), tokenizer, time.perf_counter() - t0


def prompts_for(tokenizer, examples, recipe) -> list[list[int]]:
    from engine.data import cut_prompt, encode_prompt

    sp, max_len = recipe.data.system_prompt, recipe.data.max_len
    full = [encode_prompt(tokenizer, ex, sp) for ex in examples]
    if cut := sum(len(p) > max_len for p in full):
        print(f"{cut} of {len(examples)} prompts cut to data.max_len={max_len} tokens (their start is dropped)",
              file=sys.stderr)
    return [cut_prompt(p, max_len) for p in full]


def answer_all(model, tokenizer, examples, prompts, recipe, answers: dict[str, str], partial: Path) -> dict:
    """Fill `answers` batch by batch (each batch appended to `partial` as it is done); seconds per kind."""
    from tqdm import tqdm
    from decode.answer import answer_batches
    from decode.digits import digit_token_ids
    from engine.data import prompt_ids
    from engine.loss import autocast

    sp, max_len = recipe.data.system_prompt, recipe.data.max_len
    counts = {k: sum(ex.kind == k for ex in examples) for k in ("mc", "subj")}
    seconds = {"mc": 0.0, "subj": 0.0}
    done = {i for i, ex in enumerate(examples) if ex.id in answers}
    bar = tqdm(total=len(examples), initial=len(answers), desc="infer", unit="q", file=sys.stderr)
    with autocast(next(model.parameters()).device):
        for got in answer_batches(model, tokenizer, examples, prompts,
                                  lambda ex: prompt_ids(tokenizer, ex, sp, max_len),
                                  digit_token_ids(tokenizer, prompts[0]), recipe.decode, done=done,
                                  fallbacks=[ex.question.splitlines()[0].strip() for ex in examples]):
            if not seconds[got.kind]:
                per_q = got.seconds / len(got.rows)
                bar.write(f"{got.kind}: {per_q * 1000:.1f} ms a question -> about {per_q * counts[got.kind]:.1f} s "
                          f"for its {counts[got.kind]} questions", file=sys.stderr)
            seconds[got.kind] += got.seconds
            new = {examples[i].id: a for i, a in zip(got.rows, got.answers)}
            append_partial(partial, new)
            answers.update(new)
            bar.update(len(got.rows))
    bar.close()
    return seconds


def main() -> int:
    quiet_library_noise()
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    args = parse_args()
    from engine.data import read_examples
    examples = read_examples(args.test, require_answer=False)
    check_out_dir(args.out)
    recipe, adapter = settings(args)
    print(f"adapter: {adapter} ({adapter_step(adapter)})" if adapter else
          f"adapter: none, the base model {recipe.model.path} alone", file=sys.stderr, flush=True)
    partial = args.out.with_name(args.out.name + ".partial.jsonl")
    answers = open_partial(partial, fingerprint(args.test, recipe, adapter, not args.no_merge), len(examples))

    from decode.forward import warm_up
    from engine.loss import autocast
    model, tokenizer, load_s = load_for_inference(recipe, adapter, merge=not args.no_merge)
    device = next(model.parameters()).device
    prompts = prompts_for(tokenizer, examples, recipe)
    t_warm = time.perf_counter()
    with autocast(device):
        warm_up(model, prompts[0], tokenizer.pad_token_id)
    warm_s = time.perf_counter() - t_warm
    print(f"model loaded in {load_s:.1f} s, warmed up in {warm_s:.1f} s "
          f"({'adapter ' + str(adapter) if adapter else 'no adapter'}, "
          f"{'4-bit + LoRA' if args.no_merge else 'merged'}, {next(model.parameters()).dtype}, "
          f"device {device.type})", file=sys.stderr)

    started = time.perf_counter()
    seconds = answer_all(model, tokenizer, examples, prompts, recipe, answers, partial)
    check_answers(examples, answers)
    write_csv_atomically(args.out, examples, answers)
    partial.unlink(missing_ok=True)
    wall = time.perf_counter() - started
    n_mc = sum(ex.kind == "mc" for ex in examples)
    print(f"wrote {args.out}: {len(examples)} answers ({n_mc} MC in {seconds['mc']:.1f} s, {len(examples) - n_mc} "
          f"subjective in {seconds['subj']:.1f} s), {wall:.1f} s after model load", file=sys.stderr)
    print(json.dumps({"questions": len(examples), "mc": n_mc, "subj": len(examples) - n_mc,
                      "load_s": round(load_s, 2), "warm_up_s": round(warm_s, 2), "mc_s": round(seconds["mc"], 3),
                      "subj_s": round(seconds["subj"], 3), "after_load_s": round(wall, 3)}))
    return 0


if __name__ == "__main__":
    run_cli(main)
