"""CSV rows -> examples (kind, option count, gold keywords) -> prompt -> token ids, labels on the answer only.

Row numbers in error messages count data rows from 1 (the header is not a row); the CSV line where the
row starts is given too, since a question spans several lines.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from engine.errors import UserError
from engine.options import normalized, options_problem, parse_quoted_answer, question_options

MAX_QUESTION_CHARS = 8_000
"""FSKU's questions run to a few hundred characters; a longer one is a broken cell, not a question."""


@dataclass
class Example:
    id: str
    question: str
    answer: Optional[str]
    kind: str  # "mc" or "subj"
    n_options: int = 0
    keywords: list[str] = field(default_factory=list)
    row: int = 0
    domain: str = ""
    answer_quoted: bool = False
    """The MC answer was written with its option's text (`3 온라인 송금`), checked and made the digit."""
    answer_note: str = ""
    """Why the answer as written was not taken as is (a quoted option text that did not match, under
    `data.answer_text_mismatch=warn`); empty when it was."""


def option_count(question: str) -> int:
    """Number of option lines (`1 ...`, `1. ...`, `1) ...`, `(1) ...`, `① ...`); fewer than two: subjective."""
    return len(question_options(question))


def read_table(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, cells) of every record; decoding and shape errors name the place."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    raw = path.read_bytes()
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: NUL byte in file (is it UTF-16 or binary?)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"{path}: empty file (expected a header row)") from None
    except csv.Error as e:
        raise UserError(f"{path}: line 1: {e}") from None
    header = [h.strip() for h in header]
    rows = []
    start = reader.line_num + 1
    try:
        for cells in reader:
            if cells or reader.line_num > start:
                rows.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{path}: line {reader.line_num}: {e}") from None
    rows = [(ln, c) for ln, c in rows if any(x.strip() for x in c)]
    return header, rows


def _cell(path: Path, header: list[str], cells: list[str], row: int, line: int, name: str) -> str:
    if len(cells) != len(header):
        raise UserError(f"{path}: row {row} (line {line}): {len(cells)} cells, header has {len(header)}")
    return cells[header.index(name)]


def parse_keywords(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


def read_examples(path: str | Path, require_answer: bool = True, answer_text_mismatch: str = "error"
                  ) -> list[Example]:
    """Read a FSKU-style CSV. `require_answer=False` reads a test file (ID, Question).

    An MC answer that quotes its option (`3 온라인 송금`) becomes the digit when the text is that
    option's; otherwise it is an error, or with `answer_text_mismatch="warn"` the digit is kept and the
    example's `answer_note` says why.
    """
    path = Path(path)
    header, rows = read_table(path)
    needed = ["Question", "Answer"] if require_answer else ["ID", "Question"]
    missing = [c for c in needed if c not in header]
    if missing:
        raise UserError(f"{path}: row 0 (header): missing column {', '.join(missing)} (have: {', '.join(header)})")
    if not rows:
        raise UserError(f"{path}: no data rows after the header")
    examples, seen = [], {}
    for row, (line, cells) in enumerate(rows, 1):
        where = f"{path}: row {row} (line {line})"
        question = _cell(path, header, cells, row, line, "Question")
        ex_id = _cell(path, header, cells, row, line, "ID").strip() if "ID" in header else str(row)
        if not ex_id:
            raise UserError(f"{where}, column ID: empty ID")
        if ex_id in seen:
            raise UserError(f"{where}, column ID: duplicate ID {ex_id!r} (first at row {seen[ex_id]})")
        seen[ex_id] = row
        if not question.strip():
            raise UserError(f"{where}, column Question: empty question")
        if len(question) > MAX_QUESTION_CHARS:
            raise UserError(f"{where}, column Question: {len(question)} characters (limit {MAX_QUESTION_CHARS})")
        options = question_options(question)
        if options and (problem := options_problem(options)):
            raise UserError(f"{where}, column Question: {problem}")
        if len(options) > 9:
            raise UserError(f"{where}, column Question: {len(options)} options; answers are one digit, 1..9")
        answer = _cell(path, header, cells, row, line, "Answer") if "Answer" in header else None
        quoted, note = False, ""
        if require_answer:
            answer, quoted, note = _check_answer(answer, [o.text for o in options], where, answer_text_mismatch)
        keywords = parse_keywords(_cell(path, header, cells, row, line, "Keyword")) if "Keyword" in header else []
        domain = _cell(path, header, cells, row, line, "Domain").strip() if "Domain" in header else ""
        examples.append(Example(ex_id, question.strip(), answer, "mc" if options else "subj", len(options),
                                keywords, row, domain, quoted, note))
    return examples


def _check_answer(answer: str, options: list[str], where: str, on_mismatch: str) -> tuple[str, bool, str]:
    """(the answer to train on, whether it quoted an option's text, a note when that text was overruled)."""
    if not options:
        if not answer.strip():
            raise UserError(f"{where}, column Answer: empty answer")
        return answer, False, ""
    quoted = parse_quoted_answer(answer) if answer.strip() == answer else None
    if quoted is None or not 1 <= quoted.number <= len(options):
        raise UserError(f"{where}, column Answer: multiple-choice answer must be one digit 1..{len(options)}, "
                        f"got {answer!r} (or the digit and its option's text)")
    digit = str(quoted.number)
    if not quoted.text:
        return digit, False, ""
    if normalized(quoted.text) == normalized(options[quoted.number - 1]):
        return digit, True, ""
    others = [i + 1 for i, text in enumerate(options) if normalized(text) == normalized(quoted.text)]
    named = f"option {others[0]}'s text" if others else "no option's text"
    problem = (f"answer {answer!r} quotes {named}; option {digit} is {options[quoted.number - 1]!r}")
    if on_mismatch == "error":
        raise UserError(f"{where}, column Answer: {problem} (fix the row, or set data.answer_text_mismatch=warn "
                        f"to keep the digit)")
    return digit, True, f"{where}: {problem}; kept {digit}"


# --- prompts -------------------------------------------------------------------------------------------

MC_INSTRUCTION = "다음 객관식 문제의 정답 번호만 숫자로 답하세요."
SUBJ_INSTRUCTION = "다음 질문에 두 문장 이내로 간결하게 답변하세요."


def user_text(ex: Example) -> str:
    instruction = MC_INSTRUCTION if ex.kind == "mc" else SUBJ_INSTRUCTION
    return f"{instruction}\n질문: {ex.question}\n답변:"


def prompt_text(ex: Example, system_prompt: str) -> str:
    """A.X 4.0 Light's chat format, up to the assistant turn the answer goes in."""
    return (f"<|im_start|><|system|>{system_prompt}<|im_end|>"
            f"<|im_start|><|user|>{user_text(ex)}<|im_end|>"
            f"<|im_start|><|assistant|>")


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 on the prompt
    example: Example
    truncated: bool = False
    """The prompt's start (or the answer's end) was cut to fit `data.max_len`."""

    @property
    def n_answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != -100)


def encode_prompt(tokenizer, ex: Example, system_prompt: str) -> list[int]:
    return tokenizer.encode(prompt_text(ex, system_prompt), add_special_tokens=False)


def encode_example(tokenizer, ex: Example, system_prompt: str, max_len: int) -> Encoded:
    """Prompt and answer are tokenized apart, so the answer's first token is exactly what decoding sees next."""
    prompt = encode_prompt(tokenizer, ex, system_prompt)
    answer = tokenizer.encode(ex.answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    truncated = len(prompt) + len(answer) > max_len
    if len(answer) >= max_len:
        answer = answer[: max_len // 2 - 1] + [tokenizer.eos_token_id]
    if len(prompt) + len(answer) > max_len:
        prompt = cut_prompt(prompt, max_len - len(answer))
    return Encoded(prompt + answer, [-100] * len(prompt) + answer, ex, truncated)


def prompt_ids(tokenizer, ex: Example, system_prompt: str, max_len: int) -> list[int]:
    """The prompt decoding sees: `encode_prompt`, cut to `max_len` as training cuts it."""
    return cut_prompt(encode_prompt(tokenizer, ex, system_prompt), max_len)


def cut_prompt(prompt: list[int], max_len: int) -> list[int]:
    """The prompt's last `max_len` tokens: the end holds the question's tail, its options and the answer
    prefix; the start is the system turn."""
    return prompt[-max_len:] if len(prompt) > max_len else prompt


def encode_all(tokenizer, examples: Sequence[Example], system_prompt: str, max_len: int) -> list[Encoded]:
    return [encode_example(tokenizer, ex, system_prompt, max_len) for ex in examples]
