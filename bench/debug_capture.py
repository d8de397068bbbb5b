"""Why a step's capture fails: engine.loop's own setup and steps with train.cuda_graphs, each capture's first
error printed with its stack; then the same with the graphs' pool left to PyTorch.

    python -m bench.debug_capture RECIPE [KEY=VALUE ...]
"""
from __future__ import annotations

import sys
import traceback

from engine import loop
from engine.config import load_recipe
from engine.perf import graphs


def capture_loudly(self, key, batch) -> None:
    try:
        self.graphs[key] = graphs.Captured(self.compute, batch, self.pool)
        print(f"captured {key}", flush=True)
    except Exception as e:  # noqa: BLE001 -- the point is to print it
        while e.__context__ is not None:
            e = e.__context__
        print(f"capture of {key} failed (pool {self.pool}):", flush=True)
        traceback.print_exception(e)
        self.broken = str(e)


def main() -> None:
    graphs.GraphedForwards.capture = capture_loudly
    s = loop.setup(load_recipe(sys.argv[1], sys.argv[2:]))
    for _ in range(4):
        print(loop.train_step(s)["loss"], flush=True)
    s.forwards.pool, s.forwards.broken, s.forwards.seen = None, "", set()
    for _ in range(4):
        print(loop.train_step(s)["loss"], flush=True)


if __name__ == "__main__":
    main()
