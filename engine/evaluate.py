"""Evaluation on the fixed eval subset: eval_loss, and what the model would actually answer (constrained
decoding), scored with the competition metric. Leaves the training RNG untouched."""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from decode.digits import digit_token_ids
from decode.forward import decoder_and_head
from decode.answer import answer_batches
from decode.mc import MCAnswer, choice
from engine.config import Recipe
from engine.errors import UserError
from engine.files import atomic_write_text
from engine.lora import lora_merged_on_the_fly
from engine.data import Encoded, Example, encode_all, prompt_ids
from engine.batch import collate
from engine.loss import answer_positions, autocast
from metrics.embedders import load_embedder
from metrics.score import Gold, Prediction, ScoreConfig, score


@dataclass
class TeacherForced:
    loss: float
    """Mean cross-entropy over every answer token."""
    digit_logits: torch.Tensor
    """[rows, digits]: each row's logits for the digit tokens at the position predicting its first answer
    token; for an MC row that is the prompt's last position, the very logits MC scoring masks."""
    top: list[int]
    """Each row's unconstrained top token at that position."""


@torch.no_grad()
def teacher_forced(model, encoded: Sequence[Encoded], micro_batch: int, pad_id: int, digit_ids: Sequence[int],
                   chunk: int = 4096) -> TeacherForced:
    """One forward pass over prompt + gold answer of every row: eval_loss, and the MC answers for free.

    The head runs only on answer positions, `chunk` of them at a time, so no more than one chunk's fp32
    logits exist whatever the answers' lengths.
    """
    device = next(model.parameters()).device
    digits = torch.tensor(list(digit_ids), dtype=torch.long, device=device)
    _, head = decoder_and_head(model)
    total, count = 0.0, 0
    digit_logits = torch.zeros(len(encoded), len(digits))
    top = [0] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].input_ids))
    for k in range(0, len(order), micro_batch):
        rows_of_batch = order[k: k + micro_batch]
        batch = collate([encoded[i] for i in rows_of_batch], pad_id, device)
        with autocast(device):
            h, t, rows = (x[:batch.n_answer_tokens] for x in answer_positions(model, batch))  # no padding slots
            first = torch.ones_like(rows, dtype=torch.bool)
            first[1:] = rows[1:] != rows[:-1]
            for i in range(0, h.shape[0], chunk):
                logits = head(h[i:i + chunk]).float()
                total += float(F.cross_entropy(logits, t[i:i + chunk], reduction="sum"))
                at = first[i:i + chunk].nonzero()[:, 0]
                firsts = logits[at]
                for row, d, best in zip(rows[i:i + chunk][at].tolist(), firsts[:, digits].cpu(),
                                        firsts.argmax(-1).tolist()):
                    digit_logits[rows_of_batch[row]] = d
                    top[rows_of_batch[row]] = best
        count += t.numel()
    return TeacherForced(total / max(1, count), digit_logits, top)


@dataclass
class Decoded:
    predictions: list[Prediction]
    mc_seconds: float
    subj_seconds: float


def eager():
    """Run compiled layers (train.compile) eagerly: eval's no-grad forwards and generation steps would
    each compile new graphs for minutes, for a pass that runs once every few hundred steps."""
    stance = getattr(torch.compiler, "set_stance", None)  # PyTorch >= 2.6
    return stance("force_eager") if stance else contextlib.nullcontext()


class Evaluator:
    """Built once per run: prompts, digit ids and the embedder (gold embeddings cached) are reused."""

    def __init__(self, tokenizer, examples: list[Example], recipe: Recipe, run_dir: Optional[Path]):
        self.tokenizer, self.examples, self.recipe, self.run_dir = tokenizer, examples, recipe, run_dir
        self.encoded = encode_all(tokenizer, examples, recipe.data.system_prompt, recipe.data.max_len)
        self.prompts = [self.encode_prompt(ex) for ex in examples]
        self.digit_ids = digit_token_ids(tokenizer, self.prompts[0]) if examples else []
        self._embedder = None
        self.golds = [Gold.of(e) for e in examples]

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = load_embedder(self.recipe.eval.embedder)
        return self._embedder

    def score_config(self) -> ScoreConfig:
        d, e = self.recipe.decode, self.recipe.eval
        return ScoreConfig(e.mc_weight, e.cos_weight, d.max_sentences, d.max_chars, d.max_new_tokens)

    def mc_from_teacher_forced(self, tf: TeacherForced) -> dict[int, MCAnswer]:
        """MC answers read off the teacher-forced pass, for the rows whose encoded prompt is exactly the
        prompt decoding would see (a row cut to `data.max_len` may differ) and only with plain scoring
        (option permutations need their own passes)."""
        if self.recipe.decode.mc_permutations > 1:
            return {}
        out = {}
        for i, (ex, enc, prompt) in enumerate(zip(self.examples, self.encoded, self.prompts)):
            if ex.kind == "mc" and enc.input_ids[:len(prompt)] == prompt and enc.labels[len(prompt) - 1] == -100 \
                    and enc.labels[len(prompt)] != -100:
                out[i] = MCAnswer(choice(tf.digit_logits[i], ex.n_options),
                                  self.tokenizer.decode([tf.top[i]], skip_special_tokens=False))
        return out

    def decode(self, model, known_mc: Optional[dict[int, MCAnswer]] = None) -> Decoded:
        """Every row's answer, through infer.py's decode path; MC rows in `known_mc` (from the teacher-forced
        pass) are not scored again."""
        known_mc = known_mc or {}
        preds: list[Optional[Prediction]] = [None] * len(self.examples)
        for i, a in known_mc.items():
            preds[i] = Prediction(self.examples[i].id, a.choice, raw=a.raw)
        seconds = {"mc": 0.0, "subj": 0.0}
        device = next(model.parameters()).device
        with autocast(device):
            for got in answer_batches(model, self.tokenizer, self.examples, self.prompts, self.encode_prompt,
                                      self.digit_ids, self.recipe.decode,
                                      rows=[i for i in range(len(self.examples)) if i not in known_mc]):
                seconds[got.kind] += got.seconds
                for i, answer, raw, n in zip(got.rows, got.answers, got.raw, got.n_tokens):
                    preds[i] = (Prediction(self.examples[i].id, answer, raw=raw) if got.kind == "mc" else
                                Prediction(self.examples[i].id, answer, n_tokens=n))
        return Decoded(preds, seconds["mc"], seconds["subj"])

    def encode_prompt(self, ex: Example) -> list[int]:
        return prompt_ids(self.tokenizer, ex, self.recipe.data.system_prompt, self.recipe.data.max_len)

    def loss_and_answers(self, model) -> tuple[float, Optional[Decoded]]:
        """eval_loss and, with eval.generate, every row's answer: one teacher-forced pass gives the loss and
        the MC answers, generation then answers the subjective rows. `model` is in eval mode."""
        with lora_merged_on_the_fly(model) if self.recipe.eval.merge_lora else contextlib.nullcontext():
            tf = teacher_forced(model, self.encoded, self.recipe.decode.batch_size, self.tokenizer.pad_token_id,
                                self.digit_ids, self.recipe.train.ce_chunk or 4096)
            if not self.recipe.eval.generate:
                return tf.loss, None
            return tf.loss, self.decode(model, self.mc_from_teacher_forced(tf))

    def __call__(self, model, step: int, on_decoded: Callable[[], object] = lambda: None) -> dict:
        """One eval event (without the `event`/`step` keys); predictions go to eval/step-<N>.jsonl."""
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        devices = [device.index or 0] if device.type == "cuda" else []
        t0 = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=devices), eager():
                torch.manual_seed(self.recipe.seed)
                loss, decoded = self.loss_and_answers(model)
                result = {"eval_loss": loss, "eval_seconds": time.perf_counter() - t0}
                if decoded is not None:
                    result["decode_seconds"] = decoded.mc_seconds + decoded.subj_seconds
                    on_decoded()
                    summary, rows = score(self.golds, decoded.predictions, self.embedder, self.score_config())
                    result.update(summary)
                    self._write_rows(step, rows)
        finally:
            model.train(was_training)
        return result

    def _write_rows(self, step: int, rows: list[dict]) -> None:
        if self.run_dir is None:
            return
        out = self.run_dir / "eval" / f"step-{step}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


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
    atomic_write_text(out / "grid.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "grid.json", json.dumps(rows, indent=2, ensure_ascii=False))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from engine.errors import run_cli
    run_cli(main)
