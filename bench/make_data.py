"""Benchmark inputs from real FSKU questions (carried in, never committed):

- contest.csv: 515 questions shaped like the contest file (500 MC with 4-5 options, 15 subjective);
- eval2000.csv: 2,000 rows with answers, 15% subjective, for the in-loop eval timing;
- long512.csv: training rows of about 512 tokens (a question padded with more questions' text) for the
  micro-batch 4 x 512 run of train.py.

    python -m bench.make_data FSKU_DEV.csv TOKENIZER_DIR OUT_DIR
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from engine.data import read_examples


def write(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def main(fsku: str, tokenizer_dir: str, out: str) -> None:
    from engine.config import DataConfig
    from engine.data import encode_example
    from engine.model import load_tokenizer

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ex = read_examples(fsku)
    mc = [e for e in ex if e.kind == "mc"]
    subj = [e for e in ex if e.kind == "subj"]
    rng = np.random.default_rng(0)
    five = lambda e: e.question + f"\n5 {'해당 없음'}"  # noqa: E731 -- some contest questions have 5 options

    contest = [mc[i % len(mc)] for i in range(500)]
    rows = [[f"TEST_{k:03d}", five(e) if k % 3 == 0 else e.question] for k, e in enumerate(contest)]
    rows += [[f"TEST_{500 + k:03d}", subj[k % len(subj)].question] for k in range(15)]
    order = rng.permutation(len(rows))
    write(out_dir / "contest.csv", ["ID", "Question"], [rows[i] for i in order])

    rows = [[f"E{k:04d}", mc[k % len(mc)].question, mc[k % len(mc)].answer, ""] for k in range(1700)]
    rows += [[f"E{1700 + k:04d}", subj[k % len(subj)].question, subj[k % len(subj)].answer,
              ",".join(subj[k % len(subj)].keywords)] for k in range(300)]
    write(out_dir / "eval2000.csv", ["ID", "Question", "Answer", "Keyword"], [rows[i] for i in rng.permutation(2000)])

    tok = load_tokenizer(tokenizer_dir)
    system_prompt = DataConfig().system_prompt
    filler = " ".join(e.question.splitlines()[0] for e in ex)
    rows = []
    for k in range(256):
        e = mc[k % len(mc)]
        stem, options = e.question.split("\n", 1)
        lo, hi = 0, len(filler)
        while lo < hi:  # longest filler prefix that keeps the example within 512 tokens
            mid = (lo + hi + 1) // 2
            probe = e.__class__(e.id, f"{filler[:mid]} {stem}\n{options}", e.answer, "mc", e.n_options)
            if len(encode_example(tok, probe, system_prompt, 4096).input_ids) <= 512:
                lo = mid
            else:
                hi = mid - 1
        text = f"{filler[:lo]} {stem}\n{options}"
        rows.append([f"L{k:03d}", text, e.answer])
    write(out_dir / "long512.csv", ["ID", "Question", "Answer"], rows)


if __name__ == "__main__":
    main(*sys.argv[1:4])
