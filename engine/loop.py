"""The training loop: setup, train, save_checkpoint, cleanup. Read `run` top to bottom.

Each optimizer step takes `micro_batch * grad_accum` examples (engine.sampling). Every micro-batch's
loss is divided by the step's count of answer tokens (or of examples, with loss_weighting=example) before
backward, so the accumulated gradient is the gradient of the whole batch's loss.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml

from decode.digits import digit_token_ids
from engine import distributed as dist
from engine.checkpoint import (apply_checkpoint, remove_partial_writes, rng_state, save_adapter,
                               save_checkpoint, usable_checkpoint, newest_verified, verify)
from engine.config import Recipe, dump_recipe, recipe_to_dict
from engine.curves import best_eval, read_events, write_curves
from engine.data import Encoded, Example, encode_all, encode_prompt, read_examples
from engine.errors import TrainingError, UserError
from engine.evaluate import Evaluator
from engine.faults import fault
from engine.files import atomic_write_text, sha256_of
from engine.paths import check_model_dir
from engine.labels import check_labels
from engine.loss import forward_backward
from engine.perf.packing import step_batches
from engine.perf.speed import speed_up
from engine.model import add_lora, count_parameters, ensure_tiny_model, load_base_model, load_tokenizer
from engine.lora import is_4bit
from engine.sampling import Sampler
from engine.schedule import lr_at
from engine.split import cap_kinds, check_disjoint, pin_eval_subset, split_train_eval

log = logging.getLogger("engine")


# --- run directory and logs ----------------------------------------------------------------------------

def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def check_inputs(recipe: Recipe) -> None:
    """Fail on a wrong path before anything loads or any directory is made."""
    if not recipe.model.build_tiny:
        check_model_dir(recipe.model.path)
    for key, path in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
        if path and not Path(path).is_file():
            raise UserError(f"{key}: {path}: file not found")


def data_fingerprints(recipe: Recipe, n_train: int, n_eval: Optional[int]) -> dict:
    """sha256 and row count of the data files a run reads: a resumed run must read the same rows."""
    prints = {}
    for key, path, rows in (("data.train", recipe.data.train, n_train), ("data.eval", recipe.data.eval, n_eval)):
        if path:
            prints[key] = {"path": path, "sha256": sha256_of(path), "rows": rows}
    return prints


def check_same_data(stored_path: Path, prints: dict) -> None:
    stored = json.loads(stored_path.read_text(encoding="utf-8"))
    for key in sorted(set(stored) | set(prints)):
        old, new = stored.get(key), prints.get(key)
        if (old or {}).get("sha256") != (new or {}).get("sha256"):
            def show(p):
                return f"sha256 {p['sha256'][:12]}, {p['rows']} rows" if p else "none"
            raise UserError(f"{key}: {(new or old)['path']} is not the data this run started with (then "
                            f"{show(old)}, now {show(new)}); restore it, or start over with train.resume=false")


def prepare_run_dir(recipe: Recipe, data_prints: dict) -> Path:
    """The run directory, fresh or to resume; a resumed one must hold the same recipe and the same data.
    Nothing is written here: `record_run` does that once every check has passed."""
    run_dir = Path(recipe.output_dir)
    if not recipe.train.resume and run_dir.exists() and any(run_dir.iterdir()):
        n = 1
        while Path(f"{run_dir}-{n}").exists():
            n += 1
        run_dir = Path(f"{run_dir}-{n}")
        recipe.output_dir = str(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir: {run_dir} is a file, not a directory")
    stored_path = run_dir / "recipe.yaml"
    current = _flatten(recipe_to_dict(recipe))
    if stored_path.exists():
        stored = _flatten(yaml.safe_load(stored_path.read_text(encoding="utf-8")) or {})
        for key in sorted(set(stored) | set(current)):
            if key not in ("train.resume", "output_dir") and stored.get(key) != current.get(key):
                raise UserError(f"{stored_path}: this run was made with {key}={stored.get(key)!r}, now "
                                f"{current.get(key)!r}; resume with the same recipe, or set train.resume=false")
    if (run_dir / "data.json").exists():
        check_same_data(run_dir / "data.json", data_prints)
    return run_dir


def record_run(run_dir: Path, recipe: Recipe, overrides: list[str], data_prints: dict) -> None:
    """The resolved recipe (overrides noted at its top) and the data fingerprints, into the run directory."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output_dir: cannot create {run_dir}: {e.strerror}") from None
    header = "".join(f"# override: {o}\n" for o in overrides)
    atomic_write_text(run_dir / "recipe.yaml", header + dump_recipe(recipe))
    atomic_write_text(run_dir / "data.json", json.dumps(data_prints, indent=1, ensure_ascii=False))


class MetricsLog:
    """metrics.jsonl: one event a line, flushed as written."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Drop events past `step`: a resumed run logs them again, as an uninterrupted run would have."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def write(self, event: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, ensure_ascii=False) + "\n")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def setup_logging(run_dir: Path) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    to_file = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(console)
    log.addHandler(to_file)
    log.propagate = False


# --- state carried across checkpoints ------------------------------------------------------------------

@dataclass
class LoopState:
    best_score: Optional[float] = None
    best_step: int = 0
    evals_without_gain: int = 0
    skipped_nonfinite: int = 0
    last_eval_step: int = 0
    stop_reason: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def make_optimizer(model, recipe: Recipe):
    params = [p for p in model.parameters() if p.requires_grad]
    t = recipe.train
    if t.optimizer == "paged_adamw_8bit":
        if not torch.cuda.is_available():
            raise UserError("train.optimizer: paged_adamw_8bit needs CUDA; use adamw on CPU")
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    fused = torch.cuda.is_available() and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)


def overfit_verdict(metrics_path: Path, expected_drop: float) -> dict:
    """PASS when the last quarter's mean train loss is `expected_drop` (a fraction) under the first's."""
    losses = [e["loss"] for e in map(json.loads, metrics_path.read_text(encoding="utf-8").splitlines())
              if e["event"] == "train"]
    q = max(1, len(losses) // 4)
    first, last = float(np.mean(losses[:q])), float(np.mean(losses[-q:]))
    drop = 1 - last / first if first > 0 else 0.0
    verdict = "PASS" if drop >= expected_drop else "FAIL"
    return {"verdict": verdict, "first_quarter_loss": first, "last_quarter_loss": last, "drop": drop,
            "reason": f"train loss {first:.4f} -> {last:.4f}, a {100 * drop:.1f}% drop, "
                      f"{'at least' if verdict == 'PASS' else 'under'} the {100 * expected_drop:.0f}% asked"}


def data_notes(examples: list[Example], train: list[Encoded], eval_rows: list[Encoded], max_len: int) -> dict:
    """What the data as read differs from the data as written, logged once and kept in summary.json:
    answers whose quoted option text was overruled, and rows cut to `data.max_len`."""
    mismatches = [e.answer_note for e in examples if e.answer_note]
    agreeing = sum(1 for e in examples if e.answer_quoted and not e.answer_note)
    if mismatches:
        log.warning("%d MC answers quote another option's text or none; kept their digit "
                    "(data.answer_text_mismatch=warn), %d quote their own option:\n  %s",
                    len(mismatches), agreeing, "\n  ".join(mismatches))
    cut = {"train": sum(e.truncated for e in train), "eval": sum(e.truncated for e in eval_rows)}
    if any(cut.values()):
        log.warning("cut to data.max_len=%d tokens (prompt start dropped): %d of %d train rows, %d of %d eval rows",
                    max_len, cut["train"], len(train), cut["eval"], len(eval_rows))
    return {"answer_text_mismatches": mismatches, "answers_quoting_their_option": agreeing,
            "truncated_train": cut["train"], "truncated_eval": cut["eval"], "max_len": max_len}


def learning_line(metrics: Path) -> str:
    """What the run learned, first eval against the best: `learned: mc_accuracy 0.23 -> 0.86, ...`."""
    evals = [e for e in read_events(metrics)[1] if "final_score" in e]
    if len(evals) < 2:
        return ""
    first, best = evals[0], best_eval(evals)
    keys = (["mc_accuracy"] if first["n_mc"] else []) + (["subj_score"] if first["n_subj"] else []) + ["final_score"]
    shown = ", ".join(f"{k} {first[k]:.2f} -> {best[k]:.2f}" for k in keys)
    return f"learned: {shown} (eval at step {first['step']} -> the best, step {best['step']})"


# --- the run -------------------------------------------------------------------------------------------

def run(recipe: Recipe, overrides: list[str] = ()) -> dict:
    # setup
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    check_inputs(recipe)
    device = dist.init()
    main = dist.is_main()
    t = recipe.train
    if t.micro_batch * t.grad_accum < dist.world_size():
        raise UserError(f"train.micro_batch x train.grad_accum ({t.micro_batch * t.grad_accum}) must be at least "
                        f"the number of ranks ({dist.world_size()})")
    on_mismatch = recipe.data.answer_text_mismatch
    all_train = read_examples(recipe.data.train, answer_text_mismatch=on_mismatch)
    eval_pool = read_examples(recipe.data.eval, answer_text_mismatch=on_mismatch) if recipe.data.eval else None
    if eval_pool is not None:
        check_disjoint(all_train, eval_pool, recipe.data.train, recipe.data.eval)
    if main:
        ensure_tiny_model(recipe.model, recipe.data.train)
    dist.barrier()
    tokenizer = load_tokenizer(recipe.model.path)
    train_ex, eval_ex = split_train_eval(all_train, eval_pool, recipe.data.eval_share, recipe.data.eval_size,
                                         recipe.seed)
    train_ex = cap_kinds(train_ex, recipe.data.max_mc, recipe.data.max_subj, recipe.seed)
    if not train_ex:
        raise UserError(f"data.train: {recipe.data.train}: no rows left to train on after holding out "
                        f"{len(eval_ex)} for eval; add rows or give data.eval")
    encoded = encode_all(tokenizer, train_ex, recipe.data.system_prompt, recipe.data.max_len)
    digit_ids = digit_token_ids(tokenizer, encode_prompt(tokenizer, train_ex[0], recipe.data.system_prompt))
    check_labels(recipe.data.train, encoded, digit_ids, tokenizer.eos_token_id)
    lengths = [len(e.input_ids) for e in encoded]
    sampler = Sampler([e.kind for e in train_ex], lengths, t, recipe.seed)
    total_steps = min(sampler.total_steps, t.max_steps) if t.max_steps else sampler.total_steps

    prints = data_fingerprints(recipe, len(all_train), None if eval_pool is None else len(eval_pool))
    run_dir = Path(dist.gather_objects(str(prepare_run_dir(recipe, prints)) if main else None)[0])
    recipe.output_dir = str(run_dir)
    ckpt_root = run_dir / "checkpoints"
    saved, skipped = usable_checkpoint(ckpt_root) if t.resume else (None, [])
    if main:
        record_run(run_dir, recipe, list(overrides), prints)
        setup_logging(run_dir)
        eval_ex = pin_eval_subset(run_dir, eval_ex, eval_pool if eval_pool is not None else all_train)
        for line in skipped:
            log.warning("skipping checkpoint %s", line)
        best_problem = verify(ckpt_root / "best") if (ckpt_root / "best").exists() else None
        if best_problem:
            log.warning("%s is damaged (%s): infer.py will refuse it until a better eval rewrites it",
                        ckpt_root / "best", best_problem)
    else:
        log.disabled = True
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    n_mc = sum(e.kind == "mc" for e in train_ex)
    log.info("data: %d train (%d MC, %d subjective), %d eval rows; %d rank(s)", len(train_ex), n_mc,
             len(train_ex) - n_mc, len(eval_ex), dist.world_size())

    model, plan = speed_up(add_lora(load_base_model(recipe.model), recipe.lora, t.gradient_checkpointing), recipe,
                           device)
    trainable, total = count_parameters(model)
    quant = "4-bit NF4" if any(is_4bit(p) for p in model.parameters()) else f"{next(model.parameters()).dtype}"
    if main:
        print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%), base {quant}, "
              f"device {device.type}", flush=True)
        print(plan.line(), flush=True)
    model.train()
    optimizer = make_optimizer(model, recipe)
    torch.manual_seed(recipe.seed + dist.rank())  # the same adapters on every rank, their own dropout masks
    evaluator = Evaluator(tokenizer, eval_ex, recipe, run_dir) if main else None
    notes = data_notes(all_train + (eval_pool or []), encoded, evaluator.encoded if main else [],
                       recipe.data.max_len)
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=main)

    state, step = LoopState(), 0
    if main:
        remove_partial_writes(ckpt_root)
    dist.barrier()
    if saved is not None:
        loaded = apply_checkpoint(saved, model, optimizer, dist.rank(), dist.world_size())
        step, state = loaded["step"], LoopState(**loaded["loop"])
        log.info("resuming from %s (step %d of %d)", saved.path, step, total_steps)
        del saved
    metrics.truncate_after(step)

    def checkpoint(at: int) -> None:
        rngs = dist.gather_objects(rng_state())
        if main:
            try:
                save_checkpoint(ckpt_root, at, model, optimizer, state.as_dict(), rngs,
                                on_half_written=lambda: fault("kill-checkpoint", at) or fault("enospc", at))
            except OSError as e:
                raise TrainingError(f"step {at}: cannot write checkpoint under {ckpt_root}: {e.strerror}; "
                                    f"the previous checkpoint is intact") from None
        dist.barrier()

    def evaluate(at: int) -> bool:
        """On rank 0: log an eval event, follow the best. Every rank learns whether early stopping fires."""
        return dist.broadcast_flag(main and evaluate_here(at))

    def evaluate_here(at: int) -> bool:
        result = evaluator(model, at, on_decoded=lambda: fault("kill-eval", at))
        metrics.write({"event": "eval", "step": at, **result})
        if not state.last_eval_step and result.get("subj_cos_floor") is not None:
            log.info("subj_cos_floor %.4f (%s): the cosine an answer to another question of this eval set "
                     "already earns; subj_cos above it is what the answers say", result["subj_cos_floor"],
                     result["embedder"])
        state.last_eval_step = at
        score = result.get("final_score", -result["eval_loss"])
        if state.best_score is None or score > state.best_score:
            state.best_score, state.best_step, state.evals_without_gain = score, at, 0
            save_adapter(model, ckpt_root / "best", at, {"best.json": json.dumps({"step": at, **result})})
        else:
            state.evals_without_gain += 1
        write_curves(run_dir, recipe.name)
        shown = {k: round(v, 4) for k, v in result.items() if k in ("eval_loss", "final_score", "mc_accuracy",
                                                                    "subj_score")}
        log.info("eval at step %d: %s", at, shown)
        return bool(recipe.eval.patience) and state.evals_without_gain >= recipe.eval.patience

    # train
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not (main and sys.stderr.isatty()))
    params = [p for p in model.parameters() if p.requires_grad]
    pad_id = tokenizer.pad_token_id
    mask_dtype = model.get_input_embeddings().weight.dtype
    last_loss = float("nan")
    while step < total_steps and not state.stop_reason:
        t0 = time.perf_counter()
        indices = sampler.batch_at(step)
        batches = step_batches([encoded[i] for i in dist.shard(indices)], pad_id, plan.train, recipe.data.max_len,
                               mask_dtype, device)
        # the whole step's denominator, on every rank: summed gradients are the whole batch's gradient
        denom = sum(encoded[i].n_answer_tokens for i in indices) if t.loss_weighting == "token" else len(indices)
        try:
            fault("oom", step + 1)
            loss = dist.sum_scalar(forward_backward(model, batches, t.loss_weighting, t.ce_chunk, denom))
            dist.sum_grads(params)
            fault("kill-step", step + 1)
            if fault("nan", step + 1):
                loss = loss * float("nan")
        except torch.cuda.OutOfMemoryError:
            rows, width = max(tuple(b.input_ids.shape) for b in batches)
            raise TrainingError(f"step {step + 1}: CUDA out of memory at {rows} rows x {width} tokens a "
                                f"forward; lower train.micro_batch (raise train.grad_accum to keep the "
                                f"batch) or data.max_len") from None
        lr = lr_at(step, base_lr=t.lr, total_steps=total_steps, scheduler=t.scheduler,
                   warmup_ratio=t.warmup_ratio, min_lr_ratio=t.min_lr_ratio)
        loss_value = float(loss)
        step += 1
        if not math.isfinite(loss_value):
            optimizer.zero_grad(set_to_none=True)
            if state.skipped_nonfinite >= t.skip_nonfinite:
                raise TrainingError(f"step {step}: loss is {loss_value}; stopped. Last good checkpoint: "
                                    f"{newest_verified(ckpt_root) or 'none'} (train.skip_nonfinite lets a few "
                                    f"such steps pass)")
            state.skipped_nonfinite += 1
            metrics.write({"event": "skip", "step": step, "loss": loss_value})
            log.warning("step %d: non-finite loss %s skipped (%d of %d allowed)", step, loss_value,
                        state.skipped_nonfinite, t.skip_nonfinite)
        else:
            if t.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = loss_value
        elapsed = time.perf_counter() - t0
        tokens = int(dist.sum_scalar(torch.tensor(float(sum(b.n_tokens for b in batches)), device=device)))
        event = {"event": "train", "step": step, "epoch": round(sampler.epoch_at(step - 1), 4),
                 "loss": loss_value, "lr": lr, "step_s": round(elapsed, 4), "tokens_per_s": tokens / elapsed,
                 "peak_mem_gib": round(peak_memory_gib(device), 3)}
        metrics.write(event)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:,.0f}")

        if recipe.eval.every_steps and step % recipe.eval.every_steps == 0 and step < total_steps:
            if evaluate(step):
                state.stop_reason = "early_stop"
        if (step in recipe.checkpoint.at_steps or (recipe.checkpoint.every_epoch and sampler.is_epoch_end(step - 1))
                or (recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0)) \
                and step < total_steps and not state.stop_reason:
            checkpoint(step)
    bar.close()

    # cleanup: the last eval and checkpoint, the summary
    if state.last_eval_step != step:
        if evaluate(step) and not state.stop_reason:
            state.stop_reason = "early_stop"
    if not state.stop_reason:
        state.stop_reason = "max_steps" if t.max_steps and step >= t.max_steps else "epochs"
    checkpoint(step)
    if not main:
        return {"steps": step, "stop_reason": state.stop_reason}
    summary = {"steps": step, "total_steps": total_steps, "stop_reason": state.stop_reason,
               "best_step": state.best_step, "best_score": state.best_score, "last_loss": last_loss,
               "wall_seconds": round(time.perf_counter() - started, 1), "run_dir": str(run_dir), "data": notes}
    best_file = ckpt_root / "best" / "best.json"
    if best_file.exists():
        summary["best"] = json.loads(best_file.read_text(encoding="utf-8"))
    if t.expect_loss_drop > 0:
        summary["overfit_check"] = overfit_verdict(metrics.path, t.expect_loss_drop)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
    write_curves(run_dir, recipe.name)
    print(f"done: {step} steps ({state.stop_reason}), last loss {last_loss:.4f}, best score "
          f"{state.best_score if state.best_score is None else round(state.best_score, 4)} at step "
          f"{state.best_step}, {summary['wall_seconds']} s -> {run_dir}", flush=True)
    if learned := learning_line(metrics.path):
        print(learned, flush=True)
    if "overfit_check" in summary:
        print(f"mini-overfit: {summary['overfit_check']['verdict']} ({summary['overfit_check']['reason']})",
              flush=True)
    return summary
