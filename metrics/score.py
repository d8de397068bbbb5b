"""The competition metric over paired predictions and gold rows.

mc_accuracy: share of MC rows whose prediction, stripped, equals the gold digit.
subj_cos: mean cosine between prediction and gold answer embeddings (an empty prediction scores 0).
subj_kw: mean keyword recall (metrics.keywords).
subj_score = cos_weight*subj_cos + (1-cos_weight)*subj_kw; final_score = mc_weight*mc + (1-mc_weight)*subj.
When one kind has no rows at all, final_score is the other kind's score alone.
mc_format_violation_rate: MC rows whose raw output (before any forcing) is not one allowed digit.
subj_len_violation_rate: subjective rows over the sentence, character or token cap.
subj_format_violation_rate: subjective rows answered with nothing, a bare number or undecodable text (U+FFFD).
subj_cos_floor: the mean cosine of each gold answer against the set's other gold answers, with `embedder`
naming the model: what an answer about something else already earns, so the room above it is what
subj_cos can measure (None with fewer than two subjective rows).
by_domain: where gold rows name a domain, {domain: {n_mc, n_subj, mc_accuracy, subj_score, final_score}}.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from metrics.keywords import content_morphemes, keyword_recall
from metrics.text import sentences


@dataclass
class Gold:
    id: str
    kind: str  # "mc" | "subj"
    answer: str
    n_options: int = 0
    keywords: list[str] = field(default_factory=list)
    domain: str = ""

    @classmethod
    def of(cls, example) -> "Gold":
        """The gold row of an example (anything with id, kind, answer, n_options, keywords, domain)."""
        return cls(example.id, example.kind, example.answer, example.n_options, list(example.keywords),
                   example.domain)


@dataclass
class Prediction:
    id: str
    text: str
    raw: Optional[str] = None
    """MC: what the model said unconstrained (its top token); None means `text` is the raw output."""
    n_tokens: Optional[int] = None
    """Subjective: generated token count before trimming, when known."""


@dataclass(frozen=True)
class ScoreConfig:
    mc_weight: float = 0.5
    cos_weight: float = 0.6
    max_sentences: int = 2
    max_chars: int = 300
    max_tokens: int = 64
    keywords: str = "auto"
    """Gold keywords: `column` (the Keyword column where a row has one, else the answer's nouns),
    `answer` (the gold answer's nouns), or `auto`: the column where the gold answer itself recalls all
    of its phrases, else the answer's nouns (FSKU's Keyword column often names the topic, not words of
    the answer, and such keywords would cap even a perfect answer's recall)."""


def is_allowed_digit(text: str, n_options: int) -> bool:
    s = text.strip()
    return len(s) == 1 and s.isdigit() and 1 <= int(s) <= n_options


_BARE_NUMBER = re.compile(r"[\d①-⑩]+(?:[.,]\d+)*[.)]?")


def is_subj_format_violation(text: str) -> bool:
    """Not an answer in words: empty, a bare number (`3`, `3.`, `①`), or undecodable bytes (U+FFFD)."""
    s = text.strip()
    return not s or bool(_BARE_NUMBER.fullmatch(s)) or "\ufffd" in s


def cos_floor(gold_vecs: np.ndarray) -> Optional[float]:
    """Mean cosine over ordered pairs of distinct rows (vectors L2-normalised)."""
    n = len(gold_vecs)
    if n < 2:
        return None
    total = gold_vecs.sum(0)
    return float((total @ total - (gold_vecs * gold_vecs).sum()) / (n * (n - 1)))


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def score(golds: Sequence[Gold], preds: Sequence[Prediction], embedder, config: ScoreConfig = ScoreConfig()
          ) -> tuple[dict, list[dict]]:
    """(summary, per-row records). `preds[i]` answers `golds[i]`."""
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold rows but {len(preds)} predictions")
    rows: list[dict] = []
    mc = [(g, p) for g, p in zip(golds, preds) if g.kind == "mc"]
    subj = [(g, p) for g, p in zip(golds, preds) if g.kind == "subj"]

    for g, p in mc:
        raw = p.text if p.raw is None else p.raw
        rows.append({"id": g.id, "kind": "mc", "pred": p.text, "gold": g.answer, "raw": raw,
                     "correct": float(p.text.strip() == g.answer),
                     "format_violation": not is_allowed_digit(raw, g.n_options)})

    if subj:
        pred_texts = [p.text.strip() for _, p in subj]
        nonempty = [t for t in pred_texts if t]
        pred_vecs = dict(zip(nonempty, embedder.encode(nonempty))) if nonempty else {}
        gold_vecs = embedder.encode([g.answer for g, _ in subj])
        phrases = [k for g, _ in subj for k in g.keywords]
        morphs = content_morphemes(pred_texts + [g.answer for g, _ in subj] + phrases)
        pred_m, gold_m, phrase_m = morphs[: len(subj)], morphs[len(subj): 2 * len(subj)], morphs[2 * len(subj):]
        offset = 0
        for i, (g, p) in enumerate(subj):
            text = pred_texts[i]
            cos = min(1.0, float(np.dot(pred_vecs[text], gold_vecs[i]))) if text else 0.0
            phrases, pm = g.keywords, phrase_m[offset: offset + len(g.keywords)]
            offset += len(g.keywords)
            if config.keywords == "answer" or (config.keywords == "auto" and phrases and
                                               keyword_recall(g.answer, gold_m[i], gold_m[i], phrases, pm) < 1):
                phrases, pm = [], []
            kw = keyword_recall(text, pred_m[i], gold_m[i], phrases, pm)
            too_long = (len(sentences(text)) > config.max_sentences or len(text) > config.max_chars
                        or (p.n_tokens is not None and p.n_tokens > config.max_tokens))
            rows.append({"id": g.id, "kind": "subj", "pred": text, "gold": g.answer, "cos": cos, "kw": kw,
                         "score": config.cos_weight * cos + (1 - config.cos_weight) * kw,
                         "len_violation": too_long, "format_violation": is_subj_format_violation(text),
                         "keyword_source": "column" if phrases else "answer"})

    summary = {**summarize(rows, config),
               "subj_cos_floor": cos_floor(gold_vecs) if subj else None,
               "embedder": getattr(embedder, "name", type(embedder).__name__)}
    domains = {g.id: g.domain for g in golds}
    if any(domains.values()):
        summary["by_domain"] = {d: {k: v for k, v in summarize([r for r in rows if domains[r["id"]] == d], config)
                                    .items() if k in DOMAIN_KEYS}
                                for d in sorted(set(domains.values()))}
    order = {g.id: i for i, g in enumerate(golds)}
    rows.sort(key=lambda r: order[r["id"]])
    return summary, rows


DOMAIN_KEYS = ("n_mc", "n_subj", "mc_accuracy", "subj_score", "final_score")


def summarize(rows: Sequence[dict], config: ScoreConfig) -> dict:
    """The metric over per-row records (all of an eval set's, or one domain's)."""
    mc_rows = [r for r in rows if r["kind"] == "mc"]
    subj_rows = [r for r in rows if r["kind"] == "subj"]
    mc_acc = _mean([r["correct"] for r in mc_rows])
    subj_cos = _mean([r["cos"] for r in subj_rows])
    subj_kw = _mean([r["kw"] for r in subj_rows])
    subj_score = config.cos_weight * subj_cos + (1 - config.cos_weight) * subj_kw
    if mc_rows and subj_rows:
        final = config.mc_weight * mc_acc + (1 - config.mc_weight) * subj_score
    else:
        final = mc_acc if mc_rows else subj_score
    return {
        "mc_accuracy": mc_acc, "subj_cos": subj_cos, "subj_kw": subj_kw, "subj_score": subj_score,
        "final_score": final,
        "mc_format_violation_rate": _mean([float(r["format_violation"]) for r in mc_rows]),
        "subj_len_violation_rate": _mean([float(r["len_violation"]) for r in subj_rows]),
        "subj_format_violation_rate": _mean([float(r["format_violation"]) for r in subj_rows]),
        "n_mc": len(mc_rows), "n_subj": len(subj_rows),
        "mc_correct": int(sum(r["correct"] for r in mc_rows)),
        "mc_format_violations": sum(r["format_violation"] for r in mc_rows),
        "subj_len_violations": sum(r["len_violation"] for r in subj_rows),
        "subj_format_violations": sum(r["format_violation"] for r in subj_rows),
        "subj_kw_from_column": sum(r["keyword_source"] == "column" for r in subj_rows),
    }
