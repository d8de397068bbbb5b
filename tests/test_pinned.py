"""The tests' tiny recipe's first ten training losses, pinned (fp32, CPU, the test-size tiny model built from
tests/data/sample.csv with seed 0), as torchtune pins its recipes' losses: a change to the data, the labels,
the sampler, the schedule, the loss or the model's construction moves them. Update them only for a change meant to move them, and say so
in its commit. A run killed after step 7 and resumed from its step-5 checkpoint logs the same ten.

Written against PyTorch 2.13 (CPU) and transformers 5.24; the same on 1 and 2 threads."""
import os

from conftest import ROOT, TINY_RECIPE, events, run_cli, tiny_overrides

PINNED = [2.7476695, 3.9211192, 2.8350351, 2.4598329, 2.3288281, 2.2652719, 2.1638923, 1.7605081, 1.8531336, 2.3110406]
SHORT = ("train.max_steps=10", "eval.every_steps=0", "checkpoint.at_steps=[5]")


def losses(run_dir) -> list[float]:
    return [e["loss"] for e in events(run_dir, "train")]


def assert_pinned(got: list[float]) -> None:
    assert len(got) == len(PINNED)
    assert max(abs(a - b) for a, b in zip(got, PINNED)) < 1e-5, got


def test_the_tiny_recipes_first_ten_losses_are_pinned(tiny_model, tmp_path):
    r = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, tmp_path / "run", *SHORT))
    assert r.returncode == 0, r.stderr[-2000:]
    assert_pinned(losses(tmp_path / "run"))


def test_a_killed_and_resumed_run_logs_the_pinned_losses(tiny_model, tmp_path):
    out = tmp_path / "run"
    os.environ["FSKU_FAULT"] = "kill-step@7"
    try:
        killed = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out, *SHORT))
    finally:
        del os.environ["FSKU_FAULT"]
    assert killed.returncode == -9
    assert len(losses(out)) == 6
    resumed = run_cli("train.py", TINY_RECIPE, *tiny_overrides(tiny_model, out, *SHORT))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr + resumed.stdout
    assert_pinned(losses(out))


def test_the_lifecycle_parts_run_one_at_a_time_in_process(tiny_model, tmp_path):
    """engine.loop's parts, called as a test or a notebook would: setup alone, then steps that log the pinned
    losses, a checkpoint, an eval and the cleanup, each leaving what its contract says."""
    from engine.checkpoint import verify
    from engine.config import load_recipe
    from engine.loop import cleanup, evaluate, save_checkpoint, setup, train_step
    overrides = tiny_overrides(tiny_model, tmp_path / "run", *SHORT)
    s = setup(load_recipe(ROOT / TINY_RECIPE, overrides), overrides)
    assert (s.step, s.total_steps) == (0, 10) and s.plan.line().startswith("speed plan (auto): plain path")
    assert (s.run_dir / "recipe.yaml").is_file() and not (s.run_dir / "metrics.jsonl").exists()
    got = [train_step(s)["loss"] for _ in range(3)]
    assert s.step == 3 and max(abs(a - b) for a, b in zip(got, PINNED)) < 1e-5, got
    save_checkpoint(s, s.step)
    assert verify(s.ckpt_root / "step-3") is None
    assert evaluate(s, s.step) is False and s.state.last_eval_step == 3 and s.state.best_step == 3
    assert [e["step"] for e in events(s.run_dir, "eval")] == [3]
    summary = cleanup(s)
    assert summary["steps"] == 3 and summary["stop_reason"] == "epochs"
    assert (s.run_dir / "summary.json").is_file() and verify(s.ckpt_root / "best") is None
