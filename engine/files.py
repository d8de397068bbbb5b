"""Writing files so that a crash leaves the old file or the new one, never half of either."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write_text(path: str | Path, text: str, before_replace: Callable[[], object] = lambda: None) -> None:
    """Write `text` (UTF-8) to a temporary file beside `path`, fsync it, then rename it over `path`.
    `before_replace` runs between the two (the fault-injection tests kill the process there)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        before_replace()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
