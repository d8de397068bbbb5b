"""infer.py on real FSKU questions with the tiny model: valid answers, resumable, atomic, refuses bad input."""
import csv
import json
import signal
import time
from pathlib import Path

import pytest

from conftest import SAMPLE, assert_no_library_warnings, run_cli, start_cli
from engine.data import read_examples


@pytest.fixture(scope="module")
def test_csv(fsku_dev, tmp_path_factory) -> Path:
    """FSKU dev as a contest test file: ID + Question only."""
    path = tmp_path_factory.mktemp("test") / "test.csv"
    with open(fsku_dev, encoding="utf-8") as f, open(path, "w", newline="", encoding="utf-8") as g:
        w = csv.writer(g)
        w.writerow(["ID", "Question"])
        for i, row in enumerate(csv.DictReader(f)):
            w.writerow([f"TEST_{i:03d}", row["Question"]])
    return path


def infer_args(tiny_model, test_csv, out, *extra):
    return ["infer.py", "--test", str(test_csv), "--out", str(out), "--model", str(tiny_model),
            "--max-new-tokens", "24", *extra]


@pytest.fixture(scope="module")
def clean_output(tiny_model, test_csv, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "submission.csv"
    res = run_cli(*infer_args(tiny_model, test_csv, out, "--batch-size", "4"), fresh=True)  # imports and all
    assert res.returncode == 0, res.stderr[-3000:]
    assert "after model load" in res.stderr
    assert_no_library_warnings(res.stderr)
    summary = json.loads(res.stdout)  # stdout is one JSON line; people's messages go to stderr
    assert summary["questions"] == summary["mc"] + summary["subj"] > 0 and summary["after_load_s"] > 0
    return out


def test_every_answer_is_valid(clean_output, test_csv):
    examples = read_examples(test_csv, require_answer=False)
    with open(clean_output, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["ID"] for r in rows] == [e.id for e in examples]
    for ex, row in zip(examples, rows):
        if ex.kind == "mc":
            assert row["Answer"] in {str(d) for d in range(1, ex.n_options + 1)}, row
        else:
            assert row["Answer"].strip() and len(row["Answer"]) <= 300
    assert not Path(str(clean_output) + ".partial.jsonl").exists()


def test_killed_halfway_then_rerun_gives_the_same_bytes(clean_output, tiny_model, test_csv, tmp_path):
    out = tmp_path / "submission.csv"
    partial = Path(str(out) + ".partial.jsonl")
    proc = start_cli(*infer_args(tiny_model, test_csv, out, "--batch-size", "4"))
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if partial.exists() and len(partial.read_text(encoding="utf-8").splitlines()) >= 8:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "infer.py finished before it could be killed"
    assert not out.exists()
    res = run_cli(*infer_args(tiny_model, test_csv, out, "--batch-size", "4"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming:" in res.stderr
    assert out.read_bytes() == clean_output.read_bytes()


def test_a_torn_partial_line_is_dropped(clean_output, tiny_model, test_csv, tmp_path):
    out = tmp_path / "submission.csv"
    args = infer_args(tiny_model, test_csv, out, "--batch-size", "4")
    res = run_cli(*args)
    assert res.returncode == 0
    good = out.read_bytes()
    out.unlink()
    partial = Path(str(out) + ".partial.jsonl")
    # kill a run after its first records, then tear its last line as a kill mid-write would
    proc = start_cli(*args)
    while proc.poll() is None and not (partial.exists() and len(partial.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if out.exists():
        pytest.skip("run finished before the kill")
    head = partial.read_text(encoding="utf-8").splitlines()[:3]
    partial.write_text("\n".join(head) + '\n{"answers": {"TEST_0', encoding="utf-8")
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.read_bytes() == good


def test_existing_output_is_never_half_overwritten(tiny_model, test_csv, tmp_path):
    out = tmp_path / "submission.csv"
    out.write_text("ID,Answer\nold,1\n", encoding="utf-8")
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,Question\n1,\n", encoding="utf-8")
    res = run_cli(*infer_args(tiny_model, bad, out))
    assert res.returncode == 2 and "column Question: empty question" in res.stderr
    assert out.read_text(encoding="utf-8") == "ID,Answer\nold,1\n"


@pytest.mark.parametrize("make, message", [
    (lambda t, m: ["--test", str(t / "none.csv"), "--out", str(t / "o.csv"), "--model", str(m)], "file not found"),
    (lambda t, m: ["--test", str(SAMPLE), "--out", str(t / "no" / "o.csv"), "--model", str(m)],
     "does not exist"),
    (lambda t, m: ["--test", str(SAMPLE), "--out", str(t / "o.csv"), "--model", str(t)], "not a model directory"),
    (lambda t, m: ["--test", str(SAMPLE), "--out", str(t / "o.csv"), "--model", str(m), "--adapter", str(t)],
     "has no adapter_config.json"),
])
def test_bad_command_lines_exit_2(tiny_model, tmp_path, make, message):
    res = run_cli("infer.py", *make(tmp_path, tiny_model))
    assert res.returncode == 2 and message in res.stderr, res.stderr[-1000:]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "o.csv").exists()


def save_fresh_adapter(base_dir: Path, out: Path, b_std: float = 0.0) -> Path:
    """A LoRA adapter for `base_dir`; with `b_std` > 0 its B matrices are random, so it changes the model."""
    import torch
    from engine.config import LoraConfig, ModelConfig
    from engine.model import add_lora, load_base_model
    torch.manual_seed(0)
    model = add_lora(load_base_model(ModelConfig(path=str(base_dir), quant="none")), LoraConfig(r=4, alpha=8), False)
    for name, p in model.named_parameters():
        if "lora_B" in name and b_std:
            torch.nn.init.normal_(p, std=b_std)
    model.save_pretrained(str(out))
    return out


def test_merged_adapter_gives_the_same_answers_as_the_lora_branches(tiny_model, tmp_path):
    """The default merges the adapter into the (dequantized) base for speed; --no-merge runs it as trained."""
    adapter = save_fresh_adapter(tiny_model, tmp_path / "adapter", b_std=0.05)
    test = SAMPLE.with_name("sample_test.csv")
    outs = {}
    for flag in ("", "--no-merge"):
        out = tmp_path / f"s{flag}.csv"
        res = run_cli("infer.py", "--test", str(test), "--out", str(out), "--model", str(tiny_model),
                      "--adapter", str(adapter), "--max-new-tokens", "16", *([flag] if flag else []))
        assert res.returncode == 0, res.stderr[-2000:]
        assert f"adapter {adapter}" in res.stderr and ("4-bit + LoRA" in res.stderr) == bool(flag)
        outs[flag] = out.read_text(encoding="utf-8")
    base = tmp_path / "base.csv"
    assert run_cli("infer.py", "--test", str(test), "--out", str(base), "--model", str(tiny_model),
                   "--max-new-tokens", "16").returncode == 0
    assert outs[""] == outs["--no-merge"]
    assert outs[""] != base.read_text(encoding="utf-8")  # the adapter does change answers


def test_an_adapter_from_another_base_model_is_refused(tiny_model, test_csv, tmp_path):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    other = tmp_path / "other"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(str(other))
    adapter = save_fresh_adapter(other, tmp_path / "adapter")
    res = run_cli(*infer_args(tiny_model, test_csv, tmp_path / "s.csv", "--adapter", str(adapter)))
    assert res.returncode == 2 and "does not fit this base model" in res.stderr, res.stderr[-2000:]
    assert len(res.stderr.strip().splitlines()[-1:]) == 1 and "Traceback" not in res.stderr
    assert not (tmp_path / "s.csv").exists()
