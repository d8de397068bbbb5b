"""Keywords through kiwipiepy: nouns (NNG, NNP) and foreign words (SL: OTP, TLS, CISO), minus stopwords.

Compounds: Kiwi splits many compounds into their nouns (개인정보 -> 개인 + 정보, 전자금융 -> 전자 + 금융),
so keywords are compared as morpheme sets. A gold keyword phrase (the `Keyword` column) counts as
recalled when all its content morphemes are among the prediction's, or when the phrase itself, spaces
removed, stands in the prediction (Kiwi tags a short phrase alone differently from the same words in a
sentence: 일회용 is 일회/NNG in a sentence but 일/NR + 회/NNB alone).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

CONTENT_TAGS = {"NNG", "NNP", "SL"}


@lru_cache(maxsize=1)
def stopwords() -> frozenset[str]:
    lines = (Path(__file__).with_name("stopwords.txt")).read_text(encoding="utf-8").splitlines()
    return frozenset(w.strip() for w in lines if w.strip() and not w.startswith("#"))


@lru_cache(maxsize=1)
def _kiwi():
    """Kiwi in the calling thread: an eval's answers take milliseconds, and no pool of its own then runs
    beside PyTorch's threads (nor is lost to a fork: a forked process can use a tagger loaded before it)."""
    import warnings
    from kiwipiepy import Kiwi
    with warnings.catch_warnings():  # kiwipiepy >= 0.21 notes that 0 no longer means "all cores"
        warnings.simplefilter("ignore", DeprecationWarning)
        return Kiwi(num_workers=0)


def content_morphemes(texts: Sequence[str]) -> list[set[str]]:
    """For each text, its set of content morphemes (SL lower-cased)."""
    stop = stopwords()
    kiwi = _kiwi()
    return [{t.form.lower() if t.tag == "SL" else t.form for t in kiwi.tokenize(text)
             if t.tag in CONTENT_TAGS and t.form not in stop} if text.strip() else set() for text in texts]


def _squash(text: str) -> str:
    return "".join(text.split()).lower()


def keyword_recall(pred: str, pred_morphs: set[str], gold_answer_morphs: set[str],
                   gold_phrases: Optional[Sequence[str]], phrase_morphs: Sequence[set[str]]) -> float:
    """Share of the gold keywords found in the prediction; an empty prediction recalls nothing."""
    if not pred.strip():
        return 0.0
    if gold_phrases:
        hits = sum(1 for phrase, morphs in zip(gold_phrases, phrase_morphs)
                   if _squash(phrase) in _squash(pred) or (morphs and morphs <= pred_morphs))
        return hits / len(gold_phrases)
    if not gold_answer_morphs:
        return 1.0
    return len(gold_answer_morphs & pred_morphs) / len(gold_answer_morphs)
