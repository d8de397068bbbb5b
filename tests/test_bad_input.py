"""Bad input, from a careless or hostile user: every case exits 2 with one line on stderr naming the file,
row and column (or the key, or the flag), no traceback, nothing written or overwritten, and for training
the model never loaded (every check runs on the examples before any weights are read)."""
import csv
import io
import shutil
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE, TINY_RECIPE, run_cli, tiny_overrides

MC5 = "다음 중 옳은 것은?\n1 가\n2 나\n3 다\n4 라\n5 마"
MC4 = "다음 중 옳은 것은?\n1 가\n2 나\n3 다\n4 라"


def csv_bytes(rows, header=("ID", "Question", "Answer")) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


GOOD = [["A1", MC5, "3"], ["A2", "OTP를 설명하시오.", "일회용 비밀번호이다."]]
UNREADABLE = {
    "UTF-16 LE with BOM": ("ID,Question,Answer\nA1,설명,답\n".encode("utf-16"), "NUL byte"),
    "UTF-16 BE with BOM": (b"\xfe\xff" + "ID,Question,Answer\n".encode("utf-16-be"), "NUL byte"),
    "UTF-32": ("ID,Question,Answer\n".encode("utf-32"), "NUL byte"),
    "empty file": (b"", "empty file"),
    "header only": (b"ID,Question,Answer\n", "no data rows after the header"),
    "embedded NUL": (csv_bytes(GOOD).replace("OTP".encode(), b"O\x00TP"), "line 8: NUL byte"),
    "non-UTF-8 (cp949)": ("ID,Question,Answer\nA1,보안,답\n".encode("cp949"), "line 2: not UTF-8"),
    "binary file": (bytes(range(256)) * 4, "NUL byte"),
}
BAD_CSV = {
    **UNREADABLE,
    "missing Question column": (csv_bytes([["A1", "3"]], ("ID", "Answer")), "missing column Question"),
    "missing Answer column": (csv_bytes([["A1", MC5]], ("ID", "Question")), "missing column Answer"),
    "ragged row, too few cells": (csv_bytes(GOOD + [["A3", "질문"]]), "row 3 (line 9): 2 cells, header has 3"),
    "ragged row, too many cells": (csv_bytes(GOOD + [["A3", "질문", "답", "x"]]), "row 3 (line 9): 4 cells"),
    "unterminated quote": (csv_bytes(GOOD) + b'A3,"open,2\n', "row 3 (line 9): 2 cells"),
    "duplicate IDs": (csv_bytes(GOOD + [["A1", "질문", "답"]]), "row 3 (line 9), column ID: duplicate ID 'A1'"),
    "empty ID": (csv_bytes([["", "질문", "답"]]), "row 1 (line 2), column ID: empty ID"),
    "MC answer 0": (csv_bytes([["A1", MC5, "0"]]), "column Answer: multiple-choice answer must be one digit 1..5, got '0'"),
    "MC answer 6": (csv_bytes([["A1", MC5, "6"]]), "got '6'"),
    "MC answer 5 of 4 options": (csv_bytes([["A1", MC4, "5"]]), "one digit 1..4, got '5'"),
    "MC answer 2번": (csv_bytes([["A1", MC5, "2번"]]), "got '2번'"),
    "MC answer empty": (csv_bytes([["A1", MC5, ""]]), "got ''"),
    "MC answer 10": (csv_bytes([["A1", MC5, "10"]]), "got '10'"),
    "MC answer 3.0": (csv_bytes([["A1", MC5, "3.0"]]), "got '3.0'"),
    "MC answer with a space": (csv_bytes([["A1", MC5, " 3"]]), "got ' 3'"),
    "option lines numbered wrongly": (csv_bytes([["A1", "질문\n1 가\n2 나\n4 라", "1"]]),
                                      "column Question: option lines numbered [1, 2, 4], expected 1..3"),
    "options out of order": (csv_bytes([["A1", "질문\n2 가\n1 나", "1"]]), "numbered [2, 1]"),
    "10,000-character question": (csv_bytes([["A1", "가" * 10_000, "답"]]), "column Question: 10000 characters"),
    "gigantic question": (csv_bytes([["A1", "가" * 25_000, "답"]]), "column Question: 25000 characters"),
    "empty question": (csv_bytes([["A1", "  ", "답"]]), "column Question: empty question"),
    "empty subjective answer": (csv_bytes([["A1", "설명하시오.", " "]]), "column Answer: empty answer"),
    "answer with a control character": (csv_bytes([[f"C{i}", MC5, "1"] for i in range(8)]
                                                  + [[f"A{i}", "설명하시오.", "답\x07이다"] for i in range(2)]),
                                        "control characters U+0007"),
    "one row, held out for eval": (csv_bytes(GOOD[:1]), "no rows left to train on after holding out 1 for eval"),
}
BAD_EVAL_CSV = {
    **{k: UNREADABLE[k] for k in ("empty file", "header only", "non-UTF-8 (cp949)", "embedded NUL")},
    "MC answer 6": (csv_bytes([["E1", MC5, "6"]]), "got '6'"),
    "an ID that is also a training row": (csv_bytes([["S001", MC5, "1"]]),
                                          "column ID: ID 'S001' is also row 1 of"),
}
BAD_TEST_CSV = {
    **{k: UNREADABLE[k] for k in ("empty file", "non-UTF-8 (cp949)", "embedded NUL")},
    "header only": (b"ID,Question\n", "no data rows after the header"),
    "missing Question column": (csv_bytes([["A1"]], ("ID",)), "missing column Question"),
    "duplicate IDs": (csv_bytes([["A1", MC5], ["A1", MC4]], ("ID", "Question")), "duplicate ID 'A1'"),
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


@pytest.fixture
def no_model_load(monkeypatch):
    """Training cases: reaching the model load is itself a failure."""
    import engine.loop

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was found")
    monkeypatch.setattr(engine.loop, "load_base_model", refuse)


def snapshot(path: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


def train_fails(argv, capsys, *needles, untouched: Path = None):
    import train
    before = snapshot(untouched) if untouched else None
    code, err = call(train.main, ["train.py", *argv], capsys)
    assert code == 2, err
    assert_one_line(err, *needles)
    if untouched:
        assert snapshot(untouched) == before


CSV_CASES = [("data.train", c) for c in BAD_CSV] + [("data.eval", c) for c in BAD_EVAL_CSV]


@pytest.mark.parametrize("key, case", CSV_CASES, ids=[f"{k}: {c}" for k, c in CSV_CASES])
def test_bad_training_or_eval_csv(key, case, tiny_model, tmp_path, capsys, no_model_load):
    content, message = (BAD_CSV if key == "data.train" else BAD_EVAL_CSV)[case]
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    out = tmp_path / "run"
    train_fails([TINY_RECIPE, *tiny_overrides(tiny_model, out), f"{key}={bad}"], capsys, str(bad), message)
    assert not out.exists()


def write(tmp_path: Path, name: str, text: str) -> Path:
    (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path / name


TINY = "extends: {root}/tests/data/tiny.yaml\n"
BAD_RECIPES = {
    "unknown key": (TINY + "train:\n  warmup: 0.1\n", [], "unknown key train.warmup (did you mean train.warmup_ratio?)"),
    "typo in override": (TINY, ["train.lrr=1"], "unknown key train.lrr (did you mean train.lr?)"),
    "wrong type": (TINY + "train:\n  micro_batch: four\n", [], "train.micro_batch must be an integer, got 'four'"),
    "negative lr": (TINY, ["train.lr=-1e-4"], "train.lr must not be negative"),
    "zero epochs": (TINY + "train:\n  epochs: 0\n", [], "train.epochs must be greater than 0"),
    "zero micro-batch": (TINY, ["train.micro_batch=0"], "train.micro_batch must be greater than 0"),
    "zero LoRA rank": (TINY, ["lora.r=0"], "lora.r must be greater than 0"),
    "missing extends target": ("extends: nowhere.yaml\n", [], "extends: file not found"),
    "a recipe that extends itself": ("extends: r.yaml\n", [], "circular extends"),
    "two recipes extending each other": ("extends: other.yaml\n", [], "circular extends"),
    "override of a non-existent key": (TINY, ["model.size=7b"], "unknown key model.size"),
    "override of a section": (TINY, ["train=1"], "train is a section; set one of its keys"),
    "override without a value": (TINY, ["train.lr"], "override 'train.lr' must look like section.key=value"),
    "not YAML": ("train: [1,\n", [], "not valid YAML"),
    "a list, not a mapping": ("- 1\n- 2\n", [], "r.yaml"),
    "bad choice": (TINY, ["train.scheduler=step"], "train.scheduler must be one of"),
    "bad answer-text policy": (TINY, ["data.answer_text_mismatch=ignore"],
                               "data.answer_text_mismatch must be one of error, warn, got 'ignore'"),
    "curriculum phase with no rows": (TINY + "train:\n  sampler:\n    phases:\n      - {{kinds: subj, epochs: 1}}\n",
                                      [f"data.train={ROOT}/tests/data/mc_only.csv"],
                                      "train.sampler.phases: phase 1 (kinds: subj) has no subj examples"),
}


@pytest.mark.parametrize("case", list(BAD_RECIPES), ids=list(BAD_RECIPES))
def test_bad_recipe(case, tiny_model, tmp_path, capsys, no_model_load):
    text, overrides, message = BAD_RECIPES[case]
    recipe = write(tmp_path, "r.yaml", text.format(root=ROOT))
    write(tmp_path, "other.yaml", "extends: r.yaml\n")
    train_fails([str(recipe), f"model.path={tiny_model}", "model.build_tiny=false", f"output_dir={tmp_path / 'run'}",
                 *overrides], capsys,
                message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: recipe"),
    ([TINY_RECIPE, "--resume"], "unrecognized arguments: --resume"),
    (["nope.yaml"], "recipe: file not found: "),
], ids=["no recipe", "unknown flag", "missing recipe file"])
def test_bad_train_command_lines(argv, message, capsys, no_model_load):
    train_fails(argv, capsys, message)


def test_missing_eval_file(tiny_model, tmp_path, capsys, no_model_load):
    train_fails([TINY_RECIPE, *tiny_overrides(tiny_model, tmp_path / "run"), f"data.eval={tmp_path / 'e.csv'}"],
                capsys, "data.eval", "e.csv: file not found")
    assert not (tmp_path / "run").exists()


# --- run directories -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out, "train.max_steps=12",
                                                                   "eval.every_steps=6", "checkpoint.at_steps=[6]"))
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def damage(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(max(1, path.stat().st_size // 2))


RUN_DIR_CASES = ["made by another recipe", "training data edited in place", "eval data edited in place",
                 "every checkpoint damaged", "a checkpoint without its manifest, the other damaged",
                 "output_dir is a file"]


@pytest.mark.parametrize("case", RUN_DIR_CASES)
def test_bad_run_directory(case, finished_run, tiny_model, tmp_path, capsys, no_model_load):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    data = tmp_path / "train.csv"
    shutil.copy(SAMPLE, data)
    args = [TINY_RECIPE, f"model.path={tiny_model}", f"data.train={SAMPLE}", f"output_dir={out}",
            "model.build_tiny=false",
            "train.max_steps=12", "eval.every_steps=6", "checkpoint.at_steps=[6]"]
    ckpts = out / "checkpoints"
    if case == "made by another recipe":
        args.append("train.lr=0.1")
        message = "this run was made with train.lr=0.005, now 0.1; resume with the same recipe, or set train.resume=false"
    elif case == "training data edited in place":
        (out / "data.json").write_text((out / "data.json").read_text().replace(str(SAMPLE), str(data)))
        (out / "recipe.yaml").write_text((out / "recipe.yaml").read_text().replace(str(SAMPLE), str(data)))
        args[2] = f"data.train={data}"
        data.write_bytes(data.read_bytes().replace("OTP".encode(), "OTP ".encode(), 1))
        message = f"data.train: {data} is not the data this run started with (then sha256 "
    elif case == "eval data edited in place":
        eval_csv = tmp_path / "eval.csv"
        eval_csv.write_bytes(csv_bytes([["E1", MC5, "1"]]))
        args.append(f"data.eval={eval_csv}")
        message = "data.eval: " + str(eval_csv) + " is not the data this run started with (then none, now sha256"
        (out / "recipe.yaml").write_text((out / "recipe.yaml").read_text().replace("eval: null", f"eval: {eval_csv}"))
    elif case == "every checkpoint damaged":
        damage(ckpts / "step-12" / "state.pt")
        damage(ckpts / "step-6" / "adapter_model.safetensors")
        message = f"{ckpts}: no usable checkpoint (step-12: state.pt is "
    elif case == "a checkpoint without its manifest, the other damaged":
        (ckpts / "step-12" / "manifest.json").unlink()
        (ckpts / "step-6" / "state.pt").write_bytes(b"not a pickle")
        message = "step-12: no manifest.json"
    else:
        shutil.rmtree(out)
        out.write_text("x")
        message = f"output_dir: {out} is a file"
    train_fails(args, capsys, message, untouched=out if out.is_dir() else None)


# --- infer.py and metrics ------------------------------------------------------------------------------

INFER_CASES = ["missing test file", "test file without ID", "missing model dir", "missing out directory",
               "adapter without config", "adapter and no-adapter together", "recipe and model together",
               "no test file given", "batch size 0", "recipe without a checkpoint", "recipe with a damaged best",
               "damaged adapter"] + [f"test CSV: {k}" for k in BAD_TEST_CSV]


@pytest.mark.parametrize("case", INFER_CASES)
def test_bad_infer_command_lines(case, tiny_model, finished_run, tmp_path, capsys):
    import infer
    out = tmp_path / "sub.csv"
    out.write_text("ID,Answer\nkeep,1\n", encoding="utf-8")
    test = str(SAMPLE.with_name("sample_test.csv"))
    no_id = tmp_path / "noid.csv"
    no_id.write_bytes(csv_bytes([[MC5]], ("Question",)))
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    recipe = write(tmp_path, "r.yaml", f"extends: {ROOT / TINY_RECIPE}\nmodel:\n  path: {tiny_model}\n"
                                       f"output_dir: {run}\n")
    model = ["--model", str(tiny_model)]
    needles = []
    if case.startswith("test CSV: "):
        content, message = BAD_TEST_CSV[case[len("test CSV: "):]]
        (tmp_path / "test.csv").write_bytes(content)
        argv, needles = ["--test", str(tmp_path / "test.csv"), *model], [str(tmp_path / "test.csv"), message]
    else:
        if case == "recipe without a checkpoint":
            shutil.rmtree(run / "checkpoints")
            needles = [f"no checkpoint under {run}: train first, pass --adapter DIR, or --no-adapter for the base model"]
        if case in ("recipe with a damaged best", "damaged adapter"):
            damage(run / "checkpoints" / "best" / "adapter_model.safetensors")
            needles = ["best is damaged (adapter_model.safetensors is "]
        argv, more = {
            "missing test file": (["--test", str(tmp_path / "none.csv"), *model], ["none.csv: file not found"]),
            "test file without ID": (["--test", str(no_id), *model], ["missing column ID"]),
            "missing model dir": (["--test", test, "--model", str(tmp_path / "m")], ["is not a model directory"]),
            "missing out directory": (["--test", test, *model], ["does not exist"]),
            "adapter without config": (["--test", test, *model, "--adapter", str(tmp_path)], ["no adapter_config.json"]),
            "adapter and no-adapter together": (["--test", test, *model, "--adapter", str(tmp_path), "--no-adapter"],
                                                ["not allowed with argument --adapter"]),
            "recipe and model together": (["--test", test, *model, "--recipe", str(recipe)], ["not allowed with"]),
            "no test file given": (model, ["the following arguments are required: --test"]),
            "batch size 0": (["--test", test, *model, "--batch-size", "0"], ["--batch-size must be greater than 0"]),
            "recipe without a checkpoint": (["--test", test, "--recipe", str(recipe)], []),
            "recipe with a damaged best": (["--test", test, "--recipe", str(recipe)],
                                           [f"pass --adapter {run}/checkpoints/step-12, or --no-adapter"]),
            "damaged adapter": (["--test", test, *model, "--adapter", str(run / "checkpoints" / "best")],
                                ["--adapter: "]),
        }[case]
        needles += more
    target = tmp_path / "no-dir" / "sub.csv" if case == "missing out directory" else out
    code, err = call(infer.main, ["infer.py", *argv] + (["--out", str(target)] if case != "no test file given" else
                                                         ["--out", str(target)]), capsys)
    assert code == 2, err
    assert_one_line(err, *needles)
    assert out.read_text(encoding="utf-8") == "ID,Answer\nkeep,1\n"
    assert not Path(str(out) + ".partial.jsonl").exists()


@pytest.mark.parametrize("case", ["missing gold file", "prediction missing an ID", "duplicate prediction IDs",
                                  "no --pred"])
def test_bad_metrics_command_lines(case, tmp_path, capsys):
    from metrics.__main__ import main
    gold = tmp_path / "g.csv"
    gold.write_bytes(csv_bytes(GOOD))
    pred = write(tmp_path, "p.csv", {"missing gold file": "ID,Answer\nA1,1\n", "prediction missing an ID": "ID,Answer\nA1,3\n",
                                     "duplicate prediction IDs": "ID,Answer\nA1,3\nA1,3\nA2,x\n", "no --pred": ""}[case])
    argv = {"missing gold file": ["--pred", str(pred), "--gold", str(tmp_path / "none.csv")],
            "no --pred": ["--gold", str(gold)]}.get(case, ["--pred", str(pred), "--gold", str(gold)])
    message = {"missing gold file": "none.csv: file not found", "prediction missing an ID": "missing IDs A2",
               "duplicate prediction IDs": "duplicate IDs: A1", "no --pred": "required: --pred"}[case]
    code, err = call(main, ["metrics", "score", *argv], capsys)
    assert code == 2
    assert_one_line(err, message)


def test_the_table_has_at_least_60_cases():
    n = (len(BAD_CSV) + len(BAD_EVAL_CSV) + len(BAD_RECIPES) + 3 + 1 + len(RUN_DIR_CASES) + len(INFER_CASES) + 4)
    assert n >= 60, n
