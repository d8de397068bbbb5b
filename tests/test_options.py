"""Option lines in every style people write, and MC answers that quote their option's text."""
import csv
import json
from pathlib import Path

import pytest

from conftest import FSKU_DEV, TINY_RECIPE, events, run_cli, tiny_overrides, write_csv
from engine.data import prompt_text, read_examples
from engine.errors import UserError
from engine.options import normalized, option_lines, parse_quoted_answer

MC_ANSWER_TEXT = FSKU_DEV.with_name("mc_answer_text.csv")
STYLES = {
    "plain": "다음 중 {}?\n1 가나\n2 다라\n3 마바\n4 사아",
    "dot": "다음 중 {}?\n1. 가나\n2. 다라\n3. 마바\n4. 사아\n5. 자차",
    "paren": "다음 중 {}?\n  1) 가나\n  2) 다라\n  3) 마바",
    "parens": "다음 중 {}?\n(1) 가나\n(2) 다라\n(3) 마바\n(4) 사아",
    "circled": "다음 중 {}?\n① 가나\n② 다라\n③ 마바\n④ 사아\n⑤ 자차",
    "circled, no space": "다음 중 {}?\n①가나\n②다라\n③마바\n④사아",
}
OPTION_COUNTS = {"plain": 4, "dot": 5, "paren": 3, "parens": 4, "circled": 5, "circled, no space": 4}


@pytest.mark.parametrize("style", STYLES)
def test_every_style_is_a_question_with_its_options(tmp_path, style):
    question = STYLES[style].format("옳은 것은")
    ex = read_examples(write_csv(tmp_path / "s.csv", [["A1", question, "2"]]))[0]
    assert (ex.kind, ex.n_options, ex.answer) == ("mc", OPTION_COUNTS[style], "2")
    assert question in prompt_text(ex, "sys")  # the prompt shows the question as written
    assert [o.text for o in option_lines(question)][:2] == ["가나", "다라"]


@pytest.mark.parametrize("text", ["1.5배 이상 증가한 원인을 설명하시오.", "2023년 개정 내용을 설명하시오.",
                                  "다음을 설명하시오.\n1) 하나뿐인 항목", "(1) 한 줄만 번호가 있다"])
def test_numbers_that_are_not_options_leave_the_question_subjective(tmp_path, text):
    ex = read_examples(write_csv(tmp_path / "s.csv", [["A1", text, "답입니다."]]))[0]
    assert (ex.kind, ex.n_options) == ("subj", 0)


@pytest.mark.parametrize("question, message", [
    ("질문?\n1 가\n2) 나\n3 다", "option lines mix styles ('1', '2)', '3')"),
    ("질문?\n① 가\n② 나\n3. 다", "option lines mix styles"),
    ("질문?\n(1) 가\n(3) 나", "option lines numbered [1, 3], expected 1..2 in order"),
    ("질문?\n② 가\n① 나", "option lines numbered [2, 1], expected 1..2 in order"),
])
def test_mixed_or_misnumbered_options_name_file_row_and_column(tmp_path, question, message):
    path = write_csv(tmp_path / "bad.csv", [["A1", "설명?", "답"], ["A2", question, "1"]])
    with pytest.raises(UserError) as e:
        read_examples(path)
    assert str(e.value).startswith(f"{path}: row 2 (line 3), column Question: ") and message in str(e.value)


def test_normalized_ignores_spacing_and_trailing_punctuation():
    assert normalized("  온라인   송금. ") == normalized("온라인 송금") == "온라인 송금"
    assert normalized("정형 데이터는 TDE 방식을 쓴다。") == "정형 데이터는 TDE 방식을 쓴다"
    assert parse_quoted_answer("③ 마바").number == 3 and parse_quoted_answer("3번") is None


@pytest.mark.parametrize("answer", ["3 마바", "3  마바.", "③ 마바", "3. 마바", "3) 마바", "(3) 마바", "3", "③"])
def test_an_answer_quoting_its_own_option_becomes_the_digit(tmp_path, answer):
    ex = read_examples(write_csv(tmp_path / "a.csv", [["A1", STYLES["circled"].format("옳은 것은"), answer]]))[0]
    assert ex.answer == "3" and ex.answer_note == ""
    assert ex.answer_quoted == (answer not in ("3", "③"))


@pytest.mark.parametrize("answer, message", [
    ("3 다라", "answer '3 다라' quotes option 2's text; option 3 is '마바'"),
    ("3 전혀 다른 말", "answer '3 전혀 다른 말' quotes no option's text; option 3 is '마바'"),
])
def test_an_answer_quoting_another_option_is_refused_or_kept_with_warn(tmp_path, answer, message):
    path = write_csv(tmp_path / "a.csv", [["A1", "설명?", "답"], ["A2", STYLES["plain"].format("옳은 것은"), answer]])
    with pytest.raises(UserError) as e:
        read_examples(path)
    assert str(e.value).startswith(f"{path}: row 2 (line 3), column Answer: {message}")
    assert "data.answer_text_mismatch=warn" in str(e.value)
    ex = read_examples(path, answer_text_mismatch="warn")[1]
    assert ex.answer == "3" and message in ex.answer_note and ex.answer_note.startswith(f"{path}: row 2")


def test_every_style_trains_and_infers_with_its_option_count(tiny_model, tmp_path):
    """Also a run on data with a Domain column (here: the style) logging scores per domain at every eval."""
    rows, test_rows = [], []
    for i in range(24):
        style = list(STYLES)[i % len(STYLES)]
        question = STYLES[style].format(f"{i}번째 설명으로 옳은 것은")
        rows.append([f"T{i}", question, str(1 + i % OPTION_COUNTS[style]), style])
        test_rows.append([f"Q{i}", question])
    train = write_csv(tmp_path / "train.csv", rows, ("ID", "Question", "Answer", "Domain"))
    test = write_csv(tmp_path / "test.csv", test_rows, ("ID", "Question"))
    out = tmp_path / "run"
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out), f"data.train={train}",
                  "train.max_steps=3", "data.eval_size=12", "eval.every_steps=2")
    assert res.returncode == 0, res.stderr[-2000:]
    evals = events(out, "eval")
    assert [e["step"] for e in evals] == [2, 3]
    eval_ids = json.loads((out / "eval_ids.json").read_text())
    eval_styles = {r[3] for r in rows if r[0] in eval_ids}
    for e in evals:
        assert set(e["by_domain"]) == eval_styles
        assert sum(d["n_mc"] for d in e["by_domain"].values()) == e["n_mc"] == len(eval_ids)
        assert all(set(d) == {"n_mc", "n_subj", "mc_accuracy", "subj_score", "final_score"} for d in e["by_domain"].values())
    eval_rows = [json.loads(line) for line in next((out / "eval").glob("step-*.jsonl")).read_text().splitlines()]
    counts = {r[0]: OPTION_COUNTS[list(STYLES)[int(r[0][1:]) % len(STYLES)]] for r in rows}
    assert eval_rows and all(r["kind"] == "mc" and 1 <= int(r["pred"]) <= counts[r["id"]] for r in eval_rows)
    sub = tmp_path / "sub.csv"
    res = run_cli("infer.py", "--test", str(test), "--out", str(sub), "--model", str(tiny_model), "--no-adapter")
    assert res.returncode == 0, res.stderr[-2000:]
    answers = {r["ID"]: r["Answer"] for r in csv.DictReader(open(sub, encoding="utf-8"))}
    assert all(1 <= int(answers[f"Q{i}"]) <= counts[f"T{i}"] for i in range(24))


@pytest.fixture
def fsku_answer_text() -> Path:
    if not MC_ANSWER_TEXT.is_file():
        pytest.skip("../shared/data/fsku/mc_answer_text.csv is absent")
    return MC_ANSWER_TEXT


def test_fsku_answers_with_option_text_stop_at_the_row_whose_text_disagrees(fsku_answer_text, tiny_model, tmp_path):
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, tmp_path / "run"),
                  f"data.train={fsku_answer_text}")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]  # one line
    assert f"{fsku_answer_text}: row 46 (line " in res.stderr and "column Answer" in res.stderr
    assert "'3 전자금융데이터의 비암호화 저장' quotes no option's text; option 3 is '마케팅 전략 강화'" in res.stderr


def test_fsku_answers_with_option_text_train_under_warn(fsku_answer_text, tiny_model, tmp_path):
    out = tmp_path / "run"
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out), f"data.train={fsku_answer_text}",
                  "data.answer_text_mismatch=warn", "train.max_steps=2",
                  "eval.generate=false")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1 MC answers quote another option's text or none; kept their digit" in res.stderr
    assert "49 quote their own option" in res.stderr and "row 46 (line" in res.stderr
    data = json.loads((out / "summary.json").read_text(encoding="utf-8"))["data"]
    assert data["answers_quoting_their_option"] == 49
    assert len(data["answer_text_mismatches"]) == 1 and "row 46 (line" in data["answer_text_mismatches"][0]
