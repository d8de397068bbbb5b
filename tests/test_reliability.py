"""Faults survived, bad input refused, nothing lost. Faults are real (SIGKILL, raised errors) and placed at
exact moments through FSKU_FAULT (engine/faults.py)."""
import csv
import io
import os
import sys
from pathlib import Path

import pytest

from conftest import SAMPLE, events, run_cli, tiny_overrides

CKPT_EVERY = "checkpoint.every_steps=10"


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    res = run_cli("train.py", "recipes/tiny.yaml", *tiny_overrides(tiny_model, out, CKPT_EVERY))
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def run_with_fault(tiny_model, out: Path, spec: str, *extra: str):
    env_before = os.environ.get("FSKU_FAULT")
    os.environ["FSKU_FAULT"] = spec
    try:
        return run_cli("train.py", "recipes/tiny.yaml", *tiny_overrides(tiny_model, out, CKPT_EVERY, *extra))
    finally:
        if env_before is None:
            del os.environ["FSKU_FAULT"]
        else:
            os.environ["FSKU_FAULT"] = env_before


def assert_same_run(reference: Path, out: Path) -> None:
    a, b = events(reference, "train"), events(out, "train")
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["step"], x["loss"], y["loss"])
    ea, eb = events(reference, "eval"), events(out, "eval")
    assert [e["step"] for e in ea] == [e["step"] for e in eb]
    for x, y in zip(ea, eb):
        assert abs(x["eval_loss"] - y["eval_loss"]) < 1e-5 and abs(x["final_score"] - y["final_score"]) < 1e-5


@pytest.mark.parametrize("spec, resumes_from", [
    ("kill-step@25", 20),        # in the middle of a step, after backward, before the update
    ("kill-eval@20", 15),        # in the middle of an eval, predictions made, nothing logged yet
    ("kill-checkpoint@20", 15),  # in the middle of a checkpoint write: adapter written, state.pt not yet
])
def test_kill_9_then_rerun_continues_as_if_nothing_happened(reference, tiny_model, tmp_path, spec, resumes_from):
    out = tmp_path / "run"
    res = run_with_fault(tiny_model, out, spec)
    assert res.returncode == -9, res.stderr[-2000:]
    done = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    assert done[-1] == resumes_from  # a half-written checkpoint never looks complete
    res = run_cli("train.py", "recipes/tiny.yaml", *tiny_overrides(tiny_model, out, CKPT_EVERY))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"step-{resumes_from} (step {resumes_from} of" in res.stderr
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert_same_run(reference, out)


def test_nan_loss_stops_at_once_naming_the_step(tiny_model, tmp_path):
    out = tmp_path / "run"
    res = run_with_fault(tiny_model, out, "nan@12")
    assert res.returncode == 3
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: step 12: loss is nan; stopped. Last good checkpoint: {out}/checkpoints/step-10 "
        "(train.skip_nonfinite lets a few such steps pass)")
    assert "Traceback" not in res.stderr
    assert events(out, "train")[-1]["step"] == 11
    assert (out / "checkpoints" / "step-10" / "state.pt").is_file()


def test_skip_nonfinite_lets_a_step_pass(tiny_model, tmp_path):
    out = tmp_path / "run"
    res = run_with_fault(tiny_model, out, "nan@12", "train.skip_nonfinite=1", "eval.every_steps=0",
                         "train.max_steps=14")
    assert res.returncode == 0, res.stderr[-2000:]
    skips = events(out, "skip")
    assert [e["step"] for e in skips] == [12] and "non-finite loss nan skipped (1 of 1 allowed)" in res.stderr
    assert [e["step"] for e in events(out, "train")] == list(range(1, 15))


def test_out_of_memory_is_one_line_with_what_to_lower(tiny_model, tmp_path):
    res = run_with_fault(tiny_model, tmp_path / "run", "oom@3")
    assert res.returncode == 3 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 3: CUDA out of memory at micro-batch 4 x ")
    assert "lower train.micro_batch" in last


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "run"
    res = run_with_fault(tiny_model, out, "enospc@20")
    assert res.returncode == 3 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: step 20: cannot write checkpoint under {out}/checkpoints: No space left on device; "
        "the previous checkpoint is intact")
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step-20" not in names and not [n for n in names if n.startswith(".")]
    from engine.checkpoint import complete_checkpoints
    assert complete_checkpoints(out / "checkpoints")[-1][0] == 15


def test_infer_killed_while_writing_the_csv(tiny_model, fsku_dev, tmp_path):
    test_csv = tmp_path / "test.csv"
    with open(fsku_dev, encoding="utf-8") as f, open(test_csv, "w", newline="", encoding="utf-8") as g:
        w = csv.writer(g)
        w.writerow(["ID", "Question"])
        for i, row in enumerate(csv.DictReader(f)):
            w.writerow([f"Q{i}", row["Question"]])
    args = ["infer.py", "--test", str(test_csv), "--model", str(tiny_model), "--max-new-tokens", "16"]
    res = run_cli(*args, "--out", str(tmp_path / "clean.csv"))
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "sub.csv"
    out.write_text("ID,Answer\nold,1\n", encoding="utf-8")
    os.environ["FSKU_FAULT"] = "kill-infer-write"
    try:
        res = run_cli(*args, "--out", str(out))
    finally:
        del os.environ["FSKU_FAULT"]
    assert res.returncode == -9
    assert out.read_text(encoding="utf-8") == "ID,Answer\nold,1\n"  # the good file is never half-overwritten
    res = run_cli(*args, "--out", str(out))
    assert res.returncode == 0
    assert out.read_bytes() == (tmp_path / "clean.csv").read_bytes()


# --- bad input: exit 2, one line naming what and where, no traceback, nothing written --------------------

MC5 = "다음 중 옳은 것은?\n1 가\n2 나\n3 다\n4 라\n5 마"


def csv_bytes(rows, header=("ID", "Question", "Answer")) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


GOOD = [["A1", MC5, "3"], ["A2", "OTP를 설명하시오.", "일회용 비밀번호이다."]]
BAD_CSV = {
    "missing Question column": (csv_bytes([["A1", "3"]], ("ID", "Answer")), "missing column Question"),
    "missing Answer column": (csv_bytes([["A1", MC5]], ("ID", "Question")), "missing column Answer"),
    "UTF-16 LE with BOM": ("ID,Question,Answer\nA1,설명,답\n".encode("utf-16"), "NUL byte"),
    "UTF-16 BE with BOM": (b"\xfe\xff" + "ID,Question,Answer\n".encode("utf-16-be"), "NUL byte"),
    "UTF-32": ("ID,Question,Answer\n".encode("utf-32"), "NUL byte"),
    "empty file": (b"", "empty file"),
    "header only": (b"ID,Question,Answer\n", "no data rows after the header"),
    "embedded NUL": (csv_bytes(GOOD).replace("OTP".encode(), b"O\x00TP"), "line 8: NUL byte"),
    "ragged row, too few cells": (csv_bytes(GOOD + [["A3", "질문"]]), "row 3 (line 9): 2 cells, header has 3"),
    "ragged row, too many cells": (csv_bytes(GOOD + [["A3", "질문", "답", "x"]]), "row 3 (line 9): 4 cells"),
    "unterminated quote": (csv_bytes(GOOD) + b'A3,"open,2\n', "row 3 (line 9): 2 cells"),
    "duplicate IDs": (csv_bytes(GOOD + [["A1", "질문", "답"]]), "row 3 (line 9), column ID: duplicate ID 'A1'"),
    "empty ID": (csv_bytes([["", "질문", "답"]]), "row 1 (line 2), column ID: empty ID"),
    "MC answer 0": (csv_bytes([["A1", MC5, "0"]]), "column Answer: multiple-choice answer must be one digit 1..5, got '0'"),
    "MC answer 6": (csv_bytes([["A1", MC5, "6"]]), "got '6'"),
    "MC answer 2번": (csv_bytes([["A1", MC5, "2번"]]), "got '2번'"),
    "MC answer empty": (csv_bytes([["A1", MC5, ""]]), "got ''"),
    "MC answer 10": (csv_bytes([["A1", MC5, "10"]]), "got '10'"),
    "option lines numbered wrongly": (csv_bytes([["A1", "질문\n1 가\n2 나\n4 라", "1"]]),
                                      "column Question: option lines numbered [1, 2, 4], expected 1..3"),
    "options out of order": (csv_bytes([["A1", "질문\n2 가\n1 나", "1"]]), "numbered [2, 1]"),
    "gigantic question": (csv_bytes([["A1", "가" * 25_000, "답"]]), "column Question: 25000 characters"),
    "non-UTF-8 (cp949)": ("ID,Question,Answer\nA1,보안,답\n".encode("cp949"), "line 2: not UTF-8"),
    "empty question": (csv_bytes([["A1", "  ", "답"]]), "column Question: empty question"),
    "empty subjective answer": (csv_bytes([["A1", "설명하시오.", " "]]), "column Answer: empty answer"),
}


def call(module_main, argv, capsys):
    """Run a command line in-process through engine.errors.run_cli; returns (exit status, stderr)."""
    from engine.errors import run_cli as guard
    old = sys.argv
    sys.argv = argv
    try:
        with pytest.raises(SystemExit) as e:
            guard(module_main)
    finally:
        sys.argv = old
    return e.value.code, capsys.readouterr().err


def assert_one_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize("case", list(BAD_CSV), ids=list(BAD_CSV))
def test_bad_training_csv(case, tiny_model, tmp_path, capsys):
    import train
    content, message = BAD_CSV[case]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    out = tmp_path / "run"
    code, err = call(train.main, ["train.py", "recipes/tiny.yaml", f"model.path={tiny_model}",
                                  f"data.train={bad}", f"output_dir={out}"], capsys)
    assert code == 2
    assert_one_line(err, str(bad), message)
    assert not out.exists()


def write(tmp_path: Path, name: str, text: str) -> Path:
    (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path / name


BAD_RECIPES = {
    "unknown key": ("extends: {root}/recipes/tiny.yaml\ntrain:\n  warmup: 0.1\n", [],
                    "unknown key train.warmup (did you mean train.warmup_ratio?)"),
    "typo in override": ("extends: {root}/recipes/tiny.yaml\n", ["train.lrr=1"], "unknown key train.lrr (did you mean train.lr?)"),
    "wrong type": ("extends: {root}/recipes/tiny.yaml\ntrain:\n  micro_batch: four\n", [],
                   "train.micro_batch must be an integer, got 'four'"),
    "negative lr": ("extends: {root}/recipes/tiny.yaml\n", ["train.lr=-1e-4"], "train.lr must not be negative"),
    "zero epochs": ("extends: {root}/recipes/tiny.yaml\ntrain:\n  epochs: 0\n", [], "train.epochs must be greater than 0"),
    "zero micro-batch": ("extends: {root}/recipes/tiny.yaml\n", ["train.micro_batch=0"], "train.micro_batch must be greater than 0"),
    "missing extends target": ("extends: nowhere.yaml\n", [], "extends: file not found"),
    "circular extends": ("extends: r.yaml\n", [], "circular extends"),
    "override of a non-existent key": ("extends: {root}/recipes/tiny.yaml\n", ["model.size=7b"], "unknown key model.size"),
    "override of a section": ("extends: {root}/recipes/tiny.yaml\n", ["train=1"], "train is a section; set one of its keys"),
    "not YAML": ("train: [1,\n", [], "not valid YAML"),
    "bad choice": ("extends: {root}/recipes/tiny.yaml\n", ["train.scheduler=step"], "train.scheduler must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES), ids=list(BAD_RECIPES))
def test_bad_recipe(case, tmp_path, capsys):
    import train
    from conftest import ROOT
    text, overrides, message = BAD_RECIPES[case]
    recipe = write(tmp_path, "r.yaml", text.format(root=ROOT))
    code, err = call(train.main, ["train.py", str(recipe), f"output_dir={tmp_path / 'run'}", *overrides], capsys)
    assert code == 2
    assert_one_line(err, message)
    assert not (tmp_path / "run").exists()


def test_missing_recipe_file(tmp_path, capsys):
    import train
    code, err = call(train.main, ["train.py", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2
    assert_one_line(err, "nope.yaml", "file not found")


def test_missing_eval_file(tiny_model, tmp_path, capsys):
    import train
    code, err = call(train.main, ["train.py", "recipes/tiny.yaml", f"model.path={tiny_model}",
                                  f"data.eval={tmp_path / 'eval.csv'}", f"output_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert_one_line(err, "data.eval", "eval.csv: file not found")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["missing test file", "test file without ID", "missing model dir",
                                  "missing out directory", "adapter without config"])
def test_bad_infer_command_lines(case, tiny_model, tmp_path, capsys):
    import infer
    out = tmp_path / "sub.csv"
    out.write_text("ID,Answer\nkeep,1\n", encoding="utf-8")
    no_id = tmp_path / "noid.csv"
    no_id.write_bytes(csv_bytes([[MC5]], ("Question",)))
    argv = {"missing test file": ["--test", str(tmp_path / "none.csv"), "--model", str(tiny_model)],
            "test file without ID": ["--test", str(no_id), "--model", str(tiny_model)],
            "missing model dir": ["--test", str(SAMPLE), "--model", str(tmp_path / "m")],
            "missing out directory": ["--test", str(SAMPLE), "--model", str(tiny_model)],
            "adapter without config": ["--test", str(SAMPLE), "--model", str(tiny_model), "--adapter", str(tmp_path)],
            }[case]
    target = tmp_path / "no-dir" / "sub.csv" if case == "missing out directory" else out
    code, err = call(infer.main, ["infer.py", *argv, "--out", str(target)], capsys)
    assert code == 2
    assert_one_line(err)
    assert out.read_text(encoding="utf-8") == "ID,Answer\nkeep,1\n"
    assert not Path(str(out) + ".partial.jsonl").exists()


def test_metrics_with_a_missing_gold_file(tmp_path, capsys):
    from metrics.__main__ import main
    pred = write(tmp_path, "p.csv", "ID,Answer\nS001,1\n")
    code, err = call(main, ["metrics", "score", "--pred", str(pred), "--gold", str(tmp_path / "g.csv")], capsys)
    assert code == 2
    assert_one_line(err, "g.csv: file not found")
