"""Reports from run directories' metrics.jsonl.

    python -m engine.compare --baseline RUN_DIR RUN_DIR... [--out DIR] [--gate 1.5]
        compare.md + compare.png: best and last scores per run, differences from the baseline in
        percentage points, and a Go / No-Go verdict per run with its reason.
    python -m engine.compare RUN_DIR
        the checkpoint report of one run: every eval side by side, checkpoints and the best marked.

Go when MC accuracy or the subjective score of the run's best eval gains at least `--gate` points over
the baseline's best eval, or when a format-violation rate falls significantly: a one-sided two-proportion
z-test at 5% on the violation counts (pooled proportion; z >= 1.645). No-Go otherwise.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.curves import best_eval, read_events
from engine.errors import UserError, run_cli
from engine.files import atomic_write_bytes, atomic_write_text, figure_png

Z_5_PERCENT_ONE_SIDED = 1.645
SHOWN = ("final_score", "mc_accuracy", "subj_score", "mc_format_violation_rate", "subj_len_violation_rate",
         "subj_format_violation_rate")


@dataclass
class Run:
    name: str
    path: Path
    evals: list[dict]
    train: list[dict]

    @property
    def best(self) -> dict:
        return best_eval(self.evals)

    @property
    def last(self) -> dict:
        return self.evals[-1]


def load_run(path: Path) -> Run:
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{path}: not a run directory (no metrics.jsonl)")
    train, evals = read_events(metrics)
    evals = [e for e in evals if "final_score" in e]
    if not evals:
        raise UserError(f"{metrics}: no eval events with a final_score (was eval.generate off?)")
    return Run(path.name, path, evals, train)


def two_proportion_z(bad_base: int, n_base: int, bad_run: int, n_run: int) -> float:
    """z for 'the run's rate is lower than the baseline's' (positive when it fell)."""
    if n_base == 0 or n_run == 0:
        return 0.0
    pooled = (bad_base + bad_run) / (n_base + n_run)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_base + 1 / n_run))
    return 0.0 if se == 0 else (bad_base / n_base - bad_run / n_run) / se


def verdict(base: dict, run: dict, gate_pp: float) -> tuple[str, str]:
    gains = {k: 100 * (run[k] - base[k]) for k in ("mc_accuracy", "subj_score")}
    reasons = [f"{k} {gains[k]:+.2f} pp >= {gate_pp} pp" for k in gains if gains[k] >= gate_pp]
    for rate, bad, n in (("mc_format_violation_rate", "mc_format_violations", "n_mc"),
                         ("subj_len_violation_rate", "subj_len_violations", "n_subj"),
                         ("subj_format_violation_rate", "subj_format_violations", "n_subj")):
        z = two_proportion_z(base.get(bad, 0), base.get(n, 0), run.get(bad, 0), run.get(n, 0))
        if z >= Z_5_PERCENT_ONE_SIDED:
            reasons.append(f"{rate} fell {100 * base.get(rate, 0):.1f}% -> {100 * run.get(rate, 0):.1f}% "
                           f"(z={z:.2f}, p<0.05)")
    if reasons:
        return "Go", "; ".join(reasons)
    best_gain = max(gains.values())
    return "No-Go", (f"best gain {best_gain:+.2f} pp (MC {gains['mc_accuracy']:+.2f}, subjective "
                     f"{gains['subj_score']:+.2f}) under {gate_pp} pp, no significant fall in violations")


def pp(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def compare_table(base: Run, runs: list[Run], gate_pp: float) -> tuple[str, list[dict]]:
    rows, lines = [], [
        "| run | best step | best final | last final | best MC acc | best subj | MC format viol. | subj len viol."
        " | subj format viol. | Δ final (pp) | Δ MC (pp) | Δ subj (pp) | verdict | reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [base] + runs:
        b = r.best
        d = {k: 100 * (b[k] - base.best[k]) for k in ("final_score", "mc_accuracy", "subj_score")}
        v, why = ("baseline", "") if r is base else verdict(base.best, b, gate_pp)
        rows.append({"run": r.name, "best_step": b["step"], "best": {k: b.get(k) for k in SHOWN},
                     "last": {k: r.last.get(k) for k in SHOWN}, "delta_pp": d, "verdict": v, "reason": why,
                     "subj_cos_floor": b.get("subj_cos_floor"), "embedder": b.get("embedder")})
        lines.append(f"| {r.name} | {b['step']} | {pp(b['final_score'])} | {pp(r.last['final_score'])} | "
                     f"{pp(b['mc_accuracy'])} | {pp(b['subj_score'])} | {pp(b['mc_format_violation_rate'])} | "
                     f"{pp(b['subj_len_violation_rate'])} | {pp(b.get('subj_format_violation_rate'))} | "
                     f"{d['final_score']:+.2f} | {d['mc_accuracy']:+.2f} | {d['subj_score']:+.2f} | {v} | {why} |")
    return "\n".join(lines) + "\n" + cos_floor_note(base, runs), rows


def cos_floor_note(base: Run, runs: list[Run]) -> str:
    """The cosine every answer earns on these eval sets, so a reader sees how much of subj_cos is baseline."""
    floors = [(r.name, r.best.get("subj_cos_floor"), r.best.get("embedder")) for r in [base] + runs]
    known = [f"{name} {pp(floor)} ({embedder})" for name, floor, embedder in floors if floor is not None]
    if not known:
        return ""
    return ("\nsubj_cos_floor, the mean cosine between different gold answers of the eval set (what an "
            "answer to another question already earns): " + ", ".join(known) + ".\n")


def domain_tables(runs: list[Run]) -> str:
    """Per run, its best eval's scores per domain (when the eval data has a Domain column)."""
    parts = []
    for r in runs:
        domains = r.best.get("by_domain")
        if not domains:
            continue
        lines = [f"\n### {r.name}, step {r.best['step']}: by domain\n", "| domain | MC rows | subjective rows | final | "
                 "MC acc | subj |", "|---|---|---|---|---|---|"]
        lines += [f"| {d} | {v['n_mc']} | {v['n_subj']} | {pp(v['final_score'])} | {pp(v['mc_accuracy'])} | "
                  f"{pp(v['subj_score'])} |" for d, v in domains.items()]
        parts.append("\n".join(lines) + "\n")
    return "".join(parts)


def plot(base: Run, runs: list[Run], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in [base] + runs:
        style = {"color": "black", "linewidth": 3, "zorder": 3} if r is base else {"linewidth": 1.5}
        label = f"{r.name} (baseline)" if r is base and r.name != "baseline" else r.name
        ax1.plot([e["step"] for e in r.evals], [e["final_score"] for e in r.evals], marker="o", label=label, **style)
        ax2.plot([e["step"] for e in r.evals], [e["eval_loss"] for e in r.evals], marker="o", label=label, **style)
    ax1.set(title="final_score (competition metric)", xlabel="step", ylabel="final_score")
    ax2.set(title="eval_loss (answer-token cross-entropy)", xlabel="step", ylabel="eval_loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    png = figure_png(fig, dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, png)


def checkpoint_report(run: Run) -> str:
    ckpts = {int(p.name[5:]) for p in (run.path / "checkpoints").glob("step-*") if p.name[5:].isdigit()}
    best = run.best["step"]
    lines = [f"# Checkpoint report: {run.path}", "",
             "| step | checkpoint | eval_loss | final | MC acc | subj | subj cos | subj kw | MC format viol. |"
             " subj len viol. | subj format viol. | |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in run.evals:
        mark = "**best**" if e["step"] == best else ""
        lines.append(f"| {e['step']} | {'yes' if e['step'] in ckpts else ''} | {e['eval_loss']:.4f} | "
                     f"{pp(e['final_score'])} | {pp(e['mc_accuracy'])} | {pp(e['subj_score'])} | "
                     f"{pp(e['subj_cos'])} | {pp(e['subj_kw'])} | {pp(e['mc_format_violation_rate'])} | "
                     f"{pp(e['subj_len_violation_rate'])} | {pp(e.get('subj_format_violation_rate'))} | {mark} |")
    return "\n".join(lines) + "\n\nScores in percent; `checkpoints/best/` holds the adapter of the best step.\n"


def write_comparison(base_dir: Path, run_dirs: list[Path], out: Optional[Path], gate_pp: float) -> Path:
    base, runs = load_run(base_dir), [load_run(p) for p in run_dirs]
    out = out or base_dir.parent
    out.mkdir(parents=True, exist_ok=True)
    table, rows = compare_table(base, runs, gate_pp)
    text = (f"# Sensitivity comparison\n\nBaseline: `{base_dir}`. Scores in percent, at each run's best eval "
            f"(by final_score); Δ in percentage points against the baseline's best. Gate: {gate_pp} pp on MC "
            f"accuracy or subjective score, or a significant fall in a format-violation rate (one-sided "
            f"two-proportion z-test, 5%).\n\n{table}{domain_tables([base] + runs)}\n![curves](compare.png)\n")
    atomic_write_text(out / "compare.md", text)
    atomic_write_text(out / "compare.json", json.dumps(rows, indent=2, ensure_ascii=False))
    plot(base, runs, out / "compare.png")
    return out


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m engine.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories")
    p.add_argument("--baseline", action="store_true", help="the first run is the baseline of a comparison")
    p.add_argument("--out", type=Path, help="where compare.md/png go (default: beside the baseline run)")
    p.add_argument("--gate", type=float, default=1.5, help="points of gain that make a Go (default 1.5)")
    a = p.parse_args()
    if a.baseline or len(a.runs) > 1:
        out = write_comparison(a.runs[0], a.runs[1:], a.out, a.gate)
        print((out / "compare.md").read_text(encoding="utf-8"))
    else:
        report = checkpoint_report(load_run(a.runs[0]))
        atomic_write_text(a.runs[0] / "checkpoints.md", report)
        print(report)
    return 0


if __name__ == "__main__":
    run_cli(main)
