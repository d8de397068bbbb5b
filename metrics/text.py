"""Sentence counting and trimming, shared by the metric (violation rate) and the decoder (trimming)."""
from __future__ import annotations

import re

SENTENCE_END = re.compile(r"(?<=[.!?。])\s+")


def sentences(text: str) -> list[str]:
    return [s for s in SENTENCE_END.split(text.strip()) if s.strip()]


def trim_sentences(text: str, max_sentences: int, max_chars: int) -> str:
    """At most `max_sentences` sentences and `max_chars` characters, cut at a sentence end if one fits."""
    kept = " ".join(sentences(text)[:max_sentences]).strip()
    if len(kept) <= max_chars:
        return kept
    cut = kept[:max_chars]
    end = max(cut.rfind(". "), cut.rfind("다."))
    return (cut[: end + 2] if end > 0 else cut).strip()
