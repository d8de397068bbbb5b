"""`runs/<name>/curves.png`: a run's learning curves from its metrics.jsonl, redrawn at every eval and at the
end. Left: train loss (a running mean) and eval_loss; right: final_score, mc_accuracy and subj_score,
with the best eval marked."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from engine.files import atomic_write_bytes, figure_png


def read_events(metrics: Path) -> tuple[list[dict], list[dict]]:
    events = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [e for e in events if e["event"] == "train"], [e for e in events if e["event"] == "eval"]


def running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def best_eval(evals: list[dict]) -> Optional[dict]:
    scored = [e for e in evals if "final_score" in e]
    return max(scored, key=lambda e: (e["final_score"], -e["step"])) if scored else None


def write_curves(run_dir: Path, title: str = "") -> Path:
    """Draw the curves of `run_dir` into curves.png (written whole, then renamed into place)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_events(run_dir / "metrics.jsonl")
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [e["step"] for e in train]
        loss_ax.plot(steps, [e["loss"] for e in train], color="tab:blue", alpha=0.25, linewidth=1)
        loss_ax.plot(steps, running_mean([e["loss"] for e in train], max(1, len(train) // 20)),
                     color="tab:blue", label="train loss")
    if evals:
        loss_ax.plot([e["step"] for e in evals], [e["eval_loss"] for e in evals], "o-", color="tab:red",
                     label="eval_loss")
    for key, color in (("final_score", "black"), ("mc_accuracy", "tab:green"), ("subj_score", "tab:purple")):
        points = [(e["step"], e[key]) for e in evals if key in e]
        if points:
            score_ax.plot(*zip(*points), "o-", color=color, label=key, linewidth=2 if key == "final_score" else 1)
    best = best_eval(evals)
    if best is not None:
        score_ax.axvline(best["step"], color="gray", linestyle="--", linewidth=1)
        score_ax.annotate(f"best: step {best['step']}", (best["step"], best["final_score"]),
                          textcoords="offset points", xytext=(5, 8), fontsize=8)
    loss_ax.set(title="loss (answer tokens)", xlabel="step")
    score_ax.set(title="competition metric on the eval set", xlabel="step", ylim=(-0.02, 1.02))
    for ax in (loss_ax, score_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = run_dir / "curves.png"
    png = figure_png(fig, dpi=100)
    plt.close(fig)
    atomic_write_bytes(out, png)
    return out
