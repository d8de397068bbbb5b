"""Run a script (train.py) in this process as its command line would, then write what torch.compile spent
(dynamo's per-phase times, the cache hit/miss counters) to OUT_JSON: where a first step's time goes.

    python -m bench.compile_report OUT_JSON train.py RECIPE [KEY=VALUE ...]
"""
from __future__ import annotations

import atexit
import json
import runpy
import sys


def report(out: str) -> None:
    from torch._dynamo.utils import compile_times, counters
    with open(out, "w") as f:
        json.dump({"compile_times": compile_times(repr="str"),
                   "counters": {name: dict(values) for name, values in counters.items() if values}}, f, indent=1,
                  default=str)


if __name__ == "__main__":
    out, script = sys.argv[1], sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path.insert(0, ".")
    atexit.register(report, out)
    runpy.run_path(script, run_name="__main__")
