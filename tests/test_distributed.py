"""Data parallelism on CPU through gloo: `torchrun --nproc_per_node=2 train.py recipes/tiny.yaml`."""
import os
from pathlib import Path

import pytest

from conftest import TINY_RECIPE, events, run_cli, tiny_overrides

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
SHORT = ("train.max_steps=30", "eval.every_steps=15")  # past the recipe's checkpoint at step 15


def torchrun(tiny_model, out: Path, *extra: str, fault: str = ""):
    env_before = os.environ.pop("FSKU_FAULT", None)
    if fault:
        os.environ["FSKU_FAULT"] = fault
    try:
        return run_cli(*TORCHRUN, "train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out, *SHORT, *extra))
    finally:
        os.environ.pop("FSKU_FAULT", None)
        if env_before is not None:
            os.environ["FSKU_FAULT"] = env_before


@pytest.fixture(scope="module")
def two_ranks(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    res = torchrun(tiny_model, out)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_two_ranks_match_one_process_with_the_same_effective_batch(tiny_model, tmp_path):
    # dropout off: with it, each rank draws its own masks and the runs differ by design
    one, two = tmp_path / "one", tmp_path / "two"
    res = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, one, *SHORT, "lora.dropout=0"))
    assert res.returncode == 0, res.stderr[-2000:]
    res = torchrun(tiny_model, two, "lora.dropout=0")
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = events(one, "train"), events(two, "train")
    assert [e["step"] for e in a] == [e["step"] for e in b]  # the step count is the recipe's, whatever N
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x["step"], x["loss"], y["loss"])
    for x, y in zip(events(one, "eval"), events(two, "eval")):
        assert x["final_score"] == pytest.approx(y["final_score"], abs=1e-4)


def test_only_rank_0_writes(two_ranks):
    assert sorted(p.name for p in two_ranks.parent.iterdir()) == ["run"]
    lines = (two_ranks / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    steps = [e["step"] for e in events(two_ranks, "train")]
    assert steps == sorted(set(steps))  # one writer: no step logged twice
    assert len(lines) == len(steps) + len(events(two_ranks, "eval"))
    assert "2 rank(s)" in (two_ranks / "train.log").read_text(encoding="utf-8")


def test_two_ranks_resume_after_a_kill(two_ranks, tiny_model, tmp_path):
    out = tmp_path / "run"
    res = torchrun(tiny_model, out, fault="kill-step@25")
    assert res.returncode != 0
    res = torchrun(tiny_model, out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr
    a, b = events(two_ranks, "train"), events(out, "train")
    assert [e["step"] for e in a] == [e["step"] for e in b]
    for x, y in zip(a, b):  # each rank's dropout stream is restored too
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["step"], x["loss"], y["loss"])
