"""Checkpoints: peft adapter + `state.pt` (optimizer, step, RNG, loop state), written atomically.

A checkpoint is built in a hidden temporary directory and renamed into place as `step-<N>` only when
every file is on disk, so a killed write never leaves a directory that looks complete. `best/` is
swapped in the same way.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

STEP_DIR = re.compile(r"^step-(\d+)$")
ADAPTER_FILE = "adapter_model.safetensors"


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _write_dir_atomically(final: Path, fill) -> None:
    """Call `fill(tmp_dir)`, then put tmp_dir at `final` (replacing it) with renames only."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        _fsync_tree(tmp)
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_adapter(model, out: Path) -> None:
    _write_dir_atomically(out, lambda d: model.save_pretrained(str(d)))


def save_checkpoint(ckpt_root: Path, step: int, model, optimizer, loop_state: dict, rngs: list[dict],
                    on_half_written: Callable[[], object] = lambda: None) -> Path:
    """Write checkpoints/step-<step>; `loop_state` holds what the loop needs to go on (best score...),
    `rngs` every rank's RNG state, in rank order."""
    final = ckpt_root / f"step-{step}"

    def fill(d: Path) -> None:
        model.save_pretrained(str(d))
        on_half_written()
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "rngs": rngs, "loop": loop_state},
                   d / "state.pt")

    _write_dir_atomically(final, fill)
    return final


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "state.pt").is_file() and (p / ADAPTER_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def remove_partial_writes(ckpt_root: Path) -> None:
    """Delete temporary directories a killed write left behind (they never count as checkpoints)."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    found = complete_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def load_checkpoint(path: Path, model, optimizer, rank: int = 0, world: int = 1) -> dict:
    """Restore adapter weights, optimizer and this rank's RNG from `path`; returns the saved state dict.
    Resumed with another number of ranks, the RNG streams (dropout) start afresh from the seed instead."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = next(p for p in model.parameters() if p.requires_grad).device
    set_peft_model_state_dict(model, load_file(str(path / ADAPTER_FILE), device=str(device)))
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    if len(state["rngs"]) == world:
        set_rng_state(state["rngs"][rank])
    return state
