"""Faults survived, bad input refused, nothing lost. Faults are real (SIGKILL, raised errors) and placed at
exact moments through FSKU_FAULT (engine/faults.py)."""
import csv
import json
import os
import re
from pathlib import Path

import pytest

from conftest import ROOT, SAMPLE, TINY_RECIPE, events, run_cli, tiny_overrides

CKPT_EVERY = "checkpoint.every_steps=10"


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out, CKPT_EVERY))
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def run_with_fault(tiny_model, out: Path, spec: str, *extra: str):
    env_before = os.environ.get("FSKU_FAULT")
    os.environ["FSKU_FAULT"] = spec
    try:
        return run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out, CKPT_EVERY, *extra))
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
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out, CKPT_EVERY))
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
    assert re.match(r"error: step 3: CUDA out of memory at \d+ rows x \d+ tokens a forward; ", last), last
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
    from engine.checkpoint import newest_verified
    assert newest_verified(out / "checkpoints") == out / "checkpoints" / "step-15"


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


def test_damaged_newest_checkpoint_is_skipped_and_the_older_one_resumed(reference, tiny_model, tmp_path):
    out = tmp_path / "run"
    assert run_with_fault(tiny_model, out, "kill-step@25").returncode == -9
    from engine.checkpoint import step_dirs, verify
    steps = [step for step, path in step_dirs(out / "checkpoints") if verify(path) is None]
    assert steps[-1] == 20, steps
    state = out / "checkpoints" / "step-20" / "state.pt"
    with open(state, "r+b") as f:  # what a full disk or a half-finished copy leaves
        f.truncate(state.stat().st_size // 3)
    damaged_size = state.stat().st_size
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out, CKPT_EVERY))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"skipping checkpoint step-20: state.pt is {damaged_size} bytes, the manifest says" in res.stderr
    assert f"step-{steps[-2]} (step {steps[-2]} of" in res.stderr  # the newest one that verifies
    assert_same_run(reference, out)


def test_damaged_best_is_reported_and_infer_refuses_it(reference, tiny_model, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    best = out / "checkpoints" / "best"
    (best / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out, CKPT_EVERY))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{best} is damaged (adapter_model.safetensors is 10 bytes" in res.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {ROOT / TINY_RECIPE}\nmodel:\n  path: {tiny_model}\n"
                      f"output_dir: {out}\n", encoding="utf-8")
    res = run_cli("infer.py", "--recipe", str(recipe), "--test", str(SAMPLE.with_name("sample_test.csv")),
                  "--out", str(tmp_path / "sub.csv"))
    assert res.returncode == 2 and res.stderr.strip().startswith(f"error: {best} is damaged")
    assert not (tmp_path / "sub.csv").exists()


def test_infer_names_its_adapter_first_and_takes_the_base_model_only_when_asked(reference, tiny_model, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {ROOT / TINY_RECIPE}\nmodel:\n  path: {tiny_model}\n"
                      f"output_dir: {reference}\n", encoding="utf-8")
    test = str(SAMPLE.with_name("sample_test.csv"))
    best_step = json.loads((reference / "checkpoints" / "best" / "best.json").read_text())["step"]
    res = run_cli("infer.py", "--recipe", str(recipe), "--test", test, "--out", str(tmp_path / "a.csv"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.splitlines()[0] == f"adapter: {reference}/checkpoints/best (step {best_step})"
    res = run_cli("infer.py", "--recipe", str(recipe), "--no-adapter", "--test", test, "--out", str(tmp_path / "b.csv"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stderr.splitlines()[0] == f"adapter: none, the base model {tiny_model} alone"
    assert (tmp_path / "b.csv").read_text() != (tmp_path / "a.csv").read_text()


def test_atomic_write_dir_keeps_the_old_directory_when_the_last_rename_fails(tmp_path, monkeypatch):
    """The old directory is moved aside before the new one takes its name; if that rename fails, the old
    one is put back and the error raised."""
    import os

    from engine.files import atomic_write_dir
    final = tmp_path / "ckpt"
    atomic_write_dir(final, lambda d: (d / "a.txt").write_text("old"))
    real_replace, calls = os.replace, []

    def failing_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old -> aside worked; new -> final fails
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second)
    with pytest.raises(OSError):
        atomic_write_dir(final, lambda d: (d / "a.txt").write_text("new"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert (final / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
