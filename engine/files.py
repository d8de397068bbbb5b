"""Writing files so that a crash leaves the old file or the new one, never half of either."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable


def atomic_write_bytes(path: str | Path, data: bytes, before_replace: Callable[[], object] = lambda: None) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, then rename it over `path`.
    `before_replace` runs between the two (the fault-injection tests kill the process there)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        before_replace()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, before_replace: Callable[[], object] = lambda: None) -> None:
    """`atomic_write_bytes` of `text` in UTF-8, newlines as given."""
    atomic_write_bytes(path, text.encode("utf-8"), before_replace)


def figure_png(fig, dpi: int) -> bytes:
    """A matplotlib figure as PNG bytes, for `atomic_write_bytes`."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    return buf.getvalue()


def sha256_of(path: str | Path) -> str:
    """The file's sha256, hex, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
