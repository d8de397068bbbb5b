"""Checkpoints: peft adapter + `state.pt` (optimizer, step, RNG, loop state), written atomically.

A checkpoint is built in a hidden temporary directory and renamed into place as `step-<N>` only when
every file is on disk, so a killed write never leaves a directory that looks complete. `best/` is
swapped in the same way. Each one holds `manifest.json` (every file's size and sha256, and the step),
written last: a checkpoint damaged afterwards (a truncated copy, a full disk, bit rot) fails `verify` and
is never resumed from or inferred with.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from engine.files import atomic_write_dir, sha256_of

STEP_DIR = re.compile(r"^step-(\d+)$")
ADAPTER_FILE = "adapter_model.safetensors"
MANIFEST = "manifest.json"


def write_manifest(d: Path, step: int) -> None:
    files = {str(f.relative_to(d)): {"size": f.stat().st_size, "sha256": sha256_of(f)}
             for f in sorted(d.rglob("*")) if f.is_file() and f.name != MANIFEST}
    (d / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1), encoding="utf-8")


def verify(d: Path) -> Optional[str]:
    """None when every file of the checkpoint `d` is there with the size and sha256 its manifest gives;
    else why not, in a few words."""
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (an unfinished or older checkpoint)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, want in files.items():
        f = d / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} is {f.stat().st_size} bytes, the manifest says {want['size']}"
        if sha256_of(f) != want["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def manifest_step(d: Path) -> Optional[int]:
    """The step a verified checkpoint was saved at (None when its manifest does not say)."""
    try:
        return int(json.loads((d / MANIFEST).read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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


def save_adapter(model, out: Path, step: int, extra: Optional[dict[str, str]] = None) -> None:
    """The adapter alone (`best/`), with `extra` text files (name -> content) under the same manifest."""
    def fill(d: Path) -> None:
        model.save_pretrained(str(d))
        for name, text in (extra or {}).items():
            (d / name).write_text(text, encoding="utf-8")

    atomic_write_dir(out, lambda d: (fill(d), write_manifest(d, step)))


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

    atomic_write_dir(final, lambda d: (fill(d), write_manifest(d, step)))
    return final


def step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every `step-N` directory under `ckpt_root`, oldest first, whole or not."""
    if not ckpt_root.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in ckpt_root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name)))


def newest_verified(ckpt_root: Path) -> Optional[Path]:
    """The newest checkpoint whose files match its manifest (not loaded: for messages; resume reads them
    with `usable_checkpoint`)."""
    return next((p for _, p in reversed(step_dirs(ckpt_root)) if verify(p) is None), None)


def remove_partial_writes(ckpt_root: Path) -> None:
    """Delete temporary directories a killed write left behind (they never count as checkpoints)."""
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                shutil.rmtree(p, ignore_errors=True)


@dataclass
class Saved:
    """A checkpoint read into memory, not yet applied to a model."""
    path: Path
    adapter: dict
    state: dict


def read_checkpoint(path: Path) -> Saved:
    """Verify `path` and read its adapter tensors and state to the CPU; ValueError says why it is unusable."""
    from safetensors.torch import load_file

    problem = verify(path)
    if problem:
        raise ValueError(problem)
    try:
        adapter = load_file(str(path / ADAPTER_FILE), device="cpu")
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # a file that verifies but does not load: written by something else
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        raise ValueError(f"does not load ({type(e).__name__}: {first})") from None
    return Saved(path, adapter, state)


def usable_checkpoint(ckpt_root: Path) -> tuple[Optional[Saved], list[str]]:
    """(the newest checkpoint under `ckpt_root` that verifies and loads, 'step-N: why' for each newer one
    passed over). (None, []) when there is no checkpoint at all; UserError when none is usable."""
    from engine.errors import UserError

    found = step_dirs(ckpt_root)
    skipped = []
    for _, path in reversed(found):
        try:
            return read_checkpoint(path), skipped
        except ValueError as e:
            skipped.append(f"{path.name}: {e}")
    if not found:
        return None, []
    raise UserError(f"{ckpt_root}: no usable checkpoint ({'; '.join(skipped)}); move them away to start over, "
                    f"or set train.resume=false for a fresh run directory")


def apply_checkpoint(saved: Saved, model, optimizer, rank: int = 0, world: int = 1) -> dict:
    """Restore adapter weights, optimizer and this rank's RNG from a read checkpoint; returns its state.
    Resumed with another number of ranks, the RNG streams (dropout) start afresh from the seed instead."""
    from peft import set_peft_model_state_dict

    device = next(p for p in model.parameters() if p.requires_grad).device
    set_peft_model_state_dict(model, {k: v.to(device) for k, v in saved.adapter.items()})
    optimizer.load_state_dict(saved.state["optimizer"])
    if len(saved.state["rngs"]) == world:
        set_rng_state(saved.state["rngs"][rank])
    return saved.state
