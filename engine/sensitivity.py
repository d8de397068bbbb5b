"""Short runs of several recipes on the same data split and eval subset, one after another, then the
Go / No-Go comparison against the first.

    python -m engine.sensitivity recipes/baseline.yaml recipes/setA.yaml recipes/setB.yaml recipes/setC.yaml \\
        [--epochs 0.3] [--out runs/sensitivity] [--gate 1.5] [--set key=value ...]

Each recipe runs as its own `train.py` process (a crash or out-of-memory in one loses none of the others)
into OUT/<recipe stem>, with `train.epochs` set to --epochs and the --set overrides applied to all. The
split and the eval subset follow from the data and the seed, which the recipes share, so every run scores
the same rows. Exit status 0 when every run finished; 1 when some failed (the others are still compared).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from engine.compare import write_comparison
from engine.config import load_recipe
from engine.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m engine.sensitivity", description=__doc__.split("\n\n")[0])
    p.add_argument("recipes", nargs="+", type=Path, help="recipes; the first is the baseline")
    p.add_argument("--epochs", type=float, default=0.3)
    p.add_argument("--out", type=Path, default=Path("runs/sensitivity"))
    p.add_argument("--gate", type=float, default=1.5)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every recipe")
    a = p.parse_args()
    if a.epochs <= 0:
        raise UserError("--epochs must be greater than 0")
    names = [r.stem for r in a.recipes]
    if len(set(names)) != len(names):
        raise UserError(f"recipes: two recipes share a file name ({', '.join(names)}); runs are named by it")
    for r in a.recipes:  # every mistake shows before the first hour of training, not after it
        load_recipe(r, [*a.set, f"train.epochs={a.epochs}"])
    finished, failed = [], []
    for recipe, name in zip(a.recipes, names):
        out = a.out / name
        print(f"=== {name}: {recipe} for {a.epochs} epoch -> {out}", flush=True)
        cmd = [sys.executable, str(ROOT / "train.py"), str(recipe), *a.set, f"train.epochs={a.epochs}",
               f"output_dir={out}"]
        code = subprocess.call(cmd)
        (finished if code == 0 else failed).append((name, out, code))
    for name, _, code in failed:
        print(f"!!! {name} failed (exit {code}); the other runs are compared without it", file=sys.stderr)
    if finished and finished[0][0] == names[0]:
        report = write_comparison(finished[0][1], [o for _, o, _ in finished[1:]], a.out, a.gate)
        print((report / "compare.md").read_text(encoding="utf-8"))
    elif finished:
        print(f"!!! the baseline {names[0]} failed: no comparison written", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    run_cli(main)
