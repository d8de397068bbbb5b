"""Shared fixtures: the tiny offline model (built once per session), paths, and the real A.X tokenizer
from ../shared when it is there (tests that need it skip cleanly otherwise)."""
from __future__ import annotations

import atexit
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.quiet import quiet_library_noise

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "sample.csv"
"""The test suite's own sample: the hand-written set the tests were built on (data/sample.csv is the demo's)."""
TINY_RECIPE = "tests/data/tiny.yaml"
"""The test suite's tiny recipe, relative to ROOT (recipes/tiny.yaml is the demo)."""
SHARED = ROOT.parent / "shared"
AX_TOKENIZER = SHARED / "models" / "ax4-light-tokenizer"
FSKU_DEV = SHARED / "data" / "fsku" / "fsku_dev.csv"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "PYTEST_XDIST_WORKER" in os.environ:  # a worker beside others: one thread each, for it and its subprocesses
    os.environ.setdefault("OMP_NUM_THREADS", "1")
quiet_library_noise()  # the in-process tests see what the command lines see


LONGEST_FIRST = ("test_learning.py", "test_loss.py", "test_workflow.py", "test_distributed.py",
                 "test_reliability.py", "test_train.py", "test_evaluate.py")
"""The files that take longest (in that order, as measured): with a file per worker, running them first
lets the two workers end together instead of one finishing a long file alone."""


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from engine.config import ModelConfig
    from engine.model import ensure_tiny_model
    path = tmp_path_factory.mktemp("tiny") / "model"
    ensure_tiny_model(ModelConfig(path=str(path), quant="none", build_tiny=True), str(SAMPLE), size="test")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from engine.model import load_tokenizer
    return load_tokenizer(tiny_model)


@pytest.fixture(scope="session")
def ax_tokenizer():
    if not AX_TOKENIZER.is_dir():
        pytest.skip("../shared/models/ax4-light-tokenizer is absent")
    from engine.model import load_tokenizer
    return load_tokenizer(AX_TOKENIZER)


@pytest.fixture(scope="session")
def fsku_dev() -> Path:
    if not FSKU_DEV.is_file():
        pytest.skip("../shared/data/fsku/fsku_dev.csv is absent")
    return FSKU_DEV


def cli_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


_server: list = []


def fork_server():
    """This worker's warm Python (tests/forkserver.py), started at its first use."""
    if not _server:
        from forkserver import ForkServer
        _server.append(ForkServer(ROOT, cli_env()))
        atexit.register(_server[0].close)
    return _server[0]


def start_cli(*args: str, cwd: Path = ROOT):
    """Start `python ARGS...` from the repository root as a child of the warm Python; returns a
    Popen-like handle (poll, wait, send_signal, returncode) whose output() is its stdout and stderr."""
    return fork_server().start(list(args), cwd, cli_env())


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run `python ARGS...` from the repository root, capturing output: forked from the warm Python, or
    in a fresh interpreter when `fresh` (what a user's first command pays, imports and all)."""
    if fresh:
        return subprocess.run([sys.executable, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True,
                              timeout=timeout)
    proc = start_cli(*args, cwd=cwd)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(list(args), proc.returncode, *proc.output())


def tiny_overrides(tiny_model: Path, out: Path, *extra: str) -> list[str]:
    """The tiny recipe on the session's tiny model, already built (from the sample data): tests that train it
    on other data use it as it is."""
    return [f"model.path={tiny_model}", "model.build_tiny=false", f"data.train={SAMPLE}", f"output_dir={out}",
            *extra]


def write_csv(path: Path, rows: list[list[str]], header=("ID", "Question", "Answer")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


LIBRARY_NOISE = re.compile(r"Warning|warnings\.warn|Failed to load|deprecated|Loading weights|Writing model shards")


def assert_no_library_warnings(stderr: str) -> None:
    """What a normal run prints is ours: no library warning or deprecation notice."""
    noisy = [line for line in stderr.splitlines() if LIBRARY_NOISE.search(line)]
    assert not noisy, noisy


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def compiled_checkpoint(body, save: bool, prepare=lambda graph: None, checkpoint: bool = True):
    """`body` (checkpointed unless `checkpoint` is false) compiled through aot_autograd, the joint graph
    passed through `prepare` and CheckpointedMatmulTags(save) before the partitioner; returns the compiled
    call and the dict where its forward and backward graphs land."""
    import torch
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from engine.perf.levers import CheckpointedMatmulTags

    graphs = {}

    def partition(joint, *args, **kwargs):
        prepare(joint.graph)
        CheckpointedMatmulTags(save)(joint.graph)
        return min_cut_rematerialization_partition(joint, *args, **kwargs)

    def keep(kind):
        def compiler(gm, _):
            graphs[kind] = gm.graph
            return make_boxed_func(gm)
        return compiler

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"), partition_fn=partition)
    step = (lambda x: torch.utils.checkpoint.checkpoint(body, x, use_reentrant=False)) if checkpoint else body
    return torch.compile(step, backend=backend), graphs
