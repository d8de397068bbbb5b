"""Train/eval split and the fixed eval subset, both drawn once with the recipe's seed.

The subset's IDs are saved in the run directory (`eval_ids.json`) so every eval of a run, and every run
of a sweep over the same data and seed, scores the same rows.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from engine.data import Example
from engine.errors import UserError
from engine.files import atomic_write_text


def stratified_take(examples: Sequence[Example], size: int, seed: int) -> list[Example]:
    """`size` examples (all when fewer), MC and subjective keeping their share, in file order."""
    if len(examples) <= size:
        return list(examples)
    rng = np.random.default_rng([seed, 7])
    subj = [i for i, e in enumerate(examples) if e.kind == "subj"]
    mc = [i for i, e in enumerate(examples) if e.kind == "mc"]
    n_subj = min(len(subj), max(1 if subj else 0, round(size * len(subj) / len(examples))))
    n_mc = min(len(mc), size - n_subj)
    picked = set(rng.choice(subj, n_subj, replace=False).tolist() if n_subj else [])
    picked |= set(rng.choice(mc, n_mc, replace=False).tolist() if n_mc else [])
    return [examples[i] for i in sorted(picked)]


def check_disjoint(train: Sequence[Example], eval_pool: Sequence[Example], train_path: str, eval_path: str) -> None:
    """An eval row whose ID is also a training row's: the score would measure memory, not learning."""
    train_rows = {e.id: e.row for e in train}
    for e in eval_pool:
        if e.id in train_rows:
            raise UserError(f"{eval_path}: row {e.row}, column ID: ID {e.id!r} is also row {train_rows[e.id]} of "
                            f"{train_path} (data.train); eval rows must not be training rows")


def split_train_eval(train: Sequence[Example], eval_pool: Optional[Sequence[Example]], eval_share: float,
                     eval_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train examples, eval subset). Without an eval file, a seeded stratified share of train is held out."""
    if eval_pool is None:
        n_hold = min(eval_size, max(1, round(len(train) * eval_share)))
        held = stratified_take(train, n_hold, seed)
        held_ids = {e.id for e in held}
        return [e for e in train if e.id not in held_ids], held
    return list(train), stratified_take(eval_pool, eval_size, seed)


def cap_kinds(examples: Sequence[Example], max_mc: int, max_subj: int, seed: int) -> list[Example]:
    """At most `max_mc` MC and `max_subj` subjective examples (0 = no cap), a seeded draw in file order."""
    rng = np.random.default_rng([seed, 11])
    keep = set()
    for kind, cap in (("mc", max_mc), ("subj", max_subj)):
        idx = [i for i, e in enumerate(examples) if e.kind == kind]
        keep |= set(idx if not cap or cap >= len(idx) else rng.choice(idx, cap, replace=False).tolist())
    return [e for i, e in enumerate(examples) if i in keep]


def pin_eval_subset(run_dir: Path, subset: list[Example], pool: Sequence[Example]) -> list[Example]:
    """Save the subset's IDs on first use; afterwards return the saved subset from `pool`."""
    path = run_dir / "eval_ids.json"
    if not path.exists():
        atomic_write_text(path, json.dumps([e.id for e in subset], ensure_ascii=False))
        return subset
    by_id = {e.id: e for e in pool}
    ids = json.loads(path.read_text(encoding="utf-8"))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise UserError(f"{path}: eval IDs not in the data any more: {', '.join(missing[:5])}")
    return [by_id[i] for i in ids]
