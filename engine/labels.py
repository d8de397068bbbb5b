"""Checks of the training labels before the first step: the mistakes that make a run learn the wrong
thing quietly. Every offending row is reported; any finding stops the run (exit 2)."""
from __future__ import annotations

import unicodedata
from typing import Sequence

from engine.data import Encoded
from engine.errors import UserError

MAX_LISTED = 10


def label_problems(encoded: Sequence[Encoded], digit_ids: Sequence[int], eos_id: int) -> list[str]:
    """One line per offending row: whitespace or control characters around/in answers, MC answers that are
    not exactly [digit token, end-of-turn], examples whose labels are all masked."""
    problems = []
    for enc in encoded:
        ex = enc.example
        where = f"row {ex.row} (ID {ex.id})"
        answer = ex.answer or ""
        if answer != answer.strip():
            problems.append(f"{where}: answer has leading or trailing whitespace: {answer!r}")
        bad = sorted({f"U+{ord(c):04X}" for c in answer if unicodedata.category(c) == "Cc" and c != "\n"})
        if bad:
            problems.append(f"{where}: answer has control characters {', '.join(bad)}")
        labels = [t for t in enc.labels if t != -100]
        if not labels:
            problems.append(f"{where}: every label is masked (nothing to learn)")
        elif ex.kind == "mc" and labels != [digit_ids[int(ex.answer) - 1], eos_id]:
            problems.append(f"{where}: MC answer {ex.answer!r} is labelled {labels}, expected "
                            f"[{digit_ids[int(ex.answer) - 1]}, {eos_id}] (digit token, end of turn)")
    return problems


def check_labels(path: str, encoded: Sequence[Encoded], digit_ids: Sequence[int], eos_id: int) -> None:
    problems = label_problems(encoded, digit_ids, eos_id)
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise UserError(f"{path}: {len(problems)} label problem(s): " + "; ".join(problems[:MAX_LISTED]) + more)
