"""Fault injection for the reliability tests: `FSKU_FAULT=point@step[,point@step...]`.

At a named point of the named step the process meets a real fault: `kill-*` points send it SIGKILL
(a power cut, an OOM killer), `nan` makes the step's loss NaN, `oom` raises CUDA out-of-memory, `enospc`
makes the checkpoint write fail with a full disk. Unset, it costs one dictionary lookup a call.
"""
from __future__ import annotations

import errno
import os
import signal

POINTS = {"kill-step", "kill-eval", "kill-checkpoint", "kill-infer-write", "nan", "oom", "enospc"}


def _armed() -> dict[str, int]:
    spec = os.environ.get("FSKU_FAULT", "")
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, _, step = part.partition("@")
        if point not in POINTS:
            raise ValueError(f"FSKU_FAULT: unknown point {point!r} (known: {', '.join(sorted(POINTS))})")
        out[point] = int(step or 0)
    return out


def fault(point: str, step: int = 0) -> bool:
    """Act out the fault armed for (point, step): kill, raise, or return True for `nan`."""
    if _armed().get(point) != step:
        return False
    if point.startswith("kill-"):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "oom":
        import torch
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
    if point == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return True
