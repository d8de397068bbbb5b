import pytest

from conftest import SAMPLE, write_csv
from engine.data import encode_example, option_count, prompt_text, read_examples
from engine.errors import UserError

MC_Q = "질문?\n1 가\n2 나\n3 다\n4 라"


def test_sample_data_has_the_promised_mix():
    ex = read_examples(SAMPLE)
    mc = [e for e in ex if e.kind == "mc"]
    subj = [e for e in ex if e.kind == "subj"]
    assert len(mc) >= 60 and len(subj) >= 20
    assert {e.n_options for e in mc} == {4, 5}
    assert all(e.keywords for e in subj)
    assert len({e.id for e in ex}) == len(ex)


def test_option_lines_decide_the_kind():
    assert option_count(MC_Q) == 4
    assert option_count("OTP의 개념을 설명하시오.") == 0
    assert option_count("2024년 기준\n1 하나뿐") == 0  # one numbered line is not a question with options


def test_bom_is_accepted_and_ids_default_to_row_numbers(tmp_path):
    p = tmp_path / "bom.csv"
    p.write_bytes("\ufeffQuestion,Answer\n\"{}\",2\n설명하시오.,답입니다.\n".format(MC_Q).encode("utf-8"))
    ex = read_examples(p)
    assert [e.id for e in ex] == ["1", "2"] and ex[0].kind == "mc" and ex[1].kind == "subj"


@pytest.mark.parametrize("rows, header, message", [
    ([["1", MC_Q, "0"]], None, "row 1 (line 2), column Answer: multiple-choice answer must be one digit 1..4, got '0'"),
    ([["1", MC_Q, "5"]], None, "column Answer: multiple-choice answer must be one digit 1..4, got '5'"),
    ([["1", MC_Q, "2번"]], None, "got '2번'"),
    ([["1", MC_Q, " 2"]], None, "got ' 2'"),
    ([["1", MC_Q, ""]], None, "got ''"),
    ([["1", "", "답"]], None, "row 1 (line 2), column Question: empty question"),
    ([["1", "설명?", "  "]], None, "column Answer: empty answer"),
    ([["1", "질문?\n1 가\n3 나", "1"]], None, "option lines numbered [1, 3], expected 1..2"),
    ([["1", "설명?", "답"], ["1", "설명2?", "답"]], None, "row 2 (line 3), column ID: duplicate ID '1'"),
    ([["1", "설명?"]], None, "row 1 (line 2): 2 cells, header has 3"),
    ([["1", "설명?", "답"]], ("ID", "Question"), "missing column Answer"),
    ([], None, "no data rows after the header"),
])
def test_bad_rows_name_file_row_and_column(tmp_path, rows, header, message):
    p = write_csv(tmp_path / "bad.csv", rows, header or ("ID", "Question", "Answer"))
    with pytest.raises(UserError) as e:
        read_examples(p)
    assert str(p) in str(e.value) and message in str(e.value)


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"ID,Question,Answer\n1,\xff\xfe,2\n", "line 2: not UTF-8"),
    (b"ID,Question,Answer\n1,a\x00b,2\n", "line 2: NUL byte"),
])
def test_unreadable_files(tmp_path, content, message):
    p = tmp_path / "x.csv"
    p.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_examples(p)


def test_missing_file():
    with pytest.raises(UserError, match="file not found"):
        read_examples("/nonexistent/train.csv")


def test_labels_cover_answer_and_end_of_turn_only(tiny_tokenizer):
    ex = read_examples(SAMPLE)
    mc = next(e for e in ex if e.kind == "mc")
    enc = encode_example(tiny_tokenizer, mc, "시스템", 512)
    answer = [t for t in enc.labels if t != -100]
    assert answer == tiny_tokenizer.encode(mc.answer, add_special_tokens=False) + [27]
    assert len(answer) == 2  # one digit token + <|im_end|>
    n_prompt = enc.labels.index(answer[0])
    assert enc.input_ids[:n_prompt] == tiny_tokenizer.encode(prompt_text(mc, "시스템"), add_special_tokens=False)


# --- the real A.X 4.0 Light tokenizer ------------------------------------------------------------------

def test_real_tokenizer_ids(ax_tokenizer):
    assert len(ax_tokenizer) == 102400
    assert ax_tokenizer.eos_token_id == 27 and ax_tokenizer.pad_token_id == 1
    assert ax_tokenizer.encode("답변: 1", add_special_tokens=False) == [5176, 66, 261, 57]
    assert ax_tokenizer.encode("21", add_special_tokens=False) == [2306]  # whole numbers, not digit-split


def test_real_tokenizer_prompt_and_labels(ax_tokenizer, fsku_dev):
    examples = read_examples(fsku_dev)
    lengths = {"mc": [], "subj": []}
    for ex in examples:
        enc = encode_example(ax_tokenizer, ex, "당신은 금융보안 전문가입니다.", 1024)
        answer = [t for t in enc.labels if t != -100]
        assert answer[-1] == 27 and enc.input_ids[-1] == 27
        ids = enc.input_ids
        assert ids[:2] == [25, 9]  # <|im_start|><|system|>
        start = len(ids) - len(answer)
        assert ids[start - 2: start] == [25, 10]  # <|im_start|><|assistant|>, then the answer
        if ex.kind == "mc":
            assert answer == [56 + int(ex.answer), 27]  # the digit is one token: "1".."5" -> 57..61
        lengths[ex.kind].append(start)
    assert 50 < min(lengths["mc"]) and max(lengths["mc"]) < 220
    assert 40 < min(lengths["subj"]) and max(lengths["subj"]) < 140
