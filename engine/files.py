"""Writing files so that a crash leaves the old file or the new one, never half of either."""
from __future__ import annotations

import hashlib
import os
import shutil
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


def fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def atomic_write_dir(final: str | Path, fill: Callable[[Path], object], replace: bool = True) -> None:
    """Call `fill(tmp_dir)` on a fresh directory beside `final`, fsync its files, then put it at `final` with
    renames only. An existing `final` is replaced, or with `replace` false kept (another process built it
    first) and the new one dropped. A failure leaves `final` as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        fsync_tree(tmp)
        if final.exists() and not replace:
            shutil.rmtree(tmp)
            return
        if final.exists():
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except OSError:  # without `replace`, another process may have put its own there after the check
            if replace or not final.exists():
                raise
            shutil.rmtree(tmp)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():  # moved aside, then the rename failed: put it back
            os.replace(old, final)
        raise


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
