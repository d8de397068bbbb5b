"""Per-step train losses of two runs' metrics.jsonl side by side, and the largest difference.

    python -m bench.compare_losses A/metrics.jsonl B/metrics.jsonl
"""
from __future__ import annotations

import json
import sys


def losses(path: str) -> list[float]:
    with open(path, encoding="utf-8") as f:
        return [e["loss"] for e in map(json.loads, f) if e["event"] == "train"]


if __name__ == "__main__":
    a, b = losses(sys.argv[1]), losses(sys.argv[2])
    for step, (x, y) in enumerate(zip(a, b), 1):
        print(f"step {step:3d}  {x:.7f}  {y:.7f}  {y - x:+.2e}")
    print(f"steps {len(a)} / {len(b)}; largest difference {max(abs(x - y) for x, y in zip(a, b)):.3e}")
