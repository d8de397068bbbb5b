"""CSV rows -> examples (kind, option count, gold keywords) -> prompt -> token ids, labels on the answer only.

Row numbers in error messages count data rows from 1 (the header is not a row); the CSV line where the
row starts is given too, since a question spans several lines.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from engine.errors import UserError

OPTION_LINE = re.compile(r"^\s*([1-9][0-9]?)\s")
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


def option_count(question: str) -> int:
    """Number of option lines (`1 파일 암호화`); a question with fewer than two is subjective."""
    n = sum(1 for line in question.splitlines() if OPTION_LINE.match(line))
    return n if n >= 2 else 0


def option_numbers(question: str) -> list[int]:
    return [int(m.group(1)) for line in question.splitlines() if (m := OPTION_LINE.match(line))]


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


def read_examples(path: str | Path, require_answer: bool = True) -> list[Example]:
    """Read a FSKU-style CSV. `require_answer=False` reads a test file (ID, Question)."""
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
        n_opt = option_count(question)
        numbers = option_numbers(question)
        if n_opt and numbers != list(range(1, n_opt + 1)):
            raise UserError(f"{where}, column Question: option lines numbered {numbers}, expected 1..{n_opt} in order")
        answer = _cell(path, header, cells, row, line, "Answer") if "Answer" in header else None
        if require_answer:
            answer = _check_answer(answer, n_opt, where)
        keywords = parse_keywords(_cell(path, header, cells, row, line, "Keyword")) if "Keyword" in header else []
        examples.append(Example(ex_id, question.strip(), answer, "mc" if n_opt else "subj", n_opt, keywords, row))
    return examples


def _check_answer(answer: str, n_opt: int, where: str) -> str:
    if n_opt:
        if answer.strip() != answer or not (answer.isdigit() and len(answer) == 1 and 1 <= int(answer) <= n_opt):
            raise UserError(f"{where}, column Answer: multiple-choice answer must be one digit 1..{n_opt}, got {answer!r}")
        return answer
    if not answer.strip():
        raise UserError(f"{where}, column Answer: empty answer")
    return answer


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

    @property
    def n_answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != -100)


def encode_prompt(tokenizer, ex: Example, system_prompt: str) -> list[int]:
    return tokenizer.encode(prompt_text(ex, system_prompt), add_special_tokens=False)


def encode_example(tokenizer, ex: Example, system_prompt: str, max_len: int) -> Encoded:
    """Prompt and answer are tokenized apart, so the answer's first token is exactly what decoding sees next."""
    prompt = encode_prompt(tokenizer, ex, system_prompt)
    answer = tokenizer.encode(ex.answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    if len(answer) >= max_len:
        answer = answer[: max_len // 2 - 1] + [tokenizer.eos_token_id]
    if len(prompt) + len(answer) > max_len:
        # Keep the end of the prompt (question tail, options, answer prefix): the start is the system turn.
        prompt = prompt[len(prompt) + len(answer) - max_len:]
    return Encoded(prompt + answer, [-100] * len(prompt) + answer, ex)


def encode_all(tokenizer, examples: Sequence[Example], system_prompt: str, max_len: int) -> list[Encoded]:
    return [encode_example(tokenizer, ex, system_prompt, max_len) for ex in examples]
