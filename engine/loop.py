"""The training run as a lifecycle you can call a part at a time: `setup` (data, run directory, model with its
speed plan, optimizer, evaluator, resume), `train_step`, `evaluate`, `save_checkpoint`, `cleanup`. `run` strings
them together; read it first.

Each optimizer step takes `micro_batch * grad_accum` examples (engine.sampling). Every forward's loss is divided
by the step's count of answer tokens (or of examples, with loss_weighting=example) before backward, so the
accumulated gradient is the gradient of the whole batch's loss.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

import engine.checkpoint as checkpoints
from decode.digits import digit_token_ids
from engine import distributed as dist
from engine.config import Recipe
from engine.curves import best_eval, read_events, write_curves
from engine.data import Encoded, Example, encode_all, encode_prompt, read_examples
from engine.errors import TrainingError, UserError
from engine.evaluate import Evaluator
from engine.faults import fault
from engine.files import atomic_write_text
from engine.labels import check_labels
from engine.lora import is_4bit
from engine.model import add_lora, count_parameters, ensure_tiny_model, load_base_model, load_tokenizer
from engine.paths import check_model_dir
from engine.perf.packing import largest_forward, step_batches
from engine.perf.plan import Plan, check_device
from engine.perf.speed import speed_up, step_forwards
from engine.run_dir import MetricsLog, data_fingerprints, prepare_run_dir, record_run, setup_logging
from engine.sampling import Sampler
from engine.schedule import lr_at
from engine.split import cap_kinds, check_disjoint, pin_eval_subset, split_train_eval

log = logging.getLogger("engine")


def run(recipe: Recipe, overrides: list[str] = ()) -> dict:
    """Train as the recipe says; the summary (also in summary.json)."""
    s = setup(recipe, overrides)
    from tqdm import tqdm
    bar = tqdm(total=s.total_steps, initial=s.step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not (s.main and sys.stderr.isatty()))
    while s.step < s.total_steps and not s.state.stop_reason:
        event = train_step(s)
        bar.update(1)
        bar.set_postfix(loss=f"{event['loss']:.4f}", lr=f"{event['lr']:.2e}", tok_s=f"{event['tokens_per_s']:,.0f}")
        if eval_due(s) and evaluate(s, s.step):
            s.state.stop_reason = "early_stop"
        if checkpoint_due(s):
            save_checkpoint(s, s.step)
    bar.close()
    return cleanup(s)


# --- what a run carries from setup to cleanup ----------------------------------------------------------

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



@dataclass
class Data:
    """The rows a run trains and evaluates on, read, split, encoded and checked."""
    all_train: list[Example]
    eval_pool: Optional[list[Example]]
    """data.eval's rows, when given."""
    train: list[Example]
    eval: list[Example]
    encoded: list[Encoded]
    """`train`, tokenized with labels."""
    tokenizer: Any
    sampler: Sampler
    total_steps: int


@dataclass
class Session:
    """One run in progress: what `setup` built, and the step, loss and loop state the other parts advance."""
    recipe: Recipe
    device: torch.device
    main: bool
    """Rank 0 (the only rank without torchrun): it evaluates, writes files and logs."""
    data: Data
    run_dir: Path
    model: Any
    plan: Plan
    params: list[torch.nn.Parameter]
    """The trainable parameters (the adapters), gathered once: the step sums, clips and updates them."""
    forwards: Any
    """`(batches, denom) -> loss`: a step's forwards and backwards, as the plan runs them."""
    optimizer: Any
    evaluator: Optional[Evaluator]
    metrics: MetricsLog
    notes: dict
    started: float
    state: LoopState = field(default_factory=LoopState)
    step: int = 0
    last_loss: float = float("nan")

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def total_steps(self) -> int:
        return self.data.total_steps

    @property
    def sampler(self) -> Sampler:
        return self.data.sampler


# --- setup ---------------------------------------------------------------------------------------------

def setup(recipe: Recipe, overrides: list[str] = ()) -> Session:
    """Everything before the first step. Every check of the recipe's paths and data runs before the model
    loads; a run with `train.resume` and a usable checkpoint continues from it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    check_inputs(recipe)
    device = dist.init()
    check_device(recipe.train, device)
    data = load_data(recipe)
    run_dir, saved, data.eval = open_run_dir(recipe, data, overrides)
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    model, plan = build_model(recipe, device, lambda: largest_forward_of(recipe, data))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, recipe)
    torch.manual_seed(recipe.seed + dist.rank())  # the same adapters on every rank, their own dropout masks
    main = dist.is_main()
    evaluator = Evaluator(data.tokenizer, data.eval, recipe, run_dir) if main else None
    notes = data_notes(data.all_train + (data.eval_pool or []), data.encoded, evaluator.encoded if main else [],
                       recipe.data.max_len)
    s = Session(recipe, device, main, data, run_dir, model, plan, params, step_forwards(model, plan, params),
                optimizer, evaluator,
                MetricsLog(run_dir / "metrics.jsonl", enabled=main), notes, started)
    resume(s, saved)
    return s


def check_inputs(recipe: Recipe) -> None:
    """Fail on a wrong path before anything loads or any directory is made."""
    if not recipe.model.build_tiny:
        check_model_dir(recipe.model.path)
    for key, path in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
        if path and not Path(path).is_file():
            raise UserError(f"{key}: {path}: file not found")


def load_data(recipe: Recipe) -> Data:
    """Read train (and eval) rows, hold eval rows out, encode and check the labels; the sampler over them."""
    t, on_mismatch = recipe.train, recipe.data.answer_text_mismatch
    if t.micro_batch * t.grad_accum < dist.world_size():
        raise UserError(f"train.micro_batch x train.grad_accum ({t.micro_batch * t.grad_accum}) must be at least "
                        f"the number of ranks ({dist.world_size()})")
    all_train = read_examples(recipe.data.train, answer_text_mismatch=on_mismatch)
    eval_pool = read_examples(recipe.data.eval, answer_text_mismatch=on_mismatch) if recipe.data.eval else None
    if eval_pool is not None:
        check_disjoint(all_train, eval_pool, recipe.data.train, recipe.data.eval)
    if dist.is_main():
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
    sampler = Sampler([e.kind for e in train_ex], [len(e.input_ids) for e in encoded], t, recipe.seed)
    total_steps = min(sampler.total_steps, t.max_steps) if t.max_steps else sampler.total_steps
    return Data(all_train, eval_pool, train_ex, eval_ex, encoded, tokenizer, sampler, total_steps)


def open_run_dir(recipe: Recipe, data: Data, overrides: list[str]):
    """(run directory, the checkpoint to resume from or None, the eval rows pinned for the run). Rank 0
    records the recipe and data there and logs to it; other ranks stay silent."""
    main = dist.is_main()
    prints = data_fingerprints(recipe, len(data.all_train), None if data.eval_pool is None else len(data.eval_pool))
    run_dir = Path(dist.gather_objects(str(prepare_run_dir(recipe, prints)) if main else None)[0])
    recipe.output_dir = str(run_dir)
    ckpt_root = run_dir / "checkpoints"
    saved, skipped = checkpoints.usable_checkpoint(ckpt_root) if recipe.train.resume else (None, [])
    eval_ex = data.eval
    if main:
        record_run(run_dir, recipe, list(overrides), prints)
        setup_logging(run_dir)
        eval_ex = pin_eval_subset(run_dir, eval_ex, data.eval_pool if data.eval_pool is not None else data.all_train)
        for line in skipped:
            log.warning("skipping checkpoint %s", line)
        best_problem = checkpoints.verify(ckpt_root / "best") if (ckpt_root / "best").exists() else None
        if best_problem:
            log.warning("%s is damaged (%s): infer.py will refuse it until a better eval rewrites it",
                        ckpt_root / "best", best_problem)
        n_mc = sum(e.kind == "mc" for e in data.train)
        log.info("data: %d train (%d MC, %d subjective), %d eval rows; %d rank(s)", len(data.train), n_mc,
                 len(data.train) - n_mc, len(eval_ex), dist.world_size())
    else:
        log.disabled = True
    return run_dir, saved, eval_ex


def build_model(recipe: Recipe, device: torch.device, largest_forward: Callable[[], tuple[int, int]]):
    """(model with LoRA and the speed plan's levers, in train mode; the plan), announced in two lines."""
    model = add_lora(load_base_model(recipe.model), recipe.lora, recipe.train.gradient_checkpointing)
    model, plan = speed_up(model, recipe, device, largest_forward)
    trainable, total = count_parameters(model)
    quant = "4-bit NF4" if any(is_4bit(p) for p in model.parameters()) else f"{next(model.parameters()).dtype}"
    if dist.is_main():
        print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%), base {quant}, "
              f"device {device.type}", flush=True)
        print(plan.line(), flush=True)
    model.train()
    return model, plan


def largest_forward_of(recipe: Recipe, data: Data) -> tuple[int, int]:
    """The most tokens and answer slots any forward of this rank's steps holds."""
    steps = (dist.shard(data.sampler.batch_at(k)) for k in range(data.total_steps))
    return largest_forward(steps, [len(e.input_ids) for e in data.encoded], [e.n_answer_tokens for e in data.encoded],
                           recipe.train, recipe.data.max_len)


def make_optimizer(params: list[torch.nn.Parameter], recipe: Recipe):
    t = recipe.train
    if t.optimizer == "paged_adamw_8bit":
        if not torch.cuda.is_available():
            raise UserError("train.optimizer: paged_adamw_8bit needs CUDA; use adamw on CPU")
        import bitsandbytes as bnb
        return bnb.optim.PagedAdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    fused = torch.cuda.is_available() and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)


def resume(s: Session, saved: Optional[checkpoints.Saved]) -> None:
    """Apply `saved` (model, optimizer, RNGs, loop state) and drop the metrics logged after its step."""
    if s.main:
        checkpoints.remove_partial_writes(s.ckpt_root)
    dist.barrier()
    if saved is not None:
        loaded = checkpoints.apply_checkpoint(saved, s.model, s.optimizer, dist.rank(), dist.world_size())
        s.step, s.state = loaded["step"], LoopState(**loaded["loop"])
        log.info("resuming from %s (step %d of %d)", saved.path, s.step, s.total_steps)
    s.metrics.truncate_after(s.step)


# --- the step ------------------------------------------------------------------------------------------

def train_step(s: Session) -> dict:
    """One optimizer step of `micro_batch x grad_accum` examples (this rank's share); its train event, logged.
    A non-finite loss skips the update (up to train.skip_nonfinite times, then stops the run)."""
    t, t0 = s.recipe.train, time.perf_counter()
    indices = s.sampler.batch_at(s.step)
    batches = step_batches([s.data.encoded[i] for i in dist.shard(indices)], s.data.tokenizer.pad_token_id,
                           s.plan.train, s.recipe.data.max_len, s.model.get_input_embeddings().weight.dtype, s.device)
    # the whole step's denominator, on every rank: summed gradients are the whole batch's gradient
    denom = (sum(s.data.encoded[i].n_answer_tokens for i in indices) if t.loss_weighting == "token"
             else len(indices))
    loss = backward(s, batches, denom)
    lr = lr_at(s.step, base_lr=t.lr, total_steps=s.total_steps, scheduler=t.scheduler,
               warmup_ratio=t.warmup_ratio, min_lr_ratio=t.min_lr_ratio)
    s.step += 1
    if math.isfinite(loss):
        update(s, lr)
        s.last_loss = loss
    else:
        skip_update(s, loss)
    elapsed = time.perf_counter() - t0
    tokens = int(dist.sum_scalar(torch.tensor(float(sum(b.n_tokens for b in batches)), device=s.device)))
    event = {"event": "train", "step": s.step, "epoch": round(s.sampler.epoch_at(s.step - 1), 4), "loss": loss,
             "lr": lr, "step_s": round(elapsed, 4), "tokens_per_s": tokens / elapsed,
             "peak_mem_gib": round(peak_memory_gib(s.device), 3)}
    if s.device.type == "cuda":  # what the allocator holds: CUDA graphs keep their own pool beside it
        event["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(s.device) / 2**30, 3)
    s.metrics.write(event)
    return event


def backward(s: Session, batches: list, denom: float) -> float:
    """The step's loss, summed over ranks, with its gradients accumulated (and summed over ranks)."""
    at = s.step + 1
    try:
        fault("oom", at)
        loss = dist.sum_scalar(s.forwards(batches, denom))
        dist.sum_grads(s.params)
        fault("kill-step", at)
        return float(loss) * (float("nan") if fault("nan", at) else 1.0)
    except torch.cuda.OutOfMemoryError:
        rows, width = max(tuple(b.input_ids.shape) for b in batches)
        raise TrainingError(f"step {at}: CUDA out of memory at {rows} rows x {width} tokens a forward; lower "
                            f"train.micro_batch (raise train.grad_accum to keep the batch) or data.max_len") from None


def update(s: Session, lr: float) -> None:
    if s.recipe.train.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(s.params, s.recipe.train.max_grad_norm)
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)


def skip_update(s: Session, loss: float) -> None:
    s.optimizer.zero_grad(set_to_none=True)
    allowed = s.recipe.train.skip_nonfinite
    if s.state.skipped_nonfinite >= allowed:
        raise TrainingError(f"step {s.step}: loss is {loss}; stopped. Last good checkpoint: "
                            f"{checkpoints.newest_verified(s.ckpt_root) or 'none'} (train.skip_nonfinite lets a "
                            f"few such steps pass)")
    s.state.skipped_nonfinite += 1
    s.metrics.write({"event": "skip", "step": s.step, "loss": loss})
    log.warning("step %d: non-finite loss %s skipped (%d of %d allowed)", s.step, loss, s.state.skipped_nonfinite,
                allowed)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def eval_due(s: Session) -> bool:
    every = s.recipe.eval.every_steps
    return bool(every) and s.step % every == 0 and s.step < s.total_steps


def checkpoint_due(s: Session) -> bool:
    c = s.recipe.checkpoint
    due = (s.step in c.at_steps or (c.every_epoch and s.sampler.is_epoch_end(s.step - 1))
           or (c.every_steps and s.step % c.every_steps == 0))
    return bool(due) and s.step < s.total_steps and not s.state.stop_reason


# --- evaluate and save ---------------------------------------------------------------------------------

def evaluate(s: Session, at: int) -> bool:
    """Rank 0 evaluates, logs an eval event and keeps the best adapter; every rank learns whether early
    stopping fires."""
    return dist.broadcast_flag(s.main and evaluate_here(s, at))


def evaluate_here(s: Session, at: int) -> bool:
    result = s.evaluator(s.model, at, on_decoded=lambda: fault("kill-eval", at))
    s.metrics.write({"event": "eval", "step": at, **result})
    state = s.state
    if not state.last_eval_step and result.get("subj_cos_floor") is not None:
        log.info("subj_cos_floor %.4f (%s): the cosine an answer to another question of this eval set already "
                 "earns; subj_cos above it is what the answers say", result["subj_cos_floor"], result["embedder"])
    state.last_eval_step = at
    score = result.get("final_score", -result["eval_loss"])
    if state.best_score is None or score > state.best_score:
        state.best_score, state.best_step, state.evals_without_gain = score, at, 0
        checkpoints.save_adapter(s.model, s.ckpt_root / "best", at, {"best.json": json.dumps({"step": at, **result})})
    else:
        state.evals_without_gain += 1
    write_curves(s.run_dir, s.recipe.name)
    shown = {k: round(v, 4) for k, v in result.items() if k in ("eval_loss", "final_score", "mc_accuracy",
                                                                "subj_score")}
    log.info("eval at step %d: %s", at, shown)
    return bool(s.recipe.eval.patience) and state.evals_without_gain >= s.recipe.eval.patience


def save_checkpoint(s: Session, at: int) -> None:
    """A checkpoint of step `at` (adapter, optimizer, every rank's RNGs, loop state), written atomically."""
    rngs = dist.gather_objects(checkpoints.rng_state())
    if s.main:
        try:
            checkpoints.save_checkpoint(s.ckpt_root, at, s.model, s.optimizer, s.state.as_dict(), rngs,
                                        on_half_written=lambda: fault("kill-checkpoint", at) or fault("enospc", at))
        except OSError as e:
            raise TrainingError(f"step {at}: cannot write checkpoint under {s.ckpt_root}: {e.strerror}; the "
                                f"previous checkpoint is intact") from None
    dist.barrier()


# --- cleanup -------------------------------------------------------------------------------------------

def cleanup(s: Session) -> dict:
    """The last eval and checkpoint, summary.json, curves.png, and the closing lines."""
    if s.state.last_eval_step != s.step and evaluate(s, s.step) and not s.state.stop_reason:
        s.state.stop_reason = "early_stop"
    t = s.recipe.train
    s.state.stop_reason = s.state.stop_reason or ("max_steps" if t.max_steps and s.step >= t.max_steps else "epochs")
    save_checkpoint(s, s.step)
    if not s.main:
        return {"steps": s.step, "stop_reason": s.state.stop_reason}
    summary = {"steps": s.step, "total_steps": s.total_steps, "stop_reason": s.state.stop_reason,
               "best_step": s.state.best_step, "best_score": s.state.best_score, "last_loss": s.last_loss,
               "wall_seconds": round(time.perf_counter() - s.started, 1), "run_dir": str(s.run_dir), "data": s.notes}
    best_file = s.ckpt_root / "best" / "best.json"
    if best_file.exists():
        summary["best"] = json.loads(best_file.read_text(encoding="utf-8"))
    if t.expect_loss_drop > 0:
        summary["overfit_check"] = overfit_verdict(s.metrics.path, t.expect_loss_drop)
    atomic_write_text(s.run_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
    write_curves(s.run_dir, s.recipe.name)
    best = s.state.best_score if s.state.best_score is None else round(s.state.best_score, 4)
    print(f"done: {s.step} steps ({s.state.stop_reason}), last loss {s.last_loss:.4f}, best score {best} at step "
          f"{s.state.best_step}, {summary['wall_seconds']} s -> {s.run_dir}", flush=True)
    if learned := learning_line(s.metrics.path):
        print(learned, flush=True)
    if "overfit_check" in summary:
        check = summary["overfit_check"]
        print(f"mini-overfit: {check['verdict']} ({check['reason']})", flush=True)
    return summary


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
