"""The tiny recipe end to end, as a user runs it: `python train.py recipes/tiny.yaml ...`."""
import json
import signal
import time
from pathlib import Path

import pytest

from conftest import (SAMPLE, TINY_RECIPE, assert_no_library_warnings, events, run_cli, start_cli,
                      tiny_overrides)

EVAL_FIELDS = {"eval_loss", "mc_accuracy", "subj_cos", "subj_kw", "subj_score", "final_score",
               "mc_format_violation_rate", "subj_len_violation_rate", "subj_format_violation_rate",
               "subj_cos_floor", "embedder"}


@pytest.fixture(scope="module")
def full_run(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out), fresh=True)  # imports and all
    assert res.returncode == 0, res.stderr[-3000:]
    assert "trainable parameters:" in res.stdout and "done:" in res.stdout
    assert "learned: mc_accuracy " in res.stdout and "(eval at step 20 -> the best, step " in res.stdout
    assert_no_library_warnings(res.stderr)
    return out


def test_tiny_run_learns_and_writes_its_directory(full_run):
    train = events(full_run, "train")
    q = len(train) // 4
    first, last = sum(e["loss"] for e in train[:q]) / q, sum(e["loss"] for e in train[-q:]) / q
    assert last <= 0.8 * first, (first, last)
    assert [e["step"] for e in train] == list(range(1, len(train) + 1))
    for e in train:
        assert {"step", "epoch", "loss", "lr", "tokens_per_s", "peak_mem_gib"} <= set(e)
    assert (full_run / "recipe.yaml").is_file() and (full_run / "eval_ids.json").is_file()
    steps = sorted(int(p.name.split("-")[1]) for p in (full_run / "checkpoints").glob("step-*"))
    assert steps[0] == 15 and steps[-1] == len(train)
    for s in steps:
        ck = full_run / "checkpoints" / f"step-{s}"
        assert {"adapter_model.safetensors", "adapter_config.json", "state.pt"} <= {p.name for p in ck.iterdir()}
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["steps"] == len(train) and summary["stop_reason"] == "epochs"
    curves = (full_run / "curves.png").read_bytes()
    assert curves[:8] == b"\x89PNG\r\n\x1a\n" and len(curves) > 20_000


def test_eval_events_carry_every_metric_and_predictions(full_run):
    evals = events(full_run, "eval")
    assert [e["step"] for e in evals] == [20, 40, events(full_run, "train")[-1]["step"]]
    for e in evals:
        assert EVAL_FIELDS <= set(e)
        assert 0 <= e["final_score"] <= 1
        rows = (full_run / "eval" / f"step-{e['step']}.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(rows) == len(json.loads((full_run / "eval_ids.json").read_text()))
    best = json.loads((full_run / "checkpoints" / "best" / "best.json").read_text())
    assert best["final_score"] == max(e["final_score"] for e in evals)
    assert (full_run / "checkpoints" / "best" / "adapter_model.safetensors").is_file()


def test_adapter_loads_with_peft(full_run, tiny_model):
    from peft import PeftModel
    from engine.config import ModelConfig
    from engine.model import load_base_model
    model = PeftModel.from_pretrained(load_base_model(ModelConfig(path=str(tiny_model), quant="none")),
                                      str(full_run / "checkpoints" / "best"))
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_kill_after_first_checkpoint_then_resume_gives_the_same_losses(full_run, tiny_model, tmp_path):
    out = tmp_path / "killed"
    proc = start_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out))
    first = out / "checkpoints" / "step-15"
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = len(events(out, "train"))
    assert 15 <= killed_at < len(events(full_run, "train"))

    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr
    a, b = events(full_run, "train"), events(out, "train")
    assert [e["step"] for e in b] == [e["step"] for e in a]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["step"], x["loss"], y["loss"])
        assert x["lr"] == y["lr"]
    for x, y in zip(events(full_run, "eval"), events(out, "eval")):
        assert abs(x["eval_loss"] - y["eval_loss"]) < 1e-5 and x["final_score"] == pytest.approx(y["final_score"])


def test_evaluation_does_not_disturb_training(full_run, tiny_model, tmp_path):
    out = tmp_path / "noeval"
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out, "eval.every_steps=0"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert [e["step"] for e in events(out, "eval")] == [events(out, "train")[-1]["step"]]
    assert len(events(out, "train")) == len(events(full_run, "train"))
    for x, y in zip(events(full_run, "train"), events(out, "train")):
        assert abs(x["loss"] - y["loss"]) < 1e-5


def test_early_stopping(tiny_model, tmp_path):
    out = tmp_path / "early"
    # lr 0: the score never improves after the first eval, so patience 2 stops at the third
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(
        tiny_model, out, "train.lr=1e-12", "eval.every_steps=5", "eval.patience=2", "train.warmup_ratio=0"))
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stop" and summary["steps"] == 15
    assert [e["step"] for e in events(out, "eval")] == [5, 10, 15]
    assert summary["best_step"] == 5


def test_typo_in_override_exits_2_naming_the_key(tiny_model, tmp_path):
    res = run_cli("train.py", TINY_RECIPE, "train.lrr=1")
    assert res.returncode == 2
    assert res.stderr.strip() == "error: command line: unknown key train.lrr (did you mean train.lr?)"


@pytest.mark.parametrize("override, message", [
    ("data.train=/nonexistent.csv", "/nonexistent.csv: file not found"),
    ("model.path=/nonexistent-model", "model.path: /nonexistent-model is not a model directory"),
])
def test_bad_paths_exit_2_in_one_line(tiny_model, tmp_path, override, message):
    args = [a for a in tiny_overrides(tiny_model, tmp_path / "r") if not a.startswith(override.split("=")[0])]
    res = run_cli("train.py", TINY_RECIPE, *args, override)
    assert res.returncode == 2 and message in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_resuming_with_another_recipe_is_refused(full_run, tiny_model):
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, full_run, "train.lr=1e-3"))
    assert res.returncode == 2 and "train.lr" in res.stderr


def test_resume_false_starts_a_fresh_directory(full_run, tiny_model):
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, full_run, "train.resume=false",
                                                                   "train.max_steps=2", "eval.generate=false"))
    assert res.returncode == 0, res.stderr[-2000:]
    fresh = Path(f"{full_run}-1")
    assert len(events(fresh, "train")) == 2


def test_rows_cut_to_max_len_are_counted_and_said(tiny_model, tmp_path):
    out = tmp_path / "run"
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out), "data.max_len=48",
                  "train.max_steps=2", "eval.generate=false")
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((out / "summary.json").read_text(encoding="utf-8"))["data"]
    n_eval = len(json.loads((out / "eval_ids.json").read_text()))
    assert data["max_len"] == 48 and 0 < data["truncated_train"] and 0 < data["truncated_eval"] <= n_eval
    line = [ln for ln in res.stderr.splitlines() if "cut to data.max_len=48" in ln]
    assert line and f"{data['truncated_train']} of " in line[0] and f"{data['truncated_eval']} of {n_eval} eval" in line[0]


def test_nothing_cut_nothing_said(full_run):
    assert "cut to data.max_len" not in (full_run / "train.log").read_text(encoding="utf-8")
    data = json.loads((full_run / "summary.json").read_text())["data"]
    assert (data["truncated_train"], data["truncated_eval"], data["answer_text_mismatches"]) == (0, 0, [])


def test_the_tiny_model_is_never_reused_for_other_data(tiny_model, tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("ID,Question,Answer\nA1,다른 데이터의 질문을 설명하시오.,다른 답입니다.\n" * 1, encoding="utf-8")
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, tmp_path / "run"), f"data.train={other}",
                  "model.build_tiny=true")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
    assert f"model.path: {tiny_model} is a tiny model built from {SAMPLE}" in res.stderr
    assert f"not from {other}" in res.stderr and f"model.path={tiny_model}-other" in res.stderr
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}", encoding="utf-8")
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(legacy, tmp_path / "run2"), "model.build_tiny=true")
    assert res.returncode == 2 and "without a record of its data (tiny_source.json)" in res.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


def test_library_notices_are_filtered_by_message_and_module_only():
    import logging
    import warnings

    from engine.quiet import quiet_library_noise

    quiet_library_noise()
    quiet_library_noise()  # twice is once
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert len(logger.filters) == 1
    keep = logging.LogRecord(logger.name, logging.WARNING, "", 0, "another problem", None, None)
    drop = logging.LogRecord(logger.name, logging.WARNING, "", 0,
                             "Failed to load CPU gemm_4bit_forward from kernels-community: %s", ("x",), None)
    assert logger.filters[0].filter(keep) and not logger.filters[0].filter(drop)
    with warnings.catch_warnings(record=True) as seen:
        quiet_library_noise()
        warnings.simplefilter("default")
        quiet_library_noise()
        for module in ("transformers.modeling_utils", "ours"):
            warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.",
                                   FutureWarning, "x.py", 1, module=module)
    assert [str(w.message)[:26] for w in seen] == ["`is_gradient_checkpointing"]  # only the one from "ours"
