"""Option lines of a multiple-choice question, in the styles people write them, and answers that quote them.

A line is an option line when it starts (after spaces) with a marker: `1 text`, `1. text`, `1) text`,
`(1) text` or a circled digit `① text`..`⑩ text`. One question uses one style, numbered 1..n in order.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

CIRCLED = "①②③④⑤⑥⑦⑧⑨⑩"
# A number followed by a dot and a digit (`1.5배 이상`) is text, not a marker; the bare style needs a
# space after the number (`2023년` is text).
_MARKERS = {  # style -> the marker after any leading spaces; group `n` is the option's number
    "plain": r"(?P<n>[1-9][0-9]?)\s",
    "dot": r"(?P<n>[1-9][0-9]?)\.(?![0-9])\s*",
    "paren": r"(?P<n>[1-9][0-9]?)\)(?![0-9])\s*",
    "parens": r"\((?P<n>[1-9][0-9]?)\)\s*",
    "circled": rf"(?P<n>[{CIRCLED}])\s*",
}
_LINES = {style: re.compile(rf"^(?P<head>\s*{marker})(?P<text>.*)$", re.DOTALL) for style, marker in _MARKERS.items()}


@dataclass(frozen=True)
class OptionLine:
    index: int
    """The line's index in the question."""
    number: int
    style: str
    head: str
    """The line up to the option's text (spaces, marker, separator), kept as written."""
    text: str


def parse_option_line(line: str, index: int = 0) -> Optional[OptionLine]:
    for style, pattern in _LINES.items():
        if m := pattern.match(line):
            n = m.group("n")
            number = CIRCLED.index(n) + 1 if style == "circled" else int(n)
            return OptionLine(index, number, style, m.group("head"), m.group("text"))
    return None


def option_lines(question: str) -> list[OptionLine]:
    """Every line of the question that starts with an option marker, in order."""
    found = (parse_option_line(line, i) for i, line in enumerate(question.splitlines()))
    return [o for o in found if o is not None]


def question_options(question: str) -> list[OptionLine]:
    """The question's options: its option lines when there are at least two (one numbered line is text)."""
    found = option_lines(question)
    return found if len(found) >= 2 else []


def options_problem(lines: list[OptionLine]) -> Optional[str]:
    """Why these option lines do not make a question's options (None when they do)."""
    styles = sorted({o.style for o in lines})
    if len(styles) > 1:
        shown = ", ".join(f"{o.head.strip()!r}" for o in lines)
        return f"option lines mix styles ({shown}); use one style per question"
    numbers = [o.number for o in lines]
    if numbers != list(range(1, len(lines) + 1)):
        return f"option lines numbered {numbers}, expected 1..{len(lines)} in order"
    return None


def rotated(question: str, shift: int) -> str:
    """The question with its options' texts rotated by `shift`: option j shows old option j+shift's
    text, each line keeping its own marker as written."""
    lines = question.splitlines()
    opts = option_lines(question)
    for j, o in enumerate(opts):
        lines[o.index] = o.head + opts[(j + shift) % len(opts)].text
    return "\n".join(lines)


_TRAILING = re.compile(r"[\s.,;:!?。·…]+$")


def normalized(text: str) -> str:
    """Whitespace collapsed and trailing punctuation dropped, for comparing an answer with an option."""
    return _TRAILING.sub("", " ".join(text.split()))


@dataclass(frozen=True)
class QuotedAnswer:
    number: int
    text: str
    """The option text the answer quotes after its number ('' for a bare number)."""


def parse_quoted_answer(answer: str) -> Optional[QuotedAnswer]:
    """An MC answer written as a marker and, optionally, the option's text (`3 온라인 송금`, `③ ...`)."""
    o = parse_option_line(answer.strip() + " ")
    return None if o is None else QuotedAnswer(o.number, o.text.strip())
