"""Evaluation on the fixed eval subset: eval_loss, and what the model would actually answer (constrained
decoding), scored with the competition metric. Leaves the training RNG untouched."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from decode.digits import digit_token_ids
from decode.mc import answer_mc
from decode.subjective import answer_subjective
from engine.config import Recipe
from engine.errors import UserError
from engine.data import Encoded, Example, encode_all, encode_prompt
from engine.loss import answer_token_losses, autocast, collate
from metrics.embedders import load_embedder
from metrics.score import Gold, Prediction, ScoreConfig, score


@torch.no_grad()
def eval_loss(model, encoded: Sequence[Encoded], micro_batch: int, pad_id: int) -> float:
    """Mean cross-entropy over every answer token of `encoded`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    for k in range(0, len(order), micro_batch):
        batch = collate([encoded[i] for i in order[k: k + micro_batch]], pad_id, device)
        with autocast(device):
            ce, _ = answer_token_losses(model, batch)
        total += float(ce.sum())
        count += ce.numel()
    return total / max(1, count)


@dataclass
class Decoded:
    predictions: list[Prediction]
    mc_seconds: float
    subj_seconds: float


class Evaluator:
    """Built once per run: prompts, digit ids and the embedder (gold embeddings cached) are reused."""

    def __init__(self, tokenizer, examples: list[Example], recipe: Recipe, run_dir: Optional[Path]):
        self.tokenizer, self.examples, self.recipe, self.run_dir = tokenizer, examples, recipe, run_dir
        sp, max_len = recipe.data.system_prompt, recipe.data.max_len
        self.encoded = encode_all(tokenizer, examples, sp, max_len)
        self.prompts = [encode_prompt(tokenizer, ex, sp)[-max_len:] for ex in examples]
        self.digit_ids = digit_token_ids(tokenizer, self.prompts[0]) if examples else []
        self._embedder = None
        self.golds = [Gold(e.id, e.kind, e.answer, e.n_options, e.keywords) for e in examples]

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = load_embedder(self.recipe.eval.embedder)
        return self._embedder

    def score_config(self) -> ScoreConfig:
        d, e = self.recipe.decode, self.recipe.eval
        return ScoreConfig(e.mc_weight, e.cos_weight, d.max_sentences, d.max_chars, d.max_new_tokens)

    def decode(self, model) -> Decoded:
        d = self.recipe.decode
        sp, max_len = self.recipe.data.system_prompt, self.recipe.data.max_len
        mc_idx = [i for i, e in enumerate(self.examples) if e.kind == "mc"]
        subj_idx = [i for i, e in enumerate(self.examples) if e.kind == "subj"]
        device = next(model.parameters()).device
        preds: list[Optional[Prediction]] = [None] * len(self.examples)
        t0 = time.perf_counter()
        with autocast(device):
            mc = answer_mc(model, self.tokenizer, [self.examples[i] for i in mc_idx],
                           lambda ex: encode_prompt(self.tokenizer, ex, sp)[-max_len:], self.digit_ids,
                           d.batch_size, d.mc_permutations)
        t1 = time.perf_counter()
        with autocast(device):
            subj = answer_subjective(model, self.tokenizer, [self.prompts[i] for i in subj_idx],
                                     batch_size=d.subj_batch_size, **d.generation_kwargs())
        t2 = time.perf_counter()
        for i, a in zip(mc_idx, mc):
            preds[i] = Prediction(self.examples[i].id, a.choice, raw=a.raw)
        for i, a in zip(subj_idx, subj):
            preds[i] = Prediction(self.examples[i].id, a.text, n_tokens=a.n_tokens)
        return Decoded(preds, t1 - t0, t2 - t1)

    def __call__(self, model, step: int, on_decoded: Callable[[], object] = lambda: None) -> dict:
        """One eval event (without the `event`/`step` keys); predictions go to eval/step-<N>.jsonl."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        devices = [device.index or 0] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.recipe.seed)
                result = {"eval_loss": eval_loss(model, self.encoded, self.recipe.decode.batch_size,
                                                 self.tokenizer.pad_token_id)}
                if self.recipe.eval.generate:
                    decoded = self.decode(model)
                    on_decoded()
                    summary, rows = score(self.golds, decoded.predictions, self.embedder, self.score_config())
                    result.update(summary)
                    result["decode_seconds"] = decoded.mc_seconds + decoded.subj_seconds
                    self._write_rows(step, rows)
        finally:
            model.train(was_training)
        return result

    def _write_rows(self, step: int, rows: list[dict]) -> None:
        if self.run_dir is None:
            return
        out = self.run_dir / "eval" / f"step-{step}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out)


# --- python -m engine.evaluate CHECKPOINT --grid key=v1,v2 ... ----------------------------------------------

def grid_combinations(specs: Sequence[str]) -> list[list[str]]:
    """['decode.temperature=0.2,0.5', 'decode.max_new_tokens=48,64'] -> every combination as overrides."""
    import itertools

    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise UserError(f"--grid: {spec!r} must look like section.key=v1,v2,...")
        axes.append([f"{key}={v.strip()}" for v in values.split(",")])
    return [list(c) for c in itertools.product(*axes)]


def run_of_checkpoint(ckpt: Path) -> Path:
    run_dir = ckpt.parent.parent
    if not (ckpt / "adapter_config.json").is_file() or not (run_dir / "recipe.yaml").is_file():
        raise UserError(f"{ckpt}: not a checkpoint of a run directory (expected RUN/checkpoints/NAME with "
                        "adapter_config.json, and RUN/recipe.yaml)")
    return run_dir


def main() -> int:
    import argparse
    import os

    import yaml

    from engine.config import apply_overrides, recipe_from_dict, recipe_to_dict
    from engine.data import read_examples
    from engine.model import load_adapter, load_base_model, load_tokenizer

    p = argparse.ArgumentParser(prog="python -m engine.evaluate",
                                description="Score one checkpoint on its run's eval subset under each decoding "
                                            "setting of a grid (no retraining).")
    p.add_argument("checkpoint", type=Path, help="RUN/checkpoints/best or RUN/checkpoints/step-N")
    p.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2", help="decoding settings to try")
    p.add_argument("--out", type=Path, help="where grid.md/json go (default: the checkpoint directory)")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_dir = run_of_checkpoint(a.checkpoint)
    stored = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    combos = grid_combinations(a.grid) or [[]]
    recipes = [recipe_from_dict(apply_overrides(recipe_to_dict(recipe_from_dict(stored)), c), str(run_dir))
               for c in combos]
    base = recipes[0]
    pool = read_examples(base.data.eval or base.data.train)
    by_id = {e.id: e for e in pool}
    examples = [by_id[i] for i in json.loads((run_dir / "eval_ids.json").read_text(encoding="utf-8"))]
    tokenizer = load_tokenizer(base.model.path)
    model = load_adapter(load_base_model(base.model), a.checkpoint).eval()
    evaluator = Evaluator(tokenizer, examples, base, None)
    rows = []
    for combo, recipe in zip(combos, recipes):
        evaluator.recipe = recipe
        torch.manual_seed(recipe.seed)
        decoded = evaluator.decode(model)
        summary, _ = score(evaluator.golds, decoded.predictions, evaluator.embedder, evaluator.score_config())
        rows.append({"settings": combo, **summary, "decode_seconds": decoded.mc_seconds + decoded.subj_seconds})
        print(f"{' '.join(combo) or 'recipe settings'}: final {summary['final_score']:.4f}, subj "
              f"{summary['subj_score']:.4f}", flush=True)
    out = a.out or a.checkpoint
    out.mkdir(parents=True, exist_ok=True)
    best = max(rows, key=lambda r: r["final_score"])
    lines = [f"# Decoding grid: {a.checkpoint}", "", f"{len(examples)} eval rows; scores in percent.", "",
             "| settings | final | MC acc | subj | subj cos | subj kw | subj len viol. | seconds | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {' '.join(r['settings']) or '(recipe)'} | {100 * r['final_score']:.2f} | "
                     f"{100 * r['mc_accuracy']:.2f} | {100 * r['subj_score']:.2f} | {100 * r['subj_cos']:.2f} | "
                     f"{100 * r['subj_kw']:.2f} | {100 * r['subj_len_violation_rate']:.2f} | "
                     f"{r['decode_seconds']:.1f} | {'**best**' if r is best else ''} |")
    (out / "grid.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "grid.json").write_text(json.dumps(rows, indent=2, ensure_ascii=False), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from engine.errors import run_cli
    run_cli(main)
