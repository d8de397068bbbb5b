"""The run directory: fresh or resumed (then with the same recipe and the same data), what it records of the run
(the resolved recipe, the data's fingerprints), metrics.jsonl and train.log."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import yaml

from engine.config import Recipe, dump_recipe, recipe_to_dict
from engine.errors import UserError
from engine.files import atomic_write_text, sha256_of

log = logging.getLogger("engine")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def data_fingerprints(recipe: Recipe, n_train: int, n_eval: Optional[int]) -> dict:
    """sha256 and row count of the data files a run reads: a resumed run must read the same rows."""
    prints = {}
    for key, path, rows in (("data.train", recipe.data.train, n_train), ("data.eval", recipe.data.eval, n_eval)):
        if path:
            prints[key] = {"path": path, "sha256": sha256_of(path), "rows": rows}
    return prints


def check_same_data(stored_path: Path, prints: dict) -> None:
    stored = json.loads(stored_path.read_text(encoding="utf-8"))
    for key in sorted(set(stored) | set(prints)):
        old, new = stored.get(key), prints.get(key)
        if (old or {}).get("sha256") != (new or {}).get("sha256"):
            def show(p):
                return f"sha256 {p['sha256'][:12]}, {p['rows']} rows" if p else "none"
            raise UserError(f"{key}: {(new or old)['path']} is not the data this run started with (then "
                            f"{show(old)}, now {show(new)}); restore it, or start over with train.resume=false")


def prepare_run_dir(recipe: Recipe, data_prints: dict) -> Path:
    """The run directory, fresh or to resume; a resumed one must hold the same recipe and the same data.
    Nothing is written here: `record_run` does that once every check has passed."""
    run_dir = Path(recipe.output_dir)
    if not recipe.train.resume and run_dir.exists() and any(run_dir.iterdir()):
        n = 1
        while Path(f"{run_dir}-{n}").exists():
            n += 1
        run_dir = Path(f"{run_dir}-{n}")
        recipe.output_dir = str(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir: {run_dir} is a file, not a directory")
    stored_path = run_dir / "recipe.yaml"
    current = _flatten(recipe_to_dict(recipe))
    if stored_path.exists():
        stored = _flatten(yaml.safe_load(stored_path.read_text(encoding="utf-8")) or {})
        for key in sorted(set(stored) | set(current)):
            if key not in ("train.resume", "output_dir") and stored.get(key) != current.get(key):
                raise UserError(f"{stored_path}: this run was made with {key}={stored.get(key)!r}, now "
                                f"{current.get(key)!r}; resume with the same recipe, or set train.resume=false")
    if (run_dir / "data.json").exists():
        check_same_data(run_dir / "data.json", data_prints)
    return run_dir


def record_run(run_dir: Path, recipe: Recipe, overrides: list[str], data_prints: dict) -> None:
    """The resolved recipe (overrides noted at its top) and the data fingerprints, into the run directory."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output_dir: cannot create {run_dir}: {e.strerror}") from None
    header = "".join(f"# override: {o}\n" for o in overrides)
    atomic_write_text(run_dir / "recipe.yaml", header + dump_recipe(recipe))
    atomic_write_text(run_dir / "data.json", json.dumps(data_prints, indent=1, ensure_ascii=False))


class MetricsLog:
    """metrics.jsonl: one event a line, flushed as written."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Drop events past `step`: a resumed run logs them again, as an uninterrupted run would have."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def write(self, event: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, ensure_ascii=False) + "\n")


def setup_logging(run_dir: Path) -> None:
    log.setLevel(logging.INFO)
    for h in list(log.handlers):
        log.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    to_file = logging.FileHandler(run_dir / "train.log", encoding="utf-8")
    to_file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(console)
    log.addHandler(to_file)
    log.propagate = False
