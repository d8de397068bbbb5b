"""Checks that a directory a recipe key or flag names is what it should be, before anything loads."""
from __future__ import annotations

from pathlib import Path

from engine.errors import UserError


def check_model_dir(path: str | Path, key: str = "model.path") -> Path:
    """`path` holds a transformers model (its config.json); else a UserError naming `key`."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{key}: {path} is not a model directory (no config.json)")
    return path


def check_adapter_dir(path: str | Path) -> Path:
    """`path` holds a peft adapter (its adapter_config.json); else a UserError naming --adapter."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"--adapter: {path} has no adapter_config.json")
    return path
